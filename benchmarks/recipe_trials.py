"""Recipe trials on Omniglot: one change at a time to the cpu2 recipe, 15 epochs, scored on the unseen alphabets.

    python benchmarks/recipe_trials.py                       # every trial, one after another (~4 min each here)
    python benchmarks/recipe_trials.py --trial m2 --trial lr2e-3_warmup2

Each trial is ``examples/cpu2_arcface_augment.yaml`` (ResNet-18, 64 px, 0.1*center + ce + ArcFace,
512 dims, mild crops) at 15 epochs, with the trial's changes, trained by ``mltk.train.train`` on the
five training alphabets (no validation during training); its last checkpoint is scored once on the
three unseen alphabets by the code behind ``mltk evaluate`` (ROC-AUC over all pairs, recall@k,
MAP@R). A trial's line is appended to benchmarks/results/recipe_trials.jsonl as it finishes, and
benchmarks/results/recipe_trials.md is rewritten from that file (the latest line of each trial).
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
sys.path.insert(0, str(REPO / "benchmarks"))
from experiments import DATASETS, METRICS  # noqa: E402

STROKES = {"scale": [0.6, 1.0], "ratio": [0.8, 1.25], "hflip": 0.0, "color_jitter": 0.0}
TRIALS = {
    "base": {},
    "affine": {"augment_options": {**STROKES, "affine": {"degrees": 10, "translate": [0.1, 0.1], "shear": 10, "fill": 255}}},
    "arcface_scale30": {"loss_options": {"arcface": {"scale": 30}}},
    "lr2e-3": {"lr": 0.002},
    "lr2e-3_warmup2": {"lr": 0.002, "warmup_epochs": 2},
    "dim256": {"dim": 256},
    "m2": {"m_per_class": 2},
    "arcface_only": {"loss": "arcface"},
    "lr2e-3_wd0.05": {"lr": 0.002, "weight_decay": 0.05},
    "arcface_margin20": {"loss_options": {"arcface": {"margin": 20}}},
    "lr2e-3_warmup2_m2": {"lr": 0.002, "warmup_epochs": 2, "m_per_class": 2},
    "lr2e-3_warmup2_m2_seed1": {"lr": 0.002, "warmup_epochs": 2, "m_per_class": 2, "seed": 1},
}


def trial_config(changes: dict) -> dict:
    spec = DATASETS["omniglot"]
    config = yaml.safe_load((REPO / "examples" / "cpu2_arcface_augment.yaml").read_text())
    config.update(data=str(spec["root"]), data_classes=spec["train"], val_data=None, val_data_classes=[], epochs=15, out=None)
    config.update(changes)
    return config


def run_trial(name: str, runs: Path) -> dict:
    import mltk
    from mltk.config import make_config
    from mltk.data import load_data, select_classes
    from mltk.evaluate import evaluate
    from mltk.train import train

    spec = DATASETS["omniglot"]
    started = time.perf_counter()
    result = train(make_config(trial_config(TRIALS[name])), runs / name, overwrite=True)  # a rerun trains afresh
    seconds = time.perf_counter() - started
    test = select_classes(load_data(str(spec["root"])), spec["test"])
    v = evaluate(mltk.load(runs / name / "last.pt", device="cpu"), data=test, metrics=METRICS).values
    return {
        "trial": name, "changes": TRIALS[name], "roc_auc": round(v["roc_auc"], 4), "recall@1": round(v["recall@1"], 4),
        "recall@8": round(v["recall@8"], 4), "map@r": round(v["map@r"], 4), "train_seconds": round(seconds),
        "images_per_s_last_epoch": round(result.history[-1]["images_per_s"]),
    }  # fmt: skip


def write_markdown(lines: list[dict]) -> None:
    latest = {r["trial"]: r for r in lines}
    rows = [latest[name] for name in TRIALS if name in latest]
    text = (
        "# Recipe trials on Omniglot (15 epochs, ResNet-18, 64 px; test: 3 unseen alphabets)\n\n"
        "Command: `python benchmarks/recipe_trials.py [--trial NAME ...]`\n\n"
        "| trial | changes to examples/cpu2_arcface_augment.yaml | ROC-AUC | R@1 | R@8 | MAP@R |\n|---|---|---|---|---|---|\n"
        + "".join(f"| {r['trial']} | `{json.dumps(r['changes'])}` | {r['roc_auc']:.4f} | {r['recall@1']:.4f} | {r['recall@8']:.4f} | {r['map@r']:.4f} |\n" for r in rows)
    )
    (RESULTS / "recipe_trials.md").write_text(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trial", action="append", choices=sorted(TRIALS), help="repeatable; default: every trial")
    args = parser.parse_args()
    RESULTS.mkdir(exist_ok=True)
    log = RESULTS / "recipe_trials.jsonl"
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.trial or list(TRIALS):
            row = run_trial(name, Path(tmp))
            print(json.dumps(row), flush=True)
            with open(log, "a") as f:
                f.write(json.dumps(row) + "\n")
    write_markdown([json.loads(line) for line in log.read_text().splitlines() if line.strip()])


if __name__ == "__main__":
    main()
