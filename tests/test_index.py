"""Faiss indexes (mltk.knn) and index directories (mltk.index), approximate evaluation engines, memory-mapped embeddings, `mltk index` and `mltk search`."""

import json
import re
import os
import shutil
import signal
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, TINY, dead_pid, make_image_folder, one_line_error, snapshot
from test_metrics import RETRIEVAL, clustered, reference_retrieval, tied

from mltk import index as mindex
from mltk import knn
from mltk import metrics
from mltk.errors import MltkError, UsageError
from mltk.metrics import evaluate_embeddings


def brute_force(q, g, k, own=None):
    """Gallery positions of the k nearest of each query: a stable numpy sort, the query itself left out."""
    s = q @ g.T
    if own is not None:
        s[np.arange(len(q)), own] = -np.inf
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def neighbour_recall(found, exact):
    """Share of the exact k nearest found among the first k, computed row by row."""
    k = exact.shape[1]
    return float(np.mean([len(set(f[:k]) & set(e)) / k for f, e in zip(found, exact)]))


# ---- mltk.index ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, options", [("flat", {}), ("ivf", {"nprobe": 8}), ("hnsw", {"ef_search": 64})])
def test_index_kinds_find_the_nearest_neighbours(kind, options):
    x, _ = clustered(n=3000, dim=32, classes=60, spread=1.0)
    index = knn.build(x, kind, **options)
    assert knn.kind_of(index) == kind and index.ntotal == len(x)
    sims, found = knn.search(index, x[:500], 10, block=128)
    exact = brute_force(x[:500], x, 10)
    recall = neighbour_recall(found, exact)
    assert recall == 1.0 if kind == "flat" else recall >= 0.9
    np.testing.assert_allclose(sims, np.einsum("ij,ikj->ik", x[:500], x[found]), atol=1e-5)  # scores are cosines
    assert (np.diff(sims, axis=1) <= 1e-6).all()


def test_ivf_cells_follow_the_gallery_size_and_searches_are_never_short():
    x, _ = clustered(n=4000, dim=16, classes=80, spread=1.0)
    index = knn.build(x, "ivf")
    assert knn.settings(index) == {"nlist": 102, "nprobe": 16}  # 4000 // 39 cells, capped; nlist / 8, at least 16
    knn.configure(index, nprobe=1)  # one cell of about 40 vectors: fewer than k
    sims, found = knn.search(index, x[:200], 300)
    assert (found >= 0).all() and all(len(set(row)) == 300 for row in found)
    np.testing.assert_allclose(sims, np.einsum("ij,ikj->ik", x[:200], x[found]), atol=1e-5)
    with pytest.raises(UsageError, match="k=4001 is more than the 4000 vectors"):
        knn.search(index, x[:2], 4001)
    with pytest.raises(UsageError, match="nprobe applies to an ivf or ivfpq index"):
        knn.configure(knn.build(x[:100], "flat"), nprobe=4)


def test_an_ivfpq_index_keeps_pq_m_bytes_a_vector_and_finds_most_neighbours():
    x, _ = clustered(n=3000, dim=32, classes=60, spread=1.0)
    index = knn.build(x, "ivfpq", nlist=16, nprobe=16, pq_m=8)
    assert knn.kind_of(index) == "ivfpq" and index.code_size == 8  # 8 bytes instead of 32 float32s (128 bytes)
    assert knn.settings(index) == {"nlist": 16, "nprobe": 16, "pq_m": 8}
    sims, found = knn.search(index, x[:500], 10)
    assert neighbour_recall(found, brute_force(x[:500], x, 10)) >= 0.6  # compressed: some neighbours are lost
    exact = np.einsum("ij,ikj->ik", x[:500], x[found])
    assert np.abs(sims - exact).mean() < 0.05  # its scores approximate the cosines
    with pytest.raises(UsageError, match="pq_m=5: it must divide the 32 dimensions"):
        knn.build(x, "ivfpq", pq_m=5)
    with pytest.raises(UsageError, match="needs at least 256 vectors; 100 given"):
        knn.build(x[:100], "ivfpq")


def test_exact_neighbours_break_ties_by_the_lower_position_across_chunks():
    x, _ = tied()  # similarities are multiples of 1/4: ties everywhere
    sample = np.arange(0, len(x), 7)
    sims, found = knn.exact_neighbours(x[sample], x, 12, own=sample, chunk=37)
    np.testing.assert_array_equal(found, brute_force(x[sample], x, 12, own=sample))
    np.testing.assert_array_equal(sims, np.take_along_axis(x[sample] @ x.T, found, 1))


def test_an_index_reads_a_memmap_in_chunks(tmp_path, monkeypatch):
    x, _ = clustered(n=1000, dim=16)
    np.save(tmp_path / "e.npy", x)
    mm = np.load(tmp_path / "e.npy", mmap_mode="r")
    monkeypatch.setattr(knn, "CHUNK", 300)
    index = knn.build(mm, "hnsw")
    assert index.ntotal == 1000
    _, found = knn.search(index, mm[:100], 5)
    np.testing.assert_array_equal(found[:, 0], np.arange(100))  # each vector finds itself first


# ---- approximate engines in the evaluation -------------------------------------------------------


@pytest.mark.parametrize("engine", metrics.APPROXIMATE_ENGINES)
def test_approximate_engines_agree_with_the_exact_pass(engine):
    x, labels = clustered(n=2000, dim=32, classes=50, spread=1.0)
    ks = (1, 2, 4, 8)
    result = evaluate_embeddings(x, labels, metrics=RETRIEVAL, ks=ks, engine=engine)
    expected, _, order = reference_retrieval(x, x, labels, labels, ks, loo=True)
    found = result.evaluation.neighbours().indices
    assert neighbour_recall(found, order[:, :8]) >= 0.9
    for key in expected:
        assert result.values[key] == pytest.approx(expected[key], abs=0.02), key
    assert result.values["index"] == engine and result.values["index_check_queries"] == 1000


def test_the_reported_index_recall_is_the_share_of_the_exact_neighbours_found():
    x, labels = clustered(n=3000, dim=32, classes=60, spread=1.5)
    options = {"nlist": 64, "nprobe": 2}  # few cells visited: the index misses neighbours
    result = evaluate_embeddings(x, labels, metrics=["recall_at_k"], engine="ivf", index_options=options, check_queries=len(x))
    v = result.values
    found = result.evaluation.neighbours().indices
    exact = brute_force(x, x, 8, own=np.arange(len(x)))
    assert (v["index_nlist"], v["index_nprobe"], v["index_check_queries"]) == (64, 2, len(x))
    for k in (1, 2, 4, 8):
        assert v[f"index_recall@{k}"] == pytest.approx(neighbour_recall(found, exact[:, :k]), abs=1e-12)
    assert 0.3 < v["index_recall@8"] < 0.99
    scored = np.array([(labels == y).sum() > 1 for y in labels])
    hit = lambda nearest: float(np.mean(labels[nearest[scored]] == labels[scored]))  # noqa: E731
    assert v["index_check_recall@1_exact"] == pytest.approx(hit(exact[:, 0]), abs=1e-12)
    assert v["index_check_recall@1_index"] == pytest.approx(hit(found[:, 0]), abs=1e-12) == v["recall@1"]
    sampled = evaluate_embeddings(x, labels, metrics=["recall_at_k"], engine="ivf", index_options=options, check_queries=500).values
    assert sampled["index_check_queries"] == 500 and sampled["index_recall@8"] == pytest.approx(v["index_recall@8"], abs=0.05)
    assert evaluate_embeddings(x, labels, metrics=["recall_at_k"], engine="ivf", index_options=options, check_queries=500).values == sampled


def test_an_exhaustive_ivf_search_on_a_query_gallery_split_gives_the_exact_metrics():
    x, labels = clustered(n=800, seed=2)
    is_query = np.random.default_rng(0).random(len(x)) < 0.3
    ks = (1, 2, 4, 8)
    expected, excluded, _ = reference_retrieval(x[is_query], x[~is_query], labels[is_query], labels[~is_query], ks, loo=False)
    values = evaluate_embeddings(x, labels, query=is_query, gallery=~is_query, metrics=RETRIEVAL + ["roc_auc"], ks=ks, engine="ivf", index_options={"nlist": 8, "nprobe": 8}).values
    assert {k: values[k] for k in expected} == pytest.approx(expected, abs=1e-12)
    assert values["index_recall@8"] == 1.0 and values["queries_excluded"] == excluded
    assert values["pairs"] == is_query.sum() * (~is_query).sum()  # verification still scores every pair


def test_an_unknown_engine_names_the_choices():
    x, labels = clustered(n=50)
    with pytest.raises(UsageError, match="unknown engine 'annoy'; choose one of blocks, flat, ivf, ivfpq, hnsw"):
        evaluate_embeddings(x, labels, engine="annoy")


# ---- memory-mapped embeddings --------------------------------------------------------------------


def peak_allocation(function) -> int:
    """The most memory numpy (and Python) held at once while ``function`` ran, in bytes."""
    tracemalloc.start()
    try:
        function()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_memmap_gives_the_same_metrics_and_is_never_copied(tmp_path):
    x, labels = clustered(n=6000, dim=1024, classes=1000, spread=1.0)
    np.save(tmp_path / "e.npy", x)
    mm = np.load(tmp_path / "e.npy", mmap_mode="r")
    assert np.shares_memory(metrics.Evaluation(mm, labels).embeddings, mm)
    in_ram = evaluate_embeddings(x, labels, metrics=RETRIEVAL + ["roc_auc"]).values
    values = evaluate_embeddings(mm, labels, metrics=RETRIEVAL + ["roc_auc"]).values
    assert values == in_ram
    # The kNN pass alone (max_pairs=0: no pair histogram, whose 1M bins a fold do not depend on N), in blocks of 512
    # rows: the pass's one block of similarities (block² floats, 1 MiB here) counts too, and does not depend on N.
    retrieval = dict(metrics=RETRIEVAL, max_pairs=0, block=512)
    full = peak_allocation(lambda: evaluate_embeddings(mm, labels, **retrieval))
    assert full < mm.nbytes / 4, f"{full} bytes allocated for {mm.nbytes} bytes of embeddings"
    half = len(x) // 2  # a query/gallery split in two contiguous ranges, as `mltk evaluate --query --gallery` has it
    split = peak_allocation(lambda: evaluate_embeddings(mm, labels, query=np.arange(half), gallery=np.arange(half, len(x)), **retrieval))
    assert split < mm.nbytes / 4


# ---- embedding to disk, `mltk index`, `mltk search` ----------------------------------------------


def test_embeddings_stream_to_a_file_that_appears_only_when_complete(trained_run, tmp_path, monkeypatch):
    from mltk.data import load_data
    from mltk.evaluate import embed
    from mltk.model import load

    run, folder = trained_run
    model, data = load(run, device="cpu"), load_data(str(folder))
    in_ram = embed(model, data, batch_size=8, workers=0)
    on_disk = embed(model, data, batch_size=8, workers=0, out=tmp_path / "e.npy")
    assert isinstance(on_disk, np.memmap) and Path(on_disk.filename) == (tmp_path / "e.npy").resolve()
    np.testing.assert_allclose(on_disk, in_ram, atol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.npy"]
    calls = []

    def fail_on_the_third_batch(images):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the device fell over")
        return original(images)

    original = model.embedder.embed
    monkeypatch.setattr(model.embedder, "embed", fail_on_the_third_batch)
    with pytest.raises(RuntimeError, match="fell over"):
        embed(model, data, batch_size=8, workers=0, out=tmp_path / "f.npy")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["e.npy"]  # no f.npy, no temporary file


def test_evaluate_streams_saved_embeddings_and_states_the_index_cost(trained_run, mltk_main, tmp_path):
    run, folder = trained_run
    code, out, err = mltk_main("evaluate", run, "--data", folder, "--index", "hnsw", "--ef-search", "16", "--save-embeddings", "--no-report", "--workers", "0", "--out", tmp_path / "e")
    assert code == 0, err
    values = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert values["index"] == "hnsw" and values["index_ef_search"] == 16 and values["index_check_queries"] == 40
    assert 0 <= values["index_recall@8"] <= 1 and "index_check_recall@1_exact" in values
    assert "hnsw index: found" in out and "of the exact 8 nearest neighbours" in out and "recall@1 on them" in out
    assert np.load(tmp_path / "e" / "embeddings.npy").shape == (40, 16)
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["embeddings.npy", "labels.npy", "metrics.json", "paths.txt", "thresholds.json"]
    code, _, err = mltk_main("evaluate", run, "--data", folder, "--nprobe", "4")
    assert code == 2 and err.strip() == "error: --nprobe goes with --index ivf or ivfpq, --ef-search with --index hnsw"


@pytest.fixture(scope="module")
def index_dir(trained_run, tmp_path_factory):
    from conftest import run_mltk

    run, folder = trained_run
    out = tmp_path_factory.mktemp("indexes") / "gallery"
    result = run_mltk("index", str(run), "--data", str(folder), "--out", str(out), "--kind", "ivf", "--workers", "0")
    assert result.returncode == 0, result.stderr
    assert "indexed 40 images (16 dimensions): ivf index (nlist 1, nprobe 1)" in result.stdout
    return out


def test_an_index_directory_is_self_contained(index_dir, trained_run):
    import mltk

    _, folder = trained_run
    names = {"index.faiss", "embeddings.npy", "paths.txt", "labels.npy", "classes.json", "model.pt", "meta.json"}
    assert {p.name for p in index_dir.iterdir()} == names
    assert not [p for p in index_dir.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    meta = json.loads((index_dir / "meta.json").read_text())
    assert (meta["kind"], meta["dim"], meta["count"], meta["metric"]) == ("ivf", 16, 40, "inner_product")
    assert meta["params"] == {"nlist": 1, "nprobe": 1} and meta["mltk_version"] == mltk.__version__
    paths = (index_dir / "paths.txt").read_text().splitlines()
    labels, classes = np.load(index_dir / "labels.npy"), json.loads((index_dir / "classes.json").read_text())
    assert paths[5] == str((folder / "class_01" / "1.png").resolve()) and classes[labels[5]] == "class_01"
    model = mltk.load(index_dir / "model.pt", device="cpu")  # the model travels with the index
    vectors = model.embed([paths[0], paths[37]]).numpy()
    np.testing.assert_allclose(vectors, np.load(index_dir / "embeddings.npy")[[0, 37]], atol=1e-5)


def test_search_finds_a_gallery_image_first_with_score_one(index_dir, trained_run, mltk_main):
    _, folder = trained_run
    query, other = folder / "class_03" / "2.png", folder / "class_07" / "0.png"
    code, out, err = mltk_main("search", index_dir, query, other, "--k", "3", "--json")
    assert code == 0, err
    results = json.loads(out)  # stdout is the JSON document and nothing else
    assert [r["query"] for r in results] == [str(query), str(other)]
    for result, image, name in zip(results, (query, other), ("class_03", "class_07")):
        first = result["neighbours"][0]
        assert first["path"] == str(image.resolve()) and first["class"] == name and first["score"] == pytest.approx(1.0, abs=1e-5)
        assert [n["rank"] for n in result["neighbours"]] == [1, 2, 3]
        scores = [n["score"] for n in result["neighbours"]]
        assert scores == sorted(scores, reverse=True)
    code, out, err = mltk_main("search", index_dir, query, "--k", "2")
    assert code == 0, err
    assert "class_03" in out and "2.png" in out and "1.0000" in out


def test_search_errors_are_one_line(index_dir, trained_run, mltk_main, tmp_path):
    _, folder = trained_run
    query = folder / "class_03" / "2.png"
    (tmp_path / "broken.png").write_text("not an image")
    cases = [
        ((tmp_path / "nowhere", query), "does not exist"),
        ((folder, query), "is not an mltk index directory"),
        ((index_dir, tmp_path / "broken.png"), "broken.png' cannot be read: not an image"),
        ((index_dir, tmp_path / "missing.png"), "missing.png' cannot be read: does not exist"),
        ((index_dir, query, "--k", "41"), "k=41: give 1 to 40"),
        ((index_dir, query, "--ef-search", "8"), "ef_search applies to an hnsw index"),
    ]
    for args, message in cases:
        code, out, err = mltk_main("search", *args)
        assert code != 0 and out == "" and err.startswith("error: ") and message in err, (args, err)
        assert len(err.strip().splitlines()) == 1


def test_an_index_directory_is_replaced_whole_or_not_at_all(trained_run, tmp_path, monkeypatch):
    from mltk.data import load_data
    from mltk.model import load

    run, folder = trained_run
    model, data = load(run, device="cpu"), load_data(str(folder))
    out = tmp_path / "idx"
    mindex.write_index_dir(model, data, out, "flat", workers=0)
    before = (out / "meta.json").read_text()

    def broken(*args, **kwargs):
        raise RuntimeError("interrupted while building")

    monkeypatch.setattr(mindex, "build", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        mindex.write_index_dir(model, data, out, "hnsw", workers=0)
    assert (out / "meta.json").read_text() == before and sorted(p.name for p in tmp_path.iterdir()) == ["idx"]
    monkeypatch.undo()
    written, _ = mindex.write_index_dir(model, data.rows(list(range(20))), out, "hnsw", workers=0)
    assert mindex.open_index_dir(out).meta["count"] == 20 == written.index.ntotal
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(MltkError, match="is a folder that is not an mltk index"):
        mindex.write_index_dir(model, data, tmp_path / "notes", workers=0)
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def test_index_options_of_another_kind_are_refused(trained_run, mltk_main, tmp_path):
    run, folder = trained_run
    code, _, err = mltk_main("index", run, "--data", folder, "--out", tmp_path / "i", "--kind", "hnsw", "--nprobe", "4")
    assert code == 2 and "--nprobe: not an option of --kind hnsw" in err and not (tmp_path / "i").exists()


def test_an_index_refuses_a_model_pt_that_did_not_embed_its_gallery(index_dir, trained_run, tmp_path, mltk_main):
    import shutil

    from conftest import one_line_error

    from mltk.checkpoint import load_checkpoint, save_checkpoint
    from mltk.model import load

    _, folder = trained_run
    query = folder / "class_03" / "2.png"
    copy = tmp_path / "index"
    shutil.copytree(index_dir, copy)
    meta = json.loads((copy / "meta.json").read_text())
    assert meta["model"] == load(index_dir / "model.pt", device="cpu").fingerprint()  # recorded, calibrated or not
    state = load_checkpoint(copy / "model.pt")
    state["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in state["model"].items()}  # another model, same dimensions
    save_checkpoint(state, copy / "model.pt")
    line = one_line_error(mltk_main("search", copy, query), 1)
    assert "model.pt is not the model that embedded the gallery" in line, line
    # An index of an mltk that did not record the fingerprint still opens; it only lacks this check.
    (copy / "meta.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "model"}))
    code, out, err = mltk_main("search", copy, query, "--json")
    assert code == 0 and len(json.loads(out)[0]["neighbours"]) == 5, err
    (copy / "meta.json").write_text(json.dumps({**meta, "model": 7}))
    assert "meta.json['model'] must be text, got 7" in one_line_error(mltk_main("search", copy, query), 1)


def test_a_full_disk_while_writing_an_index_keeps_the_earlier_one(trained_run, tmp_path, mltk_main, monkeypatch):
    import errno

    from conftest import one_line_error

    import mltk.checkpoint

    run, folder = trained_run
    code, _, err = mltk_main("index", run, "--data", folder, "--out", tmp_path / "idx", "--workers", "0")
    assert code == 0, err
    before = {p.name: p.read_bytes() for p in (tmp_path / "idx").iterdir()}

    def full(state, path):
        path.write_bytes(b"PK\x03\x04")  # part of it, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(mltk.checkpoint, "save_checkpoint", full)
    line = one_line_error(mltk_main("index", run, "--data", folder, "--out", tmp_path / "idx", "--kind", "hnsw", "--workers", "0"), 1)
    assert line == f"error: no space left on device writing index directory {str(tmp_path / 'idx')!r}; nothing there was changed", line
    assert {p.name: p.read_bytes() for p in (tmp_path / "idx").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["idx"]  # no temporary left beside it


def test_index_never_replaces_its_own_input(trained_run, mltk_main, tmp_path):
    """mltk replaces only what it wrote, never its own input: `mltk index IDX/model.pt --out IDX` would delete the model it reads."""
    from conftest import one_line_error, snapshot

    run, folder = trained_run
    assert mltk_main("index", run, "--data", folder, "--out", tmp_path / "idx", "--workers", "0")[0] == 0
    before = snapshot(tmp_path)
    line = one_line_error(mltk_main("index", tmp_path / "idx" / "model.pt", "--data", folder, "--out", tmp_path / "idx", "--workers", "0"), code=1)
    model = str(tmp_path / "idx" / "model.pt")
    assert line == f"error: --out {str(tmp_path / 'idx')!r} holds RUN {model!r}, an input of this command; mltk never replaces its own input: give a new or empty folder"
    assert snapshot(tmp_path) == before


# ---- galleries without classes ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def unlabelled_gallery(trained_run, tmp_path_factory) -> Path:
    """Eight images lying directly in one folder: a gallery without classes."""
    import shutil

    _, folder = trained_run
    root = tmp_path_factory.mktemp("unlabelled") / "gallery"
    root.mkdir()
    for i, image in enumerate(sorted(folder.glob("class_03/*.png")) + sorted(folder.glob("class_07/*.png"))):
        shutil.copy(image, root / f"img_{i}.png")
    return root


def test_an_unlabelled_gallery_is_indexed_and_searched_without_classes(trained_run, unlabelled_gallery, mltk_main, tmp_path):
    run, folder = trained_run
    out = tmp_path / "idx"
    code, stdout, err = mltk_main("index", run, "--data", unlabelled_gallery, "--out", out, "--workers", "0", "--calibrate", folder)
    assert code == 0, err
    assert "indexed 8 images without classes (16 dimensions): flat index" in stdout and "match threshold at" in stdout
    assert json.loads((out / "classes.json").read_text()) == [] and np.load(out / "labels.npy").tolist() == [-1] * 8
    opened = mindex.open_index_dir(out)
    assert opened.classes == [] and opened.meta["count"] == 8
    query = unlabelled_gallery / "img_5.png"
    code, stdout, err = mltk_main("search", out, query, "--k", "3", "--json")
    assert code == 0, err
    result = json.loads(stdout)[0]
    first = result["neighbours"][0]
    assert first["path"] == str(query.resolve()) and first["score"] == pytest.approx(1.0, abs=1e-5)
    assert all(n["class"] is None and n["label"] is None for n in result["neighbours"])
    assert first["match"] is True and result["match"] is True and result["threshold"] is not None  # calibrated on labelled images
    code, stdout, err = mltk_main("search", out, query, "--k", "2")
    assert code == 0, err
    header = next(line for line in stdout.splitlines() if "rank" in line)
    assert "match" in header and "path" in header and "class" not in header and "img_5.png" in stdout


def test_an_unlabelled_index_opens_only_when_its_labels_and_classes_agree(trained_run, unlabelled_gallery, tmp_path):
    from mltk.model import load

    run, _ = trained_run
    written, _ = mindex.write_index_dir(load(run, device="cpu"), mindex.load_gallery(str(unlabelled_gallery)), tmp_path / "idx", workers=0)
    assert written.classes == [] and written.labels.tolist() == [-1] * 8
    labels = np.full(8, -1)
    labels[2] = 0
    np.save(tmp_path / "idx" / "labels.npy", labels)  # a class label, and no classes
    with pytest.raises(MltkError, match=r"classes.json holds \[\] \(a gallery without classes\) but labels.npy has label 0 at row 2; without classes every label is -1"):
        mindex.open_index_dir(tmp_path / "idx")
    np.save(tmp_path / "idx" / "labels.npy", np.full(8, -1))
    (tmp_path / "idx" / "classes.json").write_text('["a"]')  # a class, and labels without one
    with pytest.raises(MltkError, match=r"labels.npy has label -1 at row 0; classes.json names 1 classes"):
        mindex.open_index_dir(tmp_path / "idx")


def test_a_gallery_without_classes_is_a_flat_folder_or_said_with_unlabelled(tmp_path, mltk_main, trained_run):
    from PIL import Image

    from conftest import one_line_error

    def image(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(path)

    for name in ("nested/2023/a.png", "nested/2024/b.png", "mixed/top.png", "mixed/cats/c.png", "mixed/.thumbs/t.png"):
        image(tmp_path / name)
    nested = mindex.load_gallery(str(tmp_path / "nested"))  # subfolders: class folders, as --data reads them
    assert nested.classes == ["2023", "2024"]
    nested = mindex.load_gallery(str(tmp_path / "nested"), unlabelled=True)
    assert nested.classes == [] and nested.labels == [-1, -1] and [p.name for p in nested.sources] == ["a.png", "b.png"]
    mixed = mindex.load_gallery(str(tmp_path / "mixed"), unlabelled=True)  # every image under it, hidden folders left out
    assert [p.name for p in mixed.sources] == ["c.png", "top.png"]
    with pytest.raises(UsageError, match="--unlabelled takes a folder of images"):
        mindex.load_gallery(str(tmp_path / "mixed" / "top.png"), unlabelled=True)
    run, _ = trained_run
    line = one_line_error(mltk_main("index", run, "--data", tmp_path / "mixed", "--out", tmp_path / "idx", "--workers", "0"), 1)
    assert "holds images directly in it and in subfolders" in line and line.endswith("give --unlabelled to index them all without classes, or move the ones at its top into class folders")
    assert not (tmp_path / "idx").exists()


# ---- hostile input: folders that are not indexes, tampered index directories, kills mid-way, markup in names


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


# ---- --out that is not an index is never removed


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
    assert "is an mltk index but also holds 'crops', 'my_notes.txt'" in line and line.endswith("replacing the index would delete; mltk replaces only what it wrote: give a new or empty folder")
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


# ---- a bad --out or option is refused before the model loads


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


# ---- a tampered index directory is one line naming the file


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
    "meta dim a string": (index_rewrite_meta(dim="16"), "meta.json['dim'] must be an integer of at least 1, got '16'"),
    "meta count a bool": (index_rewrite_meta(count=True), "meta.json['count'] must be an integer of at least 1, got True"),
    "meta params a list": (index_rewrite_meta(params=[]), "meta.json['params'] must be a mapping of names to a whole number, got []"),
    "meta kind unknown": (index_rewrite_meta(kind="annoy"), "meta.json['kind'] must be one of 'flat', 'ivf', 'ivfpq', 'hnsw', got 'annoy'"),
    "meta kind another": (index_rewrite_meta(kind="hnsw"), "index.faiss has kind flat; meta.json says hnsw"),
    "meta dim wrong": (index_rewrite_meta(dim=32), "index.faiss has dim 16; meta.json says 32"),
    "meta count wrong": (index_rewrite_meta(count=41), "index.faiss has count 40; meta.json says 41"),
    "meta count zero": (index_rewrite_meta(count=0), "meta.json['count'] must be an integer of at least 1, got 0"),
    "meta run not text": (index_rewrite_meta(run=["x"]), "meta.json['run'] must be text, got ['x']"),
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


# ---- temporaries a kill left are removed by the next run


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
    dead = dead_pid()
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
    dead = dead_pid()
    (tmp_path / f".idx.tmp-{dead}").mkdir()
    before = snapshot(tmp_path)
    one_line_error(mltk_main("index", tmp_path / "no-run", "--data", tmp_path / "no-data", "--out", index_copy))
    assert snapshot(tmp_path) == before  # bad input changes nothing, stale temporaries included


# ---- query images, display, search options


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


def test_search_prints_names_from_the_index_as_text_not_markup(index_copy, trained_run, mltk_main, tmp_path, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")  # nothing wraps, however long the temporary folder's path
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


# ---- other holes of the same kind


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


@pytest.mark.parametrize("change, refused", [
    (lambda gallery: {"kind": "hnsw", "options": {"nprobe": 8}}, "--nprobe: not an option of --kind hnsw (ivf: --nlist, --nprobe; ivfpq: those and --pq-m; hnsw: --m, --ef-search)"),
    (lambda gallery: {"kind": "flat", "options": {"nlist": 4, "m": 8}}, "--m, --nlist: not an option of --kind flat"),
    (lambda gallery: {"far": 1e-3}, "--far picks an operating point of --calibrate; give --calibrate EVAL_DIR_OR_DATA too"),
    (lambda gallery: {"kind": "ivf", "options": {"nlist": 0}}, "nlist=0: it is at least 1"),
    (lambda gallery: {"out": gallery}, "is --data"),
])
def test_an_index_request_that_contradicts_itself_is_refused_by_its_check_before_the_model_loads(change, refused, tmp_path, monkeypatch):
    import dataclasses

    import mltk.model
    from mltk.index import IndexRequest

    monkeypatch.setattr(mltk.model, "load", lambda *a, **k: pytest.fail("the model loaded before the request was checked"))
    gallery = make_image_folder(tmp_path / "gallery", classes=2, per_class=1)
    request = dataclasses.replace(IndexRequest(tmp_path / "run", str(gallery), tmp_path / "idx"), **change(gallery))
    with pytest.raises(MltkError, match=re.escape(refused)):
        request.check()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gallery"]
