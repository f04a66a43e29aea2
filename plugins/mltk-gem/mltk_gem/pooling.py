"""Generalised-mean pooling over a CNN's feature map."""

import torch
from torch import nn


class GeM(nn.Module):
    """``(mean(x^p))^(1/p)`` over the spatial positions; ``p`` is learned unless ``learn_p=False``."""

    def __init__(self, p: float = 3.0, learn_p: bool = True, eps: float = 1e-6):
        super().__init__()
        p = torch.tensor(float(p))
        if learn_p:
            self.p = nn.Parameter(p)
        else:
            self.register_buffer("p", p)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)


class GeMBackbone(nn.Module):
    """A timm CNN's ``forward_features`` followed by GeM; ``num_features`` as the CNN's."""

    def __init__(self, cnn: nn.Module, p: float = 3.0, learn_p: bool = True):
        super().__init__()
        if not hasattr(cnn, "forward_features"):
            raise TypeError(f"{type(cnn).__name__} has no forward_features(); GeM needs a timm CNN")
        self.cnn = cnn
        self.pool = GeM(p, learn_p)
        self.num_features = cnn.num_features
        self.pretrained_cfg = getattr(cnn, "pretrained_cfg", {})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.cnn.forward_features(x)
        if features.ndim != 4:
            raise ValueError(f"GeM needs a (N, C, H, W) feature map; {type(self.cnn).__name__} gives {tuple(features.shape)}")
        return self.pool(features)
