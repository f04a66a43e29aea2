"""`mltk index` and `mltk search` against hostile input: folders that are not indexes, tampered index
directories, kills mid-way, markup in class names and paths (issue 17)."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TINY, make_image_folder, one_line_error, snapshot

from mltk import index as mindex


@pytest.fixture(scope="module")
def index_model(trained_run):
    from mltk.model import load

    return load(trained_run[0], device="cpu")


@pytest.fixture(scope="module")
def index_built(trained_run, index_model, tmp_path_factory):
    """A flat index of the trained run's 40 images, written once: tests copy it before they touch it."""
    from mltk.data import load_data

    out = tmp_path_factory.mktemp("adversarial-index") / "gallery"
    mindex.write_index_dir(index_model, load_data(str(trained_run[1])), out, "flat", workers=0)
    return out


@pytest.fixture
def index_copy(index_built, tmp_path):
    """A fresh copy of the built index, to tamper with."""
    return Path(shutil.copytree(index_built, tmp_path / "idx"))


def index_query(trained_run) -> Path:
    return trained_run[1] / "class_03" / "2.png"


def index_dead_pid() -> int:
    """The id of a process that has exited (a child, reaped: nothing else has that id for now)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# ---- 1. --out that is not an index is never removed ----------------------------------------------


@pytest.mark.parametrize(
    "meta",
    [
        "{}",  # a meta.json of anything else
        "not json at all",
        json.dumps({"format": "other-tool-3", "kind": "flat"}),
        json.dumps(["mltk-index-1"]),
        None,  # no meta.json at all
    ],
)
def test_index_keeps_a_folder_that_is_not_an_index(trained_run, mltk_main, tmp_path, meta):
    run, folder = trained_run
    out = tmp_path / "mine"
    (out / "photos").mkdir(parents=True)
    (out / "photos" / "holiday.jpg").write_bytes(b"precious")
    (out / "notes.txt").write_text("mine")
    if meta is not None:
        (out / "meta.json").write_text(meta)
    before = snapshot(tmp_path)
    line = one_line_error(mltk_main("index", run, "--data", folder, "--out", out, "--workers", "0"), 1)
    assert f"--out {str(out)!r} is a folder that is not an mltk index" in line and "'notes.txt'" in line
    assert snapshot(tmp_path) == before


def test_index_keeps_an_index_the_user_put_files_into(index_copy, trained_run, mltk_main):
    run, folder = trained_run
    (index_copy / "my_notes.txt").write_text("mine")
    (index_copy / "crops").mkdir()
    before = snapshot(index_copy.parent)
    line = one_line_error(mltk_main("index", run, "--data", folder, "--out", index_copy, "--workers", "0"), 1)
    assert "is an mltk index but also holds 'crops', 'my_notes.txt'" in line and "move them out" in line
    assert snapshot(index_copy.parent) == before


def test_index_replaces_an_index_holding_only_its_own_files(index_copy, trained_run, mltk_main):
    run, folder = trained_run
    (index_copy / "skipped_images.txt").write_text("x\tnot an image\n")  # an earlier run's: an index file too
    code, out, err = mltk_main("index", run, "--data", folder, "--out", index_copy, "--kind", "hnsw", "--workers", "0")
    assert code == 0, err
    assert mindex.open_index_dir(index_copy).meta["kind"] == "hnsw" and not (index_copy / "skipped_images.txt").exists()
    assert sorted(p.name for p in index_copy.parent.iterdir()) == ["idx"]


def test_index_keeps_files_put_into_the_out_folder_while_it_runs(index_copy, trained_run, index_model, monkeypatch):
    from mltk.data import load_data
    from mltk.errors import MltkError

    build = mindex.build

    def build_while_the_user_adds_a_file(*args, **kwargs):
        (index_copy / "added.txt").write_text("mine")
        return build(*args, **kwargs)

    monkeypatch.setattr(mindex, "build", build_while_the_user_adds_a_file)
    with pytest.raises(MltkError, match="also holds 'added.txt'"):
        mindex.write_index_dir(index_model, load_data(str(trained_run[1])), index_copy, "flat", workers=0)
    assert (index_copy / "added.txt").read_text() == "mine" and (index_copy / "model.pt").is_file()
    assert sorted(p.name for p in index_copy.parent.iterdir()) == ["idx"]  # no temporary left


# ---- 2. a bad --out is refused before the model loads ----------------------------------------------


@pytest.mark.parametrize("where", ["under a file", "a file"])
def test_index_checks_out_before_loading_anything(mltk_main, tmp_path, where):
    (tmp_path / "f").write_text("a file")
    out = tmp_path / "f" / "sub" if where == "under a file" else tmp_path / "f"
    before = snapshot(tmp_path)
    # the run and the data do not exist: the error is about --out, so it came first
    line = one_line_error(mltk_main("index", tmp_path / "no-run", "--data", tmp_path / "no-data", "--out", out), 1)
    assert f"--out {str(out)!r}" in line and f"{str(tmp_path / 'f')!r} is a file, not a folder" in line
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize(
    "args, message",
    [
        (("--batch-size", "0"), "batch_size=0: it is at least 1"),
        (("--workers", "-1"), "workers=-1: it is at least 0"),
        (("--kind", "ivf", "--nlist", "0"), "nlist=0: it is at least 1"),
        (("--kind", "ivf", "--nprobe", "0"), "nprobe=0: it is at least 1"),
        (("--kind", "ivfpq", "--pq-m", "0"), "pq_m=0: it is at least 1"),
        (("--kind", "hnsw", "--m", "1"), "m=1: it is at least 2"),
        (("--kind", "hnsw", "--ef-search", "0"), "ef_search=0: it is at least 1"),
    ],
)
def test_index_options_out_of_range_are_one_line_before_loading(mltk_main, tmp_path, args, message):
    line = one_line_error(mltk_main("index", tmp_path / "no-run", "--data", tmp_path / "no-data", "--out", tmp_path / "i", *args), 2)
    assert message in line and sorted(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "args, message",
    [
        (("--kind", "ivf", "--nlist", "41"), "nlist=41: an IVF index of 40 vectors takes 1 to 40 cells"),
        (("--kind", "ivfpq", "--pq-m", "5"), "pq_m=5: it must divide the 16 dimensions"),
        (("--kind", "ivfpq",), "needs at least 256 vectors; 40 given"),
    ],
)
def test_index_options_that_need_the_data_are_checked_before_embedding(trained_run, mltk_main, tmp_path, monkeypatch, args, message):
    import mltk.evaluate

    def no_embedding(*a, **k):
        raise AssertionError("embedded before the options were checked")

    monkeypatch.setattr(mltk.evaluate, "embed", no_embedding)
    run, folder = trained_run
    line = one_line_error(mltk_main("index", run, "--data", folder, "--out", tmp_path / "i", "--workers", "0", *args), 2)
    assert message in line and sorted(tmp_path.iterdir()) == []


# ---- 3. a tampered index directory is one line naming the file ---------------------------------------


def index_rewrite_meta(**changes):
    def tamper(d: Path):
        meta = json.loads((d / "meta.json").read_text())
        (d / "meta.json").write_text(json.dumps({**meta, **changes}))

    return tamper


def index_save(name, array, **kwargs):
    return lambda d: np.save(d / name, array, **kwargs)


def index_write(name, text):
    return lambda d: (d / name).write_text(text) if isinstance(text, str) else (d / name).write_bytes(text)


def index_cut_paths(d: Path):
    (d / "paths.txt").write_text("".join(line + "\n" for line in (d / "paths.txt").read_text().splitlines()[:-1]))


def index_lying_header(d: Path):
    """labels.npy whose header announces rows the file does not hold (numpy would allocate them before it noticed)."""
    with open(d / "labels.npy", "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<i8", "fortran_order": False, "shape": (99999,)})
        f.write(np.zeros(40, np.int64).tobytes())


TAMPERED = {
    "classes shorter than the labels": (index_write("classes.json", '["class_00"]'), "labels.npy has label 1 at row 4; classes.json names 1 classes"),
    "classes a dict": (index_write("classes.json", '{"class_00": 0}'), "classes.json holds {'class_00': 0}; expected a list of class names"),
    "classes not strings": (index_write("classes.json", json.dumps(list(range(10)))), "classes.json holds [0, 1, 2, 3, 4, 5, ...]; expected a list"),
    "classes empty": (index_write("classes.json", "[]"), "classes.json holds []"),
    "classes not json": (index_write("classes.json", "class_00\nclass_01"), "classes.json is not JSON"),
    "classes deeply nested": (index_write("classes.json", "[" * 100000), "classes.json is not JSON"),
    "float labels": (index_save("labels.npy", np.arange(40) / 4), "labels.npy holds float64 (40,); expected integers (40,)"),
    "bool labels": (index_save("labels.npy", np.ones(40, bool)), "labels.npy holds bool (40,)"),
    "negative label": (index_save("labels.npy", np.r_[-1, np.zeros(39, np.int64)]), "labels.npy has label -1 at row 0"),
    "label past the classes": (index_save("labels.npy", np.r_[np.zeros(39, np.int64), 10]), "labels.npy has label 10 at row 39; classes.json names 10 classes (0 to 9)"),
    "labels 2-D": (index_save("labels.npy", np.zeros((40, 1), np.int64)), "labels.npy holds int64 (40, 1)"),
    "labels too few": (index_save("labels.npy", np.zeros(39, np.int64)), "labels.npy holds int64 (39,)"),
    "labels a pickle": (index_save("labels.npy", np.array([{}] * 40, object), allow_pickle=True), "labels.npy holds Python objects"),
    "labels not npy": (index_write("labels.npy", b"\x80\x04junk"), "labels.npy is not a numpy array file"),
    "labels header lies": (index_lying_header, "labels.npy holds 320 bytes of data; its header announces int64 (99999,)"),
    "paths one short": (index_cut_paths, "paths.txt has 39 lines; meta.json says 40 images"),
    "meta dim a string": (index_rewrite_meta(dim="16"), "meta.json has dim='16'; expected int"),
    "meta count a bool": (index_rewrite_meta(count=True), "meta.json has count=True; expected int"),
    "meta params a list": (index_rewrite_meta(params=[]), "meta.json has params=[]; expected dict"),
    "meta kind unknown": (index_rewrite_meta(kind="annoy"), "meta.json has kind='annoy'; expected one of flat, ivf, ivfpq, hnsw"),
    "meta kind another": (index_rewrite_meta(kind="hnsw"), "index.faiss has kind flat; meta.json says hnsw"),
    "meta dim wrong": (index_rewrite_meta(dim=32), "index.faiss has dim 16; meta.json says 32"),
    "meta count wrong": (index_rewrite_meta(count=41), "index.faiss has count 40; meta.json says 41"),
    "meta count zero": (index_rewrite_meta(count=0), "meta.json has dim=16, count=0; expected at least 1"),
    "meta run not text": (index_rewrite_meta(run=["x"]), "meta.json has run=['x']; expected str"),
    "index.faiss junk": (index_write("index.faiss", b"IxFI" + b"\0" * 10), "index.faiss cannot be read by faiss"),
    "index.faiss missing": (lambda d: (d / "index.faiss").unlink(), "index.faiss is missing"),
    "model.pt missing": (lambda d: (d / "model.pt").unlink(), "model.pt is missing"),
    "paths.txt a folder": (lambda d: ((d / "paths.txt").unlink(), (d / "paths.txt").mkdir()), "paths.txt is missing"),
    "embeddings of another shape": (index_save("embeddings.npy", np.zeros((40, 8), np.float32)), "embeddings.npy holds float32 (40, 8); expected float32 (40, 16)"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_search_names_the_damaged_file_of_a_tampered_index(index_copy, trained_run, mltk_main, case):
    tamper, message = TAMPERED[case]
    tamper(index_copy)
    before = snapshot(index_copy)
    line = one_line_error(mltk_main("search", index_copy, index_query(trained_run)), 1)
    assert line.startswith(f"error: index directory {str(index_copy)!r} is damaged: ") and message in line, line
    assert line.endswith("write it again with `mltk index`")
    assert snapshot(index_copy) == before


def test_search_with_a_model_of_another_dimension_names_model_pt(index_copy, trained_run, index_model, mltk_main, tmp_path):
    from mltk.config import make_config
    from mltk.data import load_data
    from mltk.model import EmbeddingModel, build_embedder

    cfg = make_config({**TINY, "dim": 8, "data": str(trained_run[1])})
    narrow = EmbeddingModel(build_embedder(cfg, from_checkpoint=True), index_model.data_config, cfg, index_model.classes, "cpu")
    mindex.write_index_dir(narrow, load_data(str(trained_run[1])).rows(list(range(4))), tmp_path / "narrow", workers=0)
    shutil.copy(tmp_path / "narrow" / "model.pt", index_copy / "model.pt")
    line = one_line_error(mltk_main("search", index_copy, index_query(trained_run)), 1)
    assert line == f"error: index directory {str(index_copy)!r} is damaged: model.pt embeds in 8 dimensions; the index holds 16; write it again with `mltk index`"


def test_an_index_without_embeddings_npy_still_searches(index_copy, trained_run, mltk_main):
    (index_copy / "embeddings.npy").unlink()  # a search does not read it: deleting it saves space
    code, out, err = mltk_main("search", index_copy, index_query(trained_run), "--json", "--k", "1")
    assert code == 0, err
    assert json.loads(out)[0]["neighbours"][0]["class"] == "class_03"


# ---- 4. temporaries a kill left are removed by the next run ------------------------------------------


def test_a_kill_9_mid_index_leaves_a_temporary_the_next_run_removes(index_copy, trained_run, mltk_main):
    run, folder = trained_run
    parent = index_copy.parent
    before = snapshot(index_copy)
    # A real `mltk index` that SIGKILLs itself while it builds: after embedding, its temporary folder full.
    script = (
        "import os, signal, sys; import mltk.index as m; "
        "m.build = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL); "
        "from mltk.cli import main; sys.argv = ['mltk'] + sys.argv[1:]; main()"
    )
    env = {**os.environ, "MLTK_LOAD_PLUGINS": ""}
    killed = subprocess.Popen(
        [sys.executable, "-c", script, "index", str(run), "--data", str(folder), "--out", str(index_copy), "--workers", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO,
    )
    _, stderr = killed.communicate(timeout=300)
    assert killed.returncode == -signal.SIGKILL, stderr
    left = parent / f".idx.tmp-{killed.pid}"
    assert (left / "embeddings.npy").is_file() and snapshot(index_copy) == before  # the index itself untouched
    # What other processes left: a dead one's old copy (removed), a live one's (kept), another --out's (kept).
    dead = index_dead_pid()
    (parent / f".idx.old-{dead}").mkdir()
    (parent / f".idx.old-{dead}" / "meta.json").write_text("{}")
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        (parent / f".idx.tmp-{live.pid}").mkdir()
        (parent / f".other.tmp-{dead}").mkdir()
        code, _, err = mltk_main("index", run, "--data", folder, "--out", index_copy, "--workers", "0")
        assert code == 0, err
        assert sorted(p.name for p in parent.iterdir()) == sorted(["idx", f".idx.tmp-{live.pid}", f".other.tmp-{dead}"])
        assert mindex.open_index_dir(index_copy).meta["count"] == 40
    finally:
        live.kill()
        live.wait()


def test_a_refused_index_run_removes_no_temporary(index_copy, mltk_main, tmp_path):
    dead = index_dead_pid()
    (tmp_path / f".idx.tmp-{dead}").mkdir()
    before = snapshot(tmp_path)
    one_line_error(mltk_main("index", tmp_path / "no-run", "--data", tmp_path / "no-data", "--out", index_copy))
    assert snapshot(tmp_path) == before  # bad input changes nothing, stale temporaries included


# ---- 5-7. query images, display, search options ------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (lambda q: (q.parent,), "is a folder, not an image file"),
        (lambda q: (q, "--k", "0"), "k=0: give 1 to 40"),
        (lambda q: (q, "--k", "-3"), "k=-3: give 1 to 40"),
        (lambda q: (q, "--nprobe", "2"), "nprobe applies to an ivf or ivfpq index (this index: flat)"),
        (lambda q: (q, "--ef-search", "-1"), "ef_search applies to an hnsw index (this index: flat)"),
    ],
)
def test_search_refuses_bad_queries_and_options_in_one_line(index_built, trained_run, mltk_main, args, message):
    line = one_line_error(mltk_main("search", index_built, *args(index_query(trained_run))), None)
    assert message in line


def test_search_options_out_of_range_on_an_approximate_index(index_copy, trained_run, index_model, mltk_main, tmp_path):
    from mltk.data import load_data

    mindex.write_index_dir(index_model, load_data(str(trained_run[1])), tmp_path / "ivf", "ivf", workers=0)
    mindex.write_index_dir(index_model, load_data(str(trained_run[1])), tmp_path / "hnsw", "hnsw", workers=0)
    query = index_query(trained_run)
    assert "nprobe=0: it is at least 1" in one_line_error(mltk_main("search", tmp_path / "ivf", query, "--nprobe", "0"), 2)
    assert "ef_search=-2: it is at least 1" in one_line_error(mltk_main("search", tmp_path / "hnsw", query, "--ef-search", "-2"), 2)


def test_search_prints_names_from_the_index_as_text_not_markup(index_copy, trained_run, mltk_main, tmp_path):
    names = ["[red]x[/red]", "\x1b[31mevil", "[bold]b", "ok"] + [f"c{i}" for i in range(6)]
    (index_copy / "classes.json").write_text(json.dumps(names))
    labels = np.load(index_copy / "labels.npy")
    paths = (index_copy / "paths.txt").read_text().splitlines()
    i = int(np.flatnonzero(labels == 1)[0])  # a class_01 image: its class is now "\x1b[31mevil"
    paths[i] = "/g/[i]p\x1b]8;;x\x07"
    (index_copy / "paths.txt").write_text("".join(p + "\n" for p in paths))
    query = tmp_path / "[bold]q.png"
    shutil.copy(Path(paths[0]), query)  # a class_00 image: its class is now "[red]x[/red]"
    code, out, err = mltk_main("search", index_copy, query, trained_run[1] / "class_01" / "0.png", "--k", "1")
    assert code == 0, err
    assert "[red]x[/red]" in out and "[bold]q.png" in out  # printed as they are, not as styles
    assert "\\x1b[31mevil" in out and "/g/[i]p\\x1b]8;;x\\x07" in out  # escapes written out, never sent
    assert "\x1b" not in out and "\x07" not in out


# ---- other holes of the same kind -------------------------------------------------------------------


def test_index_refuses_an_image_with_a_line_break_in_its_path_before_embedding(index_model, tmp_path):
    from mltk.data import load_data
    from mltk.errors import MltkError

    folder = make_image_folder(tmp_path / "images", classes=2, per_class=2)
    os.rename(folder / "class_00" / "0.png", folder / "class_00" / "a\nb.png")
    with pytest.raises(MltkError, match=r"has a line break in its path, and paths.txt holds one path a line"):
        mindex.write_index_dir(index_model, load_data(str(folder)), tmp_path / "out", workers=0)
    assert not (tmp_path / "out").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_index_through_a_symbolic_link_replaces_the_folder_it_names(index_copy, trained_run, mltk_main, tmp_path):
    run, folder = trained_run
    link = tmp_path / "link"
    link.symlink_to(index_copy)
    code, _, err = mltk_main("index", run, "--data", folder, "--out", link, "--kind", "hnsw", "--workers", "0")
    assert code == 0, err
    assert link.is_symlink() and mindex.open_index_dir(index_copy).meta["kind"] == "hnsw"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx", "link"]


def test_a_full_disk_while_writing_an_index_is_one_line_and_keeps_the_earlier_index(index_copy, trained_run, index_model, monkeypatch):
    import errno

    from mltk.data import load_data
    from mltk.errors import MltkError

    before = snapshot(index_copy)

    def disk_full(index):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mindex, "settings", disk_full)
    with pytest.raises(MltkError, match=r"^no space left on device writing index directory .*; nothing there was changed$"):
        mindex.write_index_dir(index_model, load_data(str(trained_run[1])), index_copy, "flat", workers=0)
    assert snapshot(index_copy) == before and sorted(p.name for p in index_copy.parent.iterdir()) == ["idx"]


def test_a_failed_index_run_removes_the_folders_it_made_for_out(trained_run, index_model, tmp_path, monkeypatch):
    from mltk.data import load_data

    def broken(*args, **kwargs):
        raise RuntimeError("interrupted while building")

    monkeypatch.setattr(mindex, "build", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        mindex.write_index_dir(index_model, load_data(str(trained_run[1])), tmp_path / "a" / "b" / "idx", workers=0)
    assert sorted(tmp_path.iterdir()) == []  # neither a/b nor a temporary
