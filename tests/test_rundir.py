"""slm.rundir: a run dir belongs to one run; one that a run made and left unused is removed."""

from slm.rundir import remove_unused, run_dir_lock


def start(run) -> None:
    """What Hydra writes into a run dir before the run: its config copy and the log."""
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text("seed: 1337\n")
    (run / "train.log").write_text("error: data.source ...\n")


def test_a_run_that_stops_at_its_start_leaves_no_run_dir(tmp_path):
    """It left outputs/DATE/TIME with Hydra's files, the log and the lock, and nothing else."""
    run = tmp_path / "outputs" / "2026-01-01" / "10-00-00"
    with run_dir_lock(run):
        start(run)
        remove_unused()
    assert list(tmp_path.iterdir()) == []


def test_what_was_there_or_holds_a_run_stays(tmp_path):
    there = tmp_path / "there"  # hydra.run.dir of an earlier run, resumed with ckpt_path=last
    there.mkdir()
    with run_dir_lock(there):
        start(there)
        remove_unused()
    assert (there / "train.log").is_file()

    ran = tmp_path / "outputs" / "day" / "ran"  # a run that wrote something of its own
    with run_dir_lock(ran):
        start(ran)
        (ran / "tb").mkdir()
        remove_unused()
    assert (ran / "tb").is_dir()

    other = tmp_path / "outputs" / "day" / "other"  # its parents hold another run: they stay
    with run_dir_lock(other):
        start(other)
        remove_unused()
    assert not other.exists() and ran.is_dir()

    with run_dir_lock(tmp_path / "later"):
        pass
    remove_unused()  # after its run: nothing of it is removed any more
    assert (tmp_path / "later").is_dir()
