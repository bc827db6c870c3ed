"""The README.md model card of an exported folder: what the model is, how to load it, and,
when the export comes from a training run, how it was trained.

A card is described by a dict, every key optional:
  config         the run's configuration (``asdict(TrainConfig)``, a run's config.json)
  world_size     processes of the run (the global batch is batch_size x world_size)
  step           the optimizer step of the exported weights
  stsb_dev       STS-B dev Spearman (x100) of these weights, when evaluated at ``step``
  best_stsb_dev  the run's best STS-B dev Spearman up to ``step``
  command        the command line that started the run
  base_model     the model trained from, when there is no ``config``
"""

from __future__ import annotations

import math
import re
import shlex
import sys
from pathlib import Path

CARD_KEYS = ("config", "world_size", "step", "stsb_dev", "best_stsb_dev", "command", "base_model")
OBJECTIVES = {
    "simcse": "unsupervised SimCSE (InfoNCE between two dropout views of each sentence)",
    "pm": "SimCSE with HNCSE's positive mixing",
    "hnm": "SimCSE with HNCSE's hard negative mixing",
    "hncse": "HNCSE: SimCSE with positive mixing and hard negative mixing",
}
POOLER_TEXT = {
    "cls": "the [CLS] token of the last layer",
    "cls_before_pooler": "the [CLS] token of the last layer",
    "avg": "the attention-masked mean of the last layer",
    "avg_first_last": "the attention-masked mean of (first transformer layer + last layer) / 2",
    "last": "the last real token of the last layer",
}
PACKAGED_HUB_NAME = "sentence-transformers/all-MiniLM-L6-v2"
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
# Never part of a reproduction: where to resume from, whether to replace a run folder.
_NOT_REPRODUCED = ("resume", "overwrite")


def command_line(argv: list[str] | None = None) -> str:
    """This process's command as the user typed it: ``hncse-dist`` and its arguments (a worker
    started by ``--nproc-per-node`` or torchrun gets the same arguments)."""
    return shlex.join(["hncse-dist", *(sys.argv[1:] if argv is None else argv)])


def base_model_name(name: str) -> str:
    from .model_path import PACKAGED_MODEL_NAMES

    return PACKAGED_HUB_NAME if name in PACKAGED_MODEL_NAMES else name


def hub_id(name: str) -> str | None:
    """``name`` if it reads as a Hugging Face Hub model id (the card's ``base_model``), else None."""
    name = base_model_name(name)
    if _HUB_ID.fullmatch(name) and not Path(name).exists():
        return name
    return None


def _yaml_value(value) -> str:
    import yaml

    try:
        text = yaml.safe_dump(value, default_flow_style=True, width=1 << 30).strip()
    except yaml.YAMLError:  # e.g. a Path: its text
        return str(value)
    return text.removesuffix("...").strip()


def overrides_command(config: dict) -> str:
    """``hncse-dist train key=value ...`` with every key of ``config`` that differs from its
    default: the run again, from its recorded configuration."""
    from dataclasses import asdict

    from .config import TrainConfig

    defaults = asdict(TrainConfig())
    args = [f"{k}={_yaml_value(v)}" for k, v in config.items()
            if k in defaults and k not in _NOT_REPRODUCED and v != defaults[k]]
    return shlex.join(["hncse-dist", "train", *args])


def _number(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _score(value) -> str | None:
    if isinstance(value, (int, float)) and math.isfinite(value):
        return f"{value:.2f}"
    return None


def training_rows(card: dict) -> list[tuple[str, str]]:
    """(setting, value) rows of the card's training table."""
    cfg = card.get("config") or {}
    ws = card.get("world_size")
    rows = [("base model", f"`{base_model_name(str(cfg['model_name_or_path']))}`")] if "model_name_or_path" in cfg else []
    if "objective" in cfg:
        rows.append(("objective", f"`{cfg['objective']}`: {OBJECTIVES.get(cfg['objective'], cfg['objective'])}"))
    if "pooler" in cfg:
        head = ""
        if cfg["pooler"] == "cls":
            head = " (MLP head in training only)" if cfg.get("mlp_only_train", True) else " + MLP head"
        rows.append(("pooler", f"`{cfg['pooler']}`{head}"))
    for key in ("temperature", "learning_rate", "warmup_steps", "weight_decay", "max_seq_length", "dropout"):
        if key in cfg:
            rows.append((key, _number(cfg[key]) if cfg[key] is not None else "the model's own"))
    if "batch_size" in cfg:
        per, accum = cfg["batch_size"], cfg.get("gradient_accumulation_steps", 1)
        text = f"{per} per process"
        if ws:
            text += f" x {ws} process{'es' if ws != 1 else ''} = {per * ws} sentences a step"
        if accum and accum != 1:
            text += f", {accum} accumulation steps"
        rows.append(("batch size", text))
    step = card.get("step")
    if step is not None or cfg.get("max_steps"):
        text = str(step) if step is not None else "?"
        if cfg.get("max_steps"):
            text += f" of {cfg['max_steps']}"
        rows.append(("steps", text))
    objective = cfg.get("objective")
    if objective in ("pm", "hncse"):
        rows.append(("positive mixing", ", ".join(
            f"{k.removeprefix('pm_')} {_number(cfg[k])}" for k in ("pm_threshold", "pm_w1", "pm_w2", "pm_nonpositive",
                                                                    "pm_weight_grad") if k in cfg)))
    if objective in ("hnm", "hncse"):
        keys = ("hnm_k", "hnm_m", "hnm_alpha", "hnm_query_mix", "hnm_beta_max", "hnm_use_batch", "hnm_grad",
                "hnm_mask_duplicates")
        rows.append(("hard negative mixing", ", ".join(
            f"{k.removeprefix('hnm_')} {_number(cfg[k]) if cfg[k] is not None else 'U(0,1)'}" for k in keys if k in cfg)))
        rows.append(("negative bank", ", ".join(f"{k} {_number(cfg[k])}" for k in
                                                ("bank_size", "bank_warmup_steps", "bank_in_logits") if k in cfg)))
    for key in ("mixed_precision", "deepspeed", "export_dtype", "seed"):
        if key in cfg:
            rows.append((key, str(cfg[key]) if cfg[key] is not None else "none"))
    return rows


def check(card: dict | None) -> dict:
    """``card`` (a copy), or a ValueError naming the keys it should use."""
    card = dict(card or {})
    unknown = set(card) - set(CARD_KEYS)
    if unknown:
        raise ValueError(f"unknown model card keys {sorted(unknown)}: use {', '.join(CARD_KEYS)}")
    return card


def render(card: dict | None, *, pooler: str, hidden: int, max_seq_length: int, layout: list[str],
           name_or_path: str, head_used: bool) -> str:
    """The README.md text. ``layout``: the sentence-transformers module names, in order."""
    card = check(card)
    cfg = card.get("config") or {}
    base = base_model_name(str(cfg.get("model_name_or_path") or card.get("base_model") or name_or_path))
    objective = cfg.get("objective")
    meta = ["library_name: sentence-transformers", "pipeline_tag: sentence-similarity", "tags:",
            "- sentence-transformers", "- sentence-similarity", "- feature-extraction", "- hncse-dist"]
    if objective:
        meta.append(f"- {objective}")
    if hub_id(base):
        meta.append(f"base_model: {hub_id(base)}")
    title = f"{objective.upper()} sentence encoder" if objective else "Sentence encoder"
    lines = ["---", *meta, "---", "", f"# {title} from {base}", ""]
    trained = f", trained with hncse-dist ({OBJECTIVES.get(objective, objective)})" if objective else ""
    embedding = POOLER_TEXT[pooler] + (" through the Linear + Tanh head" if head_used else "")
    lines += [f"A sentence embedding model{trained}: `{base}` encodes the sentence and the embedding "
              f"({hidden} dimensions, compared by cosine similarity) is {embedding} (pooler `{pooler}`). "
              f"Inputs are cut at {max_seq_length} tokens.", ""]
    lines += ["## Usage", "", "```python", "from sentence_transformers import SentenceTransformer", "",
              'model = SentenceTransformer("PATH/TO/THIS/FOLDER")',
              'embeddings = model.encode(["A man is playing a guitar.", "Someone plays an instrument."])',
              "```", "",
              f"The folder uses stock sentence-transformers modules ({' -> '.join(layout)}) and loads "
              "without hncse-dist; `transformers.AutoModel` loads the backbone alone. With hncse-dist:", "",
              "```python", "from hncse_dist.encoder import Encoder", "",
              'encoder = Encoder.from_pretrained("PATH/TO/THIS/FOLDER", pooler=None)',
              f'embeddings = encoder.encode(sentences, max_length={max_seq_length})', "```", ""]
    rows = training_rows(card)
    if rows:
        lines += ["## Training", "", "| setting | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows), ""]
    scores = []
    if _score(card.get("stsb_dev")):
        scores.append(f"{_score(card['stsb_dev'])} for these weights"
                      + (f" (step {card['step']})" if card.get("step") is not None else ""))
    if _score(card.get("best_stsb_dev")):
        scores.append(f"best of the run {_score(card['best_stsb_dev'])}")
    if scores:
        lines += [f"STS-B dev Spearman x 100: {'; '.join(scores)}.", ""]
    if card.get("command") or cfg:
        lines += ["## Command", ""]
        if card.get("command"):
            lines += ["```bash", card["command"], "```", ""]
        if cfg:
            lines += ["Every setting that differs from the defaults, as overrides:", "", "```bash",
                      overrides_command(cfg), "```", ""]
    return "\n".join(lines)
