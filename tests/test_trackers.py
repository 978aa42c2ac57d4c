"""The trackers (``logger=``): the real TensorBoard, W&B (offline), MLflow (a sqlite store under
tmp_path) and CSV loggers of a tiny run, read back from what each one wrote."""

import csv
import glob
import json
import logging
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY_ARGS, assert_one_line, make_stories, tiny_cfg, write_txt

from slm import trackers
from slm.config import compose
from slm.errors import ConfigError
from slm.module import GPTModule
from slm.train import train

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Once upon a time"


# -- reading back what the trackers wrote ------------------------------------------------------


def wandb_records(run_dir: Path) -> list:
    """The records of the one W&B offline run under ``run_dir``, read from its transaction log
    (``run-ID.wandb``: W&B's protobuf records in LevelDB's log format: blocks of 32 KiB, each
    record a chunk or several behind a 7-byte header, after the file's own 7-byte header)."""
    from wandb.proto import wandb_internal_pb2 as pb

    [path] = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    data, block, pos, chunk, out = Path(path).read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or a record's last chunk
            record = pb.Record()
            record.ParseFromString(chunk)
            out.append(record)
            chunk = b""
    return out


def wandb_run(run_dir: Path) -> dict:
    """The W&B run under ``run_dir``: its run record, config, history rows (each a dict) and
    exit code (None: never finished). Read once W&B's service has stopped: it writes a
    finished run's last records after ``finish()`` returns."""
    import wandb

    wandb.teardown()  # a run of this process; the next one starts the service again
    run, config, history, exit_code = None, {}, [], None
    for r in wandb_records(run_dir):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run = r.run
        elif kind == "config":
            config.update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            history.append(
                {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            )
        elif kind == "exit":
            exit_code = r.exit.exit_code
    return {"run": run, "config": config, "history": history, "exit_code": exit_code}


def wandb_series(history: list[dict], key: str) -> list[tuple[int, float]]:
    return [(row["trainer/global_step"], row[key]) for row in history if key in row]


def wandb_texts(run_dir: Path, history: list[dict], key: str) -> list[list]:
    """The rows of the text tables logged under ``key``, in the order they were logged."""
    [run] = glob.glob(str(run_dir / "wandb" / "offline-run-*"))
    paths = [row[f"{key}/path"] for row in history if f"{key}/path" in row]
    return [row for p in paths for row in json.loads((Path(run) / "files" / p).read_text())["data"]]


def mlflow_runs(uri: str, experiment: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment} in {uri}"
    return client, client.search_runs([found.experiment_id], order_by=["attributes.start_time"])


def mlflow_series(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def csv_series(rows: list[dict], key: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[key])) for r in rows if r.get(key)]


def tb_series(acc, key: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in acc.Scalars(key)]


@pytest.fixture(scope="module")
def stories_txt(tmp_path_factory) -> Path:
    return write_txt(tmp_path_factory.mktemp("src") / "stories.txt", make_stories(300))


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> str:
    """One MLflow store for the file's runs (making its tables takes seconds), each test's in
    an experiment of its own."""
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


# -- the config group and its checks ------------------------------------------------------------


def test_the_logger_group_picks_one_tracker_or_several():
    assert trackers.chosen(compose("train")) == {"tensorboard": {}}  # the default, as before
    both = trackers.chosen(compose("train", ["logger=[tensorboard,wandb]"]))
    assert list(both) == ["tensorboard", "wandb"] and both["wandb"]["project"] == "slm"
    assert trackers.chosen(compose("train", ["logger=[]"])) == {}
    with pytest.raises(ConfigError, match="Could not find 'logger/tensorbord'; choose one of csv"):
        compose("train", ["logger=tensorbord"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["logger=wandb", "logger.wandb.mode=maybe"],
         "logger.wandb.mode=maybe is not one of auto, online, offline, disabled"),
        (["logger=wandb", "logger.wandb.tags=baseline"],
         "logger.wandb.tags=baseline must be a list of texts of 1 to 64 characters"),
        (["logger=wandb", "logger.wandb.project=me/slm"],
         "logger.wandb.project=me/slm: a W&B project name cannot hold"),
        (["logger=wandb", "logger.wandb.project=''"],
         "logger.wandb.project= must be a non-empty text$"),
        (["logger=wandb", f"logger.wandb.group={'g' * 129}"],
         "logger.wandb.group is 129 characters long; at most 128"),
        (["logger=wandb", "logger.wandb.log_model=sometimes"],
         r"logger.wandb.log_model=sometimes must be false, true \(the checkpoints"),
        (["logger=mlflow", "+logger.mlflow.tags.team=[a,b]"],
         r"logger.mlflow.tags={'team': \['a', 'b'\]} must map names to values"),
        (["logger=mlflow", "logger.mlflow.experiment=1"],
         "logger.mlflow.experiment=1 must be a non-empty text or null"),
        (["logger=csv", "+logger.csv.dir=x"], r"logger.csv takes no settings \(got dir\)"),
        (["logger=wandb", "+logger.wandb.projekt=x"],
         r"logger.wandb.projekt is not a setting of logger=wandb; its settings: project, entity,"),
        (["logger=[tensorboard,mlflow]", "+logger.mlflow.experimnt=x"],
         r"logger.mlflow.experimnt is not a setting of logger=mlflow; its settings: tracking_uri,"),
        (["+logger.neptune={}"], "logger.neptune is not a tracker; choose from tensorboard, wandb"),
        (["+trainer.logger=false"], "trainer.logger is set by slm's train.. from the logger group"),
    ],
)  # fmt: skip
def test_bad_tracker_settings_stop_the_run_at_start(overrides, message, tmp_path):
    cfg = tiny_cfg(tmp_path / "data", tmp_path / "run", *overrides)
    with pytest.raises(ConfigError, match=message) as e:
        train(cfg)
    assert_one_line(e)
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


@pytest.mark.parametrize(
    "logger, missing, message",
    [
        ("wandb", "wandb", r'needs the wandb package: pip install -e "\.\[wandb\]"'),
        ("mlflow", "mlflow", r'needs the mlflow package: pip install -e "\.\[mlflow\]"'),
        ("mlflow", "alembic", r"'s store sqlite:///.*/mlflow.db needs alembic \(mlflow-"),
    ],
)  # fmt: skip
def test_a_tracker_without_its_package_is_refused_at_start(
    logger, missing, message, tmp_path, monkeypatch
):
    import importlib.util

    if missing == "alembic":  # the store's packages are looked for once mlflow is there
        pytest.importorskip("mlflow")
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a)
    )
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = tiny_cfg(tmp_path / "data", tmp_path / "run", f"logger=[tensorboard,{logger}]")
    with pytest.raises(ConfigError, match=message) as e:
        train(cfg)
    assert_one_line(e)
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()


@pytest.fixture
def no_wandb_env(monkeypatch, tmp_path):
    """No W&B mode, key or netrc entry of the user's: each test sets its own."""
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))  # absent: no entry


def no_network(*args, **kwargs):
    raise AssertionError(f"a connection was tried: {args}")


def test_wandb_goes_offline_without_a_key_and_asks_nobody(no_wandb_env, monkeypatch):
    monkeypatch.setattr(trackers.socket, "create_connection", no_network)
    assert trackers.wandb_mode("auto") == (
        "offline", "no W&B API key: WANDB_API_KEY, or wandb login"
    )  # fmt: skip
    assert trackers.wandb_mode("online")[0] == "online"  # as asked, without a look
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert trackers.wandb_mode("auto") == ("disabled", "WANDB_MODE=disabled")


def test_wandb_with_a_key_goes_online_where_its_host_answers(no_wandb_env, monkeypatch, tmp_path):
    asked = []

    class Answer:
        def close(self):
            pass

    def host_answers(address, timeout):
        asked.append(address)
        return Answer()

    def host_is_away(address, timeout):
        raise OSError("network is unreachable")

    # wandb login's entry in ~/.netrc counts as a key, for the host of WANDB_BASE_URL.
    (tmp_path / "netrc").write_text("machine wandb.example.org\n  login user\n  password k3y\n")
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.org")
    monkeypatch.setattr(trackers.socket, "create_connection", host_answers)
    assert trackers.wandb_mode("auto")[0] == "online" and asked == [("wandb.example.org", 443)]
    monkeypatch.setattr(trackers.socket, "create_connection", host_is_away)
    assert trackers.wandb_mode("auto") == ("offline", "wandb.example.org does not answer")
    monkeypatch.delenv("WANDB_BASE_URL")  # api.wandb.ai: no netrc entry for it, but the env key
    monkeypatch.setenv("WANDB_API_KEY", "k3y")
    monkeypatch.setattr(trackers.socket, "create_connection", host_answers)
    assert trackers.wandb_mode("auto")[0] == "online" and asked[-1] == ("api.wandb.ai", 443)


def test_mlflow_default_store_is_one_sqlite_file_where_train_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    assert trackers.tracking_uri({"tracking_uri": None}) == f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example.org:5000")
    assert trackers.tracking_uri({"tracking_uri": None}) == "http://mlflow.example.org:5000"
    assert trackers.tracking_uri({"tracking_uri": "sqlite:///x.db"}) == "sqlite:///x.db"
    # A sqlite store's artifacts: beside its file, wherever train.py runs from.
    assert trackers.artifacts_of("sqlite:////data/ml/mlflow.db") == "/data/ml/mlruns"
    assert trackers.artifacts_of("sqlite:///x.db") == f"{tmp_path}/mlruns"
    assert trackers.artifacts_of("http://mlflow.example.org:5000") is None
    assert trackers.shown(tmp_path / "outputs" / "a") == "outputs/a"  # run names: relative
    assert trackers.shown(Path("/elsewhere/run")) == "/elsewhere/run"
    assert trackers.sweep_name() is None  # not a sweep's job


# -- a run read back from every tracker ---------------------------------------------------------


@pytest.mark.slow
def test_every_tracker_gets_the_curves_the_samples_and_the_story_suite(
    stories_txt, mlflow_uri, tmp_path, monkeypatch, caplog
):
    """One tiny run logging to all four trackers at once. Each holds the same train/loss and
    val/loss points, the learning rate, the throughput, a sample story per validation (the
    ones that take text) and the story suite's numbers, as metrics.json has them."""
    pytest.importorskip("wandb")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    caplog.set_level(logging.INFO, logger="slm")
    monkeypatch.chdir(tmp_path)  # the run's name: its dir relative to here
    uri = mlflow_uri
    run = tmp_path / "runs" / "r1"
    train(tiny_cfg(tmp_path / "data", run, f"data.source={stories_txt}", "data.val_fraction=0.1",
                   "logger=[tensorboard,wandb,mlflow,csv]", f"logger.mlflow.tracking_uri={uri}",
                   "logger.wandb.tags=[tiny,test]", "stories=2", "suite.max_new_tokens=6",
                   "trainer.max_steps=8", "val_every_n_steps=4", "optim.warmup_steps=1",
                   "trainer.log_every_n_steps=2"))  # fmt: skip
    metrics = json.loads((run / "metrics.json").read_text())
    suite = metrics["stories"]
    assert metrics["status"] == "completed" and suite["openings"] == 2

    # TensorBoard: as it was, tb/ in the run dir, the reference for the others.
    acc = EventAccumulator(str(run / "tb"), size_guidance={"tensors": 0})
    acc.Reload()
    train_loss, val_loss = tb_series(acc, "train/loss"), tb_series(acc, "val/loss")
    assert [s for s, _ in train_loss] == [1, 3, 5, 7] and [s for s, _ in val_loss] == [0, 4, 8]
    lr = next(t for t in acc.Tags()["scalars"] if t.startswith("lr-"))
    samples = acc.Tensors("samples/text_summary")
    assert [e.step for e in samples] == [4, 8]
    stories = [e.tensor_proto.string_val[0].decode().replace("  \n", "\n") for e in samples]
    assert all(s.startswith(PROMPT) and len(s) > len(PROMPT) for s in stories)

    def close(series, reference):
        return [s for s, _ in series] == [s for s, _ in reference] and all(
            v == pytest.approx(r, rel=1e-6) for (_, v), (_, r) in zip(series, reference)
        )

    # W&B: an offline run in the run dir, named after it.
    wb = wandb_run(run)
    assert (wb["run"].project, wb["run"].display_name) == ("slm", "runs/r1")
    assert list(wb["run"].tags) == ["tiny", "test"] and wb["run"].run_group == ""  # no sweep
    assert wb["config"]["optim"]["lr"] == 3e-3 and wb["config"]["data"]["batch_size"] == 8
    h = wb["history"]
    assert close(wandb_series(h, "train/loss"), train_loss)
    assert close(wandb_series(h, "val/loss"), val_loss)
    assert close(wandb_series(h, lr), tb_series(acc, lr))
    assert [s for s, _ in wandb_series(h, "train/device/items_per_sec")] == [
        s for s, _ in tb_series(acc, "train/device/items_per_sec")
    ]  # fmt: skip
    assert wandb_series(h, "stories/greedy_distinct_2") == [(8, suite["greedy"]["distinct_2"])]
    assert wandb_series(h, "stories/continuation_loss") == [(8, suite["continuation_loss"])]
    assert wandb_texts(run, h, "samples") == [[4, stories[0]], [8, stories[1]]]
    assert wb["exit_code"] == 0  # finished: the next run in this process gets its own
    [offline] = (run / "wandb").glob("offline-run-*")
    assert f"logger=wandb: upload this run later with: wandb sync {offline}" in caplog.text

    # MLflow: experiment slm in the sqlite store, a finished run named after the run dir.
    client, [ml] = mlflow_runs(uri, "slm")
    assert ml.info.status == "FINISHED" and ml.info.run_name == "runs/r1"
    assert ml.data.params["optim/lr"] == "0.003" and ml.data.params["data/batch_size"] == "8"
    rid = ml.info.run_id
    assert close(mlflow_series(client, rid, "train/loss"), train_loss)
    assert close(mlflow_series(client, rid, "val/loss"), val_loss)
    assert close(mlflow_series(client, rid, lr), tb_series(acc, lr))
    assert mlflow_series(client, rid, "train/device/items_per_sec")
    assert ml.data.metrics["stories/greedy_distinct_2"] == pytest.approx(
        suite["greedy"]["distinct_2"]
    )  # fmt: skip
    assert ml.data.metrics["stories/sampled_repeat_4gram"] == pytest.approx(
        suite["sampled"]["repeat_4gram"]
    )  # fmt: skip
    names = [a.path for a in client.list_artifacts(rid, "samples")]
    assert names == ["samples/step-000004.txt", "samples/step-000008.txt"]
    texts = [Path(client.download_artifacts(rid, n, str(tmp_path))).read_text() for n in names]
    assert texts == stories

    # CSV: csv/version_0/metrics.csv, and the run's config in hparams.yaml.
    rows = list(csv.DictReader((run / "csv" / "version_0" / "metrics.csv").open()))
    assert close(csv_series(rows, "train/loss"), train_loss)
    assert close(csv_series(rows, "val/loss"), val_loss)
    assert close(csv_series(rows, lr), tb_series(acc, lr))
    assert csv_series(rows, "stories/greedy_distinct_2") == [(8, suite["greedy"]["distinct_2"])]
    hparams = yaml.safe_load((run / "csv" / "version_0" / "hparams.yaml").read_text())
    assert hparams["optim"]["lr"] == 3e-3 and hparams["n_layer"] == 2  # the run's, the model's


@pytest.mark.slow
def test_a_tracker_that_cannot_start_stops_the_run_before_training(stories_txt, tmp_path):
    """MLflow refuses its store: one line at start, no training, and the W&B run opened before
    it is closed as failed."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    run = tmp_path / "run"
    cfg = tiny_cfg(tmp_path / "data", run, f"data.source={stories_txt}", "logger=[wandb,mlflow]",
                   "logger.mlflow.tracking_uri=nosuch://store")  # fmt: skip
    with pytest.raises(ConfigError, match="^logger=mlflow could not start its run: .*nosuch") as e:
        train(cfg)
    assert_one_line(e)
    assert not (run / "metrics.json").exists() and not (run / "checkpoints").exists()
    assert wandb_run(run)["exit_code"] == 1


@pytest.mark.slow
def test_without_a_tracker_the_run_leaves_its_files_only(stories_txt, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg(tmp_path / "data", run, f"data.source={stories_txt}", "data.val_fraction=0.1",
                   "logger=[]", "trainer.max_steps=4", "val_every_n_steps=2",
                   "optim.warmup_steps=1"))  # fmt: skip
    assert json.loads((run / "metrics.json").read_text())["status"] == "completed"
    assert {p.name for p in run.iterdir()} == {
        ".train.lock", "checkpoints", "slm.pt", "loss.png", "metrics.json",
    }  # fmt: skip
    GPTModule.load_from_checkpoint(run / "checkpoints" / "last.ckpt")


@pytest.mark.slow
def test_a_sweep_is_one_wandb_group_and_one_mlflow_experiment(stories_txt, mlflow_uri, tmp_path):
    """A real multirun of three jobs (an invalid lr, a good one, a diverging one) in one
    process: each job that trains gets a W&B run and an MLflow run of its own, grouped by the
    sweep, and closed with its status; the invalid job, stopped at start, gets none."""
    pytest.importorskip("wandb")
    sweep, uri = tmp_path / "sweep", mlflow_uri
    args = [*TINY_ARGS, f"data.source={stories_txt}", f"data.dir={tmp_path / 'data'}",
            "data.val_fraction=0.1", "trainer.max_steps=4", "val_every_n_steps=2",
            "optim.warmup_steps=1", "trainer.log_every_n_steps=1", "optim.lr=-1,1e-3,1e9",
            f"hydra.sweep.dir={sweep}", "logger=[wandb,mlflow]",
            f"logger.mlflow.tracking_uri={uri}"]  # fmt: skip
    out = subprocess.run(
        [sys.executable, "train.py", "-m", *args], cwd=REPO, capture_output=True, text=True
    )
    assert "Traceback" not in out.stdout + out.stderr, out.stderr[-3000:]
    assert "2 job(s) failed ([0, 2])" in out.stdout + out.stderr
    group = str(sweep)  # outside the working directory: absolute

    assert not (sweep / "0" / "wandb").exists()
    runs = [wandb_run(sweep / job) for job in ("1", "2")]
    assert [r["run"].run_group for r in runs] == [group, group]
    assert [r["run"].display_name for r in runs] == [str(sweep / "1"), str(sweep / "2")]
    assert len({r["run"].run_id for r in runs}) == 2  # one run each, not the first one reused
    assert [r["config"]["optim"]["lr"] for r in runs] == [1e-3, 1e9]
    assert [r["exit_code"] for r in runs] == [0, 1]  # completed, diverged
    assert [s for s, _ in wandb_series(runs[0]["history"], "val/loss")] == [0, 2, 4]

    client, ml = mlflow_runs(uri, group)
    assert [(r.info.run_name, r.info.status) for r in ml] == [
        (str(sweep / "1"), "FINISHED"), (str(sweep / "2"), "FAILED"),
    ]  # fmt: skip
    assert [r.data.params["optim/lr"] for r in ml] == ["0.001", "1000000000.0"]
    # The samples beside the store, not in mlruns/ of the directory the sweep ran from.
    store = Path(uri.removeprefix("sqlite:///")).parent / "mlruns"
    assert all(r.info.artifact_uri.startswith(f"{store}/") for r in ml)
    assert client.list_artifacts(ml[0].info.run_id, "samples")
    assert not (REPO / "mlruns").exists()
    assert [s for s, _ in mlflow_series(client, ml[0].info.run_id, "val/loss")] == [0, 2, 4]
