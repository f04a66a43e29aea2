"""Output paths: checked before the work starts, written whole or not at all.

Every command that writes (run, evaluate, index, export, compare) follows one rule, written here
as ``check_replaceable``: **mltk replaces only what it wrote, never its own input.** Each asks
``check_dir`` or ``check_file`` and ``check_replaceable`` first, so a bad ``--out`` is one line
before any image is read, and writes through ``temporary`` names that are renamed into place at
the end. ``stale_temporaries`` finds what a killed process left behind, so a later run can remove it.
"""

import errno
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path

from mltk.errors import MltkError


def _blocker(path: Path) -> Path | None:
    """The first existing ancestor of ``path`` that is not a folder (nothing can be made under it), as the user named it."""
    return next((p for p in reversed(path.parents) if p.exists() and not p.is_dir()), None)


def _check_under(path: Path, what: str, folder: Path) -> None:
    """``folder`` (``path`` or its parent) lets mltk make ``path``: no file in the way, the nearest existing folder writable."""
    blocker = _blocker(path)
    if blocker is not None:
        raise MltkError(f"cannot write {what} {str(path)!r}: {str(blocker)!r} is a file, not a folder")
    base = next(p for p in [folder, *folder.parents, Path.cwd()] if p.exists())
    if not os.access(base, os.W_OK | os.X_OK):
        raise MltkError(f"cannot write {what} {str(path)!r}: {str(base)!r} is not writable")


def check_dir(path: str | Path, what: str = "--out") -> Path:
    """``path`` can be a folder mltk writes into: it is one, or can be made; else one MltkError line."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MltkError(f"{what} {str(path)!r} is a file, not a folder; give a folder")
    _check_under(path, what, path)
    return path


def check_file(path: str | Path, what: str = "--out", example: str = "model.onnx") -> Path:
    """``path`` can be a file mltk writes: not a folder, and its folder exists or can be made; else one MltkError line
    (for a folder, suggesting ``example`` in it)."""
    path = Path(path)
    if path.is_dir():
        raise MltkError(f"{what} {str(path)!r} is a folder; give a file name, e.g. {str(path / example)!r}")
    _check_under(path, what, path.parent)
    return path


def check_replaceable(
    out: str | Path,
    inputs: Mapping[str, str | Path | Iterable[str | Path] | None] | None = None,
    mine: Callable[[Path], str | None] | None = None,
    what: str = "--out",
    replaces: Iterable[Path] | None = None,
    advice: str | None = None,
) -> None:
    """The rule of every command that writes: mltk replaces only what it wrote, never its own input.

    ``replaces`` are the paths the command will replace or delete (default: ``out`` itself, a file or
    a folder replaced whole). None of them may be one of the command's ``inputs`` (``{role: path or
    paths}``; a link counts as what it names), nor hold one. ``mine(path)`` says whether the command
    may write each: None when the path is free or provably the command's own earlier output, else what
    it is instead ("exists and is not a table mltk compare wrote"). Else one MltkError line, ending in
    ``advice`` (default: give another ``what``), before any work, and nothing is touched.
    """
    out = Path(out)
    replaced = [Path(p) for p in replaces] if replaces is not None else [out]
    advice = advice or f"give another {what}"
    for role, paths in (inputs or {}).items():
        for source in [paths] if isinstance(paths, (str, Path)) else paths or ():
            for target in replaced:
                relation = _relation(target, Path(source))
                if relation is not None:
                    which = "" if target == out else f" would replace {str(target)!r}, which"
                    raise MltkError(
                        f"{what} {str(out)!r}{which} {relation} {role} {str(source)!r}, an input of this command; "
                        f"mltk never replaces its own input: {advice}"
                    )
    if mine is not None:
        for target in replaced:
            problem = mine(target)
            if problem is not None:
                which = "" if target == out else f" would replace {str(target)!r}, which"
                raise MltkError(f"{what} {str(out)!r}{which} {problem}; mltk replaces only what it wrote: {advice}")


def _relation(target: Path, source: Path) -> str | None:
    """"is" when ``target`` is ``source`` (the same file, by any name), "holds" when ``source`` lies inside ``target``, else None."""
    if not os.path.lexists(source):
        return None
    try:
        if os.path.lexists(target) and os.path.samefile(target, source):
            return "is"
    except OSError:  # a link to nowhere: compared by name below
        pass
    real_target, real_source = Path(os.path.realpath(target)), Path(os.path.realpath(source))
    if real_source == real_target:
        return "is"
    return "holds" if real_source.is_relative_to(real_target) else None


def temporary(path: Path) -> Path:
    """A hidden sibling of ``path`` for writing it in full before a rename: ``.NAME.tmp-PID``."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def aside(path: Path) -> Path:
    """A hidden sibling of ``path`` where its earlier version waits while the new one is renamed in: ``.NAME.old-PID``."""
    return path.with_name(f".{path.name}.old-{os.getpid()}")


_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?:tmp|old)-(?P<pid>\d+)$")


def stale_temporaries(folder: Path, name: str | None = None) -> list[Path]:
    """Hidden ``.NAME.tmp-PID`` / ``.NAME.old-PID`` entries in ``folder`` whose process is gone (a kill left them)."""
    if not folder.is_dir():
        return []
    found = []
    for entry in folder.iterdir():
        match = _TEMPORARY.match(entry.name)
        if match and (name is None or match["name"] == name) and not process_alive(int(match["pid"])):
            found.append(entry)
    return sorted(found)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine is running (another user's counts)."""
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


@contextmanager
def writing(name: str, kept: str):
    """An OSError while writing ``name`` (a full disk) is one line that says what is still intact."""
    try:
        yield
    except OSError as exc:
        raise disk_error(exc, name, kept) from None


@contextmanager
def replace_file(path: str | Path, writing: str | None = None, kept: str = ""):
    """A hidden sibling of ``path`` (``temporary``) to write a whole file into, renamed over ``path`` when the block ends.

    The one way mltk writes a file whole (checkpoints, a run's records, streamed embeddings): ``replace_files`` for
    one file. ``path`` holds the earlier version or the new one, never part of either.
    """
    with replace_files([path], writing, kept) as (tmp,):
        yield tmp


@contextmanager
def replace_files(paths: Sequence[str | Path], writing: str | None = None, kept: str = ""):
    """Hidden siblings of ``paths`` (``temporary``) to write whole files into, all renamed into place when the block
    ends, or none: files that belong together (compare's pages, an export and its FILE.json) are never half-replaced.

    What killed processes left beside them is removed first. Each file is flushed to disk before the renames, so a
    crash after them keeps it whole. When a rename fails, the files already renamed are put back as they were (an
    earlier version from a second name made for it, a new one removed). If the block fails or is interrupted, the
    siblings go and every path is as it was. An OSError (a full disk) is one line, ``disk_error(exc, writing,
    kept)``; with no ``writing``, it goes to the caller, who says what is intact.
    """
    paths = [Path(p) for p in paths]
    for path in paths:
        for stale in stale_temporaries(path.parent, path.name):
            stale.unlink(missing_ok=True)
    tmps = [temporary(path) for path in paths]
    backups: list[Path] = []
    try:
        try:
            yield tmps
            for tmp in tmps:
                _flush(tmp)
            if len(paths) > 1:  # a second name for each earlier file, to put back if a later rename fails
                backups = [_second_name(path) for path in paths if path.exists()]
            _rename_all(tmps, paths)
        except OSError as exc:
            if writing is None:
                raise
            raise disk_error(exc, writing, kept) from None
    finally:
        for leftover in tmps + backups:
            leftover.unlink(missing_ok=True)


def _second_name(path: Path) -> Path:
    backup = aside(path)
    try:
        os.link(path, backup)
    except OSError:  # a file system without hard links
        shutil.copy2(path, backup)
    return backup


def _rename_all(tmps: list[Path], paths: list[Path]) -> None:
    """Each temporary over its path, in order; if one fails, those before it are undone and the error goes on."""
    for i, (tmp, path) in enumerate(zip(tmps, paths)):
        try:
            os.replace(tmp, path)
        except BaseException:
            for done in paths[:i]:
                backup = aside(done)
                if backup.exists():
                    os.replace(backup, done)
                else:
                    done.unlink(missing_ok=True)
            raise


def _flush(path: Path) -> None:
    """What was written to ``path`` is on the disk, not only in the cache: a crash after the rename keeps it whole."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def replace_folder(out: str | Path, writing: str, kept: str, recheck: Callable[[], None] | None = None, exclusive: bool = False):
    """A hidden sibling of ``out`` (``.NAME.tmp-PID``) to write a whole folder into, renamed to ``out`` when the block ends.

    The one way mltk writes a folder whole (evaluate, index, embed, data fetch). What killed processes left beside
    ``out`` is removed first. ``recheck()`` runs just before the swap: files a user put into ``out`` meanwhile are
    theirs, and it refuses. An earlier ``out`` is moved aside, renamed over, then removed (put back if the rename
    fails); a link to a folder stays a link, its folder is replaced. If the block fails or is interrupted, the sibling
    and the folders made for it go, and ``out`` is as it was. A full disk in the block, and any OSError while the
    folder is made or swapped in, is one line: ``disk_error(exc, writing, kept)``.
    """
    out = Path(out).resolve()
    restore_aside(out)
    for stale in stale_temporaries(out.parent, out.name):
        _remove(stale)
    made = [p for p in out.parents if not p.exists()]  # the deepest first: removed again if nothing comes of it
    tmp = temporary(out)
    try:
        _step(lambda: tmp.mkdir(parents=True), writing, kept)
        try:
            yield tmp
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise disk_error(exc, writing, kept) from None
            raise
        with locked_folder(out, exclusive=True) if exclusive and out.is_dir() else nullcontext():
            if recheck is not None:
                recheck()
            _step(lambda: _swap_in(tmp, out), writing, kept)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for folder in made:  # one that holds something now is kept
            try:
                folder.rmdir()
            except OSError:
                break
        raise


@contextmanager
def locked_folder(path: str | Path, exclusive: bool = False, tries: int = 100):
    """Hold the version of the folder ``path`` that is there now: shared, to read its files as one whole, or exclusive,
    to replace it (one writer at a time, and no reader in the middle of its files while it is swapped).

    A folder is replaced by swapping a new one in (``replace_folder``), never edited in place, so the lock is taken on
    the folder itself (``flock``), then ``path`` is checked to still name it: a version swapped out while this waited
    is let go and the new one taken. Where there is no ``flock`` (Windows), nothing is locked."""
    try:
        import fcntl
    except ImportError:
        yield Path(path)
        return
    path = Path(path)
    for _ in range(tries):
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except OSError as exc:
            raise MltkError(f"cannot open folder {str(path)!r}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            held = os.fstat(fd)
            try:
                now = os.stat(path)
            except FileNotFoundError:
                now = None
            if now is not None and (now.st_ino, now.st_dev) == (held.st_ino, held.st_dev):
                yield path
                return
        finally:
            os.close(fd)  # the lock goes with it
    raise MltkError(f"folder {str(path)!r} was replaced {tries} times while mltk waited to read it; try again when it is quiet")


def _step(step: Callable[[], None], writing: str, kept: str) -> None:
    try:
        step()
    except OSError as exc:
        raise disk_error(exc, writing, kept) from None


def _swap_in(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``, which a kill at any moment leaves as it was or as it is after.

    On Linux the two folders are exchanged in one step (``exchange``), and ``tmp`` then holds the earlier ``out`` and is
    removed. Elsewhere the earlier ``out`` is moved aside first, then removed (put back if the rename fails); a kill
    between the two renames leaves it aside, and ``restore_aside`` puts it back."""
    if out.exists() and exchange(tmp, out):
        shutil.rmtree(tmp, ignore_errors=True)
        return
    old = aside(out)
    if out.exists():
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except OSError:
        if old.exists():
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def exchange(a: Path, b: Path) -> bool:
    """Swap the entries ``a`` and ``b`` of one file system in one atomic step (Linux's renameat2 with RENAME_EXCHANGE);
    False where the system or the file system cannot, and nothing was changed."""
    global _renameat2
    if _renameat2 is None:
        _renameat2 = _find_renameat2()
    if not _renameat2:
        return False
    import ctypes

    at_fdcwd, rename_exchange = -100, 2
    if _renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):  # not offered here: the two-rename way
        return False
    raise OSError(code, os.strerror(code), str(b))


_renameat2 = None  # libc's renameat2 once looked up; False where there is none


def _find_renameat2():
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return False
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def restore_aside(out: Path) -> None:
    """Put back the earlier version of ``out`` that a killed two-rename swap left aside (``.NAME.old-PID``) with nothing
    at ``out``: the kill came between its two renames, and that version is the one to keep."""
    if os.path.lexists(out):
        return
    left = [p for p in stale_temporaries(out.parent, out.name) if p.name.startswith(f".{out.name}.old-")]
    if left:
        os.replace(left[-1], out)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)
