"""mltk run, adversarially (issue 17): a run directory belongs to one run and one process, a resumed run does
what it records, and a full disk, a lack of memory or a bad --out is one line. docs/reliability.md lists the cases."""

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
import torch
import yaml

from conftest import TINY, make_image_folder, one_line_error, run_mltk, snapshot
from mltk.config import make_config
from mltk.errors import MltkError, UsageError
from mltk.model import load_checkpoint
from mltk.train import RunDirectory, train

RUN_ARGS = ["--backbone", "test_resnet", "--image-size", "32", "--dim", "16", "--batch-size", "8", "--m-per-class", "2", "--workers", "0", "--seed", "0"]
HOLDS_A_RUN = "already holds a run"
IN_USE = "is in use by another mltk run"
RUN_FILES = ("config.yaml", "metrics.jsonl", "last.pt", "best.pt", "skipped_images.txt")  # all that mltk run writes


def run_config(data, **overrides):
    return make_config({**TINY, "data": str(data), **overrides})


def run_copy(trained_run, tmp_path: Path) -> Path:
    """A run directory of one's own (the module's trained run, copied): for cases that change it."""
    return Path(shutil.copytree(trained_run[0], tmp_path / "run"))


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


def run_finished_pid() -> int:
    """The id of a process that has ended (and been reaped): what a kill -9 leaves in a temporary's name."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- 1. A run directory that holds a run is refused without --resume or --overwrite ---------------------------------


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
    monkeypatch.setattr("mltk.train.build_losses", run_cpu_allocator_fails)  # fails after the data is read
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


# --- 2. One process at a time holds a run directory -------------------------------------------------------------------


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
    first = run_start_process(folder, run, 1000, "--workers", "2", log=log)
    try:
        children = Path(f"/proc/{first.pid}/task/{first.pid}/children")
        run_wait_for(first, lambda: (run / "last.pt").is_file() and children.read_text().split(), log)  # workers loading
        os.kill(first.pid, signal.SIGKILL)  # the main process only: its forked workers live on a few seconds
        first.wait(timeout=60)
        with pytest.raises(MltkError, match=HOLDS_A_RUN), RunDirectory(run):  # not "in use": the orphans hold nothing
            pass
    finally:
        run_stop(first)


# --- 3. An --out that cannot be a folder is one line before the data is read ------------------------------------------


@pytest.mark.parametrize("where", ["a file", "under a file"])
def test_out_that_is_or_lies_under_a_file_is_one_line_before_the_data(where, mltk_main, tmp_path):
    (tmp_path / "taken").write_text("a file")
    out = tmp_path / "taken" if where == "a file" else tmp_path / "taken" / "run"
    before = snapshot(tmp_path)
    line = one_line_error(mltk_main("run", *RUN_ARGS, "--data", tmp_path / "nowhere", "--out", out), code=1)
    assert str(tmp_path / "taken") in line and "is a file, not a folder" in line
    assert snapshot(tmp_path) == before


# --- 4. Building the model, losses and optimiser is inside the out-of-memory handling ---------------------------------


def run_cpu_allocator_fails(*args, **kwargs):
    return torch.empty(2**62, dtype=torch.uint8)  # the CPU allocator's real failure


def run_cuda_allocator_fails(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3725.29 GiB. GPU 0 has a total capacity of 139.8 GiB")


@pytest.mark.parametrize("part", ["build_embedder", "build_losses"])
@pytest.mark.parametrize("fails", [run_cpu_allocator_fails, run_cuda_allocator_fails], ids=["cpu", "cuda"])
def test_no_memory_for_the_model_or_losses_is_one_line_naming_what_to_lower(part, fails, image_folder, mltk_main, tmp_path, monkeypatch):
    monkeypatch.setattr(f"mltk.train.{part}", fails)
    line = one_line_error(mltk_main("run", *RUN_ARGS, "--epochs", "1", "--data", image_folder, "--out", tmp_path / "run"), code=1)
    assert line.startswith("error: out of memory (")
    assert line.endswith("): lower --dim (now 16) or take a smaller --backbone (now 'test_resnet'); nothing was written")
    assert not (tmp_path / "run").exists()


# --- 5. A resumed run keeps its settings; what may change is applied --------------------------------------------------


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
        f"error: cannot resume {str(run)!r} with {shown}: a resumed run keeps its settings, only epochs, workers and device "
        f"may change; leave the others out, or start a new run in another --out"
    )
    assert snapshot(run) == before


def test_resume_cannot_shorten_a_run(trained_run, mltk_main):
    run, _ = trained_run
    before = snapshot(run)
    line = one_line_error(mltk_main("run", "--out", run, "--resume", "--epochs", "0"), code=2)
    assert line == f"error: --epochs 0 is fewer than the epochs {str(run / 'last.pt')!r} holds (1); a resumed run goes on: give --epochs 1 or more"
    assert snapshot(run) == before


def test_resume_with_more_epochs_follows_the_longer_schedule_from_its_first_step(image_folder, tmp_path, monkeypatch):
    rates, step = [], torch.optim.AdamW.step

    def recording_step(self, *args, **kwargs):
        rates.append([group["lr"] for group in self.param_groups])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)
    cfg = run_config(image_folder, epochs=3, warmup_epochs=0.0, loss="0.1*center+arcface")
    train(cfg, tmp_path / "straight")
    straight, rates[:] = list(rates), []
    train(replace(cfg, epochs=1), tmp_path / "run")  # a 1-epoch run: its learning rate decays to the floor ...
    first = len(rates)
    train(replace(cfg, workers=1), tmp_path / "run", resume=True)  # ... extended to 3 epochs (and another --workers)
    assert rates[first:] == straight[first:]  # every step of epochs 2 and 3 at the 3-epoch schedule's rate
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["epochs"] == 3 and saved["workers"] == 1 and load_checkpoint(tmp_path / "run" / "last.pt")["config"]["epochs"] == 3


# --- 6. A full disk while writing the run directory is one line; last.pt stays whole ----------------------------------


def test_disk_full_while_saving_a_checkpoint_is_one_line_and_last_pt_keeps_its_epoch(image_folder, tmp_path, monkeypatch):
    real_save = torch.save

    def full_at_epoch_2(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("epoch") == 2:
            f.write(b"part of a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_at_epoch_2)
    run = tmp_path / "run"
    with pytest.raises(MltkError, match=r"^no space left on device writing (best|last)\.pt; last\.pt keeps epoch 1$"):
        train(run_config(image_folder, epochs=3), run)
    assert load_checkpoint(run / "last.pt")["epoch"] == 1 and not list(run.glob(".*"))
    monkeypatch.setattr(torch, "save", real_save)  # space again: the run goes on from epoch 1
    train(run_config(image_folder, epochs=3), run, resume=True)
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


@pytest.mark.parametrize("resume", [False, True], ids=["new run", "resume"])
def test_disk_full_while_writing_config_yaml_is_one_line(resume, trained_run, mltk_main, tmp_path, monkeypatch):
    def full(cfg, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("mltk.train.save_yaml", full)
    run = run_copy(trained_run, tmp_path) if resume else tmp_path / "run"
    args = ["--out", run, "--resume"] if resume else [*RUN_ARGS, "--epochs", "1", "--data", trained_run[1], "--out", run]
    line = one_line_error(mltk_main("run", *args), code=1)
    kept = "last.pt keeps epoch 1" if resume else "the run has no checkpoint yet: start it again with --overwrite"
    assert line == f"error: no space left on device writing config.yaml; {kept}"
    assert not list(run.glob(".*"))
    if resume:
        assert load_checkpoint(run / "last.pt")["epoch"] == 1


# --- 7. What a kill -9 left is removed at the start of the next run; a live process's temporaries are not -----------


@pytest.mark.parametrize("resume", [False, True], ids=["new run", "resume"])
def test_stale_temporaries_are_removed_and_live_ones_kept(resume, trained_run, image_folder, tmp_path):
    run = run_copy(trained_run, tmp_path) if resume else tmp_path / "run"
    run.mkdir(exist_ok=True)
    dead, live = run_finished_pid(), subprocess.Popen(["sleep", "300"])
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


def test_run_help_explains_out_resume_and_overwrite(mltk_main):
    code, out, _ = mltk_main("run", "--help")
    text = " ".join(out.replace("│", " ").split())
    assert code == 0
    assert "one that already holds a run needs --resume or --overwrite" in text
    assert "deletes its config.yaml, metrics.jsonl, last.pt, best.pt and skipped_images.txt, nothing else" in text
