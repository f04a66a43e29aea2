"""The run directory (mltk.run_dir): it belongs to one run and one process, a resume keeps the run's settings, and a
full disk, a stale temporary or a bad --out is one line that leaves the folder as it was. docs/reliability.md lists
the cases."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import yaml

import mltk
from conftest import RUN_ARGS, cpu_allocator_fails, dead_pid, make_image_folder, one_line_error, run_config, run_mltk, snapshot, tiny_config
from mltk.checkpoint import load_checkpoint, save_checkpoint
from mltk.errors import MltkError, UsageError
from mltk.run_dir import RunDirectory
from mltk.train import train


# --- a run directory that holds a run is refused without --resume or --overwrite


HOLDS_A_RUN = "already holds a run"
IN_USE = "is in use by another mltk run"
RUN_FILES = ("config.yaml", "metrics.jsonl", "last.pt", "best.pt", "skipped_images.txt")  # all that mltk run writes


def run_copy(trained_run, tmp_path: Path) -> Path:
    """A run directory of one's own (the module's trained run, copied): for cases that change it."""
    return Path(shutil.copytree(trained_run[0], tmp_path / "run"))


@pytest.mark.parametrize("name", RUN_FILES)
def test_run_refuses_an_out_that_holds_any_file_of_a_run(name, mltk_main, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / name).write_text("from an earlier run")
    (run / "notes.txt").write_text("the user's")
    before = snapshot(tmp_path)
    # --data names nothing: the refusal comes before the data is read
    line = one_line_error(mltk_main("run", *RUN_ARGS, "--epochs", "0", "--data", tmp_path / "nowhere", "--out", run))
    assert line == f"error: --out {str(run)!r} already holds a run ({name}): add --resume to go on with it, --overwrite to start it over, or give another --out"
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("epochs", ["0", "1"])
def test_a_second_run_into_a_finished_run_changes_nothing(epochs, trained_run, mltk_main):
    run, folder = trained_run
    before = snapshot(run)
    line = one_line_error(mltk_main("run", *RUN_ARGS, "--epochs", epochs, "--data", folder, "--out", run), code=1)
    assert HOLDS_A_RUN in line and "--resume" in line and "--overwrite" in line
    assert snapshot(run) == before


def test_the_library_refuses_too_and_resume_with_overwrite_is_a_usage_error(trained_run):
    run, folder = trained_run
    before = snapshot(run)
    with pytest.raises(MltkError, match=HOLDS_A_RUN):
        train(run_config(folder), run)
    with pytest.raises(UsageError, match="give one of them"):
        train(run_config(folder), run, resume=True, overwrite=True)
    assert snapshot(run) == before


def test_overwrite_starts_the_run_over_and_keeps_the_users_files(trained_run, mltk_main, tmp_path):
    run, folder = run_copy(trained_run, tmp_path), trained_run[1]
    (run / "skipped_images.txt").write_text("old/a.png\tnot an image\n")
    (run / "notes.txt").write_text("the user's")
    (run / "plots").mkdir()
    (run / "plots" / "roc.png").write_bytes(b"png")
    (run / "eval").mkdir()
    (run / "eval" / "metrics.json").write_text("{}")  # mltk evaluate's, not mltk run's
    mine = {k: v for k, v in snapshot(run).items() if k.startswith(("notes", "plots", "eval"))}
    code, out, err = mltk_main("run", *RUN_ARGS, "--dim", "8", "--epochs", "1", "--data", folder, "--out", run, "--overwrite")
    assert code == 0, err
    after = snapshot(run)
    assert {k: v for k, v in after.items() if k in mine} == mine
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "config.yaml", "eval", "last.pt", "metrics.jsonl", "notes.txt", "plots"]
    assert yaml.safe_load((run / "config.yaml").read_text())["dim"] == 8
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1]
    assert load_checkpoint(run / "last.pt")["model"]["neck.0.weight"].shape[0] == 8


def test_overwrite_removes_nothing_until_the_run_is_ready(trained_run, mltk_main, tmp_path, monkeypatch):
    run, folder = trained_run
    before = snapshot(run)
    line = one_line_error(mltk_main("run", *RUN_ARGS, "--data", tmp_path / "nowhere", "--out", run, "--overwrite"))
    assert "does not exist" in line
    monkeypatch.setattr("mltk.train.build_losses", cpu_allocator_fails)  # fails after the data is read
    assert "out of memory" in one_line_error(mltk_main("run", *RUN_ARGS, "--data", folder, "--out", run, "--overwrite"))
    assert snapshot(run) == before


def test_default_out_of_two_runs_in_the_same_second_is_two_folders(image_folder, mltk_main, tmp_path, monkeypatch):
    real = time.strftime
    monkeypatch.setattr(time, "strftime", lambda fmt, *a: "20250101-120000" if fmt == "%Y%m%d-%H%M%S" else real(fmt, *a))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "20250101-120000").mkdir(parents=True)  # the name is taken (here by a run): never reused
    (tmp_path / "runs" / "20250101-120000" / "config.yaml").write_text("epochs: 3\n")
    for _ in range(2):
        code, out, err = mltk_main("run", *RUN_ARGS, "--epochs", "0", "--data", image_folder)
        assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["20250101-120000", "20250101-120000-2", "20250101-120000-3"]
    assert [p.name for p in (tmp_path / "runs" / "20250101-120000").iterdir()] == ["config.yaml"]
    for name in ("20250101-120000-2", "20250101-120000-3"):
        assert yaml.safe_load((tmp_path / "runs" / name / "config.yaml").read_text())["out"] == f"runs/{name}"
        assert load_checkpoint(tmp_path / "runs" / name / "best.pt")["epoch"] == 0


# --- one process at a time holds a run directory


def run_start_process(folder: Path, run: Path, epochs: int, *args: str, log: Path) -> subprocess.Popen:
    """``mltk run`` in its own process group (so that a teardown reaches its data-loading workers too)."""
    command = [sys.executable, "-m", "mltk", "run", *RUN_ARGS, "--data", str(folder), "--epochs", str(epochs), "--out", str(run), *args]
    with open(log, "w") as stderr:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)


def run_wait_for(proc: subprocess.Popen, ready, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"not ready within {timeout} s: {log.read_text()}"
        time.sleep(0.05)


def run_stop(proc: subprocess.Popen) -> None:
    """Kill the process group (a stopped process dies of SIGKILL too, orphaned workers with it) and reap the process."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def test_a_second_process_on_a_run_that_is_going_is_refused_and_touches_nothing(mltk_main, tmp_path):
    folder, run, log = make_image_folder(tmp_path / "images", per_class=8), tmp_path / "run", tmp_path / "first.log"
    first = run_start_process(folder, run, 1000, log=log)
    try:
        run_wait_for(first, lambda: (run / "last.pt").is_file(), log)
        os.kill(first.pid, signal.SIGSTOP)  # frozen while it holds the folder: its files stay as they are
        before = snapshot(run)
        line = one_line_error(run_mltk("run", "--out", str(run), "--resume", timeout=180), code=1)
        assert line == f"error: --out {str(run)!r} is in use by another mltk run (it holds the folder); wait for that run to end, or give another --out"
        for extra in ([], ["--overwrite"]):
            assert IN_USE in one_line_error(mltk_main("run", *RUN_ARGS, "--epochs", "1", "--data", folder, "--out", run, *extra))
        with pytest.raises(MltkError, match=IN_USE):
            train(run_config(folder), run, overwrite=True)
        assert snapshot(run) == before
    finally:
        run_stop(first)
    # The lock went with the process: the folder is free, and holds a run.
    assert HOLDS_A_RUN in one_line_error(mltk_main("run", *RUN_ARGS, "--epochs", "1", "--data", folder, "--out", run))


@pytest.mark.skipif(not Path(f"/proc/{os.getpid()}/task/{os.getpid()}/children").exists(), reason="needs /proc/PID/task/PID/children")
def test_data_loading_workers_do_not_keep_a_killed_run_s_folder(tmp_path):
    folder, run, log = make_image_folder(tmp_path / "images", per_class=8), tmp_path / "run", tmp_path / "first.log"
    first = run_start_process(folder, run, 1000, "--workers", "2", "--no-in-memory", log=log)
    try:
        children = Path(f"/proc/{first.pid}/task/{first.pid}/children")
        run_wait_for(first, lambda: (run / "last.pt").is_file() and children.read_text().split(), log)  # workers loading
        os.kill(first.pid, signal.SIGKILL)  # the main process only: its forked workers live on a few seconds
        first.wait(timeout=60)
        with pytest.raises(MltkError, match=HOLDS_A_RUN), RunDirectory(run):  # not "in use": the orphans hold nothing
            pass
    finally:
        run_stop(first)


# --- an --out that cannot be a folder is one line before the data is read


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_out_that_is_or_lies_under_a_file_is_one_line_before_the_data(where, mltk_main, tmp_path):
    (tmp_path / "taken").write_text("a file")
    out = tmp_path / "taken" if where == "a file" else tmp_path / "taken" / "run"
    before = snapshot(tmp_path)
    line = one_line_error(mltk_main("run", *RUN_ARGS, "--data", tmp_path / "nowhere", "--out", out), code=1)
    assert str(tmp_path / "taken") in line and "is a file, not a folder" in line
    assert snapshot(tmp_path) == before


# --- a resumed run keeps its settings


@pytest.mark.parametrize(
    "option, shown",
    [
        (["--lr", "0.5"], "lr 0.5 (the run has 0.001)"),
        (["--dim", "8"], "dim 8 (the run has 16)"),
        (["--backbone", "resnet18"], "backbone 'resnet18' (the run has 'test_resnet')"),
        (["--augment", "--seed", "4"], "augment True (the run has False), seed 4 (the run has 0)"),
    ],
)
def test_resume_with_another_setting_is_refused_and_changes_nothing(option, shown, trained_run, mltk_main):
    run, _ = trained_run
    before = snapshot(run)
    line = one_line_error(mltk_main("run", "--out", run, "--resume", *option), code=2)
    assert line == (
        f"error: cannot resume {str(run)!r} with {shown}: a resumed run keeps its settings, only epochs, workers, in_memory, device, "
        f"log and early_stop may change; leave the others out, or start a new run in another --out"
    )
    assert snapshot(run) == before


def test_resume_cannot_shorten_a_run(trained_run, mltk_main):
    run, _ = trained_run
    before = snapshot(run)
    line = one_line_error(mltk_main("run", "--out", run, "--resume", "--epochs", "0"), code=2)
    assert line == f"error: --epochs 0 is fewer than the epochs {str(run / 'last.pt')!r} holds (1); a resumed run goes on: give --epochs 1 or more"
    assert snapshot(run) == before


def test_resume_with_another_architecture_names_the_keys_and_changes_nothing(image_folder, tmp_path):
    cfg, run = tiny_config(image_folder, epochs=1), tmp_path / "run"
    train(cfg, run)
    before = {name: (run / name).read_bytes() for name in ("config.yaml", "metrics.jsonl", "last.pt")}
    with pytest.raises(MltkError, match=r"^cannot resume '.*run' with dim 8 \(the run has 16\): a resumed run keeps its settings, only epochs, workers, in_memory, device, log and early_stop may change; leave the others out, or start a new run in another --out$"):
        train(replace(cfg, dim=8, epochs=2), run, resume=True)
    assert before == {name: (run / name).read_bytes() for name in before}
    state = load_checkpoint(run / "last.pt")
    del state["model"]["neck.1.bias"]
    save_checkpoint(state, tmp_path / "cut.pt")
    with pytest.raises(MltkError, match=r"cut.pt' does not fit this model: missing neck.1.bias \(1\)$"):
        mltk.load(tmp_path / "cut.pt")


# --- a full disk while writing config.yaml; what a kill -9 left is removed at the start of the next run


@pytest.mark.parametrize("resume", [False, True], ids=["new run", "resume"])
def test_disk_full_while_writing_config_yaml_is_one_line(resume, trained_run, mltk_main, tmp_path, monkeypatch):
    def full(cfg, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("mltk.run_dir.save_yaml", full)
    run = run_copy(trained_run, tmp_path) if resume else tmp_path / "run"
    args = ["--out", run, "--resume"] if resume else [*RUN_ARGS, "--epochs", "1", "--data", trained_run[1], "--out", run]
    line = one_line_error(mltk_main("run", *args), code=1)
    kept = "last.pt keeps epoch 1" if resume else "the run has no checkpoint yet: start it again with --overwrite"
    assert line == f"error: no space left on device writing config.yaml; {kept}"
    assert not list(run.glob(".*"))
    if resume:
        assert load_checkpoint(run / "last.pt")["epoch"] == 1


@pytest.mark.parametrize("resume", [False, True], ids=["new run", "resume"])
def test_stale_temporaries_are_removed_and_live_ones_kept(resume, trained_run, image_folder, tmp_path):
    run = run_copy(trained_run, tmp_path) if resume else tmp_path / "run"
    run.mkdir(exist_ok=True)
    dead, live = dead_pid(), subprocess.Popen(["sleep", "300"])
    try:
        stale = [run / f".last.pt.tmp-{dead}", run / f".metrics.jsonl.tmp-{dead}", run / f".config.yaml.tmp-{dead}"]
        kept = [run / f".best.pt.tmp-{live.pid}", run / f".notes.txt.tmp-{dead}"]  # a live process's; not mltk run's
        for path in stale + kept:
            path.write_bytes(b"half a file")
        train(run_config(trained_run[1] if resume else image_folder, epochs=2, val_classes=0.3 if resume else 0.0), run, resume=resume)
        assert not any(path.exists() for path in stale)
        assert all(path.read_bytes() == b"half a file" for path in kept)
    finally:
        live.kill()
        live.wait()
