"""Models: the Embedder (backbone + neck), the hybrid backbone, weights and checkpoints from local
files, and EmbeddingModel for inference."""

import warnings
from pathlib import Path

import torch
from torch import nn

from mltk.errors import MltkError


class HybridBackbone(nn.Module):
    """Two towers on the same image; their pooled features are concatenated."""

    def __init__(self, cnn: nn.Module, transformer: nn.Module, img_size: int | None = None):
        super().__init__()
        self.cnn = cnn
        self.transformer = transformer
        self.num_features = cnn.num_features + transformer.num_features
        # timm's resolve_data_config reads pretrained_cfg: both towers share ImageNet statistics.
        self.pretrained_cfg = dict(getattr(cnn, "pretrained_cfg", {}) or {})
        if img_size is not None:
            self.pretrained_cfg["input_size"] = (3, img_size, img_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.cnn(x), self.transformer(x)], dim=1)

    def group_matcher(self, coarse: bool = False):
        """timm's layers (what --layer-decay reads) for two towers side by side, not one above the other: a parameter
        ranks by how far below its own tower's last layer it sits, so each tower's last layer learns at the full rate."""
        from timm.models import group_parameters

        below = {}
        for prefix, tower in (("cnn.", self.cnn), ("transformer.", self.transformer)):
            layers = group_parameters(tower, tower.group_matcher(coarse), reverse=True) if hasattr(tower, "group_matcher") else {}
            top = max(layers.values(), default=0)
            below.update({prefix + name: top - layer for name, layer in layers.items()})
        return lambda name: -below.get(name, 0)


def check_weights_file(path: str | Path) -> Path:
    """``path``, a file; a folder or a path that is not there is one line saying which."""
    path = Path(path)
    if not path.is_file():
        problem = "is a folder" if path.is_dir() else "does not exist"
        raise MltkError(f"weights file {str(path)!r} {problem}; give the path of a .pt/.pth/.safetensors file")
    return path


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


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file, never unpickling code (``weights_only=True``), every float in it finite."""
    path = check_weights_file(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as exc:
            raise MltkError(f"{str(path)!r} is not a readable safetensors file ({exc})") from None
    else:
        state = safe_load(path, "weights file")
    for key in ("state_dict", "model", "backbone"):  # common wrappers around the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MltkError(f"{str(path)!r} holds no state dict of tensors")
    check_finite(state, f"weights file {str(path)!r}")
    return {k.removeprefix("module."): v for k, v in state.items()}


def check_finite(state: dict[str, torch.Tensor], source: str) -> None:
    """Every floating-point tensor of ``state`` finite: a NaN weight makes every embedding NaN, and the run would
    stop at its first step blaming the learning rate."""
    for name, tensor in state.items():
        if tensor.is_floating_point() or tensor.is_complex():
            if not bool(torch.isfinite(tensor).all()):
                bad = "NaN" if bool(torch.isnan(tensor).any()) else "infinite"
                raise MltkError(f"{source} holds {bad} values in {_show(name)}; the file is damaged, or was saved from a run that diverged: give another")


def state_mismatch(own: dict, state: dict, shapes: bool = True) -> str:
    """'' when ``state`` has exactly the keys of ``own`` (and, with ``shapes``, their shapes); else what differs."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if shapes and own[k].shape != state[k].shape)
    return "; ".join(
        f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)})"
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
        if keys
    )


def load_state(model: nn.Module, state: dict, source: str, hint: str = "") -> None:
    """``model.load_state_dict(state)``; a mismatch is one MltkError naming the keys that differ."""
    problem = state_mismatch(model.state_dict(), state)
    if problem:
        raise MltkError(f"{source} does not fit this model: {problem}{hint}")
    model.load_state_dict(state)


def load_weights_file(model: nn.Module, path: str | Path) -> None:
    """Load a local weights file into ``model``; a mismatch names the keys that differ."""
    load_state(model, read_state_dict(path), repr(str(path)))


class Embedder(nn.Module):
    """Backbone, then a neck (Linear + BatchNorm to ``dim``); ``embed`` L2-normalises for inference.

    ``dim=None`` (or 0) keeps the backbone's features as they are (no neck): an untrained backbone, or one
    fine-tuned without a projection.
    """

    def __init__(self, backbone: nn.Module, dim: int | None):
        super().__init__()
        self.backbone = backbone
        width = backbone.num_features
        self.neck = nn.Sequential(nn.Linear(width, dim), nn.BatchNorm1d(dim)) if dim else nn.Identity()
        self.dim = dim or width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Raw embeddings, as the losses take them."""
        return self.neck(self.backbone(x))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(self.forward(x).float(), dim=1)


def build_embedder(cfg, from_checkpoint: bool = False) -> Embedder:
    """The Embedder a RunConfig describes.

    ``from_checkpoint``: the weights will come from a checkpoint, so nothing is downloaded or read
    (``pretrained``, ``weights`` and any ``*_weights`` backbone option are left out).
    """
    from mltk.registry import create_backbone

    kwargs = dict(cfg.backbone_kwargs)
    if from_checkpoint:
        kwargs = {k: v for k, v in kwargs.items() if not k.endswith("weights")}
    backbone = create_backbone(
        cfg.backbone,
        pretrained=cfg.pretrained and not from_checkpoint,
        weights=None if from_checkpoint else cfg.weights,
        img_size=cfg.image_size,
        **kwargs,
    )
    return Embedder(backbone, cfg.dim)


CHECKPOINT_FORMAT = "mltk-checkpoint-1"


def save_checkpoint(state: dict, path: Path) -> None:
    """Write atomically: a temporary file in the same folder, flushed, then renamed over ``path``."""
    import os

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save({"format": CHECKPOINT_FORMAT, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    """The checkpoint's known fields, each checked; ``source`` names it in the error. Other keys are left out."""
    from mltk.config import make_config, to_dict
    from mltk.errors import UsageError

    record = run or any(key in state for key in RUN_FIELDS)  # all of them or none: a run's checkpoint or a slim one
    missing = [key for key in MODEL_FIELDS + (RUN_FIELDS if record else ()) + (RESUME_FIELDS if run else ()) if key not in state]
    if missing:
        raise MltkError(f"{source} lacks the field{'s' if len(missing) > 1 else ''} {', '.join(missing)}; it was not written by mltk, or is damaged")
    try:
        config = to_dict(make_config(state["config"], source=f"the config of {source}"))
    except UsageError as exc:  # the file's fault, not the command line's: exit 1
        raise MltkError(str(exc)) from None
    checked = {
        "format": CHECKPOINT_FORMAT,
        "config": config,
        "data_config": check_data_config(state["data_config"], source),
        "classes": _names(_check(state["classes"], source, "classes", "a list of class names or null", _is_names)),
        "model": _check(state["model"], source, "model", "a state dict (names to tensors)", _is_state_dict),
    }
    if record:
        checked["epoch"] = _check(state["epoch"], source, "epoch", "a whole number >= 0", lambda v: _is_int(v) and v >= 0)
        checked["best"] = _check(state["best"], source, "best", "{} or {epoch, score, by}", _is_best)
    for key in (RUN_FIELDS[2:] if record else ()) + (RESUME_FIELDS if run else ()):
        checked[key] = _check(state[key], source, key, "a mapping", lambda v: isinstance(v, dict))
    return checked


def check_data_config(data: dict, source: str) -> dict:
    """timm's preprocessing settings, each in range: the transform of ``make_transform`` takes them as they are."""
    if not isinstance(data, dict):
        raise MltkError(f"{source}: data_config must be a mapping, got {_show(data)}")
    known = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
    unknown, missing = sorted(set(data) - set(known), key=str), [k for k in known if k not in data]
    if unknown or missing:
        problem = f"has an unknown key {_show(unknown[0])}" if unknown else f"lacks {missing[0]!r}"
        raise MltkError(f"{source}: data_config {problem}; it holds {', '.join(known)}")
    size = _check(data["input_size"], source, "data_config.input_size", f"[channels, height, width]: 1 or 3 channels, sides 1 to {MAX_SIDE}", _is_input_size)
    channels = size[0]
    numbers = lambda v: isinstance(v, (list, tuple)) and len(v) == channels and all(_is_number(x) for x in v)  # noqa: E731
    return {
        "input_size": tuple(size),
        "interpolation": _check(data["interpolation"], source, "data_config.interpolation", f"one of {', '.join(INTERPOLATIONS)}", lambda v: isinstance(v, str) and v in INTERPOLATIONS),
        "mean": tuple(map(float, _check(data["mean"], source, "data_config.mean", f"{channels} finite numbers, one per channel", numbers))),
        "std": tuple(map(float, _check(data["std"], source, "data_config.std", f"{channels} finite numbers > 0, one per channel", lambda v: numbers(v) and min(v) > 0))),
        "crop_pct": float(_check(data["crop_pct"], source, "data_config.crop_pct", "a number in (0, 1]", lambda v: _is_number(v) and 0 < v <= 1)),
        "crop_mode": _check(data["crop_mode"], source, "data_config.crop_mode", f"one of {', '.join(CROP_MODES)}", lambda v: isinstance(v, str) and v in CROP_MODES),
    }


def _check(value, source: str, name: str, expected: str, ok):
    if not ok(value):
        raise MltkError(f"{source}: {name} must be {expected}, got {_show(value)}")
    return value


def _show(value) -> str:
    """A short quote of a value from a file: a tensor by its shape, anything else as ``mltk.config.show`` cuts it."""
    from mltk.config import show

    return f"a tensor of shape {list(value.shape)}" if isinstance(value, torch.Tensor) else show(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    import math

    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_input_size(value) -> bool:
    return (
        isinstance(value, (list, tuple)) and len(value) == 3 and all(_is_int(v) for v in value)
        and value[0] in (1, 3) and all(1 <= side <= MAX_SIDE for side in value[1:])
    )


def _is_names(value) -> bool:
    return value is None or isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value)


def _names(value) -> list[str] | None:
    return None if value is None else list(value)


def _is_state_dict(value) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _is_best(value) -> bool:
    return isinstance(value, dict) and (
        not value or set(value) == {"epoch", "score", "by"} and _is_int(value["epoch"]) and _is_number(value["score"]) and isinstance(value["by"], str)
    )


#: a run directory's checkpoints, by the name ``--checkpoint`` gives them
CHECKPOINTS = {"last": "last.pt", "best": "best.pt"}


def find_checkpoint(run: str | Path, which: str | None = None) -> Path:
    """``run`` is a checkpoint file, or a run directory: its ``which`` checkpoint ("last" or "best"), by default last.pt.

    last.pt by default, for every command: best.pt was chosen by validation recall@1, often on the very classes
    ``mltk evaluate RUN`` scores, so its figures would flatter it; and a threshold calibrated on one checkpoint holds
    for no other, so evaluate, index, export and verify must all mean the same file by RUN. A run directory with a
    best.pt alone (an MLflow run's artifacts) gives that.
    """
    from mltk.errors import UsageError

    if which is not None and which not in CHECKPOINTS:
        raise UsageError(f"unknown checkpoint {which!r}; choose {' or '.join(CHECKPOINTS)}")
    run = Path(run)
    if not run.is_dir():
        if which is not None:
            raise UsageError(f"--checkpoint {which} picks the {CHECKPOINTS[which]} of a run directory, and {str(run)!r} is not one: give the run directory, or leave --checkpoint out")
        return run
    names = [CHECKPOINTS[which]] if which is not None else ["last.pt", "best.pt"]
    for name in names:
        if (run / name).is_file():
            return run / name
    raise MltkError(f"run directory {str(run)!r} has no {' or '.join(names)}")


def inference_device(device: str | None) -> torch.device:
    """``device`` (None or ``auto``: a GPU when there is one, else the CPU); one that torch does not know, or that is not here, is one line."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from mltk.errors import UsageError

    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        raise UsageError(f"--device {device!r} is not a device torch knows; give cpu, cuda, cuda:1, mps, ...") from None
    if chosen.type == "cuda" and not (torch.cuda.is_available() and (chosen.index or 0) < torch.cuda.device_count()):
        raise UsageError(f"--device {device!r}: there is no such CUDA GPU here ({torch.cuda.device_count()} found); give --device cpu")
    if chosen.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device!r}: MPS is not available here; give --device cpu")
    return chosen


class EmbeddingModel:
    """A trained embedder with its preprocessing: ``embed(images_or_paths)`` gives L2-normalised vectors."""

    def __init__(self, embedder: Embedder, data_config: dict, config=None, classes=None, device: str | None = None):
        from mltk.data import make_transform

        self.device = inference_device(device)
        self.embedder = embedder.to(self.device).eval()
        self.data_config = data_config
        self.transform = make_transform(data_config, augment=False)
        self.mode = "L" if data_config["input_size"][0] == 1 else "RGB"
        self.config, self.classes = config, classes
        self.checkpoint: dict | None = None  # where the weights come from (``load``): path, epoch, and the run's best record

    def embed(self, images, batch_size: int = 64) -> torch.Tensor:
        """``images``: paths or PIL images (one or a list); returns an (N, dim) float32 CPU tensor."""
        import os

        from PIL import Image

        from mltk.data import LabelledImages
        from mltk.embedding import embed
        from mltk.errors import UsageError

        if not isinstance(images, (list, tuple)):
            images = [images]
        for item in images:
            if not isinstance(item, (str, os.PathLike, Image.Image)):  # an array's text would fill the screen: say what it is
                kind = type(item).__qualname__ if type(item).__module__ == "builtins" else f"{type(item).__module__}.{type(item).__qualname__}"
                shape = f" of shape {tuple(item.shape)}" if isinstance(getattr(item, "shape", None), tuple) else ""  # torch.Size too
                raise UsageError(
                    f"embed takes image paths or PIL images (one or a list), got {kind}{shape}; for an array of pixels give "
                    "PIL.Image.fromarray(array), and a preprocessed (N, C, H, W) batch to model.embedder.embed(batch)"
                )
        return torch.from_numpy(embed(self, LabelledImages(list(images), [0] * len(images), ["?"]), batch_size, workers=0))

    def fingerprint(self) -> str:
        """A digest of what decides the embeddings (the weights and the preprocessing): a calibrated threshold names it."""
        import hashlib
        import json

        digest = hashlib.sha256(json.dumps(self.data_config, sort_keys=True, default=str).encode())
        for name, tensor in sorted(self.embedder.state_dict().items()):
            tensor = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
            digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
        return "sha256:" + digest.hexdigest()


def load(run: str | Path, device: str | None = None, checkpoint: str | None = None) -> EmbeddingModel:
    """The trained embedder of a run directory (its ``checkpoint``, ``find_checkpoint``'s default last.pt) or of a
    checkpoint file, ready for inference."""
    from mltk.config import make_config

    path = find_checkpoint(run, checkpoint)
    state = load_checkpoint(path)
    cfg = make_config(state["config"])  # checked by load_checkpoint
    try:
        embedder = build_embedder(cfg, from_checkpoint=True)
    except MltkError as exc:  # e.g. a backbone no plugin registers here: the file's problem, named as such
        raise MltkError(f"checkpoint {str(path)!r}: {exc}") from None
    load_state(embedder, state["model"], repr(str(path)))
    channels, takes = state["data_config"]["input_size"][0], input_channels(embedder)
    if takes is not None and channels != takes:  # e.g. backbone_kwargs in_chans: 1 with RGB preprocessing
        raise MltkError(f"checkpoint {str(path)!r}: data_config.input_size has {channels} channels, the model takes {takes}")
    model = EmbeddingModel(embedder, state["data_config"], cfg, state["classes"], device)
    model.checkpoint = {"path": str(path.resolve()), "epoch": state.get("epoch"), "best": state.get("best") or None}  # a slim one (an index's model.pt): no record
    return model


def input_channels(module: nn.Module) -> int | None:
    """The channels the first convolution takes (None: the model has none)."""
    first = next((m for m in module.modules() if isinstance(m, nn.Conv2d)), None)
    return first.in_channels if first is not None else None
