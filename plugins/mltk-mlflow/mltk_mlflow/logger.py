"""One mltk run as one MLflow run, through an explicit MlflowClient: params when it starts, metrics as they come,
the run directory's files when it ends. One mltk evaluation as one MLflow run too, nested under its run's."""

import logging
import os
import re
import socket
import time
import urllib.parse
import urllib.request
from contextlib import contextmanager, suppress
from pathlib import Path

import mltk
from mltk.errors import MltkError

EXPERIMENT = "mltk"  # unless MLFLOW_EXPERIMENT_NAME is set
FLUSH_STEPS, FLUSH_SECONDS = 50, 10.0  # step metrics go in one log_batch call per 50 steps (or 10 s), not one a step
MAX_BATCH_PARAMS, MAX_BATCH_METRICS = 100, 1000  # MLflow's log_batch limits
MAX_PARAM = 500  # what every MLflow server takes (6000 since MLflow 2.8); config.yaml, an artifact, keeps the whole value
LEFT_OUT = {"last.pt"}  # the resumable checkpoint: optimiser state included, about 3x best.pt
EVAL_LEFT_OUT = {"embeddings.npy", "labels.npy", "paths.txt"}  # --save-embeddings: the size of the data set
#: MLflow's HTTP retries and timeout where the user set none: its own (7 retries, 120 s) wait over 4 minutes on a server
#: that is down; these, about a minute at most
BOUNDED = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "20"}
CONNECT_SECONDS = 5.0  # to reach the tracking server before the run starts
#: MLflow prints a run's URL on stdout when it ends, into mltk's own output; off unless the user set it
QUIET = {"MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}


def tracking_uri() -> tuple[str, str | None]:
    """MLFLOW_TRACKING_URI and no artifact location of ours; else a SQLite store in ./mlruns, artifacts beside it.

    Not MLflow's plain file store: MLflow 3 keeps it in maintenance mode and refuses it unless told otherwise.
    """
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"], None
    root = Path("mlruns").resolve()
    root.mkdir(exist_ok=True)
    return f"sqlite:///{root / 'mlflow.db'}", (root / "artifacts").as_uri()


def bound_requests() -> None:
    """MLflow's retries and timeout bounded (``BOUNDED``), unless the user set them."""
    for name, value in BOUNDED.items():
        os.environ.setdefault(name, value)


def quiet_logs() -> None:
    """MLflow's INFO lines (a new database's tables, ...) and run URLs off, unless the user set MLFLOW_LOGGING_LEVEL or
    ``QUIET``'s variable: they would print into mltk's progress display. Its warnings and errors still show."""
    for name, value in QUIET.items():
        os.environ.setdefault(name, value)
    if not os.environ.get("MLFLOW_LOGGING_LEVEL"):
        logging.getLogger("mlflow").setLevel(logging.WARNING)


def check_server(uri: str) -> None:
    """An http(s) tracking server takes a connection now, before the run folder is made, or one line says it does not.

    Not checked: a server reached through a proxy (requests, under MLflow, goes through it; a direct connection may not),
    and anything but http(s) (Databricks, a database).
    """
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return
    if urllib.request.getproxies().get(parts.scheme) and not urllib.request.proxy_bypass(parts.hostname):
        return
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
        socket.create_connection((parts.hostname, port), timeout=CONNECT_SECONDS).close()
    except (OSError, ValueError) as exc:  # ValueError: a port that is not a number
        where = f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if isinstance(exc, OSError) and parts.port else "")  # no user or password
        why = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise MltkError(
            f"--log mlflow: the tracking server {where!r} (MLFLOW_TRACKING_URI) cannot be reached: {why}; "
            f"start it, or unset MLFLOW_TRACKING_URI to log to ./mlruns"
        ) from None


def key(name: str) -> str:
    """An MLflow metric or param name: '@' becomes '_at_' (val_recall@1 -> val_recall_at_1), any other character
    MLflow refuses (it takes letters, digits, _ - . / and spaces) becomes '_'."""
    return re.sub(r"[^\w./\- ]", "_", name.replace("@", "_at_"))


def flatten(value, prefix: str = ""):
    """(dotted key, value) for each leaf of nested dicts; an empty dict and a list are leaves."""
    if isinstance(value, dict) and value:
        for name, item in value.items():
            yield from flatten(item, f"{prefix}{name}.")
    else:
        yield prefix[:-1], value


def metric_entities(values: dict, step: int, prefix: str = "") -> list:
    """MLflow Metric entities for the numbers in ``values``, at ``step``, named ``prefix + key(name)``."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    return [Metric(prefix + key(name), float(v), now, step) for name, v in values.items() if isinstance(v, (int, float))]


def status(error: BaseException | None) -> str:
    if error is None:
        return "FINISHED"
    return "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"  # mltk.errors.Interrupted is a KeyboardInterrupt


def experiment_id(client, name: str, artifact_location: str | None) -> str:
    """The experiment called ``name``, created if it is new (by another run at the same moment, too)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:
            if (found := client.get_experiment_by_name(name)) is None:
                raise
    if found.lifecycle_stage != "active":
        raise MltkError(f"MLflow experiment {name!r} is deleted: restore it (mlflow experiments restore --experiment-id "
                        f"{found.experiment_id}) or set MLFLOW_EXPERIMENT_NAME")
    return found.experiment_id


def quoted(text: str) -> str | None:
    """``text`` as a string of MLflow's search filter, in the quotes it does not hold; None when it holds both (the
    filter has no escapes)."""
    return next((q + text + q for q in "'\"" if q not in text), None)


def training_run(client, experiment: str, run_dir: Path) -> str | None:
    """The id of the MLflow run of the mltk run in ``run_dir`` (its ``mltk.run_dir`` tag), the latest when the run was
    resumed; None when it was not logged to this experiment, or its path cannot be searched for."""
    value = quoted(str(run_dir))
    if value is None:
        return None
    found = client.search_runs([experiment], filter_string=f"tags.`mltk.run_dir` = {value}", order_by=["attributes.start_time DESC"], max_results=1)
    return found[0].info.run_id if found else None


class MlflowLogger:
    """Implements mltk's run hooks for one run, or evaluation_ended for one evaluation; mltk calls them on the process
    that writes the run directory (the evaluation folder)."""

    def __init__(self):
        self.client = self.run_id = self.run_dir = None  # all set when the run starts (run_dir: not for an evaluation)
        self.pending, self.pending_steps, self.sent_at = [], 0, time.monotonic()

    def connect(self) -> str:
        """The client of the tracking store, and the id of the experiment to log to."""
        from mlflow import MlflowClient

        uri, artifact_location = tracking_uri()
        self.client = MlflowClient(tracking_uri=uri)
        return experiment_id(self.client, os.environ.get("MLFLOW_EXPERIMENT_NAME") or EXPERIMENT, artifact_location)

    @mltk.hookimpl
    def run_started(self, config, run_dir):
        from mltk.config import to_dict

        self.run_dir = Path(run_dir).resolve()
        experiment = self.connect()
        tags = {"mltk.version": mltk.__version__, "mltk.run_dir": str(self.run_dir)}
        self.run_id = self.client.create_run(experiment, run_name=self.run_dir.name, tags=tags).info.run_id
        with self.failing():
            self.log_params(flatten(to_dict(config)))

    @mltk.hookimpl
    def evaluation_ended(self, config, run_dir, out, metrics, provenance):
        """The evaluation as an MLflow run of its own, a child of its run's MLflow run when there is one: each evaluation
        keeps what it was measured on (``eval.*`` params) beside its metrics (``eval/*``), so that evaluations of one run
        on different data never share a metric's history. Params: the run's settings too, to compare evaluations by."""
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

        from mltk.config import to_dict

        out = Path(out).resolve()
        experiment = self.connect()
        tags = {"mltk.version": mltk.__version__, "mltk.evaluation": str(out)}
        if run_dir is not None:
            run_dir = Path(run_dir).resolve()
            tags["mltk.evaluated_run"] = str(run_dir)  # not mltk.run_dir: that tag finds the run's own MLflow run
            if (parent := training_run(self.client, experiment, run_dir)) is not None:
                tags[MLFLOW_PARENT_RUN_ID] = parent
        name = f"{run_dir.name}/{out.name}" if run_dir is not None else out.name
        self.run_id = self.client.create_run(experiment, run_name=name, tags=tags).info.run_id
        epoch = provenance.get("checkpoint_epoch")
        with self.failing():
            self.log_params([*(flatten(to_dict(config)) if config is not None else ()), *(flatten(provenance, "eval.") if provenance else ())])
            self.flush(metric_entities(metrics, epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else 0, "eval/"))
            self.log_files(out, EVAL_LEFT_OUT)
            self.client.set_terminated(self.run_id, "FINISHED")
        self.run_id = None

    def log_params(self, items) -> None:
        """(name, value) pairs as params, in as few log_batch calls as MLflow allows."""
        from mlflow.entities import Param

        params = [Param(name, str(value)[:MAX_PARAM]) for name, value in {key(k): v for k, v in items}.items()]
        for i in range(0, len(params), MAX_BATCH_PARAMS):
            self.client.log_batch(self.run_id, params=params[i : i + MAX_BATCH_PARAMS])

    @mltk.hookimpl
    def step_logged(self, epoch, step, steps, logs):
        if self.run_id is None:
            return
        self.pending += metric_entities(logs, step=(epoch - 1) * steps + step)
        self.pending_steps += 1
        if self.pending_steps >= FLUSH_STEPS or time.monotonic() - self.sent_at >= FLUSH_SECONDS:
            with self.failing():
                self.flush()

    @mltk.hookimpl
    def epoch_ended(self, record, run_dir):
        if self.run_id is not None:
            with self.failing():
                self.flush(metric_entities({k: v for k, v in record.items() if k != "epoch"}, step=record["epoch"], prefix="epoch/"))

    @mltk.hookimpl(trylast=True)  # after the other loggers' run_ended: what they write at the end (a projector) is uploaded too
    def run_ended(self, result, error):
        if self.run_id is None:
            return
        try:
            best = getattr(result, "best", None) or {}  # the best epoch: a column to sort runs by in MLflow's UI
            self.flush(metric_entities({"epoch": best["epoch"], "score": best["score"]}, best["epoch"], "best/") if "epoch" in best else ())
            if "by" in best:
                self.client.set_tag(self.run_id, "mltk.best_by", str(best["by"]))
            self.log_files(self.run_dir, LEFT_OUT)
        finally:
            self.client.set_terminated(self.run_id, status(error))
            self.run_id = None

    @contextmanager
    def failing(self):
        """An error ends the MLflow run as FAILED, then goes on to mltk, which leaves this logger out of the rest of
        the run: run_ended, which would end it, does not come."""
        try:
            yield
        except Exception:
            run_id, self.run_id = self.run_id, None
            with suppress(Exception):  # the server that failed may not take this either
                self.client.set_terminated(run_id, "FAILED")
            raise

    def flush(self, more: list = ()) -> None:
        """Send the buffered step metrics and ``more`` in as few log_batch calls as MLflow allows."""
        batch, self.pending, self.pending_steps, self.sent_at = [*self.pending, *more], [], 0, time.monotonic()
        for i in range(0, len(batch), MAX_BATCH_METRICS):
            self.client.log_batch(self.run_id, metrics=batch[i : i + MAX_BATCH_METRICS])

    def log_files(self, folder: Path, left_out: set[str]) -> None:
        """The folder's files and folders as artifacts, but those ``left_out`` and hidden temporary files."""
        for path in sorted(folder.iterdir()) if folder.is_dir() else []:
            if path.name in left_out or path.name.startswith(".") or path.is_symlink():
                continue
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), artifact_path=path.name)
            elif path.is_file():
                self.client.log_artifact(self.run_id, str(path))
