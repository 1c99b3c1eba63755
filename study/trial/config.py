"""Typed, frozen configuration of one trial, and strict loading from YAML.

A trial config is a tree of frozen dataclasses built once from a validated mapping. Unknown keys,
wrong types, out-of-range values and unknown registry names raise `ConfigError`, which the CLI turns
into one line naming the file, the key and the valid choices (exit status 2).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from study.errors import ConfigError, unknown_key, unknown_value
from study.trial import strict_yaml


def one_of(*names: str) -> dict[str, Any]:
    return {"choices": names}


def registry_of(where: str) -> dict[str, Any]:
    """Valid values are the names of a registry, `"module:NAME"`, imported when a value is checked (the
    registries import torch; this module must not, and must not import them: they import it)."""
    return {"choices": where}


def in_range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> dict[str, Any]:
    return {"range": (lo, hi, lo_open)}


@dataclass(frozen=True)
class DataConfig:
    name: str = field(default="digits", metadata=registry_of("study.trial.data:DATASETS"))
    root: str = "data"  # folder torchvision data sets are read from (and downloaded to, if allowed)
    download: bool = False  # the network is often closed: read existing files unless told otherwise
    val_fraction: float = field(default=0.1, metadata=in_range(0.0, 0.5, lo_open=True))  # carved from train
    batch_size: int = field(default=128, metadata=in_range(1))
    eval_batch_size: int = field(default=512, metadata=in_range(1))
    augment: bool = True  # random-crop(4) + flip on the device for the 32x32 colour sets only
    train_limit: int = field(default=0, metadata=in_range(0))  # 0 = all; otherwise a seeded subset (smoke runs)
    split_seed: int = 0  # fixed across trials so every trial sees the same val/test points


@dataclass(frozen=True)
class ModelConfig:
    arch: str = field(default="small_cnn", metadata=registry_of("study.trial.models:ARCHS"))
    width: int = field(default=0, metadata=in_range(0))  # arch-specific width override; 0 = the arch default


@dataclass(frozen=True)
class AttackConfig:
    """The robust objective of every stage (Sehwag et al.: train, prune and fine-tune with the target loss)."""

    loss: str = field(default="pgd", metadata=registry_of("study.trial.losses:LOSSES"))
    eps: float = field(default=0.1, metadata=in_range(0.0, 1.0))  # target Linf radius, [0, 1] pixel units
    eps_multiplier: float = field(default=1.0, metadata=in_range(0.0, 4.0, lo_open=True))  # train eps = eps * this
    steps: int = field(default=10, metadata=in_range(1, 1000))  # PGD steps of the training attack
    # Per PGD step, relative to eps. 0 = auto = 2.5 / steps (Madry/HYDRA: 10 steps of 0.25 eps). An explicit
    # value must let the attack reach the boundary: steps * step_size >= 1. (fgsm_rs always steps 1.25 eps.)
    step_size: float = field(default=0.0, metadata=in_range(0.0, 4.0))
    # eps over a stage's optimizer steps
    schedule: str = field(default="constant", metadata=registry_of("study.trial.attacks:EPS_SCHEDULES"))
    warmup_fraction: float = field(default=0.0, metadata=in_range(0.0, 1.0))  # of a stage's optimizer steps
    trades_beta: float = field(default=6.0, metadata=in_range(0.0))
    # Whether the fine-tune stage warms eps up again per `schedule`. No by default: fine-tuning starts from a
    # robust model, so it trains at the target eps from its first step (the prune stage always warms up).
    finetune_warmup: bool = False

    def __post_init__(self) -> None:
        if self.step_size > 0 and self.steps * self.step_size < 1.0 - 1e-9:
            travel = self.steps * self.step_size
            raise ConfigError("step_size", f"{self.step_size!r} x {self.steps} steps = {travel:.3g} eps of travel "
                              "cannot reach the eps-ball boundary; need steps * step_size >= 1 (or 0 = auto, "
                              "2.5 / steps)")


@dataclass(frozen=True)
class StageConfig:
    epochs: int = field(default=1, metadata=in_range(0))
    lr: float = field(default=0.1, metadata=in_range(0.0, lo_open=True))
    optimizer: str = field(default="sgd", metadata=one_of("sgd", "adam"))
    momentum: float = field(default=0.9, metadata=in_range(0.0, 1.0))
    weight_decay: float = field(default=1e-4, metadata=in_range(0.0))
    lr_schedule: str = field(default="cosine", metadata=one_of("cosine", "constant", "step"))


@dataclass(frozen=True)
class PruneConfig:
    method: str = field(default="hydra", metadata=one_of("hydra", "lwm", "random", "dense"))
    keep_fraction: float = field(default=0.1, metadata=in_range(0.0, 1.0, lo_open=True))  # 0.1 = 90% pruned
    scope: str = field(default="layer", metadata=one_of("layer", "global"))
    score_init: str = field(default="ssi", metadata=registry_of("study.trial.pruning:SCORE_INITS"))
    # BatchNorm affine parameters train with the scores in the prune stage (HYDRA's default; false = its
    # --freeze-bn). Conv/linear weights and biases never train in the prune stage.
    train_bn: bool = True


@dataclass(frozen=True)
class EvalConfig:
    """The trial's PGD-Linf evaluation on the VALIDATION split (model selection never sees test).

    End of a trial: `steps` x `restarts` (per-point worst case) on `points`; every epoch: `val_steps` x 1 on
    `val_points`. The step is relative to eps; 0 = auto = 2.5 / steps (study.trial.evaluation.relative_step).
    The test split is evaluated only for chosen models (study.confirm, `study trial`)."""

    eps: float = field(default=-1.0, metadata=in_range(-1.0, 1.0))  # -1 = attack.eps
    steps: int = field(default=20, metadata=in_range(1))
    restarts: int = field(default=3, metadata=in_range(1))
    step_size: float = field(default=0.0, metadata=in_range(0.0, 4.0))  # relative to eps; 0 = auto (2.5 / steps)
    points: int = field(default=0, metadata=in_range(0))  # 0 = the whole split
    val_points: int = field(default=512, metadata=in_range(0))  # per-epoch validation budget; 0 = whole split
    val_steps: int = field(default=10, metadata=in_range(1))  # per-epoch PGD steps (step: step_size, or 2.5 / val_steps)
    seed: int = 0


@dataclass(frozen=True)
class TrialConfig:
    name: str = "trial"
    seed: int = 0
    device: str = field(default="auto", metadata=one_of("auto", "cpu", "cuda"))
    # bf16: autocast to bfloat16 on the trial's device (CUDA or CPU); auto: bf16 on CUDA, fp32 on CPU
    precision: str = field(default="auto", metadata=one_of("auto", "fp32", "bf16"))
    compile: bool = False  # torch.compile the training step (CUDA, or CPU: inductor needs a C++ compiler)
    cuda_graphs: bool = True  # on CUDA, replay each stage's training step as a CUDA graph (study.trial.graphed)
    output_dir: str = "runs/trials"  # where `study trial` writes result JSON and exported weights
    cache_dir: str = "runs/pretrained"  # dense checkpoints, keyed by pretrain_key()
    pretrained: str = ""  # a checkpoint to load instead of pre-training
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    pretrain_attack: AttackConfig = AttackConfig()  # the dense model's robust objective (fixed per study)
    attack: AttackConfig = AttackConfig()  # the prune and fine-tune stages' objective (searched)
    pretrain: StageConfig = StageConfig(epochs=10, lr=0.1)
    prune: PruneConfig = PruneConfig()
    prune_stage: StageConfig = StageConfig(epochs=5, lr=0.1)
    finetune: StageConfig = StageConfig(epochs=5, lr=0.01)
    eval: EvalConfig = EvalConfig()

    @property
    def eval_eps(self) -> float:
        return self.attack.eps if self.eval.eps < 0 else self.eval.eps

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """Flat dotted params (MLflow's parallel-coordinates view wants these)."""
        return flatten(self.to_dict())

    def pretrain_key(self) -> str:
        """Key of the dense robust model: everything that changes it, nothing that does not."""
        parts = {
            "data": dataclasses.asdict(self.data),
            "model": dataclasses.asdict(self.model),
            "attack": dataclasses.asdict(self.pretrain_attack),
            "pretrain": dataclasses.asdict(self.pretrain),
            "seed": self.seed,
            "precision": self.precision,
        }
        parts["data"].pop("root"), parts["data"].pop("download"), parts["data"].pop("eval_batch_size")
        blob = json.dumps(parts, sort_keys=True).encode()
        return f"{self.data.name}-{self.model.arch}-{hashlib.sha256(blob).hexdigest()[:12]}"

    def pretrain_file_name(self) -> str:
        """The dense checkpoint's file name in cache_dir."""
        return f"{self.pretrain_key()}.pt"


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for dotted, value in flat.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(dotted, f"'{p}' is a value, not a section")
        node[leaf] = value
    return tree


def merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


# ---------------------------------------------------------------------------------------------------
# Building dataclasses from mappings, strictly.


def choices_of(f: dataclasses.Field) -> tuple[str, ...] | None:
    """A field's valid values: its `choices` metadata, a tuple or a registry's `"module:NAME"`."""
    choices = f.metadata.get("choices")
    if isinstance(choices, str):
        module, _, name = choices.partition(":")
        return tuple(getattr(importlib.import_module(module), name).names())
    return choices


def _coerce(value: Any, typ: Any, key: str, strict: bool = False) -> Any:
    if typ is bool:
        if isinstance(value, bool):
            return value
        if not strict and isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        raise ConfigError(key, f"expected true or false, got {value!r}")
    if typ is int:
        if isinstance(value, bool) or not isinstance(value, (int, float) if strict else (int, float, str)):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except ValueError:
            raise ConfigError(key, f"expected an integer, got {value!r}") from None
        if not math.isfinite(as_float) or as_float != int(as_float):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        return int(as_float)
    if typ is float:
        if isinstance(value, bool) or (strict and not isinstance(value, (int, float))):
            raise ConfigError(key, f"expected a number, got {value!r}")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise ConfigError(key, f"expected a number, got {value!r}") from None
        if strict and not math.isfinite(out):
            raise ConfigError(key, f"expected a finite number, got {value!r}")
        return out
    if typ is str:
        if value is None:
            return ""
        if not isinstance(value, str if strict else (str, int, float)) or isinstance(value, bool):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return str(value)
    raise TypeError(f"unsupported config type {typ} for {key}: give the field a `parse` hook")


def _check(f: dataclasses.Field, value: Any, key: str) -> None:
    choices = choices_of(f)
    if choices is not None and value not in choices:
        raise unknown_value(key, value, choices)
    if "range" in f.metadata:
        lo, hi, lo_open = f.metadata["range"]
        if lo is not None and (value < lo or (lo_open and value == lo)):
            bound = f"> {lo}" if lo_open else f">= {lo}"
            raise ConfigError(key, f"{value!r} is out of range; must be {bound}" + (f" and <= {hi}" if hi is not None else ""))
        if hi is not None and value > hi:
            raise ConfigError(key, f"{value!r} is out of range; must be <= {hi}")


def build(cls: type, data: Any, prefix: str = "", *, base: Any = None, strict: bool = False,
          exclude: Mapping[str, str] | None = None) -> Any:
    """Build dataclass `cls` from the mapping `data`: unknown keys, wrong types, out-of-range values and
    unknown choices raise ConfigError naming the dotted key (with a "did you mean" where one is close).

    Per field, metadata drives the checks: `choices` (a tuple, or a registry as "module:NAME"), `range`
    (lo, hi, lo_open), `parse` (a function (value, key) -> value for dict, tuple and union fields; it checks
    what it reads), `required` (the message when the key is missing). Nested dataclass fields are built
    recursively; a field typed `X | None` takes None. `base`: the instance whose values are the defaults
    (else the class defaults). `strict`: numbers, booleans and strings must have their YAML type (no "3" for
    3). `exclude`: field name -> why it is not valid here (it is then reported as an unknown key). A
    cross-field check in `__post_init__` raises ConfigError with a key relative to the section.
    """
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in (exclude or {})}
    if not isinstance(data, Mapping):
        where = prefix[:-1] if prefix.endswith(".") else prefix
        raise ConfigError(where, f"expected a section (mapping), got {data!r}; valid keys: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    for name in data:
        if name not in fields:
            why = (exclude or {}).get(name)
            if why:
                raise ConfigError(prefix + str(name), f"unknown key ({why}); valid keys: {', '.join(fields)}")
            raise unknown_key(prefix + str(name), name, fields)
    for name, f in fields.items():
        if "required" in f.metadata and name not in data:
            raise ConfigError(prefix + name, f"required: {f.metadata['required']}")
    kwargs = {}
    for name, value in data.items():
        f, typ, key = fields[name], hints[name], prefix + name
        if "parse" in f.metadata:
            kwargs[name] = f.metadata["parse"](value, key)
            continue
        if isinstance(typ, types.UnionType):
            if value is None and type(None) in typing.get_args(typ):
                kwargs[name] = None
                continue
            typ = next(t for t in typing.get_args(typ) if t is not type(None))
        if dataclasses.is_dataclass(typ):
            kwargs[name] = build(typ, value, key + ".", strict=strict)
            continue
        kwargs[name] = _coerce(value, typ, key, strict)
        _check(f, kwargs[name], key)
    try:
        return dataclasses.replace(base, **kwargs) if base is not None else cls(**kwargs)
    except ConfigError as e:  # a cross-field check in __post_init__ names its key relative to the section
        raise ConfigError(prefix + e.key, e.message) from None


def parse_value(text: str) -> Any:
    """A `--set key=value` value, read as YAML (numbers, booleans, strings; duplicate keys refused)."""
    try:
        return strict_yaml.loads(text)
    except yaml.YAMLError:
        return text


def parse_overrides(pairs: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`--set` pairs as dotted key -> value; a non-finite number (`.nan`, `.inf`) is refused."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(pair, "an override is written key=value (e.g. prune.keep_fraction=0.05)")
        key, value = pair.split("=", 1)
        out[key.strip()] = parse_value(value)
        strict_yaml.refuse_non_finite(out[key.strip()], f"--set {key.strip()}")
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A config file as a mapping: UTF-8 text, valid YAML, no duplicate keys, finite numbers only (each
    mistake one ConfigError naming the file, the key and the line: study.trial.strict_yaml)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("", "no such file", path)
    try:
        data = strict_yaml.loads(strict_yaml.read_text(path), path) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "YAML"
        raise ConfigError(where, f"not valid YAML ({getattr(e, 'problem', e)})", path) from None
    except OSError as e:
        raise ConfigError("", f"cannot read the file ({e.strerror or e})", path) from None
    if not isinstance(data, dict):
        raise ConfigError("", "the top level must be a mapping of keys", path)
    strict_yaml.refuse_non_finite(data, "", path)
    return data


def trial_from_dict(data: Mapping[str, Any], overrides: Mapping[str, Any] | None = None) -> TrialConfig:
    """A TrialConfig from a nested mapping plus dotted overrides (each override must name a real key)."""
    merged = merge(data, unflatten(overrides or {}))
    return build(TrialConfig, merged)


def load_trial(path: str | Path, overrides: Mapping[str, Any] | None = None) -> TrialConfig:
    """Load a trial config file. A search-space file works too: its `trial:` section is the trial."""
    data = read_yaml(path)
    strict_yaml.refuse_non_finite(dict(overrides or {}), "", None)
    if "trial" in data and isinstance(data["trial"], Mapping) and ("search" in data or "study" in data):
        data = dict(data["trial"])
    try:
        return trial_from_dict(data, overrides)
    except ConfigError as e:
        raise e.with_source(path) from None
