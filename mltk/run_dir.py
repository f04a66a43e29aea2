"""What a run directory is: the files ``mltk run`` writes there, the one process that holds it, and
what resuming it keeps.

A run directory belongs to one run. ``RunDirectory`` checks it before the data is read, makes it
only once every part of the run is built, and holds it (an exclusive flock on the folder itself)
while the run writes there. ``resumed_config`` decides which settings a resume may change.
The files themselves are written whole: a temporary renamed into place.
"""

import itertools
import json
import math
import os
import shutil
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from mltk.checkpoint import CHECKPOINT_FILES, CHECKPOINTS
from mltk.config import RULES, RunConfig, check_values, load_yaml, make_config, save_yaml, to_dict
from mltk.errors import MltkError, UsageError
from mltk.outputs import check_dir, check_replaceable, replace_file, stale_temporaries
from mltk.rules import Number, show

try:
    import fcntl
except ImportError:  # Windows: no flock; a run directory is then not held
    fcntl = None



RUN_FILES = (*CHECKPOINT_FILES, "metrics.jsonl", "config.yaml", "skipped_images.txt")  # all mltk run writes
RUN_FOLDERS = ("tensorboard",)  # what mltk's own loggers write (--log tensorboard)
NEEDS_LAST_PT = "--resume needs --out RUN_DIR of a run that has a last.pt"
_HELD: set[int] = set()  # descriptors of the run directories this process holds


def _release_in_child() -> None:
    """A forked child (a DataLoader worker) lets go of its parent's folders: a kill -9 of the run frees them at once."""
    for fd in _HELD:
        os.close(fd)
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_release_in_child)


class RunDirectory:
    """The folder a run writes, which belongs to that run: checked before the data is read, made only once the
    run is ready, and held by one process at a time (an exclusive flock on the folder itself: no lock file).

    A folder that holds a run (any of RUN_FILES) is refused unless ``resume`` goes on with it or ``overwrite``
    starts it over (removing RUN_FILES and RUN_FOLDERS, nothing else, and none of the run's ``inputs``). ``path=None``: a new folder runs/<time>, -2, -3 ... when
    that is taken. ``main=False`` (torchrun's other ranks): nothing is checked, held or written.
    """

    def __init__(self, path: str | Path | None, resume: bool = False, overwrite: bool = False, main: bool = True, inputs: dict | None = None):
        self.fresh = path is None
        self.path = Path("runs") / time.strftime("%Y%m%d-%H%M%S") if path is None else Path(path)
        self.resume, self.overwrite, self.main = resume, overwrite, main
        self.inputs = inputs  # {role: path} the run reads: ``overwrite`` may not delete one of them
        self.fd: int | None = None

    def __enter__(self) -> "RunDirectory":
        """Before the data is read: a folder that can be written, free, and holding a run only when told."""
        if self.main:
            check_dir(self.path)
            if self.fresh and self.resume:
                raise MltkError(NEEDS_LAST_PT)
            if not self.fresh:  # (a new folder has nothing to check)
                try:
                    with self.checking():
                        if self.path.is_dir():
                            self.hold()
                        self.check()
                except BaseException:
                    self.__exit__()  # a refused folder is not held: ``with`` calls __exit__ only after __enter__ returns
                    raise
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            _HELD.discard(self.fd)
            os.close(self.fd)
            self.fd = None

    def make(self) -> Path:
        """Make (or claim) the folder, now that every part of the run is built: the run's first write."""
        if self.main:
            with self.checking():
                if self.fresh:
                    self.path = self.new_folder(self.path)
                else:
                    self.path.mkdir(parents=True, exist_ok=True)
                self.hold()
                self.check()  # again, under the lock: another run may have come and gone since the start
                for name in RUN_FILES:  # a kill -9 left these half-written; a live process's are left alone
                    for stale in stale_temporaries(self.path, name):
                        if ".tmp-" in stale.name and not stale.is_dir():
                            stale.unlink(missing_ok=True)
                    if self.overwrite:
                        (self.path / name).unlink(missing_ok=True)
                if self.overwrite:
                    for name in RUN_FOLDERS:
                        shutil.rmtree(self.path / name, ignore_errors=True)
        return self.path

    @staticmethod
    def new_folder(base: Path) -> Path:
        """``base``, or ``base-2``, ``base-3`` ...: the first that this process creates (atomic: two runs started in
        the same second never share one)."""
        base.parent.mkdir(parents=True, exist_ok=True)
        for n in itertools.count(1):
            path = base if n == 1 else base.with_name(f"{base.name}-{n}")
            try:
                path.mkdir()
                return path
            except FileExistsError:
                continue

    def hold(self) -> None:
        """The folder's lock, taken without waiting: a second process on it stops here, having touched nothing."""
        if self.fd is not None or fcntl is None:
            return
        fd = os.open(self.path, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise MltkError(
                f"--out {str(self.path)!r} is in use by another mltk run (it holds the folder); "
                f"wait for that run to end, or give another --out"
            ) from None
        self.fd = fd
        _HELD.add(fd)

    def check(self) -> None:
        """A run to resume has a last.pt; any other run there is started over only when told (``overwrite``)."""
        if self.resume:
            if not (self.path / CHECKPOINTS["last"]).is_file():
                raise MltkError(NEEDS_LAST_PT)
            return
        if self.overwrite:  # mltk replaces only what it wrote, never its own input: --config RUN/config.yaml is read, not started over
            check_replaceable(self.path, self.inputs, replaces=[self.path / name for name in (*RUN_FILES, *RUN_FOLDERS)], advice="copy it out of the run directory first, or give another --out")
        found = [name for name in RUN_FILES if os.path.lexists(self.path / name)]
        if found and not self.overwrite:
            raise MltkError(
                f"--out {str(self.path)!r} already holds a run ({', '.join(found)}): "
                f"add --resume to go on with it, --overwrite to start it over, or give another --out"
            )

    @contextmanager
    def checking(self):
        try:
            yield
        except OSError as exc:  # e.g. a folder that cannot be read or locked, a best.pt that is a folder
            raise MltkError(f"cannot use --out {str(self.path)!r}: {exc.strerror or exc}") from None


RESUMABLE = ("epochs", "workers", "in_memory", "device", "out", "log", "early_stop")  # how a run proceeds, not what it learns: a resume may change these
LEFT_OPEN = ("image_size", "m_per_class", "amp")  # None means not chosen: a resume takes the run's own


def resumed_config(cfg: RunConfig, state: dict, path: Path) -> RunConfig:
    """The settings a resumed run goes on with: the run's own (its last.pt's), but RESUMABLE ones from ``cfg``.

    Any other setting given with another value is refused: the run would record one thing and do another.
    """
    run_cfg = make_config(state["config"], source=f"checkpoint {str(path)!r}")
    own, given = to_dict(run_cfg), to_dict(cfg)
    differ = [k for k in own if k not in RESUMABLE and given[k] != own[k] and not (k in LEFT_OPEN and given[k] is None)]
    if differ:
        shown = ", ".join(f"{k} {given[k]!r} (the run has {own[k]!r})" for k in differ)
        raise UsageError(
            f"cannot resume {str(path.parent)!r} with {shown}: a resumed run keeps its settings, only epochs, workers, in_memory, "
            f"device, log and early_stop may change; leave the others out, or start a new run in another --out"
        )
    if cfg.epochs < state["epoch"]:
        done = state["epoch"]
        raise UsageError(f"--epochs {cfg.epochs} is fewer than the epochs {str(path)!r} holds ({done}); a resumed run goes on: give --epochs {done} or more")
    return replace(run_cfg, **{k: given[k] for k in RESUMABLE})



def read_history(run_dir: Path) -> list[dict]:
    """metrics.jsonl's records; a line cut short by a killed process is dropped (its epoch is redone)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):  # anything else is not a record of ours
            records.append(record)
    return records


# -- Reading a finished (or running) run directory for a table or a report: every file checked whole.

MAX_HISTORY_BYTES = 64 << 20  # metrics.jsonl: a line per epoch, a few hundred bytes each
#: what tables and curves read from a record, each in the range mltk run writes it in: a value past it is not a run's
#: (and near the float limit, sums and plot axes overflow)
NUMBERS = {
    "loss": Number(-3.4028234663852886e38, 3.4028234663852886e38, what="a finite number (a float32: what training computes)"),
    "seconds": Number(0, 1e8, what="a number in [0, 1e8] (an epoch's seconds)"),
    "images_per_s": Number(0, 1e9),
    "val_recall@1": Number(0, 1),
}


def run_of(path: str | Path) -> Path | None:
    """The run directory ``path`` is (one with a config.yaml) or whose best.pt / last.pt it is; None for any other."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent if path.name in CHECKPOINT_FILES else None
    return folder if folder is not None and (folder / "config.yaml").is_file() else None


def read_config(run_dir: Path) -> dict:
    """config.yaml as a dict of every RunConfig field, each value checked by its rule (no plugin is loaded: a run of a
    backbone that is not installed here still reads)."""
    path = Path(run_dir) / "config.yaml"
    return to_dict(RunConfig(**check_values(load_yaml(path), f"config file {str(path)!r}")))


def read_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl, checked whole: one JSON object per line, epochs counting up from 1 to the most a run has, NUMBERS
    numbers in their ranges.

    Only a last line without its newline may be cut short (a run being written, or killed): it is left out.
    No metrics.jsonl: no epoch finished yet, ``[]``.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not os.path.lexists(path):
        return []
    text = read_text(path, MAX_HISTORY_BYTES)
    lines = text.split("\n")
    records: list[dict] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = strict_json(line)
        except ValueError:
            if number == len(lines):  # the last line, cut short
                break
            raise MltkError(f"{str(path)!r} line {number} is not JSON; it is not a metrics.jsonl mltk run wrote") from None
        epoch, after = record.get("epoch") if isinstance(record, dict) else None, records[-1]["epoch"] if records else 0
        if not (type(epoch) is int and after < epoch <= RULES["epochs"].hi):
            raise MltkError(
                f"{str(path)!r} line {number} is not an epoch record after the one before it "
                f"(an object with epoch {after + 1} to {RULES['epochs'].hi:g}); it is not a metrics.jsonl mltk run wrote"
            )
        for key, rule in NUMBERS.items():
            if key in record and not (finite(record[key]) and rule.lo <= record[key] <= rule.hi):
                raise MltkError(f"{str(path)!r} line {number}: {key} must be {rule}, got {show(record[key])}")
        records.append(record)
    return records


def read_text(path: Path, limit: int) -> str:
    """The text of a file mltk wrote, at most ``limit`` bytes; else one line saying what is wrong with it."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise MltkError(f"cannot read {str(path)!r}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise MltkError(f"{str(path)!r} is larger than {limit >> 20} MiB; it is not a file mltk wrote")
    return data.decode("utf-8", errors="replace")


def finite(value) -> bool:
    """A JSON number that is finite (true and false are not numbers)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def strict_json(text: str):
    """``json.loads`` of strict JSON: NaN and Infinity, and nesting deeper than Python's stack, are a ValueError too."""
    def refuse(name: str):
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(text, parse_constant=refuse)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def write_history(run_dir: Path, records: list[dict]) -> None:
    """metrics.jsonl, whole or not at all (``outputs.replace_file``)."""
    with replace_file(run_dir / "metrics.jsonl") as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))


def write_config(cfg: RunConfig, path: Path) -> None:
    """config.yaml, whole or not at all (``outputs.replace_file``)."""
    with replace_file(path) as tmp:
        save_yaml(cfg, tmp)
