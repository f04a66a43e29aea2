"""``mltk compare`` as a library: the experiment table of some run directories.

One row per run: the settings in which the runs differ, training time, images/s and the best epoch
(from metrics.jsonl), and the metrics of the run's latest ``mltk evaluate`` (its newest metrics.json);
the best value of each measured column marked. Metrics are ranked only between evaluations of the same
images, and never for an evaluation that flatters its run (on its own training classes, or of a best.pt
chosen on the classes it scored): such rows are shown, said "not ranked", and never marked best.
``compare`` returns the table as values; ``markdown`` and ``html`` write it out, ``write`` puts those files in
place whole. Every file is checked whole and every string in it is data: the renderers escape it for Markdown and
HTML (the CLI for rich).
"""

import math
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

from mltk.checkpoint import CHECKPOINT_FILES
from mltk.display import setting, shown
from mltk.errors import MltkError, UsageError
from mltk.outputs import check_file, check_replaceable, replace_files, writing
from mltk.rules import show
from mltk.run_dir import finite, read_config, read_records, read_text, strict_json

#: settings that say how a run proceeds, not what it learns: never a column
PROCEEDS = ("out", "workers", "device", "log")
#: the metrics of an evaluation shown, as metrics.json names them (mltk.metrics: f"tar@far={far:g}"), and their headers
METRICS = {"roc_auc": "ROC-AUC", "tar@far=0.001": "TAR@FAR=1e-3", "recall@1": "recall@1", "recall@4": "recall@4", "map@r": "MAP@R"}
MAX_METRICS_BYTES = 1 << 20  # evaluate's metrics.json is a few hundred bytes
#: metrics.json as mltk evaluate writes it (``mltk.evaluate.METRICS_FORMAT``): the metrics at the top level, as in the
#: flat file of an earlier mltk (no "format"), and the provenance under "evaluated"
METRICS_FORMAT = "mltk-metrics-2"
#: what compare reads of the provenance, and what each must be (``mltk.evaluate.provenance`` writes it)
EVALUATED = {
    "data": (str, "a string"), "data_fingerprint": (str, "a string"), "checkpoint": (str, "a string"),
    "classes": (int, "a count"), "images": (int, "a count"), "training_classes_evaluated": (int, "a count"),
    "checkpoint_chosen_on_evaluated_classes": (bool, "true or false"),
}
UNRANKED = "not ranked"  # how a note about rows left out of the metrics' ranking begins
MISSING = "–"
BEST = "The best of each measured column {how}: the highest; of train time, the lowest."
#: each format --out writes, by file suffix, and the mark by which a later compare knows the file as its own
FORMATS = {".md": "markdown", ".markdown": "markdown", ".html": "html", ".htm": "html"}
MARKS = {
    "markdown": "<!-- written by mltk compare; the next `mltk compare --out` to this file replaces it -->",
    "html": '<meta name="generator" content="mltk compare">',
}


# -- One run directory, read and checked.


@dataclass
class Run:
    path: Path
    config: dict  # every RunConfig field
    records: list[dict]  # metrics.jsonl, one per epoch
    evaluation: Path | None  # the latest metrics.json, None: never evaluated
    metrics: dict = field(default_factory=dict)  # its values

    @property
    def evaluated(self) -> dict | None:
        """What its latest evaluation scored (its provenance); None: not evaluated, or by an mltk that did not record it."""
        return self.metrics.get("evaluated") if self.metrics.get("format") == METRICS_FORMAT else None

    @property
    def name(self) -> str:
        return str(self.path)


def read_run(path: str | Path) -> Run:
    """A run directory's config.yaml, metrics.jsonl and latest evaluation, each checked whole; else one line."""
    path = Path(path)
    if not path.is_dir():
        raise UsageError(f"{str(path)!r} is not a run directory: {'it is a file' if path.exists() else 'there is no such folder'}")
    if not (path / "config.yaml").is_file():
        raise MltkError(f"{str(path)!r} is not a run directory: it has no config.yaml (the file mltk run writes first)")
    evaluation = latest_evaluation(path)
    return Run(path, read_config(path), read_records(path), evaluation, read_metrics(evaluation) if evaluation else {})


def latest_evaluation(run_dir: Path) -> Path | None:
    """The newest metrics.json of RUN/eval (evaluate's default) and of the other folders in RUN (``--out RUN/NAME``)."""
    try:
        folders = [entry for entry in run_dir.iterdir() if not entry.name.startswith(".")]  # not a .eval.tmp-PID being written
    except OSError as exc:
        raise MltkError(f"cannot read run directory {str(run_dir)!r}: {exc.strerror or exc}") from None
    found = [folder / "metrics.json" for folder in folders if (folder / "metrics.json").is_file()]
    return max(found, key=lambda p: (p.stat().st_mtime, p.parent.name == "eval"), default=None)


def read_metrics(path: Path) -> dict:
    """An evaluation's metrics.json, of either layout: a JSON object whose METRICS, where present, are numbers in [0, 1]
    or null, and whose provenance (the "evaluated" of ``METRICS_FORMAT``) holds what compare reads as it should."""
    try:
        values = strict_json(read_text(path, MAX_METRICS_BYTES))
    except ValueError:
        raise MltkError(f"{str(path)!r} is not valid JSON; it is not a metrics.json mltk evaluate wrote (evaluate the run again)") from None
    if not isinstance(values, dict):
        raise MltkError(f"{str(path)!r} does not hold a JSON object of metrics; it is not a metrics.json mltk evaluate wrote")
    for key in METRICS:
        value = values.get(key)
        if value is not None and not (finite(value) and 0 <= value <= 1):
            raise MltkError(f"{str(path)!r}: {key} must be a number from 0 to 1 or null, got {show(value)}")
    if "format" in values:
        check_evaluated(values, path)
    return values


def check_evaluated(values: dict, path: Path) -> None:
    """The format of a metrics.json that names one, and what compare reads of its provenance; else one line."""
    if values["format"] != METRICS_FORMAT:
        raise MltkError(f"{str(path)!r} is a metrics.json of format {show(values['format'])}, not {METRICS_FORMAT}: a newer mltk wrote it; evaluate the run again with this one")
    evaluated = values.get("evaluated")
    if not isinstance(evaluated, dict):
        raise MltkError(f"{str(path)!r}: evaluated must be an object (what the evaluation scored), got {show(evaluated)}")
    for key, (kind, what) in EVALUATED.items():
        value = evaluated.get(key)
        if value is not None and (not isinstance(value, kind) or kind is int and (isinstance(value, bool) or value < 0)):
            raise MltkError(f"{str(path)!r}: evaluated.{key} must be {what} or null, got {show(value)}")


def held_out(run: Run) -> bool:
    """The run held classes out for validation (``mltk evaluate RUN`` evaluates on them: ``evaluate.held_out_data``)."""
    return bool(run.config.get("val_data") or run.config.get("val_classes"))


def stale(run: Run) -> bool:
    """The checkpoint its latest evaluation scored (as recorded; else last.pt, which ``mltk evaluate RUN`` reads, or
    best.pt) is newer than that evaluation."""
    scored = Path((run.evaluated or {}).get("checkpoint") or "").name
    names = [scored] if scored in CHECKPOINT_FILES else CHECKPOINT_FILES  # mltk.checkpoint.find_checkpoint's order
    checkpoint = next((run.path / name for name in names if (run.path / name).is_file()), None)
    return run.evaluation is not None and checkpoint is not None and checkpoint.stat().st_mtime > run.evaluation.stat().st_mtime


def evaluate_command(run: Run) -> str:
    """The command that fills a run's metrics: on its held-out classes if it has them, else on images to name."""
    return f"mltk evaluate {shell_word(run.name)}" + ("" if held_out(run) else " --data DATA")


def shell_word(text: str) -> str:
    """``text`` as one shell word that is also safe to show: quoted, and one holding control characters (an escape,
    a line break) in bash's ``$'...'`` with each as the escape ``shown`` writes, which bash reads back as that character."""
    if shown(text) == text:
        return shlex.quote(text)
    return "$'" + shown(text.replace("\\", "\\\\").replace("'", "\\'")) + "'"


# -- What a run's metrics.jsonl says about its training.


def train_seconds(records: list[dict]) -> float | None:
    """The epochs' seconds summed (read_records bounds each, so the sum stays finite)."""
    timed = [r["seconds"] for r in records if "seconds" in r]
    return math.fsum(timed) if timed else None


def images_per_second(records: list[dict]) -> float | None:
    """Images over seconds across the epochs (not the mean of each epoch's rate)."""
    timed = [r for r in records if "seconds" in r and "images_per_s" in r]
    seconds = math.fsum(r["seconds"] for r in timed)
    return math.fsum(r["images_per_s"] * r["seconds"] for r in timed) / seconds if seconds > 0 else None


def best_epoch(records: list[dict]) -> int | None:
    """mltk run's rule: the highest validation recall@1; without validation data, the lowest training loss (first of ties)."""
    scored = [(r["val_recall@1"] if "val_recall@1" in r else -r["loss"], r["epoch"]) for r in records if "val_recall@1" in r or "loss" in r]
    return max(scored, key=lambda s: s[0])[1] if scored else None  # max keeps the first of equal scores


# -- The table.


@dataclass
class Column:
    name: str
    better: str | None = None  # "higher" or "lower": the column's best value is marked
    format: str = "text"  # how a value is written: "text", "setting", "seconds", "rate", "integer", "metric"


@dataclass
class Table:
    columns: list[Column]
    rows: list[list]  # values; None: missing
    best: set[tuple[int, int]]  # (row, column) of each marked value
    notes: list[tuple[str, str]]  # (text, command to run or ""); those on the ranking begin with UNRANKED
    runs: list[Run]
    unranked: set[int] = field(default_factory=set)  # rows whose metrics are left out of the ranking (a note says why)

    def cells(self) -> list[list[str]]:
        """Each value as text: ``MISSING`` for none, settings compact, numbers to a sensible precision."""
        return [[cell(value, column.format) for value, column in zip(row, self.columns)] for row in self.rows]

    def numeric(self) -> list[bool]:
        return [column.format in ("seconds", "rate", "integer", "metric") for column in self.columns]


TRAINING = (
    (Column("train time", "lower", "seconds"), train_seconds),
    (Column("images/s", "higher", "rate"), images_per_second),
    (Column("best epoch", format="integer"), best_epoch),
)


def compare(paths: list[str | Path]) -> Table:
    """The experiment table of the runs at ``paths``, in that order; a bad run directory is one line."""
    if not paths:
        raise UsageError("give one or more run directories to compare")
    seen: set[Path] = set()
    for path in paths:
        if Path(path).resolve() in seen:
            raise UsageError(f"run {str(path)!r} is given twice")
        seen.add(Path(path).resolve())
    runs = [read_run(path) for path in paths]
    differ = [key for key in runs[0].config if key not in PROCEEDS and any(run.config.get(key) != runs[0].config[key] for run in runs)]
    columns = [Column("run"), *(Column(key, format="setting") for key in differ), *(c for c, _ in TRAINING)]
    columns += [Column(header, "higher", "metric") for header in METRICS.values()]
    rows = [
        [run.name, *(run.config.get(key) for key in differ), *(summary(run.records) for _, summary in TRAINING), *(run.metrics.get(key) for key in METRICS)]
        for run in runs
    ]
    unranked, why = ranking(runs)
    return Table(columns, rows, marked(columns, rows, unranked), why + notes(runs), runs, unranked)


def marked(columns: list[Column], rows: list[list], unranked: set[int] = frozenset()) -> set[tuple[int, int]]:
    """The best value of each column that has one, where two runs or more have a value to compare; the values that
    read the same as it (4 places of a metric, a tenth of a second) are marked too. The ``unranked`` rows take no
    part in the metric columns."""
    best = set()
    for c, column in enumerate(columns):
        values = {r: row[c] for r, row in enumerate(rows) if row[c] is not None and not (column.format == "metric" and r in unranked)}
        if column.better is None or len(values) < 2:
            continue
        top = cell((max if column.better == "higher" else min)(values.values()), column.format)
        best |= {(r, c) for r, value in values.items() if cell(value, column.format) == top}
    return best


def ranking(runs: list[Run]) -> tuple[set[int], list[tuple[str, str]]]:
    """The rows whose metrics are not ranked, and notes saying why. An evaluation on the run's own training classes,
    or of a best.pt chosen on the classes it scored, flatters the run: its row is shown but never marked best.
    Evaluations of different images (or of images an older mltk did not record) are not comparable at all: then no
    metric is ranked. Flagging beats refusing: the table is still there to read, with what each number stands for."""
    unranked, said = set(), []
    for r, run in enumerate(runs):
        evaluated = run.evaluated or {}
        if evaluated.get("training_classes_evaluated"):
            why = (f"{shown(run.name)} was evaluated on {evaluated['training_classes_evaluated']} of its own training classes (of the "
                   f"{evaluated.get('classes')} it scored): its metrics say how well it learnt them, not how it does on new classes")
        elif evaluated.get("checkpoint_chosen_on_evaluated_classes"):
            why = f"{shown(run.name)}'s evaluation scored best.pt, chosen by validation recall@1 on the very classes it scored: its metrics flatter it"
        else:
            continue
        unranked.add(r)
        said.append((f"{UNRANKED}: {why}; to evaluate it on classes it did not learn from, with last.pt: ", evaluate_command(run)))
    rest = [r for r, run in enumerate(runs) if run.evaluation is not None and r not in unranked]
    groups: dict[str | None, list[int]] = {}
    for r in rest:
        groups.setdefault((runs[r].evaluated or {}).get("data_fingerprint"), []).append(r)
    if len(groups) > 1:
        unranked |= set(rest)
        sets = "; ".join(f"{', '.join(shown(runs[r].name) for r in rows)} {images_of(runs[rows[0]].evaluated)}" for rows in groups.values())
        said.append((f"{UNRANKED}: no metric, since the runs were evaluated on different images ({sets}); evaluate them all on the same images to rank them: ", "mltk evaluate RUN --data DATA"))
    return unranked, said


def images_of(evaluated: dict | None) -> str:
    """The images an evaluation scored, in a few words, from its provenance."""
    if evaluated is None or evaluated.get("data_fingerprint") is None:
        return "on images not recorded (an earlier mltk evaluated it)"
    counts = ", ".join(f"{evaluated[key]} {key}" for key in ("classes", "images") if evaluated.get(key) is not None)
    if evaluated.get("pairs"):
        named = f"the pair list {evaluated['pairs']}"
    elif evaluated.get("query"):
        named = f"query {evaluated['query']} vs gallery {evaluated.get('gallery')}"
    else:
        named = str(evaluated.get("data"))
    return f"on {shown(named)}{f' ({counts})' if counts else ''}"


def notes(runs: list[Run]) -> list[tuple[str, str]]:
    """What the missing values mean and which command fills them."""
    found = []
    for run in runs:
        if run.evaluation is None:
            data = "" if held_out(run) else " (DATA: images of classes it did not train on)"
            found.append((f"{shown(run.name)}: not evaluated yet ({MISSING}); to fill it{data}: ", evaluate_command(run)))
        elif stale(run):
            found.append((f"{shown(run.name)}: its latest evaluation, {shown(run.evaluation)}, is older than its checkpoint (trained again since); to bring it up to date: ", evaluate_command(run)))
        if run.evaluation is not None and (lacking := [header for key, header in METRICS.items() if run.metrics.get(key) is None]):
            found.append((f"{shown(run.name)}: {', '.join(lacking)} {MISSING}: not in {shown(run.evaluation)} (an evaluation on a pair list, of some --metrics, or of a set too small for them)", ""))
        if not run.records:
            why = "not trained (epochs: 0, the backbone as it was)" if run.config.get("epochs") == 0 else "no epoch finished yet"
            found.append((f"{shown(run.name)}: {why} ({MISSING} for its training)", ""))
    if any(run.records and "val_recall@1" not in run.records[0] for run in runs):
        found.append(("best epoch: the highest validation recall@1, or the lowest training loss for a run without validation data", ""))
    return found


def cell(value, format: str) -> str:
    """One value of the table as text (a setting of None is the setting none, not a missing value)."""
    if format == "setting":
        return setting(value, limit=60)
    if value is None:
        return MISSING
    if format == "seconds":
        return duration(value)
    if format == "rate":
        return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"
    if format == "metric":
        return f"{value:.4f}"
    return shown(value)


def duration(seconds: float) -> str:
    """12.3 s, 4 min 05 s, 2 h 07 min."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes = int(seconds // 60)
    return f"{minutes} min {int(seconds % 60):02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"


# -- Writing it out: Markdown, and an HTML page with every run's training curves.


def markdown(table: Table) -> str:
    """The table as Markdown (a pipe table like the experiment table's), the best of each column in bold, the notes under it."""
    cells = table.cells()
    align = ["---:" if numeric else ":---" for numeric in table.numeric()]
    lines = [MARKS["markdown"], "", _row(md_text(c.name) for c in table.columns), _row(align)]
    for r, row in enumerate(cells):
        lines.append(_row(f"**{md_text(value)}**" if (r, c) in table.best else md_text(value) for c, value in enumerate(row)))
    lines += ["", BEST.format(how="in **bold**")]
    lines += [f"- {md_text(text)}{md_code(command) if command else ''}" for text, command in table.notes]
    return "\n".join(lines) + "\n"


def _row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


_MD_SPECIAL = re.compile(r"([\\`*\[\]<>|~$&#!])")


def md_text(text: object) -> str:
    """A string as Markdown text, never markup: the characters Markdown reads (and ``_`` that could start or end emphasis) escaped."""
    escaped = _MD_SPECIAL.sub(r"\\\1", shown(text))
    return re.sub(r"(?<![0-9A-Za-z])_|_(?![0-9A-Za-z])", r"\\_", escaped)


def md_code(text: str) -> str:
    """A code span holding ``text`` as it is, fenced by more backquotes than it holds in a row."""
    text = shown(text).replace("|", "\\|")  # inside a code span, GitHub still reads | as a cell border
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def html(table: Table, title: str = "mltk compare") -> str:
    """A self-contained page: the table (best marked; a click on a column sorts the runs by it, numbers by their values,
    not their text), its notes, and every run's loss and validation recall@1 by epoch."""
    from mltk import report

    figures = {}
    if any(run.records for run in table.runs):
        figures["Training curves"] = report.training_curves({run.name: run.records for run in table.runs})
    notes = [(BEST.format(how="in green") + " Click a column to sort the runs by it.", ""), *table.notes]
    return report.table_page(title, [c.name for c in table.columns], table.cells(), table.numeric(), table.best, notes, figures, generator="mltk compare", keys=table.rows)


def check_outputs(outs: list[str | Path], runs: list[str | Path] = ()) -> list[tuple[Path, str]]:
    """Each --out with its format, before any work: a .md or .html name, not given twice, none of the ``runs`` read,
    and new or a file an earlier ``mltk compare`` wrote (which is replaced); else one line."""
    checked, seen = [], set()
    for out in outs:
        out = check_file(out, example="runs.md")
        fmt = FORMATS.get(out.suffix.lower())
        if fmt is None:
            raise UsageError(f"--out {str(out)!r}: give a file name ending in .md (Markdown) or .html (a page with the training curves)")
        if out.resolve() in seen:
            raise UsageError(f"--out {str(out)!r} is given twice")
        seen.add(out.resolve())
        check_replaceable(
            out, {"the run": runs}, advice="give a new file name",
            mine=lambda path: None if not os.path.lexists(path) or written_by_compare(path, fmt) else "exists and is not a table mltk compare wrote",
        )
        checked.append((out, fmt))
    return checked


def written_by_compare(path: Path, fmt: str) -> bool:
    """``path`` is a file whose beginning holds the mark ``mltk compare`` writes there."""
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(1024).decode("utf-8", errors="replace")
    except OSError:
        return False
    return head.startswith(MARKS[fmt]) if fmt == "markdown" else MARKS[fmt] in head


def write(table: Table, outputs: list[tuple[Path, str]]) -> None:
    """Every page written whole, then all renamed into place together (``outputs.replace_files``): an earlier page is
    replaced, and a failure leaves each as it was."""
    pages = [(out, out.resolve(), html(table) if fmt == "html" else markdown(table)) for out, fmt in outputs]  # a link: the file it names
    nothing = "nothing was written (a file there earlier is as it was)"
    for out, path, _ in pages:
        with writing(repr(str(out)), nothing):
            path.parent.mkdir(parents=True, exist_ok=True)
    with replace_files([path for _, path, _ in pages], " and ".join(repr(str(out)) for out, _, _ in pages), nothing) as tmps:
        for (out, _, text), tmp in zip(pages, tmps):
            with writing(repr(str(out)), nothing):  # a full disk: stop here, naming the page
                tmp.write_text(text, encoding="utf-8")
