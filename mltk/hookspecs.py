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
    """Register metrics: ``register(name, function, needs="neighbours" | "pairs")``, needs what it reads (none: both); see mltk.metrics."""


@hookspec
def register_datasets(register):
    """Register datasets: ``register(name, builder)``; builder(**kw) -> mltk.data.LabelledImages."""


@hookspec
def register_rerankers(register):
    """Register re-rankers for ``--rerank NAME``: ``register(name, builder)``; builder(**params) -> see mltk.rerank."""


@hookspec
def register_commands(cli):
    """Add commands to the Typer app ``cli``."""


@hookspec
def register_loggers(register):
    """Register loggers for ``--log NAME``: ``register(name, factory)``; factory(config, run_dir) -> an object implementing the run hooks below.

    ``mltk evaluate`` makes them too, with the evaluated model's config and run directory (None for an untrained backbone,
    and for a checkpoint outside a run directory)."""


# A run's lifecycle, on the process that writes the run directory (rank 0 under torchrun). A hook that raises is
# reported once, with its plugin's name, and not called again in that run; the run goes on.


@hookspec
def run_started(config, run_dir):
    """A run starts: its resolved RunConfig and its run directory (config.yaml written, no epoch trained yet)."""


@hookspec
def step_logged(epoch, step, steps, logs):
    """Step ``step`` of ``steps`` in epoch ``epoch`` (both from 1) ended; logs: loss, loss/<term>, lr, images_per_s."""


@hookspec
def epoch_ended(record, run_dir):
    """An epoch ended and is saved; record is its metrics.jsonl line. Return a reason (a string) to stop the run after it."""


@hookspec
def validation_embedded(epoch, embeddings, labels, sources, classes):
    """The validation images were embedded after epoch ``epoch``: float32 rows, their labels, files and the class names."""


@hookspec
def run_ended(result, error):
    """The run ended: its mltk.train.RunResult; error is the exception that ended it (Ctrl-C: mltk.errors.Interrupted), or None."""


# An evaluation, on the process that wrote its folder.


@hookspec
def evaluation_ended(config, run_dir, out, metrics, provenance):
    """``mltk evaluate`` wrote its folder ``out``: the model's RunConfig and run directory (either None), the metrics as
    metrics.json holds them (a value that is not a finite number is None), and what was evaluated: mltk.evaluate.EvalResult's
    provenance (the data and its fingerprint, the checkpoint and its ``checkpoint_epoch``, mltk's version, the time)."""
