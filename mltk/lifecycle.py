"""A run's lifecycle hooks, and an evaluation's (mltk.hookspecs): the plugins' and the loggers', each called on its own.

pluggy calls a hook's implementations in one go and stops at the first that raises. A run calls each
implementation itself instead, so that one that fails is reported once, with its plugin's name, and left
out for the rest of the run, while the others and the run go on. Ctrl-C still stops the run, and so does a
plugin that exits (``sys.exit``): that one is said, as ``PluginExit``, rather than ending mltk without a word.
"""

from contextlib import contextmanager
from typing import Any, Callable

from mltk.errors import Interrupted, MltkError
from mltk.plugins import load_plugins, pm


class PluginExit(MltkError):
    """A plugin exited (SystemExit) in a hook: the run (or evaluation) stops with the plugin's exit code (1 when it gave none, or 0)."""

    def __init__(self, plugin: str, hook: str, code: object, what: str = "run"):
        self.exit_code = code if isinstance(code, int) and code else 1
        how = "exited" if code is None else f"exited with code {code}" if isinstance(code, int) else f"exited saying {str(code)!r}"
        super().__init__(f"plugin {plugin!r} stopped the {what} in {hook}: it {how}")


class Lifecycle:
    """The hooks for one run (or one evaluation): ``call(hook, **arguments)`` returns what the implementations returned (None left out).

    ``loggers`` (name -> object implementing run hooks, as ``--log`` made them) are registered as plugins named
    ``log:NAME`` while ``running()``; ``warn`` is told about a failing implementation, once. ``what`` the hooks
    follow ("run", "evaluation") is what its warning says the implementation is left out of."""

    def __init__(self, loggers: dict[str, Any], warn: Callable[[str], None], what: str = "run"):
        self.loggers = loggers
        self.warn = warn
        self.what = what
        self.disabled: set[str] = set()

    def call(self, hook: str, **arguments) -> list:
        results = []
        for impl in reversed(getattr(pm.hook, hook).get_hookimpls()):  # pluggy's order: tryfirst ones, last registered first, trylast ones
            if impl.plugin_name in self.disabled:
                continue
            try:
                value = impl.function(*(arguments[name] for name in impl.argnames))
            except Exception as exc:  # a plugin's bug must not end the run (Ctrl-C, a BaseException, still does)
                self.disabled.add(impl.plugin_name)
                self.warn(f"plugin {impl.plugin_name!r} failed in {hook}: {type(exc).__name__}: {exc}; it is left out for the rest of this {self.what}")
                continue
            except SystemExit as exc:
                raise PluginExit(impl.plugin_name, hook, exc.code, self.what) from None
            if value is not None:
                results.append(value)
        return results

    def stop_reason(self, record: dict, run_dir) -> str | None:
        """The first reason a plugin gives to stop after this epoch (``epoch_ended``), or None."""
        for value in self.call("epoch_ended", record=record, run_dir=run_dir):
            if value:
                return value if isinstance(value, str) else "a plugin asked to stop"
        return None

    @contextmanager
    def running(self, config, run_dir, result):
        """``run_started`` now, ``run_ended`` with the error that ends the run (or None) at the end, even one in
        ``run_started`` (a logger that started its own record closes it); the loggers are plugins only in between."""
        with self.registered():
            try:
                self.call("run_started", config=config, run_dir=run_dir)
                yield self
            except BaseException as exc:
                ctrl_c = isinstance(exc, KeyboardInterrupt) and not isinstance(exc, Interrupted)
                self.call("run_ended", result=result, error=Interrupted("interrupted") if ctrl_c else exc)  # as the hook says: Ctrl-C is Interrupted
                raise
            self.call("run_ended", result=result, error=None)

    @contextmanager
    def registered(self):
        """The plugins loaded, and the loggers registered as plugins ``log:NAME`` inside the block."""
        load_plugins()
        names = []
        try:
            for name, logger in self.loggers.items():
                try:
                    pm.register(logger, name=f"log:{name}")
                except Exception as exc:  # e.g. a hook implemented with arguments the hook does not have
                    self.warn(f"logger {name!r} cannot follow this {self.what}: {type(exc).__name__}: {exc}")
                    continue
                names.append(f"log:{name}")
            yield
        finally:
            for name in names:
                pm.unregister(name=name)


class Silent(Lifecycle):
    """No hooks: what the other processes of a torchrun run use (rank 0 calls them)."""

    def __init__(self):
        super().__init__({}, lambda message: None)

    def call(self, hook: str, **arguments) -> list:
        return []

    @contextmanager
    def running(self, config, run_dir, result):
        yield self


def evaluation_loggers(names: list[str] | None, config, run_dir, warn: Callable[[str], None]) -> dict[str, Any]:
    """The loggers an evaluation writes to, made before any work: those ``names`` (``--log``; an unknown name or a
    missing package is an error), else the run's own (its config's ``log``; one that cannot be made here is a warning).
    ``config`` and ``run_dir``: the evaluated model's (None: an untrained backbone, a checkpoint outside a run)."""
    from mltk import registry

    if names is not None:
        return {name: registry.create_logger(name, config, run_dir) for name in names}
    loggers = {}
    for name in config.log if config is not None and run_dir is not None else []:
        try:
            loggers[name] = registry.create_logger(name, config, run_dir)
        except MltkError as exc:  # asked for by the run, not by this command: the evaluation goes on without it
            warn(f"the run's logger {name!r} is left out: {exc} (choose with --log; --log none for none)")
    return loggers


def evaluation_ended(loggers: dict[str, Any], warn: Callable[[str], None], **arguments) -> None:
    """``evaluation_ended(**arguments)`` on the plugins and ``loggers``, each on its own: one that fails is a warning."""
    hooks = Lifecycle(loggers, warn, "evaluation")
    with hooks.registered():
        hooks.call("evaluation_ended", **arguments)
