"""Built-in logger: ``--log tensorboard`` writes TensorBoard event files to RUN/tensorboard.

Scalars: each step's loss terms, learning rate and images/s under ``step/``; each epoch's metrics.jsonl record
under ``epoch/``. Both are plotted against the training step (epoch k ends at step k x steps per epoch), so a
resumed run continues the same curves: the steps of the epoch it redoes are purged. At the end of the run,
the last validation embeddings go to TensorBoard's projector with each image's class and thumbnail.

``mltk evaluate`` adds its metrics under ``eval/``, at the evaluated checkpoint's epoch. The run's settings go to
TensorBoard's HParams view (a session start in the same folder, no experiment summary: TensorBoard then gathers
the settings of every run under its --logdir and shows each against its last scalars, eval/ and epoch/ ones).
"""

from pathlib import Path

import mltk

MAX_POINTS = 2000  # projector points: an even sample of the validation images (the sprite stays under 8192 px a side)
THUMBNAIL = 48  # pixels a side in the sprite


@mltk.hookimpl
def register_loggers(register):
    register("tensorboard", TensorBoardLogger, description="TensorBoard event files in RUN/tensorboard: scalars per step and epoch, projector")


class TensorBoardLogger:
    def __init__(self, config, run_dir):
        try:
            import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it)
        except ImportError:
            from mltk.errors import UsageError

            raise UsageError("--log tensorboard needs the tensorboard package: pip install tensorboard") from None
        self.writer = None
        self.folder: Path | None = None
        self.done_epochs = 0  # what the run directory held at the start (a resumed run's epochs)
        self.steps = 0  # steps per epoch, known at the first step
        self.projection = None  # (epoch, embeddings, labels, sources, classes) of the last validation, sampled
        self.config_text = ""
        self.config = None

    def open(self, steps: int):
        """The writer, made at the first thing to write: a resume purges the steps after its checkpoint."""
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self.steps = steps
            purge = self.done_epochs * steps + 1 if self.done_epochs and steps else None
            self.writer = SummaryWriter(log_dir=str(self.folder), purge_step=purge)
            if self.config is not None:
                _write_hparams(self.writer, self.config)
        return self.writer

    @mltk.hookimpl
    def run_started(self, config, run_dir):
        import yaml

        from mltk.config import to_dict

        self.folder = Path(run_dir) / "tensorboard"
        self.done_epochs = _epochs_done(Path(run_dir))
        self.config = config
        self.config_text = "\n".join("    " + line for line in yaml.safe_dump(to_dict(config), sort_keys=False).splitlines())  # a code block: shown as text

    @mltk.hookimpl
    def step_logged(self, epoch, step, steps, logs):
        writer = self.open(steps)
        for key, value in logs.items():
            writer.add_scalar(f"step/{key}", value, (epoch - 1) * steps + step)

    @mltk.hookimpl
    def epoch_ended(self, record, run_dir):
        writer = self.open(self.steps)
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)):
                writer.add_scalar(f"epoch/{key}", value, record["epoch"] * self.steps)
        if record["epoch"] == self.done_epochs + 1:
            writer.add_text("config", self.config_text, record["epoch"] * self.steps)
        writer.flush()

    @mltk.hookimpl
    def validation_embedded(self, epoch, embeddings, labels, sources, classes):
        import numpy as np

        rows = np.unique(np.linspace(0, len(embeddings) - 1, min(len(embeddings), MAX_POINTS)).astype(int)) if len(embeddings) else []
        self.projection = (epoch, np.array(embeddings[rows]), np.asarray(labels)[rows], [sources[i] for i in rows], classes)

    @mltk.hookimpl
    def run_ended(self, result, error):
        if self.folder is None:
            return
        writer = self.open(self.steps)
        try:
            if self.projection is not None:
                epoch, embeddings, labels, sources, classes = self.projection
                writer.add_embedding(
                    embeddings, metadata=[_tsv_cell(classes[y]) for y in labels], label_img=_thumbnails(sources),
                    global_step=epoch * self.steps, tag="validation",
                )
        finally:
            writer.close()

    @mltk.hookimpl
    def evaluation_ended(self, config, run_dir, out, metrics, provenance):
        """The metrics under eval/ in the run's own RUN/tensorboard, beside its curves and with its settings (a model
        from no run directory: OUT/tensorboard; an untrained backbone has no settings to show)."""
        from torch.utils.tensorboard import SummaryWriter

        epoch = provenance.get("checkpoint_epoch")
        step = epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else 0
        writer = SummaryWriter(log_dir=str(Path(run_dir if run_dir is not None else out) / "tensorboard"))
        try:
            if config is not None:
                _write_hparams(writer, config)
            for name, value in metrics.items():
                if _number(value):
                    writer.add_scalar(f"eval/{name}", value, step)
        finally:
            writer.close()


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _write_hparams(writer, config) -> None:
    """The run's settings as a session start of TensorBoard's HParams view: one per leaf of the config (nested options
    as dotted names), numbers as numbers and the rest as text (True and False too: torch's writer would make them 1 and 0),
    unset ones left out. TensorBoard keeps the first a folder holds: a later one changes nothing."""
    from torch.utils.tensorboard.summary import hparams

    from mltk.config import to_dict

    def leaves(value, prefix=""):
        if isinstance(value, dict) and value:
            for name, item in value.items():
                yield from leaves(item, f"{prefix}{name}.")
        else:
            yield prefix[:-1], value

    settings = {name: value if _number(value) else str(value) for name, value in leaves(to_dict(config)) if value is not None}
    _, session_start, _ = hparams(settings, {})  # no experiment summary: TensorBoard would take one run's for all
    writer.file_writer.add_summary(session_start)


def _epochs_done(run_dir: Path) -> int:
    from mltk.run_dir import read_history

    return max((r["epoch"] for r in read_history(run_dir)), default=0)


def _tsv_cell(name: str) -> str:
    """A class name as one cell of the projector's metadata.tsv: one line, no tab."""
    from mltk.display import one_line

    return one_line(name).replace("\t", " ") or "-"


def _thumbnails(sources):
    """The images as an (N, 3, THUMBNAIL, THUMBNAIL) tensor in [0, 1]; one that cannot be read is grey."""
    import numpy as np
    import torch
    from PIL import Image

    from mltk.data import open_image

    pictures = np.full((len(sources), THUMBNAIL, THUMBNAIL, 3), 128, dtype=np.uint8)
    for i, source in enumerate(sources):
        try:
            image = open_image(source, "RGB")
        except (OSError, ValueError, Image.DecompressionBombError):
            continue
        pictures[i] = np.asarray(image.resize((THUMBNAIL, THUMBNAIL)))
    return torch.from_numpy(pictures).permute(0, 3, 1, 2).float() / 255

