"""Built-in backbones: resnet50, resnet101, swin, hybrid, and every timm model by its timm name."""

import mltk


def timm_backbone(model_name: str, pretrained: bool = False, weights: str | None = None, img_size: int | None = None, **kwargs):
    """A timm model without its classifier (pooled features, ``num_features`` wide).

    ``weights`` is a local file (state dict or safetensors) loaded the way timm loads pretrained
    weights: converted by timm's filter for the architecture (an original Swin checkpoint, say),
    classifier keys dropped, channels adapted, ``weights_only=True``. ``img_size`` is
    passed on to models built for a fixed input size (ViT, Swin); CNNs take any size.
    A file of another architecture is an error naming the keys, not a silently random model.
    """
    import timm

    from mltk.errors import MltkError
    from mltk.model import read_state_dict

    pretrained_cfg = timm.get_pretrained_cfg(model_name)
    if img_size is not None and getattr(pretrained_cfg, "fixed_input_size", False):
        kwargs["img_size"] = img_size
    overlay = None
    if weights is not None:
        state = read_state_dict(weights)  # mltk's checks (safe unpickling, one-line errors) before timm sees it
        check_keys(model_name, state, weights, kwargs)
        overlay = {"state_dict": state, "file": None, "hf_hub_id": None, "url": None}
    try:
        return timm.create_model(
            model_name, pretrained=pretrained or weights is not None, pretrained_cfg_overlay=overlay, num_classes=0, **kwargs
        )
    except RuntimeError as exc:  # the skeleton built, so this is the file: "size mismatch for ...", channels
        if weights is None:
            raise
        lines = [line.strip().rstrip(".") for line in str(exc).splitlines() if line.strip() and "Error(s) in loading" not in line]
        lines = lines or [type(exc).__name__]
        more = f" (and {len(lines) - 1} more)" if len(lines) > 1 else ""
        raise MltkError(f"{str(weights)!r} does not fit backbone {model_name!r}: {lines[0]}{more}") from None


def check_keys(model_name: str, state: dict, weights: str, kwargs: dict) -> None:
    """The file's keys, once timm's own conversion for the architecture has run, must be the model's.

    timm loads non-strictly, so a gap would silently stay random. Before comparing, the checkpoint goes
    through the filter timm runs on pretrained weights of this architecture (``timm_filter``): an original
    Swin checkpoint or another layout timm converts fits as it would from the hub. Classifier weights and
    non-persistent buffers (Swin's relative_position_index) may be in the file too.
    """
    from mltk.errors import MltkError, first_line
    from mltk.model import state_mismatch

    skeleton, convert = timm_filter(model_name, state, kwargs)
    if convert is not None:
        try:  # a copy: filters may edit the dict in place, and timm runs the filter again on ``state`` as it loads
            state = apply_filter(convert, dict(state), skeleton)
        except Exception as exc:  # the file's layout is not one timm knows for this architecture
            raise MltkError(f"{str(weights)!r} does not fit backbone {model_name!r}: timm's conversion failed ({type(exc).__name__}: {first_line(exc, '')})") from None
    own = skeleton.state_dict()
    classifier = skeleton.pretrained_cfg.get("classifier") or ()
    heads = tuple(f"{c}." for c in ([classifier] if isinstance(classifier, str) else classifier))
    transient = {name for name, _ in skeleton.named_buffers()} - set(own)
    problem = state_mismatch(own, {k: v for k, v in state.items() if not k.startswith(heads) and k not in transient}, shapes=False)
    if problem:
        raise MltkError(f"{str(weights)!r} does not fit backbone {model_name!r}: {problem}")


def timm_filter(model_name: str, state: dict, kwargs: dict):
    """The model on the meta device (its keys, no memory) and the checkpoint filter timm applies for it (or None).

    timm records the filter nowhere: each architecture's ``_create_*`` passes it to ``build_model_with_cfg``
    as ``pretrained_filter_fn`` (swin's ``checkpoint_filter_fn``, deit's partial of it, densenet's torchvision
    one, ...), which hands it to ``load_pretrained(filter_fn=...)``. So the model is built as for pretrained
    weights with ``load_pretrained`` swapped, for those milliseconds, for a function that keeps the filter and
    loads nothing (a process-wide swap: mltk builds its models from one thread).
    """
    from unittest import mock

    import timm
    import torch
    from timm.models import _builder

    found = {}

    def keep_filter(model, *args, filter_fn=None, **kw):
        found["filter"] = filter_fn

    local = {"state_dict": state, "file": None, "hf_hub_id": None, "url": None}  # nothing is fetched
    with mock.patch.object(_builder, "load_pretrained", keep_filter), torch.device("meta"):
        skeleton = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=local, num_classes=0, **kwargs)
    return skeleton, found.get("filter")


def apply_filter(convert, state: dict, model) -> dict:
    """``convert(state, model)`` as timm's ``load_pretrained`` calls it (older filters take the state alone)."""
    try:
        return convert(state, model)
    except TypeError:
        return convert(state)


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
