"""Checkpoint sizes of the experiment table's full-size configs: best.pt (inference) beside last.pt (resuming).

Builds each config's embedder and losses as ``mltk run`` does (random weights, nothing downloaded), takes
one AdamW step on a batch of 2 random images so the optimiser holds its state, and counts the bytes
``torch.save`` writes for what best.pt and last.pt hold.

    python benchmarks/checkpoint_sizes.py [--classes 100] [--configs cfg1_resnet50_center_ce cfg5_hybrid_8192]
"""

import argparse
import io
from dataclasses import replace
from pathlib import Path

import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


class Counter(io.RawIOBase):
    """A file that only counts what is written to it."""

    def __init__(self):
        self.size = 0

    def writable(self):
        return True

    def write(self, data):
        self.size += len(data)
        return len(data)


def saved_bytes(state: dict) -> int:
    counter = Counter()
    torch.save(state, counter)
    return counter.size


def measure(name: str, classes: int) -> tuple[int, int]:
    from mltk.config import load_yaml, make_config
    from mltk.model import build_embedder
    from mltk.losses import build_losses

    cfg = replace(make_config(load_yaml(EXAMPLES / f"{name}.yaml")), pretrained=False)
    torch.manual_seed(0)
    model = build_embedder(cfg)
    losses = build_losses(cfg, classes, model.dim)
    optimizer = torch.optim.AdamW([{"params": list(model.parameters())}, {"params": list(losses.parameters())}])
    images, labels = torch.randn(2, 3, cfg.image_size or 224, cfg.image_size or 224), torch.tensor([0, 1])
    total, _ = losses(model(images), labels)
    total.backward()
    optimizer.step()
    best = {"model": model.state_dict(), "losses": losses.state_dict()}
    return saved_bytes(best), saved_bytes({**best, "optimizer": optimizer.state_dict()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=100, help="training classes (the losses' weights grow with them)")
    parser.add_argument("--configs", nargs="+", default=["cfg1_resnet50_center_ce", "cfg3_resnet50_4096", "cfg5_hybrid_8192"])
    args = parser.parse_args()
    print(f"| config ({args.classes} classes) | best.pt | last.pt | optimiser state |")
    print("|---|---|---|---|")
    for name in args.configs:
        best, last = measure(name, args.classes)
        print(f"| {name} | {best / 2**20:,.0f} MiB | {last / 2**20:,.0f} MiB | {(last - best) / 2**20:,.0f} MiB |", flush=True)


if __name__ == "__main__":
    main()
