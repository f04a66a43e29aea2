"""mltk run: a short run writes its run directory, losses learn, resume is exact, examples build."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml

import mltk
from mltk.config import RunConfig, make_config, parse_loss_spec
from mltk.errors import UsageError
from mltk.checkpoint import load_checkpoint
from mltk.model import build_embedder
from mltk.losses import build_losses
from mltk.train import train

REPO = Path(__file__).resolve().parents[1]
TINY = dict(backbone="test_resnet", image_size=32, dim=16, batch_size=8, m_per_class=2, workers=0, epochs=2, seed=3)


def tiny_config(data, **overrides) -> RunConfig:
    return make_config({**TINY, "data": str(data), **overrides})


def test_short_run_writes_every_run_dir_file(image_folder, tmp_path):
    cfg = tiny_config(image_folder, loss="0.01*center+ce+arcface", val_data=str(image_folder), augment=True)
    result = train(cfg, tmp_path / "run")
    run = tmp_path / "run"
    assert sorted(p.name for p in run.iterdir()) == ["best.pt", "config.yaml", "last.pt", "metrics.jsonl"]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["loss"] == "0.01*center+ce+arcface" and saved["image_size"] == 32
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2] == [r["epoch"] for r in result.history]
    for key in ("loss", "loss/center", "loss/ce", "loss/arcface", "lr", "loss_lr", "images_per_s", "val_recall@1"):
        assert all(key in r for r in records), key
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["epoch"] == 2 and set(state["losses"]) == {"losses.center.centers", "losses.ce.classifier.weight", "losses.ce.classifier.bias", "losses.arcface.W"}


def test_loss_owned_parameters_change_after_a_step(image_folder):
    cfg = tiny_config(image_folder, loss="center+ce+arcface")
    losses = build_losses(cfg, num_classes=8, dim=16)
    before = {k: v.clone() for k, v in losses.state_dict().items()}
    model = build_embedder(cfg)
    optimizer = torch.optim.AdamW([{"params": model.parameters()}, {"params": losses.parameters(), "lr": 0.01}])
    images, labels = torch.randn(8, 3, 32, 32), torch.arange(4).repeat_interleave(2)
    total, parts = losses(model(images), labels)
    total.backward()
    optimizer.step()
    assert set(parts) == {"center", "ce", "arcface"}
    for name, value in losses.state_dict().items():
        assert not torch.equal(before[name], value), name


def test_loss_spec_weights_and_bad_input():
    assert parse_loss_spec("0.01*center+ce+arcface") == [(0.01, "center"), (1.0, "ce"), (1.0, "arcface")]
    for bad in ("x*center", "-1*ce", "center+center", "ce++arcface"):
        with pytest.raises(UsageError):
            parse_loss_spec(bad)
    with pytest.raises(UsageError, match="unknown key 'epoch' in config; did you mean 'epochs'"):
        make_config({"epoch": 3})


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(image_folder, tmp_path):
    cfg = tiny_config(image_folder, loss="0.1*center+arcface", augment=True, epochs=3)
    train(cfg, tmp_path / "straight")
    train(replace(cfg, epochs=1), tmp_path / "interrupted")  # stopped after epoch 1 ...
    train(cfg, tmp_path / "interrupted", resume=True)  # ... and resumed for epochs 2 and 3
    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(tmp_path / "interrupted" / "last.pt")
    assert a["epoch"] == b["epoch"] == 3
    for part in ("model", "losses"):
        for key in a[part]:
            assert torch.equal(a[part][key], b[part][key]), key
    history = (tmp_path / "interrupted" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in history] == [1, 2, 3]


def test_hybrid_at_8192_dims_trains_a_step_on_the_cpu(image_folder, tmp_path):
    towers = dict(cnn="resnet18", swin_model="swin_tiny_patch4_window7_224", swin_kwargs=dict(embed_dim=16, depths=[1, 1], num_heads=[1, 2], window_size=4))
    cfg = tiny_config(image_folder, backbone="hybrid", backbone_kwargs=towers, dim=8192, loss="0.01*center+ce+arcface", epochs=1)
    result = train(cfg, tmp_path / "hybrid")
    assert torch.isfinite(torch.tensor(result.history[0]["loss"]))
    state = load_checkpoint(tmp_path / "hybrid" / "last.pt")
    assert state["model"]["neck.0.weight"].shape == (8192, 512 + 32)


def test_load_embeds_paths_and_images_l2_normalised(image_folder, tmp_path):
    train(tiny_config(image_folder, epochs=1), tmp_path / "run")
    model = mltk.load(tmp_path / "run")
    paths = sorted(image_folder.glob("class_0*/0.png"))
    vectors = model.embed(paths)
    assert vectors.shape == (8, 16)
    assert torch.allclose(vectors.norm(dim=1), torch.ones(8), atol=1e-5)
    from PIL import Image

    assert torch.allclose(model.embed(Image.open(paths[0]))[0], vectors[0], atol=1e-5)


def test_greyscale_images_train_an_rgb_backbone(tmp_path):
    from conftest import make_image_folder

    folder = make_image_folder(tmp_path / "grey", mode="L")
    result = train(tiny_config(folder, epochs=1), tmp_path / "run")
    assert result.train_classes == 8


def test_rgb_images_train_a_greyscale_backbone(image_folder, tmp_path):
    train(tiny_config(image_folder, epochs=1, backbone="resnet18", backbone_kwargs={"in_chans": 1}), tmp_path / "run")
    model = mltk.load(tmp_path / "run")
    assert model.mode == "L" and model.data_config["input_size"] == (1, 32, 32)
    assert model.embed(sorted(image_folder.glob("class_00/*.png"))).shape == (4, 16)


def test_run_without_data_trains_on_digits(mltk_cli, tmp_path):
    result = mltk_cli("run", "--epochs", "1", "--backbone", "test_resnet", "--workers", "0", "--out", str(tmp_path / "digits"))
    assert result.returncode == 0, result.stderr
    saved = yaml.safe_load((tmp_path / "digits" / "config.yaml").read_text())
    assert saved["data"] == "digits" and saved["image_size"] == 32 and saved["m_per_class"] == 16
    assert "run directory" in result.stdout and "1797 / 10" in result.stdout


EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_example_config_parses_and_builds_its_model(path):
    cfg = make_config(yaml.safe_load(path.read_text()), source=str(path))
    model = build_embedder(replace(cfg, pretrained=False, weights=None)).eval()
    size = cfg.image_size or 224
    if "cpu" in path.stem or "omniglot" in path.stem:  # the CPU-sized ones also run a forward pass
        with torch.no_grad():
            assert model(torch.randn(2, 3, size, size)).shape == (2, model.dim)
    assert model.dim == (cfg.dim or model.backbone.num_features)
    if cfg.epochs:
        build_losses(cfg, num_classes=10, dim=model.dim)


def test_miner_feeds_a_pair_loss(image_folder, tmp_path):
    cfg = tiny_config(image_folder, loss="TripletMarginLoss", miner="multisimilarity", miner_options={"epsilon": 0.2}, epochs=1)
    result = train(cfg, tmp_path / "run")
    assert result.history[0]["loss/TripletMarginLoss"] >= 0
    with pytest.raises(UsageError, match="miner 'BatchHardMiner': .*pos_strategy"):
        train(replace(cfg, miner="hard", miner_options={"pos_strategy": "hard"}), tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


def test_command_line_overrides_the_config_file(image_folder, tmp_path, mltk_cli):
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**TINY, "data": str(image_folder), "epochs": 5, "dim": 8}))
    result = mltk_cli("run", "--config", str(tmp_path / "c.yaml"), "--epochs", "1", "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["epochs"] == 1 and saved["dim"] == 8 and saved["backbone"] == "test_resnet"
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 1


def initial_backbone(cfg: RunConfig) -> dict:
    """The backbone's weights before training: the run builds its model from the same seed."""
    from mltk.train import seed_everything

    seed_everything(cfg.seed)
    return {k: v.clone() for k, v in build_embedder(cfg).backbone.state_dict().items()}


def changed(before: dict, state: dict, prefix: str) -> set[str]:
    return {k for k, v in before.items() if not torch.equal(v, state["model"][prefix + k])}


def test_freeze_bn_keeps_batchnorm_as_loaded_and_backbone_lr_sets_the_backbones_rate(image_folder, tmp_path):
    cfg = tiny_config(image_folder, loss="ce+arcface", freeze_bn=True, backbone_lr=0.0)
    before = initial_backbone(cfg)
    train(cfg, tmp_path / "run")
    state = load_checkpoint(tmp_path / "run" / "last.pt")
    assert changed(before, state, "backbone.") == set()  # BatchNorm frozen, the rest at learning rate 0
    assert not torch.equal(state["model"]["neck.0.weight"], build_embedder(cfg).neck[0].weight)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["backbone_lr"] == 0.0 and r["lr"] > 0 for r in records)

    cfg = replace(cfg, backbone_lr=1e-3)
    train(cfg, tmp_path / "run2")
    moved = changed(before, load_checkpoint(tmp_path / "run2" / "last.pt"), "backbone.")
    batchnorm = {k for k in before if ".bn" in k or "running_" in k or "num_batches" in k}
    assert moved and batchnorm and not moved & batchnorm  # convolutions learn; BatchNorm statistics and scales stay


class StopAfterAnEpoch(Exception):
    pass


def stop_after_an_epoch(record: dict) -> None:
    raise StopAfterAnEpoch  # after the epoch's checkpoints: last.pt keeps it


def test_freeze_backbone_epochs_train_the_neck_first_then_the_backbone(image_folder, tmp_path):
    cfg = tiny_config(image_folder, loss="arcface", freeze_backbone_epochs=1, epochs=2)
    before = initial_backbone(cfg)
    with pytest.raises(StopAfterAnEpoch):
        train(cfg, tmp_path / "run", on_epoch=stop_after_an_epoch)
    assert changed(before, load_checkpoint(tmp_path / "run" / "last.pt"), "backbone.") == set()  # not even BatchNorm statistics
    train(replace(cfg, epochs=3), tmp_path / "run", resume=True)  # epochs 2 and 3: the backbone learns
    assert changed(before, load_checkpoint(tmp_path / "run" / "last.pt"), "backbone.")
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["backbone_lr"] == 0.0 and records[1]["backbone_lr"] > 0 and records[1]["lr"] > 0


def test_layer_decay_gives_each_backbone_layer_a_lower_rate_than_the_next(image_folder, tmp_path):
    from mltk.train import build_optimizer, learnable_backbone

    cfg = tiny_config(image_folder, loss="arcface", backbone_lr=1e-3, layer_decay=0.5)
    model = build_embedder(cfg)
    optimizer, _ = build_optimizer(cfg, model, learnable_backbone(model, cfg), None, steps_per_epoch=4)
    rates = {p: g["initial_lr"] for g in optimizer.param_groups if g["name"] == "backbone" for p in map(id, g["params"])}
    named = dict(model.backbone.named_parameters())
    stem, last = rates[id(named["conv1.0.weight"])], rates[id(next(p for n, p in named.items() if n.startswith("layer4")))]
    assert last == 1e-3 and stem < last / 4  # the stem several layers below the last block
    assert {id(p) for p in model.neck.parameters()} <= {id(p) for p in optimizer.param_groups[0]["params"]}
    assert optimizer.param_groups[0]["initial_lr"] == cfg.lr
    train(cfg, tmp_path / "run")  # and a run trains with them
    assert json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])["backbone_lr"] > 0
    for bad in (0, 1.5):
        with pytest.raises(UsageError, match=r"layer_decay in config must be null \(off\) or a number in \[0.01, 1\]"):
            make_config({"layer_decay": bad})
    assert make_config({"layer_decay": 1}).layer_decay == 1  # every layer at backbone_lr


def test_dim_0_trains_the_backbones_own_features(image_folder, tmp_path):
    cfg = tiny_config(image_folder, loss="MultiSimilarityLoss", miner="multisimilarity", dim=0)
    train(cfg, tmp_path / "run")
    model = mltk.load(tmp_path / "run" / "last.pt", device="cpu")
    width = build_embedder(cfg).backbone.num_features
    assert model.embed([next(image_folder.glob("class_00/*.png"))]).shape == (1, width)
    assert not any(k.startswith("neck.") for k in load_checkpoint(tmp_path / "run" / "last.pt")["model"])


@pytest.mark.parametrize("frozen, loss", [
    ({"freeze_backbone": True}, "TripletMarginLoss"),
    ({"freeze_backbone_epochs": 1, "epochs": 2}, "ContrastiveLoss"),
], ids=["freeze-backbone", "freeze-backbone-epochs"])
def test_nothing_to_learn_while_the_backbone_is_frozen_is_one_line_before_the_run_folder(image_folder, tmp_path, frozen, loss):
    """--dim 0 (no neck) and a loss without parameters: with the backbone frozen, a step would have no gradient."""
    cfg = tiny_config(image_folder, dim=0, loss=loss, **frozen)
    option = next(iter(frozen)).replace("_", "-")
    with pytest.raises(UsageError, match=rf"^--dim 0 with --{option}\b.*: nothing would learn.* loss {loss!r} has no parameters of its own\); "
                                         rf"give --dim 512 \(a neck\), a loss with parameters \(e.g. arcface, ce or center\), or leave --{option} out$"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_a_frozen_backbone_trains_with_a_neck_or_a_loss_that_has_parameters(image_folder):
    from mltk.train import check_frozen_epochs_learn

    for dim, loss in ((16, "TripletMarginLoss"), (0, "arcface")):
        cfg = tiny_config(image_folder, dim=dim, loss=loss, freeze_backbone=True)
        model = build_embedder(cfg)
        check_frozen_epochs_learn(cfg, model, build_losses(cfg, num_classes=8, dim=model.dim), start_epoch=0)
    cfg = tiny_config(image_folder, dim=0, loss="TripletMarginLoss", freeze_backbone_epochs=1, epochs=3)
    model = build_embedder(cfg)
    check_frozen_epochs_learn(cfg, model, build_losses(cfg, num_classes=8, dim=model.dim), start_epoch=1)  # resumed after the frozen epoch


def test_layer_decay_counts_each_hybrid_tower_down_from_its_own_last_layer(image_folder):
    from mltk.train import build_optimizer, learnable_backbone

    towers = {"cnn": "test_resnet", "swin_model": "test_vit"}
    cfg = tiny_config(image_folder, backbone="hybrid", backbone_kwargs=towers, backbone_lr=1e-3, layer_decay=0.5)
    model = build_embedder(cfg)
    optimizer, _ = build_optimizer(cfg, model, learnable_backbone(model, cfg), None, steps_per_epoch=4)
    rates = {p: g["initial_lr"] for g in optimizer.param_groups if g["name"] == "backbone" for p in map(id, g["params"])}
    rate = {name: rates[id(p)] for name, p in model.backbone.named_parameters()}
    assert rate["cnn.layer4.0.conv1.weight"] == rate["transformer.blocks.5.attn.qkv.weight"] == rate["transformer.norm.weight"] == 1e-3
    assert rate["cnn.layer3.0.conv1.weight"] == rate["transformer.blocks.4.attn.qkv.weight"] == 5e-4  # one layer below each tower's last
    assert rate["cnn.conv1.0.weight"] < rate["cnn.layer1.0.conv1.weight"] < rate["cnn.layer3.0.conv1.weight"]
    assert rate["transformer.patch_embed.proj.weight"] < rate["transformer.blocks.0.attn.qkv.weight"]


def test_layer_decay_on_a_backbone_timm_cannot_split_into_layers_is_one_line(image_folder, tmp_path, plugin):
    class Plain(torch.nn.Module):
        num_features = 8

        def __init__(self):
            super().__init__()
            self.conv, self.conv2 = torch.nn.Conv2d(3, 4, 3), torch.nn.Conv2d(4, 8, 3)

        def forward(self, x):
            return self.conv2(self.conv(x)).mean((2, 3))

    class Registers:
        @mltk.hookimpl
        def register_backbones(self, register):
            register("plain", lambda pretrained=False, weights=None, img_size=None: Plain(), description="no group_matcher")

    plugin(Registers(), "plain-backbone")
    with pytest.raises(UsageError, match=r"^--layer-decay 0.7: timm cannot tell the layers of backbone 'plain' apart \(it has no group_matcher\); "
                                         r"leave --layer-decay out, or give --backbone-lr for one rate over the whole backbone$"):
        train(tiny_config(image_folder, backbone="plain", layer_decay=0.7), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    train(tiny_config(image_folder, backbone="plain", backbone_lr=1e-4, epochs=1), tmp_path / "run")  # one rate: fine


def test_overwrite_never_deletes_what_the_run_reads(trained_run, mltk_main, tmp_path):
    """`--config RUN/config.yaml --overwrite` (or `--weights RUN/best.pt`) would delete the file the new run reads."""
    import shutil

    from conftest import one_line_error, snapshot

    run, folder = trained_run
    shutil.copytree(run, tmp_path / "a")
    before = snapshot(tmp_path)
    line = one_line_error(mltk_main("run", "--config", tmp_path / "a" / "config.yaml", "--out", tmp_path / "a", "--overwrite"), code=1)
    config = str(tmp_path / "a" / "config.yaml")
    assert line == (
        f"error: --out {str(tmp_path / 'a')!r} would replace {config!r}, which is --config {config!r}, an input of this command; "
        "mltk never replaces its own input: copy it out of the run directory first, or give another --out"
    )
    shutil.copy(tmp_path / "a" / "config.yaml", tmp_path / "copy.yaml")
    line = one_line_error(mltk_main("run", "--config", tmp_path / "copy.yaml", "--weights", tmp_path / "a" / "best.pt", "--out", tmp_path / "a", "--overwrite"), code=1)
    assert f"which is --weights {str(tmp_path / 'a' / 'best.pt')!r}, an input of this command" in line
    (tmp_path / "copy.yaml").unlink()
    assert snapshot(tmp_path) == before
