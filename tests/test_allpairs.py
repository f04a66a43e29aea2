"""mltk.allpairs: where the all-pairs pass runs, and what a small evaluation costs it.

The pass's exactness is tested in tests/test_metrics.py (against scikit-learn and numpy) and tests/test_gpu_pass.py
(its two back ends, array for array)."""

import tracemalloc

import numpy as np
import pytest
import torch

from mltk import allpairs, gpu_pass, metrics
from mltk.metrics import evaluate_embeddings


def clustered(n=500, dim=32, classes=25, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    x = rng.standard_normal((classes, dim))[labels] + rng.standard_normal((n, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


class _NoGpuPass:
    def __init__(self, *args, **kwargs):
        raise AssertionError("the pass took the GPU path")


def see_a_gpu(patch):
    """torch says a GPU is there; the GPU consumers fail the test if the pass builds one."""
    patch.setattr(torch.cuda, "is_available", lambda: True)
    patch.setattr(torch.cuda, "device_count", lambda: 1)
    patch.setattr(gpu_pass, "BlockConsumer", _NoGpuPass)
    patch.setattr(gpu_pass, "RecountConsumer", _NoGpuPass)


def test_device_cpu_keeps_the_pass_on_the_cpu_where_a_gpu_is_seen(monkeypatch):
    x, labels = clustered(n=200)
    expected = evaluate_embeddings(x, labels).values
    with monkeypatch.context() as patch:
        see_a_gpu(patch)
        assert evaluate_embeddings(x, labels, device="cpu").values == expected
        with pytest.raises(AssertionError, match="GPU path"):  # no device given: the GPU torch sees, as before
            evaluate_embeddings(x, labels)
    ev = metrics.Evaluation(x, labels, device="cuda:1")
    assert allpairs._device(ev) == "cuda:1"
    for device in ("cpu", "mps", "meta"):  # any device but a CUDA one: the numba kernels, on the CPU
        assert allpairs._device(metrics.Evaluation(x, labels, device=device)) == "cpu"


def test_mltk_evaluate_on_the_cpu_runs_the_metrics_pass_on_the_cpu(monkeypatch, tmp_path):
    from conftest import make_image_folder

    from mltk.data import load_data
    from mltk.evaluate import evaluate, untrained_model

    folder = make_image_folder(tmp_path / "images", classes=2, per_class=3)
    model = untrained_model("test_resnet", image_size=32, device="cpu")  # as --device cpu makes it
    see_a_gpu(monkeypatch)
    result = evaluate(model, data=load_data(str(folder)), metrics=["roc_auc"], workers=0)
    assert result.values["pairs"] == 15 and 0 <= result.values["roc_auc"] <= 1


def test_a_small_evaluation_keeps_only_the_bins_it_uses(monkeypatch):
    """The fixed cost of a small evaluation: no (folds, 2, 2**20) histogram (168 MiB) and no 64 MiB block buffer
    for 500 items; the counts stay exact (every pair once)."""
    monkeypatch.setattr(allpairs, "_threads", lambda: 2)  # the threads' own histograms: 12 MiB each
    x, labels = clustered()
    evaluate_embeddings(x, labels)  # the kernels compiled or loaded outside the measurement
    tracemalloc.start()
    try:
        result = evaluate_embeddings(x, labels)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 100 * 2**20, peak / 2**20  # 272 MiB before
    counts = result.evaluation.pair_counts()
    assert counts.positive.sum() + counts.negative.sum() == 500 * 499 // 2 and (counts.positive + counts.negative).sum(0).all()


def test_a_run_on_the_cpu_validates_on_the_cpu_where_a_gpu_is_seen(monkeypatch):
    from mltk.train import recall_at_1

    x, labels = clustered(n=200)
    expected = recall_at_1(x, labels)
    see_a_gpu(monkeypatch)
    assert recall_at_1(x, labels, torch.device("cpu")) == expected
