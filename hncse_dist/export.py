"""Export a model folder or a training checkpoint (DDP or DeepSpeed ZeRO, any stage) as a
folder that loads with transformers.AutoModel and sentence_transformers.SentenceTransformer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import MARKER, marker_record
from .encoder import ENCODER_CONFIG_FILE, Encoder
from .st_modules import ROOT_CONFIG


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


def checkpoint_card(ckpt: Path, run: dict) -> dict:
    """The model card of a checkpoint's export: the run's config, the checkpoint's step and
    world size, and the STS-B dev scores the run logged up to that step."""
    from .metrics import STSB_DEV_KEY

    record = marker_record(ckpt)
    card = {"config": run, "step": record.get("step"), "world_size": record.get("world_size")}
    log = ckpt.parent.parent / "metrics.jsonl"
    scores = {}
    if log.is_file():
        for line in log.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:  # a line torn by a killed run
                continue
            if STSB_DEV_KEY in rec and (card["step"] is None or rec.get("step", 0) <= card["step"]):
                scores[rec.get("step")] = rec[STSB_DEV_KEY]
    if scores:
        card["best_stsb_dev"] = max(scores.values())
        if card["step"] in scores:
            card["stsb_dev"] = scores[card["step"]]
    return card


def _folder_max_seq_length(folder: Path) -> int | None:
    """The max_seq_length an exported folder records (sentence-transformers 3's format), if any."""
    config = folder / ROOT_CONFIG
    if config.is_file():
        return json.loads(config.read_text()).get("max_seq_length")
    return None


def export_any(source: str, output: str, pooler: str | None = None) -> Path:
    src = Path(source)
    if not src.exists():
        raise FileNotFoundError(f"{source} does not exist: pass a model folder or OUT/checkpoints/step-N")
    if (src / "config.json").is_file() and not (src / MARKER).is_file():
        if pooler is None and not (src / ENCODER_CONFIG_FILE).is_file():
            pooler = "cls_before_pooler"
        enc = Encoder.from_pretrained(str(src), pooler=pooler)
        enc.save_pretrained(output, max_seq_length=_folder_max_seq_length(src))
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
    # The run's export_dtype, so that this equals the run's own best/ and final/ exports.
    save_encoder(enc, output, {k: v.detach() for k, v in enc.state_dict().items()}, run.get("export_dtype", "fp32"),
                 max_seq_length=run.get("max_seq_length"), card=checkpoint_card(src, run))
    return Path(output)


EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def master_state_dict(acc, model) -> dict[str, torch.Tensor] | None:
    """The Encoder's state dict in fp32 on the main process (None elsewhere).

    Under DeepSpeed the module holds bf16/fp16 copies (ZeRO-3: only partitions); the weights
    the optimizer updates are its fp32 master partitions, which ``safe_get_full_fp32_param``
    assembles one parameter at a time (a collective: every rank calls it, in the same order).
    These are the numbers ``zero_to_fp32`` reads back from a checkpoint, so an export at the
    end of a run equals ``hncse-dist export`` of its last checkpoint."""
    from accelerate.utils import DistributedType

    module = acc.unwrap_model(model)
    if acc.distributed_type != DistributedType.DEEPSPEED:
        state = acc.get_state_dict(model)
        return {k: v.detach().cpu() for k, v in state.items()} if acc.is_main_process else None
    from deepspeed.utils import safe_get_full_fp32_param

    out: dict[str, torch.Tensor] = {}
    for name, t in module.state_dict(keep_vars=True).items():
        if isinstance(t, torch.nn.Parameter):
            full = safe_get_full_fp32_param(t)
            if full is None:  # no fp32 master (frozen): the module's own copy, gathered under ZeRO-3
                full = _gathered_copy(t)
        else:
            full = t.detach()
        if acc.is_main_process:
            out[name] = full.detach().cpu()
    return out if acc.is_main_process else None


def _gathered_copy(param: torch.nn.Parameter) -> torch.Tensor:
    if not hasattr(param, "ds_id"):
        return param.detach().clone()
    import deepspeed

    with deepspeed.zero.GatheredParameters([param]):
        return param.detach().clone()


def cast_state_dict(state: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """Floating tensors to ``export_dtype`` (integer buffers stay as they are)."""
    target = EXPORT_DTYPES[dtype]
    return {k: v.to(target) if v.is_floating_point() else v for k, v in state.items()}


def save_encoder(encoder: Encoder, out_dir: str | Path, state: dict[str, torch.Tensor], dtype: str = "fp32",
                 max_seq_length: int | None = None, card: dict | None = None) -> None:
    """``encoder.save_pretrained`` with ``state`` cast to ``dtype``; config.json names that dtype
    (transformers writes the dtype of the module, bf16 under DeepSpeed, not of the weights saved).
    ``max_seq_length``: None takes the card's run config's, else the model's limit; ``card``:
    the model card's facts (``hncse_dist.model_card``)."""
    if max_seq_length is None and card and card.get("config"):
        max_seq_length = card["config"].get("max_seq_length")
    encoder.save_pretrained(out_dir, state_dict=cast_state_dict(state, dtype), max_seq_length=max_seq_length, card=card)
    config_file = Path(out_dir) / "config.json"
    config = json.loads(config_file.read_text())
    config["dtype"] = str(EXPORT_DTYPES[dtype]).removeprefix("torch.")
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export_from_training(acc, model, out_dir: Path, dtype: str = "fp32", card: dict | None = None) -> None:
    """Write an AutoModel + SentenceTransformer folder from a training run, any ZeRO stage
    (every rank calls it; the main process writes). ``card``: the run's facts for the model
    card; its ``config`` also gives the folder's max_seq_length."""
    state = master_state_dict(acc, model)
    if acc.is_main_process:
        save_encoder(acc.unwrap_model(model), out_dir, state, dtype, card=card)
    acc.wait_for_everyone()
