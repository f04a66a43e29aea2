"""Model pieces: the hybrid backbone and loading weights from local files."""

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


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a local file, never unpickling code (``weights_only=True``)."""
    path = check_weights_file(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MltkError(f"{str(path)!r} is not a readable weights file ({first})") from None
    for key in ("state_dict", "model", "backbone"):  # common wrappers around the weights
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MltkError(f"{str(path)!r} holds no state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_weights_file(model: nn.Module, path: str | Path) -> None:
    """Load a local weights file into ``model``; a mismatch names the keys that differ."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong_shape:
        parts = [
            f"{label} {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''} ({len(keys)})"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
            if keys
        ]
        raise MltkError(f"{str(path)!r} does not fit this model: {'; '.join(parts)}")
    model.load_state_dict(state)
