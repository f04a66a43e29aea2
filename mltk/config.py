"""The run configuration: one dataclass, read from YAML (safe_load), overridden by the command line.

Every value is untrusted: ``mltk run`` options, YAML files and the config stored in a checkpoint all
come through ``make_config``, which checks them whole before anything runs -- plain values of
bounded size under string keys, each option of its type and within ``RULES``, and the options of
the named backbone, losses and miner by the parameters their builders declare.
"""

import dataclasses
import difflib
import inspect
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from mltk.errors import UsageError, first_line
from mltk.rules import (
    FLAGS, AnyOf, Choice, Flag, ListOf, MappingOf, Maybe, Number, Options, Rule, Scalar, Seq, Text, named, number, show, unknown,
)


# Bounds on what any config may hold: a config is a page of options, not data.
MAX_FILE_BYTES = 1 << 20  # a config file
MAX_TEXT = 4096  # characters in a string (a path's limit on Linux)
MAX_ITEMS = 100_000  # items in a list or mapping (class patterns)
MAX_VALUES = 500_000  # values in all
MAX_DEPTH = 5  # nested lists and mappings (backbone_kwargs -> swin_kwargs -> depths is 3)
CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


PROBABILITY = Number(0, 1)
PLAIN = AnyOf((Scalar(), ListOf(Scalar())), what="text, a finite number, true/false, null or a list of them")

# augment_options: the keywords of timm's create_transform for training that make_transform leaves
# to the user (input size, mean, std and interpolation come from the backbone), and ``affine``:
# torchvision RandomAffine's arguments, applied first.
AFFINE_OPTIONS = {
    "degrees": AnyOf((Number(0, 180), Seq((Number(-180, 180),) * 2)), what="a number in [0, 180] or [min, max] in [-180, 180]"),
    "translate": Seq((PROBABILITY,) * 2, what="[x, y], each in [0, 1]"),
    "scale": Seq((Number(0.01, 10),) * 2, what="[min, max], each in [0.01, 10]"),
    "shear": AnyOf((Number(0, 90), ListOf(Number(-90, 90), (2, 4))), what="a number in [0, 90] or a list of 2 or 4 in [-90, 90]"),
    "fill": AnyOf((Number(0, 255), ListOf(Number(0, 255), (1, 3))), what="a number in [0, 255] or a list of 1 or 3 of them"),
}
JITTER = Number(0, 1)
AUGMENT_OPTIONS = {
    "no_aug": Flag(),
    "train_crop_mode": Maybe(Choice(("rrc", "rkrc", "rkrr"))),
    "scale": Maybe(Seq((PROBABILITY,) * 2, what="[min, max], each in [0, 1]")),
    "ratio": Maybe(Seq((Number(0.01, 100),) * 2, what="[min, max], each in [0.01, 100]")),
    "hflip": PROBABILITY,
    "vflip": PROBABILITY,
    "color_jitter": Maybe(
        AnyOf((JITTER, Seq((JITTER,) * 3), Seq((JITTER, JITTER, JITTER, Number(0, 0.5)))),
              what="a number in [0, 1] or [brightness, contrast, saturation(, hue)] in [0, 1] (hue in [0, 0.5])")
    ),
    "color_jitter_prob": Maybe(PROBABILITY),
    "grayscale_prob": PROBABILITY,
    "gaussian_blur_prob": PROBABILITY,
    "auto_augment": Maybe(Text(r"[a-z0-9][a-z0-9._-]{0,63}", what="a timm auto-augment string such as 'rand-m9-mstd0.5'")),
    "re_prob": PROBABILITY,
    "re_mode": Choice(("const", "rand", "pixel")),
    "re_count": Number(1, 16, whole=True),
    "affine": Maybe(Options(AFFINE_OPTIONS, required=("degrees",), what="a mapping of RandomAffine options")),
}

# Keyword arguments a backbone builder that passes **kwargs on to timm may take (and the contents of
# a builder's dict parameters, such as the hybrid's cnn_kwargs/swin_kwargs): the model's shape and
# regularisation only. Never checkpoint_path, pretrained_cfg(_overlay), cache_dir or anything else
# that makes timm read a file or the network.
BLOCKS = ListOf(Number(1, 64, whole=True), tuple(range(1, 9)), what="a list of 1 to 8 integers in [1, 64]")
TIMM_OPTIONS = {
    "in_chans": Number(1, 64, whole=True),
    "drop_rate": Number(0, 1, open=True),
    "drop_path_rate": Number(0, 1, open=True),
    "attn_drop_rate": Number(0, 1, open=True),
    "global_pool": Choice(("", "avg", "max", "avgmax", "catavgmax", "token", "map")),
    "embed_dim": Number(1, 8192, whole=True),
    "depth": Number(1, 128, whole=True),
    "depths": BLOCKS,
    "layers": BLOCKS,
    "num_heads": AnyOf((Number(1, 256, whole=True), ListOf(Number(1, 256, whole=True), tuple(range(1, 9))))),
    "window_size": AnyOf((Number(1, 64, whole=True), Seq((Number(1, 64, whole=True),) * 2))),
    "mlp_ratio": Number(0.25, 16),
    "patch_size": Number(1, 64, whole=True),
}
TIMM_KWARGS = Options(TIMM_OPTIONS, what="a mapping of timm model options")
#: builder parameters mltk sets itself, and the option that sets them
SET_BY_MLTK = {"pretrained": "pretrained", "weights": "weights", "img_size": "image_size", "num_classes": None, "embedding_size": None}

# -- The run config and, next to it, the rule of each option.


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
    freeze_backbone_epochs: int = 0  # the backbone learns only after this many epochs (the neck and losses first)
    freeze_bn: bool = False  # the backbone's BatchNorm layers keep their pretrained statistics and scales
    dim: int | None = 512  # None or 0: no neck
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
    backbone_lr: float | None = None  # None: lr
    layer_decay: float | None = None  # each backbone layer learns at this times the next one's rate (timm's layer-wise decay)
    loss_lr: float = 1e-2
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0
    grad_clip: float | None = 5.0
    amp: bool | None = None  # None: on with a GPU or a CPU with bf16 dot products (AMX, AVX512-BF16)
    early_stop: int | None = None  # stop after this many epochs without a better best score (None: never)
    # run
    seed: int = 0
    workers: int = 2
    in_memory: bool = True  # decode the training images once and keep them in memory when they fit (mltk.train.IN_MEMORY)
    device: str = "auto"
    out: str | None = None
    log: list = field(default_factory=list)  # loggers that follow the run (--log): tensorboard, and those plugins add


FIELDS = {f.name: f for f in dataclasses.fields(RunConfig)}

#: each option's rule beyond its type (the type is RunConfig's annotation). Sizes are what one
#: process can hold: a larger image, embedding or batch is a typo, not a plan.
PATTERNS = ListOf(Text(what="a class name pattern"), what="a list of class name patterns")
RULES: dict[str, Rule] = {
    "data_classes": PATTERNS,
    "val_data_classes": PATTERNS,
    "val_classes": Number(0, 1, open=True),
    "image_size": Number(8, 4096, whole=True),  # pixels a side; 100000 would ask for 120 GB a batch
    "augment_options": Options(AUGMENT_OPTIONS, what="a mapping of augmentation options"),
    "dim": Number(0, 65536, whole=True),  # 0, like null: no neck, the backbone's pooled features
    # backbone_kwargs, loss_options, miner_options: names and kinds are the builders' (named_options)
    "loss_options": MappingOf(MappingOf(PLAIN, what="a mapping of the loss's options")),
    "miner_options": MappingOf(PLAIN, what="a mapping of the miner's options"),
    "epochs": Number(0, 10_000, whole=True),
    "batch_size": Number(2, 16_384, whole=True),
    "m_per_class": Number(1, 8192, whole=True),
    "lr": Number(0, 10),
    "backbone_lr": Number(0, 10),
    "layer_decay": Number(0.01, 1, what="null (off) or a number in [0.01, 1], e.g. 0.7"),
    "freeze_backbone_epochs": Number(0, 10_000, whole=True),
    "loss_lr": Number(0, 10),
    "weight_decay": Number(0, 10),
    "warmup_epochs": Number(0, 10_000),
    "grad_clip": Number(0, 1e6, what="null or 0 (off), or a number in (0, 1000000]"),
    "early_stop": Number(1, 10_000, whole=True, what="null (off) or a whole number of epochs in [1, 10000]"),
    "seed": Number(0, 2**32 - 1, whole=True),
    "workers": Number(0, 256, whole=True),
    "log": ListOf(Text(r"[A-Za-z_][\w.\-]{0,99}", what="a logger name (`mltk list loggers`)"), what="a list of logger names"),
    "device": Text(r"auto|cpu|mps|(cuda|xpu)(:\d{1,3})?", what="auto, cpu, mps, cuda or cuda:N"),
}


class _Loader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that a key given twice is an error (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *base' then a key of base's: an override
                    continue
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base class says so
                    continue
                if first is not None:
                    raise yaml.constructor.ConstructorError(None, None, f"key {show(key)} is given twice (lines {first} and {line})", None)
                seen[key] = line
        return super().construct_mapping(node, deep)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping of options in a YAML file; at most MAX_FILE_BYTES, plain YAML (no tags that run code), each key once."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"config file {str(path)!r} {'is not a file' if path.exists() else 'does not exist'}")
    try:
        with path.open("rb") as f:
            text = f.read(MAX_FILE_BYTES + 1)
    except OSError as exc:
        raise UsageError(f"config file {str(path)!r} cannot be read ({exc.strerror or exc})") from None
    if len(text) > MAX_FILE_BYTES:
        raise UsageError(f"config file {str(path)!r} is larger than {MAX_FILE_BYTES // 1024} KiB; a config holds options, not data")
    loader = _Loader(text)  # what yaml.safe_load does, with this loader
    try:
        values = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        where = f"line {exc.problem_mark.line + 1}: " if exc.problem_mark else ""
        raise UsageError(f"config file {str(path)!r} is not valid YAML: {where}{exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"config file {str(path)!r} is not valid YAML: {first_line(exc)}") from None
    except (RecursionError, ValueError) as exc:  # nesting beyond the parser's stack; an int of 5000 digits
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).split(";")[0][:200]
        raise UsageError(f"config file {str(path)!r} is not valid YAML: {reason}") from None
    finally:
        loader.dispose()
    if values is None:  # an empty file
        return {}
    if not isinstance(values, dict):
        raise UsageError(f"config file {str(path)!r} must hold a mapping of options, got {show(values)}")
    return values


def make_config(values: dict[str, Any], source: str = "config") -> RunConfig:
    """A RunConfig from plain values, checked whole; an unknown key is named, with the closest known one."""
    return check_together(RunConfig(**check_values(values, source)), source)


def resolve(config_file: str | Path | None, overrides: dict[str, Any]) -> RunConfig:
    """Config file values, then the options given on the command line (``None`` = not given); each named by where it came from."""
    values = check_values(load_yaml(config_file), str(config_file)) if config_file else {}
    values.update(check_values({k: v for k, v in overrides.items() if v is not None}, FLAGS))
    return check_together(RunConfig(**values), str(config_file) if config_file else FLAGS)


def validate(cfg: RunConfig, source: str = "config") -> None:
    """Check a RunConfig made in code (``RunConfig(...)``, ``dataclasses.replace``) as make_config checks values."""
    check_together(RunConfig(**check_values(to_dict(cfg), source)), source)


def check_values(values: Any, source: str) -> dict[str, Any]:
    """The options in ``values``, each of its type and within its rule (numeric strings become floats)."""
    if not isinstance(values, dict):
        raise UsageError(f"{source}: config must be a mapping of options, got {show(values)}")
    check_plain(values, source)
    checked = {}
    for key, value in values.items():
        if key not in FIELDS:
            close = difflib.get_close_matches(key, FIELDS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise UsageError(f"unknown key {show(key)} in {source}{hint}")
        checked[key] = check_type(key, value, source)
    return checked


def check_plain(values: dict, source: str) -> None:
    """Plain YAML values only -- text, numbers, true/false, null, lists and mappings under string keys --
    within MAX_DEPTH, MAX_ITEMS, MAX_TEXT and MAX_VALUES, and no control characters in any string."""
    count = 0

    def walk(value: Any, path: str, depth: int) -> None:
        nonlocal count
        count += 1
        if count > MAX_VALUES:
            raise UsageError(f"{source} holds more than {MAX_VALUES} values; a config holds options, not data")
        if isinstance(value, str):
            if len(value) > MAX_TEXT:
                raise UsageError(f"{named(path, source)} is {len(value)} characters long; at most {MAX_TEXT}")
            if CONTROL.search(value):
                raise UsageError(f"{named(path, source)} holds a control character: {show(value)}")
        elif isinstance(value, (list, tuple, dict)):
            if depth >= MAX_DEPTH:
                raise UsageError(f"{named(path, source)} is nested more than {MAX_DEPTH} levels deep")
            if len(value) > MAX_ITEMS:
                raise UsageError(f"{named(path, source)} holds {len(value)} items; at most {MAX_ITEMS}")
            for key, item in value.items() if isinstance(value, dict) else enumerate(value):
                if isinstance(value, dict):
                    check_key(key, f"{path} in {source}")
                walk(item, f"{path}[{show(key)}]", depth + 1)
        elif isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 2**63:
            raise UsageError(f"{named(path, source)} is out of range: {show(value)}")
        elif not (value is None or isinstance(value, (bool, int, float))):
            kind = type(value).__name__
            raise UsageError(f"{named(path, source)} must be text, a number, true/false, null, a list or a mapping, not a {kind}: {show(value)}")

    for key, value in values.items():
        check_key(key, source)
        walk(value, key, 1)


def check_key(key: Any, where: str) -> None:
    """A key must be a name: a short string without control characters (YAML reads ``5:`` and ``null:`` as others)."""
    if not isinstance(key, str):
        raise UsageError(f"key {show(key)} in {where} is not a name; option names are strings")
    if len(key) > 100 or CONTROL.search(key):
        raise UsageError(f"key {show(key)} in {where} is not a name; option names are short, without control characters")


def check_type(key: str, value: Any, source: str) -> Any:
    """``value`` if it has the field's type (an int is a float too, a bool is not an int, a numeric
    string is a float) and keeps to the field's rule; else a UsageError naming the option."""
    allowed = typing.get_args(FIELDS[key].type) or (FIELDS[key].type,)  # ``int | None`` -> (int, NoneType)
    if value is None and type(None) in allowed:
        return None
    if not (float in allowed and number(value) is not None or isinstance(value, allowed) and not (isinstance(value, bool) and bool not in allowed)):
        names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
        raise UsageError(f"{named(key, source)} must be {names}, got {show(value)}")
    rule = RULES.get(key)
    return rule.check(value, key, source) if rule else value


def check_together(cfg: RunConfig, source: str) -> RunConfig:
    """What depends on more than one option: validation data from one place, the batch and m, the
    loss spec, and the options of the backbone, losses and miner named. Returns ``cfg`` with those options checked."""
    if cfg.val_classes and cfg.val_data:
        raise UsageError("give either --val-data or --val-classes, not both")
    if cfg.val_data_classes and not cfg.val_data:  # classes of --data held out by name (the example configs): validation reads --data
        if cfg.val_classes:
            raise UsageError(f"val_data_classes in {source} holds classes of --data out by name, and --val-classes a share of them at random; give one")
        cfg = dataclasses.replace(cfg, val_data=cfg.data)
    m = cfg.m_per_class or 1
    if cfg.batch_size % m or cfg.batch_size == m:
        raise UsageError(f"--batch-size ({cfg.batch_size}) must be a multiple (2x or more) of --m-per-class ({m})")
    names = [name for _, name in parse_loss_spec(cfg.loss)]
    for name in cfg.loss_options:
        if name not in names:
            raise UsageError(f"loss_options in {source} sets options of {show(name)}, which is not in the loss spec {cfg.loss!r}")
    if cfg.miner_options and not cfg.miner:
        raise UsageError(f"miner_options in {source} are given, but no miner; set miner or drop miner_options")
    return dataclasses.replace(cfg, **named_options(cfg, source))


def check_training(cfg: RunConfig, resumed: bool = False) -> None:
    """Options that contradict each other in a run that trains (a checkpoint's config, read for inference, is not
    held to them): settings of how the backbone learns beside --freeze-backbone, and a freeze that outlasts the run.
    A resumed run keeps the settings it started with; only its --epochs, which may change, is checked again."""
    if cfg.freeze_backbone and not resumed:
        moot = {"backbone_lr": cfg.backbone_lr, "layer_decay": cfg.layer_decay, "freeze_backbone_epochs": cfg.freeze_backbone_epochs or None}
        for key, value in moot.items():
            if value is not None:
                raise UsageError(f"--freeze-backbone keeps the backbone from learning in every epoch, so {named(key, FLAGS)} {value} has nothing to set; leave one of them out")
    if not cfg.freeze_backbone and 0 < cfg.epochs <= cfg.freeze_backbone_epochs:
        instead = "" if resumed else ", or --freeze-backbone to train only the neck and the losses"
        raise UsageError(
            f"--freeze-backbone-epochs {cfg.freeze_backbone_epochs} covers every epoch of the run (--epochs {cfg.epochs}), so the backbone "
            f"would never learn; give --epochs {cfg.freeze_backbone_epochs + 1} or more{instead}"
        )


# -- The options of the backbone, losses and miner a config names: the keyword parameters their
# -- builders declare (inspect.signature), looked up in the registry only when options are given.


def named_options(cfg: RunConfig, source: str) -> dict[str, dict]:
    from mltk import registry

    checked: dict[str, dict] = {}
    if cfg.backbone_kwargs:
        builder = registry.get("backbones", cfg.backbone).factory
        checked["backbone_kwargs"] = arguments(builder, cfg.backbone_kwargs, "backbone_kwargs", source, f"backbone {cfg.backbone!r}", TIMM_KWARGS)
    if cfg.loss_options:
        checked["loss_options"] = {
            name: arguments(registry.get("losses", name).factory, options, f"loss_options[{name!r}]", source, f"loss {name!r}")
            for name, options in cfg.loss_options.items()
        }
    if cfg.miner_options:
        builder = registry.get("miners", cfg.miner).factory
        checked["miner_options"] = arguments(builder, cfg.miner_options, "miner_options", source, f"miner {cfg.miner!r}")
    return checked


def arguments(builder, options: dict, path: str, source: str, owner: str, more: Options | None = None) -> dict:
    """``options``, each a keyword parameter of ``builder`` (not one mltk sets) with a value of its kind.
    What goes through ``**kwargs`` must be in ``more`` (backbones: TIMM_KWARGS), or when there is none, any plain value."""
    try:
        params = inspect.signature(builder).parameters
    except (TypeError, ValueError):  # no signature to read: only what **kwargs may take
        params = {"kwargs": inspect.Parameter("kwargs", inspect.Parameter.VAR_KEYWORD)}
    takes_more = any(p.kind is p.VAR_KEYWORD for p in params.values())
    own = {n: p for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n not in SET_BY_MLTK}
    checked = {}
    for key, value in options.items():
        where = f"{path}[{key!r}]"
        if key in SET_BY_MLTK:
            instead = SET_BY_MLTK[key]
            raise UsageError(f"{named(where, source)}: mltk sets {key!r} itself" + (f"; give the option {instead!r} instead" if instead else ""))
        if key in own:
            checked[key] = argument(own[key], value, where, source)
        elif takes_more and more is None:
            checked[key] = PLAIN.check(value, where, source)
        elif takes_more and key in more.rules:
            checked[key] = more.rules[key].check(value, where, source)
        else:
            raise UsageError(unknown(key, path, source, [*own, *(more.rules if takes_more and more else ())], owner))
    return checked


FINITE = Number(-sys.float_info.max, sys.float_info.max, what="a finite number")
#: what a parameter's annotation or default may say, and how messages call it
KINDS = {str: "text", bool: "true or false", int: "a number", float: "a number", list: "a list", dict: "a mapping", type(None): "null"}


def argument(param: inspect.Parameter, value: Any, path: str, source: str) -> Any:
    """A value of the parameter's kind: its annotation's plain types, else its default's, else any plain value.
    A ``dict`` parameter holds keyword arguments for a timm model (the hybrid's cnn_kwargs, swin_kwargs)."""
    kinds = tuple(t for t in typing.get_args(param.annotation) or (param.annotation,) if isinstance(t, type) and t in KINDS)
    if not kinds and param.default is not None and type(param.default) in KINDS:
        kinds = (type(param.default),)
    if not kinds:
        return PLAIN.check(value, path, source)
    if value is None and (type(None) in kinds or param.default is None):
        return None
    if dict in kinds and isinstance(value, dict):
        return TIMM_KWARGS.check(value, path, source)
    if (int in kinds or float in kinds) and number(value) is not None:
        return FINITE.check(value, path, source)
    if isinstance(value, bool) and bool in kinds or isinstance(value, str) and str in kinds:
        return value
    if isinstance(value, (list, tuple)) and list in kinds:
        return ListOf(Scalar()).check(value, path, source)
    raise UsageError(f"{named(path, source)} must be {' or '.join(dict.fromkeys(KINDS[t] for t in kinds))}, got {show(value)}")


_TERM = re.compile(r"^(?:(?P<weight>[^*]+)\*)?(?P<name>[A-Za-z_][\w.\-]*)$")


def parse_loss_spec(spec: str) -> list[tuple[float, str]]:
    """``'0.01*center+ce+arcface'`` -> ``[(0.01, 'center'), (1.0, 'ce'), (1.0, 'arcface')]``."""
    terms = []
    for raw in str(spec).replace(" ", "").split("+"):
        match = _TERM.match(raw)
        if not match:
            raise UsageError(f"bad loss term {show(raw)} in {show(spec)}; write terms like 'arcface' or '0.01*center' joined by '+'")
        weight = match["weight"]
        try:
            value = float(weight) if weight is not None else 1.0
        except ValueError:
            raise UsageError(f"bad weight {show(weight)} in loss spec {show(spec)}; a weight is a number, as in '0.01*center'") from None
        if not value > 0 or value == float("inf"):
            raise UsageError(f"bad weight {show(weight)} in loss spec {show(spec)}; weights must be positive and finite")
        terms.append((value, match["name"]))
    names = [n for _, n in terms]
    if len(set(names)) != len(names):
        raise UsageError(f"loss spec {show(spec)} names a loss twice")
    return terms


def to_dict(cfg: RunConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_yaml(cfg: RunConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
