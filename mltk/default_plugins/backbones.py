"""Built-in backbones: resnet50, resnet101, swin, hybrid, and every timm model by its timm name."""

import mltk


def timm_backbone(model_name: str, pretrained: bool = False, weights: str | None = None, img_size: int | None = None, **kwargs):
    """A timm model without its classifier (pooled features, ``num_features`` wide).

    ``weights`` is a local file (state dict or safetensors) loaded the way timm loads pretrained
    weights: classifier keys dropped, channels adapted, ``weights_only=True``. ``img_size`` is
    passed on to models built for a fixed input size (ViT, Swin); CNNs take any size.
    """
    import timm

    from mltk.model import check_weights_file

    pretrained_cfg = timm.get_pretrained_cfg(model_name)
    if img_size is not None and getattr(pretrained_cfg, "fixed_input_size", False):
        kwargs["img_size"] = img_size
    overlay = None
    if weights is not None:
        overlay = {"file": str(check_weights_file(weights)), "hf_hub_id": None, "url": None}
    return timm.create_model(
        model_name, pretrained=pretrained or weights is not None, pretrained_cfg_overlay=overlay, num_classes=0, **kwargs
    )


def resnet50(pretrained: bool = False, weights: str | None = None, img_size: int | None = None, **kwargs):
    return timm_backbone("resnet50", pretrained, weights, **kwargs)


def resnet101(pretrained: bool = False, weights: str | None = None, img_size: int | None = None, **kwargs):
    return timm_backbone("resnet101", pretrained, weights, **kwargs)


def swin(
    pretrained: bool = False,
    weights: str | None = None,
    model: str = "swin_base_patch4_window7_224",
    img_size: int | None = None,
    **kwargs,
):
    """A Swin Transformer (timm); ``img_size`` other than the model's own is accepted."""
    return timm_backbone(model, pretrained, weights, img_size=img_size, **kwargs)


def hybrid(
    pretrained: bool = False,
    weights: str | None = None,
    cnn: str = "resnet101",
    swin_model: str = "swin_base_patch4_window7_224",
    img_size: int | None = None,
    cnn_kwargs: dict | None = None,
    swin_kwargs: dict | None = None,
    cnn_weights: str | None = None,
    swin_weights: str | None = None,
):
    """A CNN tower and a Swin tower on the same image, pooled features concatenated.

    ``weights`` loads a whole hybrid state dict; ``cnn_weights``/``swin_weights`` load each tower
    from its own timm weights file.
    """
    from mltk.model import HybridBackbone, load_weights_file

    cnn_tower = timm_backbone(cnn, pretrained, cnn_weights, **(cnn_kwargs or {}))
    swin_tower = swin(pretrained, swin_weights, model=swin_model, img_size=img_size, **(swin_kwargs or {}))
    model = HybridBackbone(cnn_tower, swin_tower, img_size=img_size)
    if weights is not None:
        load_weights_file(model, weights)
    return model


BUILTINS = {
    "resnet50": (resnet50, "ResNet-50 (timm), 2048 features"),
    "resnet101": (resnet101, "ResNet-101 (timm), 2048 features"),
    "swin": (swin, "Swin Transformer (timm swin_base_patch4_window7_224 unless model= is given)"),
    "hybrid": (hybrid, "ResNet-101 tower + Swin tower, pooled features concatenated"),
}


@mltk.hookimpl
def register_backbones(register):
    import functools

    import timm

    for name, (builder, description) in BUILTINS.items():
        register(name, builder, description=description)
    for name in timm.list_models():
        if name not in BUILTINS:
            register(name, functools.partial(timm_backbone, name), description="timm")
