"""What a training run leaves in its run dir, and the story suite at its end.

``write_outputs``: ``metrics.json`` (the run's status: ``run_status``), ``slm.pt`` (the best
weights, ``slm.checkpoint.save_slm_pt``) and ``loss.png`` (``plot_losses``), written with
SIGINT and SIGTERM held (``deferred_signals``) so a Ctrl-C does not leave one without the
other. ``story_suite``: after a completed run, the story suite's completions of ``slm.pt``
(``slm.stories.jsonl``), its numbers in ``metrics.json`` and the trackers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import threading
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig

from slm import files, stories
from slm.callbacks import RunHistory
from slm.checkpoint import load_model, model_of, read, save_slm_pt
from slm.errors import SlmError, one_line
from slm.module import GPTModule
from slm.strategy import full_state_dict, is_sharded
from slm.tokenizer import Tokenizer

log = logging.getLogger(__name__)
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def run_status(error: BaseException | None) -> tuple[str, str | None]:
    """``completed``, ``interrupted`` (Ctrl-C: Lightning turns it into ``SystemExit``) or
    ``failed``, and the error's one line."""
    if error is None:
        return "completed", None
    if isinstance(error, (KeyboardInterrupt, SystemExit)):
        return "interrupted", None
    lines = str(error).strip().splitlines()
    return "failed", f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def write_outputs(
    run_dir: Path,
    module: GPTModule,
    best: ModelCheckpoint,
    history: RunHistory,
    trainer: L.Trainer,
    error: BaseException | None = None,
    parameters: dict[str, int] | None = None,
    agreed_stop: bool = False,
) -> None:
    """``metrics.json`` always (with the run's status and the model's ``parameters``);
    ``slm.pt`` (best weights + model config) and ``loss.png`` once the run has made an
    optimizer step. A run that failed before its first step leaves no weights that
    ``generate.py`` would take for a model.

    Rank 0 writes. With a sharded model every rank calls this: the full weights are gathered
    from all of them, unless the best checkpoint has them (read by rank 0 alone) or the run
    failed on its own (``error``, not a stop every rank agreed on: ``agreed_stop``, or a
    divergence), when the other ranks may not be here to take part."""
    steps = trainer.global_step
    status, reason = run_status(error)
    best_path = best.best_model_path
    has_best = bool(best_path) and Path(best_path).exists()
    state, best_step = None, steps
    if steps > 0 and not has_best:
        together = error is None or agreed_stop or isinstance(error, FloatingPointError)
        if together or not is_sharded(module.model):
            state = full_state_dict(module.model)
    if not trainer.is_global_zero:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    if steps > 0:
        if has_best:
            best_ckpt = read(best_path, mmap=True)  # the optimizer state mapped, never read
            _, state = model_of(best_ckpt, best_path)
            best_step = best_ckpt["global_step"]
        written = ["loss.png"]
        if state is not None:
            save_slm_pt(run_dir / "slm.pt", module.config, state, best_step, module.tokenizer)
            written.insert(0, "slm.pt")
        else:
            log.warning("no slm.pt: the sharded run failed on one rank before its first checkpoint")
        plot_losses(history, run_dir / "loss.png")
    else:
        written = []
    vals = [v for _, v in history.val]
    seconds = history.wall_seconds
    # After an interruption the last validation can be older than the weights: say which.
    metrics = {
        "status": status,
        **({"error": reason} if reason else {}),
        "best_val_loss": min(vals) if vals else None,
        "final_val_loss": vals[-1] if vals else None,
        "final_val_step": history.val[-1][0] if vals else None,
        "steps": steps,
        "tokens_seen": history.tokens,
        "wall_seconds": round(seconds, 3),
        "tokens_per_second": round(history.tokens / seconds, 1) if seconds else None,
        **({"parameters": parameters} if parameters else {}),
    }
    files.write_json(run_dir / "metrics.json", metrics)
    written = ",".join([*written, "metrics.json"])
    log.info("wrote %s/%s: %s", run_dir, f"{{{written}}}" if "," in written else written, metrics)


@contextlib.contextmanager
def deferred_signals():
    """Hold SIGINT and SIGTERM until the block is done, then act on them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = {s: signal.signal(s, lambda n, f: received.append(n)) for s in STOP_SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if received:
            raise KeyboardInterrupt


def plot_losses(history: RunHistory, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    if history.train:
        steps, losses = zip(*history.train)
        ax.plot(steps, losses, lw=0.8, alpha=0.8, label="train")
    if history.val:
        steps, losses = zip(*history.val)
        ax.plot(steps, losses, "o-", lw=1.5, ms=3, label="val")
    ax.set(xlabel="optimizer step", ylabel="cross-entropy loss (nats/token)", title="slm")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def story_suite(
    cfg: DictConfig, run_dir: Path, val_bin: Path, trainer: L.Trainer, tok: Tokenizer
) -> None:
    """The story suite (``slm.stories``) on ``slm.pt`` (the best weights, trained with the
    data's tokenizer ``tok``), with ``stories`` openings of the held-out split: its numbers go
    into ``metrics.json`` (``"stories"``) and every tracker (``stories/*``), the completions
    into ``slm.stories.jsonl``. A judge that fails is recorded there
    (``stories.judge.error``); the run stays completed."""
    ckpt = run_dir / "slm.pt"
    if not ckpt.exists():
        return
    device = trainer.strategy.root_device
    log.info("story suite: %d openings of %s, completed by %s", cfg.stories, val_bin, ckpt)
    try:
        summary = stories.run(
            load_model(ckpt, device), tok, stories.TokenStories(val_bin, tok), cfg.stories,
            cfg.suite, stories.completions_path(ckpt), cfg.judge, device=device, strict=False,
        )  # fmt: skip
    except SlmError as e:  # e.g. no stories to take openings from: the training stands
        log.error("story suite: error: %s", one_line(e))
        summary = {"error": one_line(e)}
    except KeyboardInterrupt:
        log.warning("story suite interrupted: the run's outputs are complete, without it")
        raise
    path = run_dir / "metrics.json"
    files.write_json(path, {**json.loads(path.read_text()), "stories": summary})
    scalars = {f"stories/{k}": v for k, v in stories.flat(summary).items()}
    for logger in trainer.loggers:  # after fit's finalize; slm.trackers.finish writes them out
        logger.log_metrics(scalars, step=trainer.global_step)
    log.info("story suite: %s", json.dumps(stories.flat(summary)))
