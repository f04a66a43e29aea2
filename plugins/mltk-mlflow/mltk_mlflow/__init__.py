"""mltk plugin: ``mltk run --log mlflow`` and ``mltk evaluate --log mlflow``. Light at import: mlflow is imported when a run asks for it."""

import os

import mltk
from mltk.errors import UsageError


def mlflow_logger(config, run_dir):
    """The logger for one run or evaluation; writes nothing yet, and fails now if mlflow is missing or its
    tracking server cannot be reached (mltk makes loggers before any work: the run folder, the embedding)."""
    try:
        import mlflow  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"--log mlflow needs the mlflow package: pip install 'mlflow>=3' ({exc})") from None
    from mltk_mlflow.logger import MlflowLogger, bound_requests, check_server, quiet_logs

    bound_requests()
    quiet_logs()
    check_server(os.environ.get("MLFLOW_TRACKING_URI", ""))  # unset: a SQLite store in ./mlruns
    return MlflowLogger()


@mltk.hookimpl
def register_loggers(register):
    register("mlflow", mlflow_logger, description="MLflow: params, metrics per step and epoch, the run directory, evaluations (MLFLOW_TRACKING_URI, else ./mlruns)")
