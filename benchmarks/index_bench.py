"""What each faiss index kind of ``mltk index`` / ``mltk evaluate --index`` costs and loses, side by side.

    python benchmarks/index_bench.py                      # 200,000 x 256 clustered vectors, 1,000 queries
    python benchmarks/index_bench.py --n 1000000 --dim 128

The gallery is synthetic, L2-normalised and clustered like embeddings of a trained model (classes
of images around a centre, with a spread comparable to the gap between classes). For each kind:
build time, search time per query (k = 10, one thread per core, CPU), bytes per vector in the
index, and recall@10 against the exact search: the share of the true 10 nearest it returns.
Prints a table and writes benchmarks/results/index_bench.{json,md}.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np

from mltk import knn as mindex

RESULTS = Path(__file__).resolve().parent / "results"


def around(centres: np.ndarray, n: int, spread: float, rng) -> np.ndarray:
    """``n`` unit vectors, each a random centre plus Gaussian noise of ``spread`` per dimension."""
    x = centres[rng.integers(0, len(centres), n)] + spread * rng.standard_normal((n, centres.shape[1]), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def index_bytes(index) -> int:
    import faiss

    return len(faiss.serialize_index(index))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--classes", type=int, default=20_000)
    parser.add_argument("--spread", type=float, default=0.7, help="norm of the noise around a class centre (whose norm is about 1)")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    centres = rng.standard_normal((args.classes, args.dim), dtype=np.float32) / np.sqrt(args.dim)  # norm about 1
    gallery = around(centres, args.n, args.spread / np.sqrt(args.dim), rng)
    queries = around(centres, args.queries, args.spread / np.sqrt(args.dim), rng)  # new images of the same classes
    started = time.perf_counter()
    _, exact = mindex.exact_neighbours(queries, gallery, args.k)
    exact_s = time.perf_counter() - started

    rows = [{"kind": "exact (numpy brute force)", "build_s": 0.0, "ms_per_query": 1000 * exact_s / args.queries, "bytes_per_vector": 4 * args.dim, "recall": 1.0}]
    for kind, options in (("flat", {}), ("ivf", {}), ("ivfpq", {}), ("hnsw", {})):
        started = time.perf_counter()
        index = mindex.build(gallery, kind, **options)
        build_s = time.perf_counter() - started
        started = time.perf_counter()
        _, found = mindex.search(index, queries, args.k)
        search_s = time.perf_counter() - started
        settings = ", ".join(f"{k} {v}" for k, v in mindex.settings(index).items())
        rows.append(
            {
                "kind": kind + (f" ({settings})" if settings else ""),
                "build_s": build_s,
                "ms_per_query": 1000 * search_s / args.queries,
                "bytes_per_vector": index_bytes(index) / args.n,
                "recall": mindex.overlap(found, exact, args.k),
            }
        )
        print(rows[-1], flush=True)

    header = f"{args.n:,} x {args.dim} vectors, {args.classes:,} clusters, {args.queries:,} queries, k = {args.k}"
    lines = [
        f"# Index kinds: {header}", "",
        f"Command: `python benchmarks/index_bench.py --n {args.n} --dim {args.dim} --classes {args.classes} --spread {args.spread} --queries {args.queries} --k {args.k}`", "",
        f"| index | build (s) | search (ms/query) | bytes/vector | recall@{args.k} vs exact |", "|---|---|---|---|---|",
    ]  # fmt: skip
    lines += [f"| {r['kind']} | {r['build_s']:.1f} | {r['ms_per_query']:.3f} | {r['bytes_per_vector']:.0f} | {r['recall']:.3f} |" for r in rows]
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "index_bench.md").write_text(text)
    (RESULTS / "index_bench.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
