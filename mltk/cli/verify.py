"""``mltk verify``: are two images of the same identity, at a calibrated threshold?"""

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from mltk.cli.options import Calibrate, Device, Far


def verify(
    image_a: Annotated[Path, typer.Argument(help="An image file.")],
    image_b: Annotated[Path, typer.Argument(help="Another image file.")],
    run: Annotated[Optional[Path], typer.Option(help="Run directory or checkpoint whose model embeds the images (threshold: --calibrate, else the run directory's eval/thresholds.json, which `mltk evaluate RUN` writes).")] = None,
    index: Annotated[Optional[Path], typer.Option("--index", help="Index directory of `mltk index --calibrate`: its model and threshold.")] = None,
    calibrate: Calibrate = None,
    far: Far = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document for scripts: {same, score, threshold, operating_point, calibrated_on}.")] = False,
    device: Device = None,
) -> None:
    """Same identity or different: the two images' cosine score against a calibrated threshold."""
    from rich.text import Text

    from mltk.cli.output import console
    from mltk.display import shown
    from mltk.verify import verify as verify_images

    verdict = verify_images(image_a, image_b, run=run, index_dir=index, calibrate=calibrate, far=far, device=device)
    point = verdict.point
    if as_json:
        print(json.dumps({"same": verdict.same, "score": verdict.score, "threshold": point.threshold, "operating_point": point.name, "calibrated_on": verdict.calibrated_on}, indent=2))
        return
    where = "the EER" if point.name == "eer" else f"FAR {point.far:g}"
    relation = "≥" if verdict.same else "<"
    console.print(
        Text.assemble(
            ("same" if verdict.same else "different", "bold green" if verdict.same else "bold red"),
            f": score {verdict.score:.4f} {relation} threshold {point.threshold:.4f} (at {where}, calibrated on {shown(verdict.calibrated_on)})",
        ),
        soft_wrap=True,
    )
