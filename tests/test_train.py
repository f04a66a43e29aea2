"""The training loop (mltk/train.py): the loader's workers, float16's loss scale, and the schedule's steps; out of memory,
a full disk, a NaN loss, Ctrl-C and kill -9 are one line and cost at most the epoch in progress; unreadable images
are skipped and reported; a resumed run follows its schedule; the same seed gives the same numbers."""

import errno
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

import mltk
from conftest import (
    RUN_ARGS, TINY, TINY_ARGS, cpu_allocator_fails, cuda_allocator_fails, make_image_folder, not_an_image, one_line_error, run_config,
    run_mltk, tiny_config,
)
from mltk.checkpoint import load_checkpoint
from mltk.data import load_data
from mltk.errors import Interrupted, MltkError
from mltk.evaluate import evaluate, untrained_model
from mltk.model import Embedder
from mltk.train import WeightedLosses, train


class Noise(torch.utils.data.Dataset):
    """Each item: a random number drawn in the process that reads it (as an augmentation would), and that process."""

    decoded = None  # read from disk: the loader may use worker processes

    def __len__(self):
        return 16

    def __getitem__(self, i):
        return torch.rand(()), os.getpid(), torch.tensor(-1)


def test_loader_workers_start_once_and_each_epoch_draws_as_a_fresh_loader_did():
    """The workers are forked once for the whole run, not once per epoch; each epoch's augmentation is still seeded by
    (seed, epoch, rank), drawing exactly what a DataLoader made anew for that epoch drew."""
    from mltk.config import make_config
    from mltk.data import MPerClassSampler
    from mltk.distributed import World
    from mltk.train import train_loader

    cfg = make_config({**TINY, "workers": 2, "seed": 5})
    sampler = MPerClassSampler([i // 4 for i in range(16)], m=2, batch_size=4, seed=5)
    loader = train_loader(Noise(), sampler, cfg, torch.device("cpu"), World())
    pids, draws = set(), []
    for epoch in range(3):
        sampler.set_epoch(epoch)
        batches = list(loader)
        pids.update(pid for _, batch_pids, _ in batches for pid in batch_pids.tolist())
        draws.append(torch.cat([values for values, _, _ in batches]))
        fresh = torch.utils.data.DataLoader(  # how each epoch's loader was made before: its own workers, seeded so
            Noise(), batch_sampler=sampler, num_workers=2, generator=torch.Generator().manual_seed(5 * 1000 + epoch)
        )
        assert torch.equal(draws[-1], torch.cat([values for values, _, _ in fresh]))
    assert len(pids) == 2 and os.getpid() not in pids  # two workers, the same ones in all three epochs
    assert not torch.equal(draws[0], draws[1])  # each epoch its own augmentation


def test_runs_with_workers_and_one_seed_match(tmp_path):
    """Two runs with worker processes, augmentation and one seed give the same losses, epoch after epoch."""
    from mltk.config import make_config
    from mltk.train import train

    folder = make_image_folder(tmp_path / "images", classes=6, per_class=4)
    cfg = {**TINY, "data": str(folder), "workers": 2, "in_memory": False, "augment": True, "epochs": 2}
    first, second = (train(make_config(cfg), tmp_path / name).history for name in ("a", "b"))
    assert [r["loss"] for r in first] == [r["loss"] for r in second]
    assert first[0]["loss"] != first[1]["loss"]


def scaled_step(scaler, weight, factor: float) -> bool:
    """One step of SGD on float16 arithmetic whose gradient is ``factor`` before scaling; whether it was taken."""
    from mltk.train import optimizer_step

    optimizer = torch.optim.SGD([weight], lr=0.1)
    weight.grad = None
    loss = (weight.half() * torch.ones(4, dtype=torch.half)).sum().float() * factor
    scaler.scale(loss).backward()
    return optimizer_step(scaler, optimizer)


def test_fp16_scale_starts_low_enough_for_a_loss_in_the_tens():
    """A gradient of 50 (ArcFace's losses run in the tens) overflows float16 at torch's default first scale, 2**16, so
    its first step would be skipped; mltk's first scale takes it."""
    from mltk.train import FP16_INIT_SCALE

    weight = torch.nn.Parameter(torch.ones(4))
    assert scaled_step(torch.amp.GradScaler("cpu"), weight, 50.0) is False
    assert torch.equal(weight.detach(), torch.ones(4))  # skipped
    assert scaled_step(torch.amp.GradScaler("cpu", init_scale=FP16_INIT_SCALE), weight, 50.0) is True
    assert not torch.equal(weight.detach(), torch.ones(4))


def test_mixed_precision_makes_its_scaler_with_the_low_first_scale(monkeypatch):
    from mltk import train as train_module
    from mltk.config import make_config

    made = []
    monkeypatch.setattr(torch.amp, "GradScaler", lambda *args, **kwargs: made.append(kwargs))
    train_module.mixed_precision(make_config({**TINY, "amp": True}), torch.device("cpu"))
    assert made == [{"init_scale": train_module.FP16_INIT_SCALE, "enabled": False}]  # the CPU's autocast is bf16


def test_optimizer_step_says_whether_the_scaler_skipped_it():
    from mltk.train import FP16_INIT_SCALE

    scaler, weight = torch.amp.GradScaler("cpu", init_scale=FP16_INIT_SCALE), torch.nn.Parameter(torch.ones(4))
    assert scaled_step(scaler, weight, float("inf")) is False and scaler.get_scale() == FP16_INIT_SCALE / 2
    assert scaled_step(scaler, weight, 1.0) is True
    assert scaled_step(torch.amp.GradScaler("cpu", enabled=False), weight, 1.0) is True  # no float16: every step counts


def test_the_schedule_advances_only_on_the_steps_taken(tmp_path, monkeypatch):
    """A step the scaler skips (float16 gradients that overflowed) does not move the learning-rate schedule on."""
    from mltk import train as train_module
    from mltk.config import make_config

    real, taken = train_module.optimizer_step, []

    def first_skipped(scaler, optimizer):
        real(scaler, optimizer)
        taken.append(len(taken) > 0)  # as though the first step's gradients had overflowed
        return taken[-1]

    monkeypatch.setattr(train_module, "optimizer_step", first_skipped)
    folder = make_image_folder(tmp_path / "images", classes=6, per_class=4)
    train_module.train(make_config({**TINY, "data": str(folder)}), tmp_path / "run")
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=True, map_location="cpu")
    assert len(taken) == 3 and state["scheduler"]["last_epoch"] == len(taken) - 1


# --- building the model, losses and optimiser is inside the out-of-memory handling


@pytest.mark.parametrize("part", ["build_embedder", "build_losses"])
@pytest.mark.parametrize("fails", [cpu_allocator_fails, cuda_allocator_fails], ids=["cpu", "cuda"])
def test_no_memory_for_the_model_or_losses_is_one_line_naming_what_to_lower(part, fails, image_folder, mltk_main, tmp_path, monkeypatch):
    monkeypatch.setattr(f"mltk.train.{part}", fails)
    line = one_line_error(mltk_main("run", *RUN_ARGS, "--epochs", "1", "--data", image_folder, "--out", tmp_path / "run"), code=1)
    assert line.startswith("error: out of memory (")
    assert line.endswith("): lower --dim (now 16) or take a smaller --backbone (now 'test_resnet'); nothing was written")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("forward, what", [(cpu_allocator_fails, "DefaultCPUAllocator: can't allocate memory"), (cuda_allocator_fails, "CUDA out of memory")])
def test_running_out_of_memory_says_which_settings_to_lower(forward, what, image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(Embedder, "forward", forward)
    with pytest.raises(MltkError, match=rf"^out of memory \(.*{what}.*\): lower --batch-size \(now 8\), --image-size \(now 32\) or --dim \(now 16\), or turn on --amp; last.pt keeps epoch 0$"):
        train(tiny_config(image_folder, amp=False), tmp_path / "run")
    model = untrained_model("test_resnet", image_size=32, device="cpu")
    with pytest.raises(MltkError, match=rf"^out of memory \(.*{what}.*\): lower --batch-size \(now 128\)$"):
        evaluate(model, data=load_data(str(image_folder)), workers=0)


def test_other_runtime_errors_are_not_dressed_up(image_folder, tmp_path, monkeypatch):
    def broken(self, x):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(Embedder, "forward", broken)
    with pytest.raises(RuntimeError, match="mat1 and mat2") as raised:
        train(tiny_config(image_folder), tmp_path / "run")
    assert not isinstance(raised.value, MltkError)  # a bug keeps its traceback


# --- a resumed run follows its schedule; a full disk while saving a checkpoint is one line


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


# --- unreadable images and data that goes away


def test_run_warns_about_unreadable_images_and_single_image_classes(mltk_main, image_folder, tmp_path):
    bad = not_an_image(image_folder / "class_02" / "3.png")
    (image_folder / "lonely").mkdir()
    (image_folder / "lonely" / "0.png").write_bytes((image_folder / "class_00" / "0.png").read_bytes())
    code, _, err = mltk_main("run", *TINY_ARGS, "--epochs", "1", "--data", image_folder, "--out", tmp_path / "run")
    assert code == 0, err
    assert err.splitlines() == [
        f"warning: 1 of 33 images of 'images' cannot be read and are left out: {bad} (not an image)",
        "warning: classes with a single image have no positive pair and are left out of the batches: lonely (1 of 9)",
    ]
    assert (tmp_path / "run" / "skipped_images.txt").read_text() == f"{bad}\tnot an image\n"


def test_an_image_that_breaks_mid_run_is_skipped_and_reported_once(image_folder, tmp_path, monkeypatch):
    monkeypatch.setattr("mltk.train.drop_unreadable", lambda data: (data, []))  # as if it broke after the scan
    bad = not_an_image(image_folder / "class_05" / "1.png")
    warnings = []
    result = train(tiny_config(image_folder, epochs=2), tmp_path / "run", on_warning=warnings.append)
    assert [r["epoch"] for r in result.history] == [1, 2]  # every epoch used it; another image of class_05 stood in
    assert warnings == [f"epoch 1: 1 images failed to decode and were skipped: {bad} (not an image)"]
    assert (tmp_path / "run" / "skipped_images.txt").read_text() == f"{bad}\tnot an image\n"


def test_data_that_goes_away_mid_run_stops_with_a_clear_error(tmp_path):
    import shutil

    folder = make_image_folder(tmp_path / "images")
    with pytest.raises(MltkError, match=r"no image of batch 1 in epoch 2 can be read \(.*\.png: .*No such file.*\); is the data still there\? last.pt keeps epoch 1$"):
        train(tiny_config(folder, epochs=3, in_memory=False), tmp_path / "run", on_epoch=lambda record: shutil.rmtree(folder))
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1


# --- crashes: NaN, Ctrl-C, kill -9


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(image_folder, tmp_path, monkeypatch):
    poisoned, forward = [], WeightedLosses.forward

    def loss(self, *args):
        total, parts = forward(self, *args)
        return (total * float("nan") if poisoned else total), parts

    monkeypatch.setattr(WeightedLosses, "forward", loss)
    with pytest.raises(MltkError, match=r"the loss became nan at epoch 2, step 1; last.pt keeps epoch 1, the last good one: lower --lr"):
        train(tiny_config(image_folder, epochs=3), tmp_path / "run", on_epoch=lambda record: poisoned.append(True))
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == load_checkpoint(tmp_path / "run" / "best.pt")["epoch"] == 1
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1


def test_ctrl_c_keeps_the_last_epoch_and_resume_equals_an_uninterrupted_run(image_folder, tmp_path):
    cfg = tiny_config(image_folder, epochs=3, augment=True, loss="0.1*center+arcface")
    train(cfg, tmp_path / "straight")

    def ctrl_c(epoch, step, steps, logs):
        if (epoch, step) == (1, 2):
            raise KeyboardInterrupt

    run = tmp_path / "run"
    with pytest.raises(Interrupted, match=rf"^interrupted in epoch 2; last.pt keeps epoch 1: `mltk run --out {run} --resume` goes on from there \(epoch 2 starts over\)$") as raised:
        train(cfg, run, on_step=ctrl_c)
    assert isinstance(raised.value, KeyboardInterrupt) and load_checkpoint(run / "last.pt")["epoch"] == 1
    (run / ".last.pt.tmp-99999").write_bytes(b"half a checkpoint")  # what a save cut short by kill -9 leaves
    train(cfg, run, resume=True)
    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(run / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])  # the partial epoch left no trace
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert not list(run.glob(".*tmp*"))


def start_run(folder: Path, run: Path, epochs: int) -> subprocess.Popen:
    args = [sys.executable, "-m", "mltk", "run", *TINY_ARGS, "--data", str(folder), "--epochs", str(epochs), "--out", str(run)]
    as_from_a_terminal = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731  (the suite itself may run under nohup)
    return subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=as_from_a_terminal)


def wait_for_epoch(run: Path, epoch: int, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (run / "last.pt").is_file() and load_checkpoint(run / "last.pt")["epoch"] >= epoch:
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    proc.kill()
    pytest.fail(f"no checkpoint of epoch {epoch} within {timeout} s")


def test_kill_9_then_resume_finishes_every_epoch(tmp_path):
    folder, run = make_image_folder(tmp_path / "images", per_class=8), tmp_path / "run"
    proc = start_run(folder, run, epochs=8)
    wait_for_epoch(run, 1, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and load_checkpoint(run / "last.pt")["epoch"] < 8  # cut short
    resumed = run_mltk("run", "--out", str(run), "--resume", timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == list(range(1, 9))
    assert load_checkpoint(run / "last.pt")["epoch"] == 8 and not list(run.glob(".*tmp*"))


def test_ctrl_c_from_the_terminal_exits_130_and_says_how_to_resume(tmp_path):
    run = tmp_path / "run"
    proc = start_run(make_image_folder(tmp_path / "images", per_class=8), run, epochs=50)
    wait_for_epoch(run, 1, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert len(err.splitlines()) == 1 and err.startswith("interrupted in epoch ") and f"`mltk run --out {run} --resume`" in err
    assert load_checkpoint(run / "last.pt")["epoch"] >= 1 and not list(run.glob(".*tmp*"))


def test_a_ctrl_c_python_drops_in_a_finalizer_still_stops_the_run(tmp_path):
    """A KeyboardInterrupt raised inside __del__ is printed and dropped by Python; the run must stop all the same."""

    class PressesCtrlC:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)  # the handler runs in here, so its KeyboardInterrupt is dropped

    def on_step(epoch, step, steps, logs):
        if epoch == 1 and step == 1:
            PressesCtrlC()  # dropped at once: its finalizer runs now

    as_from_a_terminal = signal.signal(signal.SIGINT, signal.default_int_handler)  # the suite may run with SIGINT ignored (nohup)
    try:
        with pytest.raises(Interrupted, match=r"^interrupted in epoch 2; last.pt keeps epoch 1"):
            train(tiny_config(make_image_folder(tmp_path / "images", per_class=8), epochs=6), tmp_path / "run", on_step=on_step)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the run's own handler is gone
    finally:
        signal.signal(signal.SIGINT, as_from_a_terminal)
    assert load_checkpoint(tmp_path / "run" / "last.pt")["epoch"] == 1


def test_a_run_started_with_sigint_ignored_keeps_ignoring_it(tmp_path):
    """nohup, or a background job of a script: the caller asked for SIGINT to be ignored, and the run must not undo that."""

    def on_step(epoch, step, steps, logs):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)

    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        result = train(tiny_config(make_image_folder(tmp_path / "images", per_class=8), epochs=2), tmp_path / "run", on_step=on_step)
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, before)
    assert [r["epoch"] for r in result.history] == [1, 2]


# --- determinism


def test_same_seed_and_data_give_the_same_numbers(image_folder, tmp_path):
    cfg = tiny_config(image_folder, augment=True, workers=2, val_data=str(image_folder), loss="0.1*center+ce+arcface")
    timing = ("images_per_s", "seconds")

    def run(name: str, seed: int) -> tuple[list[dict], dict]:
        train(replace(cfg, seed=seed), tmp_path / name)
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        values = evaluate(mltk.load(tmp_path / name, device="cpu"), data=load_data(str(image_folder)), workers=0).values
        return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in lines], values

    first, again, other = run("a", 3), run("b", 3), run("c", 4)
    assert first == again
    assert first[0] != other[0]  # the comparison can tell runs apart
    assert yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())["workers"] == 2
