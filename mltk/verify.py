"""``mltk verify`` as a library: are two images of the same identity, at a calibrated threshold?"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mltk.errors import UsageError
from mltk.thresholds import OperatingPoint


@dataclass(frozen=True)
class Verdict:
    same: bool  # score >= point.threshold
    score: float  # cosine similarity of the two embeddings
    point: OperatingPoint  # the operating point whose threshold decided
    calibrated_on: str  # what the threshold was measured on
    negatives: int  # different-identity pairs behind it


def verify(
    image_a: str | Path, image_b: str | Path, *, run: str | Path | None = None, index_dir: str | Path | None = None,
    calibrate: str | Path | None = None, far: float | str | None = None, device: str | None = None,
) -> Verdict:
    """Embed both images with the model of ``run`` or of ``index_dir`` and compare their score with a calibrated threshold.

    The threshold comes from ``calibrate`` (``mltk.calibrate.resolve``), else from the index's meta.json, else from the
    run's own evaluation (RUN/eval/thresholds.json); ``far`` picks its operating point (default: the index's, or 1e-3).
    """
    from mltk.calibrate import resolve
    from mltk.index import calibration_of, check_images, load_model, open_index_dir, operating_point
    from mltk.model import load

    if (run is None) == (index_dir is None):
        raise UsageError("give --run RUN or --index DIR: the model that embeds the two images")
    check_images([image_a, image_b], "image")
    if index_dir is not None:
        opened = open_index_dir(index_dir)
        model = load_model(opened, device)  # checked against the index's calibration, if it has one
        if calibrate is None:
            calibrated = calibration_of(opened.path, opened.meta)
            if calibrated is None:
                raise UsageError(f"index {str(index_dir)!r} has no calibrated threshold; give --calibrate EVAL_DIR_OR_DATA, or write it with `mltk index --calibrate`")
            calibration, point = calibrated[0], operating_point(opened, far)
    else:
        model = load(run, device)  # first: a wrong --run is said as such
        calibrate = own_evaluation(run) if calibrate is None else calibrate
    if calibrate is not None:
        calibration, point = resolve(model, calibrate, far)
    a, b = model.embed([str(image_a), str(image_b)])
    score = float(a @ b)
    return Verdict(score >= point.threshold, score, point, calibration.source, calibration.negatives)


def own_evaluation(run: str | Path) -> Path:
    """RUN/eval, what ``mltk evaluate RUN`` writes, of the run directory ``run`` is or whose best.pt / last.pt it is; one
    line naming the file verify reads when it is not there."""
    from mltk.run_dir import run_of
    from mltk.thresholds import FILE

    folder = Path(run) if Path(run).is_dir() else run_of(run)
    if folder is None:  # a checkpoint outside a run directory: `mltk evaluate` writes eval-NAME, which verify does not look for
        raise UsageError(f"no calibrated threshold for checkpoint {str(run)!r}: give --calibrate EVAL_DIR_OR_DATA (images of known identities, or the folder `mltk evaluate` wrote for it)")
    if not (folder / "eval" / FILE).is_file():
        raise UsageError(
            f"no calibrated threshold for {str(run)!r}: {str(folder / 'eval' / FILE)!r} does not exist; give --calibrate EVAL_DIR_OR_DATA, "
            f"or run `mltk evaluate` on the run directory {str(folder)!r} first: it writes that file"
        )
    return folder / "eval"
