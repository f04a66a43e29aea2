"""mltk.knn's search on the GPUs, seen through faiss's GPU functions (faked: the tests run without a GPU)."""

import warnings

import faiss
import numpy as np
import pytest

from mltk import knn


@pytest.fixture
def vectors():
    x = np.random.default_rng(0).standard_normal((400, 16)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def fake_gpus(monkeypatch, copy):
    """faiss sees one GPU; ``copy`` stands in for index_cpu_to_all_gpus. Returns the indexes it was asked to copy."""
    asked = []

    def to_gpus(index, co=None):
        asked.append(index.ntotal)
        return copy(index)

    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 1)
    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", to_gpus)
    return asked


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_the_gpu_copy_of_an_index_is_made_once_for_its_searches(monkeypatch, vectors, kind):
    index = knn.build(vectors, kind, nlist=4)
    expected = [knn.search(index, vectors[rows], 5)[1] for rows in (slice(0, 20), slice(20, 40))]
    asked = fake_gpus(monkeypatch, faiss.clone_index)  # a CPU clone: what the GPU copy would answer
    found = [knn.search(index, vectors[rows], 5)[1] for rows in (slice(0, 20), slice(20, 40))]
    assert asked == [400] and all(np.array_equal(f, e) for f, e in zip(found, expected))
    index.add(vectors[:10])  # the copy no longer holds every vector: copied again
    knn.search(index, vectors[:20], 5)
    assert asked == [400, 410]
    if kind == "ivf":  # the copy searches with the nprobe it was copied with: a new one is copied again
        knn.configure(index, nprobe=2)
        knn.search(index, vectors[:20], 5)
        assert asked == [400, 410, 410]


def test_a_search_faiss_cannot_put_on_the_gpu_warns_once_and_runs_on_the_cpu(monkeypatch, vectors):
    index = knn.build(vectors, "flat")
    expected = knn.search(index, vectors[:20], 5)

    def refuse(index):
        raise RuntimeError("Error in GpuIndex: this form is not supported\nC++ stack trace")

    asked = fake_gpus(monkeypatch, refuse)
    with warnings.catch_warnings(record=True) as shown:
        warnings.simplefilter("always")
        results = [knn.search(index, vectors[:20], 5) for _ in range(2)]
    assert [str(w.message) for w in shown] == [
        "faiss cannot search this flat index on the GPU (Error in GpuIndex: this form is not supported); it is searched on the CPU"
    ]
    assert asked == [400] and all(np.array_equal(p, expected[1]) for _, p in results)
