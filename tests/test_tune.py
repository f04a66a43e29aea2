"""mltk tune: the search space checked whole, class-disjoint folds of the training classes only, a search that resumes
after a kill -9 and is shared by two processes, and the final step's figures with their interval."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO, make_image_folder, one_line_error, snapshot

from mltk import tune
from mltk.errors import UsageError

BASE = dict(backbone="test_resnet", image_size=32, dim=16, batch_size=8, m_per_class=2, workers=0, epochs=1, seed=0)
SPACE = "lr: {log: [1e-4, 1e-2]}\nloss: {choice: [arcface, 0.1*center+ce+arcface]}\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Training images (8 classes), test images of 4 other classes, a base config and a space."""
    root = tmp_path_factory.mktemp("tune")
    make_image_folder(root / "train", classes=8, per_class=4)
    test = make_image_folder(root / "test_raw", classes=4, per_class=4, seed=3)
    (root / "test").mkdir()
    for folder in sorted(p for p in test.iterdir() if p.is_dir()):  # other names: classes the search never saw
        folder.rename(root / "test" / folder.name.replace("class", "unseen"))
    (root / "base.yaml").write_text(yaml.safe_dump({**BASE, "data": str(root / "train")}))
    (root / "space.yaml").write_text(SPACE)
    return root


def tune_args(root: Path, out: Path, *more, folds: int = 2) -> list:
    return ["tune", out, "--space", root / "space.yaml", "--config", root / "base.yaml", "--folds", str(folds), *more]


@pytest.mark.parametrize("space, message", [
    ("lrr: {log: [1e-4, 1e-2]}", "unknown key 'lrr' in space.yaml; did you mean 'lr'?"),
    ("seed: {int: [0, 9]}", "seed in space.yaml cannot be searched over: it is set for the whole search"),
    ("lr: {log: [1e-2, 1e-4]}", "lr in space.yaml: log [0.01, 0.0001] needs low < high"),
    ("lr: {log: [0, 1e-2]}", "lr in space.yaml: log [0, 0.01] needs numbers above 0"),
    ("lr: {log: [1e-4, 50]}", "lr in space.yaml must be a number in [0, 10], got 50"),
    ("lr: {uniform: [0, 1]}", "unknown key 'uniform' in lr in space.yaml"),
    ("lr: {log: [1e-4, 1e-2], float: [0, 1]}", "lr in space.yaml must be one of {log: [low, high]}"),
    ("m_per_class: {int: [2.5, 4]}", "m_per_class['int'][0] in space.yaml must be a whole number, got 2.5"),
    ("loss: {choice: [arcface, arcfce]}", "loss in space.yaml: unknown loss 'arcfce'; did you mean 'arcface'?"),
    ("[1, 2]", "space.yaml must be a mapping of run options to ranges"),
    ("lr: [", "is not readable YAML"),
])
def test_a_bad_search_space_is_one_line_before_any_training(setup, tmp_path, mltk_main, space, message):
    (tmp_path / "space.yaml").write_text(space)
    before = snapshot(tmp_path)
    line = one_line_error(mltk_main("tune", tmp_path / "t", "--space", tmp_path / "space.yaml", "--config", setup / "base.yaml"), 2)
    assert message in line, line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("args, message", [
    (["--folds", "5"], "--folds 5 on 8 classes leaves a fold, or what trains beside it, with fewer than 2 classes; give --folds 4 or fewer"),
    (["--metric", "recal@1"], "unknown --metric 'recal@1'"),
    (["--sampler", "grid"], "unknown --sampler 'grid'; choose tpe, random, cmaes, qmc"),
    (["--test", "x"], "--test and --test-classes go with --final: the search itself never reads the test classes"),
    (["--storage", "nosuch://x"], "cannot open the study storage 'nosuch://x'"),
])
def test_options_that_cannot_work_are_one_line(setup, tmp_path, mltk_main, args, message):
    line = one_line_error(mltk_main(*tune_args(setup, tmp_path / "t", "--trials", "1", *args)))
    assert message in line, line
    assert not (tmp_path / "t" / "trials.csv").exists()


@pytest.mark.parametrize("args, message", [
    ([], "--final needs --test TEST"),
    (["--test", "x", "--seeds", "0"], "--seeds and --epochs take 1 or more"),
    (["--test", "x", "--epochs", "0"], "--seeds and --epochs take 1 or more"),
    (["--test", "x"], "is not a tune directory (no tune.json)"),
])
def test_a_final_step_that_cannot_work_is_one_line(tmp_path, mltk_main, args, message):
    line = one_line_error(mltk_main("tune", tmp_path / "t", "--final", *args))
    assert message in line, line
    assert not (tmp_path / "t" / "final").exists()


def test_folds_are_class_disjoint_cover_the_training_classes_and_follow_the_seed():
    classes = [f"c{i}" for i in range(10)]
    folds = tune.class_folds(classes, 4, seed=0)
    assert sorted(c for f in folds for c in f) == classes and len(folds) == 4
    assert all(not set(a) & set(b) for i, a in enumerate(folds) for b in folds[i + 1:])
    assert folds == tune.class_folds(classes, 4, seed=0) != tune.class_folds(classes, 4, seed=1)
    held_out = tune.class_folds(classes, 1, seed=0, holdout=0.3)
    assert len(held_out) == 1 and len(held_out[0]) == 3
    cfg = tune.fold_config(tune.Search(base={}, space={}, folds=[]).config({"data": "d"}), ["c[1]", "c2"], ["c[1]", "c2", "c3", "c4"])
    assert cfg.data_classes == ["c3", "c4"] and cfg.val_data == "d" and cfg.val_data_classes == ["c[[]1]", "c2"] and cfg.val_classes == 0
    with pytest.raises(UsageError, match="--folds 3 on 5 classes"):
        tune.class_folds(classes[:5], 3, seed=0)


def read_trials(out: Path) -> list[dict]:
    with open(out / "trials.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_a_search_writes_its_trials_a_best_yaml_mltk_run_takes_and_a_page(setup, tmp_path, mltk_main):
    out = tmp_path / "t"
    code, said, err = mltk_main(*tune_args(setup, out, "--trials", "3"))
    assert code == 0, err
    trials = read_trials(out)
    assert [t["state"] for t in trials] == ["complete"] * 3 and said.count("complete: map@r") == 3
    for t in trials:  # the objective is the mean of the folds, each recorded
        assert float(t["map@r"]) == pytest.approx((float(t["fold 0"]) + float(t["fold 1"])) / 2)
    searched = json.loads((out / "tune.json").read_text())
    folds = searched["folds"]
    assert sorted(c for f in folds for c in f) == [f"class_{i:02d}" for i in range(8)]  # the training classes, nothing else
    fold_run = yaml.safe_load((out / "trials" / "0000" / "fold1" / "config.yaml").read_text())
    assert fold_run["val_data_classes"] == folds[1] and fold_run["data_classes"] == folds[0]
    assert not list((out / "trials").rglob("*.pt"))  # checkpoints go once a fold is scored
    page = (out / "report.html").read_text()
    assert "Optimisation history" in page and "data:image/png;base64," in page
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["lr"] == pytest.approx(float(min(trials, key=lambda t: -float(t["map@r"]))["lr"]), rel=1e-3)
    code, _, err = mltk_main("run", "--config", out / "best.yaml", "--out", tmp_path / "run", "--quiet")
    assert code == 0, err
    # The final step: the best settings, two seeds (trained longer than the folds), the test classes once each;
    # mltk compare reads the runs.
    code, said, err = mltk_main("tune", out, "--final", "--test", setup / "test", "--seeds", "2", "--epochs", "2")
    assert code == 0, err
    final = json.loads((out / "final.json").read_text())
    assert final["seeds"] == 2 and final["test"] == str(setup / "test") and final["epochs"] == 2
    assert yaml.safe_load((out / "final" / "seed1" / "config.yaml").read_text())["epochs"] == 2 != BASE["epochs"]
    m = final["metrics"]["map@r"]
    assert len(m["values"]) == 2 and m["mean"] == pytest.approx(sum(m["values"]) / 2) and m["half_width"] >= 0
    assert "map@r" in (out / "final.md").read_text() and "±" in said
    code, table, err = mltk_main("compare", out / "final" / "seed0", out / "final" / "seed1")
    assert code == 0 and "not ranked" not in table, err


def _tune_process(setup, out: Path, *args) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "mltk", *map(str, args)], cwd=out.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "MLTK_LOAD_PLUGINS": ""},
    )


def _wait_for(path: Path, process: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.time() + seconds
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.2)


def test_two_processes_share_one_study_and_finish_the_budget_between_them(setup, tmp_path):
    out = tmp_path / "t"
    first = _tune_process(setup, out, *tune_args(setup, out, "--trials", "4", "--pruner", "none", folds=1))
    _wait_for(out / "tune.json", first)
    second = _tune_process(setup, out, "tune", out, "--resume")
    outputs = [p.communicate(timeout=600) for p in (first, second)]
    assert [p.returncode for p in (first, second)] == [0, 0], outputs
    trials = read_trials(out)
    assert [t["state"] for t in trials] == ["complete"] * 4 and [int(t["trial"]) for t in trials] == [0, 1, 2, 3]
    said = [line for o, _ in outputs for line in o.splitlines() if " complete: " in line]
    assert sorted(int(line.split()[1]) for line in said) == [0, 1, 2, 3]  # each trial run by one process, once


def test_ctrl_c_then_a_kill_9_mid_trial_each_resume_keeping_every_earlier_trial_and_running_the_cut_one_again(setup, tmp_path):
    out = tmp_path / "t"
    env = {**os.environ, "MLTK_LOAD_PLUGINS": ""}
    process = _tune_process(setup, out, *tune_args(setup, out, "--trials", "3", "--pruner", "none", folds=1))
    _wait_for(out / "trials" / "0001" / "fold0" / "metrics.jsonl", process)  # trial 0 scored, trial 1 training
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 130 and err.strip() == f"interrupted; every finished trial is kept in {str(out)!r} (the one running is run again): go on with mltk tune {out} --resume"
    before = read_trials(out)
    process = _tune_process(setup, out, "tune", out, "--resume")
    _wait_for(out / "trials" / "0003" / "fold0" / "metrics.jsonl", process)  # trial 2 (trial 1 again) scored, 3 training
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    done = subprocess.run([sys.executable, "-m", "mltk", "tune", str(out), "--resume"], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "trial(s) 3 had been left running by a process that is gone: run again" in done.stdout
    trials = read_trials(out)
    assert trials[0] == before[0]  # the earlier trial, as it was
    assert [t["state"] for t in trials] == ["complete", "fail", "complete", "fail", "complete"]
    for cut, again in ((1, 2), (3, 4)):  # each cut trial's settings, run again
        assert trials[again]["note"] == f"run again as trial of #{cut}" and trials[again]["lr"] == trials[cut]["lr"]
