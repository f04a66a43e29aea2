"""The run configuration: one dataclass, read from YAML (safe_load), overridden by the command line."""

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mltk.errors import UsageError


@dataclass
class RunConfig:
    # data
    data: str = "digits"
    data_classes: list = field(default_factory=list)  # fnmatch patterns: train on these classes of --data only
    val_data: str | None = None
    val_data_classes: list = field(default_factory=list)  # the same for --val-data
    val_classes: float = 0.0
    image_size: int | None = None  # None: the dataset's hint, else the backbone's own
    augment: bool = False
    augment_options: dict = field(default_factory=dict)
    # model
    backbone: str = "resnet18"
    backbone_kwargs: dict = field(default_factory=dict)
    pretrained: bool = False
    weights: str | None = None
    freeze_backbone: bool = False
    dim: int | None = 512
    # objective
    loss: str = "arcface"
    loss_options: dict = field(default_factory=dict)
    miner: str | None = None
    miner_options: dict = field(default_factory=dict)
    # optimisation
    epochs: int = 10
    batch_size: int = 64
    m_per_class: int | None = None  # None: the dataset's hint, else 4
    lr: float = 1e-3
    loss_lr: float = 1e-2
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    grad_clip: float | None = 5.0
    amp: bool | None = None  # None: on with a GPU or a CPU with AMX (fast bf16)
    # run
    seed: int = 0
    workers: int = 2
    device: str = "auto"
    out: str | None = None


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file {str(path)!r} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UsageError(f"config file {str(path)!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
    if not isinstance(values, dict):
        raise UsageError(f"config file {str(path)!r} must hold a mapping of options")
    return values


def make_config(values: dict[str, Any], source: str = "config") -> RunConfig:
    """A RunConfig from plain values; an unknown key is named, with the closest known one."""
    for key in values:
        if key not in FIELDS:
            close = difflib.get_close_matches(key, FIELDS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UsageError(f"unknown key {key!r} in {source}{hint}")
        check_type(key, values[key], source)
    cfg = RunConfig(**values)
    validate(cfg)
    return cfg


def check_type(key: str, value: Any, source: str) -> None:
    """A value of the field's type (an int is a float too, a bool is not an int), or a UsageError naming the key."""
    allowed = typing.get_args(FIELDS[key].type) or (FIELDS[key].type,)  # ``int | None`` -> (int, NoneType)
    if float in allowed and type(value) is int:
        return
    if isinstance(value, bool) and bool not in allowed or not isinstance(value, allowed):
        names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise UsageError(f"{key} in {source} must be {names}, got {value!r}")


def resolve(config_file: str | Path | None, overrides: dict[str, Any]) -> RunConfig:
    """Config file values, then the options given on the command line (``None`` = not given)."""
    values = load_yaml(config_file) if config_file else {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    return make_config(values, source=str(config_file) if config_file else "options")


def validate(cfg: RunConfig) -> None:
    if cfg.dim is not None and cfg.dim <= 0:
        raise UsageError(f"--dim must be a positive number of dimensions, got {cfg.dim}")
    if not 0.0 <= cfg.val_classes < 1.0:
        raise UsageError(f"--val-classes is a fraction of the classes in [0, 1), got {cfg.val_classes}")
    if cfg.val_classes and cfg.val_data:
        raise UsageError("give either --val-data or --val-classes, not both")
    m = cfg.m_per_class or 1
    if cfg.batch_size < 2 or m < 1 or cfg.batch_size % m or cfg.batch_size == m:
        raise UsageError(f"--batch-size ({cfg.batch_size}) must be a multiple (2x or more) of --m-per-class ({m})")
    if cfg.epochs < 0:
        raise UsageError(f"--epochs must be >= 0, got {cfg.epochs}")
    parse_loss_spec(cfg.loss)


_TERM = re.compile(r"^(?:(?P<weight>[^*]+)\*)?(?P<name>[A-Za-z_][\w.\-]*)$")


def parse_loss_spec(spec: str) -> list[tuple[float, str]]:
    """``'0.01*center+ce+arcface'`` -> ``[(0.01, 'center'), (1.0, 'ce'), (1.0, 'arcface')]``."""
    terms = []
    for raw in str(spec).replace(" ", "").split("+"):
        match = _TERM.match(raw)
        if not match:
            raise UsageError(f"bad loss term {raw!r} in {spec!r}; write terms like 'arcface' or '0.01*center' joined by '+'")
        weight = match["weight"]
        try:
            value = float(weight) if weight is not None else 1.0
        except ValueError:
            raise UsageError(f"bad weight {weight!r} in loss spec {spec!r}; a weight is a number, as in '0.01*center'") from None
        if not value > 0 or value == float("inf"):
            raise UsageError(f"bad weight {weight!r} in loss spec {spec!r}; weights must be positive and finite")
        terms.append((value, match["name"]))
    names = [n for _, n in terms]
    if len(set(names)) != len(names):
        raise UsageError(f"loss spec {spec!r} names a loss twice")
    return terms


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_yaml(cfg: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
