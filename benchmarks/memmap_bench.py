"""Evaluating a gallery kept on disk: embeddings in a memory-mapped .npy, an IVF-PQ index, peak memory.

    python benchmarks/memmap_bench.py                          # 1,000,000 x 256 (1 GiB on disk), 10,000 queries
    python benchmarks/memmap_bench.py --n 4000000 --dim 512    # 8 GiB on disk

What ``mltk evaluate --save-embeddings --index ivfpq`` does after embedding: the embeddings are a
read-only memory map (``mltk.embedding.embed(..., out=FILE)`` writes them batch by batch), the
index is built from chunks of it and keeps pq_m bytes per vector, and queries are searched in
blocks. The memory the process itself allocates (RssAnon, sampled every 20 ms from
/proc/self/status) is printed beside the size of the file: pages of the file the kernel has read
in are cache it can drop, not memory the evaluation holds. Retrieval metrics only (recall@k,
MAP@R): queries against the gallery, the index's recall against the exact search on 1,000 queries.
Writes benchmarks/results/memmap_bench.{json,md}.
"""

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def rss_anon() -> int:
    """Bytes of anonymous memory (heap, arrays) this process has resident; file-backed pages are not counted."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


class Peak:
    """The largest RssAnon seen while the ``with`` block runs."""

    def __enter__(self):
        self.peak, self.running = rss_anon(), True
        self.thread = threading.Thread(target=self.watch, daemon=True)
        self.thread.start()
        return self

    def watch(self):
        while self.running:
            self.peak = max(self.peak, rss_anon())
            time.sleep(0.02)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, rss_anon())


def write_embeddings(path: Path, n: int, dim: int, classes: int, spread: float, chunk: int = 100_000) -> np.ndarray:
    """Clustered unit vectors written chunk by chunk into an .npy memory map (never whole in memory); their labels."""
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((classes, dim), dtype=np.float32) / np.sqrt(dim)
    labels = rng.integers(0, classes, n)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    for s in range(0, n, chunk):
        x = centres[labels[s : s + chunk]] + spread / np.sqrt(dim) * rng.standard_normal((min(chunk, n - s), dim), dtype=np.float32)
        out[s : s + chunk] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()
    del out
    return labels


def main() -> None:
    import faiss  # noqa: F401  (imported before the "before" figure: libraries are not the evaluation's memory)
    import torch  # noqa: F401

    from mltk.metrics import evaluate_embeddings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--classes", type=int, default=50_000)
    parser.add_argument("--spread", type=float, default=0.7)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--pq-m", type=int, default=32)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "embeddings.npy"
        labels = write_embeddings(path, args.n, args.dim, args.classes, args.spread)
        embeddings = np.load(path, mmap_mode="r")
        before = rss_anon()
        started = time.perf_counter()
        with Peak() as peak:
            result = evaluate_embeddings(
                embeddings, labels, query=np.arange(args.queries), gallery=np.arange(args.queries, args.n),
                metrics=["recall_at_k", "map_at_r"], engine="ivfpq", index_options={"pq_m": args.pq_m},
            )
        seconds = time.perf_counter() - started
        file_bytes = path.stat().st_size
    values = {k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in result.values.items()}
    row = {
        "file_gib": file_bytes / 2**30, "peak_rss_anon_gib": peak.peak / 2**30, "rss_anon_before_gib": before / 2**30,
        "seconds": seconds, **values,
    }  # fmt: skip
    command = f"python benchmarks/memmap_bench.py --n {args.n} --dim {args.dim} --classes {args.classes} --spread {args.spread} --queries {args.queries} --pq-m {args.pq_m}"
    lines = [
        f"# A gallery on disk: {args.n:,} x {args.dim} embeddings, {args.queries:,} queries, ivfpq index", "",
        f"Command: `{command}`", "",
        "| embeddings file | peak anonymous memory (before: the libraries) | time | recall@1 | MAP@R | index recall@1 / @8 vs exact |",
        "|---|---|---|---|---|---|",
        f"| {row['file_gib']:.2f} GiB | {row['peak_rss_anon_gib']:.2f} GiB ({row['rss_anon_before_gib']:.2f} GiB) | {seconds:.0f} s "
        f"| {values['recall@1']:.3f} | {values['map@r']:.3f} | {values.get('index_recall@1', float('nan')):.3f} / {values.get('index_recall@8', float('nan')):.3f} |",
    ]  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(json.dumps(row, indent=2))
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memmap_bench.md").write_text(text)
    (RESULTS / "memmap_bench.json").write_text(json.dumps({"args": vars(args), "result": row}, indent=2))


if __name__ == "__main__":
    main()
