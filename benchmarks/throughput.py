"""Training throughput: ``mltk run`` beside a plain timm + PML loop, same model, data and settings.

    python benchmarks/throughput.py --epochs 2

The reference is the fastest loop a user writes by hand for data that fits in memory: every image
decoded and transformed once into one tensor, then epochs from a TensorDataset with PML's
MPerClassSampler, Adam, no DataLoader workers (its decoding is not timed). It runs first and last,
around ``mltk run``, so that a drift in the machine's speed shows. The same plain loop reading its
images from disk through a DataLoader with ``--workers`` workers runs once more for comparison.
``mltk run`` runs as the command itself in its own process; its images/s is that of its epochs
(metrics.jsonl), its seconds include starting the command, building the model and decoding the
images into memory. Setup as in the issue: Omniglot's five training alphabets, ResNet-18, 64 px,
128 dimensions, ArcFace, batches of 64 with 4 a class, no augmentation.
Both sides train in the same precision (``--precision``): by default what ``mltk run`` takes on this machine, bf16
autocast on a CPU with AMX or AVX512-BF16, else float32; ``--precision both`` measures float32, then bf16. Each row
says the precision its steps used (mltk run's from its metrics.jsonl).
Prints the figures and writes benchmarks/results/throughput.{json,md}.
"""

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from mltk.devices import cpu_bf16
from plain_loop import train_plain

OMNIGLOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot_background_small"
TRAIN = ["Balinese__*", "Early_Aramaic__*", "Greek__*", "Korean__*", "Latin__*"]
REFERENCE = "plain loop, in memory"


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor()


def precisions(asked: str) -> list[str]:
    """``--precision``: auto is what ``mltk run`` takes by default here (bf16 on a CPU with AMX or AVX512-BF16)."""
    return {"auto": ["bf16" if cpu_bf16() else "fp32"], "both": ["fp32", "bf16"]}.get(asked, [asked])


def mltk_rate(batch: list[dict]) -> float:
    return next(r["images_per_s"] for r in batch if r["what"] == "mltk run")


def reference_rate(batch: list[dict]) -> float:
    """The in-memory plain loop's images/s, the mean of its two runs."""
    return sum(r["images_per_s"] for r in batch if r["what"].startswith(REFERENCE)) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(OMNIGLOT))
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16", "both"], default="auto",
                        help="both sides' training precision: auto is mltk run's default on this machine; both runs fp32, then bf16")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()

    settings = dict(backbone=args.backbone, image_size=args.image_size, dim=args.dim, batch_size=args.batch_size, epochs=args.epochs, workers=args.workers)
    batches = {}  # precision -> its rows
    for precision in precisions(args.precision):
        amp, batch = precision == "bf16", []
        for label in (REFERENCE, "mltk run", f"{REFERENCE} (again)", "plain loop, from disk"):
            if label.startswith("plain"):
                _, _, ips, seconds = train_plain(args.data, TRAIN, m=4, in_memory="in memory" in label, log=lambda *_: None, amp=amp, **settings)
                used = precision
            else:  # the real command, in its own process; images/s over the epochs it reports, precision as it says
                config = {**settings, "data": args.data, "data_classes": TRAIN, "loss": "arcface", "m_per_class": 4, "amp": amp}
                with tempfile.TemporaryDirectory() as run_dir:
                    Path(run_dir, "c.yaml").write_text(yaml.safe_dump(config))
                    started = time.perf_counter()
                    subprocess.run([sys.executable, "-m", "mltk", "run", "--config", f"{run_dir}/c.yaml", "--out", f"{run_dir}/run", "--quiet"], check=True, stdout=subprocess.DEVNULL)
                    seconds = time.perf_counter() - started
                    history = [json.loads(line) for line in Path(run_dir, "run", "metrics.jsonl").read_text().splitlines()]
                ips = sum(r["images_per_s"] * r["seconds"] for r in history) / sum(r["seconds"] for r in history)
                used = "/".join(sorted({r["precision"] for r in history}))
                assert used == precision, f"mltk run trained in {used}, not {precision}"
            batch.append({"what": label, "precision": used, "images_per_s": round(ips, 1), "seconds": round(seconds, 1)})
            print(f"{label:36s} {used:5s} {ips:8.1f} images/s   {seconds:7.1f} s", flush=True)
        reference = reference_rate(batch)
        for r in batch:
            r["over_reference"] = round(r["images_per_s"] / reference, 3)
        batches[precision] = batch
        print(f"{precision}: mltk run / {REFERENCE} (mean of its two runs): {mltk_rate(batch) / reference:.2f}x")
    if len(batches) == 2:
        fp32, bf16 = batches["fp32"], batches["bf16"]
        print(f"bf16 / fp32, mltk run: {mltk_rate(bf16) / mltk_rate(fp32):.2f}x; plain loop in memory: {reference_rate(bf16) / reference_rate(fp32):.2f}x")
    rows = [r for batch in batches.values() for r in batch]
    ratios = {p: next(r["over_reference"] for r in batch if r["what"] == "mltk run") for p, batch in batches.items()}

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/throughput.py " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in {**settings, "precision": args.precision}.items())
    meta = {**settings, "precision": args.precision, "data": args.data, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "cpu": cpu_name(), "cpu_bf16": cpu_bf16(), "command": command}
    (out / "throughput.json").write_text(json.dumps({"settings": meta, "rows": rows, "mltk_over_reference": ratios}, indent=2))
    lines = ["| what | precision | images/s | seconds | × the in-memory plain loop in the same precision |", "|---|---|---|---|---|"]
    lines += [f"| {r['what']} | {r['precision']} | {r['images_per_s']} | {r['seconds']} | {r['over_reference']:.2f} |" for r in rows]
    where = f"{meta['cpu']}, bf16 dot products: {meta['cpu_bf16'] or 'none'}, {meta['torch_threads']} torch threads, torch {meta['torch']}"
    (out / "throughput.md").write_text(f"`{command}` ({where})\n\n" + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
