"""mltk export: ONNX and TorchScript files that give a run's embeddings of real digits, with their preprocessing."""

import errno
import json
import math
import os
import re
import sys

import pytest
import torch
from conftest import TINY, evaluate_forbid_work, one_line_error, snapshot

import mltk
from mltk.config import make_config
from mltk.data import load_data, open_image
from mltk.errors import MltkError
from mltk.train import train

pytestmark = pytest.mark.filterwarnings(r"ignore:.*torch\.jit:FutureWarning")  # torch's deprecation notice


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("export") / "run"
    train(make_config({**TINY, "data": "digits", "data_classes": ["0", "1", "2", "3"]}), run)
    return run


@pytest.fixture(scope="module")
def digits():
    """20 of scikit-learn's handwritten digits (8x8 greyscale PIL images), every class."""
    return load_data("digits").sources[::90][:20]


def preprocess(model, images) -> torch.Tensor:
    return torch.stack([model.transform(open_image(image, model.mode)) for image in images])


def open_exported(path, meta: dict):
    """The exported file as a function of a preprocessed batch, run the way a user would run it."""
    if meta["format"] == "torchscript":
        return torch.jit.load(str(path))
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda batch: torch.from_numpy(session.run([meta["output"]], {meta["input"]: batch.numpy()})[0])


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_exported_file_gives_the_runs_embeddings_for_any_batch_size(digits_run, digits, mltk_main, tmp_path, fmt):
    out = tmp_path / "exports" / f"digits.{fmt}"  # the folder is created
    code, stdout, stderr = mltk_main("export", digits_run, "--format", fmt, "--out", out)
    assert code == 0, stderr
    assert float(re.search(r"max abs difference from PyTorch (\S+)", stdout).group(1)) < 1e-4
    meta = json.loads((tmp_path / "exports" / f"digits.{fmt}.json").read_text())
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name, out.name + ".json"]  # no temporary files left

    model = mltk.load(digits_run, device="cpu")
    expected = model.embed(digits)
    assert (expected[0] - expected[1]).abs().max() > 1e-3  # different digits, different embeddings: the check can fail
    exported = open_exported(out, meta)
    batch = preprocess(model, digits)  # 20 images; the export was traced with 2
    with torch.no_grad():
        got, one = exported(batch), exported(batch[:1])
    assert got.shape == (20, 16) and (got - expected).abs().max() < 1e-4
    assert (one - expected[:1]).abs().max() < 1e-4
    assert torch.allclose(got.norm(dim=1), torch.ones(20), atol=1e-5)  # L2-normalised, as embed() gives


def test_sidecar_says_how_to_preprocess(digits_run, digits, mltk_main, tmp_path):
    from torchvision import transforms

    code, _, stderr = mltk_main("export", digits_run, "--format", "torchscript", "--out", tmp_path / "digits.pt")
    assert code == 0, stderr
    meta = json.loads((tmp_path / "digits.pt.json").read_text())
    assert meta["input_size"] == [3, 32, 32] and meta["mode"] == "RGB" and meta["embedding_dim"] == 16
    assert meta["checkpoint"] == str((digits_run / "last.pt").resolve()) and meta["backbone"] == "test_resnet"  # what RUN means: last.pt
    # The recipe in README.md, from the sidecar alone, gives the tensors mltk's own transform gives.
    _, height, width = meta["input_size"]
    recipe = transforms.Compose([
        transforms.Resize(math.floor(height / meta["crop_pct"]), interpolation=transforms.InterpolationMode(meta["interpolation"])),
        transforms.CenterCrop((height, width)),
        transforms.ToTensor(),
        transforms.Normalize(meta["mean"], meta["std"]),
    ])  # fmt: skip
    model = mltk.load(digits_run, device="cpu")
    by_recipe = torch.stack([recipe(image.convert(meta["mode"])) for image in digits])
    assert torch.allclose(by_recipe, preprocess(model, digits), atol=1e-6)


def test_a_file_that_does_not_match_pytorch_is_not_kept(digits_run, tmp_path, monkeypatch):
    from mltk import export

    real = export.run_torchscript
    monkeypatch.setattr(export, "run_torchscript", lambda path, images: real(path, images) + 1e-3)
    with pytest.raises(MltkError, match=r"does not match PyTorch: its embeddings differ by up to 0\.001"):
        export.export(digits_run, tmp_path / "digits.pt", "torchscript")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing run", "error: checkpoint '{tmp}/nope' does not exist"),
        ("out is a folder", "error: --out '{tmp}' is a folder; give a file name, e.g. '{tmp}/model.onnx'"),
        ("out under a file", "error: cannot write --out '{tmp}/notes.txt/m.onnx': '{tmp}/notes.txt' is a file, not a folder"),
        ("onnx not installed", "error: ONNX export needs onnx: pip install onnx"),
    ],
)
def test_bad_input_is_one_error_line_and_writes_nothing(case, expected, digits_run, mltk_main, tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("a file")
    run, out = digits_run, tmp_path / "m.onnx"
    if case == "missing run":
        run = tmp_path / "nope"
    elif case == "out is a folder":
        out = tmp_path
    elif case == "out under a file":
        out = tmp_path / "notes.txt" / "m.onnx"
    else:
        monkeypatch.setitem(sys.modules, "onnx", None)  # what import sees when onnx is not installed
    code, stdout, stderr = mltk_main("export", run, "--format", "onnx", "--out", out)
    assert code == 1 and stderr == expected.format(tmp=tmp_path) + "\n" and stdout == ""
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


# --- mltk replaces only what it wrote, never its own input (mltk.outputs.check_replaceable) -------------------------


@pytest.fixture
def run_copy(digits_run, tmp_path):
    """A copy of the digits run that a test may try to damage, and an index directory of it."""
    import shutil

    from mltk.data import select_classes
    from mltk.index import write_index_dir

    run = tmp_path / "runs" / "a"
    shutil.copytree(digits_run, run)
    write_index_dir(mltk.load(run, device="cpu"), select_classes(load_data("digits"), ["0", "1"]), tmp_path / "idx", workers=0)
    return run


@pytest.mark.parametrize(
    "run, out, expected",
    [
        ("runs/a", "runs/a/last.pt", "--out '{tmp}/runs/a/last.pt' is the checkpoint '{tmp}/runs/a/last.pt', an input of this command; mltk never replaces its own input"),
        ("runs/a/best.pt", "link.pt", "--out '{tmp}/link.pt' is the checkpoint '{tmp}/runs/a/best.pt', an input of this command"),
        ("runs/a/best.pt", "runs/a/last.pt", "--out '{tmp}/runs/a/last.pt' is the last.pt of the run directory '{tmp}/runs/a', not an export's"),
        ("runs/a", "runs/a/metrics.jsonl", "is the metrics.jsonl of the run directory '{tmp}/runs/a', not an export's"),
        ("runs/a", "idx/model.pt", "--out '{tmp}/idx/model.pt' is the model.pt of the index directory '{tmp}/idx', not an export's"),
        ("idx/model.pt", "idx/meta", "--out '{tmp}/idx/meta' would replace '{tmp}/idx/meta.json', which is the meta.json of the index directory '{tmp}/idx'"),
        ("runs/a", "idx/embeddings.npy", "is the embeddings.npy of the index directory '{tmp}/idx'"),  # searchable without it: the name is still the index's
        ("runs/a", "notes.txt", "--out '{tmp}/notes.txt' exists and is not an export (no FILE.json of mltk export beside it says so); mltk replaces only what it wrote"),
        ("runs/a", "forged.pt", "--out '{tmp}/forged.pt' would replace '{tmp}/forged.pt.json', which exists and describes another file ('other.pt')"),
    ],
)
def test_export_never_replaces_its_input_or_another_commands_file(run, out, expected, run_copy, mltk_main, tmp_path):
    """Issue 25 C1: `--out RUN/best.pt` used to replace the trained checkpoint it exported, `--out IDX/model.pt` an index's model."""
    from conftest import one_line_error, snapshot

    (tmp_path / "link.pt").symlink_to(tmp_path / "runs" / "a" / "best.pt")
    (tmp_path / "idx" / "embeddings.npy").unlink()
    (tmp_path / "notes.txt").write_text("the user's notes")
    (tmp_path / "forged.pt.json").write_text('{"format": "torchscript", "file": "other.pt"}')
    before = snapshot(tmp_path)
    line = one_line_error(mltk_main("export", tmp_path / run, "--format", "torchscript", "--out", tmp_path / out), code=1)
    assert expected.format(tmp=tmp_path) in line
    assert snapshot(tmp_path) == before


def test_export_replaces_only_an_earlier_export_that_is_as_it_wrote_it(digits_run, mltk_main, tmp_path):
    out = tmp_path / "m.pt"
    assert mltk_main("export", digits_run, "--format", "torchscript", "--out", out)[0] == 0
    meta = json.loads((tmp_path / "m.pt.json").read_text())
    assert meta["file"] == "m.pt" and re.fullmatch(r"[0-9a-f]{64}", meta["sha256"])
    code, _, stderr = mltk_main("export", digits_run, "--format", "torchscript", "--out", out)  # its own: replaced
    assert code == 0, stderr
    with open(out, "ab") as f:
        f.write(b"edited since")  # no longer what FILE.json describes: the user's now
    from conftest import one_line_error

    line = one_line_error(mltk_main("export", digits_run, "--format", "torchscript", "--out", out), code=1)
    assert line.endswith("exists and is not the file its FILE.json describes (it changed since mltk export wrote it); mltk replaces only what it wrote: give another --out")


# --- both files or neither; no folder left behind


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
