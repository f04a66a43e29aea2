"""Score thresholds calibrated on an evaluation: the operating points at chosen false-accept rates, as thresholds.json.

A verification system accepts a pair (or a search hit) when its cosine similarity is at least a
threshold. The threshold that gives a false-accept rate (FAR) of, say, 1e-3 is read off the ROC
curve of an evaluation's pairs: the lowest score at which at most 0.1% of the different-identity
pairs are accepted. It holds only for the model that computed it, and for data like the pairs it
was measured on; a FAR far below 1 / (negative pairs) was not measured at all. Each operating
point says how many false accepts it rests on, and ``reliable`` applies Doddington's rule of 30
(30 errors give the rate to within about ±30% with 90% confidence).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mltk.errors import MltkError, UsageError, first_line
from mltk.roc import RULE_OF_30, equal_error
from mltk.rules import Choice, Flag, ListOf, Maybe, Number, Options, Text, Where, from_file, show

FORMAT = "mltk-thresholds-1"
FILE = "thresholds.json"
FARS = (1e-1, 1e-2, 1e-3, 1e-4)  # the operating points an evaluation writes, with the EER
DEFAULT_FAR = 1e-3
MAX_BYTES = 1 << 20
COSINE_ROUNDING = 1e-3  # a threshold is a dot product of unit float32 vectors: in [-1, 1], give or take rounding


@dataclass(frozen=True)
class OperatingPoint:
    """Accept a score >= ``threshold``: on the calibration pairs that accepted ``tar`` of the same-identity pairs and
    ``far_measured`` of the others (``false_accepts`` pairs). ``threshold`` None: no score reaches ``far`` (the top
    score belongs to a different-identity pair), so nothing is accepted there."""

    name: str  # "far=0.001", or "eer"
    far: float  # the false-accept rate asked for (the EER's: the EER)
    threshold: float | None
    tar: float
    far_measured: float
    false_accepts: int
    reliable: bool


@dataclass(frozen=True)
class Calibration:
    """The operating points of one model on one evaluation set: what thresholds.json holds."""

    points: tuple[OperatingPoint, ...]
    positives: int  # same-identity pairs scored
    negatives: int  # different-identity pairs scored
    model: str  # mltk.model.fingerprint of the embedder: a threshold is only valid for it
    source: str  # what the pairs came from
    flip_tta: bool = False  # scores of flip-averaged embeddings (search and verify do not average)
    # What was scored, with which checkpoint, when (``mltk.evaluate.provenance``); None in older files. A record of the
    # calibration, not part of it: the same points from the same pairs are the same calibration, whenever measured.
    evaluated: dict | None = field(default=None, compare=False)

    def at(self, far: float | str) -> OperatingPoint:
        """The point for ``far`` (a number, or "eer"); one line naming the points there are when it is not one."""
        name = "eer" if far == "eer" else f"far={float(far):g}"
        for point in self.points:
            if point.name == name:
                return point
        raise UsageError(f"no operating point at {name.replace('far=', 'FAR ')}; the calibration holds {', '.join(p.name.replace('far=', 'FAR ') for p in self.points)}")

    def to_json(self) -> dict:
        return {"format": FORMAT, **asdict(self), "points": [asdict(p) for p in self.points]}


def parse_far(text: str) -> float | str:
    """``--far``: a rate in (0, 1), or "eer"."""
    if str(text).strip().lower() == "eer":
        return "eer"
    try:
        far = float(text)
    except ValueError:
        far = math.nan
    if not 0 < far < 1:
        raise UsageError(f"--far {text!r}: give a false-accept rate between 0 and 1, such as 1e-3, or 'eer'")
    return far


def calibrate(roc, negatives: int, positives: int, model: str, source: str, fars=FARS, flip_tta: bool = False, evaluated: dict | None = None) -> Calibration:
    """The operating points of a ROC curve (``mltk.roc.roc_curve``, not thinned: every threshold) at ``fars`` and the EER."""
    points = []
    for far in fars:
        i = int(np.searchsorted(roc.fpr, far, side="right")) - 1  # the last point with FPR <= far: the highest TAR there
        points.append(_point(f"far={far:g}", far, roc, i, negatives))
    rate, threshold = equal_error(roc)
    i = int(np.flatnonzero(roc.thresholds == threshold)[0])
    points.append(_point("eer", rate, roc, i, negatives))
    return Calibration(tuple(points), int(positives), int(negatives), model, source, flip_tta, evaluated)


def _point(name: str, far: float, roc, i: int, negatives: int) -> OperatingPoint:
    threshold = float(roc.thresholds[i])
    false_accepts = int(round(float(roc.fpr[i]) * negatives))
    return OperatingPoint(
        name, float(far), threshold if math.isfinite(threshold) else None, float(roc.tpr[i]), float(roc.fpr[i]),
        false_accepts, false_accepts >= RULE_OF_30,
    )


def write(calibration: Calibration, path: Path) -> None:
    Path(path).write_text(json.dumps(calibration.to_json(), indent=2, allow_nan=False) + "\n")


def read(path: str | Path) -> Calibration:
    """thresholds.json (or a folder holding one), checked whole: anything wrong is one line naming the file."""
    path = Path(path)
    if path.is_dir() and path.name != FILE:
        path = path / FILE
    if not path.exists():
        raise MltkError(f"{str(path)!r} does not exist; `mltk evaluate` writes {FILE} into its output folder")
    if not path.is_file():
        raise MltkError(f"{str(path)!r} is {'a folder' if path.is_dir() else 'not a regular file'}, not a {FILE}; give the {FILE} that `mltk evaluate` writes, or its output folder")
    try:
        with open(path, "rb") as f:
            text = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise MltkError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    if len(text) > MAX_BYTES:
        raise _bad(path, f"is larger than {MAX_BYTES >> 20} MiB, and a {FILE} holds a few kilobytes")
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise _bad(path, f"is not JSON ({first_line(exc, '')})") from None
    return from_json(data, repr(str(path)), AGAIN)


RATE = Number(0, 1, strings=False)
POINT = Options(
    {
        "name": Text(r"eer|far=\S+", what="'eer', or 'far=' and its rate"),
        "far": RATE,
        "threshold": Maybe(Number(-1 - COSINE_ROUNDING, 1 + COSINE_ROUNDING, strings=False, what="a cosine score from -1 to 1, or null")),
        "tar": RATE,
        "far_measured": RATE,
        "false_accepts": Number(0, whole=True, what="a count"),
        "reliable": Flag(),
    },
    required=tuple(OperatingPoint.__dataclass_fields__),
    empty_ok=False,
)
#: thresholds.json, and an index's meta.json["calibration"]: every field, checked whole
CALIBRATION = Options(
    {
        "format": Choice((FORMAT,)),
        "positives": Number(1, whole=True, what="a count of at least 1"),
        "negatives": Number(1, whole=True, what="a count of at least 1"),
        "model": Text(r"(?s).*"),
        "source": Text(r"(?s).*"),
        "flip_tta": Flag(),
        "points": ListOf(POINT, tuple(range(1, 101)), what="a list of 1 to 100 operating points"),
        "evaluated": Maybe(Where(lambda v: isinstance(v, dict), what="an object (what the pairs were), or null")),
    },
    required=("format", "positives", "negatives", "model", "source", "flip_tta", "points"),
    empty_ok=False,
)


def from_json(data, where: str = "calibration", again: str = "") -> Calibration:
    """A Calibration from its JSON form (thresholds.json, or an index's meta.json), every field checked (``CALIBRATION``);
    a failure is one MltkError ``where: ...; again``. A file written before thresholds.json recorded what it was
    evaluated on has no ``evaluated`` and is read as it is."""
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise MltkError(f"{where} is not an mltk calibration (format {FORMAT}){f'; {again}' if again else ''}")
    data = from_file(CALIBRATION, data, "calibration", where, again)
    names = [p["name"] for p in data["points"]]
    twice = next((name for name in names if names.count(name) > 1), None)
    wrong = next((i for i, p in enumerate(data["points"]) if p["name"] not in ("eer", f"far={p['far']:g}")), None)
    problem = (
        f"calibration['points'][{wrong}]['name'] must be 'eer' or 'far={data['points'][wrong]['far']:g}' (its far), got {show(names[wrong])}" if wrong is not None
        else f"calibration has two operating points named {show(twice)}" if twice is not None  # ``at`` would take the first: a forgery or a broken file
        else None
    )
    if problem:
        raise MltkError(f"{where}: {problem}{f'; {again}' if again else ''}")
    points = tuple(OperatingPoint(**point) for point in data["points"])
    return Calibration(points, data["positives"], data["negatives"], data["model"], data["source"], data["flip_tta"], data.get("evaluated"))


AGAIN = "write it again with `mltk evaluate`"


def _bad(path: Path, problem: str) -> MltkError:
    return MltkError(f"{str(path)!r} {problem}; {AGAIN}")


def describe(point: OperatingPoint, negatives: int) -> str:
    """One line for people: the threshold, what it accepted, and whether the FAR was measured."""
    where = "EER" if point.name == "eer" else f"FAR {point.far:g}"
    if point.threshold is None:
        return f"{where}: no threshold reaches it (a different-identity pair scored highest); nothing is accepted"
    line = f"{where}: threshold {point.threshold:.4f} (TAR {point.tar:.4f}, measured FAR {point.far_measured:.2g} on {negatives:,} negative pairs)"
    if not point.reliable:
        accepts = f"{point.false_accepts} false accept{'' if point.false_accepts == 1 else 's'}"
        line += f"; it rests on {accepts}, fewer than {RULE_OF_30}: the true rate may be far off"
    return line
