"""Model pieces: the hybrid backbone and loading weights from local files."""

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


def check_weights_file(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise MltkError(f"weights file {str(path)!r} does not exist; give the path of a .pt/.pth/.safetensors file")
    return path


def safe_load(path: Path, what: str):
    """``torch.load(weights_only=True)``: tensors and plain containers only; a pickle that would run code is refused."""
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
        first = (text.strip().splitlines() or [type(exc).__name__])[0]
        raise MltkError(f"{str(path)!r} is not a {what} torch can read ({type(exc).__name__}: {first})") from None


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file, never unpickling code (``weights_only=True``)."""
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
    return {k.removeprefix("module."): v for k, v in state.items()}


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

    ``dim=None`` keeps the backbone's features as they are (no neck): an untrained backbone.
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


def load_checkpoint(path: str | Path) -> dict:
    """A checkpoint dict, read with ``weights_only=True`` (a pickle that would run code is refused)."""
    path = Path(path)
    if not path.is_file():
        raise MltkError(f"checkpoint {str(path)!r} does not exist")
    state = safe_load(path, "checkpoint")
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise MltkError(f"{str(path)!r} is not an mltk checkpoint (a weights file goes to --weights)")
    return state


def find_checkpoint(run: str | Path) -> Path:
    """``run`` is a checkpoint file or a run directory (best.pt, else last.pt)."""
    run = Path(run)
    if run.is_dir():
        for name in ("best.pt", "last.pt"):
            if (run / name).is_file():
                return run / name
        raise MltkError(f"run directory {str(run)!r} has no best.pt or last.pt")
    return run


class EmbeddingModel:
    """A trained embedder with its preprocessing: ``embed(images_or_paths)`` gives L2-normalised vectors."""

    def __init__(self, embedder: Embedder, data_config: dict, config=None, classes=None, device: str | None = None):
        from mltk.data import make_transform

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.embedder = embedder.to(self.device).eval()
        self.data_config = data_config
        self.transform = make_transform(data_config, augment=False)
        self.mode = "L" if data_config["input_size"][0] == 1 else "RGB"
        self.config, self.classes = config, classes

    @torch.no_grad()
    def embed(self, images, batch_size: int = 64) -> torch.Tensor:
        """``images``: paths or PIL images (one or a list); returns an (N, dim) float32 CPU tensor."""
        from mltk.data import open_image

        if not isinstance(images, (list, tuple)):
            images = [images]
        out = []
        for start in range(0, len(images), batch_size):
            batch = torch.stack([self.transform(open_image(im, self.mode)) for im in images[start : start + batch_size]])
            out.append(self.embedder.embed(batch.to(self.device)).cpu())
        return torch.cat(out) if out else torch.empty(0, self.embedder.dim)


def load(run: str | Path, device: str | None = None) -> EmbeddingModel:
    """The trained embedder of a run directory (or checkpoint file), ready for inference."""
    from mltk.config import make_config

    path = find_checkpoint(run)
    state = load_checkpoint(path)
    cfg = make_config(state["config"], source=f"checkpoint {run}")
    embedder = build_embedder(cfg, from_checkpoint=True)
    load_state(embedder, state["model"], repr(str(path)))
    return EmbeddingModel(embedder, state["data_config"], cfg, state.get("classes"), device)
