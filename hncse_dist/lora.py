"""LoRA (low-rank adapters, via ``peft``) on the encoder's backbone.

``lora_r > 0`` freezes every backbone weight and adds, to each target linear layer W, a
trainable low-rank update: y = W x + (B A x) * alpha / r, A: r x in, B: out x r (B starts at
zero, so training starts from the pretrained model). The cls pooler's MLP head stays fully
trainable. Adapters are injected into the backbone in place (``peft.inject_adapter_in_model``):
the backbone stays the Hugging Face model it was, with ``base_layer`` / ``lora_A`` / ``lora_B``
sub-modules in the target layers, so checkpoints hold the adapter like any other parameter.

Exports merge the adapter into plain weights, W' = W + (B @ A) * alpha / r, on the gathered fp32
state dict (``merge_lora_state``): the same code under DDP and every ZeRO stage (under ZeRO-3
no module ever holds a whole weight), and for ``hncse-dist export`` of a checkpoint. The result
is a plain model folder (AutoModel, SentenceTransformer). ``lora_export: adapter`` writes
peft's adapter folder instead (a few MB; loads with ``peft.PeftModel.from_pretrained`` on the
base model, with ``Encoder.from_pretrained``, and with transformers' own peft integration).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .families import ModelSetupError

LORA_EXPORTS = ("merged", "adapter", "both")
ADAPTER_NAME = "default"  # peft's name of the one adapter
ADAPTER_CONFIG_FILE = "adapter_config.json"
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_SUBFOLDER = "adapter"  # lora_export=both: the adapter beside the merged model
INSTALL_HINT = "pip install hncse-dist[lora]"

# Default target modules per model family (``config.model_type``): the attention projections
# and the MLP's linear layers of every transformer block. Other families: every linear layer
# of the backbone (peft's "all-linear").
ATTENTION_MLP = ("query", "key", "value", "dense")  # BERT-style blocks (the pooler is never loaded)
DECODER_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "bert": ATTENTION_MLP,
    "roberta": ATTENTION_MLP,
    "xlm-roberta": ATTENTION_MLP,
    "camembert": ATTENTION_MLP,
    "electra": ATTENTION_MLP,
    "deberta-v2": ("query_proj", "key_proj", "value_proj", "dense"),
    "modernbert": ("Wqkv", "Wo", "Wi"),
    "mpnet": ("q", "k", "v", "o", "dense"),
    "distilbert": ("q_lin", "k_lin", "v_lin", "out_lin", "lin1", "lin2"),
    "llama": DECODER_PROJ,
    "mistral": DECODER_PROJ,
    "qwen2": DECODER_PROJ,
    "qwen3": DECODER_PROJ,
    "gemma": DECODER_PROJ,
    "gemma2": DECODER_PROJ,
    "phi3": ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
}
ALL_LINEAR = "all-linear"


class PeftMissing(RuntimeError):
    """``lora_r > 0`` without the optional dependency."""


def require_peft(r: int) -> None:
    try:
        import peft  # noqa: F401
    except ImportError:
        raise PeftMissing(f"lora_r={r} needs the peft package: {INSTALL_HINT}") from None


def parse_targets(value) -> tuple[str, ...] | None:
    """``lora_target_modules`` as a tuple of names: a list, or one comma-separated string; None
    (null, or an empty string) for the model family's defaults."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    names = tuple(s.strip() for s in items if s.strip())
    return names or None


@dataclass(frozen=True)
class LoraSettings:
    """What ``Encoder.from_pretrained(lora=...)`` applies. ``targets=None``: the family's defaults."""

    r: int
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] | None = None
    export: str = "merged"

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @classmethod
    def from_config(cls, cfg) -> "LoraSettings | None":
        """From a TrainConfig (or the dict of a run's config.json); None when LoRA is off."""
        get = cfg.get if isinstance(cfg, dict) else (lambda k, d=None: getattr(cfg, k, d))
        r = int(get("lora_r", 0) or 0)
        if r <= 0:
            return None
        return cls(r=r, alpha=float(get("lora_alpha", 16.0)), dropout=float(get("lora_dropout", 0.0)),
                   targets=parse_targets(get("lora_target_modules")), export=get("lora_export", "merged"))


def default_targets(backbone: nn.Module) -> tuple[str, ...] | str:
    kind = getattr(getattr(backbone, "config", None), "model_type", None)
    return DEFAULT_TARGETS.get(kind, ALL_LINEAR)


def peft_config(settings: LoraSettings, backbone: nn.Module):
    """The ``peft.LoraConfig`` of ``settings`` for ``backbone``."""
    require_peft(settings.r)
    from peft import LoraConfig

    targets = settings.targets or default_targets(backbone)
    return LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                      target_modules=list(targets) if isinstance(targets, tuple) else targets, bias="none")


def apply_lora(backbone: nn.Module, settings: LoraSettings) -> list[str]:
    """Inject the adapters into ``backbone`` in place and freeze everything else in it; returns
    the names of the adapted layers. Raises ModelSetupError when no target module matches."""
    from peft import inject_adapter_in_model

    config = peft_config(settings, backbone)
    try:
        inject_adapter_in_model(config, backbone, adapter_name=ADAPTER_NAME)
    except ValueError as err:  # peft: "Target modules {...} not found in the base model"
        names = sorted({n.rsplit(".", 1)[-1] for n, m in backbone.named_modules() if isinstance(m, nn.Linear)})
        targets = config.target_modules
        asked = targets if isinstance(targets, str) else ",".join(sorted(targets))
        raise ModelSetupError(f"lora_target_modules={asked}: {str(err).splitlines()[0]}; the linear layers of "
                         f"{getattr(backbone.config, 'model_type', 'this model')} are named {', '.join(names)}") from None
    for name, p in backbone.named_parameters():
        p.requires_grad_(".lora_" in name)
    return adapted_layers(backbone.state_dict().keys())


def adapted_layers(keys) -> list[str]:
    """Prefixes P of the adapted layers: P.lora_A.default.weight is in ``keys``."""
    suffix = f".lora_A.{ADAPTER_NAME}.weight"
    return [k[: -len(suffix)] for k in keys if k.endswith(suffix)]


def lora_note(settings: LoraSettings, backbone: nn.Module, layers: list[str]) -> str:
    trainable = sum(p.numel() for p in backbone.parameters() if p.requires_grad)
    total = sum(p.numel() for p in backbone.parameters())
    kinds = sorted({p.rsplit(".", 1)[-1] for p in layers})
    return (f"LoRA r={settings.r} alpha={settings.alpha:g} dropout={settings.dropout:g} on {len(layers)} layers "
            f"({', '.join(kinds)}): {trainable:,} trainable backbone parameters of {total:,}")


# ----------------------------------------------------------------------- merge and export


def merge_lora_state(state: dict[str, torch.Tensor], scaling: float) -> dict[str, torch.Tensor]:
    """A state dict of adapted layers (P.base_layer.weight, P.lora_A/B.default.weight) as the
    plain model's (P.weight = W + (B @ A) * scaling, P.bias); fp32, computed on CPU tensors.
    Keys without adapters pass through; a state dict without adapters is returned as it is."""
    layers = adapted_layers(state)
    if not layers:
        return state
    out = dict(state)
    for p in layers:
        a = out.pop(f"{p}.lora_A.{ADAPTER_NAME}.weight").float()
        b = out.pop(f"{p}.lora_B.{ADAPTER_NAME}.weight").float()
        w = out.pop(f"{p}.base_layer.weight").float()
        out[f"{p}.weight"] = w + (b @ a) * scaling
        bias = out.pop(f"{p}.base_layer.bias", None)
        if bias is not None:
            out[f"{p}.bias"] = bias
    stray = [k for k in out if ".lora_" in k or ".base_layer." in k]
    if stray:
        raise ValueError(f"cannot merge LoRA weights: unexpected adapter tensors {stray[:3]}")
    return out


def adapter_state(state: dict[str, torch.Tensor], prefix: str = "backbone.") -> dict[str, torch.Tensor]:
    """The adapter tensors of an Encoder state dict under peft's saved names
    (base_model.model.P.lora_A.weight), as ``PeftModel.save_pretrained`` writes them."""
    marker = f".{ADAPTER_NAME}."
    return {"base_model.model." + k[len(prefix):].replace(marker, "."): v.detach().float().contiguous()
            for k, v in state.items() if k.startswith(prefix) and ".lora_" in k}


def base_model_reference(name_or_path: str) -> str:
    """How an adapter folder names its base model: an absolute path for local folders (the
    packaged MiniLM included), else the hub name."""
    from .model_path import resolve_model_path

    path = resolve_model_path(name_or_path)
    return str(Path(path).resolve()) if os.path.isdir(path) else path


def write_adapter(out_dir: str | Path, state: dict[str, torch.Tensor], settings: LoraSettings,
                  backbone: nn.Module, base_model: str) -> None:
    """peft's adapter folder: adapter_config.json + adapter_model.safetensors."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = peft_config(settings, backbone)
    config.base_model_name_or_path = base_model
    # The adapted layers by their full names: a loader that builds more than this trainer did
    # (BERT's pooler, whose dense layer the short names also match) adapts the same layers.
    config.target_modules = sorted(adapted_layers(k[len("backbone."):] for k in state if k.startswith("backbone.")))
    config.save_pretrained(str(out))
    save_file(adapter_state(state), str(out / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})


def adapter_base(path: str | Path) -> str | None:
    """The base model of an adapter-only folder (adapter_config.json, no config.json), else None."""
    p = Path(path)
    if (p / ADAPTER_CONFIG_FILE).is_file() and not (p / "config.json").is_file():
        return json.loads((p / ADAPTER_CONFIG_FILE).read_text())["base_model_name_or_path"]
    return None


def merge_adapter_folder(backbone: nn.Module, path: str | Path) -> nn.Module:
    """``backbone`` with the adapter of ``path`` merged into its weights (a plain model again)."""
    require_peft(1)
    from peft import PeftModel

    return PeftModel.from_pretrained(backbone, str(path)).merge_and_unload()
