"""Training configuration: one flat dataclass, YAML files and ``key=value`` overrides."""

from __future__ import annotations

import difflib
import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from .model_path import POOLERS
from .families import APPEND_EOS, PADDING_SIDES
from .lora import LORA_EXPORTS, PeftMissing, parse_targets, require_peft
from .objective import ObjectiveConfig

PRECISIONS = ("no", "fp32", "bf16", "fp16")


class ConfigError(ValueError):
    """A configuration problem; the message names the fix."""


@dataclass
class TrainConfig(ObjectiveConfig):
    """Every training option; the objective's options are inherited from ObjectiveConfig."""

    # model
    model_name_or_path: str = "all-MiniLM-L6-v2"  # the embedded default model; any HF encoder works
    pooler: str = "cls"  # cls | cls_before_pooler | avg | avg_first_last | last (decoder-only models: last or avg)
    # Backbone dropout, the only difference between the two views: null keeps the model's own;
    # a float sets every attention / hidden dropout key its config has (ModernBERT and Qwen2 ship
    # 0.0, and a model without dropout is refused for these unsupervised objectives).
    dropout: float | None = None
    # Append the tokenizer's EOS to every sentence (the last-token pooler then reads a token that
    # has seen the whole sentence): auto = for causal models whose tokenizer does not | true | false
    append_eos: str = "auto"
    padding_side: str | None = None  # null: the tokenizer's own | left | right (the last pooler handles both)
    mlp_only_train: bool = True  # the cls pooler's MLP head is used in training only (SimCSE unsup.)
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, same views
    # Padding-free forward for BERT-family backbones (hncse_dist/packed.py): same numbers as the
    # model's own forward, without the FLOPs of padded positions; other models ignore it.
    packed_forward: bool = True
    # LoRA (hncse_dist/lora.py, needs: pip install hncse-dist[lora]): rank of the low-rank adapters
    # added to the backbone's attention and MLP linear layers, whose weights are then frozen (the
    # cls pooler's MLP head stays fully trainable). 0: off, full fine-tuning.
    lora_r: int = 0
    lora_alpha: float = 16.0  # the adapter's update is scaled by lora_alpha / lora_r
    lora_dropout: float = 0.0  # dropout on the adapter's input (the backbone's own dropout makes the two views)
    # Layers to adapt, by module name (a list, or comma-separated): null = the family's attention and
    # MLP linears: query,key,value,dense (BERT, RoBERTa, XLM-R); q_proj,k_proj,v_proj,o_proj,gate_proj,
    # up_proj,down_proj (Llama, Mistral, Qwen2); README lists the others; unknown families: every linear layer
    lora_target_modules: str | list | None = None
    # What best/ and final/ hold for a LoRA run: merged = a plain model (adapter merged into the weights;
    # AutoModel, SentenceTransformer) | adapter = peft's adapter folder only (the base model is named,
    # not copied) | both = the merged model plus the adapter folder in its adapter/ subfolder
    lora_export: str = "merged"
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
    # Host allocations of at least this many MiB get their own memory mapping, returned to the OS
    # when freed (glibc's mmap threshold, fixed; hncse_dist/hostmem.py): without it the threshold
    # rises during the first step and freed step buffers stay in the process. Costs system time on
    # CPU training (each large buffer freshly mapped). null = auto: 1 under DeepSpeed (runs chosen
    # for memory per rank), glibc's default otherwise; 0: glibc's default.
    malloc_mmap_threshold_mb: float | None = None
    shuffle_buffer: int = 1000
    # optimisation
    learning_rate: float = 3e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_steps: int = 0  # optimizer steps; 0: run num_epochs epochs instead (negatives such as -1 are refused)
    num_epochs: int = 1
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    # GradCache (hncse_dist/gradcache.py): encode the 2 x batch_size sequences in chunks of this
    # many without autograd, take the loss over the whole batch, then re-encode the chunks with
    # the same dropout masks to backpropagate. Same gradients, activation memory of one chunk,
    # one more forward of all chunks but the last (BENCHMARKS.md). 0: off.
    cache_chunk_size: int = 0
    mixed_precision: str = "no"  # no | bf16 | fp16
    seed: int = 42
    # negative bank
    # Previous global minibatches kept for HNM; 0 disables the bank. Refused at start-up when the
    # bank (bank_size x global batch x (4 x hidden + 8) bytes) exceeds 25% of a process's GPU
    # memory (CPU: its share of the RAM).
    bank_size: int = 16
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
    export_dtype: str = "fp32"  # fp32 | bf16 | fp16: weights of best/ and final/ (from the fp32 master weights under DeepSpeed)
    # where sentence-transformers re-saves each export's files (hncse_dist/st_modules.py): "child",
    # a child process (~8 s an export on a CPU; the training process never imports the library,
    # whose import holds ~270 MB for the rest of the run), or "here", this process (~0.5 s).
    # auto: child under DeepSpeed (runs chosen for memory per rank), here otherwise.
    export_st_resave: str = "auto"
    resume: str | None = None  # "latest" or a checkpoint folder
    overwrite: bool = False  # replace the run already in output_dir (without it, such a folder is refused)
    deepspeed: str | None = None  # ds_configs/zero2.json etc.
    # Process-group timeout (every launch path, gloo and NCCL): a collective or the rendezvous
    # store waiting longer than this fails the rank instead of hanging the job.
    dist_timeout_minutes: float = 30.0
    # DDP keeps the gradient buckets it starts with for the whole run (find_unused_parameters=True
    # stops its regrouping in gradient-ready order after the first step). A resumed process starts
    # again from the first layout, and the all-reduce's summation order over 3+ ranks follows the
    # layout: fixed, a resume reproduces the uninterrupted run bit for bit at any world size.
    # false: DDP's regrouping (no autograd-graph walk per forward; a resume drifts by ~1 ulp at 3+ ranks).
    ddp_fixed_buckets: bool = True
    skip_nonfinite: bool = True  # skip a step whose loss (or clipped gradient norm) is NaN/inf on any rank
    max_nonfinite_skips: int = 20  # stop (exit 1) after this many consecutive skipped steps
    # Write a sha256 of the parameters into every rank's checkpoint file (equal digests: the ranks
    # are in sync). A debug aid: it copies every parameter to the host at each checkpoint.
    param_digest: bool = False
    progress: bool = True  # a progress bar on a terminal; without one, a line every log_every steps
    peak_flops: float = 0.0  # per-device peak FLOP/s for MFU (0: datasheet for known GPUs, measured on CPU)

    def objective_config(self) -> ObjectiveConfig:
        return ObjectiveConfig(**{f.name: getattr(self, f.name) for f in fields(ObjectiveConfig)})

    def validate(self) -> "TrainConfig":
        if self.pooler not in POOLERS:
            raise ConfigError(f"pooler={self.pooler!r} does not exist: use one of {', '.join(POOLERS)}")
        self.append_eos = str(self.append_eos).lower()
        if self.append_eos not in APPEND_EOS:
            raise ConfigError(f"append_eos={self.append_eos!r}: use auto, true or false")
        if self.padding_side is not None and self.padding_side not in PADDING_SIDES:
            raise ConfigError(f"padding_side={self.padding_side!r}: use left, right or null (the tokenizer's own)")
        if self.mixed_precision not in PRECISIONS:
            raise ConfigError(f"mixed_precision={self.mixed_precision!r}: use one of no, bf16, fp16")
        if self.lora_export not in LORA_EXPORTS:
            raise ConfigError(f"lora_export={self.lora_export!r}: use one of {', '.join(LORA_EXPORTS)}")
        if self.lora_r > 0:
            try:
                require_peft(self.lora_r)
            except PeftMissing as err:
                raise ConfigError(str(err)) from None
            if not parse_targets(self.lora_target_modules) and self.lora_target_modules is not None:
                raise ConfigError("lora_target_modules names no module: give names (query,value) or null "
                                  "for the model family's defaults")
        if self.export_dtype not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"export_dtype={self.export_dtype!r}: use one of fp32, bf16, fp16")
        if self.export_st_resave not in ("auto", "child", "here"):
            raise ConfigError(f"export_st_resave={self.export_st_resave!r}: use one of auto, child, here")
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
        if isinstance(self.train_shards, str) and Path(self.train_shards).is_dir() and not (
            Path(self.train_shards) / "manifest.json"
        ).is_file():
            raise ConfigError(
                f"train_shards={self.train_shards} has no manifest.json: write shards with "
                "'hncse-dist shards --input FILE --output DIR'"
            )
        check_ranges(self)
        try:
            from .metrics import parse_report_to

            parse_report_to(self.report_to)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if self.cache_chunk_size and self.deepspeed is not None:
            raise ConfigError("cache_chunk_size works with DDP only (DeepSpeed reduces each chunk's gradients "
                              "itself): set cache_chunk_size=0 or drop deepspeed=")
        if self.deepspeed is not None and not Path(self.deepspeed).is_file():
            raise ConfigError(f"deepspeed={self.deepspeed} not found: use one of ds_configs/zero{{1,2,3}}.json")
        if self.mixed_precision == "fp32":
            self.mixed_precision = "no"
        try:
            ObjectiveConfig.validate(self)
        except ValueError as err:
            raise ConfigError(str(err)) from err
        check_model_folder(self)
        check_eval_file(self.eval_file)
        return self


CONFIG_KEYS = tuple(f.name for f in fields(TrainConfig))


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
            if isinstance(value, bool):  # YAML 1.1 reads no/yes/off/on as booleans: mixed_precision: no
                return "no" if value is False else "yes"
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
        loaded = _read_yaml(p) or {}
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


def _read_yaml(p: Path) -> Any:
    """The parsed YAML file, or a ConfigError naming the file (and line and column)."""
    if not p.exists():
        raise ConfigError(f"config file {p} not found: pass --config configs/quickstart.yaml or a path of yours")
    if not p.is_file():
        raise ConfigError(f"config file {p} is not a file: pass a YAML file such as configs/quickstart.yaml")
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"config file {p} cannot be read: {err.strerror or err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {p} cannot be read: not UTF-8 text (byte {err.start})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        if mark is None:
            raise ConfigError(f"config file {p}: invalid YAML: {' '.join(str(err).split())}") from None
        where = f"line {mark.line + 1}, column {mark.column + 1}"
        context, cmark = getattr(err, "context", None), getattr(err, "context_mark", None)
        extra = f" ({context} from line {cmark.line + 1}, column {cmark.column + 1})" if context and cmark else ""
        raise ConfigError(f"config file {p}: invalid YAML at {where}: {err.problem}{extra}") from None


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


# ---------------------------------------------------------------- value ranges and start-up checks
# Every numeric key has its allowed range here (tests/test_config.py fails for a numeric key
# without one). ``check_ranges`` runs in TrainConfig.validate; ``startup_checks`` compares the
# config with the model's config and the machine before any weights are loaded.


@dataclass(frozen=True)
class Range:
    """Allowed values of one numeric key: from ``lo`` to ``hi`` (open ends where asked)."""

    lo: float = 0
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = True
    note: str = ""  # what special values mean
    null: str = ""  # what null means, when null is allowed

    def allows(self, value: Any) -> bool:
        if value is None:
            return bool(self.null)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if not (value > self.lo if self.lo_open else value >= self.lo):
            return False
        return self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"
        if self.hi is not None:
            text = (f"{kind} in {'(' if self.lo_open else '['}{_plain(self.lo)}, {_plain(self.hi)}"
                    f"{')' if self.hi_open else ']'}")
        else:
            text = f"{kind} {'>' if self.lo_open else '>='} {_plain(self.lo)}"
        if self.null:
            text += f", or null for {self.null}"
        return f"{text} ({self.note})" if self.note else text


def _plain(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


RANGES: dict[str, Range] = {
    # objective (hncse_dist/objective.py)
    "temperature": Range(0, lo_open=True, integer=False),
    "pm_threshold": Range(0, 1, lo_open=True, integer=False),
    "pm_w1": Range(0, 1, integer=False, note="pm_w1 + pm_w2 must be 1"),
    "pm_w2": Range(0, 1, integer=False, note="pm_w1 + pm_w2 must be 1"),
    "hnm_k": Range(1, note="at most the HNM pool: global batch - 1 + bank rows"),
    "hnm_m": Range(0, note="0: no synthetic negatives"),
    "hnm_alpha": Range(0, 1, integer=False, null="alpha ~ U(0, 1)"),
    "hnm_query_mix": Range(0, note="0: no query mixing"),
    "hnm_beta_max": Range(0, 1, integer=False),
    # training
    "max_seq_length": Range(1, note="at most the model's position limit"),
    "batch_size": Range(1, note="per process"),
    "num_workers": Range(0, note="0: load data in the training process"),
    "malloc_mmap_threshold_mb": Range(0, 32, integer=False, null="auto: 1 under DeepSpeed, else glibc's default",
                                      note="0: glibc's default"),
    "shuffle_buffer": Range(0),
    "learning_rate": Range(0, 1, lo_open=True, integer=False),
    "weight_decay": Range(0, 1, integer=False),
    "warmup_steps": Range(0),
    "max_steps": Range(0, note="N > 0: train N optimizer steps; 0: train num_epochs epochs; "
                               "negative values such as -1 are not accepted"),
    "num_epochs": Range(1, note="used when max_steps=0"),
    "gradient_accumulation_steps": Range(1),
    "max_grad_norm": Range(0, integer=False, note="0: no clipping"),
    "seed": Range(0, 2**31 - 1),  # seed + rank must stay a valid numpy seed
    "bank_size": Range(0, note="0: no bank; its memory must fit, see bank_size's comment"),
    "bank_warmup_steps": Range(0),
    "log_every": Range(1),
    "stats_every": Range(1),
    "eval_every": Range(0, note="0: evaluate only at the end"),
    "eval_batch_size": Range(1),
    "save_every": Range(0, note="0: checkpoint only at the end and on preemption"),
    "keep_last": Range(0, note="0: keep every checkpoint"),
    "max_nonfinite_skips": Range(0, note="0: never stop on non-finite losses"),
    "peak_flops": Range(0, integer=False, note="0: datasheet figure for known GPUs, measured on CPU"),
    "cache_chunk_size": Range(0, note="0: off"),
    "shard_retries": Range(0, note="0: a failed URL / pipe: shard fails at once"),
    "shard_retry_delay": Range(0, integer=False, note="seconds before the first retry, doubling"),
    "dist_timeout_minutes": Range(0, lo_open=True, integer=False, note="a collective waits this long for a lost rank"),
    "dropout": Range(0, 1, hi_open=True, integer=False, null="the model's own dropout"),
    "lora_r": Range(0, note="0: no LoRA, full fine-tuning"),
    "lora_alpha": Range(0, lo_open=True, integer=False, note="the adapter's update is scaled by lora_alpha / lora_r"),
    "lora_dropout": Range(0, 1, hi_open=True, integer=False),
}


def check_ranges(cfg: TrainConfig) -> None:
    """Every numeric key inside its range (``RANGES``), and the PM weights summing to 1."""
    for key, rule in RANGES.items():
        value = getattr(cfg, key)
        if not rule.allows(value):
            raise ConfigError(f"{key}={value} is out of range: use {rule.describe()}")
    total = cfg.pm_w1 + cfg.pm_w2
    if abs(total - 1.0) > 1e-6:
        raise ConfigError(f"pm_w1 + pm_w2 must be 1 (the mixed positive is w1 * positive + w2 * hardest "
                          f"negative), got {cfg.pm_w1} + {cfg.pm_w2} = {total:g}")


def check_model_folder(cfg: TrainConfig) -> None:
    """A local model path must be a model folder (hub names are checked at start-up)."""
    from .model_path import check_model_path, resolve_model_path

    try:
        check_model_path(resolve_model_path(cfg.model_name_or_path))
    except (FileNotFoundError, RuntimeError) as err:
        raise ConfigError(f"model_name_or_path={err}") from None


PACKAGED_EVAL_FILE = Path(__file__).parent / "resources" / "sts-dev.csv"
_EVAL_HINT = "pass an STS-B dev csv, 'packaged' (the shipped copy) or null (no evaluation)"


def check_eval_file(value: str | None) -> None:
    """The dev file exists and parses with the STS-B dev reader into at least two scored pairs."""
    if value is None:
        return
    from .eval.sts import load_pair_file

    path = PACKAGED_EVAL_FILE if value == "packaged" else Path(value)
    if not path.exists():
        raise ConfigError(f"eval_file={value} does not exist: {_EVAL_HINT}")
    if not path.is_file():
        raise ConfigError(f"eval_file={value} is not a file: {_EVAL_HINT}")
    try:
        pairs = load_pair_file(path)
    except OSError as err:
        raise ConfigError(f"eval_file={value} cannot be read: {err.strerror or err}") from None
    except (ValueError, IndexError) as err:
        raise ConfigError(
            f"eval_file={value} is not an STS-B dev file ({_first_bad_line(path, err)}): pass a TAB-separated "
            "file like STS-B's sts-dev.csv (score in column 5, sentences in columns 6 and 7), 'packaged' or null"
        ) from None
    if len(pairs) < 2:
        raise ConfigError(f"eval_file={value} holds {len(pairs)} scored pairs, too few for a Spearman "
                          "correlation: pass an STS-B dev csv, 'packaged' or null")


def _first_bad_line(path: Path, err: Exception) -> str:
    """Where the dev reader's layout (hncse_dist/eval/sts.py: load_pair_file) breaks."""
    from .eval.data import read_lines
    from .eval.sts import SICK_HEADER_PREFIX

    try:
        lines = read_lines(path)
    except UnicodeDecodeError:
        return "not UTF-8 text"
    first, (score, a, b) = (1, (4, 5, 6)) if not (lines and lines[0].startswith(SICK_HEADER_PREFIX)) \
        else (2, (3, 1, 2))
    for number, line in enumerate(lines[first - 1:], start=first):
        if not line.strip():
            continue
        cols = line.split("\t")
        need = max(score, a, b) + 1
        if len(cols) < need:
            plural = "" if len(cols) == 1 else "s"
            return f"line {number}: {len(cols)} TAB-separated column{plural}, need {need}"
        try:
            float(cols[score])
        except ValueError:
            return f"line {number}: score {cols[score]!r} is not a number"
    return str(err)


BANK_MEMORY_FRACTION = 0.25  # the negative bank may take at most this share of a process's memory
# Position embeddings indexed from padding_idx + 1: pad_token_id + 1 positions are never used.
_OFFSET_POSITION_MODELS = ("roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "mpnet", "longformer",
                           "data2vec-text")


def bank_bytes(bank_size: int, global_batch: int, hidden: int) -> int:
    """Bytes of a bank of ``bank_size`` global batches: float32 embeddings + one int64 key per row."""
    return bank_size * global_batch * (4 * hidden + 8)


def position_limit(model_config) -> tuple[int | None, str]:
    """(longest sequence the model's position embeddings allow, where the number comes from)."""
    limit = getattr(model_config, "max_position_embeddings", None)
    kind = getattr(model_config, "model_type", "model")
    if not isinstance(limit, int) or limit <= 0:
        return None, ""
    if kind in _OFFSET_POSITION_MODELS:
        offset = (getattr(model_config, "pad_token_id", None) or 0) + 1
        return limit - offset, f"max_position_embeddings {limit} of {kind}, less {offset} for its padding offset"
    return limit, f"max_position_embeddings of {kind}"


def check_against_model(cfg: TrainConfig, model_config, world_size: int, memory_bytes: int,
                        memory_name: str = "memory") -> None:
    """max_seq_length vs. the model's positions, the bank vs. ``memory_bytes`` (one process's
    memory), hnm_k vs. the largest HNM pool of a world of ``world_size`` processes."""
    limit, source = position_limit(model_config)
    if limit is not None and cfg.max_seq_length > limit:
        raise ConfigError(f"max_seq_length={cfg.max_seq_length} exceeds the model's {limit} positions "
                          f"({source}): use max_seq_length <= {limit}")
    global_batch = cfg.batch_size * world_size
    banked = cfg.objective in ("hnm", "hncse") and cfg.bank_size > 0
    hidden = next((getattr(model_config, k) for k in ("hidden_size", "dim", "d_model")
                   if isinstance(getattr(model_config, k, None), int)), None)
    if banked and hidden is not None:
        need = bank_bytes(cfg.bank_size, global_batch, hidden)
        allowed = BANK_MEMORY_FRACTION * memory_bytes
        if need > allowed:
            fits = int(allowed // bank_bytes(1, global_batch, hidden))
            raise ConfigError(
                f"bank_size={cfg.bank_size} needs {need / 2**30:.1f} GiB for the negative bank "
                f"({cfg.bank_size} batches x {global_batch} rows x {hidden} dims), more than "
                f"{BANK_MEMORY_FRACTION:.0%} of the {memory_bytes / 2**30:.1f} GiB {memory_name}: "
                f"use bank_size <= {fits}"
            )
    if cfg.objective in ("hnm", "hncse") and (cfg.hnm_m > 0 or cfg.hnm_query_mix > 0):
        from_batch = global_batch - 1 if cfg.hnm_use_batch else 0
        from_bank = cfg.bank_size * global_batch if banked else 0
        pool = from_batch + from_bank
        if pool == 0:
            fix = ("with hnm_use_batch=false and bank_size=0: set bank_size >= 1 or hnm_use_batch=true"
                   if not cfg.hnm_use_batch else
                   "with a global batch of 1 and bank_size=0: set bank_size >= 1 or raise batch_size")
            raise ConfigError(f"objective={cfg.objective} has no hard-negative candidates {fix}")
        if cfg.hnm_k > pool:
            parts = ([f"global batch {global_batch} - 1"] if cfg.hnm_use_batch else []) + \
                ([f"bank {cfg.bank_size} x {global_batch}"] if from_bank else [])
            raise ConfigError(
                f"hnm_k={cfg.hnm_k} exceeds the {pool} candidates HNM can ever choose from "
                f"({' + '.join(parts)}): use hnm_k <= {pool}, or raise batch_size or bank_size"
            )


def _memory_budget() -> tuple[int, str]:
    """(bytes, name) of the memory the bank of one process lives in: its GPU, else its RAM share."""
    import torch

    if torch.cuda.is_available():
        device = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        return torch.cuda.get_device_properties(device).total_memory, "GPU memory"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return ram // local, ("RAM" if local == 1 else f"RAM share of each of {local} processes")


def startup_checks(cfg: TrainConfig, world_size: int | None = None) -> None:
    """The checks that need the model's config (read, not the weights) and the machine."""
    from transformers import AutoConfig

    from .model_path import resolve_model_path

    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    try:
        model_config = AutoConfig.from_pretrained(resolve_model_path(cfg.model_name_or_path))
    except (OSError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(f"model_name_or_path={cfg.model_name_or_path}: its config cannot be read ({first})") \
            from None
    memory, name = _memory_budget()
    check_against_model(cfg, model_config, world_size, memory, name)
