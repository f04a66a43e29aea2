"""--weights FILE takes checkpoints in the layouts timm converts: each goes through timm's filter for the
architecture, then the strict key check, which still names the keys that differ."""

import re

import pytest
import timm
import torch
import torchvision

from mltk.default_plugins.backbones import timm_filter
from mltk.errors import MltkError
from mltk.model import read_state_dict
from mltk.registry import create_backbone

SWIN = "swin_tiny_patch4_window7_224"


def test_torchvision_resnet18_loads_into_timm_resnet18(tmp_path):
    """timm's ResNet keeps torchvision's names (it has no filter): the file loads as it is, fc.* dropped."""
    source = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    state = source.state_dict()
    assert {"fc.weight", "fc.bias"} <= set(state)
    torch.save(state, tmp_path / "tv.pth")
    loaded = create_backbone("resnet18", weights=str(tmp_path / "tv.pth")).eval()
    assert all(torch.equal(v, state[k]) for k, v in loaded.state_dict().items())
    source.fc = torch.nn.Identity()  # torchvision's pooled features are timm's headless output
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x))


@pytest.mark.parametrize("wrap", [
    lambda s: {"state_dict": s, "epoch": 3},
    lambda s: {"model": s, "optimizer": {}},  # the official Swin files
    lambda s: {"model": {f"module.{k}": v for k, v in s.items()}},  # saved from DistributedDataParallel
], ids=["state_dict", "model", "module-prefix"])
def test_weights_wrapped_the_usual_ways_are_unwrapped(tmp_path, wrap):
    state = {"conv1.weight": torch.randn(4, 3, 3, 3), "fc.bias": torch.randn(2)}
    torch.save(wrap(state), tmp_path / "w.pth")
    got = read_state_dict(tmp_path / "w.pth")
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)


def original_swin(model: torch.nn.Module) -> dict:
    """A timm Swin's weights laid out as microsoft/Swin-Transformer saves them: patch merging at the end of
    stages 0-2 (timm: start of 1-3), ``head.`` (timm: ``head.fc.``), and the buffers relative_position_index
    and attn_mask saved with the weights (timm does not persist them)."""
    state = {}
    for key, value in model.state_dict().items():
        key = re.sub(r"layers\.(\d+)\.downsample", lambda m: f"layers.{int(m[1]) - 1}.downsample", key)
        state[key.replace("head.fc.", "head.")] = value
    state.update((k, v) for k, v in model.named_buffers() if k.endswith(("relative_position_index", "attn_mask")))
    return state


@pytest.fixture(scope="module")
def swin_source():
    torch.manual_seed(0)
    return timm.create_model(SWIN, pretrained=False)  # with its 1000-way head, as the official checkpoints are


def test_original_swin_checkpoint_loads_into_timm_swin(swin_source, tmp_path):
    original = original_swin(swin_source)
    assert "layers.0.downsample.reduction.weight" in original and "layers.3.downsample.reduction.weight" not in original
    assert "head.weight" in original and "layers.0.blocks.1.attn_mask" in original
    torch.save({"model": original}, tmp_path / "swin_tiny_patch4_window7_224.pth")  # the official file nests under "model"
    loaded = create_backbone("swin", model=SWIN, weights=str(tmp_path / "swin_tiny_patch4_window7_224.pth"))
    expected = swin_source.state_dict()
    own = loaded.state_dict()
    assert set(own) == set(expected) - {"head.fc.weight", "head.fc.bias"}
    assert all(torch.equal(v, expected[k]) for k, v in own.items())
    assert torch.equal(own["layers.1.downsample.reduction.weight"], original["layers.0.downsample.reduction.weight"])


def test_converted_checkpoint_still_names_the_keys_that_differ(swin_source, tmp_path):
    original = original_swin(swin_source)
    del original["layers.2.blocks.3.attn.qkv.weight"]
    original["extra.weight"] = torch.zeros(1)
    torch.save({"model": original}, tmp_path / "cut.pth")
    with pytest.raises(MltkError, match=r"cut.pth' does not fit backbone 'swin_tiny_patch4_window7_224': "
                                        r"missing layers\.2\.blocks\.3\.attn\.qkv\.weight \(1\); unexpected extra\.weight \(1\)$"):
        create_backbone(SWIN, weights=str(tmp_path / "cut.pth"))


def test_a_layout_timm_cannot_convert_is_one_line(tmp_path):
    torch.save({"layers.9.blocks.0.attn.relative_position_bias_table": torch.zeros(169, 3)}, tmp_path / "odd.pth")
    with pytest.raises(MltkError, match=r"odd.pth' does not fit backbone 'swin_tiny_patch4_window7_224': timm's conversion failed \(\w+Error: .*\)$"):
        create_backbone(SWIN, weights=str(tmp_path / "odd.pth"))


def test_the_filter_is_the_one_timm_passes_for_the_architecture():
    """Read from timm's builder, not guessed from module names: this fails if timm changes how it passes it."""
    from timm.models import densenet, swin_transformer

    assert timm_filter(SWIN, {}, {})[1] is swin_transformer.checkpoint_filter_fn
    assert timm_filter("densenet121", {}, {})[1] is densenet._filter_torchvision_pretrained
    skeleton, convert = timm_filter("resnet18", {}, {})
    assert convert is None and skeleton.conv1.weight.is_meta


def test_weights_of_nans_are_refused_by_name_before_the_run_folder_is_made(mltk_main, image_folder, tmp_path):
    from safetensors.torch import save_file

    state = timm.create_model("test_resnet", num_classes=0).state_dict()
    state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, tmp_path / "nan.pt")
    with pytest.raises(MltkError, match=r"^weights file '.*nan.pt' holds NaN values in 'layer1.0.conv1.weight'; the file is damaged"):
        read_state_dict(tmp_path / "nan.pt")
    state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("-inf")
    save_file(state, tmp_path / "inf.safetensors")
    with pytest.raises(MltkError, match=r"holds infinite values in 'layer1.0.conv1.weight'"):
        read_state_dict(tmp_path / "inf.safetensors")
    args = ("run", "--data", image_folder, "--backbone", "test_resnet", "--image-size", "32", "--batch-size", "8", "--m-per-class", "2", "--workers", "0", "--out", tmp_path / "run")
    code, _, err = mltk_main(*args, "--weights", tmp_path / "nan.pt")
    assert code == 1 and err == f"error: weights file {str(tmp_path / 'nan.pt')!r} holds NaN values in 'layer1.0.conv1.weight'; " \
        "the file is damaged, or was saved from a run that diverged: give another\n"
    assert not (tmp_path / "run").exists()


def test_a_folder_given_as_weights_is_called_a_folder(tmp_path):
    with pytest.raises(MltkError, match=r"^weights file '.*' is a folder; give the path of a .pt/.pth/.safetensors file$"):
        read_state_dict(tmp_path)
    with pytest.raises(MltkError, match=r"^weights file '.*nowhere.pt' does not exist; give the path"):
        read_state_dict(tmp_path / "nowhere.pt")


def test_a_torchscript_file_is_named_as_one_with_no_warning_and_no_advice_to_unpickle(mltk_main, image_folder, tmp_path):
    import warnings

    import mltk

    path = tmp_path / "model.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; mltk export still writes it
        torch.jit.save(torch.jit.trace(torch.nn.Linear(3, 2), torch.randn(1, 3)), str(path))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(MltkError, match=r"^'.*model.pt' is a TorchScript file \(an mltk export\), not a checkpoint; give the run directory"):
            mltk.load(path)
        with pytest.raises(MltkError, match=r"^'.*model.pt' is a TorchScript file \(an mltk export\), not a weights file; give a state dict"):
            read_state_dict(path)
    assert [str(w.message) for w in caught] == []
    code, out, err = mltk_main("evaluate", path, "--data", image_folder, "--workers", "0")
    assert code == 1 and err.count("\n") == 1 and "TorchScript file" in err and "weights_only" not in err + out


def test_weights_of_another_architecture_name_the_keys(tmp_path):
    torch.save(create_backbone("resnet18").state_dict(), tmp_path / "resnet18.pt")
    with pytest.raises(MltkError, match=r"resnet18.pt' does not fit backbone 'test_resnet': missing .* \(\d+\); unexpected .* \(\d+\)$"):
        create_backbone("test_resnet", weights=str(tmp_path / "resnet18.pt"))
    torch.save(create_backbone("test_resnet", in_chans=1).state_dict(), tmp_path / "grey.pt")
    with pytest.raises(MltkError, match=r"grey.pt' does not fit backbone 'test_resnet': .*conv1.*"):
        create_backbone("test_resnet", weights=str(tmp_path / "grey.pt"))
