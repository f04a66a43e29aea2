"""``mltk run``: train an embedding model composed from the registry."""

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from mltk.cli.options import BatchSize, Device, Pretrained, Workers, classes_option, data_option, log_option, logger_names, out_option
from mltk.errors import Interrupted, MltkError


def run(
    data: Annotated[Optional[str], data_option("Training images", "digits")] = None,
    classes: Annotated[Optional[list[str]], classes_option("--data")] = None,
    val_data: Annotated[Optional[str], typer.Option(help="Validation images (same forms as --data).")] = None,
    val_classes: Annotated[Optional[float], typer.Option(help="Hold out this fraction of the classes for validation.")] = None,
    backbone: Annotated[Optional[str], typer.Option(help="Backbone name: `mltk list backbones`.")] = None,
    loss: Annotated[Optional[str], typer.Option(help="Losses joined by '+', each with an optional weight: 0.01*center+ce+arcface.")] = None,
    dim: Annotated[Optional[int], typer.Option(help="Embedding dimension (0: no neck, the backbone's pooled features as they are).")] = None,
    miner: Annotated[Optional[str], typer.Option(help="Miner name: `mltk list miners`.")] = None,
    augment: Annotated[Optional[bool], typer.Option("--augment/--no-augment", help="Random resized crops, flips, colour jitter.")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs to train (0: save the untrained model).")] = None,
    batch_size: BatchSize = None,
    m_per_class: Annotated[Optional[int], typer.Option(help="Images per class in a batch.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Learning rate of the model.")] = None,
    backbone_lr: Annotated[Optional[float], typer.Option(help="Learning rate of the backbone (default: --lr); lower it to fine-tune a pretrained one gently.")] = None,
    layer_decay: Annotated[Optional[float], typer.Option(help="Discriminative rates: each backbone layer learns at this times the next one's rate (e.g. 0.7; timm's layer-wise decay; the hybrid's towers each count down from their own last layer).")] = None,
    loss_lr: Annotated[Optional[float], typer.Option(help="Learning rate of the losses' own parameters.")] = None,
    image_size: Annotated[Optional[int], typer.Option(help="Image side in pixels (default: the backbone's).")] = None,
    pretrained: Pretrained = None,
    weights: Annotated[Optional[str], typer.Option(help="Local backbone weights file (.pt/.pth/.safetensors).")] = None,
    freeze_backbone: Annotated[Optional[bool], typer.Option("--freeze-backbone/--train-backbone", help="Train only the neck and the losses.")] = None,
    freeze_backbone_epochs: Annotated[Optional[int], typer.Option(help="Train the neck and the losses alone for this many epochs, then the backbone too.")] = None,
    freeze_bn: Annotated[Optional[bool], typer.Option("--freeze-bn/--train-bn", help="Keep the backbone's BatchNorm statistics and scales as loaded (pretrained).")] = None,
    amp: Annotated[Optional[bool], typer.Option("--amp/--no-amp", help="Mixed precision: bf16 on the CPU, bf16 (fp16 where it lacks bf16) on a GPU. Default: on with a GPU or a CPU with bf16 dot products (AMX, AVX512-BF16), else off.")] = None,
    early_stop: Annotated[Optional[int], typer.Option(help="Stop after this many epochs without a better best epoch (validation recall@1, else training loss).")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed.")] = None,
    workers: Workers = None,
    in_memory: Annotated[Optional[bool], typer.Option("--in-memory/--no-in-memory", help="Decode the training images once and keep them in memory when they take at most a quarter of the free memory (default: on).")] = None,
    device: Device = None,
    out: Annotated[Optional[Path], out_option("Run directory; one that already holds a run needs --resume or --overwrite", "a new runs/<time>")] = None,
    config: Annotated[Optional[Path], typer.Option(help="YAML config; options given here override it.")] = None,
    log: Annotated[Optional[list[str]], log_option("Loggers that follow the run")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar and no line per epoch: warnings and the summary only.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its last.pt, with its settings (only --epochs, --workers, --in-memory, --device, --log, --early-stop may change).")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Start the run in --out over: deletes its config.yaml, metrics.jsonl, last.pt, best.pt, skipped_images.txt and tensorboard/, nothing else.")] = False,
) -> None:
    """Train an embedding model: backbone + neck, weighted losses, m-per-class batches.

    More processes (GPUs, nodes): torchrun --nproc-per-node N -m mltk run ... (--batch-size is per process).
    """
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from mltk import config as config_mod
    from mltk.cli.output import console, shows_progress, warn

    # The config's fields, by name (None: not given); --out is left out: it picks the run directory below.
    options = dict(
        data=data, data_classes=classes, val_data=val_data, val_classes=val_classes, backbone=backbone, loss=loss, dim=dim, miner=miner, augment=augment,
        epochs=epochs, batch_size=batch_size, m_per_class=m_per_class, lr=lr, backbone_lr=backbone_lr, layer_decay=layer_decay, loss_lr=loss_lr, image_size=image_size,
        pretrained=pretrained, weights=weights, freeze_backbone=freeze_backbone, freeze_backbone_epochs=freeze_backbone_epochs, freeze_bn=freeze_bn, amp=amp,
        early_stop=early_stop, seed=seed, workers=workers, in_memory=in_memory, device=device, log=logger_names(log),
    )
    if resume:
        if out is None or not (out / "last.pt").is_file():
            raise MltkError("--resume needs --out RUN_DIR of a run that has a last.pt")
        config = config or out / "config.yaml"
    cfg = config_mod.resolve(config, options)
    run_dir = out or cfg.out  # None: train() makes a new runs/<time>

    from mltk.distributed import from_environment
    from mltk.train import train

    if not from_environment().is_main:  # under torchrun, rank 0 shows progress and the summary
        try:
            train(cfg, run_dir, resume=resume, overwrite=overwrite, config_file=config)
        except Interrupted as exc:
            raise typer.Exit(exc.exit_code) from None
        return
    with Progress(
        TextColumn("epoch {task.fields[epoch]}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.4f}  {task.fields[ips]:.0f} img/s"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        auto_refresh=False,  # redrawn at each step, never by a thread: see mltk.cli.output.phases
        disable=quiet or not shows_progress(),
    ) as progress:
        task = progress.add_task("train", total=None, epoch="-", loss=float("nan"), ips=0.0)
        losses: list[float] = []  # this epoch's, for the running mean

        def on_step(epoch: int, step: int, steps: int, logs: dict) -> None:
            if step == 1:
                losses.clear()
            losses.append(logs["loss"])
            running = sum(losses) / len(losses)
            progress.update(task, completed=step, total=steps, epoch=f"{epoch + 1}/{cfg.epochs}", loss=running, ips=logs["images_per_s"], refresh=True)

        def on_epoch(record: dict) -> None:
            if not quiet:
                val = f"  val recall@1 {record['val_recall@1']:.4f}" if "val_recall@1" in record else ""
                progress.console.print(f"epoch {record['epoch']:>3}  loss {record['loss']:.4f}  {record['images_per_s']:.0f} img/s{val}")

        try:
            result = train(cfg, run_dir, resume=resume, overwrite=overwrite, on_step=on_step, on_epoch=on_epoch, on_warning=warn, config_file=config)
        except Interrupted as exc:  # Typer would exit 130 silently: say what was kept and how to go on
            print(exc, file=sys.stderr)
            raise typer.Exit(exc.exit_code) from None
    render_summary(result)


#: metrics.jsonl's precision, in the summary's words
PRECISION_WORDS = {"bf16": "bf16 autocast", "fp16": "fp16 autocast, loss scaling", "fp32": "float32"}


def render_summary(result) -> None:
    """The end of a run: a table of the last epoch and where the run directory is."""
    from rich.markup import escape
    from rich.table import Table

    from mltk.cli.output import cell, console
    from mltk.display import one_line

    table = Table("", "", box=None, show_header=False)
    table.add_row("train images / classes", f"{result.train_images} / {result.train_classes}")
    if result.in_memory:
        table.add_row("train images", f"decoded once, kept in memory ({result.in_memory / 2**20:.1f} MiB)")
    if result.val_images:
        table.add_row("validation images / classes", f"{result.val_images} / {result.val_classes}")
    if result.history:
        last = result.history[-1]
        table.add_row("epochs", str(last["epoch"]))
        for key in sorted(k for k in last if k.startswith("loss") and k != "loss_lr"):
            table.add_row(key, f"{last[key]:.4f}")
        table.add_row("images/s", f"{last['images_per_s']:.0f}")
        if "val_recall@1" in last:
            table.add_row("val recall@1", f"{last['val_recall@1']:.4f}")
    if result.precision:
        table.add_row("precision", f"{PRECISION_WORDS[result.precision]} ({result.precision_reason})")
    if result.best:
        table.add_row("best epoch", f"{result.best['epoch']} ({result.best['by']})")
    if result.stopped:
        table.add_row("stopped early", cell(result.stopped))  # a plugin's words: data, not markup
    console.print(table)
    files = "best.pt, last.pt, config.yaml, metrics.jsonl" + (", tensorboard/" if (result.run_dir / "tensorboard").is_dir() else "")
    console.print(f"run directory: [bold]{escape(one_line(result.run_dir))}[/bold]  ({files})")
