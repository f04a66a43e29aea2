"""Lookups over what the plugins register: ``list_*`` with fnmatch patterns, ``create_*`` by name.

Catalogues are rebuilt from the hooks on every call (after ``load_plugins()``, which loads the
plugins the first time), so registering or unregistering a plugin is seen at once. A duplicate name or a hook that raises is recorded in ``mltk.plugins.errors``
under the plugin's name; the other plugins' entries stay available. A name that could not be
written in a ``--loss`` spec (or a table) is refused on its own: the plugin's other entries stay.
"""

import difflib
import fnmatch
import inspect
import re
from dataclasses import dataclass
from typing import Any, Callable

from mltk.errors import UsageError
from mltk.plugins import errors, load_plugins, pm

KINDS = {"backbones": "backbone", "losses": "loss", "miners": "miner", "metrics": "metric", "datasets": "dataset", "loggers": "logger", "rerankers": "re-ranker"}
#: what a name may be: a term of a loss spec (mltk.config's _TERM), so no spaces, '*', '+', markup or control characters
NAME = re.compile(r"[A-Za-z_][\w.\-]*")
MAX_NAME = 100
#: names that plugins outside mltk's core register, and how to get them: said when such a name is not found
ELSEWHERE = {("loggers", "mlflow"): "pip install ./plugins/mltk-mlflow, in a clone of mltk's repository"}
#: what a metric may say it reads (``register(name, fn, needs=...)``, mltk.metrics): the kNN lists or the pair counts
NEEDS = ("neighbours", "pairs")


@dataclass(frozen=True)
class Entry:
    name: str
    factory: Callable[..., Any]
    plugin: str
    description: str = ""
    needs: str | None = None  # a metric's: what it reads, one of NEEDS; None: both


def catalogue(kind: str) -> dict[str, Entry]:
    """Every entry of one kind, by name, built-ins first."""
    if kind not in KINDS:
        raise UsageError(f"unknown kind {kind!r}; choose one of {', '.join(KINDS)}")
    load_plugins()
    entries: dict[str, Entry] = {}
    hook = getattr(pm.hook, f"register_{kind}")
    # get_hookimpls() lists plugins in registration order: built-ins, then entry points.
    for impl in hook.get_hookimpls():
        plugin = impl.plugin_name
        added: dict[str, Entry] = {}

        def register(name: str, factory: Callable[..., Any], description: str = "", needs: str | None = None) -> None:
            problem = refusal(name, factory, description) or refused_needs(kind, name, needs)
            if problem:  # this entry only: the plugin's others are fine
                report(plugin, f"register_{kind}: {KINDS[kind]} {problem}")
                return
            owner = entries.get(name) or added.get(name)
            if owner is not None:
                raise ValueError(f"{KINDS[kind]} {name!r} is already registered by {owner.plugin!r}")
            added[name] = Entry(name, factory, plugin, description, needs)

        try:
            impl.function(register=register)
        except Exception as exc:  # report the plugin by name, keep everything else
            report(plugin, f"register_{kind}: {type(exc).__name__}: {exc}")
            continue
        entries.update(added)
    return entries


def refusal(name: Any, factory: Any, description: Any) -> str | None:
    """Why ``register(name, factory, description)`` is refused, or None."""
    if not isinstance(name, str):
        return f"name {_shown(name)} refused: a name is a string"
    if len(name) > MAX_NAME or not NAME.fullmatch(name):
        return (
            f"name {_shown(name)} refused: a name starts with a letter or '_' and holds only letters, "
            f"digits, '_', '.' and '-' (at most {MAX_NAME})"
        )
    if not callable(factory):
        return f"{name!r} refused: its builder is a {type(factory).__name__}, not something to call"
    if not isinstance(description, str):
        return f"{name!r} refused: its description is a {type(description).__name__}, not a string"
    return None


def refused_needs(kind: str, name: str, needs: Any) -> str | None:
    """Why ``register(name, ..., needs=needs)`` is refused for an entry of ``kind``, or None."""
    if needs is None:
        return None
    if kind != "metrics":
        return f"{name!r} refused: needs= is for metrics, which say with it what they read"
    if needs not in NEEDS:
        return f"{name!r} refused: needs={_shown(needs)} is not {' or '.join(map(repr, NEEDS))} (or nothing, for both)"
    return None


def _shown(value: Any, limit: int = 40) -> str:
    """A short repr: strings quoted (control characters escaped) and cut, other values by their type."""
    if not isinstance(value, str):
        return f"of type {type(value).__name__}"
    return repr(value[:limit]) + ("..." if len(value) > limit else "")


def report(plugin: str, message: str) -> None:
    """Record a plugin's problem once; catalogues are rebuilt on every lookup, so the same one comes back."""
    known = errors.get(plugin)
    if not known:
        errors[plugin] = message
    elif message not in known:
        errors[plugin] = f"{known}; {message}"


def names(kind: str, pattern: str = "*") -> list[str]:
    """Names of one kind matching an fnmatch pattern, in natural order ("loss2" before "loss10")."""
    return sorted((n for n in catalogue(kind) if fnmatch.fnmatchcase(n, pattern)), key=natural)


def natural(name: str) -> tuple[list, str]:
    """A sort key that compares the runs of digits in a name by their value; the name itself breaks ties ("a01", "a1")."""
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", name))], name


def get(kind: str, name: str) -> Entry:
    """The entry for ``name``, or a UsageError that suggests close names."""
    entries = catalogue(kind)
    if name in entries:
        return entries[name]
    close = difflib.get_close_matches(name, list(entries), n=3, cutoff=0.6)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else f"; see `mltk list {kind}`"
    if errors:  # the name may belong to a plugin that failed to load
        hint += f" (plugins that failed: {', '.join(sorted(errors))}; see `mltk plugins`)"
    if (kind, name) in ELSEWHERE:
        hint += f" ({name} comes with a plugin: {ELSEWHERE[kind, name]})"
    raise UsageError(f"unknown {KINDS[kind]} {name!r}{hint}")


def list_backbones(pattern: str = "*") -> list[str]:
    return names("backbones", pattern)


def list_losses(pattern: str = "*") -> list[str]:
    return names("losses", pattern)


def list_miners(pattern: str = "*") -> list[str]:
    return names("miners", pattern)


def list_metrics(pattern: str = "*") -> list[str]:
    return names("metrics", pattern)


def list_datasets(pattern: str = "*") -> list[str]:
    return names("datasets", pattern)


def list_loggers(pattern: str = "*") -> list[str]:
    return names("loggers", pattern)


def list_rerankers(pattern: str = "*") -> list[str]:
    return names("rerankers", pattern)


def create_backbone(name: str, pretrained: bool = False, weights: str | None = None, img_size: int | None = None, **kwargs: Any):
    """A backbone module with ``num_features``; ``weights`` is a local weights file.

    ``img_size`` goes to builders that declare it (models with a fixed input size need it).
    """
    factory = get("backbones", name).factory
    if img_size is not None and "img_size" in inspect.signature(factory).parameters:
        kwargs["img_size"] = img_size
    return factory(pretrained=pretrained, weights=weights, **kwargs)


def create_loss(name: str, num_classes: int, embedding_size: int, **kwargs: Any):
    """A pytorch-metric-learning loss; its own parameters (if any) are its ``parameters()``."""
    return get("losses", name).factory(num_classes=num_classes, embedding_size=embedding_size, **kwargs)


def create_miner(name: str, **kwargs: Any):
    return get("miners", name).factory(**kwargs)


def create_dataset(name: str, **kwargs: Any):
    return get("datasets", name).factory(**kwargs)


def create_logger(name: str, config: Any, run_dir: Any):
    """A logger for one run (``--log NAME``): an object implementing the run hooks of mltk.hookspecs; it writes nothing yet."""
    return get("loggers", name).factory(config=config, run_dir=run_dir)


def create_reranker(name: str, **params: Any):
    """A re-ranker for ``--rerank NAME:KEY=VALUE,...`` (mltk.rerank): what it re-orders, and how."""
    return get("rerankers", name).factory(**params)
