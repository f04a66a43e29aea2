"""The ``mltk`` command: thin Typer commands over the library.

Heavy modules (torch, timm, faiss, pytorch-metric-learning) are imported inside the commands
that need them, so ``mltk --help`` starts fast.
"""

import json
import re
import sys
from enum import Enum
from typing import Annotated

import typer
from rich.table import Table
from rich.text import Text

from mltk.cli.output import cell, console, warn
from mltk.display import one_line, shown
from mltk.errors import MltkError

app = typer.Typer(
    name="mltk",
    help="Metric learning for PyTorch: train, evaluate and serve embedding models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _flags_show_no_type() -> None:
    """A flag takes no value, yet Typer's rich help shows its type (``--quiet <bool>``); show none, for every command."""
    from typer.core import TyperOption

    if not hasattr(TyperOption, "display_type_rich"):  # a Typer that does not show types
        return
    typed = TyperOption.display_type_rich

    def display_type_rich(self, ctx):
        return None if self.is_flag else typed(self, ctx)

    TyperOption.display_type_rich = display_type_rich


_flags_show_no_type()


def _print_version(value: bool) -> None:
    if value:
        print(f"mltk {_version()}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[bool, typer.Option("--version", "-V", callback=_print_version, is_eager=True, help="Print mltk's version and exit.")] = False,
) -> None:
    """mltk's own options (the app's help is the Typer's above)."""


class Kind(str, Enum):
    backbones = "backbones"
    losses = "losses"
    miners = "miners"
    metrics = "metrics"
    datasets = "datasets"
    loggers = "loggers"
    rerankers = "rerankers"


def warn_plugin_errors() -> None:
    from mltk.plugins import errors

    for plugin, message in errors.items():
        warn(f"plugin {plugin!r} failed: {message}")


@app.command("list")
def list_(
    kind: Annotated[Kind, typer.Argument(help="What to list.")],
    pattern: Annotated[str, typer.Argument(help="fnmatch pattern, e.g. 'arc*'.")] = "*",
) -> None:
    """List what can be composed: backbones, losses, miners, metrics, datasets or loggers."""
    from mltk import registry
    from mltk.plugins import load_plugins

    load_plugins()
    entries = registry.catalogue(kind.value)
    names = registry.names(kind.value, pattern)
    if not names and not any(c in pattern for c in "*?["):
        registry.get(kind.value, pattern)  # an exact name that does not exist: say so, with suggestions
    table = Table("name", "plugin", "description", box=None, header_style="bold")
    for name in names:
        entry = entries[name]
        table.add_row(cell(name), cell(plugin_label(entry.plugin)), cell(plain(entry.description)))
    console.print(table, soft_wrap=True)
    warn_plugin_errors()


# Descriptions often come from docstrings: their reStructuredText literals (``fars``) and roles (:func:`x`) show as text.
_RST = re.compile(r"``(.+?)``|:[\w:]+:`(.+?)`")


def plain(text: str) -> str:
    return _RST.sub(lambda m: m[1] or m[2], text)


@app.command()
def plugins(
    all_: Annotated[bool, typer.Option("--all", help="Each of mltk's built-in plugins on its own row (--json always lists them).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts: every plugin, built-ins too.")] = False,
) -> None:
    """Show each installed plugin: its version, what it registers, and why it failed to load; mltk's built-ins in one row."""
    from mltk import registry
    from mltk.plugins import distributions, errors, load_plugins, pm

    load_plugins()
    catalogues = {kind: registry.catalogue(kind) for kind in registry.KINDS}
    rows = []
    for name in sorted({pm.get_name(p) for p in pm.get_plugins()} | set(errors)):
        dist, version = distributions.get(name, ("mltk", _version()) if name.startswith("mltk.") else (name, ""))
        registers = {
            kind: sorted(n for n, e in entries.items() if e.plugin == name) for kind, entries in catalogues.items()
        }
        rows.append(
            {
                "name": name,
                "distribution": dist,
                "version": version,
                "registers": {k: v for k, v in registers.items() if v},
                "error": errors.get(name),
            }
        )
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not all_:
        rows = [row for row in rows if not is_builtin(row["name"])] + builtins_row([row for row in rows if is_builtin(row["name"])])
    # Names are never cut: the registers column wraps instead.
    table = Table("plugin", "version", "registers", "status", header_style="bold")
    table.columns[0].no_wrap = True
    table.columns[0].min_width = max((len(shown(row["name"])) for row in rows), default=6)
    for row in rows:
        status = Text(f"error: {one_line(row['error'])}", style="red") if row["error"] else Text("ok", style="green")
        table.add_row(cell(row["name"]), cell(row["version"]), cell(summary(row["registers"], counts=row["name"] == BUILTINS) or "-"), status)
    console.print(table)


BUILTINS = "mltk (built-in)"


def summary(registers: dict[str, list[str]], counts: bool = False) -> str:
    """What a plugin registers in a few words: the names of a short list, else (or with ``counts``) how many."""
    from mltk.registry import KINDS

    def count(kind: str, n: int) -> str:
        return f"{n} {kind if n != 1 else KINDS.get(kind, kind)}"

    return ", ".join(count(k, len(v)) if counts or len(v) > 6 else f"{k}: {' '.join(v)}" for k, v in registers.items())


def is_builtin(plugin: str) -> bool:
    return plugin.startswith("mltk.default_plugins.")


def builtins_row(rows: list[dict]) -> list[dict]:
    """mltk's built-in plugins as one row: what they register together, and any that failed."""
    if not rows:
        return []
    registers: dict[str, list[str]] = {}
    for row in rows:
        for kind, names in row["registers"].items():
            registers.setdefault(kind, []).extend(names)
    failed = "; ".join(f"{row['name']}: {row['error']}" for row in rows if row["error"])
    return [{"name": BUILTINS, "version": rows[0]["version"], "registers": dict(sorted(registers.items())), "error": failed or None}]


def plugin_label(plugin: str) -> str:
    """Built-in plugins show as ``mltk``; third-party ones by their entry-point name."""
    return "mltk" if is_builtin(plugin) else plugin


def _version() -> str:
    from mltk import __version__

    return __version__


from mltk.cli.compare import compare  # noqa: E402  (light: heavy imports happen inside the commands)
from mltk.cli.data import data  # noqa: E402
from mltk.cli.embed import embed  # noqa: E402
from mltk.cli.evaluate import evaluate  # noqa: E402
from mltk.cli.export import export  # noqa: E402
from mltk.cli.index import index_app, search  # noqa: E402
from mltk.cli.serve import serve  # noqa: E402
from mltk.cli.run import run  # noqa: E402
from mltk.cli.tune import tune  # noqa: E402
from mltk.cli.verify import verify  # noqa: E402

app.command()(run)
app.command()(tune)
app.command()(evaluate)
app.command()(compare)
app.command()(embed)
app.add_typer(index_app, name="index")
app.command()(search)
app.command()(serve)
app.command()(verify)
app.command()(export)
app.add_typer(data, name="data")


def _add_plugin_commands() -> None:
    from mltk.plugins import errors, load_plugins, pm

    load_plugins()
    for impl in pm.hook.register_commands.get_hookimpls():
        try:
            impl.function(cli=app)
        except Exception as exc:
            errors[impl.plugin_name] = f"register_commands: {type(exc).__name__}: {exc}"


def _click_exceptions():
    """The exceptions Typer's parser raises: from its own copy of click (newer Typer) or from click."""
    try:
        from typer._click import exceptions
    except ImportError:
        from click import exceptions
    return exceptions


def fail(message: object, code: int) -> None:
    """The one ``error:`` line and the exit code."""
    print(f"error: {' '.join(one_line(message).split())}", file=sys.stderr)
    sys.exit(code)


def main() -> None:
    """Entry point: user errors (mltk's and the command line's) become one line on stderr and a non-zero exit code."""
    _add_plugin_commands()
    click = _click_exceptions()
    try:
        code = app(prog_name="mltk", standalone_mode=False)  # Typer returns here instead of printing its error box
    except MltkError as exc:
        fail(exc, exc.exit_code)
    except click.UsageError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # plain `mltk`: the help, as before (rich already printed it)
            print(exc.format_message() or "", end="")
            sys.exit(exc.exit_code)
        where = f"; see `{exc.ctx.command_path} --help`" if exc.ctx is not None else ""
        fail(f"{exc.format_message().strip().rstrip('.')}{where}", exc.exit_code)
    except click.ClickException as exc:
        fail(exc.format_message(), exc.exit_code)
    except typer.Abort:  # end of input at a prompt
        fail("aborted", 1)
    sys.exit(code if isinstance(code, int) else 0)  # typer.Exit's code (--help: 0), else 0
