"""The checkpoint (mltk.checkpoint): every field is checked on load, the file is written whole, best.pt leaves the
optimiser's state to last.pt, and a file that would run code when unpickled is refused. docs/reliability.md lists the
cases."""

import os
import pickle
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mltk
from conftest import evaluate_args, one_line_error, snapshot
from mltk.checkpoint import CHECKPOINT_FORMAT, load_checkpoint
from mltk.errors import MltkError
from mltk.model import read_state_dict
from mltk.registry import create_backbone


# --- every field of a checkpoint is checked on load


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
    "data_config not a mapping": (_put("data_config", [3, 32, 32]), r"data_config must be a mapping of options, got \[3, 32, 32\]"),
    "negative input_size": (_data_config(input_size=(3, -5, 32)), r"data_config\['input_size'\] must be \[channels, height, width\].*got \(3, -5, 32\)"),
    "huge input_size": (_data_config(input_size=(3, 100000, 100000)), r"data_config\['input_size'\] must be .*sides 1 to 4096"),
    "2 channels": (_data_config(input_size=(2, 32, 32), mean=(0.5, 0.5), std=(0.5, 0.5)), r"data_config\['input_size'\] must be .*1 or 3 channels"),
    "unknown interpolation": (_data_config(interpolation="cubic"), r"data_config\['interpolation'\] must be one of 'nearest', 'bilinear', 'bicubic', 'box', 'hamming', 'lanczos', got 'cubic'"),
    "short mean": (_data_config(mean=(0.5, 0.5)), r"data_config\['mean'\] must be 3 numbers, one per channel, got \[0.5, 0.5\]"),
    "nan std": (_data_config(std=(0.5, float("nan"), 0.5)), r"data_config\['std'\]\[1\] must be a number above 0, got nan"),
    "zero std": (_data_config(std=(0.5, 0.0, 0.5)), r"data_config\['std'\]\[1\] must be a number above 0, got 0.0"),
    "text mean": (_data_config(mean="0.5"), r"data_config\['mean'\] must be finite numbers, one per channel, got '0.5'"),
    "crop_pct 0": (_data_config(crop_pct=0), r"data_config\['crop_pct'\] must be a number in \(0, 1\], got 0"),
    "unknown crop_mode": (_data_config(crop_mode="zoom"), r"data_config\['crop_mode'\] must be one of 'center', 'squash', 'border', got 'zoom'"),
    "unknown data_config key": (_data_config(is_training=True), r"unknown key 'is_training' in data_config"),
    "classes not names": (_put("classes", [1, 2]), r"classes must be a list of class names or null, got \[1, 2\]"),
    "model not tensors": (_put("model", {"neck.0.weight": [1.0]}), r"model must be a state dict \(names to tensors\)"),
    "negative epoch": (_put("epoch", -1), r"epoch must be a whole number >= 0, got -1"),
    "best without a score": (_put("best", {"epoch": 1}), r"best must be \{\} or \{epoch, score, by\}, got \{'epoch': 1\}"),
    "no losses": (_drop("losses"), r"lacks the field losses"),
    "config not a mapping": (_put("config", None), r"config must be a mapping"),
    "backbone_kwargs mltk sets": (_config(backbone_kwargs={"num_classes": 5}), r"backbone_kwargs\['num_classes'\].*mltk sets 'num_classes' itself"),
    "unknown backbone": (_config(backbone="no_such_net"), r"unknown backbone 'no_such_net'"),
}


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


def test_a_checkpoint_passes_on_only_the_fields_it_knows(evaluate_checkpoint, tmp_path):
    from mltk.checkpoint import load_checkpoint, save_checkpoint

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
    from mltk.checkpoint import load_checkpoint

    best, last = trained_run[0] / "best.pt", trained_run[0] / "last.pt"
    assert not {"optimizer", "scheduler", "scaler"} & set(torch.load(best, weights_only=True))
    assert {"optimizer", "scheduler", "scaler"} <= set(load_checkpoint(last, run=True))
    assert best.stat().st_size < last.stat().st_size
    with pytest.raises(MltkError, match=r"best.pt' lacks the fields optimizer, scheduler, scaler"):
        load_checkpoint(best, run=True)  # resuming reads last.pt


def test_files_that_are_not_checkpoints_are_named(image_folder, tmp_path):
    (tmp_path / "notes.pt").write_text("hello")
    with pytest.raises(MltkError, match=r"notes.pt' is not a checkpoint torch can read"):
        mltk.load(tmp_path / "notes.pt")
    torch.save(create_backbone("test_resnet").state_dict(), tmp_path / "weights.pt")
    with pytest.raises(MltkError, match=r"weights.pt' is not an mltk checkpoint \(a weights file goes to --weights\)$"):
        mltk.load(tmp_path / "weights.pt")


# --- a checkpoint is written whole


SLOW_SAVE = """
import io, sys, time, torch
from mltk.checkpoint import save_checkpoint

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


# --- untrusted files: weights_only=True everywhere, nothing evaluated


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


def test_a_save_that_fails_leaves_the_earlier_checkpoint_and_no_temporary(tmp_path, monkeypatch):
    import errno

    from mltk.checkpoint import save_checkpoint

    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1}, path)

    def full(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04")  # part of it, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="No space left"):  # the caller says which checkpoint is intact (mltk run: last.pt keeps epoch N)
        save_checkpoint({"epoch": 2}, path)
    assert torch.load(path, weights_only=True) == {"format": CHECKPOINT_FORMAT, "epoch": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_a_run_directory_means_its_last_pt_then_its_best_pt(tmp_path):
    from mltk.checkpoint import CHECKPOINT_FILES, find_checkpoint
    from mltk.errors import UsageError

    assert CHECKPOINT_FILES == ("last.pt", "best.pt")
    with pytest.raises(MltkError, match=f"^run directory '{tmp_path}' has no last.pt or best.pt$"):
        find_checkpoint(tmp_path)
    (tmp_path / "best.pt").touch()
    assert find_checkpoint(tmp_path) == tmp_path / "best.pt"  # an MLflow run's artifacts: best.pt alone
    (tmp_path / "last.pt").touch()
    assert find_checkpoint(tmp_path) == tmp_path / "last.pt" and find_checkpoint(tmp_path, "best") == tmp_path / "best.pt"
    with pytest.raises(UsageError, match="^unknown checkpoint 'first'; choose last or best$"):
        find_checkpoint(tmp_path, "first")
