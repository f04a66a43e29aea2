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
