"""The experiment table on real data: mltk's configurations beside a plain timm + PML loop.

    python benchmarks/experiments.py --dataset omniglot            # cpu0..cpu5, the best recipe, the plain loop
    python benchmarks/experiments.py --dataset cub --dataset att
    python benchmarks/experiments.py --dataset omniglot --configs omniglot_best,plain

Each mltk configuration is trained by the ``mltk run`` command itself (the example config, with
the dataset's paths and class split put in), then its last checkpoint is evaluated on the held-out
classes by the ``mltk evaluate`` command (into RUN/eval): ROC-AUC, TAR@FAR and EER over all test pairs,
recall@1/2/4/8, MAP@R. The plain loop (benchmarks/plain_loop.py: ArcFace only, Adam, same backbone,
data, image size and epochs as the best recipe) is scored by the same metric code. Prints a table
and writes benchmarks/results/experiments_<dataset>.{json,md}, and ``mltk compare`` of the mltk runs
to benchmarks/results/compare_<dataset>.{md,html}. ``--runs DIR`` keeps the run directories.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
CONFIGS = ["cpu0_frozen", "cpu1_center_ce", "cpu2_arcface_augment", "cpu3_4096", "cpu4_deeper_4096", "cpu5_hybrid_8192", "omniglot_best", "plain"]
OMNIGLOT_TRAIN = ["Balinese__*", "Early_Aramaic__*", "Greek__*", "Korean__*", "Latin__*"]
OMNIGLOT_TEST = ["Japanese_(katakana)__*", "Sanskrit__*", "Tagalog__*"]
DATASETS = {
    "omniglot": dict(root=DATA / "omniglot_background_small", train=OMNIGLOT_TRAIN, test=OMNIGLOT_TEST, changes={}),
    # Birds and faces: flips and colour are fine here; birds get more pixels. With 25 and 20 training
    # classes, a batch of 64 holds 16 classes of 4 (the best recipe's 32 classes of 2 would need 32).
    "cub": dict(
        root=DATA / "cub200_2011_subset", train=["00?.*", "01?.*", "02[0-5].*"], test=["02[6-9].*", "03?.*", "04?.*", "050.*"],
        changes={"image_size": 128, "augment_options": {"scale": [0.5, 1.0]}, "m_per_class": 4},
    ),
    "att": dict(
        root=DATA / "att_faces", train=["s[1-9]", "s1?", "s20"], test=["s2[1-9]", "s3?", "s40"],
        changes={"augment_options": {"scale": [0.7, 1.0], "color_jitter": 0.0}, "m_per_class": 4},
    ),
}
METRICS = ["roc_auc", "tar_at_far", "eer", "recall_at_k", "map_at_r"]
PLAIN_M = 4  # the plain loop as a user writes it (and as the targets were set): batches of 64 with 4 per class
FIGURES = REPO / "docs" / "figures"
SHOWN = ["roc_auc", "recall@1", "recall@2", "recall@4", "recall@8", "map@r"]


def dataset_config(example: str, dataset: str) -> dict:
    """The example config with the dataset's folder and training classes put in.

    No per-epoch validation: the test classes are only looked at once, on the last checkpoint.
    """
    config = yaml.safe_load((REPO / "examples" / f"{example}.yaml").read_text())
    spec = DATASETS[dataset]
    config.update(data=str(spec["root"]), data_classes=spec["train"], val_data=None, val_data_classes=[], val_classes=0.0)
    for key, value in spec["changes"].items():
        if key != "augment_options" or config.get("augment"):
            config[key] = value
    config.pop("out", None)
    return config


def test_images(dataset: str):
    from mltk.data import load_data, select_classes

    spec = DATASETS[dataset]
    return select_classes(load_data(str(spec["root"])), spec["test"])


def run_mltk(example: str, dataset: str, runs: Path) -> dict:
    """Train with the mltk command, then evaluate the last checkpoint on the test classes with the mltk command
    (into RUN/eval, where `mltk compare` finds it)."""
    run_dir = runs / dataset / example
    config_file = runs / dataset / f"{example}.yaml"
    config_file.parent.mkdir(parents=True, exist_ok=True)
    config_file.write_text(yaml.safe_dump(dataset_config(example, dataset)))
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mltk", "run", "--config", str(config_file), "--out", str(run_dir), "--overwrite", "--quiet"], check=True, stdout=subprocess.DEVNULL)  # a rerun trains afresh
    seconds = time.perf_counter() - started
    spec = DATASETS[dataset]
    figure = example == "omniglot_best"  # the t-SNE docs/results.md shows: from the embeddings evaluate saves
    subprocess.run(
        [sys.executable, "-m", "mltk", "evaluate", str(run_dir / "last.pt"), "--data", str(spec["root"]), *(x for c in spec["test"] for x in ("--classes", c)),
         "--metrics", ",".join(METRICS), "--no-report", "--out", str(run_dir / "eval"), *(["--save-embeddings"] if figure else [])],
        check=True, stdout=subprocess.DEVNULL,
    )
    values = json.loads((run_dir / "eval" / "metrics.json").read_text())
    if figure:
        import numpy as np

        from mltk import report

        embeddings, labels = np.load(run_dir / "eval" / "embeddings.npy"), np.load(run_dir / "eval" / "labels.npy")
        classes = test_images(dataset).classes
        keep = report.sample_classes(labels, 20, seed=0)
        points = report.project(embeddings[keep], "tsne", seed=0)
        png = report.scatter_plot(points, labels[keep], classes, f"t-SNE of {dataset} test classes (20 of {len(classes)}), best recipe")
        (Path(FIGURES) / f"tsne_{dataset}_best.png").write_bytes(png)
        for name in ("embeddings.npy", "labels.npy", "paths.txt"):
            (run_dir / "eval" / name).unlink()
    history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ips = sum(r["images_per_s"] * r["seconds"] for r in history) / sum(r["seconds"] for r in history) if history else None
    return {"what": example, "epochs": len(history), "train_seconds": round(seconds), "images_per_s": ips and round(ips, 1), **{k: values[k] for k in SHOWN}}


def run_plain(dataset: str) -> dict:
    """The hand-written loop with the best recipe's backbone, image size, batch and epochs (4 images per class)."""
    import numpy as np

    from mltk.metrics import evaluate_embeddings
    from plain_loop import embed_plain, train_plain

    best = dataset_config("omniglot_best", dataset)
    spec = DATASETS[dataset]
    started = time.perf_counter()
    model, transform, ips, _ = train_plain(
        str(spec["root"]), spec["train"], backbone=best["backbone"], image_size=best["image_size"], dim=best["dim"],
        epochs=best["epochs"], batch_size=best["batch_size"], m=PLAIN_M, workers=best.get("workers", 2), log=lambda *_: None,
    )
    seconds = time.perf_counter() - started
    embeddings, labels = embed_plain(model, transform, str(spec["root"]), spec["test"])
    values = evaluate_embeddings(np.ascontiguousarray(embeddings), labels, metrics=METRICS).values
    return {"what": "plain timm + PML loop (ArcFace)", "epochs": best["epochs"], "train_seconds": round(seconds), "images_per_s": round(ips, 1), **{k: values[k] for k in SHOWN}}


def markdown(dataset: str, rows: list[dict], command: str) -> str:
    head = "| configuration | epochs | train s | images/s | ROC-AUC | R@1 | R@2 | R@4 | R@8 | MAP@R |\n|---|---|---|---|---|---|---|---|---|---|\n"
    body = "".join(
        f"| {r['what']} | {r['epochs']} | {r['train_seconds']} | {r['images_per_s'] or '–'} | "
        + " | ".join(f"{r[k]:.4f}" for k in SHOWN)
        + " |\n"
        for r in rows
    )
    return f"`{command}`\n\n### {dataset}\n\n{head}{body}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", action="append", choices=sorted(DATASETS), help="repeatable; default: omniglot")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated: example names and/or 'plain'")
    parser.add_argument("--runs", default=None, help="where run directories go (default: a temporary folder)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    command = "python benchmarks/experiments.py " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(args.runs or tmp)
        for dataset in args.dataset or ["omniglot"]:
            rows = []
            for name in args.configs.split(","):
                row = run_plain(dataset) if name == "plain" else run_mltk(name, dataset, runs)
                rows.append(row)
                print(f"{dataset:9s} {row['what']:34s} " + "  ".join(f"{k} {row[k]:.4f}" for k in SHOWN) + f"  {row['train_seconds']} s  {row['images_per_s']} img/s", flush=True)
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"experiments_{dataset}.json").write_text(json.dumps({"command": command, "rows": rows}, indent=2))
            (out / f"experiments_{dataset}.md").write_text(markdown(dataset, rows, command))
            # The mltk rows as `mltk compare` shows them: their config differences, times and evaluations side by side.
            names = [name for name in args.configs.split(",") if name != "plain"]  # run from their folder: rows named by config
            targets = [x for suffix in ("md", "html") for x in ("--out", str((out / f"compare_{dataset}.{suffix}").resolve()))]
            subprocess.run([sys.executable, "-m", "mltk", "compare", *names, *targets], check=True, stdout=subprocess.DEVNULL, cwd=runs / dataset)


if __name__ == "__main__":
    main()
