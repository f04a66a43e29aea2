"""A run's lifecycle hooks: a third-party plugin follows a real `mltk run`, stops it early, and when it raises the
run still finishes intact; --early-stop; --log and its loggers (TensorBoard's files read back by tensorboard)."""

import json
import textwrap

import pytest
import torch

import mltk

from conftest import REPO, TINY, make_image_folder, one_line_error
from mltk.config import make_config
from mltk.errors import Interrupted, UsageError
from mltk.run_dir import read_history
from mltk.train import train

# A plugin as a user would write one: its own module, installed the way pip installs it (a dist-info with an entry
# point), which writes what it sees to WATCH_LOG, stops the run at WATCH_STOP_AT and raises in WATCH_RAISE.
WATCH = '''
import json, os
import mltk

def note(**what):
    with open(os.environ["WATCH_LOG"], "a") as f:
        f.write(json.dumps(what) + "\\n")

def check(hook):
    if os.environ.get("WATCH_RAISE") == hook:
        raise RuntimeError("the watcher broke")

@mltk.hookimpl
def run_started(config, run_dir):
    note(hook="run_started", epochs=config.epochs, run_dir=str(run_dir), exists=run_dir.joinpath("config.yaml").is_file())

@mltk.hookimpl
def step_logged(epoch, step, steps, logs):
    check("step_logged")
    note(hook="step_logged", epoch=epoch, step=step, steps=steps, keys=sorted(logs))

@mltk.hookimpl
def epoch_ended(record, run_dir):
    check("epoch_ended")
    note(hook="epoch_ended", record=record)
    if record["epoch"] == int(os.environ.get("WATCH_STOP_AT", 0)):
        return "validation plateau (the watcher)"

@mltk.hookimpl
def run_ended(result, error):
    note(hook="run_ended", epochs=len(result.history), error=type(error).__name__ if error else None, stopped=result.stopped)
'''


@pytest.fixture(scope="module")
def watch_site(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    (site / "mltk_watch.py").write_text(WATCH)
    info = site / "mltk_watch-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mltk-watch\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[mltk]\nwatch = mltk_watch\n")
    return site


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images") / "images", classes=10, per_class=4)


def run_watched(mltk_cli, site, images, out, **env):
    log = out.parent / f"{out.name}.log"
    result = mltk_cli(
        "run", "--data", str(images), "--val-classes", "0.3", "--epochs", "3", "--out", str(out),
        *(f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if k not in ("epochs",)),
        env={"PYTHONPATH": f"{site}:{REPO}", "MLTK_LOAD_PLUGINS": "watch", "WATCH_LOG": str(log), **env},
    )
    seen = [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []
    return result, seen


def test_a_third_party_plugin_sees_every_epoch_and_stops_the_run(watch_site, images, tmp_path, mltk_cli):
    result, seen = run_watched(mltk_cli, watch_site, images, tmp_path / "run", WATCH_STOP_AT="2")
    assert result.returncode == 0, result.stderr
    hooks = [s["hook"] for s in seen]
    assert hooks[0] == "run_started" and seen[0]["exists"] and seen[0]["epochs"] == 3
    assert hooks[-1] == "run_ended" and seen[-1] == {"hook": "run_ended", "epochs": 2, "error": None, "stopped": "validation plateau (the watcher)"}
    records = read_history(tmp_path / "run")
    assert [s["record"] for s in seen if s["hook"] == "epoch_ended"] == records  # every epoch, as metrics.jsonl has it
    assert [r["epoch"] for r in records] == [1, 2]  # stopped after epoch 2 of 3
    steps = [s for s in seen if s["hook"] == "step_logged"]
    assert len(steps) == 2 * steps[0]["steps"] and steps[0]["keys"] == ["images_per_s", "loss", "loss/arcface", "lr"]
    assert "stopped early" in result.stdout and "validation plateau (the watcher)" in result.stdout
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 2


@pytest.mark.parametrize("hook", ["step_logged", "epoch_ended"])
def test_a_plugin_that_raises_is_reported_once_and_the_run_finishes_intact(hook, watch_site, images, tmp_path, mltk_cli):
    result, seen = run_watched(mltk_cli, watch_site, images, tmp_path / "run", WATCH_RAISE=hook, WATCH_STOP_AT="2")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "watch" in line]
    assert warnings == [f"warning: plugin 'watch' failed in {hook}: RuntimeError: the watcher broke; it is left out for the rest of this run"]
    # Disabled at once, all its hooks: nothing after the failure (it cannot stop the run either).
    before = ["run_started"] if hook == "step_logged" else ["run_started"] + ["step_logged"] * len(seen[1:])
    assert [s["hook"] for s in seen] == before and all(s.get("epoch", 1) == 1 for s in seen)
    assert [r["epoch"] for r in read_history(tmp_path / "run")] == [1, 2, 3]
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 3


def test_run_ended_hears_the_error_that_ended_the_run(images, tmp_path, plugin):
    ended = []

    class Watcher:
        @staticmethod
        @mltk.hookimpl
        def epoch_ended(record, run_dir):
            raise KeyboardInterrupt  # as Ctrl-C would, while a hook runs

        @staticmethod
        @mltk.hookimpl
        def run_ended(result, error):
            ended.append((len(result.history), type(error).__name__))

    plugin(Watcher, "watcher")

    with pytest.raises(Interrupted):
        train(make_config({**TINY, "data": str(images), "epochs": 2}), tmp_path / "run")
    assert ended == [(1, "Interrupted")]  # a KeyboardInterrupt is not a plugin failure: the run stops, last.pt keeps epoch 1
    assert torch.load(tmp_path / "run" / "last.pt", weights_only=True)["epoch"] == 1


def test_early_stop_after_epochs_without_a_better_best(images, tmp_path):
    # Validation recall@1 of 3 tiny classes is 1.0 at once and cannot improve: the best epoch stays 1.
    result = train(make_config({**TINY, "data": str(images), "val_classes": 0.3, "epochs": 6, "early_stop": 2}), tmp_path / "run")
    assert [r["val_recall@1"] for r in result.history] == [1.0, 1.0, 1.0] and result.best["epoch"] == 1
    assert result.stopped == "--early-stop 2: no better val_recall@1 since epoch 1"
    assert [r["epoch"] for r in read_history(tmp_path / "run")] == [1, 2, 3]  # stopped after epoch 3 of 6


def test_unknown_logger_is_one_line_with_suggestions(images, tmp_path, mltk_main):
    line = one_line_error(mltk_main("run", "--data", images, "--log", "tensorbord", "--out", tmp_path / "run"), 2)
    assert line == "error: unknown logger 'tensorbord'; did you mean 'tensorboard'?"
    assert not (tmp_path / "run").exists()
    with pytest.raises(UsageError, match=r"unknown logger 'mlflow'; see `mltk list loggers` \(mlflow comes with a plugin: pip install \./plugins/mltk-mlflow"):
        train(make_config({**TINY, "data": str(images), "log": ["mlflow"]}), tmp_path / "run")


def test_tensorboard_event_files_hold_step_and_epoch_scalars_and_the_projector(images, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    result = train(make_config({**TINY, "data": str(images), "val_classes": 0.3, "epochs": 2, "log": ["tensorboard"]}), run)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"step/loss", "step/loss/arcface", "step/lr", "step/images_per_s", "epoch/loss", "epoch/val_recall@1", "epoch/lr"} <= tags
    step_loss = events.Scalars("step/loss")
    steps = len(step_loss) // 2
    assert [e.step for e in step_loss] == list(range(1, 2 * steps + 1))
    epoch_recall = events.Scalars("epoch/val_recall@1")
    assert [e.step for e in epoch_recall] == [r["epoch"] * steps for r in result.history]
    assert [e.value for e in epoch_recall] == pytest.approx([r["val_recall@1"] for r in result.history], rel=1e-6)
    assert [e.value for e in events.Scalars("epoch/loss")] == pytest.approx([r["loss"] for r in result.history], rel=1e-6)  # float32 in the file
    # The projector: the validation images' last embeddings, with class names and a sprite of thumbnails.
    config = (run / "tensorboard" / "projector_config.pbtxt").read_text()
    assert 'tensor_name: "validation:' in config and "sprite" in config and "single_image_dim: 48" in config
    folder = next((run / "tensorboard").glob("*/validation"))
    rows = (folder / "tensors.tsv").read_text().splitlines()
    assert len(rows) == result.val_images and len(rows[0].split("\t")) == 16
    names = (folder / "metadata.tsv").read_text().splitlines()
    assert len(names) == len(rows) and len(set(names)) == result.val_classes and set(names) <= {p.name for p in images.iterdir()}
    from PIL import Image

    side = Image.open(folder / "sprite.png").size
    assert side[0] == side[1] >= 48 * int(len(rows) ** 0.5)
    # The run's settings, for TensorBoard's HParams view: a session start (tests/test_evaluate_log.py reads the view itself).
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator as PluginEvents
    from tensorboard.plugins.hparams import metadata

    events = PluginEvents(str(run / "tensorboard"))
    events.Reload()
    start = metadata.parse_session_start_info_plugin_data(events.SummaryMetadata(metadata.SESSION_START_INFO_TAG).plugin_data.content)
    settings = {name: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind")) for name, value in start.hparams.items()}
    assert settings["backbone"] == "test_resnet" and settings["epochs"] == 2 and settings["val_classes"] == 0.3 and settings["augment"] == "False"
    assert "miner" not in settings  # unset: left out, not 'None'


def test_tensorboard_resume_continues_the_curves_and_overwrite_clears_them(images, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    cfg = {**TINY, "data": str(images), "epochs": 1, "log": ["tensorboard"]}
    train(make_config(cfg), run)
    train(make_config({**cfg, "epochs": 2}), run, resume=True)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    steps = len(events.Scalars("step/loss")) // 2
    assert [e.step for e in events.Scalars("step/loss")] == list(range(1, 2 * steps + 1))  # one curve, no step twice
    assert [e.step for e in events.Scalars("epoch/loss")] == [steps, 2 * steps]
    train(make_config({**cfg, "log": []}), run, overwrite=True)
    assert not (run / "tensorboard").exists()


@pytest.mark.parametrize(
    "terminal, ci, quiet, bar, lines",
    [(True, None, False, True, True), (False, None, False, False, True), (True, "true", False, False, True), (True, None, True, False, False)],
    ids=["terminal", "pipe", "ci", "quiet"],
)
def test_the_progress_bar_shows_at_a_terminal_only(terminal, ci, quiet, bar, lines, images, tmp_path, mltk_main, monkeypatch):
    from mltk.cli import output

    monkeypatch.setattr(output.console, "_force_terminal", terminal)  # what rich decides when the console is made
    monkeypatch.setattr(output.console, "is_interactive", terminal)
    monkeypatch.delenv("CI", raising=False)
    if ci:
        monkeypatch.setenv("CI", ci)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if k != "epochs"]
    code, out, err = mltk_main("run", "--data", images, *flags, "--epochs", "2", "--out", tmp_path / "run", *(["--quiet"] if quiet else []))
    assert code == 0, err
    assert ("━" in out and "img/s" in out) == bar  # rich's bar, with the running loss and images/s
    assert ("epoch   1  loss" in out and "epoch   2  loss" in out) == lines
    assert "run directory:" in out  # the summary, always


def test_lifecycle_calls_each_hook_on_its_own_and_leaves_out_what_fails(tmp_path, plugin):
    from mltk.lifecycle import Lifecycle

    calls = []

    class Good:
        @mltk.hookimpl
        def epoch_ended(self, record):  # a hook may take only some of the arguments
            calls.append(("good", record["epoch"]))

        @mltk.hookimpl(trylast=True)
        def run_ended(self, result, error):
            calls.append(("good last", error))

    class Broken:
        @mltk.hookimpl
        def epoch_ended(self, record, run_dir):
            raise ValueError("no")

        @mltk.hookimpl
        def run_ended(self, result):
            calls.append(("broken", result))

    class Misspelt:
        @mltk.hookimpl
        def epoch_ended(self, record, run_dir, extra):  # an argument the hook does not have: cannot be registered
            calls.append(("misspelt",))

    plugin(Broken(), "broken")
    warned = []
    hooks = Lifecycle({"good": Good(), "misspelt": Misspelt()}, warned.append)
    with hooks.running(config=None, run_dir=tmp_path, result="result"):
        assert hooks.stop_reason({"epoch": 1}, tmp_path) is None
        assert hooks.stop_reason({"epoch": 2}, tmp_path) is None
    assert calls == [("good", 1), ("good", 2), ("good last", None)]  # broken: left out after its first failure, run_ended too
    assert warned[0].startswith("logger 'misspelt' cannot follow this run: PluginValidationError")
    assert warned[1:] == ["plugin 'broken' failed in epoch_ended: ValueError: no; it is left out for the rest of this run"]
    from mltk.plugins import pm

    assert not pm.has_plugin("log:good")  # the run's loggers are plugins only while it runs



RESUME = "last.pt keeps epoch {kept}: `mltk run --out {run} --resume` goes on from there"


@pytest.mark.parametrize("hook, thrown, code, kept, line", [
    ("logger", KeyboardInterrupt(), 130, None, "interrupted before the run started; nothing was written"),  # Ctrl-C while a logger connects
    ("run_started", KeyboardInterrupt(), 130, 0, "interrupted; " + RESUME),
    ("step_logged", SystemExit(), 1, 0, "error: plugin 'stopper' stopped the run in step_logged: it exited; " + RESUME),
    ("epoch_ended", SystemExit(7), 7, 1, "error: plugin 'stopper' stopped the run in epoch_ended: it exited with code 7; " + RESUME),
    ("epoch_ended", SystemExit("bye"), 1, 1, "error: plugin 'stopper' stopped the run in epoch_ended: it exited saying 'bye'; " + RESUME),
    ("run_ended", KeyboardInterrupt(), 130, 2, "interrupted; the run is complete: last.pt keeps its last epoch, 2"),
    ("run_ended", SystemExit(3), 3, 2, "error: plugin 'stopper' stopped the run in run_ended: it exited with code 3; the run is complete: last.pt keeps its last epoch, 2"),
])
def test_ctrl_c_or_an_exit_in_a_hook_is_one_line_saying_what_last_pt_keeps(hook, thrown, code, kept, line, images, tmp_path, plugin, mltk_main):
    ended = []

    def stop(where):
        if where == hook:
            raise thrown

    class Stopper:
        @mltk.hookimpl
        def register_loggers(self, register):
            register("stopper", lambda config, run_dir: stop("logger"))

        @mltk.hookimpl
        def run_started(self, config, run_dir):
            stop("run_started")

        @mltk.hookimpl
        def step_logged(self, epoch, step, steps, logs):
            if step == 1:
                stop("step_logged")

        @mltk.hookimpl
        def epoch_ended(self, record, run_dir):
            if record["epoch"] == 1:
                stop("epoch_ended")

        @mltk.hookimpl
        def run_ended(self, result, error):
            ended.append(type(error).__name__)
            stop("run_ended")

    plugin(Stopper(), "stopper")
    run = tmp_path / "run"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items() if k != "epochs"]
    got = mltk_main("run", "--data", images, *flags, "--epochs", "2", "--out", run, "--quiet", *(["--log", "stopper"] if hook == "logger" else []))
    assert got[0] == code and got[2].splitlines() == [line.format(kept=kept, run=run)], got
    if kept is None:
        assert not run.exists() and ended == []
        return
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == kept
    assert [r["epoch"] for r in read_history(run)] == list(range(1, kept + 1))
    heard = {"run_started": "Interrupted", "step_logged": "PluginExit", "epoch_ended": "PluginExit", "run_ended": "NoneType"}[hook]
    assert ended == [heard]  # run_ended comes, even after run_started failed: a logger closes what it opened
