"""mltk.devices: the one resolver of --device, for training, inference and the metrics pass."""

import pytest
import torch
from conftest import one_line_error

from mltk.devices import resolve_device
from mltk.errors import UsageError


def fake_gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_auto_is_the_cpu_without_a_gpu(monkeypatch):
    fake_gpus(monkeypatch, 0)
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")
    assert resolve_device("cpu", local_rank=3, distributed=True) == torch.device("cpu")


def test_auto_is_the_process_s_own_gpu(monkeypatch):
    fake_gpus(monkeypatch, 2)
    assert resolve_device("auto") == torch.device("cuda", 0)
    assert resolve_device("auto", local_rank=3) == torch.device("cuda", 1)  # more processes than GPUs: they share
    assert resolve_device("cuda", local_rank=1, distributed=True) == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda") and resolve_device("cuda:1") == torch.device("cuda", 1)


@pytest.mark.parametrize("requested, gpus, message", [
    ("cuda:2", 2, "--device 'cuda:2': there is no such CUDA GPU here (2 found); give --device cpu"),
    ("cuda", 0, "--device 'cuda': there is no such CUDA GPU here (0 found); give --device cpu"),
    ("gpu", 0, "--device 'gpu' is not a device torch knows; give cpu, cuda, cuda:1, mps, ..."),
])
def test_a_device_this_machine_lacks_is_one_line(monkeypatch, requested, gpus, message):
    fake_gpus(monkeypatch, gpus)
    with pytest.raises(UsageError) as refused:
        resolve_device(requested)
    assert str(refused.value) == message


def test_mps_or_xpu_where_there_is_none_is_one_line(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(UsageError, match=r"^--device 'mps': MPS is not available here; give --device cpu$"):
        resolve_device("mps")
    if hasattr(torch, "xpu"):
        monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
        with pytest.raises(UsageError, match=r"^--device 'xpu:0': XPU is not available here; give --device cpu$"):
            resolve_device("xpu:0")


def test_mltk_run_on_a_gpu_this_machine_lacks_is_refused_before_the_run_folder_is_made(monkeypatch, mltk_main, tmp_path):
    fake_gpus(monkeypatch, 0)
    line = one_line_error(mltk_main("run", "--data", "digits", "--device", "cuda:1", "--out", tmp_path / "run"), 2)
    assert line == "error: --device 'cuda:1': there is no such CUDA GPU here (0 found); give --device cpu"
    assert not (tmp_path / "run").exists()


def test_the_metrics_pass_and_inference_use_the_same_resolver(monkeypatch):
    from mltk import allpairs
    from mltk.model import inference_device

    class Evaluation:
        device = None

    for gpus, expected in ((0, "cpu"), (2, "cuda:0")):
        fake_gpus(monkeypatch, gpus)
        assert str(inference_device(None)) == allpairs._device(Evaluation()) == expected
