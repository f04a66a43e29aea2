"""Reliability: bad input is one line, a crash costs at most the epoch in progress, untrusted files are
refused, the same seed gives the same numbers. docs/reliability.md lists each case tested here."""

import ast
import json
import os
import pickle
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
from conftest import REPO, make_image_folder, run_mltk
from mltk.config import make_config
from mltk.data import load_data
from mltk.errors import Interrupted, MltkError
from mltk.evaluate import evaluate, untrained_model
from mltk.model import CHECKPOINT_FORMAT, Embedder, load_checkpoint, read_state_dict, save_checkpoint
from mltk.registry import create_backbone
from mltk.train import WeightedLosses, train

TINY = dict(backbone="test_resnet", image_size=32, dim=16, batch_size=8, m_per_class=2, workers=0, epochs=2, seed=3)
TINY_ARGS = ["--backbone", "test_resnet", "--image-size", "32", "--dim", "16", "--batch-size", "8", "--m-per-class", "2", "--workers", "0"]


def tiny_config(data, **overrides):
    return make_config({**TINY, "data": str(data), **overrides})


# --- 1. Bad input: one line naming the problem and what to do, a non-zero exit code, nothing written -----------


def not_an_image(path: Path) -> Path:
    path.write_text("this is not an image")
    return path


def csv_file(tmp_path: Path, text: str) -> str:
    make_image_folder(tmp_path / "images", classes=2, per_class=2)
    (tmp_path / "images" / "list.csv").write_text(text)
    return str(tmp_path / "images" / "list.csv")


def empty_folder(tmp_path: Path) -> str:
    (tmp_path / "empty").mkdir()
    return str(tmp_path / "empty")


def unreadable_folder(tmp_path: Path) -> str:
    for c in range(2):
        (tmp_path / "bad" / f"c{c}").mkdir(parents=True)
        not_an_image(tmp_path / "bad" / f"c{c}" / "0.jpg")
    return str(tmp_path / "bad")


BAD_DATA = {
    "missing folder": (lambda t: ["--data", f"{t}/nowhere/"], 1, "data '{t}/nowhere/' does not exist; give a folder of <class>/<image>, a .csv file or a dataset name"),
    "empty folder": (lambda t: ["--data", empty_folder(t)], 1, "no images found in '{t}/empty'; expected <class>/<image> folders"),
    "CSV without the columns": (lambda t: ["--data", csv_file(t, "file,label\nclass_00/0.png,a\n")], 1, "needs a header with the columns path,label"),
    "CSV naming a missing image": (lambda t: ["--data", csv_file(t, "path,label\nclass_00/0.png,a\nnope.png,a\n")], 1, "line 3: image 'nope.png' does not exist"),
    "too few classes for a batch": (lambda t: ["--data", str(make_image_folder(t / "two", classes=2))], 1, "needs 4 classes with 2+ images; the data has 2: lower --batch-size or raise --m-per-class"),
    "no readable image": (lambda t: ["--data", unreadable_folder(t)], 1, "none of the 2 images of 'bad' can be read: {t}/bad/c0/0.jpg (not an image), {t}/bad/c1/0.jpg (not an image)"),
    "unknown dataset": (lambda t: ["--data", "digit"], 2, "unknown dataset 'digit'; did you mean 'digits'?"),
}


@pytest.mark.parametrize("case", BAD_DATA)
def test_bad_data_is_one_line_and_no_run_directory(case, mltk_main, tmp_path):
    args, code, message = BAD_DATA[case]
    exit_code, out, err = mltk_main("run", *TINY_ARGS, "--epochs", "1", "--out", tmp_path / "run", *args(tmp_path))
    assert exit_code == code and out.strip() == ""
    assert err.startswith("error: ") and message.format(t=tmp_path) in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_config_value_of_the_wrong_type_is_named(mltk_main, tmp_path):
    (tmp_path / "c.yaml").write_text("epochs: ten\n")
    code, _, err = mltk_main("run", "--config", tmp_path / "c.yaml", "--out", tmp_path / "run")
    assert (code, err) == (2, f"error: epochs in {tmp_path / 'c.yaml'} must be int, got 'ten'\n")
    assert not (tmp_path / "run").exists()


def test_unknown_metric_is_one_line_with_a_suggestion(mltk_main, image_folder, tmp_path):
    code, out, err = mltk_main("evaluate", "--backbone", "test_resnet", "--image-size", "32", "--data", image_folder, "--workers", "0", "--metrics", "roc_auc,recal_at_k", "--out", tmp_path / "e")
    assert (code, out.strip(), err) == (2, "", "error: unknown metric 'recal_at_k'; did you mean 'recall_at_k' or 'precision_at_k'?\n")
    assert not (tmp_path / "e").exists()


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


def test_pairs_naming_an_unreadable_image_are_left_out(tmp_path):
    folder = make_image_folder(tmp_path / "images", classes=4, per_class=3)
    bad = not_an_image(folder / "class_01" / "0.png")
    (tmp_path / "pairs.csv").write_text("class_00/0.png,class_00/1.png,1\nclass_01/0.png,class_01/1.png,1\nclass_02/0.png,class_03/0.png,0\n")
    model = untrained_model("test_resnet", image_size=32, device="cpu")
    result = evaluate(model, pairs_file=tmp_path / "pairs.csv", pairs_root=folder, workers=0, metrics=["roc_auc"])
    assert result.values["pairs"] == 2 and result.skipped == [(bad, "not an image")]
    result = evaluate(model, data=load_data(str(folder)), workers=0, metrics=["recall_at_k"])
    assert result.values["queries"] == 11 and result.skipped == [(bad, "not an image")]


def test_an_image_that_fails_while_embedding_is_an_error_not_a_stand_in(image_folder, monkeypatch):
    monkeypatch.setattr("mltk.evaluate.readable", lambda data, skipped: data)  # passes the scan, fails when embedded
    bad = not_an_image(image_folder / "class_01" / "2.png")
    model = untrained_model("test_resnet", image_size=32, device="cpu")
    with pytest.raises(MltkError, match=f"1 images could not be read while embedding: {bad}"):
        evaluate(model, data=load_data(str(image_folder)), workers=0)


# --- Out of memory: say which setting to lower ---------------------------------------------------------------------


def cpu_allocator_fails(self, x):  # the CPU allocator's real failure, as on a machine out of memory
    return torch.empty(2**62, dtype=torch.uint8)


def cuda_allocator_fails(self, x):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a total capacity of 79.10 GiB")


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


# --- 2. Crashes: NaN, Ctrl-C, kill -9, a kill during a save ---------------------------------------------------------


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


SLOW_SAVE = """
import io, sys, time, torch
from mltk.model import save_checkpoint

path = sys.argv[1]
save_checkpoint({"version": 1, "w": torch.ones(100_000)}, path)
real_save = torch.save

def slow_save(obj, f):  # torch.save, written 4 KiB at a time, so that the kill lands mid-write
    buffer = io.BytesIO()
    real_save(obj, buffer)
    data = buffer.getvalue()
    for i in range(0, len(data), 4096):
        f.write(data[i : i + 4096])
        f.flush()
        if i == 4 * 4096:
            print("writing", flush=True)
        time.sleep(0.005)

torch.save = slow_save
save_checkpoint({"version": 2, "w": torch.full((100_000,), 2.0)}, path)
print("saved", flush=True)
"""


def test_a_kill_during_a_save_leaves_the_previous_checkpoint_intact(tmp_path):
    path = tmp_path / "last.pt"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SAVE, str(path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "writing\n"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = torch.load(path, weights_only=True)  # a stand-in payload, not a whole checkpoint: read as it is
    assert state["version"] == 1 and torch.equal(state["w"], torch.ones(100_000))
    (partial,) = [p for p in tmp_path.iterdir() if p != path]  # the half-written file, under another name
    assert partial.name.startswith(".last.pt.tmp-")
    with pytest.raises(MltkError, match="is not a checkpoint torch can read"):
        load_checkpoint(partial)


# --- 3. Untrusted files: weights_only=True everywhere, nothing evaluated ----------------------------------------------


class Exploit:
    """Unpickling this runs ``touch MARKER``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("form", ["torch zip", "torch legacy", "bare pickle"])
def test_a_pickle_that_would_run_code_is_refused(form, tmp_path, mltk_main):
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pt"
    payload = {"format": CHECKPOINT_FORMAT, "model": {"w": Exploit(marker)}}
    if form == "bare pickle":
        evil.write_bytes(pickle.dumps(payload))
        pickle.loads(evil.read_bytes())  # the payload is live: an unsafe load runs it
    else:
        torch.save(payload, evil, _use_new_zipfile_serialization=form == "torch zip")
        torch.load(evil, weights_only=False)
    assert marker.exists()
    marker.unlink()
    refused = r"refused to load '.*evil.pt': it holds more than tensors and plain values, and unpickling it could run code \((.*GLOBAL .*system|Unsupported operand).*\); mltk reads"
    for load in (load_checkpoint, mltk.load, read_state_dict, lambda p: create_backbone("test_resnet", weights=str(p))):
        with pytest.raises(MltkError, match=refused):
            load(evil)
    code, _, err = mltk_main("evaluate", "--backbone", "resnet18", "--weights", evil, "--data", "digits", "--out", tmp_path / "e")
    assert code == 1 and len(err.splitlines()) == 1 and "refused to load" in err
    assert not marker.exists() and not (tmp_path / "e").exists()


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


def test_files_that_are_not_checkpoints_are_named(image_folder, tmp_path):
    (tmp_path / "notes.pt").write_text("hello")
    with pytest.raises(MltkError, match=r"notes.pt' is not a checkpoint torch can read"):
        mltk.load(tmp_path / "notes.pt")
    torch.save(create_backbone("test_resnet").state_dict(), tmp_path / "weights.pt")
    with pytest.raises(MltkError, match=r"weights.pt' is not an mltk checkpoint \(a weights file goes to --weights\)$"):
        mltk.load(tmp_path / "weights.pt")


def test_weights_of_another_architecture_name_the_keys(tmp_path):
    torch.save(create_backbone("resnet18").state_dict(), tmp_path / "resnet18.pt")
    with pytest.raises(MltkError, match=r"resnet18.pt' does not fit backbone 'test_resnet': missing .* \(\d+\); unexpected .* \(\d+\)$"):
        create_backbone("test_resnet", weights=str(tmp_path / "resnet18.pt"))
    torch.save(create_backbone("test_resnet", in_chans=1).state_dict(), tmp_path / "grey.pt")
    with pytest.raises(MltkError, match=r"grey.pt' does not fit backbone 'test_resnet': .*conv1.*"):
        create_backbone("test_resnet", weights=str(tmp_path / "grey.pt"))


FORBIDDEN_CALLS = {"eval", "exec", "compile", "__import__", "pickle.load", "pickle.loads", "yaml.load", "yaml.unsafe_load", "yaml.full_load", "marshal.loads"}


def test_nothing_runs_code_from_strings_or_pickles():
    """No eval/exec, no pickle or unsafe YAML; every torch.load passes weights_only=True, no np.load allows pickles."""
    sources = [*(REPO / "mltk").rglob("*.py"), *(p for p in (REPO / "plugins").rglob("*.py") if "build" not in p.parts)]
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Call):
                name = ast.unparse(node.func)
                keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
                assert name not in FORBIDDEN_CALLS, where
                assert name != "torch.load" or keywords.get("weights_only") == "True", where
                assert keywords.get("allow_pickle") != "True", where
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                assert not {"pickle", "dill", "marshal", "cloudpickle"} & {m.split(".")[0] for m in modules}, where
    assert len(sources) > 20


# --- 5. Determinism -----------------------------------------------------------------------------------------------------


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
