"""plugins/mltk-mlflow: `--log mlflow` writes MLflow stores — SQLite in a temporary folder, ./mlruns by default, a
real `mlflow server` on 127.0.0.1 that the test starts — and mlflow.MlflowClient reads back the params, the metric
histories per step and per epoch, the artifacts and how the run ended."""

import importlib.metadata
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

pytest.importorskip("mlflow")

from mlflow import MlflowClient  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402

from conftest import REPO, TINY, install_plugin, make_image_folder, snapshot  # noqa: E402
from mltk.config import make_config  # noqa: E402
from mltk.errors import Interrupted, MltkError, UsageError  # noqa: E402
from mltk.registry import create_logger, list_loggers  # noqa: E402
from mltk.run_dir import read_history  # noqa: E402
from mltk.train import RunResult, train  # noqa: E402

pytestmark = pytest.mark.xdist_group("plugin_mlflow")  # its module fixtures are built once, on one worker (pyproject.toml: --dist loadgroup)

PLUGIN = REPO / "plugins" / "mltk-mlflow"
FILES = ["best.pt", "config.yaml", "metrics.jsonl", "skipped_images.txt", "tensorboard"]  # what a run directory holds but last.pt


@pytest.fixture
def mlflow_plugin(plugin, monkeypatch):
    """The plugin module from plugins/mltk-mlflow, registered on mltk's plugin manager for one test."""
    monkeypatch.syspath_prepend(str(PLUGIN))
    import mltk_mlflow

    return plugin(mltk_mlflow, "mlflow")


@pytest.fixture(autouse=True)
def http_settings(monkeypatch):
    """MLflow's retry and timeout variables, which the plugin sets where they are unset: as they were, after each test."""
    for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT"):
        monkeypatch.setenv(name, "")  # remembered, so that monkeypatch restores it
        monkeypatch.delenv(name)


@pytest.fixture(scope="session")  # built once: the module's xdist_group keeps its tests on one worker
def empty_store(tmp_path_factory):
    """An MLflow SQLite database with its tables made: MLflow's migrations take seconds, so each test copies this one."""
    db = tmp_path_factory.mktemp("template") / "mlflow.db"
    MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def store(empty_store, tmp_path, monkeypatch):
    """MLFLOW_TRACKING_URI names a new SQLite store; the working directory is tmp_path (where ./mlruns would go)."""
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    shutil.copy(empty_store, db)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{db}")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.chdir(tmp_path)
    return MlflowClient(tracking_uri=f"sqlite:///{db}")


def tiny_config(data="unused", **overrides):
    return make_config({**TINY, "data": str(data), "log": ["mlflow"], **overrides})


def fake_run_dir(run_dir):
    """What a run directory holds at the end, a temporary file of an interrupted save included."""
    (run_dir / "tensorboard").mkdir(parents=True)
    for name, content in {"config.yaml": b"epochs: 2\n", "metrics.jsonl": b"{}\n", "best.pt": b"best" * 100, "last.pt": b"last" * 300,
                          "skipped_images.txt": b"a.png\tunreadable\n", "tensorboard/events.out.tfevents.1": b"tb", ".best.pt.tmp-7": b"x"}.items():
        (run_dir / name).write_bytes(content)
    return run_dir


def drive(logger, cfg, run_dir, epochs=2, steps=3, error=None):
    """mltk's run hooks, called on ``logger`` as a run of ``epochs`` x ``steps`` would; returns the epoch records."""
    logger.run_started(config=cfg, run_dir=run_dir)
    history = []
    for epoch in range(1, epochs + 1):
        for step in range(1, steps + 1):
            logger.step_logged(epoch=epoch, step=step, steps=steps, logs={"loss": epoch + step / 1000, "loss/ce": 0.5, "lr": 0.1, "images_per_s": 80.0})
        record = {"epoch": epoch, "loss": float(epoch), "loss/ce": 0.5, "lr": 0.1, "loss_lr": 0.01, "images_per_s": 80.0, "seconds": 2.5, "val_recall@1": 0.5 + epoch / 10}
        assert logger.epoch_ended(record=record, run_dir=run_dir) is None  # a logger never stops the run
        history.append(record)
    logger.run_ended(result=RunResult(run_dir, history, best={"epoch": epochs, "score": 0.5 + epochs / 10, "by": "val_recall@1"}), error=error)
    return history


def only_run(client, experiment="mltk"):
    [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run


def metric(client, run, key):
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: m.step)]


def artifacts(client, run, path=None):
    return [f.path for f in client.list_artifacts(run.info.run_id, path)]


def test_the_plugin_is_light_registers_mlflow_and_its_logger_writes_nothing_until_the_run(mlflow_plugin, tmp_path, monkeypatch):
    light = subprocess.run([sys.executable, "-c", "import sys, mltk_mlflow; print('mlflow' in sys.modules)"],
                           env={**os.environ, "PYTHONPATH": f"{PLUGIN}:{REPO}"}, capture_output=True, text=True)
    assert light.stdout.strip() == "False", light.stderr  # `mltk --help` imports every plugin
    assert "mlflow" in list_loggers()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    before = snapshot(tmp_path)
    create_logger("mlflow", tiny_config(), tmp_path / "run")
    assert snapshot(tmp_path) == before  # no mlruns, no run directory: a run refused later leaves nothing
    monkeypatch.setitem(sys.modules, "mlflow", None)  # as if not installed
    with pytest.raises(UsageError, match=r"^--log mlflow needs the mlflow package: pip install 'mlflow>=3'"):
        create_logger("mlflow", tiny_config(), tmp_path / "run")


def test_params_metrics_per_step_and_epoch_and_the_run_directory_are_logged(mlflow_plugin, store, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "birds")
    calls = []
    log_batch = MlflowClient.log_batch
    monkeypatch.setattr(MlflowClient, "log_batch", lambda self, run_id, metrics=(), **kw: calls.append(len(metrics)) or log_batch(self, run_id, metrics=metrics, **kw))
    patterns = [f"class_{i:03d}_*" for i in range(60)]  # 780 characters as text
    cfg = tiny_config(loss="ce+arcface", loss_options={"arcface": {"margin": 20}}, data_classes=patterns)
    run_dir = fake_run_dir(tmp_path / "runs" / "exp1")
    drive(mlflow_plugin.mlflow_logger(cfg, run_dir), cfg, run_dir, epochs=2, steps=60)

    run = only_run(store, "birds")
    assert (run.info.run_name, run.info.status) == ("exp1", "FINISHED")
    assert run.data.tags["mltk.run_dir"] == str(run_dir) and run.data.tags["mltk.version"] == "0.1.0"
    params = run.data.params
    assert params["backbone"] == "test_resnet" and params["loss"] == "ce+arcface" and params["epochs"] == "1" and params["log"] == "['mlflow']"
    assert params["loss_options.arcface.margin"] == "20" and params["augment_options"] == "{}" and params["weights"] == "None"
    assert params["data_classes"] == str(patterns)[:500]  # cut at 500; config.yaml keeps it whole
    loss = metric(store, run, "loss")
    assert [step for step, _ in loss] == list(range(1, 121)) and loss[60] == (61, pytest.approx(2.001))  # global step: epoch 2, step 1
    assert len(metric(store, run, "loss/ce")) == len(metric(store, run, "images_per_s")) == 120
    assert sum(1 for n in calls if n) <= 5  # 120 steps in a few log_batch calls (50 steps or an epoch each), not 120
    assert metric(store, run, "epoch/val_recall_at_1") == [(1, 0.6), (2, 0.7)]  # MLflow refuses '@' in a name
    assert metric(store, run, "epoch/loss") == [(1, 1.0), (2, 2.0)] and metric(store, run, "epoch/seconds") == [(1, 2.5), (2, 2.5)]
    assert "epoch/epoch" not in run.data.metrics and "val_recall@1" not in json.dumps(run.data.metrics)
    assert metric(store, run, "best/score") == [(2, 0.7)] and run.data.tags["mltk.best_by"] == "val_recall@1"
    assert artifacts(store, run) == FILES and artifacts(store, run, "tensorboard") == ["tensorboard/events.out.tfevents.1"]
    got = store.download_artifacts(run.info.run_id, "best.pt", str(tmp_path))
    assert open(got, "rb").read() == (run_dir / "best.pt").read_bytes()


def test_without_a_tracking_uri_the_store_is_sqlite_in_mlruns(mlflow_plugin, tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    cfg = tiny_config()
    for name in ("a", "b"):  # two runs, one experiment
        run_dir = fake_run_dir(tmp_path / name)
        drive(mlflow_plugin.mlflow_logger(cfg, run_dir), cfg, run_dir, epochs=1, steps=2)

    assert sorted(p.name for p in (work / "mlruns").iterdir()) == ["artifacts", "mlflow.db"]
    client = MlflowClient(tracking_uri="sqlite:///mlruns/mlflow.db")  # as the README's `mlflow ui --backend-store-uri` has it
    experiment = client.get_experiment_by_name("mltk")
    assert experiment.artifact_location == (work / "mlruns" / "artifacts").as_uri()
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.run_name"])
    assert [(r.info.run_name, r.info.status) for r in runs] == [("a", "FINISHED"), ("b", "FINISHED")]
    assert metric(client, runs[0], "loss") == [(1, 1.001), (2, 1.002)]
    assert (work / "mlruns" / "artifacts" / runs[1].info.run_id / "artifacts" / "best.pt").read_bytes() == b"best" * 100
    assert artifacts(client, runs[1]) == FILES


@pytest.mark.parametrize("error, status", [(None, "FINISHED"), (Interrupted("interrupted in epoch 2"), "KILLED"), (RuntimeError("a bug"), "FAILED")])
def test_the_mlflow_run_ends_as_the_run_did_with_its_files(error, status, mlflow_plugin, store, tmp_path):
    cfg = tiny_config()
    run_dir = fake_run_dir(tmp_path / "run")
    drive(mlflow_plugin.mlflow_logger(cfg, run_dir), cfg, run_dir, epochs=1, steps=2, error=error)
    run = only_run(store)
    assert run.info.status == status and artifacts(store, run) == FILES  # what there is, kept in every case


def test_when_mlflow_fails_its_run_is_marked_failed_and_the_error_goes_to_mltk(mlflow_plugin, store, tmp_path, monkeypatch):
    cfg = tiny_config()
    logger = mlflow_plugin.mlflow_logger(cfg, tmp_path / "run")
    logger.run_started(config=cfg, run_dir=tmp_path / "run")

    def down(*args, **kwargs):
        raise MlflowException("API request failed: connection refused")

    monkeypatch.setattr(MlflowClient, "log_batch", down)
    with pytest.raises(MlflowException, match="connection refused"):  # mltk reports it and leaves the logger out
        for step in range(1, 51):
            logger.step_logged(epoch=1, step=step, steps=50, logs={"loss": 1.0})
    assert only_run(store).info.status == "FAILED"  # not left RUNNING: run_ended does not come to a logger left out
    logger.run_ended(result=RunResult(tmp_path / "run"), error=None)  # and if it did, it would change nothing
    assert only_run(store).info.status == "FAILED"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("images") / "images", classes=10, per_class=4)


def check_logged(client, run, run_dir):
    """The MLflow run of a real mltk run of 2 epochs: what metrics.jsonl and config.yaml say, and its files but last.pt."""
    records = read_history(run_dir)
    assert [r["epoch"] for r in records] == [1, 2] and (run_dir / "last.pt").is_file()
    assert (run.info.run_name, run.info.status) == (run_dir.name, "FINISHED")
    assert run.data.params["backbone"] == "test_resnet" and run.data.params["epochs"] == "2" and run.data.params["log"] == "['mlflow']"
    steps = [step for step, _ in metric(client, run, "loss")]
    assert len(steps) % 2 == 0 and steps == list(range(1, len(steps) + 1))  # every step of both epochs, in order
    assert {"loss/arcface", "lr", "images_per_s"} <= set(run.data.metrics)
    for name, field in (("epoch/loss", "loss"), ("epoch/val_recall_at_1", "val_recall@1")):  # pytest 9.2's approx takes no tuples in a list
        assert metric(client, run, name) == [(r["epoch"], pytest.approx(r[field])) for r in records], name
    assert artifacts(client, run) == ["best.pt", "config.yaml", "metrics.jsonl"]  # no last.pt


def test_a_real_run_is_logged(mlflow_plugin, store, images, tmp_path):
    warnings = []
    train(tiny_config(images, epochs=2, val_classes=0.3), tmp_path / "run", on_warning=warnings.append)
    assert warnings == []  # a logger that raised would be a warning, and left out
    check_logged(store, only_run(store), tmp_path / "run")


def evaluation_of(folder):
    """metrics.json's metric values (its numbers) and what it says was evaluated."""
    data = json.loads((folder / "metrics.json").read_text())
    return {k: v for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}, data["evaluated"]


def test_each_evaluation_is_an_mlflow_run_nested_under_its_runs_with_what_it_measured(mlflow_plugin, store, images, tmp_path, mltk_main):
    from mltk_mlflow.logger import key

    run = tmp_path / "run"
    train(tiny_config(images, val_classes=0.3), run)  # logged to MLflow: evaluations follow it there
    assert mltk_main("evaluate", run, "--no-report")[0] == 0  # the run's own loggers
    assert mltk_main("evaluate", run, "--data", images, "--classes", "class_0[0-4]", "--out", tmp_path / "seen", "--no-report", "--log", "mlflow")[0] == 0
    assert mltk_main("evaluate", "--backbone", "test_resnet", "--image-size", "32", "--data", images, "--out", tmp_path / "frozen", "--no-report", "--log", "mlflow")[0] == 0

    experiment = store.get_experiment_by_name("mltk").experiment_id
    runs = {r.info.run_name: r for r in store.search_runs([experiment])}
    assert set(runs) == {"run", "run/eval", "run/seen", "frozen"}
    trained = runs["run"]
    assert not any(name.startswith("eval/") for name in trained.data.metrics)  # the run's own record is as training left it
    for name, folder in (("run/eval", run / "eval"), ("run/seen", tmp_path / "seen"), ("frozen", tmp_path / "frozen")):
        logged = runs[name]
        metrics, evaluated = evaluation_of(folder)
        assert logged.info.status == "FINISHED" and logged.data.tags["mltk.evaluation"] == str(folder)
        assert {k for k in logged.data.metrics if k.startswith("eval/")} == {"eval/" + key(k) for k in metrics}
        for k, value in metrics.items():  # each value as metrics.json has it, at the checkpoint's epoch
            assert metric(store, logged, "eval/" + key(k)) == [(evaluated["checkpoint_epoch"] or 0, value)], k
        assert {k: logged.data.params["eval." + k] for k in evaluated} == {k: str(v) for k, v in evaluated.items()}  # what it measured
        assert artifacts(store, logged) == ["metrics.json", "thresholds.json"]
    for name in ("run/eval", "run/seen"):  # children of the run's MLflow run, with its settings to compare them by
        assert runs[name].data.tags["mlflow.parentRunId"] == trained.info.run_id and runs[name].data.tags["mltk.evaluated_run"] == str(run)
        assert runs[name].data.params["backbone"] == "test_resnet" and runs[name].data.params["dim"] == "16"
    assert runs["run/eval"].data.params["eval.checkpoint"] == str(run / "last.pt") and runs["run/eval"].data.params["eval.checkpoint_epoch"] == "1"
    assert runs["run/eval"].data.params["eval.training_classes_evaluated"] == "0" != runs["run/seen"].data.params["eval.training_classes_evaluated"]
    frozen = runs["frozen"]
    assert "mlflow.parentRunId" not in frozen.data.tags and "mltk.evaluated_run" not in frozen.data.tags and "backbone" not in frozen.data.params


def test_mlflows_info_lines_and_run_urls_are_quiet_unless_asked_for(mlflow_plugin, tmp_path, monkeypatch, capsys):
    import logging

    mlflow_log, said = logging.getLogger("mlflow"), logging.getLogger("mlflow.store.db.utils")
    level = mlflow_log.level
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_LOGGING_LEVEL", raising=False)
    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "")  # restored after the test
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT")
    monkeypatch.chdir(tmp_path)
    try:
        create_logger("mlflow", tiny_config(), tmp_path / "run").connect()  # a new ./mlruns: MLflow makes its tables, saying so at INFO
        said.info("an INFO line")
        said.warning("a warning")
        err = capsys.readouterr().err
        assert "INFO" not in err and "Creating initial MLflow database tables" not in err and "WARNING mlflow.store.db.utils: a warning" in err, err
        assert os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] == "true"  # no "View run ... at: URL" on stdout (a server's)
        monkeypatch.setenv("MLFLOW_LOGGING_LEVEL", "INFO")  # the user's choice stands
        mlflow_log.setLevel(logging.INFO)  # as MLflow sets it when imported
        create_logger("mlflow", tiny_config(), tmp_path / "run")
        said.info("an INFO line")
        assert "INFO mlflow.store.db.utils: an INFO line" in capsys.readouterr().err
    finally:
        mlflow_log.setLevel(level)


def closed_port() -> int:
    """A port of 127.0.0.1 that nothing listens on: a connection is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_args(images, out):
    return ["run", "--data", images, "--out", out, "--log", "mlflow", "--quiet", *(f"--{k.replace('_', '-')}={v}" for k, v in TINY.items())]


def test_an_unreachable_tracking_server_is_one_line_before_the_run_folder_and_waits_are_bounded(mlflow_plugin, images, tmp_path, monkeypatch, mltk_main):
    from conftest import one_line_error

    port = closed_port()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://me:secret@127.0.0.1:{port}")
    monkeypatch.chdir(tmp_path)
    error = one_line_error(mltk_main(*run_args(images, tmp_path / "run")), 1)
    assert error == (f"error: --log mlflow: the tracking server 'http://127.0.0.1:{port}' (MLFLOW_TRACKING_URI) cannot be reached: "
                     "Connection refused; start it, or unset MLFLOW_TRACKING_URI to log to ./mlruns")  # the password is not shown
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no run folder, no mlruns
    # MLflow's own retries, bounded where the user set none: a server that goes away costs seconds, not 4 minutes.
    assert (os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"], os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"]) == ("2", "20")
    started = time.monotonic()
    with pytest.raises(MlflowException):
        MlflowClient(tracking_uri=f"http://127.0.0.1:{port}").get_experiment_by_name("mltk")
    assert time.monotonic() - started < 30
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "9")  # the user's own setting stays
    with pytest.raises(MltkError, match="cannot be reached"):
        create_logger("mlflow", tiny_config(), tmp_path / "run")
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "9"


def test_ctrl_c_while_mlflow_connects_is_one_line_and_the_mlflow_run_is_killed(mlflow_plugin, store, images, tmp_path, monkeypatch, mltk_main):
    import mltk_mlflow.logger

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    run = tmp_path / "run"
    with monkeypatch.context() as m:  # the check before the run folder
        m.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{closed_port()}")
        m.setattr(mltk_mlflow.logger.socket, "create_connection", ctrl_c)
        assert mltk_main(*run_args(images, run)) == (130, "", "interrupted before the run started; nothing was written\n")
    assert not run.exists()

    with monkeypatch.context() as m:  # the params, sent once the run has started
        m.setattr(MlflowClient, "log_batch", ctrl_c)
        code, out, err = mltk_main(*run_args(images, run))
    assert (code, err) == (130, f"interrupted; last.pt keeps epoch 0: `mltk run --out {run} --resume` goes on from there\n")
    assert only_run(store).info.status == "KILLED"  # not left RUNNING
    assert torch.load(run / "last.pt", weights_only=True)["epoch"] == 0


@pytest.fixture(scope="session")  # built once: the module's xdist_group keeps its tests on one worker
def mlflow_site(tmp_path_factory):
    """plugins/mltk-mlflow installed with pip into a folder of its own, entry point and all (mlflow is already here)."""
    return install_plugin(PLUGIN.name, tmp_path_factory.mktemp("site"))


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` on a free port of 127.0.0.1, artifacts proxied into tmp_path/served; stopped with its processes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination", str(tmp_path / "served")],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # no job runner processes (and no folder left in /dev/shm)
    )
    try:
        deadline = time.monotonic() + 60  # about 13 s on 2 busy cores
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"mlflow server did not come up: {(tmp_path / 'server.log').read_text()[-500:]}")
            time.sleep(0.3)
        yield url
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)  # the server and its uvicorn worker
            server.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        except ProcessLookupError:
            pass
        log.close()


def test_mltk_run_logs_to_an_mlflow_server(mlflow_site, mlflow_server, images, tmp_path, mltk_cli):
    env = {"PYTHONPATH": f"{mlflow_site}:{REPO}", "MLTK_LOAD_PLUGINS": "mlflow", "MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_EXPERIMENT_NAME": "served"}
    [dist] = importlib.metadata.distributions(path=[str(mlflow_site)])
    assert (dist.name, dist.version) == ("mltk-mlflow", "0.1.0") and "mlflow>=3" in dist.requires
    assert [(e.group, e.name, e.value) for e in dist.entry_points] == [("mltk", "mlflow", "mltk_mlflow")]
    result = mltk_cli(
        "run", "--data", str(images), "--val-classes", "0.3", "--out", str(tmp_path / "run"), "--log", "mlflow", "--quiet",
        *(f"--{k.replace('_', '-')}={v}" for k, v in {**TINY, "epochs": 2}.items()), env=env, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr and "INFO" not in result.stderr, result.stderr
    assert "View run" not in result.stdout and "mlflow" not in result.stdout.split("run directory:")[0], result.stdout  # MLflow printed nothing into mltk's output
    client = MlflowClient(tracking_uri=mlflow_server)
    run = only_run(client, "served")
    check_logged(client, run, tmp_path / "run")
    assert not (tmp_path / "mlruns").exists()  # all of it went to the server
    assert (tmp_path / "served").is_dir() and any(p.name == "best.pt" for p in (tmp_path / "served").rglob("*"))  # through the server's artifact proxy
    got = client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))
    assert open(got).read() == (tmp_path / "run" / "config.yaml").read_text()
