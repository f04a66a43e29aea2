"""mltk.index_edits and `mltk index add` / `mltk index remove`: an edited index searches as one built afresh on the
same images; removal is real; bad edits are one line; a kill at any moment leaves the index before or after the edit;
reads never see half of an edit."""

import json
import shutil
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, one_line_error, snapshot

from mltk import index as mindex
from mltk.data import load_data, select_classes


@pytest.fixture(scope="module")
def model(trained_run):
    from mltk.model import load

    return load(trained_run[0], device="cpu")


def gallery(folder: Path, *patterns: str):
    return select_classes(load_data(str(folder)), list(patterns))


def built(model, data, out: Path, kind: str = "flat") -> Path:
    options = {"hnsw": {"m": 8}}.get(kind, {})
    mindex.write_index_dir(model, data, out, kind, workers=0, **options)
    return out


def searched(index: Path, queries: list[Path], k: int = 6) -> list[list[tuple]]:
    """Each query's hits as (path, class, score): what a search answers, to compare two indexes by."""
    results = mindex.search_images(index, queries, k, workers=0)
    return [[(n["path"], n["class"], round(n["score"], 5)) for n in r["neighbours"]] for r in results]


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_an_added_then_removed_class_searches_as_an_index_built_afresh(model, trained_run, tmp_path, mltk_main, kind):
    folder = trained_run[1]
    index = built(model, gallery(folder, "class_0[0-6]"), tmp_path / "idx", kind)
    queries = [folder / "class_08" / "1.png", folder / "class_02" / "0.png"]
    before = searched(index, queries)
    incoming = tmp_path / "incoming"
    shutil.copytree(folder / "class_08", incoming)

    code, said, err = mltk_main("index", "add", index, incoming, "--class", "class_08", "--workers", "0")
    assert code == 0, err
    assert "added 4 images to the new class 'class_08'" in said and "holds 32 images of 8 classes" in said
    fresh = built(model, select_classes(load_data(str(folder)), ["class_0[0-6]"]), tmp_path / "fresh", kind)
    mltk_main("index", "add", fresh, folder / "class_08", "--class", "class_08", "--workers", "0")  # the same images, by their own paths
    rebuilt = built(model, gallery(folder, "class_0[0-6]", "class_08"), tmp_path / "rebuilt", kind)
    hits = searched(index, queries)
    assert hits[0][0][1] == "class_08" and hits[0][0][2] == pytest.approx(1.0, abs=1e-4)  # the query itself, now in the gallery
    assert [[(c, s) for _, c, s in q] for q in hits] == [[(c, s) for _, c, s in q] for q in searched(rebuilt, queries)]
    assert searched(fresh, queries) == searched(rebuilt, queries)

    code, said, err = mltk_main("index", "remove", index, "--class", "class_08")
    assert code == 0, err
    assert "removed class 'class_08' (4 images)" in said and "holds 28 images of 7 classes" in said
    opened = mindex.open_index_dir(index)
    assert opened.classes == [f"class_0{i}" for i in range(7)] and opened.index.ntotal == 28
    assert not any("incoming" in p for p in opened.paths) and np.load(index / "embeddings.npy").shape == (28, 16)
    assert searched(index, queries) == before


def test_removing_a_class_in_the_middle_renumbers_the_labels_and_searches_as_built_without_it(model, trained_run, tmp_path, mltk_main):
    folder = trained_run[1]
    index = built(model, gallery(folder, "class_0[0-6]"), tmp_path / "idx", "ivf")
    code, _, err = mltk_main("index", "remove", index, "--class", "class_03")
    assert code == 0, err
    without = built(model, gallery(folder, "class_00", "class_01", "class_02", "class_04", "class_05", "class_06"), tmp_path / "without", "ivf")
    queries = [folder / "class_03" / "0.png", folder / "class_05" / "2.png"]
    assert searched(index, queries) == searched(without, queries)
    a, b = mindex.open_index_dir(index), mindex.open_index_dir(without)
    assert a.classes == b.classes and a.paths == b.paths and np.array_equal(a.labels, b.labels)


def test_uploaded_images_live_in_the_index_and_leave_it_with_their_class(model, trained_run, tmp_path):
    from mltk.data import LabelledImages
    from mltk.index_edits import add_images, remove_class

    folder = trained_run[1]
    index = built(model, gallery(folder, "class_0[0-3]"), tmp_path / "idx")
    upload = tmp_path / "upload"
    upload.mkdir()
    for i in range(2):
        shutil.copy(folder / "class_09" / f"{i}.png", upload / f"u{i}.png")
    edit, skipped = add_images(index, LabelledImages(sorted(upload.iterdir()), [-1, -1], []), class_name="Zoë <b>", keep_copies=True, model=model)
    assert (edit.added, edit.new_class, edit.count, skipped) == (2, True, 18, [])
    shutil.rmtree(upload)  # the upload's own files are temporary: the index keeps its copies
    enrolled = sorted((index / "enrolled").iterdir())
    assert len(enrolled) == 2 and all(len(p.stem) == 24 for p in enrolled)
    hit = mindex.search_images(index, [folder / "class_09" / "0.png"], 1, workers=0)[0]["neighbours"][0]
    assert hit["class"] == "Zoë <b>" and Path(hit["path"]).parent == (index / "enrolled").resolve()
    remove_class(index, "Zoë <b>")
    assert list((index / "enrolled").iterdir()) == [] and mindex.open_index_dir(index).index.ntotal == 16


@pytest.mark.parametrize("args, message", [
    (["remove", "{index}", "--class", "class_42"], "has no class 'class_42'"),
    (["add", "{index}", "{folder}/class_08", "--class", "../etc"], "--class '../etc' is a path, not a name"),
    (["add", "{index}", "{folder}/class_08", "--class", "a\nb"], "holds a control character or line break"),
    (["add", "{index}", "{folder}/class_08", "--class", ""], "--class is empty"),
    (["add", "{index}", "{folder}/class_08"], "has classes and these images have none; give --class NAME"),
    (["add", "{index}", "{folder}/class_08", "--class", "x", "--batch-size", "0"], "--batch-size must be a positive number"),
    (["add", "{tmp}/nothing", "{folder}/class_08", "--class", "x"], "does not exist"),
    (["remove", "{folder}", "--class", "x"], "is not an mltk index directory"),
])
def test_an_edit_that_cannot_work_is_one_line_and_changes_nothing(model, trained_run, tmp_path, mltk_main, args, message):
    folder = trained_run[1]
    index = built(model, gallery(folder, "class_0[0-3]"), tmp_path / "idx")
    before = snapshot(tmp_path)
    line = one_line_error(mltk_main("index", *(a.format(index=index, folder=folder, tmp=tmp_path) for a in args)))
    assert message in line, line
    assert snapshot(tmp_path) == before


def test_edits_the_index_cannot_take_are_refused(model, trained_run, tmp_path, mltk_main):
    folder = trained_run[1]
    index = built(model, gallery(folder, "class_00"), tmp_path / "idx")
    line = one_line_error(mltk_main("index", "remove", index, "--class", "class_00"))
    assert "holds every image of the index, and an index holds at least one" in line
    (index / "embeddings.npy").unlink()  # deleted to save space, as a search allows
    line = one_line_error(mltk_main("index", "add", index, folder / "class_01", "--class", "x", "--workers", "0"))
    assert "has no embeddings.npy" in line and mindex.open_index_dir(index).index.ntotal == 4
    unlabelled = tmp_path / "flat"
    shutil.copytree(folder / "class_02", unlabelled)
    mindex.write_index_dir(model, mindex.load_gallery(str(unlabelled)), tmp_path / "plain", workers=0)
    line = one_line_error(mltk_main("index", "add", tmp_path / "plain", folder / "class_03", "--class", "x", "--workers", "0"))
    assert "is a gallery without classes" in line
    code, said, err = mltk_main("index", "add", tmp_path / "plain", folder / "class_03", "--workers", "0")
    assert code == 0 and "added 4 images:" in said and "holds 8 images" in said, err


KILLED = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from mltk import outputs
    from mltk.data import LabelledImages
    from mltk.embedding import EmbedSettings
    from mltk.index_edits import add_images

    index, image, moment = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    die = lambda: os.kill(os.getpid(), signal.SIGKILL)
    if moment == "writing":  # the next version half-written
        import mltk.index_edits as edits
        edits._write_rows = lambda *a, **k: die()
    elif moment == "after_exchange":  # swapped in, the old version not yet removed
        real = outputs.exchange
        def exchange(a, b):
            real(a, b)
            die()
        outputs.exchange = exchange
    elif moment == "between_renames":  # a system without renameat2: the old version aside, the new not yet in
        outputs.exchange = lambda a, b: False
        real_replace = os.replace
        calls = []
        def replace(a, b):
            calls.append(1)
            real_replace(a, b)
            if len(calls) == 1:
                die()
        os.replace = replace
    add_images(index, LabelledImages([image], [-1], []), class_name="late", settings=EmbedSettings(8, 0))
""")


@pytest.mark.parametrize("moment, after", [("writing", False), ("between_renames", False), ("after_exchange", True)])
def test_a_kill_at_any_moment_of_an_add_leaves_the_index_before_or_after_it(model, trained_run, tmp_path, moment, after):
    folder = trained_run[1]
    index = built(model, gallery(folder, "class_0[0-3]"), tmp_path / "idx")
    queries = [folder / "class_09" / "0.png"]
    before = searched(index, queries)
    killed = subprocess.run([sys.executable, "-c", KILLED, str(index), str(folder / "class_09" / "0.png"), moment], cwd=REPO, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    opened = mindex.open_index_dir(index)  # the directory checks pass: the index is whole
    assert opened.index.ntotal == (17 if after else 16) and ("late" in opened.classes) == after
    assert (searched(index, queries)[0][0][1] == "late") if after else searched(index, queries) == before
    from mltk.data import LabelledImages
    from mltk.index_edits import add_images, remove_class

    if not after:  # the next edits clear what the kill left, and work
        add_images(index, LabelledImages([folder / "class_09" / "0.png"], [-1], []), class_name="late", model=model)
    remove_class(index, "late")
    assert searched(index, queries) == before and sorted(p.name for p in tmp_path.iterdir()) == ["idx"]


def test_reads_during_edits_always_see_one_whole_version(model, trained_run, tmp_path):
    from mltk.data import LabelledImages
    from mltk.index_edits import add_images, remove_class

    folder = trained_run[1]
    index = built(model, gallery(folder, "class_0[0-3]"), tmp_path / "idx")
    images = LabelledImages(sorted((folder / "class_09").glob("*.png")), [-1] * 4, [])
    seen, errors, done = set(), [], threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                opened = mindex.open_index_dir(index)
                assert len(opened.paths) == opened.index.ntotal == len(opened.labels)
                seen.add((opened.index.ntotal, tuple(opened.classes)))
            except Exception as exc:  # noqa: BLE001  any failure is a torn read
                errors.append(exc)

    readers = [threading.Thread(target=read) for _ in range(2)]
    for r in readers:
        r.start()
    try:
        for _ in range(3):
            add_images(index, images, class_name="visitor", model=model)
            remove_class(index, "visitor")
    finally:
        done.set()
        for r in readers:
            r.join()
    assert errors == [] and seen <= {(16, ("class_00", "class_01", "class_02", "class_03")), (20, ("class_00", "class_01", "class_02", "class_03", "visitor"))}
    assert json.loads((index / "meta.json").read_text())["count"] == 16
