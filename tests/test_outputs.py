"""mltk.outputs: the rule every command that writes follows — mltk replaces only what it wrote, never its own input —
and what a folder mltk cannot write into gives."""

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO, make_image_folder

from mltk.errors import MltkError
from mltk.outputs import check_replaceable


def test_an_output_that_is_an_input_by_any_name_is_refused(tmp_path):
    data = make_image_folder(tmp_path / "images", classes=2, per_class=1)
    (tmp_path / "link").symlink_to(data)
    os.link(data / "class_00" / "0.png", tmp_path / "hard.png")
    cases = [
        (data, "is --data"),  # the folder itself
        (tmp_path / "link", "is --data"),  # a link to it
        (tmp_path, "holds --data"),  # a folder replaced whole, with the input inside
        (tmp_path / "hard.png", "is --data"),  # another name of the same file
    ]
    for out, expected in cases:
        source = data / "class_00" / "0.png" if out.name == "hard.png" else data
        with pytest.raises(MltkError, match=f"--out '{out}' {expected} '{source}', an input of this command; mltk never replaces its own input: give another --out$"):
            check_replaceable(out, {"--data": source})
    check_replaceable(tmp_path / "new", {"--data": data, "--weights": None, "--config": "cub200:/not/a/path"})  # beside the input: fine


def test_only_what_the_command_says_is_its_own_is_replaced(tmp_path):
    (tmp_path / "theirs.md").write_text("the user's notes")
    (tmp_path / "ours.md").write_text("<!-- ours -->")
    mine = lambda path: None if not path.exists() or path.read_text().startswith("<!-- ours") else "exists and is not ours"  # noqa: E731
    check_replaceable(tmp_path / "ours.md", mine=mine)
    check_replaceable(tmp_path / "new.md", mine=mine)
    with pytest.raises(MltkError, match=r"--out '.*/theirs.md' exists and is not ours; mltk replaces only what it wrote: give a new name$"):
        check_replaceable(tmp_path / "theirs.md", mine=mine, advice="give a new name")
    with pytest.raises(MltkError, match=r"--out '.*/ours.md' would replace '.*/theirs.md', which exists and is not ours"):
        check_replaceable(tmp_path / "ours.md", mine=mine, replaces=[tmp_path / "ours.md", tmp_path / "theirs.md"])


NON_ROOT = textwrap.dedent("""
    import contextlib, io, sys
    from mltk.cli import main
    for args in sys.argv[1:]:
        sys.argv = ["mltk", *args.split("|")]
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                main()
            except SystemExit as stop:
                code = stop.code
        print(code, err.getvalue().strip().replace("\\n", " / "))
""")


def as_non_root(tmp_path, *commands: str) -> list[str]:
    """Each ``mltk`` command (arguments joined by |) in one process without root's power to write anywhere: root loses
    CAP_DAC_OVERRIDE (setpriv), as a plain user never had it. Returns a line per command: exit code, then stderr."""
    script = tmp_path / "non_root.py"
    script.write_text(NON_ROOT)
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("setpriv (util-linux) is needed to drop root's file-permission override")
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]
    env = {**os.environ, "MLTK_LOAD_PLUGINS": "", "PYTHONPATH": str(REPO)}
    done = subprocess.run([*prefix, sys.executable, str(script), *commands], capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def test_a_read_only_output_folder_is_one_line_for_every_command_and_nothing_changes(trained_run, tmp_path):
    from conftest import snapshot

    run, images = trained_run
    shutil.copytree(run, tmp_path / "ro" / "run")
    for path in sorted((tmp_path / "ro").rglob("*"), reverse=True) + [tmp_path / "ro"]:
        path.chmod(0o555 if path.is_dir() else 0o444)
    before = snapshot(tmp_path / "ro")
    tiny = "|--backbone|test_resnet|--image-size|32|--dim|8|--batch-size|8|--m-per-class|2|--workers|0|--epochs|1"
    try:
        lines = as_non_root(
            tmp_path,
            f"run|--data|{images}|--out|ro/new{tiny}",
            "run|--out|ro/run|--resume|--epochs|2|--workers|0",
            f"run|--data|{images}|--out|ro/run|--overwrite{tiny}",
            f"evaluate|ro/run|--data|{images}|--workers|0",
            f"index|ro/run|--data|{images}|--out|ro/idx|--workers|0",
            "export|ro/run|--format|torchscript|--out|ro/m.pt",
            "compare|ro/run|--out|ro/runs.md",
        )
    finally:
        for path in [tmp_path / "ro", *(tmp_path / "ro").rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
    assert lines[:2] == ["1 error: cannot write --out 'ro/new': 'ro' is not writable", "1 error: cannot write --out 'ro/run': 'ro/run' is not writable"]
    assert lines[2:] == [
        "1 error: cannot write --out 'ro/run': 'ro/run' is not writable",
        "1 error: cannot write --out 'ro/run/eval': 'ro/run' is not writable",
        "1 error: cannot write --out 'ro/idx': 'ro' is not writable",
        "1 error: cannot write --out 'ro/m.pt': 'ro' is not writable",
        "1 error: cannot write --out 'ro/runs.md': 'ro' is not writable",
    ]
    assert snapshot(tmp_path / "ro") == before


def test_replace_file_swaps_in_a_whole_file_or_leaves_the_earlier_one(tmp_path, monkeypatch):
    import errno

    from mltk.outputs import replace_file

    path = tmp_path / "table.md"
    path.write_text("earlier")
    with replace_file(path, repr(str(path)), "it is as it was") as tmp:
        tmp.write_text("new")
        assert path.read_text() == "earlier"  # written aside until the block ends
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["table.md"]

    def full(*args):  # the disk fills up while the file is written
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(MltkError, match=rf"^no space left on device writing '{path}'; it is as it was$"):
        with replace_file(path, repr(str(path)), "it is as it was") as tmp:
            tmp.write_text("half")
            full()
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C, or an OSError with no ``writing``: the caller's to say
        with replace_file(path) as tmp:
            tmp.write_text("half")
            raise KeyboardInterrupt
    monkeypatch.setattr(os, "fsync", full)  # the flush before the rename fails: nothing is renamed
    with pytest.raises(OSError, match="No space left"):
        with replace_file(path) as tmp:
            tmp.write_text("half")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["table.md"]  # no temporary left


def test_replace_files_renames_all_or_none_and_clears_what_a_killed_process_left(tmp_path, monkeypatch):
    import errno

    from mltk.outputs import replace_files

    page, sidecar, fresh = tmp_path / "m.pt", tmp_path / "m.pt.json", tmp_path / "new.md"
    page.write_text("earlier page")
    sidecar.write_text("earlier sidecar")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".m.pt.tmp-{dead.pid}").write_text("left by a kill -9")
    with replace_files([page, sidecar]) as (a, b):
        a.write_text("page")
        b.write_text("sidecar")
        assert page.read_text() == "earlier page"  # written aside until the block ends
    assert (page.read_text(), sidecar.read_text()) == ("page", "sidecar")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "m.pt.json"]

    real = os.replace

    def third_fails(src, dst):  # the disk goes read-only between two renames
        if str(dst).endswith(".json"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", third_fails)
    with pytest.raises(MltkError, match=r"^Read-only file system writing the pages; each is as it was$"):
        with replace_files([fresh, page, sidecar], "the pages", "each is as it was") as (a, b, c):
            for tmp in (a, b, c):
                tmp.write_text("later")
    assert (page.read_text(), sidecar.read_text()) == ("page", "sidecar")  # the first renames undone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt", "m.pt.json"]  # the new file gone, no temporary left


def _folder(path, text: str):
    path.mkdir()
    (path / "a.txt").write_text(text)
    return path


def test_replace_folder_swaps_a_folder_in_one_step_where_the_system_can(tmp_path):
    from mltk import outputs

    out = _folder(tmp_path / "out", "before")
    with outputs.replace_folder(out, "out", "kept") as tmp:
        (tmp / "a.txt").write_text("after")
    assert (out / "a.txt").read_text() == "after" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    if sys.platform.startswith("linux"):  # renameat2 exchanges the two folders: no moment without `out`
        a, b = _folder(tmp_path / "x", "x"), _folder(tmp_path / "y", "y")
        assert outputs.exchange(a, b) and (a / "a.txt").read_text() == "y" and (b / "a.txt").read_text() == "x"


def test_a_kill_between_the_two_renames_leaves_the_earlier_folder_which_comes_back(tmp_path, monkeypatch):
    from mltk import outputs

    monkeypatch.setattr(outputs, "exchange", lambda a, b: False)  # a system without renameat2: the two-rename swap
    out = _folder(tmp_path / "out", "before")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    os.replace(out, outputs.aside(out).with_name(f".out.old-{dead.pid}"))  # what a kill after the first rename leaves
    _folder(tmp_path / f".out.tmp-{dead.pid}", "half")
    with pytest.raises(RuntimeError), outputs.replace_folder(out, "out", "kept"):
        raise RuntimeError("the next writer fails")
    assert (out / "a.txt").read_text() == "before" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with outputs.replace_folder(out, "out", "kept") as tmp:
        (tmp / "a.txt").write_text("after")
    assert (out / "a.txt").read_text() == "after" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
