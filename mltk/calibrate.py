"""Where a deployed model's match threshold comes from: an evaluation's thresholds.json, or images scored on the spot.

``mltk index``, ``mltk export`` and ``mltk verify`` take ``--calibrate EVAL_DIR_OR_DATA --far F``. A
threshold is only valid for the model whose scores it was read from, so a thresholds.json of another
model (other weights or preprocessing: ``EmbeddingModel.fingerprint``) is refused, as is one measured
on flip-averaged embeddings, which a search or a verification does not compute.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mltk import thresholds
from mltk.embedding import EmbedSettings
from mltk.errors import MltkError
from mltk.model import EmbeddingModel
from mltk.thresholds import Calibration, OperatingPoint


def resolve(
    model: EmbeddingModel, source: str | Path, far: float | str | None = None, *, settings: EmbedSettings = EmbedSettings(), progress=None,
) -> tuple[Calibration, OperatingPoint]:
    """The calibration of ``model`` that ``source`` gives, and its operating point at ``far`` (default 1e-3); images are
    embedded with ``settings`` (its batch size and workers: the model is on its device already)."""
    far = thresholds.DEFAULT_FAR if far is None else far
    path = Path(source)
    if _is_evaluation(path):
        if path.is_dir() and path.name != thresholds.FILE and not (path / thresholds.FILE).exists():
            raise MltkError(f"{str(source)!r} is an evaluation without {thresholds.FILE}: it scored no pairs of both kinds (a --metrics without the verification metrics?); evaluate again, or give images")
        calibration = thresholds.read(path)
        if calibration.model != model.fingerprint():
            raise MltkError(f"{str(source)!r} was calibrated on another model (other weights or preprocessing); evaluate this one: mltk evaluate RUN --out DIR")
        if calibration.flip_tta:
            raise MltkError(f"{str(source)!r} was evaluated with --flip-tta; search and verify do not average flips, so its scores do not apply: evaluate without it")
    else:
        calibration = score(model, source, settings=settings, progress=progress)
    point = calibration.at(far)
    if point.threshold is None:
        raise MltkError(f"at {'the EER' if far == 'eer' else f'FAR {far:g}'} no threshold exists on {calibration.source} (a different-identity pair scores highest); choose a higher --far")
    return calibration, point


def _is_evaluation(path: Path) -> bool:
    """``path`` names a thresholds.json (any .json, or a file that is no .csv) or an evaluation's folder (one holding
    thresholds.json or metrics.json), not images to score: a folder of classes, a CSV list, a dataset, as --data takes them."""
    if path.name == thresholds.FILE or path.suffix.lower() == ".json":
        return True
    if path.is_dir():
        return any((path / name).exists() for name in (thresholds.FILE, "metrics.json"))
    return path.is_file() and path.suffix.lower() != ".csv"


def score(model: EmbeddingModel, data: str | Path, *, settings: EmbedSettings = EmbedSettings(), progress=None) -> Calibration:
    """Embed ``data`` (a folder, CSV or dataset name; a dataset: its test split) and read the operating points off all its pairs."""
    from mltk.data import load_data
    from mltk.evaluate import evaluate
    from mltk.metrics import NotApplicable

    try:
        images = load_data(str(data), "test")
    except MltkError as exc:  # said as what it is: the calibration's data
        raise type(exc)(f"--calibrate: {exc}") from None
    sizes = np.bincount(np.asarray(images.labels, np.int64))
    if np.count_nonzero(sizes) < 2 or sizes.max() < 2:  # before any image is embedded
        raise _one_kind(data)
    try:
        result = evaluate(model, data=images, metrics=["tar_at_far", "eer"], batch_size=settings.batch_size, workers=settings.workers, progress=progress)
    except NotApplicable:  # the unreadable images left out took every pair of one kind
        raise _one_kind(data) from None
    if result.calibration is None:
        raise _one_kind(data)
    return result.calibration


def _one_kind(data: str | Path) -> MltkError:
    return MltkError(
        f"--calibrate {str(data)!r}: the calibration images need at least two classes, one of them with two images or more: "
        "a threshold is read off matched pairs (two images of a class) and mismatched pairs (images of two classes)"
    )
