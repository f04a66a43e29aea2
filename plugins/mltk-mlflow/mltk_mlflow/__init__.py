"""mltk plugin: ``mltk run --log mlflow``. Light at import: mlflow is imported when a run asks for it."""

import mltk
from mltk.errors import UsageError


def mlflow_logger(config, run_dir):
    """The logger for one run; writes nothing until the run starts, and fails now if mlflow is missing."""
    try:
        import mlflow  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"--log mlflow needs the mlflow package: pip install 'mlflow>=3' ({exc})") from None
    from mltk_mlflow.logger import MlflowLogger

    return MlflowLogger()


@mltk.hookimpl
def register_loggers(register):
    register("mlflow", mlflow_logger, description="MLflow: params, metrics per step and epoch, the run directory (MLFLOW_TRACKING_URI, else ./mlruns)")
