"""Evaluation metrics: mltk beside pytorch-metric-learning's AccuracyCalculator and scikit-learn's roc_auc_score.

    python benchmarks/metrics_bench.py --sizes 20000 100000

On the same synthetic clustered embeddings (512 dimensions, about 50 images a class), each
contender runs in a subprocess of its own; its seconds are timed inside around the one call that
computes the metrics (imports and loading the data excluded, numba's compilation included), its
peak memory is the subprocess's maximum resident set as the kernel reports it (os.wait4), imports
and data included. The "data only" row is that floor: the same imports and data, no metrics.

- mltk: recall@1/2/4/8, precision@1/2/4/8, MAP@R, and ROC-AUC, TAR@FAR, EER and 10-fold accuracy
  over all N(N-1)/2 pairs, with its default engine ("blocks") and with engine="flat".
- PML: AccuracyCalculator(include=("precision_at_1", "r_precision", "mean_average_precision_at_r"),
  k="max_bin_count"), its default faiss kNN.
- sklearn: roc_auc_score over the explicit list of all pairs (scored block by block), skipped when
  its estimated peak (60 bytes a pair, as measured at N = 20,000: the scores and labels, then
  sklearn's float64 copies, argsort indices and cumulative sums) is more than 80% of this
  machine's memory; the reason is printed.

Prints the figures and writes benchmarks/results/metrics_bench.{json,md}.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CONTENDERS = ("data only", "mltk", "mltk (faiss)", "PML AccuracyCalculator", "sklearn all-pairs roc_auc_score")
BYTES_PER_PAIR_IN_SKLEARN = 60  # measured: 11.8 GB peak for 2e8 pairs (N = 20,000)


def make_data(n: int, dim: int, class_size: int, spread: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian clusters on the sphere: class centers plus noise, L2-normalised, float32."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, max(1, n // class_size), n)
    centers = rng.standard_normal((labels.max() + 1, dim), dtype=np.float32)
    x = centers[labels] + spread * rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels


def run_contender(name: str, x: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """Compute one contender's metrics; returns its values."""
    if name == "data only":
        import torch  # noqa: F401  (the floor holds what every contender imports)

        return {}
    if name.startswith("mltk"):
        from mltk.metrics import evaluate_embeddings

        engine = "flat" if "faiss" in name else "blocks"
        return evaluate_embeddings(x, labels, engine=engine).values
    if name.startswith("PML"):
        import torch
        from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

        calculator = AccuracyCalculator(include=("precision_at_1", "r_precision", "mean_average_precision_at_r"), k="max_bin_count")
        return calculator.get_accuracy(torch.from_numpy(x), torch.from_numpy(labels))
    from sklearn.metrics import roc_auc_score

    # The explicit list of all pairs i < j, from blocks of rows (never the whole N x N matrix at once).
    scores, same = [], []
    for r0 in range(0, len(x), 1024):
        block = x[r0 : r0 + 1024] @ x[r0:].T
        scores += [block[t, t + 1 :] for t in range(len(block))]
        same += [labels[r0 + t + 1 :] == labels[r0 + t] for t in range(len(block))]
    return {"roc_auc": roc_auc_score(np.concatenate(same), np.concatenate(scores))}


def worker(name: str, data: str) -> None:
    """In the subprocess: load the data, time the contender, print the result as JSON."""
    import torch

    with np.load(data) as arrays:
        x, labels = arrays["x"], arrays["labels"]
    started = time.perf_counter()
    values = run_contender(name, x, labels)
    seconds = time.perf_counter() - started
    print(json.dumps({"seconds": seconds, "values": {k: float(v) for k, v in values.items()}, "torch_threads": torch.get_num_threads()}))


def measure(name: str, data: Path) -> dict:
    """Run one contender in a fresh subprocess; its peak resident memory comes from os.wait4."""
    with tempfile.TemporaryFile("w+") as out:
        process = subprocess.Popen([sys.executable, __file__, "--worker", name, "--data", str(data)], stdout=out)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    if process.returncode != 0:
        return {"what": name, "error": f"exit code {process.returncode}"}
    result = json.loads(text.strip().splitlines()[-1])
    return {"what": name, **result, "seconds": round(result["seconds"], 2), "peak_rss_gb": round(usage.ru_maxrss / 2**20, 3)}


def sklearn_skip_reason(n: int) -> str | None:
    pairs = n * (n - 1) // 2
    needed = pairs * BYTES_PER_PAIR_IN_SKLEARN
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if needed > 0.8 * memory:
        return f"{pairs:.2e} pairs need about {needed / 2**30:.0f} GiB in roc_auc_score, more than 80% of this machine's {memory / 2**30:.0f} GiB"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[20_000, 100_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--class-size", type=int, default=50, help="mean images per class")
    parser.add_argument("--spread", type=float, default=3.0, help="noise around each class center")
    parser.add_argument("--contenders", nargs="+", default=list(CONTENDERS), choices=CONTENDERS)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.data)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/metrics_bench.py " + " ".join(sys.argv[1:])
    report = {"command": command, "cpus": os.cpu_count(), "dim": args.dim, "class_size": args.class_size, "spread": args.spread, "sizes": {}}
    for n in args.sizes:
        x, labels = make_data(n, args.dim, args.class_size, args.spread)
        print(f"N={n:,}  dim={args.dim}  classes={labels.max() + 1}  largest class={np.bincount(labels).max()}  pairs={n * (n - 1) // 2:.2e}")
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            data = Path(tmp) / "data.npz"
            np.savez(data, x=x, labels=labels)
            del x
            for name in args.contenders:
                reason = sklearn_skip_reason(n) if name.startswith("sklearn") else None
                row = {"what": name, "skipped": reason} if reason else measure(name, data)
                rows.append(row)
                print(format_row(row), flush=True)
        report["sizes"][str(n)] = rows
        (out / "metrics_bench.json").write_text(json.dumps(report, indent=2))
    (out / "metrics_bench.md").write_text(markdown(report))


def format_row(row: dict) -> str:
    if "skipped" in row:
        return f"  {row['what']:34s} skipped: {row['skipped']}"
    if "error" in row:
        return f"  {row['what']:34s} failed: {row['error']}"
    shown = ("recall@1", "precision_at_1", "map@r", "mean_average_precision_at_r", "r_precision", "roc_auc")
    values = "  ".join(f"{k}={v:.4f}" for k, v in row["values"].items() if k in shown)
    return f"  {row['what']:34s} {row['seconds']:8.1f} s  {row['peak_rss_gb']:6.2f} GB peak   {values}"


def markdown(report: dict) -> str:
    lines = [f"`{report['command']}` ({report['cpus']} CPUs, dim {report['dim']}, ~{report['class_size']} images a class)", ""]
    for n, rows in report["sizes"].items():
        lines += [f"### N = {int(n):,}", "", "| what | seconds | peak RSS (GB) | values |", "|---|---|---|---|"]
        for row in rows:
            if "seconds" in row:
                values = ", ".join(f"{k} {int(v):,}" if float(v).is_integer() and v > 1 else f"{k} {v:.4f}" for k, v in row["values"].items())
                lines.append(f"| {row['what']} | {row['seconds']} | {row['peak_rss_gb']} | {values} |")
            else:
                lines.append(f"| {row['what']} | – | – | {row.get('skipped') or row.get('error')} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
