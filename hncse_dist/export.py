"""Export a model folder or a training checkpoint (DDP or DeepSpeed ZeRO, any stage) as a
folder that loads with transformers.AutoModel and sentence_transformers.SentenceTransformer.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

from .checkpoint import MARKER, marker_record
from .encoder import ENCODER_CONFIG_FILE, Encoder
from .lora import ADAPTER_SUBFOLDER, LoraSettings, adapter_base, base_model_reference, merge_lora_state, write_adapter
from .st_modules import ROOT_CONFIG, needs_hidden_states, patch_json


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
    if ((src / "config.json").is_file() or adapter_base(src)) and not (src / MARKER).is_file():
        if pooler is None and not (src / ENCODER_CONFIG_FILE).is_file():
            pooler = "cls_before_pooler"
        enc = Encoder.from_pretrained(str(src), pooler=pooler)
        enc.save_pretrained(output, max_seq_length=_folder_max_seq_length(src))
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
    write_export(enc, output, {k: v.detach() for k, v in enc.state_dict().items()}, run.get("export_dtype", "fp32"),
                 max_seq_length=run.get("max_seq_length"), card=checkpoint_card(src, run))
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
    out: dict[str, torch.Tensor] = {}
    for name, t in module.state_dict(keep_vars=True).items():
        full = _full_fp32(t)
        if acc.is_main_process:
            out[name] = full.detach().cpu()
    if not acc.is_main_process:
        return None
    return merge_lora_state(out, lora.scaling) if lora is not None and merge_lora else out


def _full_fp32(t: torch.Tensor) -> torch.Tensor:
    """A DeepSpeed module's state-dict entry whole: a parameter's fp32 master (a collective on
    every rank), a buffer as it is."""
    from deepspeed.utils import safe_get_full_fp32_param

    if not isinstance(t, torch.nn.Parameter):
        return t.detach()
    full = safe_get_full_fp32_param(t)
    return _gathered_copy(t) if full is None else full  # no fp32 master (frozen): the module's copy


def _gathered_copy(param: torch.nn.Parameter) -> torch.Tensor:
    if not hasattr(param, "ds_id"):
        return param.detach().clone()
    import deepspeed

    with deepspeed.zero.GatheredParameters([param]):
        return param.detach().clone()


def cast_state_dict(state: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """Floating tensors to ``export_dtype`` (integer buffers stay as they are)."""
    return {k: _cast(v, EXPORT_DTYPES[dtype]) for k, v in state.items()}


def _cast(t: torch.Tensor, target: torch.dtype) -> torch.Tensor:
    return t.to(target) if t.is_floating_point() else t


def save_encoder(encoder: Encoder, out_dir: str | Path, state: dict[str, torch.Tensor], dtype: str = "fp32",
                 max_seq_length: int | None = None, card: dict | None = None) -> None:
    """``encoder.save_pretrained`` with ``state`` cast to ``dtype``; config.json names that dtype
    (transformers writes the dtype of the module, bf16 under DeepSpeed, not of the weights saved).
    ``max_seq_length``: None takes the card's run config's, else the model's limit; ``card``:
    the model card's facts (``hncse_dist.model_card``)."""
    if max_seq_length is None:
        max_seq_length = card_max_seq_length(card)
    encoder.save_pretrained(out_dir, state_dict=cast_state_dict(state, dtype), max_seq_length=max_seq_length, card=card)
    name_dtype(out_dir, dtype)


def card_max_seq_length(card: dict | None) -> int | None:
    """The run's max_seq_length, from the model card's config (None without one)."""
    return ((card or {}).get("config") or {}).get("max_seq_length")


def name_dtype(out_dir: str | Path, dtype: str) -> None:
    """config.json names the export's dtype (transformers writes the module's, bf16 under
    DeepSpeed, not that of the weights saved)."""
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


# ------------------------------------------------------------------------------ LoRA runs


def export_trained(acc, model, out_dir: Path, dtype: str = "fp32", card: dict | None = None) -> None:
    """``export_from_training`` for any encoder: a LoRA run writes what its ``lora_export``
    asks for, the merged model (``merged``), peft's adapter folder (``adapter``) or both (the
    adapter in ``out_dir/adapter``). Every rank calls it; the main process writes. Under
    DeepSpeed the weights are streamed (``stream_export``) where the encoder allows it."""
    if streamable(acc, model):
        stream_export(acc, model, out_dir, dtype, card=card)
        return
    state = master_state_dict(acc, model, merge_lora=False)
    if acc.is_main_process:
        write_export(acc.unwrap_model(model), out_dir, state, dtype, card=card)
    acc.wait_for_everyone()


def write_export(encoder: Encoder, out_dir: str | Path, state: dict[str, torch.Tensor], dtype: str = "fp32",
                 max_seq_length: int | None = None, card: dict | None = None) -> None:
    """``save_encoder`` of ``state`` (the encoder's fp32 state dict, adapters unmerged), or for a
    LoRA encoder what its ``lora_export`` says: merged into plain weights, the adapter folder, both."""
    lora = encoder.lora
    if lora is None:
        save_encoder(encoder, out_dir, state, dtype, max_seq_length=max_seq_length, card=card)
        return
    if lora.export in ("merged", "both"):
        save_encoder(encoder, out_dir, merge_lora_state(state, lora.scaling), dtype, max_seq_length=max_seq_length,
                     card=card)
    if lora.export in ("adapter", "both"):
        out = Path(out_dir) / ADAPTER_SUBFOLDER if lora.export == "both" else Path(out_dir)
        write_adapter(out, state, lora, encoder.backbone, base_model_reference(encoder.backbone.config.name_or_path))
        if max_seq_length is None:
            max_seq_length = card_max_seq_length(card)
        # sentence-transformers' own re-save would load base + adapter to write them again (and
        # wants a newer peft than its loader does): its 3.x-format files are written directly.
        encoder.save_companion_files(out, {k: v.float() for k, v in state.items() if k.startswith("head.")},
                                     max_seq_length, card, st_library=False)
        if needs_hidden_states(encoder.pooler):  # the base model's config does not output them
            patch_json(out / ROOT_CONFIG, config_args={"output_hidden_states": True})


# ------------------------------------------------------------------------------ streamed exports

# safetensors' names of the dtypes a state dict holds
SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


class SafetensorsStream:
    """A safetensors file written one tensor at a time: the header (every name, dtype and shape,
    known before any tensor is) first, then each tensor's bytes as it comes, in header order.
    The file loads with ``safetensors.safe_open`` / ``load_file`` like one ``save_file`` wrote."""

    def __init__(self, path: Path, specs: dict[str, tuple[torch.dtype, tuple[int, ...]]]):
        header, offset = {}, 0
        for name, (dtype, shape) in specs.items():
            size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + size]}
            offset += size
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
        self.specs, self.pending = specs, list(specs)
        self.file = open(path, "wb")
        self.file.write(struct.pack("<Q", len(raw)) + raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = self.pending.pop(0) if self.pending else None
        if name != expected or (tensor.dtype, tuple(tensor.shape)) != self.specs[name]:
            raise ValueError(f"{name} ({tensor.dtype}, {tuple(tensor.shape)}) written where the header has "
                             f"{expected} {self.specs.get(expected)}")
        self.file.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())

    def close(self) -> None:
        self.file.close()
        if self.pending:
            raise ValueError(f"{len(self.pending)} tensors never written, from {self.pending[0]}")


def streamable(acc, model) -> bool:
    """A DeepSpeed run whose encoder's state dict is plain: no LoRA adapters (a merge needs the
    base weights and the adapters together), no tensor under two names (transformers keeps one
    of tied weights), no remote code (transformers copies its files beside the weights)."""
    from accelerate.utils import DistributedType

    if acc.distributed_type != DistributedType.DEEPSPEED:
        return False
    module = acc.unwrap_model(model)
    if getattr(module, "lora", None) is not None or getattr(module.backbone.config, "auto_map", None):
        return False
    tensors = list(module.state_dict(keep_vars=True).values())
    return len({id(t) for t in tensors}) == len(tensors)


def stream_export(acc, model, out_dir: Path, dtype: str = "fp32", card: dict | None = None) -> None:
    """``export_trained`` of a DeepSpeed run without the whole state dict on the main process:
    each fp32 master parameter is gathered (``master_state_dict``'s collective, one parameter
    at a time, in the same order on every rank), cast to ``dtype`` and written at once, so the
    main process holds about twice the largest parameter (the gather's buffers) beyond its
    training state, not a copy of the model. The folder equals ``export_from_training``'s
    (``tests/test_deepspeed.py``)."""
    module = acc.unwrap_model(model)
    entries = module.state_dict(keep_vars=True)
    target = EXPORT_DTYPES[dtype]
    specs = {}
    for name, t in entries.items():
        if name.startswith("backbone."):
            shape = tuple(getattr(t, "ds_shape", t.shape))
            specs[name[len("backbone."):]] = (target if t.is_floating_point() else t.dtype, shape)
    out = Path(out_dir)
    stream = None
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        stream = SafetensorsStream(out / "model.safetensors", specs)
    head: dict[str, torch.Tensor] = {}
    try:
        for name, t in entries.items():
            full = _full_fp32(t)
            if stream is None:
                continue
            full = _cast(full.detach().cpu(), target)
            if name.startswith("backbone."):
                stream.write(name[len("backbone."):], full)
            else:
                head[name] = full
            del full
    finally:
        if stream is not None:
            stream.close()
    if acc.is_main_process:
        module.save_beside_weights(out, head, card_max_seq_length(card), card=card)
        name_dtype(out, dtype)
    acc.wait_for_everyone()
