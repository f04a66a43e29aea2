"""Options the commands share are declared once (mltk.cli.options) and mean the same in every command."""

import pytest
import typer

from mltk.cli import app
from mltk.cli.options import IndexKind
from mltk.errors import UsageError

SHARED = {  # option -> the commands that take it
    "--device": ("run", "evaluate", "index build", "index add", "embed", "search"),
    "--workers": ("run", "evaluate", "index build", "index add", "embed"),
    "--batch-size": ("run", "evaluate", "index build", "index add", "embed"),
    "--pretrained": ("run", "evaluate"),
}


def params(command: str) -> dict:
    """The click parameters of ``mltk COMMAND`` (a subcommand: "index add"), by their first name (``--device``; ``run``
    for the argument)."""
    found = typer.main.get_command(app)
    for name in command.split():
        found = found.commands[name]
    return {p.opts[0]: p for p in found.params}


def test_index_kinds_are_the_library_s():
    from mltk import knn

    assert tuple(kind.value for kind in IndexKind) == knn.KINDS


@pytest.mark.parametrize("option", sorted(SHARED))
def test_a_shared_option_has_one_help_text_and_one_shape(option):
    found = [params(command)[option] for command in SHARED[option]]
    assert len({p.help for p in found}) == 1, [p.help for p in found]
    assert len({(tuple(p.secondary_opts), p.required) for p in found}) == 1


def test_pretrained_is_a_pair_a_config_file_can_be_overruled_by():
    assert params("run")["--pretrained"].secondary_opts == params("evaluate")["--pretrained"].secondary_opts == ["--no-pretrained"]


def test_each_command_keeps_its_own_default_and_required_of_a_shared_declaration():
    assert params("run")["--workers"].default is None and params("evaluate")["--workers"].default == 2  # run: the config's
    assert params("index build")["--batch-size"].default == 128 and params("run")["--batch-size"].default is None
    assert not params("evaluate")["run"].required  # evaluate also takes --backbone instead
    assert params("index build")["run"].required and params("export")["run"].required
    assert params("index build")["--data"].required and not params("run")["--data"].required
    assert params("export")["--out"].required and not params("evaluate")["--out"].required


def test_run_passes_every_option_to_the_config(mltk_main, monkeypatch, tmp_path):
    from mltk import config

    given = {}

    def resolve(config_file, overrides):
        given.update(overrides)
        raise UsageError("stop here")

    monkeypatch.setattr(config, "resolve", resolve)
    args = {
        "data": "folder", "val_data": "val", "val_classes": 0.25, "backbone": "resnet18", "loss": "arcface", "dim": 32,
        "miner": "hard", "epochs": 3, "batch_size": 16, "m_per_class": 4, "lr": 0.5, "backbone_lr": 0.125, "layer_decay": 0.75, "loss_lr": 0.25, "freeze_backbone_epochs": 2, "image_size": 64,
        "weights": "w.pt", "early_stop": 3, "seed": 7, "workers": 0, "device": "cpu",
    }
    flags = [x for key, value in args.items() for x in ("--" + key.replace("_", "-"), str(value))]
    switches = ("--augment", "--no-pretrained", "--freeze-backbone", "--freeze-bn", "--no-amp", "--no-in-memory")
    logs = ("--log", "tensorboard,mlflow", "--log", "tensorboard", "--log", "other")  # repeatable, comma-separated, each once
    code, _, err = mltk_main("run", *flags, "--classes", "a*", "--classes", "b?", *switches, *logs, "--out", tmp_path / "run")
    assert (code, err) == (2, "error: stop here\n")
    assert given == {
        **args, "data_classes": ["a*", "b?"], "augment": True, "pretrained": False, "freeze_backbone": True, "freeze_bn": True, "amp": False,
        "in_memory": False, "log": ["tensorboard", "mlflow", "other"],
    }

    given.clear()
    mltk_main("run")
    assert set(given) == set(args) | {"data_classes", "augment", "pretrained", "freeze_backbone", "freeze_bn", "amp", "in_memory", "log"}
    assert all(value is None for value in given.values())  # not given: the config file's value or the default stands
