"""The hooks a plugin implements; each receives a ``register`` callback."""

from pluggy import HookimplMarker, HookspecMarker

hookspec = HookspecMarker("mltk")
hookimpl = HookimplMarker("mltk")


@hookspec
def register_backbones(register):
    """Register backbones: ``register(name, builder, description="")``; builder(pretrained, weights, **kw)."""


@hookspec
def register_losses(register):
    """Register losses: ``register(name, builder)``; builder(num_classes, embedding_size, **kw) -> PML loss."""


@hookspec
def register_miners(register):
    """Register miners: ``register(name, builder)``; builder(**kw) -> PML miner."""


@hookspec
def register_metrics(register):
    """Register metrics: ``register(name, function)``; see mltk.metrics for the signature."""


@hookspec
def register_datasets(register):
    """Register datasets: ``register(name, builder)``; builder(**kw) -> mltk.data.LabelledImages."""


@hookspec
def register_commands(cli):
    """Add commands to the Typer app ``cli``."""
