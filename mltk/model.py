"""Models: the Embedder (backbone + neck), the hybrid backbone, weights from local files, and EmbeddingModel for
inference (a checkpoint's layout is ``mltk.checkpoint``'s)."""

from pathlib import Path

import torch
from torch import nn

from mltk.checkpoint import find_checkpoint, load_checkpoint, safe_load
from mltk.devices import resolve_device
from mltk.errors import MltkError
from mltk.rules import show


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
                raise MltkError(f"{source} holds {bad} values in {show(name)}; the file is damaged, or was saved from a run that diverged: give another")


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


def inference_device(device: str | None) -> torch.device:
    """``device`` (None or ``auto``: a GPU when there is one, else the CPU), checked (``mltk.devices``)."""
    return resolve_device(device)


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
