"""Export a run's embedder to ONNX or TorchScript, checked against PyTorch before the file is kept.

The exported model takes a float32 batch (N, C, H, W), already resized, cropped and normalised,
and returns L2-normalised embeddings (N, dim), as ``EmbeddingModel.embed`` does; N is free.
Its preprocessing goes to a JSON file beside it: FILE + ".json", with the match threshold when the export
is calibrated (``mltk.calibrate``): accept two images as one identity when their embeddings' dot
product reaches ``threshold.score``.
"""

import hashlib
import importlib.util
import inspect
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from mltk.errors import MltkError, UsageError, first_line
from mltk.outputs import check_file, check_replaceable, disk_error, replace_files

FORMATS = ("onnx", "torchscript")
TOLERANCE = 1e-4  # largest absolute difference from PyTorch's embeddings that is accepted
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")  # the exporter needs onnxscript; the check, onnxruntime
ONNX_MAX_BYTES = 2**31  # protobuf's limit on one .onnx file
SIDECAR_MAX = 1 << 20  # FILE.json holds a few kilobytes (with a calibration's operating points)


class Normalised(nn.Module):
    """What the exported file computes: preprocessed images in, L2-normalised embeddings out."""

    def __init__(self, embedder: nn.Module):
        super().__init__()
        self.embedder = embedder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.embedder.embed(images)


@dataclass
class Exported:
    path: Path
    sidecar: Path  # the preprocessing, as JSON
    max_diff: float  # largest absolute difference from PyTorch's embeddings, on a random batch
    info: dict  # what the sidecar holds


def export(run: str | Path, out: str | Path, fmt: str, calibrate: str | Path | None = None, far: float | str | None = None) -> Exported:
    """Write the embedder of ``run`` (a run directory or checkpoint) to ``out`` as ``fmt``, and ``out``.json.

    The written file is loaded back and run on a batch of another size than the one it was
    exported with; it is kept only if its embeddings match PyTorch's to ``TOLERANCE``. ``calibrate`` and ``far``
    put a match threshold into ``out``.json (``mltk.calibrate.resolve``). Both files
    are written or neither: an earlier ``out`` stays as it was if anything fails, and a folder made
    for ``out`` is removed again.
    """
    from mltk.checkpoint import find_checkpoint
    from mltk.model import load

    if fmt not in FORMATS:
        raise UsageError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "onnx":
        check_onnx_available()
    checkpoint = find_checkpoint(run)
    out, sidecar = check_paths(Path(out), {"the checkpoint": checkpoint, "--calibrate": calibrate})
    model = load(checkpoint, device="cpu")
    calibration = None
    if calibrate is not None:  # before anything is written: a wrong source costs no export
        from mltk.calibrate import resolve

        calibration = resolve(model, calibrate, far)
    module = Normalised(model.embedder).eval()

    generator = torch.Generator().manual_seed(0)
    example = torch.randn(2, *model.data_config["input_size"], generator=generator)
    check = torch.randn(3, *model.data_config["input_size"], generator=generator)  # another size: N must be free
    made = next((p for p in reversed(out.absolute().parents) if not p.exists()), None)  # the first folder this makes
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # Export to temporary files in the same folder, renamed in together (both or neither) once the model checks out.
        with replace_files([out, sidecar]) as (tmp, sidecar_tmp), torch.no_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")  # its deprecation notice
            (write_onnx if fmt == "onnx" else write_torchscript)(module, example, tmp)
            expected = module(check)
            try:
                got = (run_onnx if fmt == "onnx" else run_torchscript)(tmp, check)
            except Exception as exc:  # e.g. a batch size baked into the graph
                raise MltkError(f"the exported {fmt} model fails on a batch of {len(check)} ({type(exc).__name__}: {first_line(exc, '')[:200]}); nothing was written") from None
            # Keep the file only if it computes what PyTorch does.
            if got.shape != expected.shape:
                raise MltkError(f"the exported {fmt} model gives shape {tuple(got.shape)}, not {tuple(expected.shape)}; nothing was written")
            diff = float((got - expected).abs().max())
            if not diff <= TOLERANCE:  # NaN fails too
                raise MltkError(f"the exported {fmt} model does not match PyTorch: its embeddings differ by up to {diff:.3g} (tolerance {TOLERANCE:g}); nothing was written")
            info = describe(model, checkpoint, fmt, out, diff, calibration, digest(tmp))
            sidecar_tmp.write_text(json.dumps(info, indent=2) + "\n")
    except BaseException as exc:  # an error or Ctrl-C: a folder made for the export goes again
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        if isinstance(exc, OSError):  # a full disk, a folder in the way of FILE.json, ...
            raise disk_error(exc, f"{str(out)!r} and its {sidecar.name!r}", "nothing was written; an earlier file there is as it was") from None
        raise
    return Exported(out, sidecar, diff, info)


def check_paths(out: Path, inputs: dict | None = None) -> tuple[Path, Path]:
    """``out`` and its sidecar ``out``.json can both be written (nothing is created yet); else one line.

    mltk replaces only what it wrote, never its own input (``mltk.outputs.check_replaceable``): neither
    file may be one of ``inputs`` or a file of the run, index or evaluation folder it lies in, and
    what is there already must be an earlier export, as its FILE.json says.
    """
    out = check_file(out)
    sidecar = out.with_name(out.name + ".json")
    if sidecar.is_dir():
        raise MltkError(f"{str(sidecar)!r} is a folder; the export writes its preprocessing there (FILE.json): give another --out")
    check_replaceable(out, inputs, replaces=[out, sidecar], mine=lambda path: folder_file(path) or earlier_export(path, out, sidecar))
    return out, sidecar


def folder_file(path: Path) -> str | None:
    """What ``path`` is to the mltk folder it lies in when it bears one of that folder's own names
    ("is the best.pt of the run directory 'runs/a' ..."), there or not yet: such a name is the folder's, never an export's."""
    from mltk.evaluate import OUTPUTS
    from mltk.index import WRITTEN, read_meta
    from mltk.run_dir import RUN_FILES, RUN_FOLDERS, run_of

    folder, name = path.parent, path.name
    if name in (*RUN_FILES, *RUN_FOLDERS, "eval") and run_of(folder) is not None:  # eval: mltk evaluate's folder for the run
        return f"is the {name} of the run directory {str(folder)!r}, not an export's"
    if name in WRITTEN and read_meta(folder) is not None:
        return f"is the {name} of the index directory {str(folder)!r}, not an export's"
    if name in OUTPUTS and (folder / "metrics.json").is_file():
        return f"is the {name} of the evaluation folder {str(folder)!r}, not an export's"
    return None


def earlier_export(path: Path, out: Path, sidecar: Path) -> str | None:
    """None when ``path`` (``out`` or its ``sidecar``) is free or is an earlier export's: FILE.json names FILE, and
    FILE has the digest FILE.json records; else what is there instead."""
    if not os.path.lexists(path):
        return None
    info = read_sidecar(sidecar)
    if path == sidecar:
        if info is None:
            return "exists and is not the FILE.json of an mltk export"
        return None if info["file"] == out.name else f"exists and describes another file ({info['file']!r})"
    if info is None:
        return "exists and is not an export (no FILE.json of mltk export beside it says so)"
    if info["file"] != out.name:
        return f"exists, and its FILE.json describes another file ({info['file']!r})"
    if info.get("sha256") is not None and info["sha256"] != digest(out):
        return "exists and is not the file its FILE.json describes (it changed since mltk export wrote it)"
    return None


def read_sidecar(path: Path) -> dict | None:
    """An export's FILE.json as mltk export writes it (a mapping with its format and file name), or None."""
    from mltk.run_dir import read_text, strict_json

    if not path.is_file():
        return None
    try:
        info = strict_json(read_text(path, SIDECAR_MAX))
    except (MltkError, ValueError):
        return None
    ok = isinstance(info, dict) and info.get("format") in FORMATS and isinstance(info.get("file"), str) and isinstance(info.get("sha256", ""), (str, type(None)))
    return info if ok else None


def digest(path: Path) -> str:
    """The sha256 of a file, in hex: what FILE.json records, so that a later export knows the file it replaces."""
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


def describe(model, checkpoint: Path, fmt: str, out: Path, diff: float, calibration=None, sha256: str | None = None) -> dict:
    """The sidecar: how to preprocess images for the exported file, where it came from, and its match threshold (if calibrated)."""
    from mltk import __version__

    data = model.data_config
    return {
        "format": fmt,
        "file": out.name,
        "sha256": sha256,  # of the file: a later export to the same name knows that it replaces its own
        "input": "images",  # float32 (N, C, H, W), preprocessed as below
        "output": "embeddings",  # float32 (N, embedding_dim), L2-normalised
        "input_size": list(data["input_size"]),  # C, H, W
        "mode": model.mode,  # the PIL mode to convert images to first: RGB or L (greyscale)
        "interpolation": data.get("interpolation", "bilinear"),
        "crop_pct": data.get("crop_pct"),
        "crop_mode": data.get("crop_mode", "center"),
        "mean": list(data["mean"]),
        "std": list(data["std"]),
        "embedding_dim": model.embedder.dim,
        "l2_normalised": True,
        "checkpoint": str(checkpoint.resolve()),
        "backbone": model.config.backbone if model.config is not None else None,
        "max_abs_diff": diff,
        "mltk_version": __version__,
        "torch_version": torch.__version__,
        # Same identity when embedding_a · embedding_b >= threshold.score; every operating point is in calibration.
        "threshold": None if calibration is None else {"score": calibration[1].threshold, "operating_point": calibration[1].name},
        "calibration": None if calibration is None else calibration[0].to_json(),
    }


def check_onnx_available() -> None:
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise MltkError(f"ONNX export needs {', '.join(missing)}: pip install {' '.join(missing)}")
    if "dynamo" not in inspect.signature(torch.onnx.export).parameters:
        raise MltkError(f"ONNX export needs torch>=2.5 (this is {torch.__version__}); --format torchscript works with it")


def write_onnx(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    """torch.export-based exporter (``dynamo=True``, onnxscript): the legacy TorchScript one is deprecated."""
    size = sum(t.numel() * t.element_size() for t in module.state_dict().values())
    if size >= ONNX_MAX_BYTES:
        raise MltkError(f"the model's weights ({size / 2**30:.1f} GiB) exceed the 2 GiB an ONNX file can hold; use --format torchscript")
    try:
        torch.onnx.export(
            module, (example,), str(path), dynamo=True, external_data=False, verbose=False,
            input_names=["images"], output_names=["embeddings"], dynamic_shapes={"images": {0: torch.export.Dim("batch")}},
        )
    except Exception as exc:  # a backbone torch.export cannot capture: say which, in one line
        raise MltkError(f"ONNX export failed ({type(exc).__name__}: {first_line(exc, '')[:200]}); try --format torchscript") from None


def write_torchscript(module: nn.Module, example: torch.Tensor, path: Path) -> None:
    try:
        traced = torch.jit.trace(module, example)
    except Exception as exc:
        raise MltkError(f"TorchScript export failed ({type(exc).__name__}: {first_line(exc, '')[:200]}); try --format onnx") from None
    traced.save(str(path))


def run_onnx(path: Path, images: torch.Tensor) -> torch.Tensor:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(["embeddings"], {"images": images.numpy()})[0])


def run_torchscript(path: Path, images: torch.Tensor) -> torch.Tensor:
    return torch.jit.load(str(path), map_location="cpu")(images)
