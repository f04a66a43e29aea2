"""`mltk evaluate --log`, or a run's own loggers: the evaluation's metrics in TensorBoard (read back by tensorboard, and
shown by its HParams view against each run's settings), and a plugin's evaluation_ended hook."""

import json
import shutil

import pytest
import torch

import mltk

from conftest import TINY, make_image_folder, snapshot
from mltk.config import make_config
from mltk.train import train

pytest.importorskip("tensorboard")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Two tiny runs with 3 held-out classes: 'followed' trained with --log tensorboard at dim 16, 'plain' without at dim 8."""
    root = tmp_path_factory.mktemp("runs")
    images = make_image_folder(root / "images", classes=10, per_class=4)
    for name, dim, log in (("followed", 16, ["tensorboard"]), ("plain", 8, [])):
        train(make_config({**TINY, "data": str(images), "val_classes": 0.3, "dim": dim, "log": log}), root / name)
    return root


@pytest.fixture
def runs(trained, tmp_path):
    """Copies of the two runs, for one test to evaluate."""
    for name in ("followed", "plain"):
        shutil.copytree(trained / name, tmp_path / "runs" / name)
    return tmp_path / "runs"


def written_metrics(folder):
    """metrics.json's metric values (its numbers) and the epoch of the checkpoint it scored."""
    data = json.loads((folder / "metrics.json").read_text())
    return {k: v for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}, data["evaluated"]["checkpoint_epoch"]


def eval_scalars(folder) -> dict:
    """eval/NAME -> [(step, value)] in the TensorBoard folder, as tensorboard reads it."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"] if tag.startswith("eval/")}


def hparams_view(logdir, settings, metrics) -> dict:
    """What TensorBoard's HParams view shows for ``tensorboard --logdir LOGDIR``: session -> (settings, metric values),
    through the plugin's own handlers (the ones its web page calls)."""
    from tensorboard import context
    from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.hparams import api_pb2, backend_context, list_session_groups

    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    tb = base_plugin.TBContext(logdir=str(logdir), multiplexer=multiplexer, data_provider=data_provider.MultiplexerDataProvider(multiplexer, str(logdir)))
    columns = [api_pb2.ColParams(hparam=name) for name in settings] + [api_pb2.ColParams(metric=api_pb2.MetricName(tag=tag)) for tag in metrics]
    request = api_pb2.ListSessionGroupsRequest(start_index=0, slice_size=100, col_params=columns, include_metrics=True, allowed_statuses=list(api_pb2.Status.values()))
    groups = list_session_groups.Handler(context.RequestContext(), backend_context.Context(tb), "", request).run().session_groups
    value = lambda v: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind"))  # noqa: E731
    return {g.name: ({k: value(v) for k, v in g.hparams.items() if k in settings}, {m.name.tag: m.value for m in g.metric_values if m.name.tag in metrics}) for g in groups}


def test_the_metrics_go_under_eval_in_each_runs_tensorboard_and_hparams_shows_them_against_its_settings(runs, mltk_main):
    assert mltk_main("evaluate", runs / "followed", "--no-report")[0] == 0  # no --log: the run's own loggers (tensorboard)
    assert mltk_main("evaluate", runs / "plain", "--no-report", "--log", "tensorboard")[0] == 0  # trained without it: the folder is made
    for name in ("followed", "plain"):
        metrics, epoch = written_metrics(runs / name / "eval")
        scalars = eval_scalars(runs / name / "tensorboard")
        assert set(scalars) == {f"eval/{k}" for k in metrics} and "eval/roc_auc" in scalars
        for key, value in metrics.items():
            assert scalars[f"eval/{key}"] == [(epoch, pytest.approx(value, rel=1e-6))], key  # float32 in the file, at the checkpoint's epoch
    view = hparams_view(runs, ["dim", "backbone", "augment", "val_classes"], ["eval/roc_auc", "eval/recall@1", "epoch/val_recall@1"])
    assert set(view) == {"followed/tensorboard", "plain/tensorboard"}  # each run a row, its own folder the session
    for name, dim in (("followed", 16), ("plain", 8)):
        settings, shown = view[f"{name}/tensorboard"]
        metrics, _ = written_metrics(runs / name / "eval")
        assert settings == {"dim": dim, "backbone": "test_resnet", "augment": "False", "val_classes": 0.3}
        assert shown["eval/roc_auc"] == pytest.approx(metrics["roc_auc"], rel=1e-6) and shown["eval/recall@1"] == pytest.approx(metrics["recall@1"], rel=1e-6)
    assert "epoch/val_recall@1" in view["followed/tensorboard"][1]  # the training curves' last values too, where the run logged them


def test_log_none_leaves_the_runs_loggers_out_and_an_unknown_logger_is_one_line_before_any_work(runs, tmp_path, mltk_main):
    from conftest import one_line_error

    before = snapshot(runs / "followed" / "tensorboard")
    assert mltk_main("evaluate", runs / "followed", "--log", "none", "--no-report")[0] == 0
    assert snapshot(runs / "followed" / "tensorboard") == before and (runs / "followed" / "eval" / "metrics.json").is_file()
    error = one_line_error(mltk_main("evaluate", runs / "plain", "--log", "tensorbord", "--out", tmp_path / "eval"), 2)
    assert error == "error: unknown logger 'tensorbord'; did you mean 'tensorboard'?"
    assert not (tmp_path / "eval").exists() and not (runs / "plain" / "tensorboard").exists()


def test_a_logger_the_run_named_but_missing_here_or_a_failing_plugin_is_a_warning_and_the_evaluation_stands(runs, plugin, mltk_main):
    for name in ("last.pt", "best.pt"):  # as if the run had been logged to MLflow on a machine with the plugin
        checkpoint = torch.load(runs / "plain" / name, weights_only=True)
        checkpoint["config"]["log"] = ["mlflow", "tensorboard"]
        torch.save(checkpoint, runs / "plain" / name)
    seen = []

    class Broken:
        @staticmethod
        @mltk.hookimpl
        def evaluation_ended(run_dir, out, metrics):
            seen.append((run_dir, out.name, metrics["roc_auc"]))
            raise RuntimeError("no")

    plugin(Broken, "broken")
    code, out, err = mltk_main("evaluate", runs / "plain", "--no-report")
    assert code == 0 and "written to" in out
    missing, broken = err.splitlines()
    assert missing.startswith("warning: the run's logger 'mlflow' is left out: unknown logger 'mlflow'; see `mltk list loggers` (mlflow comes with a plugin")
    assert missing.endswith(" (choose with --log; --log none for none)")
    assert broken == "warning: plugin 'broken' failed in evaluation_ended: RuntimeError: no; it is left out for the rest of this evaluation"
    metrics, _ = written_metrics(runs / "plain" / "eval")
    assert seen == [(runs / "plain", "eval", metrics["roc_auc"])]
    assert set(eval_scalars(runs / "plain" / "tensorboard")) == {f"eval/{k}" for k in metrics}  # the other logger wrote all the same


def test_an_untrained_backbone_logs_into_its_evaluation_folder_which_a_new_evaluation_replaces(trained, tmp_path, mltk_main):
    out = tmp_path / "eval-test_resnet"
    args = ("evaluate", "--backbone", "test_resnet", "--image-size", "32", "--data", trained / "images", "--out", out, "--no-report", "--log", "tensorboard")
    assert mltk_main(*args)[0] == 0
    metrics, epoch = written_metrics(out)
    assert epoch is None and eval_scalars(out / "tensorboard") == {f"eval/{k}": [(0, pytest.approx(v, rel=1e-6))] for k, v in metrics.items()}
    assert mltk_main(*args)[0] == 0  # an earlier evaluation, tensorboard/ and all: replaced whole, one evaluation's events
    assert len(list((out / "tensorboard").glob("events.*"))) == 1
