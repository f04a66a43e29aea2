"""The command line: fast start, listing, and one-line errors for unknown names."""

import json
import subprocess
import sys

import pytest


def test_help_does_not_import_heavy_modules():
    code = "import sys, mltk.cli; print(sorted(m for m in ('torch', 'timm', 'faiss', 'pytorch_metric_learning', 'sklearn', 'umap') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_help_lists_the_commands(mltk_cli):
    result = mltk_cli("--help")
    assert result.returncode == 0
    assert "plugins" in result.stdout and "list" in result.stdout


def test_list_with_pattern(mltk_cli):
    result = mltk_cli("list", "losses", "arc*")
    assert result.returncode == 0, result.stderr
    names = [line.split()[0] for line in result.stdout.splitlines()[1:] if line.strip()]
    assert names == ["arcface"]


def test_unknown_name_exits_2_with_one_line_and_a_suggestion(mltk_cli):
    result = mltk_cli("list", "losses", "arcfce")
    assert result.returncode == 2
    assert result.stderr.strip() == "error: unknown loss 'arcfce'; did you mean 'arcface'?"
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_plugins_json_lists_builtins_and_what_they_register(mltk_cli):
    result = mltk_cli("plugins", "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["mltk.default_plugins.losses"]["registers"]["losses"][:3] == ["AngularLoss", "ArcFaceLoss", "CircleLoss"]
    assert rows["mltk.default_plugins.datasets"]["registers"] == {"datasets": ["cars196", "cub200", "digits", "inshop", "sop"]}
    assert all(row["error"] is None for row in rows.values())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--loss", "0.01*center+arcfce"], "error: unknown loss 'arcfce'; did you mean 'arcface'?"),
        (["--backbone", "resnet5"], "error: unknown backbone 'resnet5'; did you mean"),
        (["--dim", "-1"], "error: --dim must be an integer in [0, 65536], got -1"),
        (["--loss", "x*ce"], "error: bad weight 'x' in loss spec 'x*ce'"),
        (["--miner", "hardd"], "error: unknown miner 'hardd'; did you mean 'hard'"),
    ],
)
def test_run_rejects_bad_options_with_one_line(mltk_cli, tmp_path, args, message):
    result = mltk_cli("run", "--out", str(tmp_path / "run"), *args)
    assert result.returncode == 2
    assert result.stderr.startswith(message) and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_run_rejects_an_unknown_config_key(mltk_cli, tmp_path):
    (tmp_path / "c.yaml").write_text("epochs: 1\nlearning_rate: 0.1\n")
    result = mltk_cli("run", "--config", str(tmp_path / "c.yaml"))
    assert result.returncode == 2 and "unknown key 'learning_rate'" in result.stderr


def test_version_prints_mltk_s_version_without_importing_torch():
    import mltk

    code = (
        "import sys; sys.argv = ['mltk', sys.argv[1]]\nimport mltk.cli\n"
        "try:\n    mltk.cli.main()\nexcept SystemExit as stop:\n    assert stop.code in (0, None), stop.code\n"
        "print(sorted(m for m in ('torch', 'timm', 'faiss', 'sklearn') if m in sys.modules))"
    )
    for flag in ("--version", "-V"):
        out = subprocess.run([sys.executable, "-c", code, flag], capture_output=True, text=True, check=True).stdout
        assert out.splitlines() == [f"mltk {mltk.__version__}", "[]"]


def commands(group, path=()):
    """Every command of the CLI, subcommands (``data fetch``) included, as argument lists."""
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from commands(command, (*path, name))
        else:
            yield [*path, name]


def test_help_shows_no_type_on_flags_and_no_repository_paths(mltk_main, monkeypatch):
    """A flag takes no value (Typer would show ``--quiet <bool>``); an installed mltk has no docs/ folder to point to."""
    import typer

    from mltk.cli import app

    monkeypatch.setenv("COLUMNS", "400")  # nothing wraps: a path would show whole
    every = list(commands(typer.main.get_command(app)))
    assert ["run"] in every and ["data", "fetch"] in every
    for args in every:
        code, out, err = mltk_main(*args, "--help")
        assert code == 0 and err == "", args
        assert "<bool>" not in out and "docs/" not in out, (args, [line for line in out.splitlines() if "<bool>" in line or "docs/" in line])
    code, out, _ = mltk_main("run", "--help")
    quiet = next(line for line in out.splitlines() if "--quiet" in line)
    assert "-q" in quiet and "<" not in quiet.split("No progress")[0]


def test_list_shows_docstring_descriptions_as_plain_text(mltk_main, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    code, out, err = mltk_main("list", "metrics")
    assert code == 0, err
    assert "tar_at_far" in out and "``" not in out and ":func:" not in out


@pytest.mark.parametrize("all_", [False, True], ids=["short", "all"])
def test_plugins_shows_the_built_ins_in_one_row_or_each_with_all_and_never_cuts_a_name(mltk_main, monkeypatch, all_):
    from rich.console import Console

    import mltk.cli

    monkeypatch.setattr(mltk.cli, "console", Console(width=80))  # a terminal of 80 columns
    code, out, err = mltk_main("plugins", *(["--all"] if all_ else []))
    assert code == 0, err
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= 80 and "…" not in out
    builtins = ["backbones", "datasets", "loggers", "losses", "metrics", "miners", "rerankers"]
    if all_:
        for name in builtins:
            assert any(f" mltk.default_plugins.{name} " in line for line in lines), name
    else:
        assert "mltk.default_plugins" not in out
        row = " ".join(lines)
        assert "mltk (built-in)" in row and "5 datasets" in row and "1 logger," in row and "15 miners" in row


def test_evaluate_of_a_backbone_without_weights_says_it_scores_random_weights(mltk_main, tmp_path):
    from conftest import make_image_folder

    folder = make_image_folder(tmp_path / "images", classes=3, per_class=3)
    code, out, err = mltk_main(
        "evaluate", "--backbone", "test_resnet", "--image-size", "32", "--data", folder, "--metrics", "roc_auc", "--no-report",
        "--workers", "0", "--out", tmp_path / "eval",
    )
    assert code == 0, err
    assert "warning: --backbone 'test_resnet' had neither --pretrained nor --weights: these figures score its random initial weights, not learned features\n" in err
