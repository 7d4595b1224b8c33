"""Run configuration: YAML files (``yaml.safe_load``) mapped onto dataclasses, plus dotted overrides.

    cfg = load_config("configs/mnist1d/dhkd.yaml", ["train.epochs=2", "loss.ga=true"])

Every key of the file and of the overrides must name a field below; values are checked against the
field's type (an int is accepted for a float). Errors are ``ConfigError`` (a ``ValueError``) naming the
key, raised before anything runs.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import reprlib
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .paths import cache_dir, expand_path  # noqa: F401 (re-exported: dhkd.config.cache_dir)

METHODS = ("ce", "kd", "binary_kl", "ce_binary_kl", "dhkd")
DATASETS = ("mnist1d", "mnist1d100", "cifar100", "imagenet", "synthetic")
IMAGE_BACKENDS = ("torchvision", "gpu-decode", "dali")
NUM_CLASSES = {"mnist1d": 10, "mnist1d100": 100, "cifar100": 100, "imagenet": 1000}


MAX_SEED = 2**32 - 1
ON_OFF_KEYS = ("train.amp",)  # string fields with an "off" choice: an unquoted YAML off is False


class ConfigError(ValueError):
    """A bad configuration file, key or value; ``problems`` lists every one found (one line each)."""

    def __init__(self, msg: str = "", problems=None):
        self.problems = list(problems) if problems else [msg]
        if problems and len(self.problems) > 1:
            msg = f"{len(self.problems)} problems, nothing was run:\n" + "\n".join(f"  - {p}" for p in self.problems)
        elif problems:
            msg = self.problems[0]
        super().__init__(msg)

    @classmethod
    def raise_for(cls, problems, prefix: str = "") -> None:
        """Raise one ConfigError listing ``problems`` (each prefixed), if there are any."""
        if problems:
            raise cls(problems=[f"{prefix}{p}" for p in problems])


MAX_YAML_NODES = 10_000  # a config has ~100 values; aliases may not expand a document beyond this
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple = 2, 4, 4, 4
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 60, 60, 40


def _show(value) -> str:
    """``repr(value)`` bounded in length and depth, for error messages (never the whole of a huge or
    alias-expanded value)."""
    return _REPR.repr(value)


class YAMLRefused(yaml.YAMLError):
    """A YAML document this loader refuses (a duplicate key, an alias expansion past the bound); the
    message is one line."""


def _yaml_reason(exc: yaml.YAMLError) -> str:
    """One line for a YAML error: its problem and where (line numbers are 1-based)."""
    if isinstance(exc, YAMLRefused):
        return str(exc)
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


class ConfigLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that also reads exponent floats without a dot or exponent sign (``1e-3``,
    ``5E4``, ``1.0e3``), which YAML 1.1 leaves as strings; YAML 1.2 and every person read them as floats.

    It refuses a key given twice in one mapping (YAML would keep the last silently) and a document
    whose aliases expand it past ``MAX_YAML_NODES`` values (a "billion laughs" bomb) or that refers to
    itself."""

    def compose_document(self):
        node = super().compose_document()
        _expanded_size(node, {}, set())
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                if key in first:
                    raise YAMLRefused(f"duplicate key {_show(key)} at line {key_node.start_mark.line + 1} "
                                      f"(first at line {first[key] + 1}): give each key once")
                first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node, sizes: dict, open_: set) -> int:
    """Values in ``node`` with every alias expanded; YAMLRefused past MAX_YAML_NODES or on a cycle.
    Linear in the composed (unexpanded) document."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_:
        raise YAMLRefused(f"an alias at line {node.start_mark.line + 1} refers to a value that contains it")
    open_.add(key)
    size = 1
    if isinstance(node, yaml.SequenceNode):
        size += sum(_expanded_size(v, sizes, open_) for v in node.value)
    elif isinstance(node, yaml.MappingNode):
        size += sum(_expanded_size(k, sizes, open_) + _expanded_size(v, sizes, open_) for k, v in node.value)
    open_.discard(key)
    if size > MAX_YAML_NODES:
        raise YAMLRefused(f"aliases expand the document past {MAX_YAML_NODES} values (at line "
                          f"{node.start_mark.line + 1}); write the values out instead")
    sizes[key] = size
    return size


ConfigLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$"),
    list("-+0123456789."))


FLOAT_TEXT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?$")


def load_yaml(text: str):
    """YAML ``text`` read safely (no Python tags) with ``ConfigLoader``'s float spellings."""
    return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 (a SafeLoader subclass)


@dataclass
class StudentConfig:
    name: str = "mnist1d_mlp"
    aux_head: str = "linear"          # "linear" | "mlp" (Linear-Dropout-BN-ReLU-Linear, hidden 200)
    aux_hidden: int = 200
    aux_dropout: float = 0.1


@dataclass
class TeacherConfig:
    name: str | None = None            # None: no teacher (method "ce" only)
    weights: str | None = None         # torchvision weight name, e.g. IMAGENET1K_V1
    checkpoint: str | None = None      # local file; "{cache}" expands to the dhkd cache directory
    train_config: str | None = None    # config that trains the teacher when `checkpoint` is missing
    random_init: bool = False          # a randomly initialised teacher (tests, throughput work); then
                                       # weights, checkpoint and train_config are ignored


@dataclass
class DataConfig:
    dataset: str = "mnist1d"           # mnist1d | mnist1d100 (dhkd.mnist1d100) | cifar100 | imagenet | synthetic
    root: str | None = None            # dataset directory (cifar100: holds cifar-100-python/; imagenet: train/, val/)
    num_classes: int | None = None     # default 10 / 100 / 1000 by dataset (imagenet: any ImageFolder
                                       # class count, e.g. a 100-class subset); required for synthetic
    batch_size: int = 128              # per process and per micro-batch
    eval_batch_size: int | None = None
    workers: int = 4                   # DataLoader worker processes per rank (dali: its CPU threads)
    pin_memory: bool = True
    backend: str = "torchvision"       # imagenet input: torchvision | gpu-decode | dali (docs/training.md);
                                       # the other datasets ignore it
    prefetch: int = 2                  # batches prepared ahead (per worker; dali: pipeline queue depth)
    bad_images: str = "error"          # an unreadable image file: error (naming it) | skip (count, log)
    image_size: int = 224              # imagenet / synthetic crop size
    mnist1d_samples: int = 5000        # total generated; mnist1d: 80% train / 20% test, mnist1d100:
                                       # per class 60% train / 15% val (evaluated) / 25% test
    mnist1d_seed: int = 42
    synthetic_shape: list[int] = field(default_factory=lambda: [3, 224, 224])
    synthetic_train_samples: int = 1024
    synthetic_val_samples: int = 256


@dataclass
class LossConfig:
    ce_weight: float = 1.0
    kd_weight: float = 0.0
    logit_weight: float = 1.0
    kd_temperature: float = 4.0
    logit_temperature: float = 2.0
    logit_loss: str = "binary_kl_norm"         # binary_kl_norm | binary_kl
    logit_weight_off_epoch: int | None = None  # logit weight is 0 once the 1-based epoch >= this (official
                                               # ImageNet rule: 50 -> epochs 1-49 use the logit loss)
    ga: bool = False                           # gradient alignment (method dhkd): the official one, in
                                               # parameter space over all student parameters
    ga_space: str = "params"                   # params (official) | features (projects at the backbone output)
    numerics: str = "exact"                    # exact (dhkd_kernels) | official (the official code's clamped
                                               # formulas through autograd, dhkd/official.py; backend reference)
                                               # | official_torch21 (the same, torch 2.1.2's clamp gradient)
    label_smoothing: float = 0.0
    backend: str = "auto"                      # auto | triton | torch | reference


@dataclass
class OptimConfig:
    name: str = "sgd"                  # sgd | lars
    lr: float = 0.1                    # learning rate at a global batch of `base_batch`
    base_batch: int = 256              # lr used = lr * global_batch / base_batch
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    no_decay_norm_bias: bool = False   # no weight decay (and no LARS scaling) on 1-D params
    lars_eta: float = 0.001


@dataclass
class ScheduleConfig:
    name: str = "step"                 # step | cosine | constant
    milestones: list[int] = field(default_factory=list)  # epochs (step schedule)
    gamma: float = 0.1
    warmup_epochs: float = 0.0         # linear per-iteration warmup from ~0
    warmup_from_base_lr: bool = False  # warmup from optim.lr (the lr at base_batch) to the scaled lr,
                                       # as in Goyal et al. 2017, instead of from ~0
    min_lr_factor: float = 0.0         # cosine floor, as a fraction of the peak lr


@dataclass
class TrainConfig:
    epochs: int = 10
    stop_after_epoch: int | None = None  # end this invocation after this many completed epochs
    accum_steps: int = 1
    global_batch: int | None = None    # if set: accum_steps = global_batch / (batch_size x processes)
    max_steps_per_epoch: int | None = None  # cap optimizer steps per epoch (tests, throughput)
    sync_bn: bool = False              # SyncBatchNorm across processes (CUDA, torchrun only)
    seed: int = 0
    deterministic: bool = False
    device: str = "auto"               # auto | cpu | cuda | cuda:N
    amp: str = "auto"                  # auto (bf16 on CUDA, off on CPU) | bf16 | off
    channels_last: bool = True         # for 4-D image inputs
    compile: bool = False              # torch.compile student features and teacher
    log_every: int = 50
    progress: bool = True              # tqdm bar
    tensorboard: bool = True           # when tensorboard is installed
    eval_teacher: bool = True          # log the teacher's val accuracy once at the start
    diagnostics: bool = False          # per-epoch head diagnostics (diag/main/*, diag/aux/*) and the
                                       # backbone gradient cosine diag/grad_cos (one extra backward)
    diagnostics_samples: int = 1000    # validation samples the NC1 of the diagnostics uses


@dataclass
class Config:
    method: str = "dhkd"
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    source: typing.ClassVar[str | None] = None  # the YAML file it was read from (not a setting)

    @property
    def num_classes(self) -> int:
        return self.data.num_classes if self.data.num_classes is not None else NUM_CLASSES[self.data.dataset]


# ---------------------------------------------------------------- typed mapping

def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value, tp, key: str):
    """Check ``value`` against the annotation ``tp``; return it converted (int -> float only)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for a in inner:
            try:
                return _coerce(value, a, key)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0]
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {_show(value)}")
        return [_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {_show(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an int, got {_show(value)}")
        return value
    if tp is float:
        if isinstance(value, str) and FLOAT_TEXT.match(value.strip()):  # a quoted number: "1e-3"
            value = float(value.strip().replace("_", ""))
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {_show(value)}")
        return float(value)
    if tp is str:
        if isinstance(value, bool) and key in ON_OFF_KEYS:  # YAML 1.1 reads off/no/on/yes as booleans
            return "on" if value else "off"
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {_show(value)}")
        return value
    raise ConfigError(f"{key}: unsupported field type {_type_name(tp)}")  # pragma: no cover


def _apply(obj, mapping: dict, prefix: str, problems: list | None = None) -> None:
    """Set ``mapping``'s keys on the dataclass ``obj``; with a ``problems`` list every bad key is
    appended to it (and left at its value), else the first raises ConfigError."""
    own = problems is None
    problems = [] if own else problems
    if not isinstance(mapping, dict):
        problems.append(f"{prefix.rstrip('.') or 'the config'} must be a mapping, got {_show(mapping)}")
    else:
        hints = _hints(type(obj))
        names = [f.name for f in dataclasses.fields(obj)]
        for key, value in mapping.items():
            full = f"{prefix}{key}"
            if key not in names:
                problems.append(f"unknown config key {full!r}; valid keys here: {', '.join(names)}")
                continue
            current = getattr(obj, key)
            if dataclasses.is_dataclass(current):
                _apply(current, value, f"{full}.", problems)
                continue
            try:
                setattr(obj, key, _coerce(value, hints[key], full))
            except ConfigError as exc:
                problems.append(str(exc))
    if own:
        ConfigError.raise_for(problems)


def set_key(cfg: Config, dotted: str, value, problems: list | None = None) -> None:
    """Set ``section.key`` (or a top-level key such as ``method``) to a typed value."""
    parts = dotted.split(".")
    if not all(parts):
        raise ConfigError(f"bad override key {_show(dotted)}")
    nested: dict = value
    for p in reversed(parts):
        nested = {p: nested}
    _apply(cfg, nested, "", problems)


def parse_override(text: str) -> tuple[str, object]:
    """``"train.epochs=2"`` -> ``("train.epochs", 2)``; the value is read as YAML (``null``, ``[1, 2]``)."""
    if "=" not in text:
        raise ConfigError(f"override {_show(text)} must look like section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override {_show(text)}: the value is not valid YAML ({_yaml_reason(exc)})") from None
    return key, value


def config_from_dict(data: dict | None, overrides=(), *, partial: list | None = None,
                     source: str | None = None) -> Config:
    """The validated Config of ``data`` plus ``overrides``; ConfigError listing every bad key, value
    and inconsistency. With a ``partial`` list, problems are appended there instead and the config
    (bad keys left at their defaults) is returned.

    Each problem says where it came from: ``{source}: `` for a key of ``data`` (``source``: the file
    it was read from), ``command line: `` for an override or a cross-field problem of an overridden
    key."""
    problems = [] if partial is None else partial
    from_file = "" if source is None else f"{source}: "
    cfg = Config()
    found: list = []
    _apply(cfg, data if data is not None else {}, "", found)
    problems.extend(from_file + p for p in found)
    overridden = []
    for item in overrides:
        found = []
        try:
            key, value = parse_override(item) if isinstance(item, str) else item
            overridden.append(key)
            set_key(cfg, key, value, found)
        except ConfigError as exc:
            found.extend(exc.problems)
        problems.extend(f"command line: {p}" for p in found)
    for p in validation_problems(cfg):
        by_override = any(re.search(rf"(?<![\w.]){re.escape(k)}(?![\w.])", p) for k in overridden)
        problems.append(("command line: " if by_override else from_file) + p)
    if partial is None:
        ConfigError.raise_for(problems)
    return cfg


def load_config(path, overrides=(), *, partial: list | None = None) -> Config:
    """Read a YAML config, apply ``overrides`` ("a.b=value" strings), validate; raise ConfigError
    listing every problem, each naming the file or the command line it came from (or, with a
    ``partial`` list, append them to it; see ``config_from_dict``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = load_yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {_yaml_reason(exc)}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    problems: list = []
    cfg = config_from_dict(data, overrides, partial=problems, source=str(path))
    if partial is None:
        ConfigError.raise_for(problems)
    else:
        partial.extend(problems)
    cfg.source = str(path)
    tc = cfg.teacher.train_config
    if tc is not None and not os.path.isabs(expand_path(tc)):
        beside = path.parent / tc
        if beside.is_file():
            cfg.teacher.train_config = str(beside)
    return cfg


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def dump_config(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


# ---------------------------------------------------------------- validation

_found: list | None = None  # where _bad collects while validation_problems runs


def _bad(msg: str) -> None:
    if _found is None:
        raise ConfigError(msg)
    _found.append(msg)


def _choice(key, value, choices):
    if value not in choices:
        _bad(f"{key} must be one of {', '.join(map(str, choices))}; got {_show(value)}")


def _positive(key, value, *, allow_zero=False):
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        _bad(f"{key} must be {'>= 0' if allow_zero else '> 0'}, got {_show(value)}")


def validate_config(cfg: Config) -> None:
    """Cross-field checks (types are already checked); one ConfigError listing every problem."""
    ConfigError.raise_for(validation_problems(cfg))


def validation_problems(cfg: Config) -> list[str]:
    """Every cross-field problem of ``cfg``, one line each, naming the key."""
    global _found
    outer, _found = _found, []
    try:
        _validate(cfg)
    except ConfigError as exc:  # a check that raises directly ends the collection
        _found.extend(exc.problems)
    finally:
        found, _found = _found, outer
    return found


def _validate(cfg: Config) -> None:
    _choice("method", cfg.method, METHODS)
    _choice("student.aux_head", cfg.student.aux_head, ("linear", "mlp"))
    _positive("student.aux_hidden", cfg.student.aux_hidden)
    if not 0 <= cfg.student.aux_dropout < 1:
        _bad(f"student.aux_dropout must be in [0, 1), got {cfg.student.aux_dropout}")
    t = cfg.teacher
    if cfg.method != "ce":
        if t.name is None:
            _bad(f"method {cfg.method!r} needs a teacher: set teacher.name")
        if t.weights is None and t.checkpoint is None and not t.random_init:
            _bad("the teacher needs teacher.weights or teacher.checkpoint "
                 "(or teacher.random_init=true for tests and throughput runs)")
    if t.weights is not None and t.checkpoint is not None and not t.random_init:
        _bad("set teacher.weights or teacher.checkpoint, not both")

    d = cfg.data
    _choice("data.dataset", d.dataset, DATASETS)
    if d.dataset in ("cifar100", "imagenet") and not d.root:
        _bad(f"data.root must name the {d.dataset} directory")
    if d.dataset == "synthetic" and d.num_classes is None:
        _bad("data.num_classes is required for the synthetic dataset")
    if d.num_classes is not None:
        _positive("data.num_classes", d.num_classes)
        if d.dataset in ("mnist1d", "mnist1d100", "cifar100") and d.num_classes != NUM_CLASSES[d.dataset]:
            _bad(f"data.num_classes={d.num_classes} but {d.dataset} has {NUM_CLASSES[d.dataset]}")
    for key in ("batch_size", "image_size", "mnist1d_samples", "synthetic_train_samples",
                "synthetic_val_samples"):
        _positive(f"data.{key}", getattr(d, key))
    if d.eval_batch_size is not None:
        _positive("data.eval_batch_size", d.eval_batch_size)
    _positive("data.workers", d.workers, allow_zero=True)
    _choice("data.backend", d.backend, IMAGE_BACKENDS)  # used by imagenet; the others have one input path
    _positive("data.prefetch", d.prefetch)
    _choice("data.bad_images", d.bad_images, ("error", "skip"))
    if d.bad_images == "skip" and d.backend == "dali":
        _bad("data.bad_images=skip is not available with data.backend=dali (DALI stops on a bad "
             "file, and the error names it); use data.backend=torchvision or gpu-decode to skip")
    if len(d.synthetic_shape) not in (1, 3) or min(d.synthetic_shape) < 1:
        _bad(f"data.synthetic_shape must be [L] or [C, H, W] of positive ints, got {d.synthetic_shape}")

    loss = cfg.loss
    for key in ("ce_weight", "kd_weight", "logit_weight"):
        _positive(f"loss.{key}", getattr(loss, key), allow_zero=True)
    for key in ("kd_temperature", "logit_temperature"):
        _positive(f"loss.{key}", getattr(loss, key))
    _choice("loss.logit_loss", loss.logit_loss, ("binary_kl_norm", "binary_kl"))
    _choice("loss.backend", loss.backend, ("auto", "triton", "torch", "reference"))
    if not 0 <= loss.label_smoothing < 1:
        _bad(f"loss.label_smoothing must be in [0, 1), got {loss.label_smoothing}")
    _choice("loss.ga_space", loss.ga_space, ("params", "features"))
    _choice("loss.numerics", loss.numerics, ("exact", "official", "official_torch21"))
    if loss.numerics != "exact" and loss.backend != "reference":
        _bad(f"loss.numerics={loss.numerics} runs the official formulas through plain autograd: set "
             f"loss.backend=reference (got {loss.backend!r})")
    off = loss.logit_weight_off_epoch
    if off is not None and off < 1:
        _bad(f"loss.logit_weight_off_epoch is a 1-based epoch (the logit weight is 0 from that epoch on; "
             f"1 = never used), so it must be >= 1, got {off}; a value written for the former 0-based rule "
             f"is one more now (0 -> 1, 49 -> 50)")
    elif off is not None and off <= cfg.train.epochs:
        others = {"binary_kl": (), "ce_binary_kl": ("ce_weight",),
                  "dhkd": ("ce_weight", "kd_weight")}.get(cfg.method)
        if others is not None and loss.logit_weight and not any(getattr(loss, k) for k in others):
            also = f", or give {' or '.join('loss.' + k for k in others)} a weight" if others else ""
            _bad(f"loss.logit_weight_off_epoch={off}: method {cfg.method} has no loss term left from epoch "
                 f"{off} on (its only nonzero weight is logit_weight); set it above train.epochs="
                 f"{cfg.train.epochs} or to null{also}")
    if loss.ga and cfg.method != "dhkd":
        _bad(f"loss.ga=true needs method dhkd (two heads), got method {cfg.method!r}")
    if cfg.method == "kd" and loss.kd_weight == 0:
        _bad("method kd needs loss.kd_weight > 0")
    if cfg.method in ("binary_kl", "ce_binary_kl") and loss.logit_weight == 0:
        _bad(f"method {cfg.method} needs loss.logit_weight > 0")
    if loss.label_smoothing and cfg.method == "binary_kl":
        _bad("loss.label_smoothing applies to the CE term, which method binary_kl does not use")

    o = cfg.optim
    _choice("optim.name", o.name, ("sgd", "lars"))
    _positive("optim.lr", o.lr)
    _positive("optim.base_batch", o.base_batch)
    _positive("optim.weight_decay", o.weight_decay, allow_zero=True)
    _positive("optim.lars_eta", o.lars_eta)
    if not 0 <= o.momentum < 1:
        _bad(f"optim.momentum must be in [0, 1), got {o.momentum}")
    if o.nesterov and o.momentum == 0:
        _bad("optim.nesterov=true needs optim.momentum > 0")

    s = cfg.sched
    _choice("sched.name", s.name, ("step", "cosine", "constant"))
    if sorted(s.milestones) != s.milestones or any(m < 1 for m in s.milestones):
        _bad(f"sched.milestones must be increasing epochs >= 1, got {s.milestones}")
    _positive("sched.gamma", s.gamma)
    _positive("sched.warmup_epochs", s.warmup_epochs, allow_zero=True)
    if not 0 <= s.min_lr_factor <= 1:
        _bad(f"sched.min_lr_factor must be in [0, 1], got {s.min_lr_factor}")

    tr = cfg.train
    _positive("train.epochs", tr.epochs)
    if s.warmup_epochs > tr.epochs:
        _bad(f"sched.warmup_epochs={s.warmup_epochs} exceeds train.epochs={tr.epochs}")
    if tr.stop_after_epoch is not None:
        _positive("train.stop_after_epoch", tr.stop_after_epoch)
    _positive("train.accum_steps", tr.accum_steps)
    if tr.global_batch is not None:
        _positive("train.global_batch", tr.global_batch)
        if tr.accum_steps != 1:
            _bad(f"set train.global_batch or train.accum_steps, not both: with global_batch="
                  f"{tr.global_batch} the accumulation steps follow from it (accum_steps="
                  f"{tr.accum_steps} would be ignored)")
        if d.batch_size > 0 and tr.global_batch % d.batch_size:
            _bad(f"train.global_batch={tr.global_batch} is not a multiple of "
                  f"data.batch_size={d.batch_size}")
    if tr.max_steps_per_epoch is not None:
        _positive("train.max_steps_per_epoch", tr.max_steps_per_epoch)
    _positive("train.log_every", tr.log_every)
    _positive("train.diagnostics_samples", tr.diagnostics_samples)
    _choice("train.amp", tr.amp, ("auto", "bf16", "off"))
    if not (tr.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:[0-9]+", tr.device)):
        _bad(f"train.device must be auto, cpu, cuda or cuda:N with N a GPU index >= 0, got {_show(tr.device)}")
    for key, value in (("train.seed", tr.seed), ("data.mnist1d_seed", d.mnist1d_seed)):
        if not 0 <= value <= MAX_SEED:
            _bad(f"{key} must be an int in [0, 2**32 - 1] (what numpy's generators take), got {_show(value)}")
