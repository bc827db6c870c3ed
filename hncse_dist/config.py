"""Training configuration: one flat dataclass, YAML files and ``key=value`` overrides."""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .encoder import POOLERS
from .objective import OBJECTIVES, ObjectiveConfig

PRECISIONS = ("no", "fp32", "bf16", "fp16")


class ConfigError(ValueError):
    """A configuration problem; the message names the fix."""


@dataclass
class TrainConfig(ObjectiveConfig):
    """Every training option; the objective's options are inherited from ObjectiveConfig."""

    # model
    model_name_or_path: str = "all-MiniLM-L6-v2"  # the embedded default model; any HF encoder works
    pooler: str = "cls"  # cls | cls_before_pooler | avg | avg_first_last
    mlp_only_train: bool = True  # the cls pooler's MLP head is used in training only (SimCSE unsup.)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, same views
    # Padding-free forward for BERT-family backbones (hncse_dist/packed.py): same numbers as the
    # model's own forward, without the FLOPs of padded positions; other models ignore it.
    packed_forward: bool = True
    # data
    train_file: str | None = None  # one sentence per line (plain or .gz); converted to shards once
    # A folder written by 'hncse-dist shards', a brace pattern of paths or URLs
    # (https://host/shard-{000000..000099}.tar), pipe:COMMAND, s3:// gs:// hf:// URLs, a text file
    # with one shard path/URL per line, or a mixture: a list of {path: SOURCE, weight: W} (README)
    train_shards: str | list | None = None
    train_manifest: str | None = None  # sample counts for URL shards (default: manifest.json or sizes.json beside them)
    text_key: str | None = None  # shard member holding the text: txt (default), caption, json:FIELD.PATH
    shard_retries: int = 3  # reopen a URL / pipe: shard this often after a failure before stopping
    shard_retry_delay: float = 1.0  # seconds before the first retry, doubled for each next one
    # train_file's text encoding; with more than 1% of lines undecodable or holding NUL bytes the
    # file is refused as binary / mis-encoded unless train_file_allow_repairs (then repaired, counted)
    train_file_encoding: str = "utf-8"
    train_file_allow_repairs: bool = False
    # Leave out shards that are missing, truncated or differ from their manifest sha256 (checked
    # at start: one extra read of every shard) and print their count, instead of stopping. Shards
    # are also verified as they are read; one that changes during the run stops it either way.
    skip_corrupt: bool = False
    resampled: bool = False  # each rank draws shards with replacement (no exact epochs); resume may change batch/data
    max_seq_length: int = 32
    batch_size: int = 64  # per process; the global batch is batch_size * world size
    num_workers: int = 2
    shuffle_buffer: int = 1000
    # optimisation
    objective: str = "hncse"
    learning_rate: float = 3e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_steps: int = 0  # 0: run num_epochs epochs
    num_epochs: int = 1
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    mixed_precision: str = "no"  # no | bf16 | fp16
    seed: int = 42
    # negative bank
    bank_size: int = 16  # previous global minibatches kept for HNM; 0 disables the bank
    bank_warmup_steps: int = 0  # steps before HNM draws from the bank
    # loop, logging, evaluation, checkpoints
    output_dir: str = "runs/hncse"
    log_every: int = 10
    report_to: str = "tensorboard"  # tensorboard | wandb | mlflow | none, comma-separated for several
    run_name: str | None = None  # the run's name in wandb / mlflow (default: output_dir's folder name)
    stats_every: int = 50  # alignment / uniformity
    eval_every: int = 125  # STS-B dev every N steps (0: only at the end)
    eval_file: str | None = "packaged"  # STS-B dev csv; "packaged" = the copy shipped in the package
    eval_batch_size: int = 128
    save_every: int = 0  # checkpoint every N steps (0: only at the end / on preemption)
    keep_last: int = 2
    save_best: bool = True  # export the best STS-B dev model to output_dir/best
    resume: str | None = None  # "latest" or a checkpoint folder
    deepspeed: str | None = None  # ds_configs/zero2.json etc.
    skip_nonfinite: bool = True  # skip a step whose loss is NaN/inf on any rank
    max_nonfinite_skips: int = 20  # stop (exit 1) after this many consecutive skipped steps
    progress: bool = True  # a progress bar on a terminal; without one, a line every log_every steps
    peak_flops: float = 0.0  # per-device peak FLOP/s for MFU (0: datasheet for known GPUs, measured on CPU)
    extra: dict = field(default_factory=dict, repr=False)

    def objective_config(self) -> ObjectiveConfig:
        return ObjectiveConfig(**{f.name: getattr(self, f.name) for f in fields(ObjectiveConfig)})

    def validate(self) -> "TrainConfig":
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"objective={self.objective!r} does not exist: use one of {', '.join(OBJECTIVES)}")
        if self.pooler not in POOLERS:
            raise ConfigError(f"pooler={self.pooler!r} does not exist: use one of {', '.join(POOLERS)}")
        if self.mixed_precision not in PRECISIONS:
            raise ConfigError(f"mixed_precision={self.mixed_precision!r}: use one of no, bf16, fp16")
        if self.train_file is None and self.train_shards is None:
            raise ConfigError("no training data: set train_file=PATH (one sentence per line) or train_shards=DIR")
        if self.train_file is not None and not Path(self.train_file).is_file():
            raise ConfigError(f"train_file={self.train_file} does not exist: pass a one-sentence-per-line text file")
        if self.train_file is not None and Path(self.train_file).stat().st_size == 0:
            raise ConfigError(f"train_file={self.train_file} is empty: pass a file with one sentence per line")
        from .data.mixture import check_train_shards

        try:
            check_train_shards(self.train_shards)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.shard_retries < 0:
            raise ConfigError(f"shard_retries must be >= 0, got {self.shard_retries}")
        if isinstance(self.train_shards, str) and Path(self.train_shards).is_dir() and not (
            Path(self.train_shards) / "manifest.json"
        ).is_file():
            raise ConfigError(
                f"train_shards={self.train_shards} has no manifest.json: write shards with "
                "'hncse-dist shards --input FILE --output DIR'"
            )
        for name in ("batch_size", "max_seq_length", "gradient_accumulation_steps", "num_epochs", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        try:
            from .metrics import parse_report_to

            parse_report_to(self.report_to)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.deepspeed is not None and not Path(self.deepspeed).is_file():
            raise ConfigError(f"deepspeed={self.deepspeed} not found: use one of ds_configs/zero{{1,2,3}}.json")
        if self.mixed_precision == "fp32":
            self.mixed_precision = "no"
        try:
            ObjectiveConfig.validate(self)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        return self


CONFIG_KEYS = tuple(f.name for f in fields(TrainConfig) if f.name != "extra")


def _field_types() -> dict[str, str]:
    return {f.name: str(f.type) for f in fields(TrainConfig)}


def _typed(key: str, value: Any) -> Any:
    """Convert ``value`` (from YAML or an override) to the key's declared type, or say why not.

    YAML reads 3e-5 as a string (it wants 3.0e-5); a number-typed key accepts both.
    """
    kind = _field_types()[key]
    if value is None:
        if "None" in kind:
            return None
        raise ConfigError(f"{key} cannot be null")
    if isinstance(value, list) and "list" in kind:
        return value
    try:
        if kind.startswith("bool"):
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                return value.lower() in ("true", "1", "yes")
            return bool(value)
        if kind.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if kind.startswith("float"):
            return float(value)
        if kind.startswith("str"):
            return str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r} is not a valid {kind.split(' ')[0]}") from None
    return value


def _parse_override(raw: str) -> Any:
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw


def _check_key(key: str) -> None:
    if key not in CONFIG_KEYS:
        close = difflib.get_close_matches(key, CONFIG_KEYS, n=1)
        hint = f"did you mean {close[0]!r}?" if close else "see 'hncse-dist train --help-config'"
        raise ConfigError(f"unknown config key {key!r}: {hint}")


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """TrainConfig from a YAML file (relative paths resolved against the file's folder) + overrides."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {path} not found: pass --config configs/quickstart.yaml or a path of yours")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must be a YAML mapping of key: value")
        for key, value in loaded.items():
            _check_key(key)
            values[key] = _typed(key, _resolve_relative(key, value, p.parent))
    cfg = TrainConfig(**values)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not key=value (e.g. max_steps=100)")
        key, raw = item.split("=", 1)
        key = key.strip().lstrip("-").replace("-", "_")
        _check_key(key)
        setattr(cfg, key, _typed(key, _parse_override(raw)))
    return cfg


PATH_KEYS = ("train_file", "train_shards", "train_manifest", "eval_file", "deepspeed", "model_name_or_path")


def _resolve_relative(key: str, value: Any, base: Path) -> Any:
    """Paths in a config file are relative to the file, when such a file exists."""
    if key == "train_shards" and isinstance(value, list):  # a mixture: each source's path
        return [dict(v, path=_resolve_relative(key, v["path"], base)) if isinstance(v, dict) and "path" in v else v
                for v in value]
    if key in PATH_KEYS and isinstance(value, str) and not os.path.isabs(value):
        candidate = base / value
        if candidate.exists():
            return str(candidate)
    return value


def config_template() -> str:
    """Every key with its default and the comments from its definition, as a YAML config
    (``hncse-dist train --help-config > my.yaml`` is a valid starting point)."""
    import inspect
    import json

    defaults = TrainConfig()
    lines: list[str] = []
    for cls, title in ((ObjectiveConfig, "objective (hncse_dist/objective.py)"), (TrainConfig, "training")):
        lines += ["", f"# ---- {title}"]
        pending: list[str] = []
        for raw in inspect.getsource(cls).splitlines()[1:]:
            text = raw.strip()
            if text.startswith("def "):
                break
            if text.startswith("#"):
                pending.append(text)
                continue
            match = re.match(r"(\w+)\s*:[^=]+=[^#]*(#\s*(.*))?$", text)
            if not match or match.group(1) not in CONFIG_KEYS:
                pending = []
                continue
            key = match.group(1)
            note = f"  # {match.group(3)}" if match.group(3) else ""
            lines += pending + [f"{key}: {json.dumps(getattr(defaults, key))}{note}"]
            pending = []
    return "\n".join(lines).lstrip() + "\n"
