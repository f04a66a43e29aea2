"""Re-ranking and query expansion (mltk.rerank) on real test classes, and their cost at scale.

    python benchmarks/rerank_bench.py --runs /tmp/rrb                   # omniglot, att, cub; scale N = 50,000
    python benchmarks/rerank_bench.py --runs runs --dataset att --scale-n 0

For each dataset, the best recipe (examples/omniglot_best.yaml with the dataset's folder and
training classes put in, as benchmarks/experiments.py does) is RUNS/<dataset>/omniglot_best: its
last.pt is used if it exists, else the run is trained there by the ``mltk run --config`` command
experiments.py uses. The held-out test classes are embedded once by the ``mltk evaluate`` command
(--save-embeddings); then ``evaluate_embeddings`` scores recall@k and MAP@R in-process, leave-one-out
(every image a query against all the others), with no re-ranking and with each method of METHODS.
Each call is repeated ``--repeat`` times after a warm-up (numba's compilation is not timed); the
seconds shown are the least of them (the machine may be shared: the least is the least disturbed). "rerank s" is the re-ranker's own wall time as the metrics report it
(``rerank_seconds``: any extra search it makes included); "ms/query" divides it by the number of
queries (every image). Each run also checks that the re-ranked lists still carry plain cosines.

The scale rows: synthetic clustered embeddings (benchmarks/metrics_bench.py ``make_data``),
``--scale-n`` x 128 dimensions, about 50 images a class, leave-one-out; each method runs in a
subprocess of its own, whose peak memory is its maximum resident set (os.wait4); the "none" row,
the same evaluation without re-ranking, is the floor.

Prints the tables and writes benchmarks/results/rerank_bench.{json,md}.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).parent))  # experiments, metrics_bench
from experiments import DATASETS, dataset_config  # noqa: E402
from metrics_bench import make_data  # noqa: E402

EXAMPLE = "omniglot_best"
# (method, spec): the defaults of each, and k-reciprocal at a size for classes of about 10 images
METHODS = [
    ("none", None),
    ("k-reciprocal", "k-reciprocal"),
    ("k-reciprocal, small k", "k-reciprocal:k1=6,k2=3,lambda=0.3"),
    ("qe", "qe"),
    ("dba", "dba"),
]
METRICS = ["recall_at_k", "map_at_r"]


def ensure_run(dataset: str, runs: Path) -> Path:
    """RUNS/<dataset>/omniglot_best/last.pt, trained first (the mltk command experiments.run_mltk runs) if it is missing."""
    run_dir = runs / dataset / EXAMPLE
    if not (run_dir / "last.pt").exists():
        config_file = runs / dataset / f"{EXAMPLE}.yaml"
        config_file.parent.mkdir(parents=True, exist_ok=True)
        config_file.write_text(yaml.safe_dump(dataset_config(EXAMPLE, dataset)))
        print(f"{dataset}: training {run_dir} ...", flush=True)
        subprocess.run([sys.executable, "-m", "mltk", "run", "--config", str(config_file), "--out", str(run_dir), "--overwrite", "--quiet"], check=True, stdout=subprocess.DEVNULL)
    return run_dir / "last.pt"


def embed(checkpoint: Path, dataset: str, out: Path) -> tuple[np.ndarray, np.ndarray]:
    """The dataset's test classes embedded by the mltk evaluate command."""
    spec = DATASETS[dataset]
    subprocess.run(
        [sys.executable, "-m", "mltk", "evaluate", str(checkpoint), "--data", str(spec["root"]), *(x for c in spec["test"] for x in ("--classes", c)),
         "--metrics", ",".join(METRICS), "--save-embeddings", "--no-report", "--out", str(out)],
        check=True, stdout=subprocess.DEVNULL,
    )
    return np.load(out / "embeddings.npy"), np.load(out / "labels.npy")


def settings(reranker) -> str:
    """A re-ranker's parameters in spec form ("k1=20,k2=6,lambda=0.3,candidates=100")."""
    if reranker is None:
        return "–"
    if hasattr(reranker, "k1"):
        return f"k1={reranker.k1},k2={reranker.k2},lambda={reranker.lam:g},candidates={reranker.candidates}"
    return f"n={reranker.n},alpha={reranker.alpha:g}"


def score(x: np.ndarray, labels: np.ndarray, spec: str | None) -> dict:
    """One evaluate_embeddings call: recall@k, MAP@R, its wall time and the re-ranker's; checks the scores are cosines."""
    import mltk.rerank
    from mltk.metrics import evaluate_embeddings

    started = time.perf_counter()
    result = evaluate_embeddings(x, labels, metrics=METRICS, rerank=mltk.rerank.create(spec))
    seconds = time.perf_counter() - started
    nb, query = result.evaluation.neighbours(), result.evaluation.query
    for r0 in range(0, len(query), 256):  # a few rows at a time: this check must not raise the peak memory measured
        cosines = np.einsum("qd,qkd->qk", x[query[r0 : r0 + 256]], x[nb.indices[r0 : r0 + 256]])
        if not np.allclose(nb.similarities[r0 : r0 + 256], cosines, atol=1e-5):
            raise AssertionError(f"{spec}: the re-ranked lists do not carry the cosines of query and item")
    v = result.values
    return {"recall@1": v["recall@1"], "recall@8": v["recall@8"], "map@r": v["map@r"], "seconds": seconds, "rerank_seconds": v.get("rerank_seconds", 0.0)}


def dataset_rows(dataset: str, x: np.ndarray, labels: np.ndarray, repeat: int) -> list[dict]:
    import mltk.rerank

    per_class = np.bincount(np.unique(labels, return_inverse=True)[1])
    score(x, labels, None)  # warm-up: numba compiles the kNN kernels on first use
    rows = []
    for method, spec in METHODS:
        runs = [score(x, labels, spec) for _ in range(repeat)]
        row = {
            "dataset": dataset, "images": len(x), "classes": len(per_class), "per_class_median": float(np.median(per_class)),
            "method": method, "spec": spec, "settings": settings(mltk.rerank.create(spec)),
            **{k: runs[0][k] for k in ("recall@1", "recall@8", "map@r")},
            "seconds": min(r["seconds"] for r in runs), "rerank_seconds": min(r["rerank_seconds"] for r in runs),
            "seconds_each": [r["seconds"] for r in runs], "rerank_seconds_each": [r["rerank_seconds"] for r in runs],
        }
        row["ms_per_query"] = 1000 * row["rerank_seconds"] / len(x)  # every image is a query
        rows.append(row)
    for row in rows:
        row["d_recall@1"], row["d_map@r"] = row["recall@1"] - rows[0]["recall@1"], row["map@r"] - rows[0]["map@r"]
    return rows


def worker(spec: str, data: str) -> None:
    """In the subprocess: load the data, warm up, time one evaluation with the re-ranker, print JSON."""
    import torch

    with np.load(data) as arrays:
        x, labels = arrays["x"], arrays["labels"]
    score(*make_data(500, x.shape[1], 10, 1.0), None)  # numba's compilation, not timed
    result = score(x, labels, None if spec == "none" else spec)
    print(json.dumps({**result, "torch_threads": torch.get_num_threads()}))


def measure(method: str, spec: str | None, data: Path, n: int) -> dict:
    """One method in a fresh subprocess; its peak resident memory comes from os.wait4."""
    import mltk.rerank

    with tempfile.TemporaryFile("w+") as out:
        process = subprocess.Popen([sys.executable, __file__, "--worker", spec or "none", "--data", str(data)], stdout=out)
        _, status, usage = os.wait4(process.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        text = out.read()
    row = {"method": method, "spec": spec, "settings": settings(mltk.rerank.create(spec))}
    if code != 0:
        return {**row, "error": f"exit code {code}"}
    result = json.loads(text.strip().splitlines()[-1])
    return {**row, **result, "ms_per_query": 1000 * result["rerank_seconds"] / n, "peak_rss_gb": usage.ru_maxrss / 2**20}


def machine() -> dict:
    import faiss
    import scipy
    import torch

    try:
        model = next(line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        model = platform.processor()
    return {"cpu": model, "processor": platform.processor(), "cpus": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
            "faiss": faiss.__version__, "numpy": np.__version__, "scipy": scipy.__version__, "python": platform.python_version(), "dtype": "float32"}


def format_row(row: dict) -> str:
    if "error" in row:
        return f"  {row['method']:22s} failed: {row['error']}"
    delta = f"  {row['d_recall@1']:+.4f}  {row['d_map@r']:+.4f}" if "d_map@r" in row else ""
    memory = f"  {row['peak_rss_gb']:.2f} GB peak" if "peak_rss_gb" in row else ""
    return (f"  {row['method']:22s} R@1 {row['recall@1']:.4f}  MAP@R {row['map@r']:.4f}{delta}  "
            f"rerank {row['rerank_seconds']:7.3f} s  {row['ms_per_query']:.4f} ms/query  call {row['seconds']:7.3f} s{memory}")


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"`{report['command']}` ({m['cpu']}, {m['cpus']} cores, float32; torch {m['torch']}, faiss {m['faiss']}; "
             f"seconds: the least of {report['repeat']} calls)", ""]
    lines += ["| dataset | images | per class (median) | method | settings | R@1 | ΔR@1 | MAP@R | ΔMAP@R | rerank s | ms/query | call s |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['dataset']} | {r['images']:,} | {r['per_class_median']:g} | {r['method']} | {r['settings']} | {r['recall@1']:.4f} | {r['d_recall@1']:+.4f} | "
                     f"{r['map@r']:.4f} | {r['d_map@r']:+.4f} | {r['rerank_seconds']:.3f} | {r['ms_per_query']:.3f} | {r['seconds']:.3f} |")
    if report.get("scale"):
        s = report["scale"]
        lines += ["", f"### Scale: N = {s['n']:,} synthetic embeddings × {s['dim']} dimensions, ~{s['class_size']} a class ({s['classes']:,} classes), leave-one-out, one call each", "",
                  "| method | settings | R@1 | MAP@R | rerank s | ms/query | call s | peak RSS (GB) |", "|---|---|---|---|---|---|---|---|"]
        for r in s["rows"]:
            if "error" in r:
                lines.append(f"| {r['method']} | {r['settings']} | – | – | – | – | – | {r['error']} |")
            else:
                lines.append(f"| {r['method']} | {r['settings']} | {r['recall@1']:.4f} | {r['map@r']:.4f} | {r['rerank_seconds']:.1f} | {r['ms_per_query']:.3f} | {r['seconds']:.1f} | {r['peak_rss_gb']:.2f} |")
        lines += ["", f"Scale rows: {s['total_seconds']:.0f} s in all (subprocess start and data loading included)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", action="append", choices=sorted(DATASETS), help="repeatable; default: omniglot, att, cub")
    parser.add_argument("--runs", default=None, help="run directories: RUNS/<dataset>/omniglot_best (trained there if last.pt is missing; default: a temporary folder)")
    parser.add_argument("--repeat", type=int, default=5, help="calls per method on the real data (seconds: the least of them)")
    # 100,000 took 715 s for the five rows here (2 cores, shared), over the ~10 minutes we allow this part
    parser.add_argument("--scale-n", type=int, default=50_000, help="synthetic images for the scale rows (0: skip them)")
    parser.add_argument("--scale-dim", type=int, default=128)
    parser.add_argument("--class-size", type=int, default=50, help="scale rows: mean images per class")
    parser.add_argument("--spread", type=float, default=2.0, help="scale rows: noise around each class center")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker, args.data)

    started = time.perf_counter()
    command = "python benchmarks/rerank_bench.py " + " ".join(sys.argv[1:])
    report = {"command": command, "machine": machine(), "repeat": args.repeat, "example": EXAMPLE, "protocol": "leave-one-out", "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(args.runs or tmp)
        for dataset in args.dataset or ["omniglot", "att", "cub"]:
            checkpoint = ensure_run(dataset, runs)
            x, labels = embed(checkpoint, dataset, Path(tmp) / f"embeddings_{dataset}")
            rows = dataset_rows(dataset, x, labels, args.repeat)
            print(f"{dataset}: {len(x):,} images, {rows[0]['classes']} classes, {rows[0]['per_class_median']:g} a class (median), checkpoint {checkpoint}", flush=True)
            for row in rows:
                print(format_row(row), flush=True)
            report["rows"] += rows
        if args.scale_n:
            scale_started = time.perf_counter()
            x, labels = make_data(args.scale_n, args.scale_dim, args.class_size, args.spread)
            print(f"scale: N={args.scale_n:,}  dim={args.scale_dim}  classes={labels.max() + 1:,}  spread={args.spread}", flush=True)
            data = Path(tmp) / "scale.npz"
            np.savez(data, x=x, labels=labels)
            scale = {"n": args.scale_n, "dim": args.scale_dim, "class_size": args.class_size, "spread": args.spread, "classes": int(labels.max() + 1), "rows": []}
            del x, labels
            for method, spec in METHODS:
                row = measure(method, spec, data, args.scale_n)
                scale["rows"].append(row)
                print(format_row(row), flush=True)
            scale["total_seconds"] = time.perf_counter() - scale_started
            report["scale"] = scale
    report["total_seconds"] = time.perf_counter() - started
    print(f"total {report['total_seconds']:.0f} s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rerank_bench.json").write_text(json.dumps(report, indent=2))
    (out / "rerank_bench.md").write_text(markdown(report))


if __name__ == "__main__":
    main()
