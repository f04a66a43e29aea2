"""Training throughput: ``mltk run`` beside the plain timm + PML loop, same model, data and settings.

    python benchmarks/throughput.py --epochs 2

Both read the images from disk through a DataLoader with the same number of workers, train the
same timm backbone at the same image size and batch, and are timed over whole epochs: the plain
loop in this process, ``mltk run`` as the command itself (its images/s from metrics.jsonl; its
seconds include starting the command and building the model).
Prints the figures and writes benchmarks/results/throughput.{json,md}.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from plain_loop import train_plain

OMNIGLOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot_background_small"
TRAIN = ["Balinese__*", "Early_Aramaic__*", "Greek__*", "Korean__*", "Latin__*"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(OMNIGLOT))
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    settings = dict(backbone=args.backbone, image_size=args.image_size, batch_size=args.batch_size, epochs=args.epochs, workers=args.workers)
    rows = []
    # The plain loop first, then mltk, then the plain loop again: a drift in machine speed shows up.
    for label in ("plain timm + PML loop", "mltk run", "plain timm + PML loop (again)"):
        if label.startswith("plain"):
            _, _, ips, seconds = train_plain(args.data, TRAIN, dim=512, **settings)
        else:  # the real command, in its own process; images/s over the epochs it reports
            config = {**settings, "data": args.data, "data_classes": TRAIN, "dim": 512, "loss": "arcface", "m_per_class": 4}
            with tempfile.TemporaryDirectory() as run_dir:
                Path(run_dir, "c.yaml").write_text(yaml.safe_dump(config))
                started = time.perf_counter()
                subprocess.run([sys.executable, "-m", "mltk", "run", "--config", f"{run_dir}/c.yaml", "--out", f"{run_dir}/run"], check=True, stdout=subprocess.DEVNULL)
                seconds = time.perf_counter() - started
                history = [json.loads(line) for line in Path(run_dir, "run", "metrics.jsonl").read_text().splitlines()]
            ips = sum(r["images_per_s"] * r["seconds"] for r in history) / sum(r["seconds"] for r in history)
        rows.append({"what": label, "images_per_s": round(ips, 1), "seconds": round(seconds, 1)})
        print(f"{label:32s} {ips:8.1f} images/s   {seconds:7.1f} s")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {**settings, "data": args.data, "torch_threads": torch.get_num_threads(), "command": "python benchmarks/throughput.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in settings.items())}
    (out / "throughput.json").write_text(json.dumps({"settings": meta, "rows": rows}, indent=2))
    lines = ["| what | images/s | seconds |", "|---|---|---|"] + [f"| {r['what']} | {r['images_per_s']} | {r['seconds']} |" for r in rows]
    (out / "throughput.md").write_text(f"`{meta['command']}`\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
