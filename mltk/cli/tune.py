"""``mltk tune``: the search (``mltk.tune``), its progress at a terminal, and its final step."""

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from mltk.cli.options import Device, Workers, classes_option, data_option
from mltk.errors import Interrupted, UsageError


def tune(
    tune_dir: Annotated[Path, typer.Argument(help="The tune directory: made by the search, read by --resume and --final.")],
    space: Annotated[Optional[Path], typer.Option(help="YAML search space, a line per option: lr: {log: \\[1e-5, 1e-2]}; also {float: \\[lo, hi]}, {int: \\[lo, hi]}, {choice: \\[a, b]}.")] = None,
    config: Annotated[Optional[Path], typer.Option(help="The base config (YAML, as mltk run takes): what every trial starts from.")] = None,
    data: Annotated[Optional[str], data_option("Training images: the folds are made of their classes (default: the base config's)")] = None,
    classes: Annotated[Optional[list[str]], classes_option("--data")] = None,
    epochs: Annotated[Optional[int], typer.Option(help="Epochs of each fold's training (default: the base config's); with --final, of the final runs (default: the search's).")] = None,
    folds: Annotated[int, typer.Option(help="Class-disjoint folds of the training classes (1: one held-out part of --holdout).")] = 4,
    holdout: Annotated[float, typer.Option(help="With --folds 1: the fraction of the training classes held out.")] = 0.25,
    trials: Annotated[int, typer.Option(help="Trials to finish (completed or pruned), by every process sharing the study.")] = 20,
    metric: Annotated[str, typer.Option(help="The objective, as mltk evaluate names it: map@r, recall@1, roc_auc, eer, ...")] = "map@r",
    sampler: Annotated[str, typer.Option(help="Optuna sampler: tpe, random, cmaes or qmc.")] = "tpe",
    pruner: Annotated[str, typer.Option(help="Stops hopeless trials on their validation recall@1: median, hyperband or none.")] = "median",
    storage: Annotated[Optional[str], typer.Option(help="A study shared by many processes or machines: an SQLAlchemy URL (postgresql://..., mysql://...); default: study.db in TUNE_DIR.")] = None,
    study: Annotated[str, typer.Option(help="The study's name in --storage.")] = "mltk-tune",
    keep_checkpoints: Annotated[bool, typer.Option("--keep-checkpoints", help="Keep each fold's checkpoints (by default deleted once it is scored).")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Go on with the search in TUNE_DIR (or join it from another process).")] = False,
    final: Annotated[bool, typer.Option("--final", help="Retrain the best settings on all training classes with --seeds seeds and score each once on --test.")] = False,
    test: Annotated[Optional[str], typer.Option(help="With --final: the test images (classes never seen by the search).")] = None,
    test_classes: Annotated[Optional[list[str]], classes_option("--test")] = None,
    seeds: Annotated[int, typer.Option(help="With --final: the seeds to train.")] = 3,
    workers: Workers = None,
    device: Device = None,
) -> None:
    """Search any mltk run setting with Optuna, scored by class-disjoint cross-validation on the training classes only.

    Then --final retrains the best with several seeds and scores each once on the test classes (mean ± 95 % interval).
    """
    from mltk import tune as tuning
    from mltk.distributed import from_environment

    if from_environment().launched:
        raise UsageError("mltk tune trains each trial in one process: start several mltk tune processes on one study (one per GPU, --device cuda:N) instead of torchrun")
    if final:
        _final(tuning, tune_dir, test, seeds, data, test_classes, epochs)
        return
    if test is not None or test_classes:
        raise UsageError("--test and --test-classes go with --final: the search itself never reads the test classes")
    if resume:
        search, tune_dir = tuning.start(None, tune_dir, resume=True)
    else:
        if space is None:
            raise UsageError("give --space SPACE.yaml (what to search over), or --resume to go on with the search in TUNE_DIR")
        search = _new_search(tuning, space, config, data, classes, epochs, folds, holdout, trials, metric, sampler, pruner, storage, study, keep_checkpoints, workers, device)
        search, tune_dir = tuning.start(search, tune_dir)
    _search(tuning, search, tune_dir)


def _new_search(tuning, space, config, data, classes, epochs, folds, holdout, trials, metric, sampler, pruner, storage, study, keep, workers, device):
    """The search the options describe, every part checked before any training: space, metric, folds, base config."""
    from mltk import config as config_mod
    from mltk.config import to_dict
    from mltk.data import load_data, select_classes

    for name, value, allowed in (("--sampler", sampler, tuning.SAMPLERS), ("--pruner", pruner, tuning.PRUNERS)):
        if value not in allowed:
            raise UsageError(f"unknown {name} {value!r}; choose {', '.join(allowed)}")
    if trials < 1 or folds < 1 or not 0 < holdout < 1:
        raise UsageError("--trials and --folds take 1 or more, --holdout a fraction between 0 and 1")
    dimensions = tuning.read_space(space)
    tuning.metric_function(metric)
    base = config_mod.resolve(config, dict(data=data, data_classes=classes, epochs=epochs, workers=workers, device=device))
    if base.val_data is not None or base.val_classes:
        raise UsageError("the base config validates on its own classes (val_data / val_classes); mltk tune makes each fold's validation classes: leave them out")
    tuning.check_names_in(dimensions, to_dict(base), space.name)
    images = load_data(base.data)
    if base.data_classes:
        images = select_classes(images, base.data_classes)
    parts = tuning.class_folds(list(images.classes), folds, base.seed, holdout)
    return tuning.Search(
        base=to_dict(base), space={n: {d.kind: list(d.values)} for n, d in dimensions.items()}, folds=parts, metric=metric,
        direction="minimize" if metric in tuning.LOWER_IS_BETTER else "maximize", sampler=sampler, pruner=pruner, trials=trials,
        storage=storage, study=study, keep_checkpoints=keep,
    )


def _search(tuning, search, tune_dir: Path) -> None:
    from rich.markup import escape
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from mltk.cli.output import console, shows_progress
    from mltk.data import load_data, select_classes

    images = load_data(search.base["data"])
    if search.base["data_classes"]:
        images = select_classes(images, search.base["data_classes"])
    best: list[float] = []
    with Progress(
        TextColumn("trial {task.fields[trial]} fold {task.fields[fold]}"), BarColumn(), TextColumn("{task.completed}/{task.total} trials"),
        TextColumn("best {task.fields[best]}"), TimeElapsedColumn(), console=console, transient=True, auto_refresh=False,
        disable=not shows_progress(),
    ) as progress:
        task = progress.add_task("tune", total=search.trials, trial="-", fold="-", best="-")

        def on_fold(number: int, fold: int, folds: int) -> None:
            progress.update(task, trial=number, fold=f"{fold + 1}/{folds}", refresh=True)

        def on_end(frozen) -> None:
            settings = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in frozen.params.items())
            state = frozen.state.name.lower()
            if state == "complete":
                best.append(frozen.value)
                shown = (min if search.direction == "minimize" else max)(best)
                progress.update(task, best=f"{shown:.4f}")
                folds = ", ".join(f"{v:.4f}" for v in frozen.user_attrs.get("folds", []))
                said = f"{search.metric} {frozen.value:.4f} (folds {folds})"
            else:
                step, recall = max(frozen.intermediate_values.items(), default=(0, float("nan")))
                said = frozen.user_attrs.get("error", "interrupted") if state == "fail" else f"stopped at step {step}, its validation recall@1 {recall:.4f} below the median of the trials before it"
            progress.console.print(escape(f"trial {frozen.number} {state}: {said}; {settings}"), highlight=False, soft_wrap=True)
            progress.update(task, completed=tuning.finished(frozen_study[0]) if frozen_study else 0, refresh=True)

        frozen_study: list = []
        told = tuning.Trial(on_fold=on_fold, on_end=on_end)
        try:
            study = tuning.open_study(search, tune_dir, create=False)
            frozen_study.append(study)
            progress.update(task, completed=tuning.finished(study), refresh=True)
            done = tuning.tune(search, tune_dir, images, told)
        except KeyboardInterrupt:
            print(f"interrupted; every finished trial is kept in {str(tune_dir)!r} (the one running is run again): go on with mltk tune {tune_dir} --resume", file=sys.stderr)
            raise typer.Exit(Interrupted.exit_code) from None
    if done.orphans:
        console.print(escape(f"trial(s) {', '.join(map(str, done.orphans))} had been left running by a process that is gone: run again"), highlight=False, soft_wrap=True)
    best_trial = tuning.best_trial(done.study)
    disk = tuning.disk_per_trial(done.study)
    if best_trial is not None:
        console.print(escape(f"best: trial {best_trial.number}, {search.metric} {best_trial.value:.4f}; {tune_dir / 'best.yaml'} runs it with mltk run --config"), highlight=False, soft_wrap=True)
    console.print(escape(f"written to {tune_dir}: trials.csv, trials.md, best.yaml, report.html; checkpoints of a fold: {disk:.1f} MiB at most, {'kept' if search.keep_checkpoints else 'deleted once scored'}"), highlight=False, soft_wrap=True)


def _final(tuning, tune_dir: Path, test: str | None, seeds: int, data: str | None, test_classes: list[str] | None, epochs: int | None) -> None:
    from rich.markup import escape

    from mltk.cli.output import console

    if test is None:
        raise UsageError("--final needs --test TEST: the test images, scored once per seed")
    if seeds < 1 or (epochs is not None and epochs < 1):
        raise UsageError("--seeds and --epochs take 1 or more")
    search, tune_dir = tuning.start(None, tune_dir, resume=True)
    done = tuning.final(search, tune_dir, test, seeds, data, test_classes, on_seed=lambda s, n: console.print(f"seed {s + 1} of {n}: training, then scoring on the test classes", highlight=False), epochs=epochs)
    for key, m in done.metrics.items():
        console.print(escape(f"{key}: {m['mean']:.4f} ± {m['half_width']:.4f}"), highlight=False, soft_wrap=True)
    console.print(escape(f"written to {tune_dir}: final.md, final.json, final/seed0..seed{seeds - 1} (mltk compare reads them)"), highlight=False, soft_wrap=True)
