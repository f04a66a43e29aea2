"""The registry lists and creates every built-in; plugins come and go through the same hooks."""

import json

import pytest
import torch

import mltk
from conftest import plugins_data_builder, plugins_data_losses
from mltk import registry
from mltk.errors import UsageError
from mltk.plugins import errors, pm

# Small towers keep the Swin and hybrid builders cheap on the CPU.
TINY_SWIN = dict(model="swin_tiny_patch4_window7_224", img_size=32, embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=4)
TINY_BACKBONES = {
    "resnet50": ({}, 2048),
    "resnet101": ({}, 2048),
    "swin": (TINY_SWIN, 32),
    "hybrid": (
        dict(cnn="resnet18", img_size=32, swin_kwargs={k: v for k, v in TINY_SWIN.items() if k not in ("model", "img_size")}, swin_model="swin_tiny_patch4_window7_224"),
        512 + 32,
    ),
}


def builtin_names(kind):
    return [n for n, e in registry.catalogue(kind).items() if e.description.partition(";")[0] not in ("timm", "pytorch-metric-learning")]


def test_list_is_sorted_and_matches_fnmatch():
    assert registry.list_losses("arc*") == ["arcface"]
    assert registry.list_backbones("resnet10?") == ["resnet10t", "resnet101"]  # natural order: 10 before 101
    everything = registry.list_miners()
    assert everything == sorted(everything) and "hard" in everything and "MultiSimilarityMiner" in everything


class _Numbered:
    @mltk.hookimpl
    def register_losses(self, register):
        for name in ("loss10", "loss2", "loss1", "Loss3", "loss2b"):
            register(name, lambda num_classes, embedding_size: name)


def test_names_are_listed_in_natural_order(plugin, mltk_main):
    plugin(_Numbered(), "numbered")
    assert registry.list_losses("*oss[0-9]*") == ["Loss3", "loss1", "loss2", "loss2b", "loss10"]
    code, out, _ = mltk_main("list", "losses", "loss*")
    assert code == 0 and [line.split()[0] for line in out.splitlines()[1:]] == ["loss1", "loss2", "loss2b", "loss10"]


def test_every_timm_model_and_pml_class_is_reachable():
    import timm
    from pytorch_metric_learning import losses, miners

    assert set(timm.list_models()) <= set(registry.list_backbones())
    assert {"ArcFaceLoss", "TripletMarginLoss", "CosFaceLoss", "SubCenterArcFaceLoss"} <= set(registry.list_losses())
    assert "BaseMetricLossFunction" not in registry.list_losses()
    needs = {"RankedListLoss": dict(margin=0.4, Tn=1.0)}  # PML gives these no default
    for name in registry.list_losses():
        loss = registry.create_loss(name, num_classes=5, embedding_size=8, **needs.get(name, {}))
        assert isinstance(loss, losses.BaseMetricLossFunction)
    with pytest.raises(UsageError, match="loss 'RankedListLoss': .*missing 2 required positional arguments: 'margin' and 'Tn'"):
        registry.create_loss("RankedListLoss", num_classes=5, embedding_size=8)
    for name in registry.list_miners():
        assert isinstance(registry.create_miner(name), miners.BaseMiner)


@pytest.mark.parametrize("name", sorted(TINY_BACKBONES))
def test_builtin_backbone_gives_announced_width(name):
    assert set(builtin_names("backbones")) == set(TINY_BACKBONES)
    kwargs, width = TINY_BACKBONES[name]
    model = registry.create_backbone(name, pretrained=False, **kwargs).eval()
    assert model.num_features == width
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, width)


def test_timm_name_builds_a_headless_model():
    model = registry.create_backbone("resnet18").eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, model.num_features) == (1, 512)


def test_local_weights_file_is_loaded(tmp_path):
    source = registry.create_backbone("resnet18")
    torch.save(source.state_dict(), tmp_path / "w.pt")
    loaded = registry.create_backbone("resnet18", weights=str(tmp_path / "w.pt"))
    assert torch.equal(loaded.conv1.weight, source.conv1.weight)
    assert not torch.equal(registry.create_backbone("resnet18").conv1.weight, source.conv1.weight)


def test_builtin_losses_own_their_parameters():
    shapes = {n: [tuple(p.shape) for p in registry.create_loss(n, num_classes=7, embedding_size=4).parameters()] for n in builtin_names("losses")}
    assert shapes == {"center": [(7, 4)], "ce": [(7, 4), (7,)], "arcface": [(4, 7)]}


def test_digits_dataset_is_bundled():
    assert registry.list_datasets() == ["cars196", "cub200", "digits", "inshop", "sop"]  # the benchmarks read a root: docs/benchmarks.md
    data = registry.create_dataset("digits")
    assert len(data) == 1797 and data.classes == [str(i) for i in range(10)] and set(data.labels) == set(range(10))
    assert data.sources[0].size == (8, 8)


def test_unknown_name_suggests_close_matches():
    with pytest.raises(UsageError, match=r"unknown loss 'arcfce'; did you mean 'arcface'\?"):
        registry.create_loss("arcfce", num_classes=2, embedding_size=2)
    with pytest.raises(UsageError, match="unknown backbone 'zzzz'; see `mltk list backbones`"):
        registry.create_backbone("zzzz")


class _Extra:
    @mltk.hookimpl
    def register_losses(self, register):
        register("triplet_preset", lambda num_classes, embedding_size: "made")


class _Duplicate:
    @mltk.hookimpl
    def register_losses(self, register):
        register("ok_name", lambda num_classes, embedding_size: "ok")
        register("arcface", lambda num_classes, embedding_size: "impostor")


class _Raises:
    @mltk.hookimpl
    def register_miners(self, register):
        raise RuntimeError("boom")


def test_registering_and_unregistering_a_plugin_is_seen(plugin):
    plugin(_Extra(), "extra")
    assert registry.create_loss("triplet_preset", num_classes=1, embedding_size=1) == "made"
    assert registry.get("losses", "triplet_preset").plugin == "extra"
    pm.unregister(name="extra")
    assert "triplet_preset" not in registry.list_losses()


def test_duplicate_name_is_reported_with_both_plugins_and_the_rest_works(plugin):
    plugin(_Duplicate(), "dup")
    assert registry.get("losses", "arcface").plugin == "mltk.default_plugins.losses"
    assert "ok_name" not in registry.list_losses()  # the whole failing hook call is left out
    assert "center" in registry.list_losses()
    assert "'arcface' is already registered by 'mltk.default_plugins.losses'" in errors["dup"]


def test_raising_hook_is_reported_and_the_rest_works(plugin):
    plugin(_Raises(), "raiser")
    assert "hard" in registry.list_miners()
    assert errors["raiser"] == "register_miners: RuntimeError: boom"


# --- names a plugin registers are checked one by one; its other entries stay usable


@pytest.mark.parametrize(
    "bad",
    [42, None, "", "two words", "0.5*ce", "a+b", "[red]x[/red]", "x\x1b[2J", "tab\tname", "9lives", "x" * 101],
    ids=["int", "None", "empty", "space", "star", "plus", "markup", "ansi", "tab", "digit-first", "too-long"],
)
def test_a_bad_plugin_name_is_refused_alone_and_mltk_plugins_still_works(plugin, mltk_main, bad):
    plugin(plugins_data_losses((bad, plugins_data_builder, ""), ("pd_good.loss-1", plugins_data_builder, "")), "pd_names")
    assert "pd_good.loss-1" in registry.list_losses()  # the entry after the bad one is kept
    assert registry.create_loss("pd_good.loss-1", num_classes=2, embedding_size=2) == "built"
    assert "refused" in errors["pd_names"] and errors["pd_names"].startswith("register_losses: loss name ")
    code, out, err = mltk_main("plugins", "--json")
    assert code == 0, err
    row = {r["name"]: r for r in json.loads(out)}["pd_names"]
    assert row["registers"] == {"losses": ["pd_good.loss-1"]} and "refused" in row["error"]
    code, out, err = mltk_main("plugins")
    assert code == 0 and "pd_names" in out and "refused" in out and "\x1b" not in out, err
    code, out, err = mltk_main("list", "losses", "pd_*")
    assert code == 0 and out.split() == ["name", "plugin", "description", "pd_good.loss-1", "pd_names"]
    assert "warning: plugin 'pd_names' failed: register_losses: loss name " in err and "\x1b" not in err


def test_every_name_the_registry_takes_can_be_written_in_a_loss_spec(plugin):
    from mltk.config import parse_loss_spec

    names = ["pd_a", "_pd", "pd.b-2", "pd_" + "x" * 90, "pdé"]
    plugin(plugins_data_losses(*[(n, plugins_data_builder, "") for n in names]), "pd_spec")
    assert set(names) <= set(registry.list_losses()) and "pd_spec" not in errors
    assert [n for _, n in parse_loss_spec("+".join(f"0.5*{n}" for n in names))] == names


def test_a_builder_that_is_not_callable_or_a_description_that_is_not_text_is_refused(plugin, mltk_main):
    plugin(plugins_data_losses(("pd_five", 5, ""), ("pd_desc", plugins_data_builder, ["a", "list"]), ("pd_fine", plugins_data_builder, "ok")), "pd_kinds")
    assert {"pd_five", "pd_desc"}.isdisjoint(registry.list_losses()) and "pd_fine" in registry.list_losses()
    assert "'pd_five' refused: its builder is a int" in errors["pd_kinds"] and "'pd_desc' refused: its description is a list" in errors["pd_kinds"]
    code, out, err = mltk_main("list", "losses", "pd_*")
    assert code == 0 and "pd_fine" in out, err
