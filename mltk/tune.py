"""``mltk tune``: a hyperparameter search that never sees the test classes.

The protocol of "A Metric Learning Reality Check" (Musgrave, Belongie, Lim, ECCV 2020), as one command:

- a search over any ``mltk run`` setting by Bayesian optimisation: Optuna's TPE by default;
- each trial scored by class-disjoint k-fold cross-validation on the training classes only: fold f trains on the
  other folds' classes and is scored with mltk's own metrics on its own held-out classes; the objective is the mean;
- hopeless trials pruned on their per-epoch validation recall@1 (median pruner by default);
- the test classes read once, by ``final``: the best configuration retrained on all training classes with several
  seeds, each scored once on the test classes, reported as mean ± a 95 % interval.

A tune directory holds ``tune.json`` (what the search is), ``study.db`` (the Optuna study, unless a shared
``storage`` is named), ``trials/NNNN/foldF`` (each fold's run; its checkpoints go once it is scored), and, rewritten
after every trial, ``trials.csv``, ``trials.md``, ``best.yaml`` (a config ``mltk run --config`` takes as it is) and
``report.html``. ``final`` adds ``final/seedS`` (runs with their evaluations: ``mltk compare`` reads them) and
``final.md`` / ``final.json``.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import re
import socket
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

from mltk import ctrl_c
from mltk.config import FIELDS, RunConfig, check_values, make_config, to_dict
from mltk.errors import MltkError, UsageError, first_line
from mltk.outputs import check_dir, replace_file
from mltk.rules import ListOf, Number, Options, Scalar, Seq, show, unknown

FORMAT = "mltk-tune-1"
SPACE_MAX_BYTES = 1 << 20
#: run options a search may not vary: what the data is, where and how the run goes (seeds are the final step's)
NOT_TUNED = ("data", "data_classes", "val_data", "val_data_classes", "val_classes", "out", "device", "workers", "log", "seed", "in_memory")
TUNABLE = tuple(name for name in FIELDS if name not in NOT_TUNED)
BOUND = Number(-1e300, 1e300, what="a number")  # YAML 1.1 reads 1e-4 as text: taken as its number
WHOLE = Number(-(2**53), 2**53, whole=True, what="a whole number")
#: the forms of a search-space entry: ``lr: {log: [1e-5, 1e-2]}``
FORMS = Options(
    {
        "log": Seq((BOUND, BOUND), what="[low, high], numbers above 0, sampled on a log scale"),
        "float": Seq((BOUND, BOUND), what="[low, high], numbers"),
        "int": Seq((WHOLE, WHOLE), what="[low, high], whole numbers"),
        "choice": ListOf(Scalar(), tuple(range(1, 101)), what="a list of 1 to 100 values"),
    },
    what="one of {log: [low, high]}, {float: [low, high]}, {int: [low, high]} or {choice: [a, b, ...]}",
)
SAMPLERS = ("tpe", "random", "cmaes", "qmc")
PRUNERS = ("median", "hyperband", "none")
LOWER_IS_BETTER = ("eer",)
#: a metric's value (as ``mltk evaluate`` names it) -> the registered metric that gives it
METRIC_OF = {"map@r": "map_at_r", "roc_auc": "roc_auc", "eer": "eer", "accuracy": "accuracy_10fold", "balanced_accuracy": "accuracy_10fold"}
#: the figures the final step reports (not thresholds, counts or spreads)
FIGURE = re.compile(r"roc_auc|eer|map@r|recall@\d+|(balanced_)?accuracy|tar@far=.+")
FAILED_IN_A_ROW = 5  # trials: then the search stops, saying why (a bad base config fails every trial alike)


# -- The search space: a YAML file, checked whole before any training.


@dataclass(frozen=True)
class Dimension:
    """One option's range: ``kind`` is log, float, int or choice."""

    name: str
    kind: str
    values: tuple

    def suggest(self, trial):
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.values))
        low, high = self.values
        if self.kind == "int":
            return trial.suggest_int(self.name, low, high)
        return trial.suggest_float(self.name, low, high, log=self.kind == "log")


def read_space(path: str | Path) -> dict[str, Dimension]:
    """The search space of ``path``, every entry checked: an unknown option, a bad range or a value the option does not
    take is one line naming it, before any training."""
    import yaml

    path = Path(path)
    where = f"--space {str(path)!r}"
    if not path.is_file():
        raise UsageError(f"{where} {'is a folder' if path.is_dir() else 'does not exist'}; give a YAML file such as: lr: {{log: [1e-5, 1e-2]}}")
    try:
        with open(path, "rb") as f:
            text = f.read(SPACE_MAX_BYTES + 1)
        if len(text) > SPACE_MAX_BYTES:
            raise UsageError(f"{where} is larger than 1 MiB; a search space is a few lines")
        raw = yaml.safe_load(text)
    except (OSError, yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
        raise UsageError(f"{where} is not readable YAML ({first_line(exc)})") from None
    return check_space(raw, path.name)


def check_space(raw: Any, source: str) -> dict[str, Dimension]:
    if not isinstance(raw, dict) or not raw:
        raise UsageError(f"{source} must be a mapping of run options to ranges, such as lr: {{log: [1e-5, 1e-2]}}, got {show(raw)}")
    space = {}
    for name, spec in raw.items():
        if name in NOT_TUNED:
            raise UsageError(f"{name} in {source} cannot be searched over: it is set for the whole search (give it in the base config)")
        if name not in TUNABLE:
            raise UsageError(unknown(str(name), source, "", TUNABLE))
        spec = FORMS.check(spec, name, source)
        if len(spec) != 1:
            raise UsageError(f"{name} in {source} must be {FORMS}, got {show(spec)}")
        (kind, values), = spec.items()
        if kind != "choice":
            low, high = values
            if not low < high:
                raise UsageError(f"{name} in {source}: {kind} [{low}, {high}] needs low < high")
            if kind == "log" and low <= 0:
                raise UsageError(f"{name} in {source}: log [{low}, {high}] needs numbers above 0")
            values = (int(low), int(high)) if kind == "int" else (float(low), float(high))
        for value in values:  # each end, each choice: a value the option takes
            check_values({name: value}, source)
        space[name] = Dimension(name, kind, tuple(values))
    return space


def check_names_in(space: dict[str, Dimension], base: dict, source: str) -> None:
    """Every backbone, loss, miner or logger a space names exists: a misspelt choice is one line now, not a failed trial
    in the middle of the search."""
    from mltk.train import check_names

    for name, dim in space.items():
        for value in dim.values:
            try:
                check_names(make_config({**base, name: value}, source=source))
            except UsageError as exc:
                raise UsageError(f"{name} in {source}: {exc}") from None


# -- The folds: class-disjoint, of the training classes only.


def class_folds(classes: list[str], folds: int, seed: int, holdout: float = 0.25) -> list[list[str]]:
    """The held-out classes of each fold: ``folds`` class-disjoint parts of ``classes`` (shuffled by ``seed``), or with
    ``folds=1`` one part of ``holdout`` of them. Each part, and what is left to train on, holds two classes or more."""
    order = sorted(classes)
    random.Random(seed).shuffle(order)
    if folds == 1:
        parts = [order[: max(2, round(holdout * len(order)))]]
    else:
        parts = [order[i::folds] for i in range(folds)]
    smallest = min(len(p) for p in parts)
    left = len(order) - max(len(p) for p in parts)
    if smallest < 2 or left < 2:
        most = len(order) // 2
        advice = f"give --folds {most} or fewer" if most >= 2 else "the data needs four classes or more"
        raise UsageError(f"--folds {folds} on {len(order)} classes leaves a fold, or what trains beside it, with fewer than 2 classes; {advice}")
    return [sorted(p) for p in parts]


def _exact(name: str) -> str:
    """An fnmatch pattern that matches ``name`` alone: ``[``, ``*`` and ``?`` bracketed."""
    return "".join(f"[{c}]" if c in "[*?" else c for c in name)


def fold_config(base: RunConfig, held_out: list[str], classes: list[str]) -> RunConfig:
    """``base`` trained on ``classes`` less ``held_out``, validated on ``held_out``: one fold."""
    kept = [c for c in classes if c not in set(held_out)]
    return replace(base, data_classes=[_exact(c) for c in kept], val_data=base.data, val_data_classes=[_exact(c) for c in held_out], val_classes=0.0)


# -- What a search is: tune.json, written when it starts, checked when it goes on.


@dataclass
class Search:
    base: dict  # the base config (``to_dict``)
    space: dict  # option -> {kind: values}
    folds: list[list[str]]  # each fold's held-out classes
    metric: str = "map@r"
    direction: str = "maximize"
    sampler: str = "tpe"
    pruner: str = "median"
    trials: int = 20
    storage: str | None = None  # None: study.db in the tune directory
    study: str = "mltk-tune"
    keep_checkpoints: bool = False
    format: str = FORMAT

    def dimensions(self) -> dict[str, Dimension]:
        return check_space(self.space, "tune.json")

    def config(self, params: dict | None = None) -> RunConfig:
        return make_config({**self.base, **(params or {})}, source="the trial's settings")


def read_search(tune_dir: Path) -> Search:
    path = tune_dir / "tune.json"
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise MltkError(f"{str(tune_dir)!r} is not a tune directory (no tune.json); start one with `mltk tune --space SPACE --out DIR`") from None
    except (OSError, ValueError, RecursionError) as exc:
        raise MltkError(f"{str(path)!r} cannot be read ({first_line(exc)}); start the search again in another --out") from None
    known = set(Search.__dataclass_fields__)
    if not isinstance(data, dict) or data.get("format") != FORMAT or set(data) - known:
        raise MltkError(f"{str(path)!r} is not a tune.json of this mltk ({FORMAT})")
    try:
        search = Search(**data)
        search.dimensions()
        search.config()
    except (TypeError, UsageError) as exc:
        raise MltkError(f"{str(path)!r} is damaged: {exc}") from None
    return search


def metric_function(metric: str) -> str:
    """The registered metric that gives ``metric`` (a value as ``mltk evaluate`` names it: map@r, recall@1, roc_auc, ...)."""
    from mltk import registry

    if metric in METRIC_OF:
        return METRIC_OF[metric]
    for prefix, name in (("recall@", "recall_at_k"), ("precision@", "precision_at_k"), ("tar@far=", "tar_at_far")):
        if metric.startswith(prefix):
            return name
    if metric in registry.list_metrics():
        return metric
    known = ["map@r", "recall@1", "precision@1", "roc_auc", "eer", "tar@far=0.001", "accuracy"]
    raise UsageError(f"unknown --metric {metric!r}; give a value mltk evaluate reports, such as {', '.join(known)}")


# -- The objective: one trial, its folds in turn.


@dataclass
class Trial:
    """What a caller is told as the search goes: the trial and fold running, each epoch, each trial's end."""

    on_fold: Callable[[int, int, int], None] = lambda number, fold, folds: None
    on_epoch: Callable[[dict], None] = lambda record: None
    on_end: Callable[[Any], None] = lambda frozen: None


def objective(search: Search, tune_dir: Path, data, told: Trial, pressed: Callable[[], bool] = lambda: False):
    """Optuna's objective: the trial's settings trained and scored on each fold in turn; the mean of the folds."""
    import optuna

    from mltk.model import load
    from mltk.data import select_classes
    from mltk.evaluate import evaluate
    from mltk.config import check_training
    from mltk.train import check_names, train

    dimensions = search.dimensions()
    measure = metric_function(search.metric)

    def run(trial) -> float:
        with ctrl_c.remembered():  # Ctrl-C stops the trial at once (Optuna fails it, to be run again)
            ctrl_c.stop_if(pressed)  # pressed since the last trial ended
            return trial_value(trial)

    def trial_value(trial) -> float:
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        params = {name: dim.suggest(trial) for name, dim in dimensions.items()}
        try:
            cfg = search.config(params)
            check_names(cfg)
            check_training(cfg)
        except UsageError as exc:  # settings that contradict each other: this trial fails, the search goes on
            trial.set_user_attr("error", str(exc))
            raise TrialFailed(str(exc)) from None
        folder = tune_dir / "trials" / f"{trial.number:04d}"
        values, step, disk = [], 0, 0
        try:
            for f, held_out in enumerate(search.folds):
                told.on_fold(trial.number, f, len(search.folds))

                def on_epoch(record: dict) -> None:
                    nonlocal step
                    step += 1
                    told.on_epoch(record)
                    if "val_recall@1" in record and math.isfinite(record["val_recall@1"]):
                        trial.report(record["val_recall@1"], step)
                        if trial.should_prune():
                            raise optuna.TrialPruned(f"pruned in fold {f} at epoch {record['epoch']}")

                run_dir = folder / f"fold{f}"
                train(fold_config(cfg, held_out, data.classes), run_dir, overwrite=run_dir.exists(), on_epoch=on_epoch)
                ctrl_c.stop_if(pressed)
                scored = evaluate(load(run_dir, device=None if cfg.device == "auto" else cfg.device), data=select_classes(data, [_exact(c) for c in held_out]), metrics=[measure], workers=cfg.workers)
                ctrl_c.stop_if(pressed)
                value = scored.values.get(search.metric)
                if value is None or not math.isfinite(value):
                    raise TrialFailed(f"fold {f} gives no {search.metric} ({scored.not_measured.get(search.metric, 'not measured')})")
                values.append(float(value))
                trial.set_user_attr("folds", values)
                disk = max(disk, _checkpoint_bytes(run_dir))
                if not search.keep_checkpoints:
                    _drop_checkpoints(run_dir)
        except MltkError as exc:
            trial.set_user_attr("error", str(exc))
            raise TrialFailed(str(exc)) from None
        finally:  # a pruned or failed fold's checkpoints count, and go, too
            folds = list(folder.iterdir()) if folder.exists() else []
            trial.set_user_attr("checkpoint_bytes", max([disk] + [_checkpoint_bytes(d) for d in folds]))
            if not search.keep_checkpoints:
                for run_dir in folds:
                    _drop_checkpoints(run_dir)
        return sum(values) / len(values)

    return run


class TrialFailed(MltkError):
    """A trial that cannot be scored (settings that contradict each other, a fold without the metric): marked failed,
    and the search goes on."""


def _checkpoint_bytes(run_dir: Path) -> int:
    return sum(p.stat().st_size for p in run_dir.glob("*.pt") if p.is_file())


def _drop_checkpoints(run_dir: Path) -> None:
    for name in ("last.pt", "best.pt"):
        (run_dir / name).unlink(missing_ok=True)


# -- The study: where it lives, and what a killed process left in it.


def storage_url(search: Search, tune_dir: Path) -> str:
    return search.storage or f"sqlite:///{(tune_dir / 'study.db').resolve()}"


def open_study(search: Search, tune_dir: Path, create: bool):
    """The study, on SQLite in the tune directory or on ``search.storage`` (any URL SQLAlchemy takes: PostgreSQL, MySQL
    for many machines). Each process keeps a heartbeat: a trial whose process died is failed and run again."""
    import warnings

    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # mltk says each trial's end in its own line
    url = storage_url(search, tune_dir)
    try:
        with warnings.catch_warnings():  # Optuna calls the heartbeat experimental, on every start
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            storage = RDBStorage(
                url, heartbeat_interval=10, grace_period=60, heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2),
                engine_kwargs={"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {},
            )
        return optuna.create_study(
            storage=storage, study_name=search.study, direction=search.direction, load_if_exists=not create or search.storage is not None,
            sampler=make_sampler(search.sampler, seed=search.base.get("seed", 0)), pruner=make_pruner(search.pruner),
        )
    except optuna.exceptions.DuplicatedStudyError:
        raise UsageError(f"the storage already holds a study named {search.study!r}; give --resume to go on with it, or another --study") from None
    except Exception as exc:  # SQLAlchemy's: a URL it cannot open, a server it cannot reach
        if isinstance(exc, MltkError):
            raise
        raise MltkError(f"cannot open the study storage {_safe_url(url)!r}: {first_line(exc)[:300]}") from None


def _safe_url(url: str) -> str:
    """A storage URL as it may be shown: its password hidden."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return url.split("@")[-1]


def make_sampler(name: str, seed: int):
    import optuna

    samplers = {
        "tpe": lambda: optuna.samplers.TPESampler(seed=seed),
        "random": lambda: optuna.samplers.RandomSampler(seed=seed),
        "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed),
        "qmc": lambda: optuna.samplers.QMCSampler(seed=seed),
    }
    return samplers[name]()


def make_pruner(name: str):
    import optuna

    pruners = {  # the median pruner never judges step 1, a trial's first epoch
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=2),
        "hyperband": optuna.pruners.HyperbandPruner,
        "none": optuna.pruners.NopPruner,
    }
    return pruners[name]()


def fail_orphans(study) -> list[int]:
    """Trials left running by a process of this machine that is gone (a kill -9): failed now, and run again with the
    same settings (Optuna's heartbeat does the same for other machines once their grace period passes)."""
    from optuna.trial import TrialState

    from mltk.outputs import process_alive

    orphans = [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        if t.user_attrs.get("host") == socket.gethostname() and isinstance(t.user_attrs.get("pid"), int) and not process_alive(t.user_attrs["pid"])
    ]
    for t in orphans:
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        run_again(study, t)
    return [t.number for t in orphans]


def run_again(study, trial) -> None:
    """Queue ``trial``'s settings as a new trial, once: the next process to start a trial runs it first."""
    if not any(t.user_attrs.get("retry_of") == trial.number for t in study.get_trials(deepcopy=False)):
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number}, skip_if_exists=False)


def finished(study) -> int:
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)))


def committed(study) -> int:
    """Trials finished, or running in some process: a process starts another trial only while these fall short of the
    budget, so processes sharing a study finish it together without running past it."""
    from optuna.trial import TrialState

    return len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)))


# -- The search itself.


@dataclass
class Tuned:
    tune_dir: Path
    study: Any
    orphans: list[int] = field(default_factory=list)


def start(search: Search, tune_dir: str | Path, resume: bool = False) -> tuple[Search, Path]:
    """The tune directory for ``search``: made, with its tune.json, or (``resume``) its own search, read back."""
    tune_dir = check_dir(tune_dir)
    if resume:
        return read_search(tune_dir), tune_dir
    if (tune_dir / "tune.json").exists():
        raise UsageError(f"--out {str(tune_dir)!r} holds a search already; give --resume to go on with it, or another --out")
    if tune_dir.exists() and any(tune_dir.iterdir()) and search.storage is None:
        raise UsageError(f"--out {str(tune_dir)!r} is a folder that is not a tune directory; give a new or empty folder")
    tune_dir.mkdir(parents=True, exist_ok=True)
    with replace_file(tune_dir / "tune.json") as tmp:
        tmp.write_text(json.dumps(asdict(search), indent=2))
    return search, tune_dir


def tune(search: Search, tune_dir: Path, data, told: Trial | None = None) -> Tuned:
    """Run trials until ``search.trials`` have finished (completed or pruned) in the study, across every process that
    shares it; the outputs are rewritten after each. ``data``: the training images (``search.base``'s, loaded)."""
    import optuna

    told = told or Trial()
    study = open_study(search, tune_dir, create=False)
    orphans = fail_orphans(study)
    in_a_row: list[str] = []

    def after(study, frozen) -> None:
        write_outputs(search, tune_dir, study)
        in_a_row[:] = in_a_row + [frozen.user_attrs.get("error", "failed")] if frozen.state == optuna.trial.TrialState.FAIL else []
        told.on_end(frozen)
        if committed(study) >= search.trials or len(in_a_row) >= FAILED_IN_A_ROW:
            study.stop()
        ctrl_c.stop_if(pressed)  # dropped in the trial's last moments (Optuna's bookkeeping): no next trial

    if committed(study) < search.trials:
        try:
            # Ctrl-C: raised inside a trial (its objective); between trials, in Optuna's own bookkeeping, where it
            # would leave the study half-updated, only remembered, and raised by the next trial or by after() above
            # (which reads this block's ``pressed``).
            with ctrl_c.remembered(raise_now=False) as pressed:
                study.optimize(objective(search, tune_dir, data, told, pressed), callbacks=[after], catch=(TrialFailed,), gc_after_trial=True)
        except KeyboardInterrupt:  # Optuna failed the trial it cut short: it is run again, first, by the next process
            for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.FAIL,)):
                if t.user_attrs.get("pid") == os.getpid() and "error" not in t.user_attrs:
                    run_again(study, t)
            write_outputs(search, tune_dir, study)
            raise
    write_outputs(search, tune_dir, study)
    if len(in_a_row) >= FAILED_IN_A_ROW:
        raise MltkError(f"{FAILED_IN_A_ROW} trials in a row failed, the last with: {in_a_row[-1]}; fix the base config or the space, then --resume")
    return Tuned(tune_dir, study, orphans)


# -- Outputs: trials.csv, trials.md, best.yaml, report.html.


def rows(search: Search, study) -> tuple[list[str], list[list]]:
    """The trials as a table: number, state, the objective, each fold, each setting, seconds, checkpoint bytes, error."""
    names = list(search.space)
    folds = len(search.folds)
    header = ["trial", "state", search.metric, *(f"fold {f}" for f in range(folds)), *names, "seconds", "checkpoint MiB", "note"]
    table = []
    for t in study.get_trials(deepcopy=False):
        per_fold = list(t.user_attrs.get("folds", []))
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete and t.datetime_start else None
        note = t.user_attrs.get("error") or (f"run again as trial of #{t.user_attrs['retry_of']}" if "retry_of" in t.user_attrs else "")
        if t.state.name == "PRUNED":  # Optuna gives a pruned trial its last validation recall@1 as its value: not the objective
            step, recall = max(t.intermediate_values.items(), default=(0, float("nan")))
            note = f"pruned at step {step} (fold epochs so far): validation recall@1 {recall:.4f}" + (f"; {note}" if note else "")
        table.append([
            t.number, t.state.name.lower(), t.value if t.state.name == "COMPLETE" else None, *(per_fold + [None] * (folds - len(per_fold))), *(t.params.get(n) for n in names),
            None if seconds is None else round(seconds, 1), round(t.user_attrs.get("checkpoint_bytes", 0) / 2**20, 1), note,
        ])
    return header, table


def _cell(value, figure: bool = False) -> str:
    """A table cell: a metric's figure to 4 decimals, another number to 4 significant digits."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}" if figure else f"{value:.4g}"
    return str(value)


def best_trial(study):
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not done:
        return None
    return (max if study.direction.name == "MAXIMIZE" else min)(done, key=lambda t: t.value)


def write_outputs(search: Search, tune_dir: Path, study) -> None:
    """trials.csv, trials.md, best.yaml and report.html, each written whole."""
    from mltk import report
    from mltk.display import one_line

    header, table = rows(search, study)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows([[("" if v is None else v) for v in row] for row in table])
    with replace_file(tune_dir / "trials.csv") as tmp:
        tmp.write_text(buffer.getvalue())
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    figures = range(2, 3 + len(search.folds))  # the objective and each fold
    shown = [[one_line(_cell(v, c in figures)) for c, v in enumerate(row)] for row in table]
    md += ["| " + " | ".join(v.replace("|", "\\|") for v in row) + " |" for row in shown]
    best = best_trial(study)
    lead = [f"# mltk tune: {len(table)} trials, {search.metric} over {len(search.folds)} class-disjoint fold(s) of the training classes", ""]
    if best is not None:
        lead += [f"Best: trial {best.number}, {search.metric} {best.value:.4f} (folds: {', '.join(f'{v:.4f}' for v in best.user_attrs.get('folds', []))}).", ""]
    with replace_file(tune_dir / "trials.md") as tmp:
        tmp.write_text("\n".join(lead + md) + "\n")
    if best is not None:
        write_best(search, tune_dir, best)
    notes = [(f"{search.metric}: the mean over the folds; each fold trains on the other folds' classes and is scored on its own; the test classes are never read", "")]
    numeric = [bool(table) and all(isinstance(row[c], (int, float)) or row[c] is None for row in table) for c in range(len(header))]
    page = report.table_page(f"mltk tune: {tune_dir.name}", header, shown, numeric, set(), notes, report.study_figures(study), generator="mltk tune", keys=table)
    with replace_file(tune_dir / "report.html") as tmp:
        tmp.write_text(page, encoding="utf-8")


def write_best(search: Search, tune_dir: Path, best) -> None:
    import yaml

    cfg = to_dict(search.config(best.params))
    cfg.pop("out", None)
    head = (
        f"# mltk tune {tune_dir.name}: trial {best.number} of the study {search.study!r}, {search.metric} {best.value:.4f} as the mean of "
        f"{len(search.folds)} class-disjoint fold(s) of the training classes.\n# mltk run --config best.yaml trains it; "
        f"mltk tune {tune_dir.name} --final --test TEST scores it once on the test classes, with several seeds.\n"
    )
    with replace_file(tune_dir / "best.yaml") as tmp:
        tmp.write_text(head + yaml.safe_dump(cfg, sort_keys=False))


# -- The final step: the best configuration, several seeds, the test classes once.


@dataclass
class Final:
    metrics: dict[str, dict]  # metric -> {mean, half_width, values}
    runs: list[Path]
    trial: int


def interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """The mean and the half-width of its ``confidence`` interval (Student's t; 0 for one value)."""
    from scipy import stats

    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf((1 + confidence) / 2, n - 1) * sd / math.sqrt(n))


def final(
    search: Search, tune_dir: Path, test: str, seeds: int, data: str | None = None, test_classes: list[str] | None = None,
    on_seed: Callable[[int, int], None] = lambda s, n: None, epochs: int | None = None,
) -> Final:
    """The best trial's settings trained on all the training classes (``data``: by default the search's) with ``seeds``
    seeds, each scored once on ``test``; the runs go to final/seedS, and final.md / final.json say mean ± 95 % interval.

    ``epochs`` trains the final runs longer (or shorter) than the search's folds: a search run at a short budget, its
    winner trained at the full one. It is fixed before the test classes are read, so it is no test-set feedback."""
    from mltk.evaluate import EvaluateRequest, execute, prepare
    from mltk.train import train

    study = open_study(search, tune_dir, create=False)
    best = best_trial(study)
    if best is None:
        raise MltkError(f"the study in {str(tune_dir)!r} has no completed trial yet; run the search first")
    cfg = search.config(best.params)
    cfg = replace(cfg, data=data or cfg.data, val_data=None, val_data_classes=[], val_classes=0.0, epochs=epochs or cfg.epochs)
    runs, values = [], {}
    for s in range(seeds):
        on_seed(s, seeds)
        run_dir = tune_dir / "final" / f"seed{s}"
        train(replace(cfg, seed=s), run_dir, overwrite=run_dir.exists())
        request = EvaluateRequest(run=run_dir, data=test, classes=test_classes or None, report=False).check()
        result = execute(prepare(request, lambda line: None))
        for key, value in result.values.items():
            if (FIGURE.fullmatch(key) or key == search.metric) and isinstance(value, (int, float)) and not isinstance(value, bool):
                values.setdefault(key, []).append(float(value))
        runs.append(run_dir)
    metrics = {k: dict(zip(("mean", "half_width"), interval(v)), values=v) for k, v in values.items() if len(v) == seeds}
    done = Final(metrics, runs, best.number)
    write_final(search, tune_dir, done, test, cfg, test_classes or [])
    return done


def write_final(search: Search, tune_dir: Path, done: Final, test: str, cfg: RunConfig, test_classes: list[str]) -> None:
    seeds = len(done.runs)
    lines = [
        f"# mltk tune {tune_dir.name}: the final step", "",
        f"Trial {done.trial}'s settings (chosen by {search.metric} over {len(search.folds)} class-disjoint fold(s) of the training classes), "
        f"trained for {cfg.epochs} epochs on {cfg.data!r}{_classes(cfg.data_classes)} with {seeds} seed(s) and scored once on {test!r}{_classes(test_classes)}: mean ± half-width of the 95 % interval (Student's t).", "",
        "| metric | mean ± 95 % | " + " | ".join(f"seed {s}" for s in range(seeds)) + " |", "|---|---|" + "---|" * seeds,
    ]
    for key, m in done.metrics.items():
        lines.append(f"| {key} | {m['mean']:.4f} ± {m['half_width']:.4f} | " + " | ".join(f"{v:.4f}" for v in m["values"]) + " |")
    with replace_file(tune_dir / "final.md") as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    record = {"trial": done.trial, "epochs": cfg.epochs, "data": cfg.data, "data_classes": cfg.data_classes, "test": test, "test_classes": test_classes, "seeds": seeds, "runs": [str(r) for r in done.runs], "metrics": done.metrics}
    with replace_file(tune_dir / "final.json") as tmp:
        tmp.write_text(json.dumps(record, indent=2))


def _classes(patterns: list[str]) -> str:
    return f" (classes {', '.join(patterns)})" if patterns else ""


def disk_per_trial(study) -> float:
    """The largest checkpoint size of a trial's fold, in MiB: what a trial holds on disk while it runs."""
    return max((t.user_attrs.get("checkpoint_bytes", 0) for t in study.get_trials(deepcopy=False)), default=0) / 2**20

