"""Third-party plugins arrive through the ``mltk`` entry-point group; broken ones are reported by name."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, install_plugin


@pytest.fixture(scope="module")
def gem_site(tmp_path_factory):
    """plugins/mltk-gem installed with pip into a folder of its own (the machine's site-packages stays as it is)."""
    return install_plugin("mltk-gem", tmp_path_factory.mktemp("site"))


def plugin_env(site: Path, load: str | None = None) -> dict:
    """PYTHONPATH with ``site`` on it; ``load=None`` unsets MLTK_LOAD_PLUGINS (every plugin loads)."""
    return {"PYTHONPATH": f"{site}:{REPO}", "MLTK_LOAD_PLUGINS": load}


def test_gem_plugin_is_found_through_its_entry_point(gem_site, mltk_cli):
    result = mltk_cli("plugins", "--json", env=plugin_env(gem_site, load="gem"))
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["gem"]["distribution"] == "mltk-gem" and rows["gem"]["version"] == "0.1.0"
    assert rows["gem"]["registers"] == {"backbones": ["gem", "gem_resnet101", "gem_resnet18", "gem_resnet50"]}
    assert rows["gem"]["error"] is None


def test_importing_registers_nothing_and_load_plugins_registers_each_plugin_once(gem_site):
    code = (
        "import json, mltk.cli, mltk.registry\n"
        "from mltk.plugins import errors, load_plugins, pm\n"
        "names = lambda: sorted(pm.get_name(p) for p in pm.get_plugins())\n"
        "before = names()\n"
        "load_plugins()\n"
        "first = names()\n"
        "load_plugins()\n"
        "order = [impl.plugin_name for impl in pm.hook.register_backbones.get_hookimpls()]\n"
        "print(json.dumps({'before': before, 'first': first, 'second': names(), 'order': order, 'errors': errors}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **plugin_env(gem_site, "gem")})
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["before"] == []  # imports alone (mltk.plugins, mltk.registry, mltk.cli) load no plugin
    assert result["first"] == result["second"] == sorted([
        "gem", "mltk.default_plugins.backbones", "mltk.default_plugins.datasets", "mltk.default_plugins.loggers", "mltk.default_plugins.losses",
        "mltk.default_plugins.metrics", "mltk.default_plugins.miners", "mltk.default_plugins.rerankers",
    ])
    assert result["order"] == ["mltk.default_plugins.backbones", "gem"]  # built-ins first: a duplicate name is the plugin's
    assert result["errors"] == {}


def test_gem_backbone_builds_and_pools(gem_site):
    code = (
        "import torch; from mltk.registry import create_backbone, get;"
        "m = create_backbone('gem_resnet18').eval(); x = torch.rand(2, 3, 32, 32);"
        "print(get('backbones', 'gem_resnet18').plugin, m.num_features, tuple(m(x).shape), float(m.pool.p))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **plugin_env(gem_site, "gem")})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["gem", "512", "(2,", "512)", "3.0"]


def test_load_plugins_empty_means_builtins_only(gem_site, mltk_cli):
    result = mltk_cli("plugins", "--json", env=plugin_env(gem_site, load=""))
    assert "gem" not in {row["name"] for row in json.loads(result.stdout)}


BROKEN = {
    "broken_import.py": "import a_module_that_is_not_installed\n",
    "broken_hook.py": "import mltk\n\n@mltk.hookimpl\ndef register_losses(register):\n    raise RuntimeError('hook exploded')\n",
    "broken_dup.py": "import mltk\n\n@mltk.hookimpl\ndef register_backbones(register):\n    register('resnet50', lambda **kw: None)\n",
    "broken_spec.py": "import mltk\n\n@mltk.hookimpl\ndef register_lossess(register):\n    pass\n",
    "broken_cmd.py": "import mltk\n\n@mltk.hookimpl\ndef register_commands(cli):\n    raise RuntimeError('no commands today')\n",
}


@pytest.fixture
def broken_site(tmp_path):
    """A folder with five plugins installed the way pip would (dist-info with entry points), each broken."""
    for name, source in BROKEN.items():
        (tmp_path / name).write_text(source)
    info = tmp_path / "mltk_broken-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: mltk-broken\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[mltk]\n" + "".join(f"{n[:-3]} = {n[:-3]}\n" for n in BROKEN))
    return tmp_path


def test_broken_plugins_are_reported_and_list_still_works(broken_site, mltk_cli):
    result = mltk_cli("list", "backbones", "resnet5*", env=plugin_env(broken_site))
    assert result.returncode == 0, result.stderr
    assert "resnet50" in result.stdout.split()
    assert "warning: plugin 'broken_import' failed: ModuleNotFoundError: No module named 'a_module_that_is_not_installed'" in result.stderr
    assert "warning: plugin 'broken_dup' failed: register_backbones: ValueError: backbone 'resnet50' is already registered by 'mltk.default_plugins.backbones'" in result.stderr
    assert "warning: plugin 'broken_spec' failed: PluginValidationError" in result.stderr and "register_lossess" in result.stderr
    losses = mltk_cli("list", "losses", "arcface", env=plugin_env(broken_site))
    assert losses.returncode == 0 and "arcface" in losses.stdout
    assert "warning: plugin 'broken_hook' failed: register_losses: RuntimeError: hook exploded" in losses.stderr


def test_plugins_command_shows_each_broken_plugin(broken_site, mltk_cli):
    rows = {row["name"]: row for row in json.loads(mltk_cli("plugins", "--json", env=plugin_env(broken_site)).stdout)}
    assert rows["broken_import"]["error"].startswith("ModuleNotFoundError")
    assert rows["broken_hook"]["error"] == "register_losses: RuntimeError: hook exploded"
    assert rows["broken_dup"]["distribution"] == "mltk-broken"
    assert rows["broken_cmd"]["error"] == "register_commands: RuntimeError: no commands today"
    assert rows["mltk.default_plugins.backbones"]["error"] is None


def test_a_name_a_broken_plugin_would_have_registered_points_at_it(broken_site, mltk_cli):
    result = mltk_cli("list", "losses", "gem_loss", env=plugin_env(broken_site))
    assert result.returncode == 2
    assert result.stderr == "error: unknown loss 'gem_loss'; see `mltk list losses` (plugins that failed: broken_cmd, broken_hook, broken_import, broken_spec; see `mltk plugins`)\n"


def test_load_plugins_naming_an_uninstalled_plugin_is_reported(mltk_cli):
    env = {"MLTK_LOAD_PLUGINS": "pd_not_installed"}
    rows = {row["name"]: row for row in json.loads(mltk_cli("plugins", "--json", env=env).stdout)}
    assert rows["pd_not_installed"]["error"].startswith("not installed")
    listed = mltk_cli("list", "datasets", env=env)
    assert listed.returncode == 0 and "digits" in listed.stdout
    assert listed.stderr.startswith("warning: plugin 'pd_not_installed' failed: not installed")
    rows = json.loads(mltk_cli("plugins", "--json", env={"MLTK_LOAD_PLUGINS": ""}).stdout)  # '' asks for none: nothing is missing
    assert rows and all(row["error"] is None for row in rows)
