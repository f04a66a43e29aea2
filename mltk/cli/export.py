"""``mltk export``: a run's embedder as an ONNX or TorchScript file, with its preprocessing beside it."""

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from mltk.cli.options import Calibrate, Far, Run, out_option


class Format(str, Enum):
    onnx = "onnx"
    torchscript = "torchscript"


def export(
    run: Run,
    fmt: Annotated[Format, typer.Option("--format", help="onnx (needs the onnx, onnxscript and onnxruntime packages) or torchscript.")],
    out: Annotated[Path, out_option("File to write; its preprocessing goes to FILE.json beside it")],
    calibrate: Calibrate = None,
    far: Far = None,
) -> None:
    """Export a run's embedder: preprocessed images (N, C, H, W) in, L2-normalised embeddings out.

    The file is loaded back and checked against PyTorch's embeddings before it is kept. With --calibrate, FILE.json
    also holds the match threshold: two images are one identity when their embeddings' dot product reaches it.
    """
    from mltk.cli.output import console, interrupted_means
    from mltk.errors import UsageError
    from mltk.export import TOLERANCE
    from mltk.export import export as export_run

    if far is not None and calibrate is None:
        raise UsageError("--far picks an operating point of --calibrate; give --calibrate EVAL_DIR_OR_DATA too")
    with interrupted_means(f"nothing was written to {str(out)!r} (an earlier export there is as it was)"):
        result = export_run(run, out, fmt.value, calibrate, far)
    info = result.info
    console.print(
        f"wrote {result.path} ({fmt.value}, {result.path.stat().st_size / 2**20:.1f} MiB): "
        f"max abs difference from PyTorch {result.max_diff:.2e} (tolerance {TOLERANCE:g})",
        soft_wrap=True, highlight=False, markup=False,
    )
    _, h, w = info["input_size"]
    console.print(
        f"preprocessing in {result.sidecar}: {info['mode']} {w}x{h}, {info['interpolation']} resize, "
        f"crop_pct {info['crop_pct']}, mean {info['mean']}, std {info['std']}; embeddings of {info['embedding_dim']} dimensions",
        soft_wrap=True, highlight=False, markup=False,
    )
    if info["threshold"] is not None:
        point = info["threshold"]["operating_point"].replace("far=", "FAR ")
        console.print(f"match threshold {info['threshold']['score']:.4f} ({point}, calibrated on {info['calibration']['source']})", soft_wrap=True, highlight=False, markup=False)
