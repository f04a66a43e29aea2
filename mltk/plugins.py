"""The plugin manager: built-in plugins, then the ``mltk`` entry-point group, registered by ``load_plugins()``.

Importing this module registers nothing; whatever reads the catalogue (mltk.registry, ``mltk list``,
``mltk plugins``, the plugins' commands) calls ``load_plugins()`` first, and only the first call loads.
"""

import importlib
import os
from importlib.metadata import entry_points

import pluggy

from mltk import hookspecs

DEFAULT_PLUGINS = (
    "mltk.default_plugins.backbones",
    "mltk.default_plugins.losses",
    "mltk.default_plugins.miners",
    "mltk.default_plugins.metrics",
    "mltk.default_plugins.datasets",
    "mltk.default_plugins.loggers",
    "mltk.default_plugins.rerankers",
)

pm = pluggy.PluginManager("mltk")
pm.add_hookspecs(hookspecs)

#: plugin name -> error text, for plugins that could not be loaded or whose hook failed
errors: dict[str, str] = {}
#: plugin name -> (distribution name, version) for plugins that came from an entry point
distributions: dict[str, tuple[str, str]] = {}
_loaded = False


def load_plugins() -> None:
    """Register the built-in plugins, then the installed ones ``MLTK_LOAD_PLUGINS`` allows; once per process."""
    global _loaded
    if _loaded:
        return
    _loaded = True  # set first: a plugin that looks something up while it loads must not load everything again
    for name in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(name), name=name)
    _load_entry_points()


def _allowed() -> set[str] | None:
    """``MLTK_LOAD_PLUGINS``: unset loads every plugin, ``''`` none, ``a,b`` only those."""
    value = os.environ.get("MLTK_LOAD_PLUGINS")
    if value is None:
        return None
    return {name.strip() for name in value.split(",") if name.strip()}


def _load_entry_points() -> None:
    allowed = _allowed()
    wanted = set(allowed or ())  # names MLTK_LOAD_PLUGINS asks for that no installed plugin has answered yet
    for ep in entry_points(group="mltk"):
        dist = (ep.dist.name, ep.dist.version) if ep.dist else (ep.name, "")
        if allowed is not None and ep.name not in allowed and dist[0] not in allowed:
            continue
        wanted -= {ep.name, dist[0]}
        distributions[ep.name] = dist
        try:
            if pm.has_plugin(ep.name):
                raise ValueError(f"the plugin name {ep.name!r} is already taken")
            pm.register(ep.load(), name=ep.name)
        except Exception as exc:  # a broken plugin must not take the others down
            errors[ep.name] = f"{type(exc).__name__}: {exc}"
    for name in sorted(wanted - set(DEFAULT_PLUGINS)):  # a typo or an uninstalled package must not go unnoticed
        errors[name] = "not installed: MLTK_LOAD_PLUGINS names it, but no installed package has an mltk plugin of that name"
    while True:  # a plugin implementing an unknown hook is reported, then dropped
        try:
            pm.check_pending()
            return
        except pluggy.PluginValidationError as exc:
            errors[pm.get_name(exc.plugin)] = f"PluginValidationError: {exc}"
            pm.unregister(exc.plugin)

