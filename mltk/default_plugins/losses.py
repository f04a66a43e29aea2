"""Built-in losses: center, ce, arcface, and every pytorch-metric-learning loss by its class name."""

import functools
import inspect

import mltk

# PML classes that are building blocks or wrappers, not losses one composes by name.
NOT_LOSSES = {
    "BaseMetricLossFunction", "BaseLossWrapper", "GenericPairLoss", "MultipleLosses", "CrossBatchMemory",
    "SelfSupervisedLoss", "EmbeddingRegularizerMixin", "WeightRegularizerMixin",
}
# Parameters a config file cannot give (objects: a distance, a reducer, a regulariser; set by a subclass)
# and those mltk gives (the sizes): left out of the options a builder declares.
NOT_OPTIONS = {"distance", "reducer", "embedding_regularizer", "weight_regularizer", "weight_init_func", "mat_based_loss"}
SIZES = {"num_classes", "embedding_size", "l", "descriptors_dim"}


@functools.lru_cache(maxsize=None)
def options(cls: type, leading: tuple[str, ...] = ()) -> inspect.Signature:
    """A builder's signature for ``cls``: ``leading`` (what mltk passes), then by keyword the options of
    ``cls.__init__`` and its bases' (the first default wins), which mltk.config checks a config against."""
    params = {name: inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD) for name in leading}
    for c in cls.__mro__:
        if "__init__" not in vars(c):
            continue
        try:
            found = list(inspect.signature(c.__init__).parameters.values())[1:]  # without self
        except (TypeError, ValueError):
            continue
        for p in found:
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in NOT_OPTIONS | SIZES:
                params.setdefault(p.name, p.replace(kind=p.KEYWORD_ONLY))
    return inspect.Signature(list(params.values()))


def declared(builder, cls: type, leading: tuple[str, ...] = ("num_classes", "embedding_size")):
    """``builder`` (a partial) that says, through its signature, which options it takes."""
    builder = functools.partial(builder)
    builder.__signature__ = options(cls, leading)
    return builder


def pml_loss(class_name: str, num_classes: int, embedding_size: int, **kwargs):
    """A PML loss; ``num_classes``/``embedding_size`` are passed only to losses that take them."""
    from pytorch_metric_learning import losses

    cls = getattr(losses, class_name)
    from mltk.errors import UsageError

    # Subclasses often take *args/**kwargs and pass them on: look at every __init__ in the MRO.
    inits = [inspect.signature(c.__init__).parameters for c in cls.__mro__ if "__init__" in vars(c)]
    params = {name for p in inits for name in p}
    # ManifoldLoss calls the embedding size ``l``, P2SGradLoss ``descriptors_dim``.
    sizes = {"num_classes": num_classes, "embedding_size": embedding_size, "l": embedding_size, "descriptors_dim": embedding_size}
    try:
        return cls(**{k: v for k, v in sizes.items() if k in params}, **kwargs)
    except TypeError as exc:  # a required option without default, or an option it does not take
        raise UsageError(f"loss {class_name!r}: {exc}; set its options under loss_options in the config file") from None


def center(num_classes: int, embedding_size: int, **kwargs):
    from mltk.losses import CenterLoss

    return CenterLoss(num_classes, embedding_size, **kwargs)


def ce(num_classes: int, embedding_size: int, **kwargs):
    from mltk.losses import CrossEntropyLoss

    return CrossEntropyLoss(num_classes, embedding_size, **kwargs)


def arcface(num_classes: int, embedding_size: int, **kwargs):
    """PML's ArcFaceLoss (margin in degrees, default 28.6; scale 64)."""
    return pml_loss("ArcFaceLoss", num_classes, embedding_size, **kwargs)


@mltk.hookimpl
def register_losses(register):
    from pytorch_metric_learning import losses

    from mltk.losses import CANNOT_TRAIN, CenterLoss, CrossEntropyLoss

    register("center", declared(center, CenterLoss), description="CenterLoss: distance of each embedding to its learned class center")
    register("ce", declared(ce, CrossEntropyLoss), description="softmax cross-entropy through a linear classifier on the embedding")
    register("arcface", declared(arcface, losses.ArcFaceLoss), description="pytorch-metric-learning ArcFaceLoss")
    for name, cls in sorted(vars(losses).items()):
        if inspect.isclass(cls) and issubclass(cls, losses.BaseMetricLossFunction) and name not in NOT_LOSSES:
            why = f"; cannot train under mltk run: {CANNOT_TRAIN[name]}" if name in CANNOT_TRAIN else ""
            register(name, declared(functools.partial(pml_loss, name), cls), description=f"pytorch-metric-learning{why}")
