"""The training loop, top to bottom: data, model, losses, optimiser, epochs, checkpoints."""

import collections
import json
import logging
import math
import os
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from mltk import ctrl_c, distributed, registry
from mltk.config import RunConfig, check_training, to_dict
from mltk.data import (
    ImageDataset, LabelledImages, MPerClassSampler, Source, check_image, data_config, describe_files, drop_unreadable,
    load_data, make_transform, select_classes, split_classes, write_skipped,
)
from mltk.devices import cpu_bf16
from mltk.embedding import embed_dataset
from mltk.errors import Interrupted, MltkError, UsageError, is_out_of_memory, out_of_memory
from mltk.lifecycle import Lifecycle, PluginExit, Silent
from mltk.losses import WeightedLosses, build_losses, check_loss_names
from mltk.memory import available as available_memory
from mltk.checkpoint import load_checkpoint, save_checkpoint
from mltk.model import Embedder, build_embedder, load_state
from mltk.outputs import writing
from mltk.run_dir import RunDirectory, read_history, resumed_config, write_config, write_history

def check_names(cfg: RunConfig) -> None:
    registry.get("backbones", cfg.backbone)
    if cfg.epochs:
        check_loss_names(cfg.loss)
    if cfg.miner:
        registry.get("miners", cfg.miner)
    for name in cfg.log:
        registry.get("loggers", name)


def distribute(model: Embedder, losses: WeightedLosses, miner, device: torch.device, some_frozen: bool = False):
    """DDP over the model and over the parameters the losses own; the losses and the miner see every process's embeddings.

    ``some_frozen``: parameters that DDP syncs sit out some epochs (the backbone's first ones), so DDP looks for them each step."""
    from pytorch_metric_learning.utils.distributed import DistributedMinerWrapper
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    net = DDP(model, device_ids=ids, find_unused_parameters=some_frozen) if any(p.requires_grad for p in model.parameters()) else model
    losses.distribute()
    objective = DDP(losses, device_ids=ids) if any(True for _ in losses.parameters()) else losses
    return net, objective, DistributedMinerWrapper(miner) if miner is not None else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # some pytorch-metric-learning miners draw from numpy
    torch.manual_seed(seed)


@dataclass
class RunResult:
    run_dir: Path
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=dict)
    train_images: int = 0
    train_classes: int = 0
    val_images: int = 0
    val_classes: int = 0
    warnings: list[str] = field(default_factory=list)  # what on_warning was told
    stopped: str = ""  # why the run stopped before its last epoch (--early-stop, a plugin), if it did
    in_memory: int = 0  # bytes of the training images decoded once and kept in memory (0: read from disk each epoch)
    skipped: list[tuple[Source, str]] = field(default_factory=list)  # unreadable images and why (skipped_images.txt)
    precision: str = ""  # the training steps' precision (bf16, fp16, fp32)
    precision_reason: str = ""  # what chose it: an option, the resumed run's setting, or the device's default


@contextmanager
def said_when_stopped(kept: Callable[[], str]):
    """Ctrl-C, or a plugin that exits, once the run folder is made (a plugin's run_started, run_ended, a save): one line
    that ends with ``kept()``, what the folder keeps and how to go on. The epoch loop says which epoch it cut short."""
    try:
        yield
    except Interrupted:
        raise
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; {kept()}") from None
    except PluginExit as exc:
        exc.args = (f"{exc}; {kept()}",)
        raise


def run_inputs(cfg: RunConfig) -> dict[str, str | None]:
    """The files and folders a run reads, by the option that names them: what ``--overwrite`` must not delete."""
    towers = {f"backbone_kwargs[{key!r}]": value for key, value in cfg.backbone_kwargs.items() if key.endswith("_weights") and isinstance(value, str)}
    return {"--data": cfg.data, "--val-data": cfg.val_data, "--weights": cfg.weights, **towers}


def train(
    cfg: RunConfig,
    run_dir: str | Path | None = None,
    resume: bool = False,
    overwrite: bool = False,
    on_step: Callable[[int, int, int, dict], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    on_warning: Callable[[str], None] | None = None,
    config_file: str | Path | None = None,
) -> RunResult:
    """Train an embedding model as ``cfg`` says; writes config.yaml, metrics.jsonl, last.pt, best.pt.

    ``run_dir`` (None: a new folder runs/<time>) must not hold a run unless ``resume=True`` goes on
    with it (its settings kept; only epochs, workers, device, log and early_stop may change) or ``overwrite=True``
    starts it over, deleting none of what the run reads (``cfg``'s data and weights, ``config_file``); one process at a
    time holds it while the run writes to it.

    Ctrl-C raises ``Interrupted``, a lack of memory or disk space an MltkError, and a plugin that exits in a run
    hook a ``PluginExit`` (its exit code); each says what last.pt keeps: the last completed epoch (epoch 0: the
    untrained model), from where ``resume=True`` goes on.

    Started by torchrun (RANK, WORLD_SIZE in the environment), each process trains on its share of
    the batches under DistributedDataParallel; only rank 0 writes the run directory and calls back.
    """
    check_names(cfg)  # a misspelt name fails now, not after the data is read
    check_training(cfg, resumed=resume)  # and options that contradict each other
    if resume and overwrite:
        raise UsageError("--resume goes on with the run in --out, --overwrite starts it over: give one of them")
    world = distributed.from_environment()
    device = distributed.device_for(world, cfg.device)  # one this machine lacks: refused before the run folder is made
    inputs = {"--config": config_file, **run_inputs(cfg)}
    with RunDirectory(run_dir, resume, overwrite, main=world.is_main, inputs=inputs) as home, ctrl_c.remembered() as pressed:  # checked (and held) before the data is read
        joined = world.distributed and not torch.distributed.is_initialized()
        distributed.start(world, device)
        try:
            result = _train(cfg, home, world, device, resume, on_step, on_epoch, on_warning, pressed)
        except BaseException as exc:
            if joined:
                distributed.stop(finished=False)
            if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, Interrupted):  # before the run folder was made
                raise Interrupted("interrupted before the run started; nothing was written") from None
            raise
        if joined:
            distributed.stop()
        return result


# -- The phases of a run, in the order _train (below) goes through them.


def load_splits(cfg: RunConfig) -> tuple[LabelledImages, LabelledImages | None]:
    data = load_data(cfg.data)
    if cfg.data_classes:
        data = select_classes(data, cfg.data_classes)
    if cfg.val_data:
        val = load_data(cfg.val_data, split="test")  # a benchmark dataset named without a split: its test classes
        return data, select_classes(val, cfg.val_data_classes) if cfg.val_data_classes else val
    if cfg.val_classes:
        return split_classes(data, cfg.val_classes, cfg.seed)
    return data, None


def scan(data: LabelledImages, warn: Callable[[str], None]) -> tuple[LabelledImages, list[tuple[Source, str]]]:
    """``data`` without the files that do not decode (a fast scan before training), warned about by name."""
    kept, skipped = drop_unreadable(data)
    if skipped:
        warn(f"{len(skipped)} of {len(data)} images of {data.name!r} cannot be read and are left out: {describe_files(skipped)}")
    return kept, skipped


def read_data(cfg: RunConfig, warn: Callable[[str], None]) -> tuple[LabelledImages, LabelledImages | None, list[tuple[Source, str]]]:
    """The train and validation (None: none) images, each scanned; and the files left out, and why."""
    train_data, val_data = load_splits(cfg)
    train_data, skipped = scan(train_data, warn)
    if val_data:
        val_data, val_skipped = scan(val_data, warn)
        skipped += val_skipped
    return train_data, val_data, skipped


def resolve_hints(cfg: RunConfig, data: LabelledImages) -> RunConfig:
    """Settings left open (None) take the dataset's suggestion, then mltk's default."""
    return replace(
        cfg,
        image_size=cfg.image_size or data.hints.get("image_size"),
        m_per_class=cfg.m_per_class or data.hints.get("m_per_class", 4),
    )


def make_sampler(data: LabelledImages, cfg: RunConfig, world, warn: Callable[[str], None]) -> MPerClassSampler:
    """Batches of ``cfg.m_per_class`` images per class, this process's share of them; classes it cannot use are warned about."""
    sampler = MPerClassSampler(data.labels, cfg.m_per_class, cfg.batch_size, seed=cfg.seed, num_replicas=world.size, rank=world.rank)
    if sampler.left_out:
        names = [data.classes[y] for y in sampler.left_out]
        warn(
            f"classes with a single image have no positive pair and are left out of the batches: "
            f"{', '.join(names[:5])}{' ...' if len(names) > 5 else ''} ({len(names)} of {len(data.classes)})"
        )
    return sampler


@contextmanager
def building(cfg: RunConfig):
    """A lack of memory while the model, losses and optimiser are allocated: one line naming what to lower."""
    try:
        yield
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        advice = f"lower --dim (now {cfg.dim}) or take a smaller --backbone (now {cfg.backbone!r}); nothing was written"
        raise out_of_memory(exc, advice) from None


def make_datasets(model: Embedder, cfg: RunConfig, train_data: LabelledImages, val_data: LabelledImages | None):
    """The backbone's preprocessing (``data_config``) and the train (augmented; a bad image's classmate stands in)
    and validation datasets that apply it. The training images are decoded once and kept in memory when they fit
    (``IN_MEMORY``) and ``in_memory`` is on: the epochs then neither read nor decode a file."""
    pre = data_config(model.backbone, cfg.image_size)
    mode = "L" if pre["input_size"][0] == 1 else "RGB"
    train_set = ImageDataset(train_data, make_transform(pre, cfg.augment, cfg.augment_options), mode, stand_in=True)
    if cfg.epochs and cfg.in_memory:
        train_set.keep_decoded(in_memory_budget(), threads=max(cfg.workers, os.cpu_count() or 1))
    val_set = ImageDataset(val_data, make_transform(pre, False), mode) if val_data else None
    return pre, train_set, val_set


IN_MEMORY = (0.25, 4 << 30)  # decoded training images are kept when they take at most this share of free memory, and bytes


def in_memory_budget() -> int:
    share, most = IN_MEMORY
    free = available_memory()
    return most if free is None else min(most, int(share * free))


def warmup_cosine(warmup_steps: int, total_steps: int, floor: float = 0.01) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to ``floor`` times the base learning rate."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def batchnorms(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def learnable_backbone(model: Embedder, cfg: RunConfig) -> list[nn.Parameter]:
    """The backbone parameters the run may train: none with --freeze-backbone; with --freeze-bn, all but
    the BatchNorm layers' (their statistics and scales stay as loaded). The others never require a gradient."""
    as_loaded = {id(p) for m in batchnorms(model.backbone) for p in m.parameters()} if cfg.freeze_bn else set()
    learnable = [] if cfg.freeze_backbone else [p for p in model.backbone.parameters() if id(p) not in as_loaded]
    mine = {id(p) for p in learnable}
    for p in model.backbone.parameters():
        p.requires_grad_(id(p) in mine)
    return learnable


def check_frozen_epochs_learn(cfg: RunConfig, model: Embedder, losses: nn.Module, start_epoch: int) -> None:
    """While the backbone is frozen (--freeze-backbone, or its first --freeze-backbone-epochs) only the neck and the
    losses' own parameters learn; with neither (--dim 0 and a loss such as TripletMarginLoss) a step has nothing to train."""
    if cfg.freeze_backbone:
        frozen, during = "--freeze-backbone", ""
    elif start_epoch < cfg.freeze_backbone_epochs:
        n = cfg.freeze_backbone_epochs
        frozen, during = f"--freeze-backbone-epochs {n}", f" in the first {n} epochs" if n > 1 else " in the first epoch"
    else:
        return
    if any(True for _ in model.neck.parameters()) or any(True for _ in losses.parameters()):
        return
    raise UsageError(
        f"--dim 0 with {frozen}: nothing would learn{during} (no neck, a frozen backbone, and loss {cfg.loss!r} has no "
        f"parameters of its own); give --dim 512 (a neck), a loss with parameters (e.g. arcface, ce or center), or leave {frozen.split()[0]} out"
    )


def set_learning(model: Embedder, cfg: RunConfig, epoch: int, backbone: list[nn.Parameter]) -> None:
    """Train mode for ``epoch``. The backbone is frozen (no gradients, BatchNorm statistics kept) with --freeze-backbone
    and in the first ``freeze_backbone_epochs``, while the neck and the losses warm up; with --freeze-bn its
    BatchNorm layers keep their statistics always."""
    model.train()
    frozen = cfg.freeze_backbone or epoch < cfg.freeze_backbone_epochs
    for p in backbone:
        p.requires_grad_(not frozen)
    if frozen:
        model.backbone.eval()
    elif cfg.freeze_bn:
        for m in batchnorms(model.backbone):
            m.eval()


def delayed(schedule: Callable[[int], float], start: int) -> Callable[[int], float]:
    """``schedule`` started at step ``start``; zero before it."""
    return lambda step: 0.0 if step < start else schedule(step - start)


#: the learning rate of each parameter group, as metrics.jsonl names it (a group's position where it has no name:
#: checkpoints written before the backbone could have its own)
LR_KEYS = {"model": "lr", "losses": "loss_lr", "backbone": "backbone_lr"}


def backbone_groups(cfg: RunConfig, model: Embedder, backbone: list[nn.Parameter]) -> list[dict]:
    """The backbone's parameter groups at ``backbone_lr``: one, or with ``layer_decay`` one per layer (and weight
    decay kind), each layer at ``layer_decay`` times the rate of the layer after it (timm's layer-wise decay)."""
    lr = cfg.lr if cfg.backbone_lr is None else cfg.backbone_lr
    if cfg.layer_decay is None:
        return [{"params": backbone, "lr": lr, "weight_decay": cfg.weight_decay, "name": "backbone"}]
    from timm.optim import param_groups_layer_decay

    timm_log = logging.getLogger("timm.optim._param_groups")  # its warning for one layer: the error below says it
    level = timm_log.level
    timm_log.setLevel(logging.ERROR)
    try:
        groups = param_groups_layer_decay(model.backbone, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay)  # the learnable ones
    finally:
        timm_log.setLevel(level)
    if len({g["lr_scale"] for g in groups}) < 2 and cfg.layer_decay < 1:
        raise UsageError(
            f"--layer-decay {cfg.layer_decay}: timm cannot tell the layers of backbone {cfg.backbone!r} apart (it has no group_matcher); "
            f"leave --layer-decay out, or give --backbone-lr for one rate over the whole backbone"
        )
    top = max(g["lr_scale"] for g in groups)  # the last layer with parameters (a headless model has no classifier) learns at lr
    return [{"params": g["params"], "lr": lr * g["lr_scale"] / top, "weight_decay": g["weight_decay"], "name": "backbone"} for g in groups]


def build_optimizer(cfg: RunConfig, model: Embedder, backbone: list[nn.Parameter], losses: nn.Module | None, steps_per_epoch: int):
    """AdamW and its per-step schedule (linear warm-up, then cosine decay) over the model's parameters; those the
    losses own (no weight decay); and the ``backbone``'s, in groups of their own when it has its own rate, layer-wise
    rates or starts frozen (its warm-up then starts when it starts learning)."""
    own = bool(backbone) and (cfg.backbone_lr is not None or cfg.layer_decay is not None or cfg.freeze_backbone_epochs > 0)
    ids = {id(p) for p in backbone} if own else set()
    model_params = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]  # the neck, and the backbone without groups of its own
    groups = [{"params": model_params, "lr": cfg.lr, "weight_decay": cfg.weight_decay, "name": "model"}]
    if losses is not None and any(True for _ in losses.parameters()):
        groups.append({"params": list(losses.parameters()), "lr": cfg.loss_lr, "weight_decay": 0.0, "name": "losses"})
    warmup, total = round(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch
    schedules = [warmup_cosine(warmup, total)] * len(groups)
    if own:
        start = min(cfg.freeze_backbone_epochs, cfg.epochs) * steps_per_epoch
        layers = backbone_groups(cfg, model, backbone)
        groups += layers
        schedules += [delayed(warmup_cosine(warmup, total - start), start)] * len(layers)
    # fused: one kernel over all the tensors; on the CPU the default loop over them costs a fifth of a ResNet-18 step
    optimizer = torch.optim.AdamW(groups, fused=fused_adamw(model))
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedules)


def fused_adamw(model: nn.Module) -> bool:
    """AdamW's fused implementation where torch has one: float parameters on the CPU or a CUDA GPU."""
    params = list(model.parameters())
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def channels_last(model: nn.Module) -> bool:
    """Whether the model is a convolutional network, which runs faster with channels-last tensors (oneDNN on the CPU,
    tensor cores on a GPU); a transformer's lone patch-embedding convolution does not count."""
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) >= 8


def default_amp(device: torch.device) -> tuple[bool, str]:
    """Whether mixed precision is on when the run leaves it open, and why (in the run summary's words).

    On where it pays: on a CUDA GPU, and on a CPU with bf16 dot products (AMX or AVX512-BF16), where oneDNN's bf16
    convolutions and matmuls run about 1.5 times float32's rate. Elsewhere (other CPUs, MPS, XPU) float32: a CPU
    without them emulates bf16, slower than float32."""
    if device.type == "cuda":
        return True, "default on a GPU"
    if device.type != "cpu":
        return False, f"default on {device.type.upper()}"
    feature = cpu_bf16()
    return feature is not None, f"default: this CPU has {feature or 'no AMX or AVX512-BF16'}"


def mixed_precision(cfg: RunConfig, device: torch.device) -> tuple[bool, torch.dtype, torch.amp.GradScaler]:
    """Whether autocast is on, its dtype (bfloat16 where the device has it), and the scaler float16 needs."""
    amp = cfg.amp if cfg.amp is not None else default_amp(device)[0]
    amp_dtype = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    return amp, amp_dtype, torch.amp.GradScaler(device.type, init_scale=FP16_INIT_SCALE, enabled=amp and amp_dtype == torch.float16)


def precision(amp: bool, amp_dtype: torch.dtype) -> str:
    """The training steps' precision as metrics.jsonl names it: ``bf16`` or ``fp16`` (autocast), else ``fp32``."""
    return ("bf16" if amp_dtype == torch.bfloat16 else "fp16") if amp else "fp32"


def precision_reason(given: bool | None, resumed: bool, device: torch.device) -> str:
    """Why the steps run in the precision they do, for the run's summary: the resumed run's own setting, the one
    asked for (``given``), or the default for ``device`` (default_amp's rule)."""
    if resumed:  # its config.yaml's amp, whatever was given (a different one is refused)
        return "the run's own setting"
    if given is not None:  # --amp / --no-amp, or amp in a config file
        return f"as asked: amp {str(given).lower()}"
    return default_amp(device)[1]


#: float16's first loss scale. At torch's default, 2**16, a scaled gradient passes float16's 65504 on the first steps of
#: a loss in the tens (ArcFace's scaled logits): each such step is skipped and the scale halved, eight times for ArcFace
#: (2**16 down to 2**8) on a tiny run, while the warm-up goes on. 2**8, fairseq's order (it starts at 2**7), is where
#: those runs settle; it still lifts gradients down to 2e-7 out of float16's subnormals, and the scaler doubles it after
#: every 2000 steps without an overflow.
FP16_INIT_SCALE = 2.0**8


def restore(state: dict, path: Path, model: nn.Module, losses: nn.Module | None, optimizer, scheduler, scaler) -> None:
    """Load last.pt's ``state`` into the run's objects (a mismatch names what differs)."""
    hint = "; resume with the options the run started with (its config.yaml)"
    load_state(model, state["model"], f"{str(path)!r} (model)", hint)
    if losses is not None:
        load_state(losses, state["losses"], f"{str(path)!r} (losses)", hint)
    for name, part in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        try:
            part.load_state_dict(state[name])
        except (ValueError, KeyError, TypeError) as exc:  # e.g. --freeze-backbone changed: other parameter groups
            raise MltkError(f"{str(path)!r} ({name}) does not fit this run: {exc}{hint}") from None
    # The next step's learning rate follows this run's schedule (stretched when --epochs grew), not the saved value.
    for group, base, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group["lr"] = base * factor(scheduler.last_epoch)


def write_run_files(run_dir: Path, cfg: RunConfig, history: list[dict], skipped: list[tuple[Source, str]], kept: str) -> None:
    """skipped_images.txt, metrics.jsonl (a resumed run's lines up to its checkpoint) and config.yaml;
    a disk that fills says what ``kept``."""
    with writing("skipped_images.txt", kept):
        if skipped:
            write_skipped(run_dir / "skipped_images.txt", skipped)
        else:  # a resumed run's old list: its images read now
            (run_dir / "skipped_images.txt").unlink(missing_ok=True)
    with writing("metrics.jsonl", kept):
        write_history(run_dir, history)
    with writing("config.yaml", kept):
        write_config(cfg, run_dir / "config.yaml")


def train_loader(train_set: ImageDataset, sampler: MPerClassSampler, cfg: RunConfig, device: torch.device, world):
    """The run's batches, as ``sampler`` draws them, epoch after epoch. Its worker processes start once and stay; each
    epoch reseeds their augmentation by (seed, epoch, rank) as freshly started workers would be seeded (``EpochSeeds``).
    Images decoded in memory are transformed in this process on the CPU, from the epoch's seeded global generator."""
    in_memory = train_set.decoded is not None and device.type == "cpu"  # transforms of decoded images: cheap beside a step
    workers = 0 if in_memory else cfg.workers  # on the CPU, worker processes would take cores from the model
    return torch.utils.data.DataLoader(
        EpochSeeded(train_set) if workers else train_set,
        batch_sampler=EpochSeeds(sampler, cfg.seed, world.rank) if workers else sampler,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed),  # each iteration draws from it, never from the global one
    )


def worker_seed(seed: int, epoch: int, rank: int) -> int:
    """The base seed of an epoch's workers (worker ``i`` takes ``base + i``): what a DataLoader made for the epoch, with a
    generator seeded by (seed, epoch, rank), would give its workers; each process its own augmentation."""
    generator = torch.Generator().manual_seed(seed * 1000 + epoch + 7919 * rank)
    return int(torch.empty((), dtype=torch.int64).random_(generator=generator).item())


class EpochSeeds:
    """``sampler``'s batches, each index paired with its epoch's worker seed, so that workers that stay from one epoch to
    the next can reseed themselves when an epoch starts."""

    def __init__(self, sampler: MPerClassSampler, seed: int, rank: int):
        self.sampler, self.seed, self.rank = sampler, seed, rank

    def __len__(self) -> int:
        return len(self.sampler)

    def __iter__(self):
        base = worker_seed(self.seed, self.sampler.epoch, self.rank)
        for batch in self.sampler:
            yield [(base, i) for i in batch]


class EpochSeeded(torch.utils.data.Dataset):
    """``dataset`` read by (epoch's worker seed, index): the first image of an epoch seeds the worker as torch seeds a
    worker it starts (``random``, torch and numpy, from ``base + worker id``)."""

    def __init__(self, dataset: ImageDataset):
        self.dataset, self.base = dataset, None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        base, i = key
        if base != self.base:
            from torch.utils.data._utils.worker import _generate_state  # numpy's seed, as torch derives it

            worker = torch.utils.data.get_worker_info().id
            random.seed(base + worker)
            torch.manual_seed(base + worker)
            np.random.seed(_generate_state(base, worker))
            self.base = base
        return self.dataset[i]


class StepValues:
    """The values each step logs, read without making the step wait for them. On a GPU a step's values are copied to
    the host while it runs and read one step later, once the next step's work is queued: reading them at once would
    stall the GPU every step. On the CPU they are read at once."""

    def __init__(self, device: torch.device):
        self.lag = 1 if device.type == "cuda" else 0
        self.queue: collections.deque = collections.deque()

    def put(self, values: torch.Tensor, **context) -> None:
        """A step's values (a 1-d tensor), with what ``readable`` gives back beside them."""
        ready = None
        if self.lag:
            host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
            values = host.copy_(values, non_blocking=True)
            ready = torch.cuda.Event()
            ready.record()
        self.queue.append((values, ready, context))

    def readable(self, last: bool = False):
        """(values as floats, context) of the steps whose values are in, oldest first; ``last``: the last step's too
        (waiting for it)."""
        while len(self.queue) > (0 if last else self.lag):
            values, ready, context = self.queue.popleft()
            if ready is not None:
                ready.synchronize()
            yield values.tolist(), context


def epoch_record(epoch: int, sums: dict[str, float], steps: int, optimizer, lrs: list[float], seen: int, elapsed: float, world, precision: str) -> dict:
    """An epoch's metrics.jsonl line: each loss term averaged over the steps, the learning rates of its last step
    (``lrs``, one per parameter group), the steps' precision, throughput, seconds."""
    record = {"epoch": epoch + 1, **{k: v / steps for k, v in sums.items()}}
    for position, (group, lr) in enumerate(zip(optimizer.param_groups, lrs)):
        key = LR_KEYS[group.get("name", ("model", "losses")[min(position, 1)])]
        record[key] = max(lr, record.get(key, lr))  # layer-wise rates: the backbone's last layer's
    record["precision"] = precision
    record["images_per_s"] = seen / elapsed
    if world.distributed:
        record["processes"] = world.size
    record["seconds"] = elapsed
    return record


def recall_at_1(embeddings: np.ndarray, labels: np.ndarray, device: torch.device | None = None) -> float:
    """Leave-one-out recall@1 over queries whose class has another image, computed on ``device`` (the run's: a run
    on the CPU keeps the pass on the CPU where a GPU is seen)."""
    from mltk.metrics import evaluate_embeddings

    result = evaluate_embeddings(embeddings, labels, metrics=["recall_at_k"], ks=(1,), device=None if device is None else str(device))
    return float(result.values["recall@1"])


def validate(model: Embedder, val_set: ImageDataset, cfg: RunConfig, device: torch.device, world) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The validation images' embeddings and the positions they hold in ``val_set``, leaving out those that failed
    to decode; and the positions of those."""
    emb, failed = embed_dataset(model, val_set, device, cfg.batch_size, cfg.workers, world=world)
    keep = np.setdiff1d(np.arange(len(emb)), failed)
    return emb[keep], keep, failed


def early_stop(cfg: RunConfig, epoch: int, best: dict) -> str:
    """Why --early-stop ends the run after ``epoch`` (from 1): that many epochs without a better best score; else ''."""
    if cfg.early_stop and epoch - best["epoch"] >= cfg.early_stop:
        return f"--early-stop {cfg.early_stop}: no better {best['by']} since epoch {best['epoch']}"
    return ""


def report_failures(bad: list[Source], epoch: int, result: RunResult, warn: Callable[[str], None]) -> None:
    """Images that passed the scan but failed to decode in this epoch (changed since?): warned about once, listed."""
    new = [path for path in dict.fromkeys(bad) if path not in {p for p, _ in result.skipped}]
    if new:
        failures = [(path, check_image(path) or "failed to decode") for path in new]
        result.skipped += failures
        write_skipped(result.run_dir / "skipped_images.txt", failures, "a")
        warn(f"epoch {epoch + 1}: {len(new)} images failed to decode and were skipped: {describe_files(failures)}")


class Warnings:
    """What the run warns about: kept (``RunResult.warnings``) and handed to ``on_warning`` as it comes."""

    def __init__(self, on_warning: Callable[[str], None] | None):
        self.said: list[str] = []
        self.on_warning = on_warning

    def __call__(self, message: str) -> None:
        self.said.append(message)
        if self.on_warning:
            self.on_warning(message)


@dataclass
class Parts:
    """What a run is made of, built before its folder is made: so a bad option or a lack of memory leaves nothing."""

    cfg: RunConfig  # the dataset's hints filled in
    state: dict | None  # last.pt, when resuming
    train_data: LabelledImages
    val_data: LabelledImages | None
    skipped: list[tuple[Source, str]]  # images left out by the scan, and why
    sampler: MPerClassSampler
    model: Embedder
    layout: torch.memory_format  # the model's and its batches'
    pre: dict  # the backbone's preprocessing
    train_set: ImageDataset
    val_set: ImageDataset | None
    loader: torch.utils.data.DataLoader
    backbone: list[nn.Parameter]  # the backbone's parameters the run may train
    losses: WeightedLosses | None
    net: nn.Module  # the model as the steps call it (DDP-wrapped across processes)
    objective: nn.Module | None  # the losses, the same way
    miner: object
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    amp: bool
    amp_dtype: torch.dtype
    scaler: torch.amp.GradScaler
    loggers: dict
    precision: str  # the steps' precision as metrics.jsonl names it (bf16, fp16, fp32)
    precision_reason: str  # what chose it


def prepare(cfg: RunConfig, home: RunDirectory, world, device: torch.device, resume: bool, warn: Callable[[str], None]) -> Parts:
    """Everything the run needs, in order: last.pt's settings when resuming, the data, the model, the losses, the optimiser,
    the loggers."""
    # Resume: the run's own settings, read before the data (only how the run proceeds may change).
    state, given_amp = None, cfg.amp
    if resume:
        state = load_checkpoint(home.path / "last.pt", run=True)  # every field checked: an untrusted file
        cfg = resumed_config(cfg, state, home.path / "last.pt")

    # Data: train (and validation) images, unreadable files left out; settings left open take the dataset's hints.
    train_data, val_data, skipped = read_data(cfg, warn)
    cfg = resolve_hints(cfg, train_data)
    sampler = make_sampler(train_data, cfg, world, warn)

    # Model, losses and optimiser: allocated here, so a lack of memory is one line naming what to lower.
    with building(cfg):
        # Model: backbone + neck, seeded so the same seed gives the same initial weights (a resume loads its own).
        seed_everything(cfg.seed)
        model = build_embedder(cfg, from_checkpoint=resume).to(device)
        layout = torch.channels_last if channels_last(model) else torch.contiguous_format  # the batches' too
        model = model.to(memory_format=layout)
        pre, train_set, val_set = make_datasets(model, cfg, train_data, val_data)  # images as the backbone takes them
        backbone = learnable_backbone(model, cfg)  # the rest of it never learns

        # Losses (and miner): what the steps call is DDP-wrapped across processes.
        losses = build_losses(cfg, len(train_data.classes), model.dim).to(device) if cfg.epochs else None
        if losses is not None:
            check_frozen_epochs_learn(cfg, model, losses, state["epoch"] if state else 0)
        miner = registry.create_miner(cfg.miner, **cfg.miner_options) if cfg.miner else None
        net, objective = model, losses
        if world.distributed and cfg.epochs:
            net, objective, miner = distribute(model, losses, miner, device, some_frozen=cfg.freeze_backbone_epochs > 0)

        # Optimiser: AdamW over the model and the parameters the losses own, warm-up then cosine, mixed precision.
        optimizer, scheduler = build_optimizer(cfg, model, backbone, losses, len(sampler))
    amp, amp_dtype, scaler = mixed_precision(cfg, device)

    # Loggers (--log): made before the run directory, so that a missing package costs one line and no file.
    loggers = {name: registry.create_logger(name, replace(cfg, amp=amp, out=str(home.path)), home.path) for name in cfg.log} if world.is_main else {}
    return Parts(
        cfg, state, train_data, val_data, skipped, sampler, model, layout, pre, train_set, val_set,
        train_loader(train_set, sampler, cfg, device, world), backbone, losses, net, objective, miner,
        optimizer, scheduler, amp, amp_dtype, scaler, loggers,
        precision(amp, amp_dtype), precision_reason(given_amp, resume, device),
    )


@dataclass
class Progress:
    """How far the run has come: the epoch last.pt holds (None: none yet), and whether it trained to the end."""

    run_dir: Path
    epochs: int
    done: int | None
    finished: bool = False

    def kept(self) -> str:
        """What the run folder keeps if the run stops now, and how to go on."""
        if self.done is None:
            return "the run has no checkpoint yet: start it again with --overwrite"
        if self.finished or self.done >= self.epochs:
            return f"the run is complete: last.pt keeps its last epoch, {self.done}"
        return f"last.pt keeps epoch {self.done}: `mltk run --out {self.run_dir} --resume` goes on from there"


@contextmanager
def said_in_epochs(progress: Progress, p: Parts):
    """Ctrl-C or a lack of memory in the epochs: one line that says which epoch it cut short, or what to lower, and what
    last.pt keeps."""
    try:
        yield
    except KeyboardInterrupt:
        done = progress.done
        cut = done < progress.epochs  # else the last epoch is saved: Ctrl-C came in its epoch_ended
        raise Interrupted(f"interrupted in epoch {done + 1}; {progress.kept()} (epoch {done + 1} starts over)" if cut else f"interrupted; {progress.kept()}") from None
    except (RuntimeError, MemoryError) as exc:
        if not is_out_of_memory(exc):
            raise
        advice = f"lower --batch-size (now {p.cfg.batch_size}), --image-size (now {p.pre['input_size'][1]}) or --dim (now {p.model.dim})"
        raise out_of_memory(exc, f"{advice}{'' if p.amp else ', or turn on --amp'}; last.pt keeps epoch {progress.done}") from None


def check_batch(failed: torch.Tensor, data: LabelledImages, step: int, epoch: int, done: int) -> None:
    """A batch of which not one image decodes stops the run: the data went away; don't train on blanks."""
    if bool((failed >= 0).all()):
        first = data.sources[int(failed[0])]
        raise MltkError(
            f"no image of batch {step + 1} in epoch {epoch + 1} can be read ({first}: {check_image(first)}); "
            f"is the data still there? last.pt keeps epoch {done}"
        )


def optimizer_step(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> bool:
    """The optimiser's step through the scaler; whether it was taken. float16 gradients that overflowed skip it and lower
    the scale (the usual test: the scale went down), and the learning-rate schedule must not advance on such a step."""
    before = scaler.get_scale()  # float16 only: a disabled scaler reads 1.0 without waiting for the GPU
    scaler.step(optimizer)
    scaler.update()
    return scaler.get_scale() >= before


class StepLog:
    """An epoch's steps as they are logged: each step's losses checked (a loss gone NaN stops the run), summed for the
    epoch's record, and handed to the plugins and the progress bar; read as ``StepValues`` lets them be read."""

    def __init__(self, epoch: int, steps: int, cfg: RunConfig, device: torch.device, progress: Progress, hooks, on_step):
        self.epoch, self.steps, self.cfg, self.progress, self.hooks, self.on_step = epoch, steps, cfg, progress, hooks, on_step
        self.values = StepValues(device)
        self.sums: dict[str, float] = {}
        self.lrs: list[float] = []  # the rates of the last step
        self.seen, self.started, self.elapsed = 0, time.perf_counter(), 0.0

    def put(self, logged: torch.Tensor, step: int, names: list[str], lrs: list[float], images: int) -> None:
        """A step's values (the total, then each of ``names``), the rates it used and its images (every process's);
        the steps whose values are in are logged."""
        self.seen += images
        self.lrs = lrs
        self.values.put(logged, step=step, names=names, lrs=lrs, seen=self.seen)
        for values, context in self.values.readable():
            self.log(values, **context)

    def close(self) -> None:
        """The epoch's last step logged (on a GPU, once it is in), and the epoch's seconds taken."""
        for values, context in self.values.readable(last=True):
            self.log(values, **context)
        self.elapsed = time.perf_counter() - self.started

    def log(self, values: list[float], step: int, names: list[str], lrs: list[float], seen: int) -> None:
        checked, *values = values
        if not math.isfinite(checked):
            raise MltkError(
                f"the loss became {checked} at epoch {self.epoch + 1}, step {step + 1}; last.pt keeps epoch {self.progress.done}, "
                f"the last good one: lower --lr (now {self.cfg.lr}) or the loss weights, or keep gradient clipping on"
            )
        terms = {name if name == "loss" else f"loss/{name}": value for name, value in zip(names, values)}  # as metrics.jsonl names them
        for key, value in terms.items():
            self.sums[key] = self.sums.get(key, 0.0) + value
        logs = {**terms, "lr": lrs[0], "images_per_s": seen / (time.perf_counter() - self.started)}
        self.hooks.call("step_logged", epoch=self.epoch + 1, step=step + 1, steps=self.steps, logs=logs)
        if self.on_step:
            self.on_step(self.epoch, step + 1, self.steps, logs)


def close_epoch(
    epoch: int, log: StepLog, unreadable: set[int], p: Parts, cfg: RunConfig, result: RunResult, progress: Progress,
    hooks, checkpoint: Callable[..., dict], world, device: torch.device, warn: Callable[[str], None], on_epoch,
) -> dict:
    """The epoch's record, with validation recall@1; the best epoch so far; then the writes: the metrics line, best.pt,
    then last.pt (a run killed, or a disk that fills, before last.pt is replaced redoes this epoch). Returns the record."""
    record = epoch_record(epoch, log.sums, log.steps, p.optimizer, log.lrs, log.seen, log.elapsed, world, p.precision)
    bad = [p.train_data.sources[i] for i in sorted(unreadable)]
    if p.val_set is not None:
        embeddings, kept_rows, failed = validate(p.model, p.val_set, cfg, device, world)
        labels = np.asarray(p.val_data.labels)[kept_rows]
        record["val_recall@1"] = recall_at_1(embeddings, labels, device)
        bad += [p.val_data.sources[i] for i in failed]
        hooks.call(
            "validation_embedded", epoch=epoch + 1, embeddings=embeddings, labels=labels,
            sources=[p.val_data.sources[i] for i in kept_rows], classes=p.val_data.classes,
        )
        del embeddings
    kept = f"last.pt keeps epoch {progress.done}"
    if world.is_main:
        with writing("skipped_images.txt", kept):
            report_failures(bad, epoch, result, warn)
    score = record.get("val_recall@1", -record["loss"])  # no validation data: lowest training loss is best
    improved = not result.best or score > result.best["score"]
    if improved:
        result.best = {"epoch": epoch + 1, "score": score, "by": "val_recall@1" if p.val_set is not None else "-loss"}
    if world.is_main:
        with writing("metrics.jsonl", kept), open(result.run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if improved:
            with writing("best.pt", kept):
                save_checkpoint(checkpoint(epoch + 1, resumable=False), result.run_dir / "best.pt")
        with writing("last.pt", kept):
            save_checkpoint(checkpoint(epoch + 1), result.run_dir / "last.pt")
    progress.done = epoch + 1
    result.history.append(record)
    if on_epoch:
        on_epoch(record)
    return record


def _train(cfg, home: RunDirectory, world, device, resume, on_step, on_epoch, on_warning, pressed=lambda: False) -> RunResult:
    main = world.is_main  # the process that writes the run directory and reports
    on_step, on_epoch, on_warning = (f if main else None for f in (on_step, on_epoch, on_warning))
    warn = Warnings(on_warning)

    # Setup: last.pt's settings when resuming, data, model, losses, optimiser, loggers (rank 0's); no file is written yet.
    p = prepare(cfg, home, world, device, resume, warn)
    model, losses, optimizer, scheduler, scaler = p.model, p.losses, p.optimizer, p.scheduler, p.scaler

    # Run directory: made (or claimed, with --overwrite cleared) only now that every part is built, so a bad
    # option leaves nothing behind; then the checkpoint is loaded before anything in it is written.
    run_dir = home.make()
    progress = Progress(run_dir, p.cfg.epochs, None if p.state is None else p.state["epoch"])
    with said_when_stopped(progress.kept):  # Ctrl-C or a plugin's exit from here on: one line, what is kept
        cfg = replace(p.cfg, amp=p.amp, out=str(run_dir))  # config.yaml records what ran, and where
        result = RunResult(
            run_dir, train_images=len(p.train_data), train_classes=len(p.train_data.classes), warnings=warn.said, skipped=p.skipped,
            precision=p.precision, precision_reason=p.precision_reason,
        )
        result.in_memory = p.train_set.decoded_bytes
        if p.val_data:
            result.val_images, result.val_classes = len(p.val_data), len(p.val_data.classes)
        start_epoch = 0
        if p.state is not None:
            restore(p.state, run_dir / "last.pt", model, losses, optimizer, scheduler, scaler)
            start_epoch, result.best = p.state["epoch"], p.state["best"]
            result.history = [r for r in read_history(run_dir) if r["epoch"] <= start_epoch]
            p.state = None  # its tensors: memory the run needs
        kept = f"last.pt keeps epoch {start_epoch}" if resume else "the run has no checkpoint yet: start it again with --overwrite"
        if main:
            write_run_files(run_dir, cfg, result.history, p.skipped, kept)

        def checkpoint(epoch: int, resumable: bool = True) -> dict:
            """What best.pt (``resumable=False``) and last.pt hold; the optimiser's state, which only resuming needs
            and which is twice the model's size under Adam, goes to last.pt alone."""
            training = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict()}
            return {
                "config": to_dict(cfg),
                "classes": p.train_data.classes,
                "data_config": p.pre,
                "epoch": epoch,
                "best": result.best,
                "model": model.state_dict(),
                "losses": losses.state_dict() if losses is not None else {},
                "sampler": {"seed": p.sampler.seed, "epoch": epoch},
                "rng": {"seed": cfg.seed, "epoch": epoch},
                **(training if resumable else {}),
            }

        if cfg.epochs == 0 and main:  # an untrained model (e.g. a frozen pretrained backbone), ready to evaluate
            with writing("best.pt", kept):
                save_checkpoint(checkpoint(0, resumable=False), run_dir / "best.pt")
        if not resume and main:  # from the start there is a last.pt to resume from, should epoch 1 be cut short
            with writing("last.pt", kept):
                save_checkpoint(checkpoint(0), run_dir / "last.pt")
        progress.done = start_epoch  # the epoch last.pt holds: where Ctrl-C, a crash or a lack of memory leaves the run
        hooks = Lifecycle(p.loggers, warn) if main else Silent()

    # Epochs: plugins and loggers follow them (rank 0 only): run_started, then run_ended with what ended the run.
    with said_when_stopped(progress.kept), hooks.running(cfg, run_dir, result), said_in_epochs(progress, p):
        for epoch in range(start_epoch, cfg.epochs):
            # Epoch: its randomness (sampler, augmentation, workers) follows from (seed, epoch); some parts may sit it out.
            seed_everything(cfg.seed * 1000 + epoch)
            p.sampler.set_epoch(epoch)
            set_learning(model, cfg, epoch, p.backbone)
            log = StepLog(epoch, len(p.sampler), cfg, device, progress, hooks, on_step)
            unreadable: set[int] = set()  # images that failed to decode; another of their class stood in
            for step, (images, labels, failed) in enumerate(p.loader):
                # Batch: a Ctrl-C that Python dropped (it landed in a finalizer) stops the run here, as does a batch of blanks.
                ctrl_c.stop_if(pressed)
                unreadable.update(failed[failed >= 0].tolist())
                check_batch(failed, p.train_data, step, epoch, progress.done)
                images, labels = images.to(device, non_blocking=True, memory_format=p.layout), labels.to(device, non_blocking=True)
                # Forward under autocast; the losses run in float32 (their parameters and margins need it).
                with torch.autocast(device.type, dtype=p.amp_dtype, enabled=p.amp):
                    embeddings = p.net(images)
                embeddings = embeddings.float()
                indices = p.miner(embeddings, labels) if p.miner is not None else None
                total, terms = p.objective(embeddings, labels, indices)
                # What is logged and checked: the mean over processes, so every process takes the same decision.
                logged = distributed.mean(torch.stack([total.detach(), losses.weighted(terms), *terms.values()]), world)
                # Backward and step: gradients clipped unscaled; the schedule advances with the steps taken.
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(total).backward()
                if cfg.grad_clip:
                    scaler.unscale_(optimizer)
                    nn.utils.clip_grad_norm_([q for g in optimizer.param_groups for q in g["params"]], cfg.grad_clip)
                lrs = [group["lr"] for group in optimizer.param_groups]  # the rates this step used, for the record
                if optimizer_step(scaler, optimizer):
                    scheduler.step()
                log.put(logged, step, ["loss", *terms], lrs, len(labels) * world.size)  # every process's images (equal batches)
            log.close()

            # Epoch close: the record, validation, the best epoch; the metrics line, best.pt, then last.pt.
            record = close_epoch(epoch, log, unreadable, p, cfg, result, progress, hooks, checkpoint, world, device, warn, on_epoch)

            # Early stop: --early-stop's patience, or a plugin's reason (rank 0's plugins; every process stops).
            asked = hooks.stop_reason(record, run_dir)  # every plugin sees every epoch
            reason = early_stop(cfg, epoch + 1, result.best) or asked or ""
            if distributed.any_true(bool(reason), world, device):
                result.stopped = reason or "rank 0's plugins asked to stop"
                break
        progress.finished = True  # every epoch, or an early stop: what is left is run_ended
    return result
