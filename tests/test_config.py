"""The run config: errors name the option as the user wrote it, and options that contradict each other in a run
that trains are one line before any work; every value is checked in its range, inside lists and mappings too, and a
YAML file is read safely and within bounds."""

import sys
from dataclasses import replace

import pytest
import torch
import typer
import yaml

from conftest import REPO, one_line_error, snapshot
from mltk.cli import app
from mltk.config import RunConfig, check_training, load_yaml, make_config, validate
from mltk.errors import UsageError
from mltk.rules import FLAGS, named

TINY = dict(backbone="test_resnet", image_size=32, dim=16, batch_size=8, m_per_class=2, workers=0, epochs=1, seed=0)


def test_a_flag_s_error_names_the_flag_and_a_config_file_s_names_its_key(mltk_main, tmp_path):
    for args, said in (
        (["--classes", "a*", "--classes", ""], "error: --classes must be a class name pattern, got ''"),
        (["--classes", "a\x01"], "error: --classes holds a control character: 'a\\x01'"),
        (["--log", "a b"], "error: --log must be a logger name (`mltk list loggers`), got 'a b'"),
        (["--image-size", "3"], "error: --image-size must be an integer in [8, 4096], got 3"),
    ):
        assert mltk_main("run", *args, "--out", tmp_path / "run") == (2, "", said + "\n")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"data_classes": ["a*", ""]}))
    code, _, err = mltk_main("run", "--config", tmp_path / "c.yaml", "--out", tmp_path / "run")
    assert (code, err) == (2, f"error: data_classes[1] in {tmp_path / 'c.yaml'} must be a class name pattern, got ''\n")
    assert not (tmp_path / "run").exists()


def test_every_key_the_command_line_sets_is_named_by_its_option(mltk_main, monkeypatch):
    from mltk import config

    given = {}

    def resolve(config_file, overrides):
        given.update(overrides)
        raise UsageError("stop here")

    monkeypatch.setattr(config, "resolve", resolve)
    mltk_main("run")
    options = {name for p in typer.main.get_command(app).commands["run"].params for name in p.opts + p.secondary_opts}
    assert given and {key: named(key, FLAGS) for key in given if named(key, FLAGS) not in options} == {}
    assert named("data_classes", FLAGS) == named("data_classes[3]", FLAGS) == "--classes"
    assert named("data_classes[3]", "c.yaml") == "data_classes[3] in c.yaml"


@pytest.mark.parametrize("given, said", [
    ({"freeze_backbone_epochs": 5, "epochs": 1}, "--freeze-backbone-epochs 5 covers every epoch of the run (--epochs 1), so the backbone would never learn; give --epochs 6 or more, or --freeze-backbone"),
    ({"freeze_backbone_epochs": 2, "epochs": 2}, "--freeze-backbone-epochs 2 covers every epoch of the run (--epochs 2)"),
    ({"freeze_backbone": True, "layer_decay": 0.7}, "--freeze-backbone keeps the backbone from learning in every epoch, so --layer-decay 0.7 has nothing to set; leave one of them out"),
    ({"freeze_backbone": True, "backbone_lr": 1e-4}, "--freeze-backbone keeps the backbone from learning in every epoch, so --backbone-lr 0.0001 has nothing to set"),
    ({"freeze_backbone": True, "freeze_backbone_epochs": 2}, "--freeze-backbone keeps the backbone from learning in every epoch, so --freeze-backbone-epochs 2 has nothing to set"),
], ids=["freeze-epochs-outlast-the-run", "as-many-freeze-epochs-as-epochs", "frozen-layer-decay", "frozen-backbone-lr", "frozen-freeze-epochs"])
def test_contradictory_training_options_are_one_line_before_any_work(mltk_main, tmp_path, given, said):
    flags = [x for key, value in given.items() for x in ("--" + key.replace("_", "-"),) + (() if value is True else (str(value),))]
    code, _, err = mltk_main("run", "--data", tmp_path / "nowhere", "--out", tmp_path / "run", *flags)
    assert code == 2 and err.startswith("error: " + said) and err.count("\n") == 1  # before the (missing) data is read
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**TINY, "data": str(tmp_path / "nowhere"), **given}))
    code, _, err = mltk_main("run", "--config", tmp_path / "c.yaml", "--out", tmp_path / "run")
    assert code == 2 and err.startswith("error: " + said)  # the same from a config file
    assert not (tmp_path / "run").exists()


def test_what_agrees_is_accepted_and_a_checkpoint_s_config_is_not_held_to_it():
    for fine in ({"freeze_backbone_epochs": 1, "epochs": 2}, {"freeze_backbone": True, "epochs": 0}, {"freeze_backbone_epochs": 3, "epochs": 0},
                 {"freeze_backbone_epochs": 2, "backbone_lr": 1e-4, "layer_decay": 0.7, "epochs": 3}, {"freeze_backbone": True, "freeze_bn": True}):
        check_training(make_config({**TINY, **fine}))
    old = make_config({**TINY, "freeze_backbone": True, "backbone_lr": 1e-4})  # as a run written before the check: still loads
    with pytest.raises(UsageError):
        check_training(old)
    check_training(old, resumed=True)  # and resumes with the settings it started with
    with pytest.raises(UsageError, match=r"covers every epoch of the run \(--epochs 2\), so the backbone would never learn; give --epochs 3 or more$"):
        check_training(replace(old, freeze_backbone=False, backbone_lr=None, freeze_backbone_epochs=2, epochs=2), resumed=True)  # --epochs may change


def test_validation_classes_picked_by_name_come_from_data_so_a_config_takes_any_data_folder(mltk_main, tmp_path):
    """The example configs name their training and validation classes and leave --data to the command line."""
    import mltk
    from mltk.evaluate import held_out_data
    from conftest import make_image_folder

    folder = make_image_folder(tmp_path / "images", classes=10, per_class=4)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**TINY, "data_classes": ["class_0[0-6]"], "val_data_classes": ["class_0[7-9]"]}))
    code, out, err = mltk_main("run", "--config", tmp_path / "c.yaml", "--data", folder, "--out", tmp_path / "run", "--quiet")
    assert code == 0, err
    assert "12 / 3" in out  # validation images / classes
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["val_data"] == str(folder)
    assert held_out_data(mltk.load(tmp_path / "run")).classes == ["class_07", "class_08", "class_09"]  # what `mltk evaluate RUN` scores
    code, out, err = mltk_main("run", "--config", tmp_path / "c.yaml", "--data", folder, "--val-classes", "0.3", "--out", tmp_path / "other")
    assert (code, out) == (2, "") and err.startswith("error: val_data_classes in ") and err.endswith("give one\n")
    assert not (tmp_path / "other").exists()


# --- the run config is untrusted (`mltk run` options, YAML files, the config inside a checkpoint): each bad value is
# one line naming the option and what it takes, exit 2, and nothing written


def config_refused(mltk_main, tmp_path, *args, text: str | None = None) -> str:
    """``mltk run`` with ``args`` (and a config file of ``text``): refused with one line, exit 2, the folder unchanged."""
    if text is not None:
        (tmp_path / "c.yaml").write_text(text)
        args = ("--config", tmp_path / "c.yaml", *args)
    before = snapshot(tmp_path)
    line = one_line_error(mltk_main("run", "--out", tmp_path / "run", *args), code=2)
    assert snapshot(tmp_path) == before
    return line


def config_error(values, source: str = "c.yaml") -> str:
    with pytest.raises(UsageError) as refused:
        make_config(values, source)
    return str(refused.value)


# --- numbers: each option in its range, checked before anything is written


NUMBERS = {
    "dim huge": (["--dim", "1000000000"], "--dim must be an integer in [0, 65536], got 1000000000"),
    "image size negative": (["--image-size", "-5"], "--image-size must be an integer in [8, 4096], got -5"),
    "image size zero": (["--image-size", "0"], "--image-size must be an integer in [8, 4096], got 0"),
    "image size huge": (["--image-size", "100000"], "--image-size must be an integer in [8, 4096], got 100000"),
    "workers negative": (["--workers", "-1"], "--workers must be an integer in [0, 256], got -1"),
    "workers absurd": (["--workers", "100000"], "--workers must be an integer in [0, 256], got 100000"),
    "lr negative": (["--lr", "-1"], "--lr must be a number in [0, 10], got -1.0"),
    "lr nan": (["--lr", "nan"], "--lr must be a number in [0, 10], got nan"),
    "lr inf": (["--lr", "inf"], "--lr must be a number in [0, 10], got inf"),
    "loss lr negative": (["--loss-lr", "-1"], "--loss-lr must be a number in [0, 10], got -1.0"),
    "loss lr nan": (["--loss-lr", "nan"], "--loss-lr must be a number in [0, 10], got nan"),
    "loss lr inf": (["--loss-lr", "inf"], "--loss-lr must be a number in [0, 10], got inf"),
    "m per class zero": (["--m-per-class", "0"], "--m-per-class must be an integer in [1, 8192], got 0"),
    "batch size zero": (["--batch-size", "0"], "--batch-size must be an integer in [2, 16384], got 0"),
    "batch size huge": (["--batch-size", "100000000"], "--batch-size must be an integer in [2, 16384], got 100000000"),
    "epochs huge": (["--epochs", "1000000000"], "--epochs must be an integer in [0, 10000], got 1000000000"),
    "seed negative": (["--seed", "-1"], "--seed must be an integer in [0, 4294967295], got -1"),
    "seed 2**32": (["--seed", "4294967296"], "--seed must be an integer in [0, 4294967295], got 4294967296"),
    "val classes nan": (["--val-classes", "nan"], "--val-classes must be a number in [0, 1), got nan"),
    "device unknown": (["--device", "gpu0"], "--device must be auto, cpu, mps, cuda or cuda:N, got 'gpu0'"),
}


@pytest.mark.parametrize("case", NUMBERS, ids=list(NUMBERS))
def test_config_out_of_range_options_are_one_line(case, mltk_main, tmp_path):
    args, message = NUMBERS[case]
    assert config_refused(mltk_main, tmp_path, *args) == f"error: {message}"


FILE_NUMBERS = {
    "grad_clip negative": ("grad_clip: -1\n", "grad_clip in {f} must be null or 0 (off), or a number in (0, 1000000], got -1"),
    "grad_clip nan": ("grad_clip: .nan\n", "grad_clip in {f} must be null or 0 (off), or a number in (0, 1000000], got nan"),
    "warmup negative": ("warmup_epochs: -5\n", "warmup_epochs in {f} must be a number in [0, 10000], got -5"),
    "weight decay negative": ("weight_decay: -0.1\n", "weight_decay in {f} must be a number in [0, 10], got -0.1"),
    "weight decay nan": ("weight_decay: .nan\n", "weight_decay in {f} must be a number in [0, 10], got nan"),
    "weight decay 'nan'": ("weight_decay: nan\n", "weight_decay in {f} must be a number in [0, 10], got 'nan'"),
    "val_classes nan": ("val_classes: .nan\n", "val_classes in {f} must be a number in [0, 1), got nan"),
    "lr inf": ("lr: .inf\n", "lr in {f} must be a number in [0, 10], got inf"),
    "dim a float": ("dim: 512.5\n", "dim in {f} must be int or null, got 512.5"),
}


@pytest.mark.parametrize("case", FILE_NUMBERS, ids=list(FILE_NUMBERS))
def test_config_file_numbers_out_of_range_are_one_line(case, mltk_main, tmp_path):
    text, message = FILE_NUMBERS[case]
    line = config_refused(mltk_main, tmp_path, text=text)
    assert line == "error: " + message.format(f=tmp_path / "c.yaml")


def test_config_grad_clip_null_or_zero_is_off_and_ranges_hold_at_their_ends():
    assert make_config({"grad_clip": None}).grad_clip is None and make_config({"grad_clip": 0}).grad_clip == 0
    cfg = make_config({"dim": 65536, "image_size": 8, "seed": 2**32 - 1, "workers": 0, "lr": 0, "epochs": 0, "val_classes": 0.99})
    assert (cfg.dim, cfg.image_size, cfg.seed) == (65536, 8, 2**32 - 1)


def test_config_value_of_the_wrong_type_is_named(mltk_main, tmp_path):
    (tmp_path / "c.yaml").write_text("epochs: ten\n")
    code, _, err = mltk_main("run", "--config", tmp_path / "c.yaml", "--out", tmp_path / "run")
    assert (code, err) == (2, f"error: epochs in {tmp_path / 'c.yaml'} must be int, got 'ten'\n")
    assert not (tmp_path / "run").exists()


# --- values inside lists and mappings


INSIDE = {
    "data_classes of numbers": ({"data_classes": [1, 2]}, "data_classes[0] in c.yaml must be a class name pattern, got 1"),
    "loss_options of a list": ({"loss_options": {"arcface": [1, 2]}}, "loss_options['arcface'] in c.yaml must be a mapping of the loss's options, got [1, 2]"),
    "loss_options for a loss not in the spec": (
        {"loss": "0.1*center+ce", "loss_options": {"arcface": {"margin": 20}}},
        "loss_options in c.yaml sets options of 'arcface', which is not in the loss spec '0.1*center+ce'",
    ),
    "loss option of the wrong kind": ({"loss_options": {"arcface": {"margin": "wide"}}}, "loss_options['arcface']['margin'] in c.yaml must be a number, got 'wide'"),
    "loss option a config cannot give": ({"loss_options": {"arcface": {"distance": "cosine"}}}, "unknown key 'distance' in loss_options['arcface'] in c.yaml (loss 'arcface'); it takes "),
    "loss option unknown": ({"loss_options": {"arcface": {"margn": 20}}}, "unknown key 'margn' in loss_options['arcface'] in c.yaml (loss 'arcface'); did you mean 'margin'?"),
    "miner_options nested": ({"miner": "multisimilarity", "miner_options": {"epsilon": [1, {"a": 2}]}}, "miner_options['epsilon'] in c.yaml must be "),
    "miner option of the wrong kind": ({"miner": "multisimilarity", "miner_options": {"epsilon": "x"}}, "miner_options['epsilon'] in c.yaml must be a number, got 'x'"),
    "miner_options without a miner": ({"miner_options": {"epsilon": 0.1}}, "miner_options in c.yaml are given, but no miner; set miner or drop miner_options"),
    "augment option unknown": ({"augment_options": {"sharpen": 0.5}}, "unknown key 'sharpen' in augment_options in c.yaml; it takes affine, auto_augment, color_jitter"),
    "augment option a pair of one": ({"augment_options": {"scale": [0.5]}}, "augment_options['scale'] in c.yaml must be [min, max], each in [0, 1], got [0.5]"),
    "augment option of the wrong kind": ({"augment_options": {"hflip": "yes"}}, "augment_options['hflip'] in c.yaml must be a number in [0, 1], got 'yes'"),
    "augment option timm would misuse": ({"augment_options": {"use_prefetcher": True}}, "unknown key 'use_prefetcher' in augment_options in c.yaml"),
    "affine without degrees": ({"augment_options": {"affine": {"translate": [0.1, 0.1]}}}, "augment_options['affine'] in c.yaml needs 'degrees'"),
    "affine unknown": ({"augment_options": {"affine": {"degrees": 10, "interpolation": "x"}}}, "unknown key 'interpolation' in augment_options['affine'] in c.yaml"),
    "backbone_kwargs unknown": ({"backbone_kwargs": {"depht": 3}}, "unknown key 'depht' in backbone_kwargs in c.yaml (backbone 'resnet18'); did you mean 'depth'?"),
    "backbone_kwargs of the wrong kind": ({"backbone_kwargs": {"in_chans": "one"}}, "backbone_kwargs['in_chans'] in c.yaml must be an integer in [1, 64], got 'one'"),
    "backbone_kwargs set by mltk": ({"backbone_kwargs": {"img_size": 64}}, "backbone_kwargs['img_size'] in c.yaml: mltk sets 'img_size' itself; give the option 'image_size' instead"),
    "hybrid option of the wrong kind": ({"backbone": "hybrid", "backbone_kwargs": {"cnn": 18}}, "backbone_kwargs['cnn'] in c.yaml must be text, got 18"),
}


@pytest.mark.parametrize("case", INSIDE, ids=list(INSIDE))
def test_config_values_inside_lists_and_mappings_are_checked(case):
    values, message = INSIDE[case]
    assert config_error(values).startswith(message)


@pytest.mark.parametrize(
    "kwargs, backbone",
    [
        ({"checkpoint_path": "/etc/passwd"}, "resnet18"),
        ({"pretrained_cfg_overlay": {"file": "/etc/passwd"}}, "resnet18"),
        ({"pretrained_cfg": {"hf_hub_id": "evil/model"}}, "test_resnet"),
        ({"cache_dir": "/tmp"}, "swin"),
        ({"swin_kwargs": {"checkpoint_path": "/etc/passwd"}}, "hybrid"),
        ({"cnn_kwargs": {"pretrained_cfg_overlay": {"url": "http://x"}}}, "hybrid"),
    ],
)
def test_config_backbone_kwargs_never_let_timm_read_a_file_or_the_network(kwargs, backbone, mltk_main, tmp_path):
    """Each is refused before timm sees it: an option name timm would use to open a path or a URL."""
    key = next(iter(kwargs.values())) if backbone == "hybrid" else kwargs
    line = config_refused(mltk_main, tmp_path, text=yaml.safe_dump({"backbone": backbone, "backbone_kwargs": kwargs}))
    assert f"unknown key {next(iter(key))!r} in backbone_kwargs" in line


def test_config_unknown_backbone_with_kwargs_still_suggests_names():
    assert config_error({"backbone": "resnet1", "backbone_kwargs": {"in_chans": 1}}).startswith("unknown backbone 'resnet1'; did you mean")


EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_config_every_example_still_loads(path):
    cfg = make_config(load_yaml(path), str(path))
    assert cfg.backbone and cfg.loss


def test_config_good_options_pass_and_numeric_strings_become_numbers():
    cfg = make_config({
        "loss": "TripletMarginLoss+arcface", "loss_options": {"arcface": {"margin": "20", "scale": 30}, "TripletMarginLoss": {"smooth_loss": True}},
        "miner": "hard", "miner_options": {"pos_strategy": "hard"}, "augment_options": {"scale": ["6e-1", 1], "affine": {"degrees": 10, "fill": 255}},
        "backbone": "hybrid", "backbone_kwargs": {"cnn": "resnet18", "swin_kwargs": {"embed_dim": 16, "depths": [1, 1], "num_heads": [1, 2]}},
    })
    assert cfg.loss_options["arcface"]["margin"] == 20.0 and cfg.augment_options["scale"] == [0.6, 1]


def test_config_the_gem_plugin_s_options_are_its_parameters():
    sys.path.insert(0, str(REPO / "plugins" / "mltk-gem"))
    import mltk_gem

    from mltk.plugins import pm

    pm.register(mltk_gem, name="gem-for-config-test")
    try:
        cfg = make_config({"backbone": "gem", "backbone_kwargs": {"base": "resnet18", "p": 4.0, "in_chans": 1}})
        assert cfg.backbone_kwargs == {"base": "resnet18", "p": 4.0, "in_chans": 1}
        assert config_error({"backbone": "gem", "backbone_kwargs": {"p": "three"}}) == "backbone_kwargs['p'] in c.yaml must be a number, got 'three'"
        assert "unknown key 'checkpoint_path'" in config_error({"backbone": "gem", "backbone_kwargs": {"checkpoint_path": "x"}})
    finally:
        pm.unregister(mltk_gem)
        sys.path.remove(str(REPO / "plugins" / "mltk-gem"))


# --- keys are names; YAML 1.1 reads 1e-3 as a string; a key given twice


@pytest.mark.parametrize(
    "text, message",
    [
        ("null: 3\n", "key None in {f} is not a name; option names are strings"),
        ("5: 3\n", "key 5 in {f} is not a name; option names are strings"),
        ("backbone_kwargs: {5: 3}\n", "key 5 in backbone_kwargs in {f} is not a name; option names are strings"),
        ("loss_options: {arcface: {null: 1}}\n", "key None in loss_options['arcface'] in {f} is not a name; option names are strings"),
        ("augment_options: {[1, 2]: 3}\n", "is not valid YAML: line 1: found unhashable key"),
    ],
)
def test_config_keys_that_are_not_strings_are_named(text, message, mltk_main, tmp_path):
    line = config_refused(mltk_main, tmp_path, text=text)
    assert message.format(f=tmp_path / "c.yaml") in line


def test_config_lr_1e_3_in_yaml_is_a_number(tmp_path):
    (tmp_path / "c.yaml").write_text("lr: 1e-3\nloss_lr: 2E-2\nweight_decay: 5e-5\n")
    cfg = make_config(load_yaml(tmp_path / "c.yaml"), "c.yaml")
    assert (cfg.lr, cfg.loss_lr, cfg.weight_decay) == (0.001, 0.02, 5e-5)
    assert config_error({"lr": "1e-3x"}) == "lr in c.yaml must be float, got '1e-3x'"
    assert config_error({"epochs": "1e1"}) == "epochs in c.yaml must be int, got '1e1'"


@pytest.mark.parametrize(
    "text, key, lines",
    [
        ("epochs: 1\nlr: 0.1\nepochs: 30\n", "epochs", "1 and 3"),
        ("augment_options:\n  hflip: 0.0\n  hflip: 0.5\n", "hflip", "2 and 3"),
        ("loss_options: {arcface: {margin: 1, margin: 2}}\n", "margin", "1 and 1"),
        ("epochs: 1\n'epochs': 2\n", "epochs", "1 and 2"),
    ],
)
def test_config_a_duplicated_yaml_key_is_refused_with_its_lines(text, key, lines, mltk_main, tmp_path):
    line = config_refused(mltk_main, tmp_path, text=text)
    assert line == f"error: config file {str(tmp_path / 'c.yaml')!r} is not valid YAML: key {key!r} is given twice (lines {lines})"


def test_config_a_merge_key_override_is_not_a_duplicate(tmp_path):
    (tmp_path / "c.yaml").write_text("augment_options:\n  <<: {hflip: 0.5, vflip: 0.1}\n  hflip: 0.0\n")
    assert make_config(load_yaml(tmp_path / "c.yaml")).augment_options == {"hflip": 0.0, "vflip": 0.1}


def test_config_yaml_tags_that_build_objects_are_refused(mltk_main, tmp_path):
    line = config_refused(mltk_main, tmp_path, text="epochs: !!python/object/apply:os.system ['touch pwned']\n")
    assert "is not valid YAML: line 1: could not determine a constructor" in line
    assert "not a set" in config_refused(mltk_main, tmp_path, text="data_classes: !!set {a, b}\n")
    assert "not a date" in config_refused(mltk_main, tmp_path, text="out: 2024-01-01\n")


# --- sizes, control characters, a config that is not a mapping


def test_config_file_over_a_mebibyte_is_refused(mltk_main, tmp_path):
    line = config_refused(mltk_main, tmp_path, text="# padding\n" * 120_000)
    assert line.endswith("is larger than 1024 KiB; a config holds options, not data")


@pytest.mark.parametrize(
    "values, message",
    [
        ({"data": "x" * 5000}, "data in c.yaml is 5000 characters long; at most 4096"),
        ({"data_classes": ["a"] * 100_001}, "data_classes in c.yaml holds 100001 items; at most 100000"),
        ({"loss_options": {"arcface": {"margin": [[[[1]]]]}}}, "loss_options['arcface']['margin'][0][0] in c.yaml is nested more than 5 levels deep"),
        ({"data": "birds\x00/train"}, "data in c.yaml holds a control character: 'birds\\x00/train'"),
        ({"out": "runs/\x1b[31mred"}, "out in c.yaml holds a control character: 'runs/\\x1b[31mred'"),
        ({"data_classes": ["ok", "bad\nname"]}, "data_classes[1] in c.yaml holds a control character"),
        ({"backbone_kwargs": {"a\x00": 1}}, "key 'a\\x00' in backbone_kwargs in c.yaml is not a name"),
        ({"seed": 10**60}, "seed in c.yaml is out of range: an integer of 200 bits"),
    ],
)
def test_config_sizes_and_control_characters_are_bounded(values, message):
    assert config_error(values).startswith(message)


def test_config_a_deeply_nested_or_self_referencing_yaml_is_one_line(mltk_main, tmp_path):
    assert config_refused(mltk_main, tmp_path, text="data_classes: " + "[" * 50_000 + "]" * 50_000 + "\n").endswith("is not valid YAML: nested too deeply")
    laughs = "a: &a [x, x, x, x, x, x, x, x]\n" + "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 8)}]\n" for p, c in zip("abcdefg", "bcdefgh"))
    assert "nested more than 5 levels deep" in config_refused(mltk_main, tmp_path, text=laughs)


def test_config_long_values_are_not_echoed_back(mltk_main, tmp_path):
    line = config_refused(mltk_main, tmp_path, text=f"epochs: {'x' * 4000}\n")
    assert line.startswith("error: epochs in") and len(line) < 300


@pytest.mark.parametrize("values", ["n", ["epochs", 3], None, 3])
def test_config_that_is_not_a_mapping_says_so(values):
    assert config_error(values, "checkpoint runs/x") == f"checkpoint runs/x: config must be a mapping of options, got {values!r}"


def test_config_in_a_checkpoint_that_is_not_a_mapping_is_one_line(trained_run, mltk_main, tmp_path):
    run, folder = trained_run
    state = torch.load(run / "last.pt", weights_only=True)
    state["config"] = "not a mapping"
    torch.save(state, tmp_path / "odd.pt")
    before = snapshot(tmp_path)
    line = one_line_error(mltk_main("evaluate", tmp_path / "odd.pt", "--data", folder, "--workers", "0", "--out", tmp_path / "eval"))
    assert "config must be a mapping of options, got 'not a mapping'" in line
    assert snapshot(tmp_path) == before


def test_config_yaml_that_is_not_a_mapping_or_not_a_file(mltk_main, tmp_path):
    assert config_refused(mltk_main, tmp_path, text="0\n").endswith("must hold a mapping of options, got 0")
    (tmp_path / "folder.yaml").mkdir()
    assert config_refused(mltk_main, tmp_path, "--config", tmp_path / "folder.yaml").endswith("folder.yaml' is not a file")


def test_config_validate_checks_a_config_made_in_code():
    validate(RunConfig(dim=16))
    with pytest.raises(UsageError, match=r"image_size in config must be an integer in \[8, 4096\], got 100000"):
        validate(RunConfig(image_size=100_000))
