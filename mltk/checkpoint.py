"""The checkpoint's layout in one place: what a checkpoint file holds, each field checked on load (the file may come
from anywhere), how it is written whole, and the names a run directory gives its checkpoints.

torch is imported where a tensor is read or written: a run directory's names cost no torch."""

import math
import warnings
from pathlib import Path

from mltk import ctrl_c
from mltk.errors import MltkError, UsageError
from mltk.outputs import replace_file
from mltk.rules import AnyOf, Choice, ListOf, Number, Options, Text, Where, from_file, show


#: what to give instead of a TorchScript file, by what was expected
INSTEAD_OF_TORCHSCRIPT = {
    "checkpoint": "give the run directory it was exported from, or its best.pt",
    "weights file": "give a state dict of the backbone's weights (.pt/.pth/.safetensors)",
}


def is_torchscript(path: Path) -> bool:
    """Whether ``path`` is a TorchScript archive (``torch.jit.save``, ``mltk export --format torchscript``): a zip
    whose folder holds constants.pkl, as torch.load tells them apart from a saved state."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.count("/") == 1 and name.endswith("/constants.pkl") for name in archive.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


def safe_load(path: Path, what: str):
    """``torch.load(weights_only=True)``: tensors and plain containers only; a pickle that would run code is refused.

    A TorchScript file is named as one before torch sees it: torch.load would warn, then advise weights_only=False,
    advice mltk never relays (it could run code)."""
    if is_torchscript(path):
        instead = INSTEAD_OF_TORCHSCRIPT.get(what, f"give a {what}")
        raise MltkError(f"{str(path)!r} is a TorchScript file (an mltk export), not a {what}; {instead}")
    import torch

    try:
        with warnings.catch_warnings():  # a refused file needs one line, not torch's note on pickle protocols too
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        text = str(exc)
        if "Weights only load failed" in text:
            found = next((line.strip() for line in text.splitlines() if "GLOBAL" in line or line.startswith("Unsupported")), "")
            raise MltkError(
                f"refused to load {str(path)!r}: it holds more than tensors and plain values, and unpickling it could run code "
                f"({found or 'see torch.load'}); mltk reads {what}s with torch.load(weights_only=True) only"
            ) from None
        first = (text.strip().splitlines() or [""])[0].split(". ")[0]  # torch's reason, without its advice
        reason = f"{type(exc).__name__}: {first}" if first and "weights_only" not in first else type(exc).__name__
        raise MltkError(f"{str(path)!r} is not a {what} torch can read ({reason})") from None


CHECKPOINT_FORMAT = "mltk-checkpoint-1"


def save_checkpoint(state: dict, path: Path) -> None:
    """Write whole (``outputs.replace_file``): ``path`` holds the earlier checkpoint or this one, never part of one.
    An OSError goes to the caller, who says which checkpoint is intact. A Ctrl-C waits for the write (in torch's
    writer it would be a RuntimeError about the zip stream) and is raised after it."""
    import torch

    with ctrl_c.deferred(), replace_file(path) as tmp, open(tmp, "wb") as f:
        torch.save({"format": CHECKPOINT_FORMAT, **state}, f)


def load_checkpoint(path: str | Path, run: bool = False) -> dict:
    """A checkpoint, read with ``weights_only=True`` and checked field by field (``check_checkpoint``).

    ``run``: everything resuming needs must be there too: the run's record (epoch, best, losses, ...) and the
    optimiser's state, which only last.pt keeps (best.pt is for inference: under Adam about a third of last.pt's size).
    """
    path = Path(path)
    if not path.is_file():
        raise MltkError(f"checkpoint {str(path)!r} does not exist")
    state = safe_load(path, "checkpoint")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise MltkError(f"{str(path)!r} is not an mltk checkpoint (a weights file goes to --weights)")
    return check_checkpoint(state, f"checkpoint {str(path)!r}", run)


# What a checkpoint holds. Every field is checked on load, since the file may come from anywhere:
# a bad value is one line naming the checkpoint and the field, not a traceback deep in timm.
MODEL_FIELDS = ("config", "data_config", "classes", "model")  # every checkpoint: what inference needs
RUN_FIELDS = ("epoch", "best", "losses", "sampler", "rng")  # a run's record: best.pt and last.pt
RESUME_FIELDS = ("optimizer", "scheduler", "scaler")  # the optimiser's state: last.pt only, what resuming needs
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")  # timm's str_to_interp_mode names
CROP_MODES = ("center", "squash", "border")  # timm's eval transform
MAX_SIDE = 4096  # pixels; far above any backbone's input, below what would exhaust memory at once


def check_checkpoint(state: dict, source: str, run: bool = False) -> dict:
    """The checkpoint's known fields, each checked (``FIELDS``); ``source`` names it in the error. Other keys are left out."""
    from mltk.config import make_config, to_dict

    record = run or any(key in state for key in RUN_FIELDS)  # all of them or none: a run's checkpoint or a slim one
    missing = [key for key in MODEL_FIELDS + (RUN_FIELDS if record else ()) + (RESUME_FIELDS if run else ()) if key not in state]
    if missing:
        raise MltkError(f"{source} lacks the field{'s' if len(missing) > 1 else ''} {', '.join(missing)}; it was not written by mltk, or is damaged")
    try:
        config = to_dict(make_config(state["config"], source=f"the config of {source}"))
    except UsageError as exc:  # the file's fault, not the command line's: exit 1
        raise MltkError(str(exc)) from None
    names = MODEL_FIELDS[2:] + (RUN_FIELDS if record else ()) + (RESUME_FIELDS if run else ())
    checked = {key: from_file(FIELDS[key], state[key], key, source) for key in names}
    checked["classes"] = None if checked["classes"] is None else list(checked["classes"])
    return {"format": CHECKPOINT_FORMAT, "config": config, "data_config": check_data_config(state["data_config"], source), **checked}


def check_data_config(data: dict, source: str) -> dict:
    """timm's preprocessing settings, each in range (``DATA_CONFIG``): the transform of ``make_transform`` takes them as they are."""
    data = from_file(DATA_CONFIG, data, "data_config", source)
    channels = data["input_size"][0]
    for key in ("mean", "std"):
        if len(data[key]) != channels:
            raise MltkError(f"{source}: data_config[{key!r}] must be {channels} numbers, one per channel, got {show(data[key])}")
    return {**data, "input_size": tuple(data["input_size"]), "mean": tuple(map(float, data["mean"])), "std": tuple(map(float, data["std"]))}


def _is_input_size(value) -> bool:
    return (
        isinstance(value, (list, tuple)) and len(value) == 3 and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        and value[0] in (1, 3) and all(1 <= side <= MAX_SIDE for side in value[1:])
    )


def _is_state_dict(value) -> bool:
    import torch

    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


FINITE = Number(-math.inf, math.inf, strings=False, what="a finite number")
DATA_CONFIG = Options(
    {
        "input_size": Where(_is_input_size, what=f"[channels, height, width]: 1 or 3 channels, sides 1 to {MAX_SIDE}"),
        "interpolation": Choice(INTERPOLATIONS),
        "mean": ListOf(FINITE, what="finite numbers, one per channel"),
        "std": ListOf(Number(0, open_lo=True, strings=False), what="finite numbers > 0, one per channel"),
        "crop_pct": Number(0, 1, open_lo=True, strings=False),
        "crop_mode": Choice(CROP_MODES),
    },
    required=("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode"),
    empty_ok=False,
)
A_MAPPING = Where(lambda v: isinstance(v, dict), what="a mapping")
#: each field of a checkpoint but its config (``mltk.config``'s rules) and data_config (``DATA_CONFIG``)
FIELDS = {
    "classes": Where(lambda v: v is None or isinstance(v, (list, tuple)) and all(isinstance(c, str) for c in v), what="a list of class names or null"),
    "model": Where(_is_state_dict, what="a state dict (names to tensors)"),
    "epoch": Number(0, whole=True, what="a whole number >= 0"),
    "best": AnyOf((Options({}), Options({"epoch": Number(0, whole=True), "score": FINITE, "by": Text(r"(?s).*")}, required=("epoch", "score", "by"))), what="{} or {epoch, score, by}"),
    **{key: A_MAPPING for key in RUN_FIELDS[2:] + RESUME_FIELDS},
}


#: a run directory's checkpoints, by the name ``--checkpoint`` gives them
CHECKPOINTS = {"last": "last.pt", "best": "best.pt"}
#: their files, in the order a run directory named as RUN means them: last.pt, else best.pt
CHECKPOINT_FILES = tuple(CHECKPOINTS.values())


def find_checkpoint(run: str | Path, which: str | None = None) -> Path:
    """``run`` is a checkpoint file, or a run directory: its ``which`` checkpoint ("last" or "best"), by default last.pt.

    last.pt by default, for every command: best.pt was chosen by validation recall@1, often on the very classes
    ``mltk evaluate RUN`` scores, so its figures would flatter it; and a threshold calibrated on one checkpoint holds
    for no other, so evaluate, index, export and verify must all mean the same file by RUN. A run directory with a
    best.pt alone (an MLflow run's artifacts) gives that.
    """
    if which is not None and which not in CHECKPOINTS:
        raise UsageError(f"unknown checkpoint {which!r}; choose {' or '.join(CHECKPOINTS)}")
    run = Path(run)
    if not run.is_dir():
        if which is not None:
            raise UsageError(f"--checkpoint {which} picks the {CHECKPOINTS[which]} of a run directory, and {str(run)!r} is not one: give the run directory, or leave --checkpoint out")
        return run
    names = [CHECKPOINTS[which]] if which is not None else list(CHECKPOINT_FILES)
    for name in names:
        if (run / name).is_file():
            return run / name
    raise MltkError(f"run directory {str(run)!r} has no {' or '.join(names)}")
