"""Adversarial input, one case per defect of issue 17 and more of the same kind: each asserts one clear line,
a non-zero exit and the files on disk as they were (or the right behaviour). docs/reliability.md lists the cases.

Sections: mltk run's run directory; the run config; index directories; evaluate and export (output
folders, checkpoints, pair lists, markup); plugins, data readers and the command line.
"""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml

import mltk
from conftest import REPO, TINY, make_image_folder, one_line_error, run_mltk, snapshot
from mltk import index as mindex
from mltk import registry
from mltk.config import RunConfig, load_yaml, make_config, validate
from mltk.errors import MltkError, UsageError
from mltk.model import load_checkpoint
from mltk.plugins import errors
from mltk.run_dir import RunDirectory
from mltk.train import train


# ====================================================================================================
# mltk run: a run directory belongs to one run and one process
# ====================================================================================================
# mltk run, adversarially (issue 17): a run directory belongs to one run and one process, a resumed run does
# what it records, and a full disk, a lack of memory or a bad --out is one line. docs/reliability.md lists the cases.


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

    monkeypatch.setattr("mltk.run_dir.save_yaml", full)
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
    assert "deletes its config.yaml, metrics.jsonl, last.pt, best.pt, skipped_images.txt and tensorboard/, nothing else" in text



# ====================================================================================================
# The run config: validated whole
# ====================================================================================================
# The run config is untrusted (``mltk run`` options, YAML files, the config inside a checkpoint): each bad
# value is one line naming the option and what it takes, exit 2, and nothing written (issue 17, config).


def config_refused(mltk_main, tmp_path, *args, text: str | None = None) -> str:
    """``mltk run`` with ``args`` (and a config file of ``text``): refused with one line, exit 2, the folder unchanged."""
    if text is not None:
        (tmp_path / "c.yaml").write_text(text)
        args = ("--config", tmp_path / "c.yaml", *args)
    before = snapshot(tmp_path)
    line = one_line_error(mltk_main("run", "--out", tmp_path / "run", *args), code=2)
    assert snapshot(tmp_path) == before
    return line


def config_error(values, source: str = "c.yaml") -> str:
    with pytest.raises(UsageError) as refused:
        make_config(values, source)
    return str(refused.value)


# --- 1. Numbers: each option in its range, checked before anything is written -----------------------------------------

NUMBERS = {
    "dim huge": (["--dim", "1000000000"], "--dim must be an integer in [0, 65536], got 1000000000"),
    "image size negative": (["--image-size", "-5"], "--image-size must be an integer in [8, 4096], got -5"),
    "image size zero": (["--image-size", "0"], "--image-size must be an integer in [8, 4096], got 0"),
    "image size huge": (["--image-size", "100000"], "--image-size must be an integer in [8, 4096], got 100000"),
    "workers negative": (["--workers", "-1"], "--workers must be an integer in [0, 256], got -1"),
    "workers absurd": (["--workers", "100000"], "--workers must be an integer in [0, 256], got 100000"),
    "lr negative": (["--lr", "-1"], "--lr must be a number in [0, 10], got -1.0"),
    "lr nan": (["--lr", "nan"], "--lr must be a number in [0, 10], got nan"),
    "lr inf": (["--lr", "inf"], "--lr must be a number in [0, 10], got inf"),
    "loss lr negative": (["--loss-lr", "-1"], "--loss-lr must be a number in [0, 10], got -1.0"),
    "loss lr nan": (["--loss-lr", "nan"], "--loss-lr must be a number in [0, 10], got nan"),
    "loss lr inf": (["--loss-lr", "inf"], "--loss-lr must be a number in [0, 10], got inf"),
    "m per class zero": (["--m-per-class", "0"], "--m-per-class must be an integer in [1, 8192], got 0"),
    "batch size zero": (["--batch-size", "0"], "--batch-size must be an integer in [2, 16384], got 0"),
    "batch size huge": (["--batch-size", "100000000"], "--batch-size must be an integer in [2, 16384], got 100000000"),
    "epochs huge": (["--epochs", "1000000000"], "--epochs must be an integer in [0, 10000], got 1000000000"),
    "seed negative": (["--seed", "-1"], "--seed must be an integer in [0, 4294967295], got -1"),
    "seed 2**32": (["--seed", "4294967296"], "--seed must be an integer in [0, 4294967295], got 4294967296"),
    "val classes nan": (["--val-classes", "nan"], "--val-classes must be a number in [0, 1), got nan"),
    "device unknown": (["--device", "gpu0"], "--device must be auto, cpu, mps, cuda or cuda:N, got 'gpu0'"),
}


@pytest.mark.parametrize("case", NUMBERS, ids=list(NUMBERS))
def test_config_out_of_range_options_are_one_line(case, mltk_main, tmp_path):
    args, message = NUMBERS[case]
    assert config_refused(mltk_main, tmp_path, *args) == f"error: {message}"


FILE_NUMBERS = {
    "grad_clip negative": ("grad_clip: -1\n", "grad_clip in {f} must be null or 0 (off), or a number in (0, 1000000], got -1"),
    "grad_clip nan": ("grad_clip: .nan\n", "grad_clip in {f} must be null or 0 (off), or a number in (0, 1000000], got nan"),
    "warmup negative": ("warmup_epochs: -5\n", "warmup_epochs in {f} must be a number in [0, 10000], got -5"),
    "weight decay negative": ("weight_decay: -0.1\n", "weight_decay in {f} must be a number in [0, 10], got -0.1"),
    "weight decay nan": ("weight_decay: .nan\n", "weight_decay in {f} must be a number in [0, 10], got nan"),
    "weight decay 'nan'": ("weight_decay: nan\n", "weight_decay in {f} must be a number in [0, 10], got 'nan'"),
    "val_classes nan": ("val_classes: .nan\n", "val_classes in {f} must be a number in [0, 1), got nan"),
    "lr inf": ("lr: .inf\n", "lr in {f} must be a number in [0, 10], got inf"),
    "dim a float": ("dim: 512.5\n", "dim in {f} must be int or null, got 512.5"),
}


@pytest.mark.parametrize("case", FILE_NUMBERS, ids=list(FILE_NUMBERS))
def test_config_file_numbers_out_of_range_are_one_line(case, mltk_main, tmp_path):
    text, message = FILE_NUMBERS[case]
    line = config_refused(mltk_main, tmp_path, text=text)
    assert line == "error: " + message.format(f=tmp_path / "c.yaml")


def test_config_grad_clip_null_or_zero_is_off_and_ranges_hold_at_their_ends():
    assert make_config({"grad_clip": None}).grad_clip is None and make_config({"grad_clip": 0}).grad_clip == 0
    cfg = make_config({"dim": 65536, "image_size": 8, "seed": 2**32 - 1, "workers": 0, "lr": 0, "epochs": 0, "val_classes": 0.99})
    assert (cfg.dim, cfg.image_size, cfg.seed) == (65536, 8, 2**32 - 1)


# --- 2. Values inside lists and mappings ----------------------------------------------------------------------------

INSIDE = {
    "data_classes of numbers": ({"data_classes": [1, 2]}, "data_classes[0] in c.yaml must be a class name pattern, got 1"),
    "loss_options of a list": ({"loss_options": {"arcface": [1, 2]}}, "loss_options['arcface'] in c.yaml must be a mapping of the loss's options, got [1, 2]"),
    "loss_options for a loss not in the spec": (
        {"loss": "0.1*center+ce", "loss_options": {"arcface": {"margin": 20}}},
        "loss_options in c.yaml sets options of 'arcface', which is not in the loss spec '0.1*center+ce'",
    ),
    "loss option of the wrong kind": ({"loss_options": {"arcface": {"margin": "wide"}}}, "loss_options['arcface']['margin'] in c.yaml must be a number, got 'wide'"),
    "loss option a config cannot give": ({"loss_options": {"arcface": {"distance": "cosine"}}}, "unknown key 'distance' in loss_options['arcface'] in c.yaml (loss 'arcface'); it takes "),
    "loss option unknown": ({"loss_options": {"arcface": {"margn": 20}}}, "unknown key 'margn' in loss_options['arcface'] in c.yaml (loss 'arcface'); did you mean 'margin'?"),
    "miner_options nested": ({"miner": "multisimilarity", "miner_options": {"epsilon": [1, {"a": 2}]}}, "miner_options['epsilon'] in c.yaml must be "),
    "miner option of the wrong kind": ({"miner": "multisimilarity", "miner_options": {"epsilon": "x"}}, "miner_options['epsilon'] in c.yaml must be a number, got 'x'"),
    "miner_options without a miner": ({"miner_options": {"epsilon": 0.1}}, "miner_options in c.yaml are given, but no miner; set miner or drop miner_options"),
    "augment option unknown": ({"augment_options": {"sharpen": 0.5}}, "unknown key 'sharpen' in augment_options in c.yaml; it takes affine, auto_augment, color_jitter"),
    "augment option a pair of one": ({"augment_options": {"scale": [0.5]}}, "augment_options['scale'] in c.yaml must be [min, max], each in [0, 1], got [0.5]"),
    "augment option of the wrong kind": ({"augment_options": {"hflip": "yes"}}, "augment_options['hflip'] in c.yaml must be a number in [0, 1], got 'yes'"),
    "augment option timm would misuse": ({"augment_options": {"use_prefetcher": True}}, "unknown key 'use_prefetcher' in augment_options in c.yaml"),
    "affine without degrees": ({"augment_options": {"affine": {"translate": [0.1, 0.1]}}}, "augment_options['affine'] in c.yaml needs 'degrees'"),
    "affine unknown": ({"augment_options": {"affine": {"degrees": 10, "interpolation": "x"}}}, "unknown key 'interpolation' in augment_options['affine'] in c.yaml"),
    "backbone_kwargs unknown": ({"backbone_kwargs": {"depht": 3}}, "unknown key 'depht' in backbone_kwargs in c.yaml (backbone 'resnet18'); did you mean 'depth'?"),
    "backbone_kwargs of the wrong kind": ({"backbone_kwargs": {"in_chans": "one"}}, "backbone_kwargs['in_chans'] in c.yaml must be an integer in [1, 64], got 'one'"),
    "backbone_kwargs set by mltk": ({"backbone_kwargs": {"img_size": 64}}, "backbone_kwargs['img_size'] in c.yaml: mltk sets 'img_size' itself; give the option 'image_size' instead"),
    "hybrid option of the wrong kind": ({"backbone": "hybrid", "backbone_kwargs": {"cnn": 18}}, "backbone_kwargs['cnn'] in c.yaml must be text, got 18"),
}


@pytest.mark.parametrize("case", INSIDE, ids=list(INSIDE))
def test_config_values_inside_lists_and_mappings_are_checked(case):
    values, message = INSIDE[case]
    assert config_error(values).startswith(message)


@pytest.mark.parametrize(
    "kwargs, backbone",
    [
        ({"checkpoint_path": "/etc/passwd"}, "resnet18"),
        ({"pretrained_cfg_overlay": {"file": "/etc/passwd"}}, "resnet18"),
        ({"pretrained_cfg": {"hf_hub_id": "evil/model"}}, "test_resnet"),
        ({"cache_dir": "/tmp"}, "swin"),
        ({"swin_kwargs": {"checkpoint_path": "/etc/passwd"}}, "hybrid"),
        ({"cnn_kwargs": {"pretrained_cfg_overlay": {"url": "http://x"}}}, "hybrid"),
    ],
)
def test_config_backbone_kwargs_never_let_timm_read_a_file_or_the_network(kwargs, backbone, mltk_main, tmp_path):
    """Each is refused before timm sees it: an option name timm would use to open a path or a URL."""
    key = next(iter(kwargs.values())) if backbone == "hybrid" else kwargs
    line = config_refused(mltk_main, tmp_path, text=yaml.safe_dump({"backbone": backbone, "backbone_kwargs": kwargs}))
    assert f"unknown key {next(iter(key))!r} in backbone_kwargs" in line


def test_config_unknown_backbone_with_kwargs_still_suggests_names():
    assert config_error({"backbone": "resnet1", "backbone_kwargs": {"in_chans": 1}}).startswith("unknown backbone 'resnet1'; did you mean")


EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_config_every_example_still_loads(path):
    cfg = make_config(load_yaml(path), str(path))
    assert cfg.backbone and cfg.loss


def test_config_good_options_pass_and_numeric_strings_become_numbers():
    cfg = make_config({
        "loss": "TripletMarginLoss+arcface", "loss_options": {"arcface": {"margin": "20", "scale": 30}, "TripletMarginLoss": {"smooth_loss": True}},
        "miner": "hard", "miner_options": {"pos_strategy": "hard"}, "augment_options": {"scale": ["6e-1", 1], "affine": {"degrees": 10, "fill": 255}},
        "backbone": "hybrid", "backbone_kwargs": {"cnn": "resnet18", "swin_kwargs": {"embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2]}},
    })
    assert cfg.loss_options["arcface"]["margin"] == 20.0 and cfg.augment_options["scale"] == [0.6, 1]


def test_config_the_gem_plugin_s_options_are_its_parameters():
    sys.path.insert(0, str(REPO / "plugins" / "mltk-gem"))
    import mltk_gem

    from mltk.plugins import pm

    pm.register(mltk_gem, name="gem-for-config-test")
    try:
        cfg = make_config({"backbone": "gem", "backbone_kwargs": {"base": "resnet18", "p": 4.0, "in_chans": 1}})
        assert cfg.backbone_kwargs == {"base": "resnet18", "p": 4.0, "in_chans": 1}
        assert config_error({"backbone": "gem", "backbone_kwargs": {"p": "three"}}) == "backbone_kwargs['p'] in c.yaml must be a number, got 'three'"
        assert "unknown key 'checkpoint_path'" in config_error({"backbone": "gem", "backbone_kwargs": {"checkpoint_path": "x"}})
    finally:
        pm.unregister(mltk_gem)
        sys.path.remove(str(REPO / "plugins" / "mltk-gem"))


# --- 3. Keys are names --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, message",
    [
        ("null: 3\n", "key None in {f} is not a name; option names are strings"),
        ("5: 3\n", "key 5 in {f} is not a name; option names are strings"),
        ("backbone_kwargs: {5: 3}\n", "key 5 in backbone_kwargs in {f} is not a name; option names are strings"),
        ("loss_options: {arcface: {null: 1}}\n", "key None in loss_options['arcface'] in {f} is not a name; option names are strings"),
        ("augment_options: {[1, 2]: 3}\n", "is not valid YAML: line 1: found unhashable key"),
    ],
)
def test_config_keys_that_are_not_strings_are_named(text, message, mltk_main, tmp_path):
    line = config_refused(mltk_main, tmp_path, text=text)
    assert message.format(f=tmp_path / "c.yaml") in line


# --- 4. YAML 1.1 reads 1e-3 as a string -------------------------------------------------------------------------------


def test_config_lr_1e_3_in_yaml_is_a_number(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 1e-3\nloss_lr: 2E-2\nweight_decay: 5e-5\n")
    cfg = make_config(load_yaml(tmp_path / "c.yaml"), "c.yaml")
    assert (cfg.lr, cfg.loss_lr, cfg.weight_decay) == (0.001, 0.02, 5e-5)
    assert config_error({"lr": "1e-3x"}) == "lr in c.yaml must be float, got '1e-3x'"
    assert config_error({"epochs": "1e1"}) == "epochs in c.yaml must be int, got '1e1'"


# --- 5. A key given twice ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, key, lines",
    [
        ("epochs: 1\nlr: 0.1\nepochs: 30\n", "epochs", "1 and 3"),
        ("augment_options:\n  hflip: 0.0\n  hflip: 0.5\n", "hflip", "2 and 3"),
        ("loss_options: {arcface: {margin: 1, margin: 2}}\n", "margin", "1 and 1"),
        ("epochs: 1\n'epochs': 2\n", "epochs", "1 and 2"),
    ],
)
def test_config_a_duplicated_yaml_key_is_refused_with_its_lines(text, key, lines, mltk_main, tmp_path):
    line = config_refused(mltk_main, tmp_path, text=text)
    assert line == f"error: config file {str(tmp_path / 'c.yaml')!r} is not valid YAML: key {key!r} is given twice (lines {lines})"


def test_config_a_merge_key_override_is_not_a_duplicate(tmp_path):
    (tmp_path / "c.yaml").write_text("augment_options:\n  <<: {hflip: 0.5, vflip: 0.1}\n  hflip: 0.0\n")
    assert make_config(load_yaml(tmp_path / "c.yaml")).augment_options == {"hflip": 0.0, "vflip": 0.1}


def test_config_yaml_tags_that_build_objects_are_refused(mltk_main, tmp_path):
    line = config_refused(mltk_main, tmp_path, text="epochs: !!python/object/apply:os.system ['touch pwned']\n")
    assert "is not valid YAML: line 1: could not determine a constructor" in line
    assert "not a set" in config_refused(mltk_main, tmp_path, text="data_classes: !!set {a, b}\n")
    assert "not a date" in config_refused(mltk_main, tmp_path, text="out: 2024-01-01\n")


# --- 6. Sizes, control characters, a config that is not a mapping --------------------------------------------------------


def test_config_file_over_a_mebibyte_is_refused(mltk_main, tmp_path):
    line = config_refused(mltk_main, tmp_path, text="# padding\n" * 120_000)
    assert line.endswith("is larger than 1024 KiB; a config holds options, not data")


@pytest.mark.parametrize(
    "values, message",
    [
        ({"data": "x" * 5000}, "data in c.yaml is 5000 characters long; at most 4096"),
        ({"data_classes": ["a"] * 100_001}, "data_classes in c.yaml holds 100001 items; at most 100000"),
        ({"loss_options": {"arcface": {"margin": [[[[1]]]]}}}, "loss_options['arcface']['margin'][0][0] in c.yaml is nested more than 5 levels deep"),
        ({"data": "birds\x00/train"}, "data in c.yaml holds a control character: 'birds\\x00/train'"),
        ({"out": "runs/\x1b[31mred"}, "out in c.yaml holds a control character: 'runs/\\x1b[31mred'"),
        ({"data_classes": ["ok", "bad\nname"]}, "data_classes[1] in c.yaml holds a control character"),
        ({"backbone_kwargs": {"a\x00": 1}}, "key 'a\\x00' in backbone_kwargs in c.yaml is not a name"),
        ({"seed": 10**60}, "seed in c.yaml is out of range: an integer of 200 bits"),
    ],
)
def test_config_sizes_and_control_characters_are_bounded(values, message):
    assert config_error(values).startswith(message)


def test_config_a_deeply_nested_or_self_referencing_yaml_is_one_line(mltk_main, tmp_path):
    assert config_refused(mltk_main, tmp_path, text="data_classes: " + "[" * 50_000 + "]" * 50_000 + "\n").endswith("is not valid YAML: nested too deeply")
    laughs = "a: &a [x, x, x, x, x, x, x, x]\n" + "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 8)}]\n" for p, c in zip("abcdefg", "bcdefgh"))
    assert "nested more than 5 levels deep" in config_refused(mltk_main, tmp_path, text=laughs)


def test_config_long_values_are_not_echoed_back(mltk_main, tmp_path):
    line = config_refused(mltk_main, tmp_path, text=f"epochs: {'x' * 4000}\n")
    assert line.startswith("error: epochs in") and len(line) < 300


@pytest.mark.parametrize("values", ["n", ["epochs", 3], None, 3])
def test_config_that_is_not_a_mapping_says_so(values):
    assert config_error(values, "checkpoint runs/x") == f"checkpoint runs/x: config must be a mapping of options, got {values!r}"


def test_config_in_a_checkpoint_that_is_not_a_mapping_is_one_line(trained_run, mltk_main, tmp_path):
    run, folder = trained_run
    state = torch.load(run / "last.pt", weights_only=True)
    state["config"] = "not a mapping"
    torch.save(state, tmp_path / "odd.pt")
    before = snapshot(tmp_path)
    line = one_line_error(mltk_main("evaluate", tmp_path / "odd.pt", "--data", folder, "--workers", "0", "--out", tmp_path / "eval"))
    assert "config must be a mapping of options, got 'not a mapping'" in line
    assert snapshot(tmp_path) == before


def test_config_yaml_that_is_not_a_mapping_or_not_a_file(mltk_main, tmp_path):
    assert config_refused(mltk_main, tmp_path, text="0\n").endswith("must hold a mapping of options, got 0")
    (tmp_path / "folder.yaml").mkdir()
    assert config_refused(mltk_main, tmp_path, "--config", tmp_path / "folder.yaml").endswith("folder.yaml' is not a file")


def test_config_validate_checks_a_config_made_in_code():
    validate(RunConfig(dim=16))
    with pytest.raises(UsageError, match=r"image_size in config must be an integer in \[8, 4096\], got 100000"):
        validate(RunConfig(image_size=100_000))




# ====================================================================================================
# mltk index and mltk search: index directories
# ====================================================================================================
# `mltk index` and `mltk search` against hostile input: folders that are not indexes, tampered index
# directories, kills mid-way, markup in class names and paths (issue 17).


@pytest.fixture(scope="module")
def index_model(trained_run):
    from mltk.model import load

    return load(trained_run[0], device="cpu")


@pytest.fixture(scope="module")
def index_built(trained_run, index_model, tmp_path_factory):
    """A flat index of the trained run's 40 images, written once: tests copy it before they touch it."""
    from mltk.data import load_data

    out = tmp_path_factory.mktemp("adversarial-index") / "gallery"
    mindex.write_index_dir(index_model, load_data(str(trained_run[1])), out, "flat", workers=0)
    return out


@pytest.fixture
def index_copy(index_built, tmp_path):
    """A fresh copy of the built index, to tamper with."""
    return Path(shutil.copytree(index_built, tmp_path / "idx"))


def index_query(trained_run) -> Path:
    return trained_run[1] / "class_03" / "2.png"


def index_dead_pid() -> int:
    """The id of a process that has exited (a child, reaped: nothing else has that id for now)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ---- 1. --out that is not an index is never removed ----------------------------------------------


@pytest.mark.parametrize(
    "meta",
    [
        "{}",  # a meta.json of anything else
        "not json at all",
        json.dumps({"format": "other-tool-3", "kind": "flat"}),
        json.dumps(["mltk-index-1"]),
        None,  # no meta.json at all
    ],
)
def test_index_keeps_a_folder_that_is_not_an_index(trained_run, mltk_main, tmp_path, meta):
    run, folder = trained_run
    out = tmp_path / "mine"
    (out / "photos").mkdir(parents=True)
    (out / "photos" / "holiday.jpg").write_bytes(b"precious")
    (out / "notes.txt").write_text("mine")
    if meta is not None:
        (out / "meta.json").write_text(meta)
    before = snapshot(tmp_path)
    line = one_line_error(mltk_main("index", run, "--data", folder, "--out", out, "--workers", "0"), 1)
    assert f"--out {str(out)!r} is a folder that is not an mltk index" in line and "'notes.txt'" in line
    assert snapshot(tmp_path) == before


def test_index_keeps_an_index_the_user_put_files_into(index_copy, trained_run, mltk_main):
    run, folder = trained_run
    (index_copy / "my_notes.txt").write_text("mine")
    (index_copy / "crops").mkdir()
    before = snapshot(index_copy.parent)
    line = one_line_error(mltk_main("index", run, "--data", folder, "--out", index_copy, "--workers", "0"), 1)
    assert "is an mltk index but also holds 'crops', 'my_notes.txt'" in line and line.endswith("replacing the index would delete; mltk replaces only what it wrote: give a new or empty folder")
    assert snapshot(index_copy.parent) == before


def test_index_replaces_an_index_holding_only_its_own_files(index_copy, trained_run, mltk_main):
    run, folder = trained_run
    (index_copy / "skipped_images.txt").write_text("x\tnot an image\n")  # an earlier run's: an index file too
    code, out, err = mltk_main("index", run, "--data", folder, "--out", index_copy, "--kind", "hnsw", "--workers", "0")
    assert code == 0, err
    assert mindex.open_index_dir(index_copy).meta["kind"] == "hnsw" and not (index_copy / "skipped_images.txt").exists()
    assert sorted(p.name for p in index_copy.parent.iterdir()) == ["idx"]


def test_index_keeps_files_put_into_the_out_folder_while_it_runs(index_copy, trained_run, index_model, monkeypatch):
    from mltk.data import load_data
    from mltk.errors import MltkError

    build = mindex.build

    def build_while_the_user_adds_a_file(*args, **kwargs):
        (index_copy / "added.txt").write_text("mine")
        return build(*args, **kwargs)

    monkeypatch.setattr(mindex, "build", build_while_the_user_adds_a_file)
    with pytest.raises(MltkError, match="also holds 'added.txt'"):
        mindex.write_index_dir(index_model, load_data(str(trained_run[1])), index_copy, "flat", workers=0)
    assert (index_copy / "added.txt").read_text() == "mine" and (index_copy / "model.pt").is_file()
    assert sorted(p.name for p in index_copy.parent.iterdir()) == ["idx"]  # no temporary left


# ---- 2. a bad --out is refused before the model loads ----------------------------------------------


@pytest.mark.parametrize("where", ["under a file", "a file"])
def test_index_checks_out_before_loading_anything(mltk_main, tmp_path, where):
    (tmp_path / "f").write_text("a file")
    out = tmp_path / "f" / "sub" if where == "under a file" else tmp_path / "f"
    before = snapshot(tmp_path)
    # the run and the data do not exist: the error is about --out, so it came first
    line = one_line_error(mltk_main("index", tmp_path / "no-run", "--data", tmp_path / "no-data", "--out", out), 1)
    assert f"--out {str(out)!r}" in line and f"{str(tmp_path / 'f')!r} is a file, not a folder" in line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "args, message",
    [
        (("--batch-size", "0"), "batch_size=0: it is at least 1"),
        (("--workers", "-1"), "workers=-1: it is at least 0"),
        (("--kind", "ivf", "--nlist", "0"), "nlist=0: it is at least 1"),
        (("--kind", "ivf", "--nprobe", "0"), "nprobe=0: it is at least 1"),
        (("--kind", "ivfpq", "--pq-m", "0"), "pq_m=0: it is at least 1"),
        (("--kind", "hnsw", "--m", "1"), "m=1: it is at least 2"),
        (("--kind", "hnsw", "--ef-search", "0"), "ef_search=0: it is at least 1"),
    ],
)
def test_index_options_out_of_range_are_one_line_before_loading(mltk_main, tmp_path, args, message):
    line = one_line_error(mltk_main("index", tmp_path / "no-run", "--data", tmp_path / "no-data", "--out", tmp_path / "i", *args), 2)
    assert message in line and sorted(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (("--kind", "ivf", "--nlist", "41"), "nlist=41: an IVF index of 40 vectors takes 1 to 40 cells"),
        (("--kind", "ivfpq", "--pq-m", "5"), "pq_m=5: it must divide the 16 dimensions"),
        (("--kind", "ivfpq",), "needs at least 256 vectors; 40 given"),
    ],
)
def test_index_options_that_need_the_data_are_checked_before_embedding(trained_run, mltk_main, tmp_path, monkeypatch, args, message):
    import mltk.evaluate

    def no_embedding(*a, **k):
        raise AssertionError("embedded before the options were checked")

    monkeypatch.setattr(mltk.evaluate, "embed", no_embedding)
    run, folder = trained_run
    line = one_line_error(mltk_main("index", run, "--data", folder, "--out", tmp_path / "i", "--workers", "0", *args), 2)
    assert message in line and sorted(tmp_path.iterdir()) == []


# ---- 3. a tampered index directory is one line naming the file ---------------------------------------


def index_rewrite_meta(**changes):
    def tamper(d: Path):
        meta = json.loads((d / "meta.json").read_text())
        (d / "meta.json").write_text(json.dumps({**meta, **changes}))

    return tamper


def index_save(name, array, **kwargs):
    return lambda d: np.save(d / name, array, **kwargs)


def index_write(name, text):
    return lambda d: (d / name).write_text(text) if isinstance(text, str) else (d / name).write_bytes(text)


def index_cut_paths(d: Path):
    (d / "paths.txt").write_text("".join(line + "\n" for line in (d / "paths.txt").read_text().splitlines()[:-1]))


def index_lying_header(d: Path):
    """labels.npy whose header announces rows the file does not hold (numpy would allocate them before it noticed)."""
    with open(d / "labels.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<i8", "fortran_order": False, "shape": (99999,)})
        f.write(np.zeros(40, np.int64).tobytes())


TAMPERED = {
    "classes shorter than the labels": (index_write("classes.json", '["class_00"]'), "labels.npy has label 1 at row 4; classes.json names 1 classes"),
    "classes a dict": (index_write("classes.json", '{"class_00": 0}'), "classes.json holds {'class_00': 0}; expected a list of class names"),
    "classes not strings": (index_write("classes.json", json.dumps(list(range(10)))), "classes.json holds [0, 1, 2, 3, 4, 5, ...]; expected a list"),
    "classes empty": (index_write("classes.json", "[]"), "classes.json holds []"),
    "classes not json": (index_write("classes.json", "class_00\nclass_01"), "classes.json is not JSON"),
    "classes deeply nested": (index_write("classes.json", "[" * 100000), "classes.json is not JSON"),
    "float labels": (index_save("labels.npy", np.arange(40) / 4), "labels.npy holds float64 (40,); expected integers (40,)"),
    "bool labels": (index_save("labels.npy", np.ones(40, bool)), "labels.npy holds bool (40,)"),
    "negative label": (index_save("labels.npy", np.r_[-1, np.zeros(39, np.int64)]), "labels.npy has label -1 at row 0"),
    "label past the classes": (index_save("labels.npy", np.r_[np.zeros(39, np.int64), 10]), "labels.npy has label 10 at row 39; classes.json names 10 classes (0 to 9)"),
    "labels 2-D": (index_save("labels.npy", np.zeros((40, 1), np.int64)), "labels.npy holds int64 (40, 1)"),
    "labels too few": (index_save("labels.npy", np.zeros(39, np.int64)), "labels.npy holds int64 (39,)"),
    "labels a pickle": (index_save("labels.npy", np.array([{}] * 40, object), allow_pickle=True), "labels.npy holds Python objects"),
    "labels not npy": (index_write("labels.npy", b"\x80\x04junk"), "labels.npy is not a numpy array file"),
    "labels header lies": (index_lying_header, "labels.npy holds 320 bytes of data; its header announces int64 (99999,)"),
    "paths one short": (index_cut_paths, "paths.txt has 39 lines; meta.json says 40 images"),
    "meta dim a string": (index_rewrite_meta(dim="16"), "meta.json has dim='16'; expected int"),
    "meta count a bool": (index_rewrite_meta(count=True), "meta.json has count=True; expected int"),
    "meta params a list": (index_rewrite_meta(params=[]), "meta.json has params=[]; expected dict"),
    "meta kind unknown": (index_rewrite_meta(kind="annoy"), "meta.json has kind='annoy'; expected one of flat, ivf, ivfpq, hnsw"),
    "meta kind another": (index_rewrite_meta(kind="hnsw"), "index.faiss has kind flat; meta.json says hnsw"),
    "meta dim wrong": (index_rewrite_meta(dim=32), "index.faiss has dim 16; meta.json says 32"),
    "meta count wrong": (index_rewrite_meta(count=41), "index.faiss has count 40; meta.json says 41"),
    "meta count zero": (index_rewrite_meta(count=0), "meta.json has dim=16, count=0; expected at least 1"),
    "meta run not text": (index_rewrite_meta(run=["x"]), "meta.json has run=['x']; expected str"),
    "index.faiss junk": (index_write("index.faiss", b"IxFI" + b"\0" * 10), "index.faiss cannot be read by faiss"),
    "index.faiss missing": (lambda d: (d / "index.faiss").unlink(), "index.faiss is missing"),
    "model.pt missing": (lambda d: (d / "model.pt").unlink(), "model.pt is missing"),
    "paths.txt a folder": (lambda d: ((d / "paths.txt").unlink(), (d / "paths.txt").mkdir()), "paths.txt is missing"),
    "embeddings of another shape": (index_save("embeddings.npy", np.zeros((40, 8), np.float32)), "embeddings.npy holds float32 (40, 8); expected float32 (40, 16)"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_search_names_the_damaged_file_of_a_tampered_index(index_copy, trained_run, mltk_main, case):
    tamper, message = TAMPERED[case]
    tamper(index_copy)
    before = snapshot(index_copy)
    line = one_line_error(mltk_main("search", index_copy, index_query(trained_run)), 1)
    assert line.startswith(f"error: index directory {str(index_copy)!r} is damaged: ") and message in line, line
    assert line.endswith("write it again with `mltk index`")
    assert snapshot(index_copy) == before


def test_search_with_a_model_of_another_dimension_names_model_pt(index_copy, trained_run, index_model, mltk_main, tmp_path):
    from mltk.config import make_config
    from mltk.data import load_data
    from mltk.model import EmbeddingModel, build_embedder

    cfg = make_config({**TINY, "dim": 8, "data": str(trained_run[1])})
    narrow = EmbeddingModel(build_embedder(cfg, from_checkpoint=True), index_model.data_config, cfg, index_model.classes, "cpu")
    mindex.write_index_dir(narrow, load_data(str(trained_run[1])).rows(list(range(4))), tmp_path / "narrow", workers=0)
    shutil.copy(tmp_path / "narrow" / "model.pt", index_copy / "model.pt")
    line = one_line_error(mltk_main("search", index_copy, index_query(trained_run)), 1)
    assert line == f"error: index directory {str(index_copy)!r} is damaged: model.pt embeds in 8 dimensions; the index holds 16; write it again with `mltk index`"


def test_an_index_without_embeddings_npy_still_searches(index_copy, trained_run, mltk_main):
    (index_copy / "embeddings.npy").unlink()  # a search does not read it: deleting it saves space
    code, out, err = mltk_main("search", index_copy, index_query(trained_run), "--json", "--k", "1")
    assert code == 0, err
    assert json.loads(out)[0]["neighbours"][0]["class"] == "class_03"


# ---- 4. temporaries a kill left are removed by the next run ------------------------------------------


def test_a_kill_9_mid_index_leaves_a_temporary_the_next_run_removes(index_copy, trained_run, mltk_main):
    run, folder = trained_run
    parent = index_copy.parent
    before = snapshot(index_copy)
    # A real `mltk index` that SIGKILLs itself while it builds: after embedding, its temporary folder full.
    script = (
        "import os, signal, sys; import mltk.index as m; "
        "m.build = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL); "
        "from mltk.cli import main; sys.argv = ['mltk'] + sys.argv[1:]; main()"
    )
    env = {**os.environ, "MLTK_LOAD_PLUGINS": ""}
    killed = subprocess.Popen(
        [sys.executable, "-c", script, "index", str(run), "--data", str(folder), "--out", str(index_copy), "--workers", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
    )
    _, stderr = killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL, stderr
    left = parent / f".idx.tmp-{killed.pid}"
    assert (left / "embeddings.npy").is_file() and snapshot(index_copy) == before  # the index itself untouched
    # What other processes left: a dead one's old copy (removed), a live one's (kept), another --out's (kept).
    dead = index_dead_pid()
    (parent / f".idx.old-{dead}").mkdir()
    (parent / f".idx.old-{dead}" / "meta.json").write_text("{}")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (parent / f".idx.tmp-{live.pid}").mkdir()
        (parent / f".other.tmp-{dead}").mkdir()
        code, _, err = mltk_main("index", run, "--data", folder, "--out", index_copy, "--workers", "0")
        assert code == 0, err
        assert sorted(p.name for p in parent.iterdir()) == sorted(["idx", f".idx.tmp-{live.pid}", f".other.tmp-{dead}"])
        assert mindex.open_index_dir(index_copy).meta["count"] == 40
    finally:
        live.kill()
        live.wait()


def test_a_refused_index_run_removes_no_temporary(index_copy, mltk_main, tmp_path):
    dead = index_dead_pid()
    (tmp_path / f".idx.tmp-{dead}").mkdir()
    before = snapshot(tmp_path)
    one_line_error(mltk_main("index", tmp_path / "no-run", "--data", tmp_path / "no-data", "--out", index_copy))
    assert snapshot(tmp_path) == before  # bad input changes nothing, stale temporaries included


# ---- 5-7. query images, display, search options ------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (lambda q: (q.parent,), "is a folder, not an image file"),
        (lambda q: (q, "--k", "0"), "k=0: give 1 to 40"),
        (lambda q: (q, "--k", "-3"), "k=-3: give 1 to 40"),
        (lambda q: (q, "--nprobe", "2"), "nprobe applies to an ivf or ivfpq index (this index: flat)"),
        (lambda q: (q, "--ef-search", "-1"), "ef_search applies to an hnsw index (this index: flat)"),
    ],
)
def test_search_refuses_bad_queries_and_options_in_one_line(index_built, trained_run, mltk_main, args, message):
    line = one_line_error(mltk_main("search", index_built, *args(index_query(trained_run))), None)
    assert message in line


def test_search_options_out_of_range_on_an_approximate_index(index_copy, trained_run, index_model, mltk_main, tmp_path):
    from mltk.data import load_data

    mindex.write_index_dir(index_model, load_data(str(trained_run[1])), tmp_path / "ivf", "ivf", workers=0)
    mindex.write_index_dir(index_model, load_data(str(trained_run[1])), tmp_path / "hnsw", "hnsw", workers=0)
    query = index_query(trained_run)
    assert "nprobe=0: it is at least 1" in one_line_error(mltk_main("search", tmp_path / "ivf", query, "--nprobe", "0"), 2)
    assert "ef_search=-2: it is at least 1" in one_line_error(mltk_main("search", tmp_path / "hnsw", query, "--ef-search", "-2"), 2)


def test_search_prints_names_from_the_index_as_text_not_markup(index_copy, trained_run, mltk_main, tmp_path):
    names = ["[red]x[/red]", "\x1b[31mevil", "[bold]b", "ok"] + [f"c{i}" for i in range(6)]
    (index_copy / "classes.json").write_text(json.dumps(names))
    labels = np.load(index_copy / "labels.npy")
    paths = (index_copy / "paths.txt").read_text().splitlines()
    i = int(np.flatnonzero(labels == 1)[0])  # a class_01 image: its class is now "\x1b[31mevil"
    paths[i] = "/g/[i]p\x1b]8;;x\x07"
    (index_copy / "paths.txt").write_text("".join(p + "\n" for p in paths))
    query = tmp_path / "[bold]q.png"
    shutil.copy(Path(paths[0]), query)  # a class_00 image: its class is now "[red]x[/red]"
    code, out, err = mltk_main("search", index_copy, query, trained_run[1] / "class_01" / "0.png", "--k", "1")
    assert code == 0, err
    assert "[red]x[/red]" in out and "[bold]q.png" in out  # printed as they are, not as styles
    assert "\\x1b[31mevil" in out and "/g/[i]p\\x1b]8;;x\\x07" in out  # escapes written out, never sent
    assert "\x1b" not in out and "\x07" not in out


# ---- other holes of the same kind -------------------------------------------------------------------


def test_index_refuses_an_image_with_a_line_break_in_its_path_before_embedding(index_model, tmp_path):
    from mltk.data import load_data
    from mltk.errors import MltkError

    folder = make_image_folder(tmp_path / "images", classes=2, per_class=2)
    os.rename(folder / "class_00" / "0.png", folder / "class_00" / "a\nb.png")
    with pytest.raises(MltkError, match=r"has a line break in its path, and paths.txt holds one path a line"):
        mindex.write_index_dir(index_model, load_data(str(folder)), tmp_path / "out", workers=0)
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_index_through_a_symbolic_link_replaces_the_folder_it_names(index_copy, trained_run, mltk_main, tmp_path):
    run, folder = trained_run
    link = tmp_path / "link"
    link.symlink_to(index_copy)
    code, _, err = mltk_main("index", run, "--data", folder, "--out", link, "--kind", "hnsw", "--workers", "0")
    assert code == 0, err
    assert link.is_symlink() and mindex.open_index_dir(index_copy).meta["kind"] == "hnsw"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "link"]


def test_a_full_disk_while_writing_an_index_is_one_line_and_keeps_the_earlier_index(index_copy, trained_run, index_model, monkeypatch):
    import errno

    from mltk.data import load_data
    from mltk.errors import MltkError

    before = snapshot(index_copy)

    def disk_full(index):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mindex, "settings", disk_full)
    with pytest.raises(MltkError, match=r"^no space left on device writing index directory .*; nothing there was changed$"):
        mindex.write_index_dir(index_model, load_data(str(trained_run[1])), index_copy, "flat", workers=0)
    assert snapshot(index_copy) == before and sorted(p.name for p in index_copy.parent.iterdir()) == ["idx"]


def test_a_failed_index_run_removes_the_folders_it_made_for_out(trained_run, index_model, tmp_path, monkeypatch):
    from mltk.data import load_data

    def broken(*args, **kwargs):
        raise RuntimeError("interrupted while building")

    monkeypatch.setattr(mindex, "build", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        mindex.write_index_dir(index_model, load_data(str(trained_run[1])), tmp_path / "a" / "b" / "idx", workers=0)
    assert sorted(tmp_path.iterdir()) == []  # neither a/b nor a temporary



# ====================================================================================================
# mltk evaluate and mltk export: output folders, checkpoints, pair lists, markup
# ====================================================================================================
# Adversarial input to mltk evaluate and export: output paths, checkpoint fields, pair lists, markup, numbers.
#
# Each refusal is one ``error:`` line, a non-zero exit, before any work (the model is not even loaded),
# and the disk as it was; each output is complete or absent.


pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.jit:FutureWarning")  # torch's deprecation notice


def evaluate_forbid_work(monkeypatch):
    """Loading a model or embedding fails the test: a refusal must come before either."""

    def no_work(*args, **kwargs):
        raise AssertionError("the work started before the input was checked")

    import mltk.evaluate
    import mltk.model

    monkeypatch.setattr(mltk.model, "load", no_work)
    monkeypatch.setattr(mltk.evaluate, "untrained_model", no_work)
    monkeypatch.setattr(mltk.evaluate, "embed", no_work)


def evaluate_args(run, folder, out, *more):
    return ("evaluate", run, "--data", folder, "--out", out, "--no-report", "--workers", "0", "--metrics", "roc_auc,recall_at_k", *more)


# --- 1. --out: checked before the work; never clobbers what mltk evaluate did not write; whole or absent ------------


@pytest.mark.parametrize(
    "case, expected",
    [
        ("a file", r"--out '.*/notes.txt' is a file, not a folder"),
        ("under a file", r"cannot write --out '.*/notes.txt/eval': '.*/notes.txt' is a file, not a folder"),
        ("a folder of other files", r"--out '.*/mine' is not empty and not an earlier evaluation \('data.csv', 'paper.tex'\); mltk replaces only what it wrote: give a new or empty folder"),
        ("a folder with a report.html only", r"--out '.*/mine' is not empty and not an earlier evaluation \(no metrics.json\)"),
    ],
)
def test_evaluate_out_that_cannot_be_used_is_one_line_before_any_work(case, expected, trained_run, mltk_main, tmp_path, monkeypatch):
    run, folder = trained_run
    (tmp_path / "notes.txt").write_text("my notes")
    (tmp_path / "mine").mkdir()
    if case == "a folder of other files":
        (tmp_path / "mine" / "paper.tex").write_text("draft")
        (tmp_path / "mine" / "data.csv").write_text("1,2")
    elif case == "a folder with a report.html only":
        (tmp_path / "mine" / "report.html").write_text("<p>my own report</p>")
    out = {"a file": tmp_path / "notes.txt", "under a file": tmp_path / "notes.txt" / "eval"}.get(case, tmp_path / "mine")
    before = snapshot(tmp_path)
    evaluate_forbid_work(monkeypatch)
    line = one_line_error(mltk_main(*evaluate_args(run, folder, out)), code=1)
    assert re.search(expected, line), line
    assert snapshot(tmp_path) == before


def test_evaluate_replaces_its_own_earlier_folder_whole(trained_run, mltk_main, tmp_path):
    run, folder = trained_run
    out = tmp_path / "eval"
    out.mkdir()  # an empty folder is fine
    code, _, err = mltk_main(*evaluate_args(run, folder, out, "--save-embeddings"))
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["embeddings.npy", "labels.npy", "metrics.json", "paths.txt", "thresholds.json"]
    # Again, without --save-embeddings: the folder holds this evaluation's files only, not a mix of two.
    code, _, err = mltk_main(*evaluate_args(run, folder, out))
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["metrics.json", "thresholds.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval"]  # no temporaries beside it
    # The default, RUN/eval, is re-run as often as one likes.
    for _ in range(2):
        code, _, err = mltk_main("evaluate", run, "--no-report", "--workers", "0", "--metrics", "recall_at_k")
        assert code == 0, err
    assert json.loads((run / "eval" / "metrics.json").read_text())["queries"] == 12
    assert not [p for p in run.iterdir() if p.name.startswith(".")]


def test_evaluate_that_fails_midway_leaves_the_earlier_evaluation_as_it_was(trained_run, mltk_main, tmp_path, monkeypatch):
    run, folder = trained_run
    out = tmp_path / "eval"
    assert mltk_main(*evaluate_args(run, folder, out, "--save-embeddings"))[0] == 0
    before = snapshot(tmp_path)
    import mltk.evaluate

    def fail(*args, **kwargs):
        raise MltkError("the metrics broke")

    monkeypatch.setattr(mltk.evaluate, "write_outputs", fail)  # after the (other: --flip-tta) embeddings were streamed
    assert one_line_error(mltk_main(*evaluate_args(run, folder, out, "--save-embeddings", "--flip-tta"))) == "error: the metrics broke"
    assert snapshot(tmp_path) == before


def test_an_interrupted_evaluation_leaves_no_folder(tmp_path):
    from mltk.evaluate import output_folder

    out = tmp_path / "new" / "deeper" / "eval"
    with pytest.raises(KeyboardInterrupt):
        with output_folder(out) as folder:
            (folder / "metrics.json").write_text("{}")
            raise KeyboardInterrupt  # Ctrl-C while embedding
    assert list(tmp_path.iterdir()) == []  # not even the folders made for it
    with output_folder(out) as folder:
        (folder / "metrics.json").write_text("{}")
    assert [p.name for p in out.iterdir()] == ["metrics.json"] and [p.name for p in out.parent.iterdir()] == ["eval"]


# --- 2. Every field of a checkpoint is checked on load ------------------------------------------------------------


def _data_config(**change):
    def apply(state):
        state["data_config"] = {**state["data_config"], **change}

    return apply


def _drop(key):
    return lambda state: state.pop(key)


def _put(key, value):
    return lambda state: state.update({key: value})


def _config(**change):
    def apply(state):
        state["config"] = {**state["config"], **change}

    return apply


CHECKPOINT_CASES = {
    "no data_config": (_drop("data_config"), r"lacks the field data_config"),
    "data_config not a mapping": (_put("data_config", [3, 32, 32]), r"data_config must be a mapping, got \[3, 32, 32\]"),
    "negative input_size": (_data_config(input_size=(3, -5, 32)), r"data_config.input_size must be \[channels, height, width\].*got \(3, -5, 32\)"),
    "huge input_size": (_data_config(input_size=(3, 100000, 100000)), r"data_config.input_size must be .*sides 1 to 4096"),
    "2 channels": (_data_config(input_size=(2, 32, 32), mean=(0.5, 0.5), std=(0.5, 0.5)), r"data_config.input_size must be .*1 or 3 channels"),
    "unknown interpolation": (_data_config(interpolation="cubic"), r"data_config.interpolation must be one of nearest, bilinear, bicubic, box, hamming, lanczos, got 'cubic'"),
    "short mean": (_data_config(mean=(0.5, 0.5)), r"data_config.mean must be 3 finite numbers, one per channel, got \(0.5, 0.5\)"),
    "nan std": (_data_config(std=(0.5, float("nan"), 0.5)), r"data_config.std must be 3 finite numbers > 0"),
    "zero std": (_data_config(std=(0.5, 0.0, 0.5)), r"data_config.std must be 3 finite numbers > 0"),
    "text mean": (_data_config(mean="0.5"), r"data_config.mean must be 3 finite numbers"),
    "crop_pct 0": (_data_config(crop_pct=0), r"data_config.crop_pct must be a number in \(0, 1\], got 0"),
    "unknown crop_mode": (_data_config(crop_mode="zoom"), r"data_config.crop_mode must be one of center, squash, border, got 'zoom'"),
    "unknown data_config key": (_data_config(is_training=True), r"data_config has an unknown key 'is_training'"),
    "classes not names": (_put("classes", [1, 2]), r"classes must be a list of class names or null, got \[1, 2\]"),
    "model not tensors": (_put("model", {"neck.0.weight": [1.0]}), r"model must be a state dict \(names to tensors\)"),
    "negative epoch": (_put("epoch", -1), r"epoch must be a whole number >= 0, got -1"),
    "best without a score": (_put("best", {"epoch": 1}), r"best must be \{\} or \{epoch, score, by\}, got \{'epoch': 1\}"),
    "no losses": (_drop("losses"), r"lacks the field losses"),
    "config not a mapping": (_put("config", None), r"config must be a mapping"),
    "backbone_kwargs mltk sets": (_config(backbone_kwargs={"num_classes": 5}), r"backbone_kwargs\['num_classes'\].*mltk sets 'num_classes' itself"),
    "unknown backbone": (_config(backbone="no_such_net"), r"unknown backbone 'no_such_net'"),
}


@pytest.fixture(scope="module")
def evaluate_checkpoint(trained_run):
    """The trained run's best.pt, as torch reads it (to be spoilt one field at a time)."""
    return torch.load(trained_run[0] / "best.pt", weights_only=True)


@pytest.mark.parametrize("case", CHECKPOINT_CASES)
def test_a_bad_checkpoint_field_is_one_line_naming_the_file_and_the_field(case, evaluate_checkpoint, trained_run, mltk_main, tmp_path):
    spoil, expected = CHECKPOINT_CASES[case]
    state = {k: dict(v) if isinstance(v, dict) else v for k, v in evaluate_checkpoint.items()}
    spoil(state)
    path = tmp_path / "bad.pt"
    torch.save(state, path)
    before = snapshot(tmp_path)
    line = one_line_error(mltk_main(*evaluate_args(path, trained_run[1], tmp_path / "eval")))
    assert str(path) in line and re.search(expected, line), line
    assert snapshot(tmp_path) == before
    with pytest.raises(MltkError, match=expected):
        mltk.load(path)


def test_preprocessing_of_other_channels_than_the_model_takes_is_named(evaluate_checkpoint, tmp_path):
    from mltk.config import make_config, to_dict
    from mltk.model import build_embedder

    cfg = make_config({**TINY, "backbone_kwargs": {"in_chans": 1}})
    state = dict(evaluate_checkpoint, config=to_dict(cfg), model=build_embedder(cfg).state_dict())  # weights fit; data_config is RGB
    torch.save(state, tmp_path / "grey.pt")
    with pytest.raises(MltkError, match=r"grey.pt': data_config.input_size has 3 channels, the model takes 1$"):
        mltk.load(tmp_path / "grey.pt")


def test_a_checkpoint_passes_on_only_the_fields_it_knows(evaluate_checkpoint, tmp_path):
    from mltk.model import load_checkpoint, save_checkpoint

    save_checkpoint({**evaluate_checkpoint, "extra": "not mltk's"}, tmp_path / "a.pt")
    state = load_checkpoint(tmp_path / "a.pt")
    assert "extra" not in state and state["epoch"] == evaluate_checkpoint["epoch"]
    slim = {k: evaluate_checkpoint[k] for k in ("config", "data_config", "classes", "model")}  # what mltk index writes
    save_checkpoint(slim, tmp_path / "slim.pt")
    assert set(load_checkpoint(tmp_path / "slim.pt")) == {"format", *slim}
    with pytest.raises(MltkError, match=r"slim.pt' lacks the fields epoch, best, losses, sampler, rng, optimizer, scheduler, scaler"):
        load_checkpoint(tmp_path / "slim.pt", run=True)  # what resuming needs


def test_best_pt_leaves_the_optimiser_state_to_last_pt(trained_run):
    """Only resuming needs Adam's state (twice the model's size): best.pt is for inference, last.pt carries it."""
    from mltk.model import load_checkpoint

    best, last = trained_run[0] / "best.pt", trained_run[0] / "last.pt"
    assert not {"optimizer", "scheduler", "scaler"} & set(torch.load(best, weights_only=True))
    assert {"optimizer", "scheduler", "scaler"} <= set(load_checkpoint(last, run=True))
    assert best.stat().st_size < last.stat().st_size
    with pytest.raises(MltkError, match=r"best.pt' lacks the fields optimizer, scheduler, scaler"):
        load_checkpoint(best, run=True)  # resuming reads last.pt


# --- 3. mltk export: both files or neither; no folder left behind -------------------------------------------------


def test_export_with_a_folder_in_the_way_of_its_sidecar_is_one_line_before_exporting(trained_run, mltk_main, tmp_path, monkeypatch):
    (tmp_path / "m.pt.json").mkdir()
    before = snapshot(tmp_path)
    evaluate_forbid_work(monkeypatch)
    line = one_line_error(mltk_main("export", trained_run[0], "--format", "torchscript", "--out", tmp_path / "m.pt"), code=1)
    assert line == f"error: {str(tmp_path / 'm.pt.json')!r} is a folder; the export writes its preprocessing there (FILE.json): give another --out"
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("earlier", [False, True])
def test_export_whose_sidecar_cannot_be_renamed_writes_neither_file(earlier, trained_run, mltk_main, tmp_path, monkeypatch):
    from mltk import export

    if earlier:  # mltk replaces only its own: an earlier export, as its FILE.json says
        export.export(trained_run[0], tmp_path / "m.pt", "torchscript")
    before = snapshot(tmp_path)
    real = os.replace

    def replace(src, dst):
        if str(dst).endswith(".json"):
            raise OSError(errno.EIO, "Input/output error", str(dst))
        return real(src, dst)

    monkeypatch.setattr(export.os, "replace", replace)
    line = one_line_error(mltk_main("export", trained_run[0], "--format", "torchscript", "--out", tmp_path / "m.pt"), code=1)
    assert line.startswith("error: Input/output error writing ") and "nothing was written" in line
    assert snapshot(tmp_path) == before  # the earlier file is back, byte for byte; no temporaries


def test_an_export_that_does_not_finish_removes_the_folder_it_made(trained_run, tmp_path, monkeypatch):
    from mltk import export

    def interrupted(*args):
        raise KeyboardInterrupt  # Ctrl-C while tracing

    monkeypatch.setattr(export, "write_torchscript", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export.export(trained_run[0], tmp_path / "new" / "sub" / "m.pt", "torchscript")
    (tmp_path / "kept").mkdir()
    with pytest.raises(KeyboardInterrupt):
        export.export(trained_run[0], tmp_path / "kept" / "m.pt", "torchscript")
    assert snapshot(tmp_path) == {".": "dir", "kept": "dir"}  # the folder it made is gone, the user's stays
    monkeypatch.undo()
    export.export(trained_run[0], tmp_path / "new" / "sub" / "m.pt", "torchscript")  # made when needed, and kept
    assert sorted(p.name for p in (tmp_path / "new" / "sub").iterdir()) == ["m.pt", "m.pt.json"]


# --- 4. Pair lists: the line as it is, CSV reader errors, both kinds of pair --------------------------------------


def test_lfw_error_quotes_the_line_as_it_is_in_the_file(tmp_path):
    from mltk.pairs import read_pairs

    (tmp_path / "pairs.txt").write_text("1\nAbel_Pacheco\t1\t4\n  Abel_Pacheco \t x \t4 \n")
    with pytest.raises(MltkError, match=r"pairs.txt, line 3: expected 'name i j' or 'name1 i name2 j', got '  Abel_Pacheco \\t x \\t4 '$"):
        read_pairs(tmp_path / "pairs.txt", tmp_path)
    (tmp_path / "header.txt").write_text("10\t300 7\n")
    with pytest.raises(MltkError, match=r"header.txt, line 1: expected a header 'folds n' or 'n', got '10\\t300 7'$"):
        read_pairs(tmp_path / "header.txt", tmp_path)


@pytest.mark.parametrize(
    "text, expected",
    [
        ('a.png,b.png,1\n"a.png,b.png,1\nc.png,d.png,0\ne.png,f.png,0\n', r"pairs.csv, line 2: a quote opens and is not closed on that line: '\"a.png,b.png,1'$"),
        ("a.png,b.png,1\na.png," + "x" * 200_000 + ",0\n", r"pairs.csv, line 2: not a readable CSV line \(field larger than field limit \(131072\)\): 'a.png,xxx+\.\.\.'$"),
        ("path1,path2,same\n a.png , b.png ,maybe\n", r"pairs.csv, line 2: expected 'path1,path2,same' with same 1/0/true/false, got ' a.png , b.png ,maybe'$"),
    ],
    ids=["unclosed quote", "field too large", "bad same"],
)
def test_csv_pair_list_errors_name_the_line_without_dumping_the_file(text, expected, tmp_path):
    from mltk.pairs import read_pairs

    (tmp_path / "pairs.csv").write_text(text)
    with pytest.raises(MltkError, match=expected) as raised:
        read_pairs(tmp_path / "pairs.csv", tmp_path)
    assert len(str(raised.value)) < 400 and "\n" not in str(raised.value)


def test_a_pair_list_that_is_not_text_names_the_line(tmp_path):
    from mltk.pairs import read_pairs

    (tmp_path / "pairs.csv").write_bytes(b"a.png,b.png,1\nc.png,\xff\xfe.png,0\n")
    with pytest.raises(MltkError, match=r"pairs.csv, line 2: not UTF-8 text; a pair list is a text file$"):
        read_pairs(tmp_path / "pairs.csv", tmp_path)


@pytest.mark.parametrize("same, kind, other", [("1", "matched", "mismatched"), ("0", "mismatched", "matched")])
def test_a_pair_list_of_one_kind_is_one_line_before_embedding(same, kind, other, trained_run, mltk_main, tmp_path, monkeypatch):
    run, folder = trained_run
    (tmp_path / "pairs.csv").write_text("".join(f"class_0{c}/0.png,class_0{c}/1.png,{same}\n" for c in range(4)))
    import mltk.evaluate

    monkeypatch.setattr(mltk.evaluate, "embed", lambda *a, **k: pytest.fail("embedded before the pair list was checked"))
    line = one_line_error(mltk_main(*evaluate_args(run, folder, tmp_path / "eval", "--pairs", tmp_path / "pairs.csv")), code=1)
    assert line.endswith(f"pairs.csv: every pair is {kind} (4); ROC-AUC, EER, TAR@FAR and accuracy need {other} pairs too")
    assert not (tmp_path / "eval").exists()


def test_a_pair_list_left_with_one_kind_by_unreadable_images_says_so(tmp_path):
    from mltk.pairs import read_pairs

    (tmp_path / "pairs.csv").write_text("a.png,b.png,1\nc.png,d.png,0\n")
    pairs = read_pairs(tmp_path / "pairs.csv", tmp_path)
    with pytest.raises(MltkError, match=r"pairs.csv: every pair left once the unreadable images are left out is matched \(1\); .* need mismatched pairs too"):
        pairs.without({tmp_path / "d.png"})


# --- 5. Strings are data: HTML, matplotlib's mathtext, rich markup ------------------------------------------------

MARKUP_NAMES = ["$\\frac{1}{0}$", "<script>alert(1)</script>", "$\\foo{$", "[bold]x[/bold]"]


def test_the_html_report_escapes_every_string(tmp_path):
    from mltk.report import html_report

    page = html_report(
        "mltk evaluate — runs/<b>x</b>", {"recall@1": 0.5, "<i>m</i>": "<script>"},
        {"pair list": "a<script>alert(1)</script>&\x1b[31m.csv"}, {"<img src=x onerror=alert(1)>": b"png"},
    )
    assert "<script>" not in page and "<b>x" not in page and "<i>" not in page and "<img src=x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;&amp;\\x1b[31m.csv" in page and "\x1b" not in page
    assert "runs/&lt;b&gt;x&lt;/b&gt;" in page


def test_class_names_are_drawn_as_they_are_not_as_mathtext(monkeypatch):
    from mltk import report

    figures = []
    real_png = report._png
    monkeypatch.setattr(report, "_png", lambda fig: figures.append(fig) or real_png(fig))  # draws it: no parse error
    points, labels = np.random.default_rng(0).normal(size=(8, 2)), np.repeat(np.arange(4), 2)
    png = report.scatter_plot(points, labels, MARKUP_NAMES, "t-SNE")
    assert png.startswith(b"\x89PNG")
    texts = figures[0].axes[0].get_legend().get_texts()
    assert [t.get_text() for t in texts] == MARKUP_NAMES and not any(t.get_parse_math() for t in texts)


def test_evaluate_prints_paths_as_they_are_not_as_rich_markup(trained_run, mltk_main, tmp_path):
    run, folder = trained_run
    out = tmp_path / "[/bold] [red]eval[/red]"
    code, stdout, err = mltk_main(*evaluate_args(run, folder, out))
    assert code == 0, err
    assert f"written to {out}: metrics.json" in " ".join(stdout.split())
    assert (out / "metrics.json").is_file()


# --- 6. Numeric options (and the device): one line before any work ------------------------------------------------


@pytest.mark.parametrize(
    "options, expected",
    [
        (["--batch-size", "0"], "error: --batch-size must be a positive number of images, got 0"),
        (["--workers", "-1"], "error: --workers must be 0 (load in this process) or more processes, got -1"),
        (["--max-pairs", "0"], "error: --max-pairs must be a positive number of pairs, got 0"),
        (["--backbone", "test_resnet", "--image-size", "-5"], "error: --image-size must be a side in pixels from 8 to 4096, got -5"),
        (["--image-size", "64"], "error: --pretrained, --weights and --image-size go with --backbone; a run's checkpoint has its own"),
        (["--index", "ivf", "--nprobe", "0"], "error: --nprobe must be a positive number, got 0"),
        (["--device", "gpu0"], "error: --device 'gpu0' is not a device torch knows; give cpu, cuda, cuda:1, mps, ..."),
        pytest.param(
            ["--device", "cuda:3"], "error: --device 'cuda:3': there is no such CUDA GPU here (0 found); give --device cpu",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="a machine without a GPU"),
        ),
    ],
)
def test_evaluate_numbers_out_of_range_are_one_line_before_any_work(options, expected, trained_run, mltk_main, tmp_path, monkeypatch):
    run, folder = trained_run
    evaluate_forbid_work(monkeypatch)
    target = [] if "--backbone" in options else [run]
    args = ["evaluate", *target, "--data", folder, "--out", tmp_path / "eval", "--workers", "0", *options]
    assert one_line_error(mltk_main(*args), code=2) == expected
    assert list(tmp_path.iterdir()) == []



def test_evaluate_keeps_files_put_into_out_while_it_runs(tmp_path):
    """--out is checked again just before the swap: what the user put there meanwhile is theirs, not replaced."""
    from mltk.evaluate import check_out, output_folder

    out = check_out(tmp_path / "eval")
    with pytest.raises(MltkError, match=r"is not empty and not an earlier evaluation \('notes.txt'\)"):
        with output_folder(out) as folder:
            (folder / "metrics.json").write_text("{}")
            out.mkdir()
            (out / "notes.txt").write_text("mine")
    assert (out / "notes.txt").read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["eval"]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_metrics_json_is_strict_json_with_null_for_values_that_are_not_finite(tmp_path):
    """JSON has no Infinity or NaN (JSON.parse, jq and most readers refuse them): such a metric is written as null."""
    from mltk.evaluate import EvalResult, write_outputs

    values = {"accuracy_threshold": float("inf"), "eer_threshold": np.float32("nan"), "roc_auc": np.float64(0.75), "pairs": np.int64(6)}
    write_outputs(EvalResult(values, None, np.zeros((0, 2), np.float32), None, [], []), tmp_path, save_embeddings=False)

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    written = json.loads((tmp_path / "metrics.json").read_text(), parse_constant=refuse)
    assert {key: written[key] for key in values} == {"accuracy_threshold": None, "eer_threshold": None, "roc_auc": 0.75, "pairs": 6}


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("command", ["evaluate", "index", "export"])
def test_ctrl_c_says_what_became_of_the_output(command, trained_run, mltk_main, tmp_path, monkeypatch):
    """Ctrl-C in evaluate, index or export: exit 130 and one line saying nothing was written (as mltk run says what it kept)."""
    import mltk.evaluate
    import mltk.export
    import mltk.index

    run, folder = trained_run
    patched, args = {
        "evaluate": ((mltk.evaluate, "evaluate"), ["evaluate", run, "--data", folder, "--workers", "0", "--out"]),
        "index": ((mltk.index, "write_index_dir"), ["index", run, "--data", folder, "--workers", "0", "--out"]),
        "export": ((mltk.export, "export"), ["export", run, "--format", "torchscript", "--out"]),
    }[command]
    monkeypatch.setattr(*patched, _interrupt)
    before = snapshot(tmp_path)
    code, out, err = mltk_main(*args, tmp_path / "out")
    assert code == 130 and out.strip() == ""
    earlier = {"evaluate": "evaluation", "index": "index", "export": "export"}[command]
    assert err.splitlines() == [f"interrupted: nothing was written to {str(tmp_path / 'out')!r} (an earlier {earlier} there is as it was)"]
    assert snapshot(tmp_path) == before


def test_device_auto_works_for_evaluate_index_and_search_as_for_run(trained_run, mltk_main, tmp_path):
    """``--device auto`` (mltk run's default) is the GPU when there is one, else the CPU, for every command."""
    run, folder = trained_run
    code, out, err = mltk_main("evaluate", run, "--data", folder, "--out", tmp_path / "eval", "--workers", "0", "--no-report", "--device", "auto")
    assert code == 0 and (tmp_path / "eval" / "metrics.json").is_file(), err
    code, out, err = mltk_main("index", run, "--data", folder, "--out", tmp_path / "index", "--workers", "0", "--device", "auto")
    assert code == 0, err
    query = sorted(folder.glob("class_00/*.png"))[0]
    code, out, err = mltk_main("search", tmp_path / "index", query, "--k", "1", "--json", "--device", "auto")
    assert code == 0 and json.loads(out)[0]["neighbours"][0]["path"] == str(query.resolve()), err


# ====================================================================================================
# Plugins, data readers and the command line
# ====================================================================================================
# Adversarial input to the plugin registry, the CLI's own output and the data readers (issue 17).
#
# Plugin names, descriptions and errors, CSV fields and image headers are untrusted: they must not
# crash a command, inject rich markup or terminal escapes, reach files outside the data, or blow
# up memory; a mistake on the command line is one ``error:`` line.


# ---------------------------------------------------------------------------------------------
# helpers (prefixed plugins_data_ so that a merged test file has no clashes)


def plugins_data_losses(*entries):
    """A plugin object whose register_losses registers each ``(name, factory, description)`` in turn."""

    class Plugin:
        @mltk.hookimpl
        def register_losses(self, register):
            for name, factory, description in entries:
                register(name, factory, description=description)

    return Plugin()


def plugins_data_builder(num_classes=1, embedding_size=1, **kwargs):
    return "built"


# ---------------------------------------------------------------------------------------------
# 1. names a plugin registers are checked one by one; its other entries stay usable


@pytest.mark.parametrize(
    "bad",
    [42, None, "", "two words", "0.5*ce", "a+b", "[red]x[/red]", "x\x1b[2J", "tab\tname", "9lives", "x" * 101],
    ids=["int", "None", "empty", "space", "star", "plus", "markup", "ansi", "tab", "digit-first", "too-long"],
)
def test_a_bad_plugin_name_is_refused_alone_and_mltk_plugins_still_works(plugin, mltk_main, bad):
    plugin(plugins_data_losses((bad, plugins_data_builder, ""), ("pd_good.loss-1", plugins_data_builder, "")), "pd_names")
    assert "pd_good.loss-1" in registry.list_losses()  # the entry after the bad one is kept
    assert registry.create_loss("pd_good.loss-1", num_classes=2, embedding_size=2) == "built"
    assert "refused" in errors["pd_names"] and errors["pd_names"].startswith("register_losses: loss name ")
    code, out, err = mltk_main("plugins", "--json")
    assert code == 0, err
    row = {r["name"]: r for r in json.loads(out)}["pd_names"]
    assert row["registers"] == {"losses": ["pd_good.loss-1"]} and "refused" in row["error"]
    code, out, err = mltk_main("plugins")
    assert code == 0 and "pd_names" in out and "refused" in out and "\x1b" not in out, err
    code, out, err = mltk_main("list", "losses", "pd_*")
    assert code == 0 and out.split() == ["name", "plugin", "description", "pd_good.loss-1", "pd_names"]
    assert "warning: plugin 'pd_names' failed: register_losses: loss name " in err and "\x1b" not in err


def test_every_name_the_registry_takes_can_be_written_in_a_loss_spec(plugin):
    from mltk.config import parse_loss_spec

    names = ["pd_a", "_pd", "pd.b-2", "pd_" + "x" * 90, "pdé"]
    plugin(plugins_data_losses(*[(n, plugins_data_builder, "") for n in names]), "pd_spec")
    assert set(names) <= set(registry.list_losses()) and "pd_spec" not in errors
    assert [n for _, n in parse_loss_spec("+".join(f"0.5*{n}" for n in names))] == names


def test_a_builder_that_is_not_callable_or_a_description_that_is_not_text_is_refused(plugin, mltk_main):
    plugin(plugins_data_losses(("pd_five", 5, ""), ("pd_desc", plugins_data_builder, ["a", "list"]), ("pd_fine", plugins_data_builder, "ok")), "pd_kinds")
    assert {"pd_five", "pd_desc"}.isdisjoint(registry.list_losses()) and "pd_fine" in registry.list_losses()
    assert "'pd_five' refused: its builder is a int" in errors["pd_kinds"] and "'pd_desc' refused: its description is a list" in errors["pd_kinds"]
    code, out, err = mltk_main("list", "losses", "pd_*")
    assert code == 0 and "pd_fine" in out, err


def test_plugin_text_is_shown_as_text_not_markup_or_escapes(plugin, mltk_main):
    class Loud:
        @mltk.hookimpl
        def register_datasets(self, register):
            register("pd_loud", plugins_data_builder, description="[red]x[/red]\x1b[2J\x07[/bold]")

        @mltk.hookimpl
        def register_miners(self, register):
            raise RuntimeError("[b]boom[/b]\x1b[31m[/nope]")

    plugin(Loud(), "[i]pd_loud[/i]")
    code, out, err = mltk_main("list", "datasets", "pd_*")
    assert code == 0, err
    assert "[red]x[/red]" in out and "[/bold]" in out and "[i]pd_loud[/i]" in out  # printed as written
    assert "\x1b" not in out + err and "\x07" not in out
    code, out, err = mltk_main("list", "miners", "hard")
    assert code == 0 and "warning: plugin '[i]pd_loud[/i]' failed: register_miners: RuntimeError: [b]boom[/b][/nope]\n" in err
    code, out, err = mltk_main("plugins")  # a stray closing tag used to raise rich's MarkupError
    assert code == 0, err
    assert "[b]boom[/b]" in out and "[i]pd_loud[/i]" in out and "\x1b" not in out


# ---------------------------------------------------------------------------------------------
# 2. MLTK_LOAD_PLUGINS naming a plugin that is not installed


def test_load_plugins_naming_an_uninstalled_plugin_is_reported(mltk_cli):
    env = {"MLTK_LOAD_PLUGINS": "pd_not_installed"}
    rows = {row["name"]: row for row in json.loads(mltk_cli("plugins", "--json", env=env).stdout)}
    assert rows["pd_not_installed"]["error"].startswith("not installed")
    listed = mltk_cli("list", "datasets", env=env)
    assert listed.returncode == 0 and "digits" in listed.stdout
    assert listed.stderr.startswith("warning: plugin 'pd_not_installed' failed: not installed")
    rows = json.loads(mltk_cli("plugins", "--json", env={"MLTK_LOAD_PLUGINS": ""}).stdout)  # '' asks for none: nothing is missing
    assert rows and all(row["error"] is None for row in rows)


# ---------------------------------------------------------------------------------------------
# 3. CSV lists: an open quote, paths outside the CSV's folder, bounded lines


def plugins_data_csv(folder: Path, body: str, name: str = "list.csv") -> Path:
    path = folder / name
    path.write_text("path,label\n" + body)
    return path


def test_an_unclosed_quote_names_its_line_and_not_the_file(image_folder):
    from mltk.data import load_data

    rows = "".join(f"class_00/{i % 4}.png,SECRET{i}\n" for i in range(200))
    csv_file = plugins_data_csv(image_folder, f'class_00/0.png,a\n"class_00/1.png,a\n{rows}')
    with pytest.raises(MltkError) as caught:
        load_data(str(csv_file))
    message = str(caught.value)
    assert "line 3: a quoted field runs on to line 203; is a closing quote missing?" in message
    assert "SECRET" not in message and len(message) < 200


def test_an_unclosed_quote_in_a_large_file_stops_at_csv_field_limit(image_folder):
    from mltk.data import load_data

    csv_file = plugins_data_csv(image_folder, '"class_00/1.png,a\n' + "class_00/0.png,SECRET\n" * 20000)
    with pytest.raises(MltkError, match=r"line 2: a quoted field runs on to line \d+; is a closing quote missing\?$") as caught:
        load_data(str(csv_file))
    assert "SECRET" not in str(caught.value)


@pytest.mark.parametrize("rel", ["../outside.png", "class_00/../../outside.png", "ABSOLUTE", ".."])
def test_csv_paths_must_stay_in_the_csv_folder(tmp_path, mltk_main, rel):
    from mltk.data import load_data

    folder = make_image_folder(tmp_path / "data", classes=2, per_class=2)
    (tmp_path / "outside.png").write_bytes((folder / "class_00" / "0.png").read_bytes())
    rel = str(tmp_path / "outside.png") if rel == "ABSOLUTE" else rel
    csv_file = plugins_data_csv(folder, f"class_00/0.png,a\nclass_01/0.png,b\n{rel},a\n")
    with pytest.raises(MltkError, match=r"line 4: the path '.*'(\.\.\.)? leaves the CSV's folder; paths are relative to it"):
        load_data(str(csv_file))
    before = snapshot(tmp_path)
    line = one_line_error(mltk_main("run", "--data", csv_file, "--out", tmp_path / "run", "--backbone", TINY["backbone"], "--epochs", "0"))
    assert "line 4: the path" in line and "leaves the CSV's folder" in line
    assert snapshot(tmp_path) == before


def test_a_link_inside_the_csv_folder_is_followed(tmp_path):
    from mltk.data import load_data

    folder = make_image_folder(tmp_path / "data", classes=2, per_class=2)
    elsewhere = make_image_folder(tmp_path / "elsewhere", classes=1, per_class=1)
    (folder / "linked").symlink_to(elsewhere / "class_00")
    data = load_data(str(plugins_data_csv(folder, "class_00/0.png,a\n./linked/0.png,b\n")))
    assert data.sources[1] == (elsewhere / "class_00" / "0.png").resolve()


@pytest.mark.parametrize(
    "body, message",
    [
        ("class_00/0.png,a\nclass_00/\x00.png,a\n", r"line 3: the path 'class_00/\\x00.png' holds control characters"),
        ("class_00/0.png,a\nclass_00/1.png,b\x1b[31m\n", r"line 3: the label 'b\\x1b\[31m' holds control characters"),
        ("class_00/0.png,a\n" + "x" * 70000 + ",a\n", r"line 3: longer than 65536 bytes; expected path,label lines"),
        ("class_00/0.png,a\n" + "y" * 300 + ".png,a\n", r"line 3: image 'y{60}'\.\.\. cannot be opened \(File name too long\)"),
        ("class_00/0.png,a\n" + "z" * 200 + ".png,a\n", r"line 3: image 'z{60}'\.\.\. does not exist$"),
    ],
    ids=["nul-in-path", "ansi-in-label", "huge-line", "name-too-long", "long-missing-name"],
)
def test_csv_fields_are_bounded_and_quoted_short(image_folder, body, message):
    from mltk.data import load_data

    with pytest.raises(MltkError, match=message) as caught:
        load_data(str(plugins_data_csv(image_folder, body)))
    assert len(str(caught.value)) < 300


def test_a_csv_header_and_bom_and_column_order(image_folder):
    from mltk.data import load_data

    (image_folder / "bom.csv").write_bytes("\ufefflabel,extra,path\nb,1,class_01/0.png\n\na,2,class_00/0.png\n".encode())
    data = load_data(str(image_folder / "bom.csv"))
    assert data.classes == ["a", "b"] and data.labels == [1, 0]
    (image_folder / "empty.csv").write_text("")
    with pytest.raises(MltkError, match="needs a header with the columns path,label"):
        load_data(str(image_folder / "empty.csv"))
    (image_folder / "binary.csv").write_bytes(b"path,label\nclass_00/0.png,a\n\xff\xfe,b\n")
    with pytest.raises(MltkError, match="line 3: not a readable CSV"):
        load_data(str(image_folder / "binary.csv"))


# ---------------------------------------------------------------------------------------------
# 4. images over PIL's pixel limit (a few KB on disk, gigabytes decoded)


@pytest.fixture(scope="module")
def plugins_data_bomb(tmp_path_factory):
    """A 1-bit PNG of 10,000 x 10,000 pixels: 12 KB on disk, over PIL's warning limit, under its error limit."""
    from PIL import Image

    path = tmp_path_factory.mktemp("bomb") / "bomb.png"
    Image.new("1", (10000, 10000)).save(path)
    assert path.stat().st_size < 100_000 and Image.MAX_IMAGE_PIXELS < 10000 * 10000 < 2 * Image.MAX_IMAGE_PIXELS
    return path


def test_an_image_over_pils_limit_is_skipped_by_the_scan_with_a_reason(plugins_data_bomb, image_folder):
    from PIL import Image

    from mltk.data import check_image, drop_unreadable, load_data

    reason = f"too large: 10000 x 10000 pixels, over PIL's limit of {Image.MAX_IMAGE_PIXELS}"
    assert check_image(plugins_data_bomb) == reason
    (image_folder / "class_02" / "huge.png").write_bytes(plugins_data_bomb.read_bytes())
    kept, skipped = drop_unreadable(load_data(str(image_folder)))
    assert skipped == [(image_folder / "class_02" / "huge.png", reason)] and len(kept) == 32


def test_open_image_refuses_a_huge_image_before_decoding_it(plugins_data_bomb, monkeypatch):
    from PIL import Image, ImageFile

    from mltk.data import open_image

    def no_decoding(self):
        raise AssertionError("the huge image was decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    with pytest.raises(Image.DecompressionBombError, match="too large: 10000 x 10000 pixels"):
        open_image(plugins_data_bomb, "RGB")


def test_an_image_over_twice_the_limit_has_the_same_reason(tmp_path, monkeypatch):
    from PIL import Image

    from mltk.data import check_image

    Image.new("L", (50, 50)).save(tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 2,500 pixels: PIL refuses it while opening
    assert check_image(tmp_path / "big.png") == "too large: 2500 pixels, over PIL's limit of 1000"
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # the limit turned off: mltk follows
    assert check_image(tmp_path / "big.png") is None


def test_pils_raw_warning_is_not_printed(plugins_data_bomb):
    code = (
        "import sys; from mltk.data import check_image, open_image\n"
        f"print(check_image({str(plugins_data_bomb)!r}))\n"
        "try:\n"
        f"    open_image({str(plugins_data_bomb)!r}, 'RGB')\n"
        "except Exception as exc:\n"
        "    print(type(exc).__name__)\n"
    )
    result = subprocess.run([sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert result.stdout.splitlines()[1] == "DecompressionBombError"


# ---------------------------------------------------------------------------------------------
# 5. mistakes on the command line: one line, exit 2


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--dim", "abc"], "error: Invalid value for '--dim': "),
        (["evaluate", "--index", "bogus"], "error: Invalid value for '--index': "),
        (["list"], "error: Missing argument 'kind'. Choose from: backbones, losses, miners, metrics, datasets, loggers, rerankers; see `mltk list --help`"),
        (["plugins", "--nope"], "error: No such option: --nope; see `mltk plugins --help`"),
        (["no-such-command"], "error: No such command 'no-such-command'; see `mltk --help`"),
        (["list", "losses", "a", "b"], "error: Got unexpected extra argument"),
    ],
    ids=["bad-int", "bad-choice", "missing-argument", "unknown-option", "unknown-command", "extra-argument"],
)
def test_command_line_mistakes_are_one_line(mltk_main, tmp_path, args, message):
    before = snapshot(tmp_path)
    line = one_line_error(mltk_main(*args), code=2)
    assert line.startswith(message), line
    assert snapshot(tmp_path) == before


def test_help_still_shows_help(mltk_main):
    code, out, err = mltk_main("--help")
    assert code == 0 and "Usage" in out and "plugins" in out and err == ""
    code, out, err = mltk_main("list", "--help")
    assert code == 0 and "fnmatch pattern" in out
    code, out, err = mltk_main()  # no arguments: the help, and a usage exit code
    assert code == 2 and "Usage" in out and "Commands" in out


def test_help_still_does_not_import_torch():
    code = "import sys; from mltk.cli import main; sys.argv = ['mltk', '--help']\ntry:\n    main()\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "False", result.stderr


# ---------------------------------------------------------------------------------------------
# 6. other text from files, folders and users that the CLI prints


def test_an_error_with_newlines_and_escapes_is_still_one_plain_line(mltk_main, monkeypatch):
    import typer

    import mltk.cli

    fake = typer.Typer(add_completion=False)

    @fake.command()
    def explode() -> None:
        raise MltkError("first line\nsecond \x1b[31mred\x1b[0m line\r")

    @fake.command()
    def other() -> None:
        pass

    monkeypatch.setattr(mltk.cli, "app", fake)
    line = one_line_error(mltk_main("explode"), code=1)
    assert line == "error: first line second red line"


def test_a_run_directory_with_markup_is_printed_as_it_is(capsys):
    from mltk.cli.run import render_summary

    result = SimpleNamespace(train_images=4, train_classes=2, val_images=0, in_memory=0, history=[], best=None, stopped="", run_dir=Path("runs/[red]x[/red]\x1b[2J"))
    render_summary(result)
    out = capsys.readouterr().out
    assert "runs/[red]x[/red]" in out and "\x1b" not in out


def test_a_plugins_reason_to_stop_is_printed_as_it_is(capsys, tmp_path):
    from mltk.cli.run import render_summary

    reason = "[bold]plateau[/bold]\x1b[2J"  # what a plugin's epoch_ended returned
    render_summary(SimpleNamespace(train_images=4, train_classes=2, val_images=0, in_memory=0, history=[], best=None, stopped=reason, run_dir=tmp_path))
    out = capsys.readouterr().out
    assert "[bold]plateau[/bold]" in out and "\x1b" not in out


@pytest.mark.parametrize("pattern", ["[red]*", "[/red]", "*[/]*", "arc\x1b[2J*"])
def test_list_with_a_markup_pattern(mltk_main, plugin, pattern):
    plugin(plugins_data_losses(("pd_plain", plugins_data_builder, "[red]x[/red]")), "pd_pattern")
    code, out, err = mltk_main("list", "losses", pattern)
    assert code == 0 and err == "" and "\x1b" not in out
    code, out, err = mltk_main("list", "losses", "pd_plain")
    assert code == 0 and "[red]x[/red]" in out


def test_warnings_are_plain_one_liners(capsys):
    from mltk.cli import warn

    warn("class \x1b[31mred\x1b[0m\nnext [bold]x[/bold]")
    assert capsys.readouterr().err == "warning: class red next [bold]x[/bold]\n"
