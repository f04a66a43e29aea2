"""Options several commands share, declared once (the way huggingface_hub's ``cli/_cli_utils.py`` does).

Options that mean the same everywhere are ``Annotated`` aliases (``device: Device = None``); each
command gives its own default, since Typer copies an alias's option for every parameter. Options
whose meaning depends on the command (what ``--data`` holds, what ``--out`` writes, what
``--nprobe`` defaults to) are small factories taking the phrase that varies.

``mltk --help`` imports this module: typer, the standard library and light mltk modules only (mltk.checkpoint imports
torch where a tensor is read), no numpy, torch or faiss.
"""

from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from mltk.checkpoint import CHECKPOINTS


class IndexKind(str, Enum):
    """``mltk.knn.KINDS``, written out: importing mltk.knn would import numpy (a test checks they agree)."""

    flat = "flat"
    ivf = "ivf"
    ivfpq = "ivfpq"
    hnsw = "hnsw"


#: ``mltk.checkpoint.CHECKPOINTS`` by name (that module imports torch only where a tensor is read or written)
CheckpointKind = Enum("CheckpointKind", {name: name for name in CHECKPOINTS}, type=str)


Run = Annotated[Optional[Path], typer.Argument(help="Run directory or checkpoint file.")]
# Which checkpoint of a run directory: last.pt unless told, in every command, so that a threshold evaluate calibrates holds for what index, export and verify load.
Checkpoint = Annotated[
    Optional[CheckpointKind],
    typer.Option(help="Which checkpoint of the RUN directory: last (last.pt, the default) or best (best.pt, chosen by validation recall@1 on the run's held-out classes)."),
]
Device = Annotated[Optional[str], typer.Option(help="auto, cpu, cuda, cuda:1 ... (default auto: a GPU when there is one).")]
Workers = Annotated[Optional[int], typer.Option(help="Data-loading processes.")]
BatchSize = Annotated[Optional[int], typer.Option(help="Images per batch.")]
# A pair, not a flag: a config file may turn it on, and the command line must be able to turn it off.
Pretrained = Annotated[Optional[bool], typer.Option("--pretrained/--no-pretrained", help="The backbone's pretrained weights (downloads them).")]

IMAGES = "a folder of <class>/<image>, a CSV (path,label) or a dataset name"


def _default(default: str) -> str:
    return f" (default: {default})" if default else ""


def data_option(what: str, default: str = "") -> Any:
    """``--data``: ``what`` the images are for, in the forms ``mltk.data.load_data`` reads."""
    return typer.Option(help=f"{what}: {IMAGES}{_default(default)}.")


def classes_option(what: str) -> Any:
    """``--classes``: fnmatch patterns picking ``what``'s classes by name (a class-disjoint split of one folder)."""
    return typer.Option(help=f"Only the classes of {what} whose names match this pattern (fnmatch, e.g. '0[0-4]?.*'); repeatable.")


def out_option(what: str, default: str = "") -> Any:
    """``--out``: ``what`` the command writes there, and what it does to what is there already."""
    return typer.Option(help=f"{what}{_default(default)}.")


def log_option(what: str, default: str = "") -> Any:
    """``--log``: the loggers ``what`` goes to; ``logger_names`` reads what was given."""
    return typer.Option(
        help=f"{what}: tensorboard (RUN/tensorboard), mlflow (a plugin), ... (`mltk list loggers`); repeatable or "
        f"comma-separated; none: no logger{_default(default)}."
    )


def logger_names(values: list[str] | None) -> list[str] | None:
    """``--log a --log b,c``: the names a, b, c, each once, in order; ``--log none``: none (None: not given)."""
    if values is None:
        return None
    return list(dict.fromkeys(name.strip() for value in values for name in value.split(",") if name.strip() not in ("", "none")))


def nprobe_option(default: str) -> Any:
    """``--nprobe`` of an ivf or ivfpq index."""
    return typer.Option(help=f"ivf or ivfpq index: cells a query visits (more: slower, closer to exact; default: {default}).")


def ef_search_option(default: str) -> Any:
    """``--ef-search`` of an hnsw index."""
    return typer.Option(help=f"hnsw index: candidates a query keeps (more: slower, closer to exact; default: {default}).")
Rerank = Annotated[
    Optional[str],
    typer.Option(
        metavar="NAME[:KEY=VALUE,...]",
        help="Re-rank each query's nearest before they are shown or scored: k-reciprocal (k1, k2, lambda, candidates), qe "
        "(n, alpha), dba (n, alpha), none; e.g. k-reciprocal:k1=20,k2=6,lambda=0.3. `mltk list rerankers`; a plugin can add one.",
    ),
]
# Where a calibrated score threshold comes from, and which of its operating points to use.
Calibrate = Annotated[
    Optional[str],
    typer.Option(
        metavar="EVAL_DIR_OR_DATA",
        help="Calibrate the match threshold: an `mltk evaluate` folder of this model (its thresholds.json), or images "
        f"({IMAGES}) whose all-pairs scores give it.",
    ),
]


def parse_far(text: str) -> float | str:
    """``--far`` read as the command line is parsed: ``mltk.thresholds.parse_far`` (imported only when --far is given)."""
    from mltk.thresholds import parse_far as parse

    return parse(text)


# A rate in (0, 1), or "eer", by the time the command runs: the option parses itself.
Far = Annotated[
    Optional[Any],
    typer.Option(parser=parse_far, metavar="TEXT", help="False-accept rate of the threshold (the share of pairs of two identities it accepts): 1e-1, 1e-2, 1e-3 (default), 1e-4, or eer (where false accepts and false rejects are equal)."),
]
