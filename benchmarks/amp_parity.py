"""bf16 autocast against float32 on the CPU: the same recipe, trained from the same seeds both ways, scored once on the
test classes.

    python benchmarks/amp_parity.py --seeds 5     # about 7 minutes a seed (both precisions) on 2 cores with AMX

The recipe is the Omniglot one that ``mltk tune`` chose on the training alphabets
(benchmarks/results/tune_omniglot/best.yaml), trained for the epochs of its final step (final.json) on the five
training alphabets, then scored once on the three test alphabets, as ``mltk tune --final`` does. For each seed it
trains with ``amp: false`` (float32) and ``amp: true`` (bf16 autocast), so the two precisions see the same initial
weights and batches. Reported: ROC-AUC, recall@1 and MAP@R of each run, each precision's mean ± 95 % interval, the
paired difference (each seed's bf16 run minus its float32 run; mean ± 95 %) beside float32's seed-to-seed standard
deviation, and each run's images/s.

On a CPU without bf16 dot products (``mltk.devices.cpu_bf16()`` is None) bf16 is emulated: the figures still hold,
but it trains slower than float32; the script says which CPU it ran on.
Runs go to runs/amp_parity/<precision>/seed<S>; the figures to benchmarks/results/amp_parity.{json,md}, rewritten after
every run, and a run already recorded there is not trained again (Ctrl-C, then the same command, goes on).
"""

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))

from throughput import cpu_name  # noqa: E402

RECIPE = ROOT / "benchmarks" / "results" / "tune_omniglot"
METRICS = ("roc_auc", "recall@1", "map@r")
PRECISIONS = {"fp32": False, "bf16": True}


def train_and_score(cfg, run_dir: Path, test: str, test_classes: list[str]) -> dict:
    """Train ``cfg`` into ``run_dir`` (started over), then score it once on the test classes; the figures and images/s."""
    from mltk.evaluate import EvaluateRequest, execute, prepare
    from mltk.run_dir import read_history
    from mltk.train import train

    started = time.perf_counter()
    train(cfg, run_dir, overwrite=run_dir.exists())
    seconds = time.perf_counter() - started
    request = EvaluateRequest(run=run_dir, data=test, classes=test_classes, report=False).check()
    values = execute(prepare(request, lambda line: None)).values
    history = read_history(run_dir)
    epoch_seconds = math.fsum(r["seconds"] for r in history)
    return {
        **{m: float(values[m]) for m in METRICS},
        "images_per_s": math.fsum(r["images_per_s"] * r["seconds"] for r in history) / epoch_seconds,
        "precision": history[-1]["precision"],
        "final_loss": history[-1]["loss"],
        "seconds": round(seconds, 1),
        "run": os.path.relpath(run_dir, ROOT),
    }


def summary(runs: dict, seeds: int) -> dict:
    """Per metric: each precision's values, mean and 95 % half-width, the difference of the means and the float32
    seeds' standard deviation, over the seeds both precisions finished."""
    from mltk.tune import interval

    both = [s for s in range(seeds) if all(f"{p}/seed{s}" in runs for p in PRECISIONS)]
    out = {"seeds": both}
    for metric in (*METRICS, "images_per_s", "final_loss"):
        row = {}
        for p in PRECISIONS:
            values = [runs[f"{p}/seed{s}"][metric] for s in both]
            mean, half = interval(values) if values else (math.nan, math.nan)
            row[p] = {"values": values, "mean": mean, "half_width": half}
        fp32 = row["fp32"]["values"]
        differences = [b - f for f, b in zip(fp32, row["bf16"]["values"])]  # paired: the same seed's two runs
        row["difference"], row["difference_half_width"] = interval(differences) if differences else (math.nan, math.nan)
        row["fp32_sd"] = statistics.stdev(fp32) if len(fp32) > 1 else math.nan
        row["within_spread"] = abs(row["difference"]) <= row["fp32_sd"]  # the difference no larger than one seed's sway
        row["zero_in_interval"] = abs(row["difference"]) <= row["difference_half_width"]  # no difference the seeds can show
        out[metric] = row
    return out


def write(out: Path, meta: dict, runs: dict, seeds: int) -> dict:
    table = summary(runs, seeds)
    out.mkdir(parents=True, exist_ok=True)
    (out / "amp_parity.json").write_text(json.dumps({"settings": meta, "runs": runs, "summary": table}, indent=2))
    both = table["seeds"]
    lines = [
        f"`{meta['command']}` ({meta['cpu']}, bf16 dot products: {meta['cpu_bf16'] or 'none'}, torch {meta['torch']}, "
        f"{meta['torch_threads']} threads)", "",
        f"The Omniglot recipe of `mltk tune` ({meta['recipe']}), {meta['epochs']} epochs on the training alphabets, scored once on "
        f"{', '.join(meta['test_classes'])}; seeds {', '.join(map(str, both)) or 'none yet'}, each trained in both precisions.", "",
        "| metric | float32 (mean ± 95 %) | bf16 (mean ± 95 %) | bf16 − float32, paired (mean ± 95 %) | float32 seeds' sd | "
        "difference within one sd / interval holds 0 | "
        + " | ".join(f"seed {s} fp32 / bf16" for s in both) + " |",
        "|---|---|---|---|---|---|" + "---|" * len(both),
    ]
    for metric in (*METRICS, "images_per_s", "final_loss"):
        row = table[metric]
        f32, b16 = row["fp32"], row["bf16"]
        digits = 1 if metric == "images_per_s" else 4
        within = " / ".join("yes" if row[k] else "no" for k in ("within_spread", "zero_in_interval")) if metric in METRICS else "–"
        lines.append(
            f"| {metric} | {f32['mean']:.{digits}f} ± {f32['half_width']:.{digits}f} | {b16['mean']:.{digits}f} ± {b16['half_width']:.{digits}f} | "
            f"{row['difference']:+.{digits}f} ± {row['difference_half_width']:.{digits}f} | {row['fp32_sd']:.{digits}f} | {within} | "
            + " | ".join(f"{a:.{digits}f} / {b:.{digits}f}" for a, b in zip(f32["values"], b16["values"])) + " |"
        )
    (out / "amp_parity.md").write_text("\n".join(lines) + "\n")
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's final step's (final.json)")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "omniglot_background_small"))
    parser.add_argument("--runs", default=str(ROOT / "runs" / "amp_parity"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()

    import torch

    from mltk.config import load_yaml, make_config
    from mltk.devices import cpu_bf16

    final = json.loads((RECIPE / "final.json").read_text())
    epochs = args.epochs or final["epochs"]
    base = make_config(load_yaml(RECIPE / "best.yaml"), source=str(RECIPE / "best.yaml"))
    base = replace(base, data=args.data, data_classes=final["data_classes"], val_data=None, val_data_classes=[], val_classes=0.0, epochs=epochs)
    command = f"python benchmarks/amp_parity.py --seeds {args.seeds}" + (f" --epochs {args.epochs}" if args.epochs else "")
    meta = {
        "command": command, "recipe": str((RECIPE / "best.yaml").relative_to(ROOT)), "epochs": epochs, "data": args.data,
        "test_classes": final["test_classes"], "cpu": cpu_name(), "cpu_bf16": cpu_bf16(), "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
    }
    out = Path(args.out)
    recorded = out / "amp_parity.json"
    runs = {}
    if recorded.is_file():
        previous = json.loads(recorded.read_text())
        if previous["settings"]["epochs"] == epochs and previous["settings"]["data"] == args.data:
            runs = previous["runs"]
    print(f"CPU: {meta['cpu']}; bf16 dot products: {meta['cpu_bf16'] or 'none (bf16 is emulated here)'}", flush=True)
    for seed in range(args.seeds):
        for name, amp in PRECISIONS.items():
            key = f"{name}/seed{seed}"
            if key in runs:
                continue
            runs[key] = train_and_score(replace(base, seed=seed, amp=amp), Path(args.runs) / name / f"seed{seed}", args.data, final["test_classes"])
            r = runs[key]
            print(f"{key:12s} " + "  ".join(f"{m} {r[m]:.4f}" for m in METRICS) + f"  {r['images_per_s']:.1f} images/s  {r['seconds']:.0f} s", flush=True)
            write(out, meta, runs, args.seeds)
    write(out, meta, runs, args.seeds)  # also when every run was recorded before
    print((out / "amp_parity.md").read_text())


if __name__ == "__main__":
    main()
