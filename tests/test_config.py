"""The run config: errors name the option as the user wrote it, and options that contradict each other in a run
that trains are one line before any work."""

from dataclasses import replace

import pytest
import typer
import yaml

from mltk.cli import app
from mltk.config import check_training, make_config
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
