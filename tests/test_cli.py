"""The command line: fast start, listing, one-line errors for unknown names and other mistakes, what Ctrl-C says,
and text from files, folders and plugins printed as text, never as markup or terminal escapes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

import mltk
from conftest import REPO, one_line_error, plugins_data_builder, plugins_data_losses, snapshot
from mltk.errors import MltkError


def test_help_does_not_import_heavy_modules():
    code = "import sys, mltk.cli; print(sorted(m for m in ('torch', 'timm', 'faiss', 'pytorch_metric_learning', 'sklearn', 'umap') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_help_lists_the_commands(mltk_cli):
    result = mltk_cli("--help")
    assert result.returncode == 0
    assert "plugins" in result.stdout and "list" in result.stdout


def test_list_with_pattern(mltk_main):
    code, out, err = mltk_main("list", "losses", "arc*")
    assert code == 0, err
    names = [line.split()[0] for line in out.splitlines()[1:] if line.strip()]
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
def test_run_rejects_bad_options_with_one_line(mltk_main, tmp_path, args, message):
    line = one_line_error(mltk_main("run", "--out", tmp_path / "run", *args), 2)  # in this process (a fresh one: below)
    assert line.startswith(message), line
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


# --- mistakes on the command line: one line, exit 2; help


@pytest.mark.parametrize(
    "args, message",
    [
        (["run", "--dim", "abc"], "error: Invalid value for '--dim': "),
        (["evaluate", "--index", "bogus"], "error: Invalid value for '--index': "),
        (["list"], "error: Missing argument 'kind'. Choose from: backbones, losses, miners, metrics, datasets, loggers, rerankers; see `mltk list --help`"),
        (["plugins", "--nope"], "error: No such option: --nope; see `mltk plugins --help`"),
        (["no-such-command"], "error: No such command 'no-such-command'; see `mltk --help`"),
        (["list", "losses", "a", "b"], "error: Got unexpected extra argument"),
    ],
    ids=["bad-int", "bad-choice", "missing-argument", "unknown-option", "unknown-command", "extra-argument"],
)
def test_command_line_mistakes_are_one_line(mltk_main, tmp_path, args, message):
    before = snapshot(tmp_path)
    line = one_line_error(mltk_main(*args), code=2)
    assert line.startswith(message), line
    assert snapshot(tmp_path) == before


def test_help_still_shows_help(mltk_main):
    code, out, err = mltk_main("--help")
    assert code == 0 and "Usage" in out and "plugins" in out and err == ""
    code, out, err = mltk_main("list", "--help")
    assert code == 0 and "fnmatch pattern" in out
    code, out, err = mltk_main()  # no arguments: the help, and a usage exit code
    assert code == 2 and "Usage" in out and "Commands" in out


def test_help_still_does_not_import_torch():
    code = "import sys; from mltk.cli import main; sys.argv = ['mltk', '--help']\ntry:\n    main()\nexcept SystemExit:\n    pass\nprint('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.stdout.strip().splitlines()[-1] == "False", result.stderr


def test_run_help_explains_out_resume_and_overwrite(mltk_main):
    code, out, _ = mltk_main("run", "--help")
    text = " ".join(out.replace("│", " ").split())
    assert code == 0
    assert "one that already holds a run needs --resume or --overwrite" in text
    assert "deletes its config.yaml, metrics.jsonl, last.pt, best.pt, skipped_images.txt and tensorboard/, nothing else" in text


# --- Ctrl-C says what became of the output


def _interrupt(*args, **kwargs):
    raise KeyboardInterrupt


@pytest.mark.parametrize("command", ["evaluate", "index", "export"])
def test_ctrl_c_says_what_became_of_the_output(command, trained_run, mltk_main, tmp_path, monkeypatch):
    """Ctrl-C in evaluate, index or export: exit 130 and one line saying nothing was written (as mltk run says what it kept)."""
    import mltk.evaluate
    import mltk.export
    import mltk.index

    run, folder = trained_run
    patched, args = {
        "evaluate": ((mltk.evaluate, "embed_and_score"), ["evaluate", run, "--data", folder, "--workers", "0", "--out"]),
        "index": ((mltk.index, "write_index_dir"), ["index", run, "--data", folder, "--workers", "0", "--out"]),
        "export": ((mltk.export, "export"), ["export", run, "--format", "torchscript", "--out"]),
    }[command]
    monkeypatch.setattr(*patched, _interrupt)
    before = snapshot(tmp_path)
    code, out, err = mltk_main(*args, tmp_path / "out")
    assert code == 130 and out.strip() == ""
    earlier = {"evaluate": "evaluation", "index": "index", "export": "export"}[command]
    assert err.splitlines() == [f"interrupted: nothing was written to {str(tmp_path / 'out')!r} (an earlier {earlier} there is as it was)"]
    assert snapshot(tmp_path) == before


# --- text from files, folders, plugins and users is printed as text, not markup or escapes


def test_an_error_with_newlines_and_escapes_is_still_one_plain_line(mltk_main, monkeypatch):
    import typer

    import mltk.cli

    fake = typer.Typer(add_completion=False)

    @fake.command()
    def explode() -> None:
        raise MltkError("first line\nsecond \x1b[31mred\x1b[0m line\r")

    @fake.command()
    def other() -> None:
        pass

    monkeypatch.setattr(mltk.cli, "app", fake)
    line = one_line_error(mltk_main("explode"), code=1)
    assert line == "error: first line second red line"


def test_a_run_directory_with_markup_is_printed_as_it_is(capsys):
    from mltk.cli.run import render_summary
    from mltk.train import RunResult

    result = RunResult(Path("runs/[red]x[/red]\x1b[2J"), train_images=4, train_classes=2, precision="fp32", precision_reason="as asked: amp false")
    render_summary(result)
    out = capsys.readouterr().out
    assert "runs/[red]x[/red]" in out and "\x1b" not in out


def test_a_plugins_reason_to_stop_is_printed_as_it_is(capsys, tmp_path):
    from mltk.cli.run import render_summary
    from mltk.train import RunResult

    reason = "[bold]plateau[/bold]\x1b[2J"  # what a plugin's epoch_ended returned
    render_summary(RunResult(tmp_path, train_images=4, train_classes=2, stopped=reason))
    out = capsys.readouterr().out
    assert "[bold]plateau[/bold]" in out and "\x1b" not in out


def test_plugin_text_is_shown_as_text_not_markup_or_escapes(plugin, mltk_main):
    class Loud:
        @mltk.hookimpl
        def register_datasets(self, register):
            register("pd_loud", plugins_data_builder, description="[red]x[/red]\x1b[2J\x07[/bold]")

        @mltk.hookimpl
        def register_miners(self, register):
            raise RuntimeError("[b]boom[/b]\x1b[31m[/nope]")

    plugin(Loud(), "[i]pd_loud[/i]")
    code, out, err = mltk_main("list", "datasets", "pd_*")
    assert code == 0, err
    assert "[red]x[/red]" in out and "[/bold]" in out and "[i]pd_loud[/i]" in out  # printed as written
    assert "\x1b" not in out + err and "\x07" not in out
    code, out, err = mltk_main("list", "miners", "hard")
    assert code == 0 and "warning: plugin '[i]pd_loud[/i]' failed: register_miners: RuntimeError: [b]boom[/b][/nope]\n" in err
    code, out, err = mltk_main("plugins")  # a stray closing tag used to raise rich's MarkupError
    assert code == 0, err
    assert "[b]boom[/b]" in out and "[i]pd_loud[/i]" in out and "\x1b" not in out


@pytest.mark.parametrize("pattern", ["[red]*", "[/red]", "*[/]*", "arc\x1b[2J*"])
def test_list_with_a_markup_pattern(mltk_main, plugin, pattern):
    plugin(plugins_data_losses(("pd_plain", plugins_data_builder, "[red]x[/red]")), "pd_pattern")
    code, out, err = mltk_main("list", "losses", pattern)
    assert code == 0 and err == "" and "\x1b" not in out
    code, out, err = mltk_main("list", "losses", "pd_plain")
    assert code == 0 and "[red]x[/red]" in out


def test_warnings_are_plain_one_liners(capsys):
    from mltk.cli import warn

    warn("class \x1b[31mred\x1b[0m\nnext [bold]x[/bold]")
    assert capsys.readouterr().err == "warning: class red next [bold]x[/bold]\n"
