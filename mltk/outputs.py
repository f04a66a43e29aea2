"""Output paths: checked before the work starts, written whole or not at all.

Every command that writes (run, evaluate, index, export) asks ``check_dir`` or ``check_file``
first, so a bad ``--out`` is one line before any image is read, and writes through
``temporary`` names that are renamed into place at the end. ``stale_temporaries`` finds what a
killed process left behind, so a later run can remove it.
"""

import errno
import os
import re
from pathlib import Path

from mltk.errors import MltkError


def _blocker(path: Path) -> Path | None:
    """The first existing ancestor of ``path`` that is not a folder (nothing can be made under it)."""
    return next((p for p in reversed(path.absolute().parents) if p.exists() and not p.is_dir()), None)


def _writable_ancestor(path: Path) -> Path:
    return next(p for p in [path, *path.absolute().parents] if p.exists())


def check_dir(path: str | Path, what: str = "--out") -> Path:
    """``path`` can be a folder mltk writes into: it is one, or can be made; else one MltkError line."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MltkError(f"{what} {str(path)!r} is a file, not a folder; give a folder")
    blocker = _blocker(path)
    if blocker is not None:
        raise MltkError(f"cannot write {what} {str(path)!r}: {str(blocker)!r} is a file, not a folder")
    base = _writable_ancestor(path)
    if not os.access(base, os.W_OK | os.X_OK):
        raise MltkError(f"cannot write {what} {str(path)!r}: {str(base)!r} is not writable")
    return path


def check_file(path: str | Path, what: str = "--out") -> Path:
    """``path`` can be a file mltk writes: not a folder, its folder exists or can be made; else one MltkError line."""
    path = Path(path)
    if path.is_dir():
        raise MltkError(f"{what} {str(path)!r} is a folder; give a file name, e.g. {str(path / 'model.onnx')!r}")
    check_dir(path.parent, what=f"the folder of {what}")
    return path


def temporary(path: Path) -> Path:
    """A hidden sibling of ``path`` for writing it in full before a rename: ``.NAME.tmp-PID``."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)$")


def stale_temporaries(folder: Path, name: str | None = None) -> list[Path]:
    """Hidden ``.NAME.tmp-PID`` / ``.NAME.old-PID`` entries in ``folder`` whose process is gone (a kill left them)."""
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = _TEMPORARY.match(entry.name)
        if match and (name is None or match["name"] == name) and not _alive(int(match["pid"])):
            found.append(entry)
    return sorted(found)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def disk_error(exc: OSError, writing: str, kept: str = "") -> MltkError:
    """One line for an OSError while writing: a full disk or quota said as such, then what is still intact."""
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        reason = "no space left on device"
    else:
        reason = exc.strerror or str(exc)
    return MltkError(f"{reason} writing {writing}{'; ' + kept if kept else ''}")
