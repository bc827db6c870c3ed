"""Export a model folder or a training checkpoint (DDP or DeepSpeed ZeRO, any stage) as a
folder that loads with transformers.AutoModel and sentence_transformers.SentenceTransformer.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .encoder import ENCODER_CONFIG_FILE, Encoder
from .lora import ADAPTER_SUBFOLDER, LoraSettings, adapter_base, base_model_reference, merge_lora_state, write_adapter


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
    if ((src / "config.json").is_file() or adapter_base(src)) and not (src / "COMPLETE").is_file():
        if pooler is None and not (src / ENCODER_CONFIG_FILE).is_file():
            pooler = "cls_before_pooler"
        enc = Encoder.from_pretrained(str(src), pooler=pooler)
        enc.save_pretrained(output)
        return Path(output)
    run = _run_config(src)
    from .checkpoint import check_files

    check_files(src)  # DeepSpeed's consolidation unpickles its files in full: plain data only
    lora = LoraSettings.from_config(run)  # a LoRA run: the same adapters, so that the keys match
    enc = Encoder.from_pretrained(run["model_name_or_path"], pooler or run["pooler"], run["mlp_only_train"],
                                  dropout=run.get("dropout"), append_eos=run.get("append_eos", "auto"),
                                  padding_side=run.get("padding_side"), lora=lora)
    state = _checkpoint_state_dict(src)
    missing, unexpected = enc.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("head.")]:
        raise ValueError(f"checkpoint does not match {run['model_name_or_path']}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    # The run's export_dtype (and lora_export), so that this equals the run's own best/ and final/ exports.
    write_export(enc, output, {k: v.detach() for k, v in enc.state_dict().items()}, run.get("export_dtype", "fp32"))
    return Path(output)


EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def master_state_dict(acc, model, merge_lora: bool = True) -> dict[str, torch.Tensor] | None:
    """The Encoder's state dict in fp32 on the main process (None elsewhere); with LoRA
    adapters in the backbone, merged into plain weights (``lora.merge_lora_state``) unless
    ``merge_lora`` is False.

    Under DeepSpeed the module holds bf16/fp16 copies (ZeRO-3: only partitions); the weights
    the optimizer updates are its fp32 master partitions, which ``safe_get_full_fp32_param``
    assembles one parameter at a time (a collective: every rank calls it, in the same order).
    These are the numbers ``zero_to_fp32`` reads back from a checkpoint, so an export at the
    end of a run equals ``hncse-dist export`` of its last checkpoint."""
    from accelerate.utils import DistributedType

    module = acc.unwrap_model(model)
    lora = getattr(module, "lora", None)
    if acc.distributed_type != DistributedType.DEEPSPEED:
        state = acc.get_state_dict(model)
        if not acc.is_main_process:
            return None
        state = {k: v.detach().cpu() for k, v in state.items()}
        return merge_lora_state(state, lora.scaling) if lora is not None and merge_lora else state
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
    if not acc.is_main_process:
        return None
    return merge_lora_state(out, lora.scaling) if lora is not None and merge_lora else out


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


def save_encoder(encoder: Encoder, out_dir: str | Path, state: dict[str, torch.Tensor], dtype: str = "fp32") -> None:
    """``encoder.save_pretrained`` with ``state`` cast to ``dtype``; config.json names that dtype
    (transformers writes the dtype of the module, bf16 under DeepSpeed, not of the weights saved)."""
    encoder.save_pretrained(out_dir, state_dict=cast_state_dict(state, dtype))
    config_file = Path(out_dir) / "config.json"
    config = json.loads(config_file.read_text())
    config["dtype"] = str(EXPORT_DTYPES[dtype]).removeprefix("torch.")
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export_from_training(acc, model, out_dir: Path, dtype: str = "fp32") -> None:
    """Write an AutoModel + SentenceTransformer folder from a training run, any ZeRO stage
    (every rank calls it; the main process writes)."""
    state = master_state_dict(acc, model)
    if acc.is_main_process:
        save_encoder(acc.unwrap_model(model), out_dir, state, dtype)
    acc.wait_for_everyone()


# ------------------------------------------------------------------------------ LoRA runs


def export_trained(acc, model, out_dir: Path, dtype: str = "fp32") -> None:
    """``export_from_training``, and for a LoRA run what its ``lora_export`` asks for: the
    merged model (``merged``), peft's adapter folder (``adapter``) or both (the adapter in
    ``out_dir/adapter``). Every rank calls it; the main process writes."""
    state = master_state_dict(acc, model, merge_lora=False)
    if acc.is_main_process:
        write_export(acc.unwrap_model(model), out_dir, state, dtype)
    acc.wait_for_everyone()


def write_export(encoder: Encoder, out_dir: str | Path, state: dict[str, torch.Tensor], dtype: str = "fp32") -> None:
    """Write ``encoder`` with ``state`` (its fp32 state dict, adapters unmerged for a LoRA
    encoder) as its ``lora_export`` says; a plain encoder is a plain ``save_encoder``."""
    lora = encoder.lora
    if lora is None:
        save_encoder(encoder, out_dir, state, dtype)
        return
    if lora.export in ("merged", "both"):
        save_encoder(encoder, out_dir, merge_lora_state(state, lora.scaling), dtype)
    if lora.export in ("adapter", "both"):
        out = Path(out_dir) / ADAPTER_SUBFOLDER if lora.export == "both" else Path(out_dir)
        save_adapter_folder(encoder, out, state)


def save_adapter_folder(encoder: Encoder, out_dir: Path, state: dict[str, torch.Tensor]) -> None:
    """peft's adapter folder plus what makes it an encoder folder: the tokenizer, the pooler
    record, the cls head and the SentenceTransformer modules (they load its base model and the
    adapter: no base weights are written)."""
    from .encoder import HEAD_FILE, write_sentence_transformers_files

    out = Path(out_dir)
    write_adapter(out, state, encoder.lora, encoder.backbone, base_model_reference(encoder.backbone.config.name_or_path))
    encoder.tokenizer.save_pretrained(out)
    head_sd = {k[len("head."):]: v.float() for k, v in state.items() if k.startswith("head.")}
    if head_sd:
        torch.save(head_sd, out / HEAD_FILE)
    (out / ENCODER_CONFIG_FILE).write_text(
        json.dumps({"pooler": encoder.pooler, "mlp_only_train": encoder.mlp_only_train}, indent=2))
    write_sentence_transformers_files(out, encoder.pooler, encoder.backbone.config.hidden_size,
                                      head_sd if head_sd and not encoder.mlp_only_train else None)
