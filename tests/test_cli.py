"""The command line: fast start, listing, and one-line errors for unknown names."""

import json
import subprocess
import sys


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
    assert rows["mltk.default_plugins.datasets"]["registers"] == {"datasets": ["digits"]}
    assert all(row["error"] is None for row in rows.values())
