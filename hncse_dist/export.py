"""Export a model folder or a training checkpoint (DDP or DeepSpeed ZeRO, any stage) as a
folder that loads with transformers.AutoModel and sentence_transformers.SentenceTransformer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .encoder import ENCODER_CONFIG_FILE, Encoder


def _checkpoint_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """The Encoder's fp32 state dict from an Accelerate checkpoint folder."""
    st = ckpt / "model.safetensors"
    if st.is_file():
        from safetensors.torch import load_file

        return load_file(str(st))
    for name in ("pytorch_model", "pytorch_model_0"):  # DeepSpeed engine folders
        if (ckpt / name).is_dir():
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            # Accelerate saves the engine with the folder name as DeepSpeed's tag.
            return get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=name)
    bin_file = ckpt / "pytorch_model.bin"
    if bin_file.is_file():
        return torch.load(bin_file, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{ckpt} holds no model weights (model.safetensors or a DeepSpeed pytorch_model/ folder)")


def _run_config(ckpt: Path) -> dict:
    cfg_file = ckpt.parent.parent / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{cfg_file} not found: a checkpoint must stay inside its run folder (OUT/checkpoints/step-N)")
    return json.loads(cfg_file.read_text())


def export_any(source: str, output: str, pooler: str | None = None) -> Path:
    src = Path(source)
    if not src.exists():
        raise FileNotFoundError(f"{source} does not exist: pass a model folder or OUT/checkpoints/step-N")
    if (src / "config.json").is_file() and not (src / "COMPLETE").is_file():
        if pooler is None and not (src / ENCODER_CONFIG_FILE).is_file():
            pooler = "cls_before_pooler"
        enc = Encoder.from_pretrained(str(src), pooler=pooler)
        enc.save_pretrained(output)
        return Path(output)
    run = _run_config(src)
    from .checkpoint import check_files

    check_files(src)  # DeepSpeed's consolidation unpickles its files in full: plain data only
    enc = Encoder.from_pretrained(run["model_name_or_path"], pooler or run["pooler"], run["mlp_only_train"],
                                  dropout=run.get("dropout"), append_eos=run.get("append_eos", "auto"),
                                  padding_side=run.get("padding_side"))
    state = _checkpoint_state_dict(src)
    missing, unexpected = enc.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("head.")]:
        raise ValueError(f"checkpoint does not match {run['model_name_or_path']}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    enc.save_pretrained(output)
    return Path(output)
