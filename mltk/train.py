"""The training loop, top to bottom: data, model, losses, optimiser, epochs, checkpoints."""

import json
import math
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from mltk import registry
from mltk.config import RunConfig, parse_loss_spec, save_yaml, to_dict
from mltk.data import ImageDataset, LabelledImages, MPerClassSampler, data_config, load_data, make_transform, select_classes, split_classes
from mltk.errors import MltkError
from mltk.model import Embedder, build_embedder, load_checkpoint, save_checkpoint


class WeightedLosses(nn.Module):
    """A weighted sum of registered losses; each may own parameters (ArcFace W, centers, a classifier)."""

    def __init__(self, terms: list[tuple[float, str, nn.Module]]):
        super().__init__()
        self.weights = {name: weight for weight, name, _ in terms}
        self.losses = nn.ModuleDict({name: loss for _, name, loss in terms})

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor, indices_tuple=None):
        parts = {name: loss(embeddings, labels, indices_tuple) for name, loss in self.losses.items()}
        total = sum(self.weights[name] * value for name, value in parts.items())
        return total, {name: value.detach() for name, value in parts.items()}


def check_names(cfg: RunConfig) -> None:
    registry.get("backbones", cfg.backbone)
    if cfg.epochs:
        for _, name in parse_loss_spec(cfg.loss):
            registry.get("losses", name)
    if cfg.miner:
        registry.get("miners", cfg.miner)


def build_losses(cfg: RunConfig, num_classes: int, dim: int) -> WeightedLosses:
    terms = []
    for weight, name in parse_loss_spec(cfg.loss):
        options = dict(cfg.loss_options.get(name, {}))
        terms.append((weight, name, registry.create_loss(name, num_classes=num_classes, embedding_size=dim, **options)))
    return WeightedLosses(terms)


def warmup_cosine(warmup_steps: int, total_steps: int, floor: float = 0.01) -> Callable[[int], float]:
    """Linear warm-up, then cosine decay to ``floor`` times the base learning rate."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


@dataclass
class RunResult:
    run_dir: Path
    history: list[dict] = field(default_factory=list)
    best: dict = field(default_factory=dict)
    train_images: int = 0
    train_classes: int = 0
    val_images: int = 0
    val_classes: int = 0


def load_splits(cfg: RunConfig) -> tuple[LabelledImages, LabelledImages | None]:
    data = load_data(cfg.data)
    if cfg.data_classes:
        data = select_classes(data, cfg.data_classes)
    if cfg.val_data:
        val = load_data(cfg.val_data)
        return data, select_classes(val, cfg.val_data_classes) if cfg.val_data_classes else val
    if cfg.val_classes:
        return split_classes(data, cfg.val_classes, cfg.seed)
    return data, None


def resolve_hints(cfg: RunConfig, data: LabelledImages) -> RunConfig:
    """Settings left open (None) take the dataset's suggestion, then mltk's default."""
    return replace(
        cfg,
        image_size=cfg.image_size or data.hints.get("image_size"),
        m_per_class=cfg.m_per_class or data.hints.get("m_per_class", 4),
    )


def pick_device(cfg: RunConfig) -> torch.device:
    if cfg.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(cfg.device)


def default_amp(device: torch.device) -> bool:
    """Mixed precision where it pays: on a GPU, and on CPUs with AMX tiles (bf16 matmuls ~1.3x faster)."""
    if device.type == "cuda":
        return True
    is_amx = getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    return device.type == "cpu" and is_amx()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def embed_dataset(model: Embedder, dataset: ImageDataset, device: torch.device, batch_size: int, workers: int, amp_dtype=None):
    """L2-normalised embeddings and labels of a whole dataset, in order."""
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)
    out, labels = [], []
    for images, y in loader:
        with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out.append(model.embed(images.to(device, non_blocking=True)).float().cpu())
        labels.append(y)
    return torch.cat(out), torch.cat(labels)


def recall_at_1(embeddings: torch.Tensor, labels: torch.Tensor) -> float:
    """Leave-one-out recall@1 over queries whose class has another image."""
    from mltk.metrics import evaluate_embeddings

    result = evaluate_embeddings(embeddings.numpy(), labels.numpy(), metrics=["recall_at_k"], ks=(1,))
    return float(result.values["recall@1"])


def train(
    cfg: RunConfig,
    run_dir: Path,
    resume: bool = False,
    on_step: Callable[[int, int, int, dict], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> RunResult:
    """Train an embedding model as ``cfg`` says; writes config.yaml, metrics.jsonl, last.pt, best.pt."""
    check_names(cfg)  # a misspelt name fails now, not after the data is read
    run_dir = Path(run_dir)
    device = pick_device(cfg)

    # Data: train (and validation) images; settings left open take the dataset's hints.
    train_data, val_data = load_splits(cfg)
    cfg = resolve_hints(cfg, train_data)
    sampler = MPerClassSampler(train_data.labels, cfg.m_per_class, cfg.batch_size, seed=cfg.seed)

    # Model: backbone + neck, seeded so the same seed gives the same initial weights.
    seed_everything(cfg.seed)
    model = build_embedder(cfg).to(device)
    pre = data_config(model.backbone, cfg.image_size)
    mode = "L" if pre["input_size"][0] == 1 else "RGB"
    train_set = ImageDataset(train_data, make_transform(pre, cfg.augment, cfg.augment_options), mode)
    val_set = ImageDataset(val_data, make_transform(pre, False), mode) if val_data else None
    if cfg.freeze_backbone:
        model.backbone.requires_grad_(False)

    # Losses and optimiser: one group for the model, one for the parameters the losses own.
    losses = build_losses(cfg, len(train_data.classes), model.dim).to(device) if cfg.epochs else None
    miner = registry.create_miner(cfg.miner, **cfg.miner_options) if cfg.miner else None
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": cfg.lr, "weight_decay": cfg.weight_decay}]
    if losses is not None and any(True for _ in losses.parameters()):
        groups.append({"params": list(losses.parameters()), "lr": cfg.loss_lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups)
    steps_per_epoch = len(sampler)
    schedule = warmup_cosine(round(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    amp = cfg.amp if cfg.amp is not None else default_amp(device)
    cfg = replace(cfg, amp=amp)  # config.yaml records what ran
    amp_dtype = torch.bfloat16 if device.type == "cpu" or torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler(device.type, enabled=amp and amp_dtype == torch.float16)

    # Resume: model, losses, optimiser, scheduler and the epoch to go on from (the RNG follows from it).
    # Nothing is written before this point, so a bad option leaves no half-made run directory.
    run_dir.mkdir(parents=True, exist_ok=True)
    result = RunResult(run_dir, train_images=len(train_data), train_classes=len(train_data.classes))
    if val_data:
        result.val_images, result.val_classes = len(val_data), len(val_data.classes)
    start_epoch = 0
    if resume:
        state = load_checkpoint(run_dir / "last.pt")
        model.load_state_dict(state["model"])
        if losses is not None:
            losses.load_state_dict(state["losses"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        start_epoch, result.best = state["epoch"], state["best"]
        result.history = [r for r in read_history(run_dir) if r["epoch"] <= start_epoch]
        write_history(run_dir, result.history)
    else:
        write_history(run_dir, [])
    save_yaml(cfg, run_dir / "config.yaml")

    def checkpoint(epoch: int) -> dict:
        return {
            "config": to_dict(cfg),
            "classes": train_data.classes,
            "data_config": pre,
            "epoch": epoch,
            "best": result.best,
            "model": model.state_dict(),
            "losses": losses.state_dict() if losses is not None else {},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(),
            "sampler": {"seed": sampler.seed, "epoch": epoch},
            "rng": {"seed": cfg.seed, "epoch": epoch},
        }

    if cfg.epochs == 0:  # an untrained model (e.g. a frozen pretrained backbone), ready to evaluate
        save_checkpoint(checkpoint(0), run_dir / "last.pt")
        save_checkpoint(checkpoint(0), run_dir / "best.pt")

    for epoch in range(start_epoch, cfg.epochs):
        # Every epoch's randomness (sampler, augmentation, workers) follows from (seed, epoch).
        seed_everything(cfg.seed * 1000 + epoch)
        sampler.set_epoch(epoch)
        loader = torch.utils.data.DataLoader(
            train_set,
            batch_sampler=sampler,
            num_workers=cfg.workers,
            pin_memory=device.type == "cuda",
            generator=torch.Generator().manual_seed(cfg.seed * 1000 + epoch),
        )
        model.train()
        if cfg.freeze_backbone:
            model.backbone.eval()  # frozen means frozen BatchNorm statistics too
        sums: dict[str, float] = {}
        seen, started = 0, time.perf_counter()
        for step, (images, labels) in enumerate(loader):
            images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
            # Forward under autocast; the losses run in float32 (their parameters and margins need it).
            with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                embeddings = model(images)
            embeddings = embeddings.float()
            indices = miner(embeddings, labels) if miner is not None else None
            total, parts = losses(embeddings, labels, indices)
            if not torch.isfinite(total):
                raise MltkError(
                    f"the loss became {total.item()} at epoch {epoch + 1}, step {step + 1}; last.pt keeps the last good "
                    f"epoch: lower --lr (now {cfg.lr}) or the loss weights, or keep gradient clipping on"
                )
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(total).backward()
            if cfg.grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_([p for g in groups for p in g["params"]], cfg.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            seen += len(labels)
            for name, value in {"loss": total.detach(), **{f"loss/{k}": v for k, v in parts.items()}}.items():
                sums[name] = sums.get(name, 0.0) + float(value)
            if on_step:
                on_step(epoch, step + 1, steps_per_epoch, {"loss": float(total.detach()), "images_per_s": seen / (time.perf_counter() - started)})
        elapsed = time.perf_counter() - started

        # Epoch record: each loss term, learning rates, throughput, validation recall@1.
        record = {"epoch": epoch + 1, **{k: v / steps_per_epoch for k, v in sums.items()}}
        record["lr"] = optimizer.param_groups[0]["lr"]
        if len(optimizer.param_groups) > 1:
            record["loss_lr"] = optimizer.param_groups[1]["lr"]
        record["images_per_s"] = seen / elapsed
        record["seconds"] = elapsed
        if val_set is not None:
            emb, y = embed_dataset(model, val_set, device, cfg.batch_size, cfg.workers, amp_dtype if amp else None)
            record["val_recall@1"] = recall_at_1(emb, y)
        score = record.get("val_recall@1", -record["loss"])  # no validation data: lowest training loss is best
        improved = not result.best or score > result.best["score"]
        if improved:
            result.best = {"epoch": epoch + 1, "score": score, "by": "val_recall@1" if val_set is not None else "-loss"}
        save_checkpoint(checkpoint(epoch + 1), run_dir / "last.pt")
        if improved:
            save_checkpoint(checkpoint(epoch + 1), run_dir / "best.pt")
        result.history.append(record)
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")
        if on_epoch:
            on_epoch(record)
    return result


def read_history(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_history(run_dir: Path, records: list[dict]) -> None:
    path = run_dir / "metrics.jsonl"
    tmp = path.with_name(".metrics.jsonl.tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp.replace(path)
