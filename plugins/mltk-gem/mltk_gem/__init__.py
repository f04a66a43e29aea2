"""mltk plugin: GeM-pooled backbones. Light at import: torch is imported by the builders."""

import functools

import mltk

PRESETS = ("resnet18", "resnet50", "resnet101")


def gem(pretrained: bool = False, weights: str | None = None, base: str = "resnet50", p: float = 3.0, learn_p: bool = True, **kwargs):
    """A timm CNN from mltk's registry with its global pooling replaced by GeM."""
    from mltk.registry import create_backbone
    from mltk_gem.pooling import GeMBackbone

    return GeMBackbone(create_backbone(base, pretrained=pretrained, weights=weights, **kwargs), p=p, learn_p=learn_p)


@mltk.hookimpl
def register_backbones(register):
    register("gem", gem, description="any timm CNN (base=...) with GeM pooling")
    for base in PRESETS:
        register(f"gem_{base}", functools.partial(gem, base=base), description=f"{base} with GeM pooling")
