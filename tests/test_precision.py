"""Mixed precision's default (mltk.devices.cpu_bf16, mltk.train.default_amp): bf16 autocast on a CUDA GPU and on a CPU
with bf16 dot products (AMX or AVX512-BF16), float32 on any other CPU; and the precision the steps used, in
metrics.jsonl and the run's summary. The CPU's features are faked both ways, so these hold on any machine."""

import json

import pytest
import torch
import yaml

from conftest import RUN_ARGS
from mltk import devices
from mltk.devices import cpu_bf16, cpu_flags
from mltk.train import default_amp, precision_reason

CPUINFO = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512f {extra}\nbugs\t\t: sysret_ss_attrs\n\n"


def fake_cpu(monkeypatch, amx: bool | None, avx512_bf16: bool | None) -> None:
    """torch.cpu's tests of AMX and AVX512-BF16 answer ``amx`` and ``avx512_bf16``; None: this torch has no such test."""
    for name, answer in (("_is_amx_tile_supported", amx), ("_is_avx512_bf16_supported", avx512_bf16)):
        if answer is None:
            monkeypatch.delattr(torch.cpu, name, raising=False)
        else:
            monkeypatch.setattr(torch.cpu, name, lambda answer=answer: answer)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: True)


@pytest.mark.parametrize("amx, avx512_bf16, found", [
    (True, True, "AMX"),  # Sapphire Rapids and later have both: AMX is the faster
    (False, True, "AVX512-BF16"),  # AMD Zen 4 and 5, Intel Cooper Lake
    (False, False, None),  # e.g. AMD Zen 3, Intel Ice Lake: bf16 would be emulated
])
def test_torch_s_own_tests_tell_the_cpu_s_bf16_feature(monkeypatch, amx, avx512_bf16, found):
    fake_cpu(monkeypatch, amx, avx512_bf16)
    monkeypatch.setattr(devices, "CPUINFO", "/nonexistent/cpuinfo")  # torch answers; the flags are not read
    assert cpu_bf16() == found
    assert default_amp(torch.device("cpu"))[0] is (found is not None)


@pytest.mark.parametrize("extra, found", [
    ("avx512_bf16 amx_bf16 amx_tile", "AMX"),
    ("avx512_bf16", "AVX512-BF16"),
    ("avx512_vnni", None),
])
def test_without_torch_s_tests_linux_s_cpu_flags_tell(monkeypatch, tmp_path, extra, found):
    fake_cpu(monkeypatch, None, None)
    (tmp_path / "cpuinfo").write_text(CPUINFO.format(extra=extra) * 2)
    monkeypatch.setattr(devices, "CPUINFO", str(tmp_path / "cpuinfo"))
    assert cpu_bf16() == found


def test_no_cpuinfo_and_no_torch_tests_is_float32(monkeypatch):
    """Not Linux, and a torch that cannot tell: the safe side, float32."""
    fake_cpu(monkeypatch, None, None)
    monkeypatch.setattr(devices, "CPUINFO", "/nonexistent/cpuinfo")
    assert cpu_flags() == set()
    assert cpu_bf16() is None and default_amp(torch.device("cpu"))[0] is False


def test_a_torch_without_onednn_is_float32_whatever_the_cpu(monkeypatch):
    fake_cpu(monkeypatch, True, True)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    assert cpu_bf16() is None


def test_the_default_on_other_devices(monkeypatch):
    fake_cpu(monkeypatch, True, True)  # the host CPU does not matter off the CPU
    assert default_amp(torch.device("cuda"))[0] is True
    assert default_amp(torch.device("mps"))[0] is False
    assert precision_reason(None, False, torch.device("cuda")) == "default on a GPU"
    assert precision_reason(None, False, torch.device("mps")) == "default on MPS"
    assert precision_reason(False, False, torch.device("cpu")) == "as asked: amp false"
    assert precision_reason(None, True, torch.device("cpu")) == precision_reason(True, True, torch.device("cpu")) == "the run's own setting"


def words(text: str) -> str:
    """The summary's words, however rich wrapped its table."""
    return " ".join(text.split())


def weights(run_dir):
    return torch.load(run_dir / "last.pt", weights_only=True)["model"]


@pytest.mark.parametrize("feature", [None, "AVX512-BF16", "AMX"])
def test_mltk_run_s_default_follows_the_cpu_and_says_so(feature, mltk_main, image_folder, tmp_path, monkeypatch):
    """Faked without bf16 the default run is float32, step for step what --no-amp trains; faked with it, bf16 autocast,
    step for step what --amp trains. config.yaml, metrics.jsonl and the summary say which."""
    fake_cpu(monkeypatch, feature == "AMX", feature is not None)
    args = ["run", *RUN_ARGS, "--epochs", "2", "--data", image_folder, "--quiet"]
    code, out, err = mltk_main(*args, "--out", tmp_path / "default")
    assert code == 0, err
    explicit = "--amp" if feature else "--no-amp"
    code, explicit_out, err = mltk_main(*args, explicit, "--out", tmp_path / "explicit")
    assert code == 0, err

    name = "bf16" if feature else "fp32"
    for run in ("default", "explicit"):
        records = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        assert [r["precision"] for r in records] == [name, name]
        assert yaml.safe_load((tmp_path / run / "config.yaml").read_text())["amp"] is (feature is not None)
    default, chosen = weights(tmp_path / "default"), weights(tmp_path / "explicit")
    assert all(torch.equal(default[k], chosen[k]) for k in default)  # the same arithmetic as the option's
    if feature:
        assert f"precision bf16 autocast (default: this CPU has {feature})" in words(out)
        assert "precision bf16 autocast (as asked: amp true)" in words(explicit_out)
    else:
        assert "precision float32 (default: this CPU has no AMX or AVX512-BF16)" in words(out)
        assert "precision float32 (as asked: amp false)" in words(explicit_out)


def test_bf16_and_float32_steps_differ(image_folder, tmp_path, monkeypatch):
    """The precision is not a label only: the same seed trained with --amp and --no-amp ends on other weights."""
    from conftest import run_config
    from mltk.train import train

    for amp in (True, False):
        result = train(run_config(image_folder, amp=amp), tmp_path / str(amp))
        assert result.precision == ("bf16" if amp else "fp32")
    bf16, fp32 = weights(tmp_path / "True"), weights(tmp_path / "False")
    assert any(not torch.equal(bf16[k], fp32[k]) for k in bf16 if bf16[k].is_floating_point())


def test_a_resumed_run_keeps_its_precision_on_a_cpu_without_bf16(mltk_main, image_folder, tmp_path, monkeypatch):
    """A run started where bf16 was the default goes on in bf16 elsewhere: a resumed run keeps its settings."""
    fake_cpu(monkeypatch, True, True)
    args = ["run", *RUN_ARGS, "--data", image_folder, "--out", tmp_path / "run", "--quiet"]
    code, _, err = mltk_main(*args, "--epochs", "1")
    assert code == 0, err
    fake_cpu(monkeypatch, False, False)
    code, out, err = mltk_main(*args, "--epochs", "2", "--resume")
    assert code == 0, err
    assert "precision bf16 autocast (the run's own setting)" in words(out)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["precision"] for r in records] == ["bf16", "bf16"]


def test_the_summary_shows_the_precision_beside_the_last_epoch(capsys, tmp_path):
    from mltk.cli.run import render_summary
    from mltk.train import RunResult

    record = {"epoch": 3, "loss": 1.5, "precision": "bf16", "images_per_s": 250.0, "seconds": 2.0, "val_recall@1": 0.75}
    render_summary(RunResult(tmp_path, history=[record], train_images=4, train_classes=2, precision="bf16", precision_reason="default: this CPU has AMX"))
    out = words(capsys.readouterr().out)
    assert "images/s 250 val recall@1 0.7500 precision bf16 autocast (default: this CPU has AMX)" in out
