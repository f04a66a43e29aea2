"""Rules for values from a user or a file: each checks one value and, when it does not hold, raises a
UsageError that names the option, what it takes and what it got (cut short: a megabyte is never
echoed back). ``mltk.config`` states each run option's rule with these; the files mltk reads back
(a checkpoint's fields, an index's meta.json, thresholds.json) and the re-rankers' parameters are
stated with them too, and ``from_file`` makes a file's failure the file's fault.
"""

import difflib
import math
import re
import reprlib
import typing
from dataclasses import dataclass, field
from typing import Any

from mltk.errors import MltkError, UsageError

FLAGS = "options"  # the source name of values given as command-line flags: messages name them --like-this
FLAG_NAMES = {"data_classes": "classes"}  # keys whose flag is not the key's name: ``mltk run --classes`` sets data_classes


def named(path: str, source: str) -> str:
    """How a message names an option: ``--image-size`` given on the command line, else ``image_size in c.yaml``;
    an item of a list (``data_classes[0]``) by the flag that gave it (``--classes``, one per item); with no
    source (the caller names the file around the message), by its path alone."""
    key = path.split("[", 1)[0]
    if source == FLAGS and key.isidentifier():  # an option given as a flag
        return "--" + FLAG_NAMES.get(key, key).replace("_", "-")
    return f"{path} in {source}" if source else path


_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlist, _short.maxdict, _short.maxlevel = 60, 60, 6, 6, 2


def show(value: Any) -> str:
    """A user's value for a message: its repr, cut short (a megabyte of YAML is not echoed back)."""
    if isinstance(value, int) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    if hasattr(value, "shape") and hasattr(value, "dtype"):  # a tensor or an array: by its shape, not its numbers
        return f"{'a tensor' if type(value).__name__ == 'Tensor' else 'an array'} of shape {list(value.shape)}"
    return _short.repr(value)


def number(value: Any, whole: bool = False) -> int | float | None:
    """``value`` as a number, or None: a bool is not one; a float is not whole; a numeric string
    (YAML 1.1 reads ``1e-3`` as one) is its float."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if whole:
        return None
    if isinstance(value, float):
        return value
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _g(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


# -- Rules: what one value may hold. ``check`` returns the value (a numeric string as its float) or
# -- raises a UsageError that names the option, what it takes and what it got.


@dataclass(frozen=True)
class Rule:
    what: str = field(default="", kw_only=True)  # how messages describe it, when the default says it badly

    def __str__(self) -> str:
        return self.what

    def fail(self, value: Any, path: str, source: str) -> typing.NoReturn:
        raise UsageError(f"{named(path, source)} must be {self}, got {show(value)}")


@dataclass(frozen=True)
class Number(Rule):
    """A finite number in [lo, hi] (``hi`` left out when ``open``, ``lo`` when ``open_lo``); an integer when ``whole``;
    ``hi`` infinite: no upper bound ("at least lo")."""

    lo: float
    hi: float = math.inf
    whole: bool = False
    open: bool = False
    open_lo: bool = False
    strings: bool = True  # a numeric string is its number (YAML 1.1 reads 1e-3 as one); False for JSON files


    def __str__(self) -> str:
        kind = "an integer" if self.whole else "a number"
        if self.what:
            return self.what
        if math.isinf(self.hi):
            return f"{kind} {'above' if self.open_lo else 'of at least'} {_g(self.lo)}"
        return f"{kind} in {'(' if self.open_lo else '['}{_g(self.lo)}, {_g(self.hi)}{')' if self.open else ']'}"

    def check(self, value: Any, path: str, source: str):
        n = None if isinstance(value, str) and not self.strings else number(value, self.whole)
        if n is None or isinstance(n, float) and not math.isfinite(n) or not self.holds(n):  # nan fails every bound
            self.fail(value, path, source)
        return n

    def holds(self, n) -> bool:
        return (self.lo < n if self.open_lo else self.lo <= n) and (n < self.hi if self.open else n <= self.hi)


@dataclass(frozen=True)
class Choice(Rule):
    choices: tuple

    def __str__(self) -> str:
        return self.what or "one of " + ", ".join(map(repr, self.choices))

    def check(self, value: Any, path: str, source: str):
        if not isinstance(value, str) or value not in self.choices:
            self.fail(value, path, source)
        return value


@dataclass(frozen=True)
class Text(Rule):
    pattern: str = r".+"

    def __str__(self) -> str:
        return self.what or "text"

    def check(self, value: Any, path: str, source: str):
        if not isinstance(value, str) or not re.fullmatch(self.pattern, value):
            self.fail(value, path, source)
        return value


@dataclass(frozen=True)
class Flag(Rule):
    def __str__(self) -> str:
        return "true or false"

    def check(self, value: Any, path: str, source: str):
        if not isinstance(value, bool):
            self.fail(value, path, source)
        return value


@dataclass(frozen=True)
class Scalar(Rule):
    """One plain value: text, a finite number, true/false or null."""

    def __str__(self) -> str:
        return self.what or "text, a finite number, true/false or null"

    def check(self, value: Any, path: str, source: str):
        if not (value is None or isinstance(value, (str, int)) or isinstance(value, float) and math.isfinite(value)):
            self.fail(value, path, source)
        return value


@dataclass(frozen=True)
class Where(Rule):
    """A value ``test`` accepts, described by ``what``: for what the other rules cannot say (a state dict of tensors)."""

    test: typing.Callable[[Any], bool]

    def check(self, value: Any, path: str, source: str):
        if not self.test(value):
            self.fail(value, path, source)
        return value


@dataclass(frozen=True)
class Maybe(Rule):
    rule: Rule

    def __str__(self) -> str:
        return self.what or f"{self.rule}, or null"

    def check(self, value: Any, path: str, source: str):
        return None if value is None else self.rule.check(value, path, source)


@dataclass(frozen=True)
class ListOf(Rule):
    """A list of ``item``s, as many as ``lengths`` allows (when given)."""

    item: Rule
    lengths: tuple = ()

    def __str__(self) -> str:
        count = " or ".join(map(str, self.lengths)) + " " if self.lengths else ""
        return self.what or f"a list of {count}items, each {self.item}"

    def check(self, value: Any, path: str, source: str):
        if not isinstance(value, (list, tuple)) or self.lengths and len(value) not in self.lengths:
            self.fail(value, path, source)
        return [self.item.check(v, f"{path}[{i}]", source) for i, v in enumerate(value)]


@dataclass(frozen=True)
class Seq(Rule):
    """A list whose items each have their own rule: ``[min, max]`` pairs, colour jitter's numbers."""

    items: tuple

    def __str__(self) -> str:
        return self.what or "[" + ", ".join(map(str, self.items)) + "]"

    def check(self, value: Any, path: str, source: str):
        if not isinstance(value, (list, tuple)) or len(value) != len(self.items):
            self.fail(value, path, source)
        return [rule.check(v, f"{path}[{i}]", source) for i, (rule, v) in enumerate(zip(self.items, value))]


@dataclass(frozen=True)
class AnyOf(Rule):
    rules: tuple

    def __str__(self) -> str:
        return self.what or " or ".join(map(str, self.rules))

    def check(self, value: Any, path: str, source: str):
        for rule in self.rules:
            try:
                return rule.check(value, path, source)
            except UsageError:
                continue
        self.fail(value, path, source)


@dataclass(frozen=True)
class MappingOf(Rule):
    """A mapping of names (checked where they are used) to values of one rule."""

    value: Rule

    def __str__(self) -> str:
        return self.what or f"a mapping of names to {self.value}"

    def check(self, value: Any, path: str, source: str):
        if not isinstance(value, dict):
            self.fail(value, path, source)
        return {key: self.value.check(v, f"{path}[{key!r}]", source) for key, v in value.items()}


@dataclass(frozen=True)
class Options(Rule):
    """A mapping of known option names, each with its rule; ``required`` ones must be there when any is (always, when
    not ``empty_ok``: a record read from a file)."""

    rules: dict
    required: tuple = ()
    empty_ok: bool = True

    def __str__(self) -> str:
        return self.what or "a mapping of options"

    def check(self, value: Any, path: str, source: str):
        if not isinstance(value, dict):
            self.fail(value, path, source)
        for key in value:
            if key not in self.rules:
                raise UsageError(unknown(key, path, source, self.rules))
        missing = [key for key in self.required if (value or not self.empty_ok) and key not in value]
        if missing:
            raise UsageError(f"{named(path, source)} needs {missing[0]!r} ({self.rules[missing[0]]})")
        return {key: self.rules[key].check(v, f"{path}[{key!r}]", source) for key, v in value.items()}


def unknown(key: str, path: str, source: str, known, owner: str = "") -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"it takes {', '.join(sorted(known)) or 'none'}"
    return f"unknown key {show(key)} in {named(path, source)}{f' ({owner})' if owner else ''}; {hint}"


def from_file(rule: Rule, value: Any, path: str, where: str, again: str = "") -> Any:
    """``rule.check`` on a value read back from a file, whose failure is the file's fault, not the command line's: an
    MltkError (exit 1) ``where: PATH must be ..., got ...`` (``where`` names the file), ``; again`` after it."""
    try:
        return rule.check(value, path, "")
    except UsageError as exc:
        raise MltkError(f"{where}: {exc}{f'; {again}' if again else ''}") from None
