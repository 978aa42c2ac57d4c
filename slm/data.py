"""Random windows of a memmapped token file, served by a LightningDataModule.

Train batches are nanoGPT's ``get_batch``: ``x = tokens[i:i+T]``, ``y = tokens[i+1:i+T+1]`` at
uniform random starts ``i``. Each optimizer step's global batch (``batch_size x devices x
nodes x accumulate`` windows) is drawn from its own seeded generator ``(seed, step)`` and dealt
out, rank by rank and micro-batch by micro-batch: the same seed and global batch give the same
windows at every step however the batch is split (2 ranks x 8 = 1 x 16 = 1 x 8 x accumulate 2),
so a model does not depend on the machine it was trained on. The stream is split across
dataloader workers without duplicates (worker ``w`` of ``W`` makes micro-batches
``b = w mod W``, which PyTorch's loader returns in order) and resumes exactly: a resumed run
starts at the step after the last one trained on. Validation uses a fixed set of evenly spaced
windows, the same at every evaluation, so val curves are comparable.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

from slm import tokenizer
from slm.prepare import (
    SPLITS,
    DataError,
    prepare,
    prepare_command,
    read_meta,
    read_tokenizer,
    reprepare,
)
from slm.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def load_tokens(data_dir: str | Path, split: str) -> np.memmap:
    """The ``split`` tokens of ``data_dir`` as a read-only memmap, after checking them
    against ``meta.json`` (tokenizer, byte size, and token ids below the vocab size)."""
    data_dir = Path(data_dir)
    path = data_dir / f"{split}.bin"
    meta = read_meta(data_dir)
    if meta is None:
        raise DataError(
            f"{data_dir}/meta.json is missing, so {path.name} is of unknown origin; "
            + prepare_command(data_dir, None)
        )
    # The fix names the recorded source, so that the command says what it will read.
    fix = reprepare(data_dir, meta)
    if meta.get("tokenizer") not in tokenizer.KINDS or meta.get("dtype") != "uint16":
        raise DataError(
            f"{data_dir}/meta.json is for tokenizer {meta.get('tokenizer')!r} "
            f"({meta.get('dtype')}), not gpt2 (uint16) or bpe (uint16); {fix}"
        )
    if not path.exists():
        raise DataError(f"{path} is missing; {fix}")
    size = path.stat().st_size
    if size % 2:
        raise DataError(
            f"{path} has an odd byte size ({size:,}), so it is no uint16 token file; {fix}"
        )
    expected = meta["splits"][split]["tokens"]
    if size // 2 != expected:
        raise DataError(
            f"{path} holds {size // 2:,} tokens but meta.json says {expected:,} (truncated?); {fix}"
        )
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    # Chunked so that even a 1 GB bin is checked without holding it in memory.
    step = 1 << 24
    top = max((int(tokens[i : i + step].max()) for i in range(0, len(tokens), step)), default=0)
    vocab = meta.get("vocab_size", tokenizer.VOCAB_SIZE)
    if top >= vocab:
        raise DataError(
            f"{path} holds token id {top}, beyond the {meta['tokenizer']} vocab of {vocab}; {fix}"
        )
    return tokens


def _windows(tokens: np.ndarray, starts: np.ndarray, block_size: int):
    """``(x, y)`` int64 tensors of shape (len(starts), block_size): exact shifted slices."""
    buf = np.stack([tokens[i : i + block_size + 1] for i in starts]).astype(np.int64)
    buf = torch.from_numpy(buf)
    return buf[:, :-1].contiguous(), buf[:, 1:].contiguous()


class RandomWindows(IterableDataset):
    """One rank's endless stream of micro-batches of random windows (yields whole batches).

    Micro-batch ``b`` belongs to optimizer step ``b // accumulate``; the step's global batch
    of ``batch_size * world_size * accumulate`` starts is drawn from ``(seed, step)``, and rank
    ``r``'s micro-batch ``m`` takes its slice ``r * accumulate + m``."""

    def __init__(
        self,
        path: str | Path,
        block_size: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        accumulate: int = 1,
        start: int = 0,
    ) -> None:
        self.path, self.block_size, self.batch_size = str(path), block_size, batch_size
        self.seed, self.rank, self.world_size, self.accumulate = seed, rank, world_size, accumulate
        self.start = start

    def starts(self, batch_index: int, n_tokens: int) -> np.ndarray:
        """Window starts of this rank's micro-batch ``batch_index``: uniform over all valid
        starts."""
        step, micro = divmod(batch_index, self.accumulate)
        rng = np.random.default_rng((self.seed, step))
        global_batch = self.batch_size * self.world_size * self.accumulate
        starts = rng.integers(0, n_tokens - self.block_size, size=global_batch)
        first = (self.rank * self.accumulate + micro) * self.batch_size
        return starts[first : first + self.batch_size]

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        tokens = np.memmap(self.path, dtype=np.uint16, mode="r")  # opened in each worker
        for b in itertools.count(self.start + worker, workers):
            yield _windows(tokens, self.starts(b, len(tokens)), self.block_size)


class FixedWindows(Dataset):
    """A fixed list of windows: ``n`` evenly spaced over the split, or ``"all"``
    non-overlapping windows covering it; with ``world_size`` > 1, rank ``rank``'s share.

    The windows are dealt out to the ranks (``rank``, ``rank + world_size``, ...) without
    padding, so each window counts once in the all-gathered val loss however many ranks there
    are. (Lightning's ``DistributedSampler`` pads the last ranks with repeated windows when
    the world size does not divide their number.)"""

    def __init__(
        self,
        path: str | Path,
        n_tokens: int,
        block_size: int,
        n: int | str,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.path, self.block_size = str(path), block_size
        last = n_tokens - block_size - 1  # the last valid start
        if n == "all":
            starts = np.arange(0, last + 1, block_size)
        else:
            starts = np.unique(np.linspace(0, last, num=int(n)).round().astype(np.int64))
        if len(starts) < world_size:
            raise DataError(
                f"{len(starts)} val windows cannot be shared by {world_size} processes; "
                f"raise data.val_windows to at least {world_size}"
            )
        self.starts = starts[rank::world_size]
        self._tokens = None

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, k: int):
        if self._tokens is None:  # opened lazily, once per worker
            self._tokens = np.memmap(self.path, dtype=np.uint16, mode="r")
        x, y = _windows(self._tokens, self.starts[k : k + 1], self.block_size)
        return x[0], y[0]


class TokenDataModule(L.LightningDataModule):
    """Train/val batches from ``train.bin``/``val.bin`` in ``dir``, prepared on demand from
    ``source`` (None: what ``dir`` holds, else TinyStories; see ``prepare.resolve_source``)
    with ``tokenizer`` (the ``tokenizer`` config, or a ``Tokenizer``: see ``prepare``). After
    ``setup``, ``self.tokenizer`` is the tokenizer the bins were made with."""

    def __init__(
        self,
        dir: str = "data/tinystories",
        block_size: int = 256,
        batch_size: int = 32,
        source: str | None = None,
        num_workers: int = 2,
        val_fraction: float = 0.01,
        val_windows: int | str = 200,
        overwrite: bool = False,
        seed: int = 1337,
        tokenizer=None,
        max_stories: int | None = None,
    ) -> None:
        super().__init__()
        self.dir, self.source = Path(dir).expanduser().resolve(), source
        self.block_size, self.batch_size, self.num_workers = block_size, batch_size, num_workers
        self.val_fraction, self.val_windows, self.overwrite = val_fraction, val_windows, overwrite
        self.tokenizer_request = tokenizer
        self.tokenizer: Tokenizer | None = None
        self.seed, self.max_stories = seed, max_stories
        self.n_tokens: dict[str, int] = {}

    def prepare_data(self) -> None:
        # Lightning calls this on one process per node, before setup().
        prepare(
            self.source, self.dir, self.val_fraction, self.overwrite, self.tokenizer_request,
            self.max_stories,
        )  # fmt: skip

    def setup(self, stage: str | None = None) -> None:
        for split in SPLITS:
            n = len(load_tokens(self.dir, split))
            if self.block_size >= n:
                raise DataError(
                    f"model.block_size={self.block_size} is not smaller than the {n:,} tokens of "
                    f"{self.dir}/{split}.bin; use a smaller block_size or more data"
                )
            self.n_tokens[split] = n
        self.meta = read_meta(self.dir)
        given = self.tokenizer_request  # prepare_data checked it against the dir's meta.json
        self.tokenizer = (
            given.load() if isinstance(given, Tokenizer) else read_tokenizer(self.dir, self.meta)
        )

    def _loader(self, dataset, **kwargs) -> DataLoader:
        workers = self.num_workers
        return DataLoader(
            dataset,
            num_workers=workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        trainer, rank, world, accumulate, start = self.trainer, 0, 1, 1, 0
        if trainer is not None:
            rank, world = trainer.global_rank, trainer.world_size
            accumulate = trainer.accumulate_grad_batches
            # On resume Lightning restores its loops before this is called: continue the
            # stream at the first optimizer step the interrupted run had not trained on.
            start = trainer.global_step * accumulate
        stream = RandomWindows(
            self.dir / "train.bin", self.block_size, self.batch_size, self.seed,
            rank, world, accumulate, start,
        )  # fmt: skip
        return self._loader(stream, batch_size=None)

    def state_dict(self) -> dict:
        """What the checkpoint records of the data: the dir it trains and validates on (a
        resume on another is refused, ``resume.check_resume_data``), the global batch (the
        windows each optimizer step draws from ``(seed, step)``) and its factors on this run."""
        t = self.trainer
        world, accumulate = (t.world_size, t.accumulate_grad_batches) if t is not None else (1, 1)
        return {
            "dir": str(self.dir),
            "global_batch": self.batch_size * world * accumulate,
            "batch_size": self.batch_size,
            "world_size": world,
            "accumulate": accumulate,
        }

    def load_state_dict(self, state: dict) -> None:
        """On resume: a global batch other than the checkpoint's run's is said on one line
        (another split of the same global batch draws the same windows: nothing to say)."""
        now = self.state_dict()
        if "batch_size" not in state:  # a checkpoint from before the batch was recorded
            return
        was = state.get("global_batch")
        if was is None:  # a checkpoint from before the global batch was recorded
            was = state["batch_size"] * state["world_size"] * state["accumulate"]
        if was != now["global_batch"]:
            rank_zero_only(log.warning)(
                "resuming at a global batch of %d sequences (data.batch_size=%d x %d devices x "
                "accumulate %d), where the checkpoint's run trained at %d (%d x %d x %d): each "
                "optimizer step now sees another number of tokens",
                now["global_batch"], now["batch_size"], now["world_size"], now["accumulate"],
                was, state["batch_size"], state["world_size"], state["accumulate"],
            )  # fmt: skip

    def val_dataloader(self) -> DataLoader:
        rank, world = 0, 1
        if self.trainer is not None:
            rank, world = self.trainer.global_rank, self.trainer.world_size
        windows = FixedWindows(
            self.dir / "val.bin", self.n_tokens["val"], self.block_size, self.val_windows,
            rank, world,
        )  # fmt: skip
        return self._loader(windows, batch_size=self.batch_size, shuffle=False)
