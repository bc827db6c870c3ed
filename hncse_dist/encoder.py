"""Sentence encoder: a Hugging Face backbone, a pooler and SimCSE's train-only MLP head.

Poolers (SimCSE's names):
  cls                [CLS] through the MLP head (the head is skipped at evaluation when
                     ``mlp_only_train`` is set, SimCSE's unsupervised recipe)
  cls_before_pooler  [CLS] of the last layer, no head
  avg                attention-masked mean of the last layer
  avg_first_last     masked mean of (first transformer layer + last layer) / 2
  last               the last real token of the last layer (left or right padding): the
                     pooler of causal (decoder-only) models, whose first token has not read
                     the sentence (hncse_dist.families)
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .families import (ModelSetupError, check_pooler, is_causal, model_name, prepare_tokenizer,  # noqa: F401
                       require_dropout, set_dropout)
from .model_path import (PACKAGED_MODEL_NAMES, POOLERS, backbone_load_kwargs, check_model_path,  # noqa: F401
                         resolve_model_path)
from .lora import LoraSettings, adapter_base, apply_lora, lora_note, merge_adapter_folder
from .packed import Packing, packed_forward, right_padded, supports_packing
from .st_modules import model_max_length, needs_hidden_states, patch_json, st_layout
from .st_modules import write_sentence_transformers_files as st_write

HEAD_FILE = "hncse_head.pt"
ENCODER_CONFIG_FILE = "hncse_encoder.json"


def check_model_setup(name_or_path: str, pooler: str, dropout: float | None = None, append_eos: str = "auto",
                      padding_side: str | None = None, lora: LoraSettings | None = None) -> None:
    """Start-up checks of a training run (pooler, tokenizer, dropout, LoRA target modules:
    ModelSetupError) without loading the weights: the model is built on the meta device. Lets
    the launcher refuse a bad setup once, before it starts the processes."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    path = resolve_model_path(name_or_path)
    check_model_path(path)
    config = AutoConfig.from_pretrained(path)
    if dropout is not None:
        set_dropout(config, dropout)
    with torch.device("meta"):
        backbone = AutoModel.from_config(config)
        if lora is not None:
            apply_lora(backbone, lora)
    Encoder(backbone, AutoTokenizer.from_pretrained(path), pooler=pooler, append_eos=append_eos,
            padding_side=padding_side)
    require_dropout(backbone, dropout)


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


def last_token(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each row's last attended position: right padding (length - 1) and left padding (L - 1) alike."""
    last = mask.shape[1] - 1 - mask.flip(1).argmax(1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def zero3_partitioned(module: nn.Module) -> bool:
    """Whether DeepSpeed ZeRO-3 holds ``module``'s parameters as partitions (loaded under zero.Init)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def build_head(hidden: int, backbone: nn.Module) -> nn.Module:
    """SimCSE's MLP head (Linear + Tanh). Under ZeRO-3 the backbone is loaded partitioned in
    the run's dtype (bf16 or fp16 when the DeepSpeed config enables them): the head is built
    in the same zero.Init and dtype, so DeepSpeed sees one partitioned group of one dtype
    (it refuses mixed dtypes). bf16 and fp16 take this same path."""
    if not zero3_partitioned(backbone):
        return nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh())
    import deepspeed
    from transformers.integrations import deepspeed_config

    dtype = next(backbone.parameters()).dtype
    # No explicit dtype: zero.Init then takes it from the DeepSpeed config, as transformers'
    # loader did for the backbone. (An explicit dtype is overridden on accelerators without
    # fp16 support, DeepSpeed's CPU accelerator among them: the head came out bf16 in fp32 runs.)
    with deepspeed.zero.Init(config_dict_or_path=deepspeed_config()):
        head = nn.Sequential(nn.Linear(hidden, hidden), nn.Tanh())
    got = next(head.parameters()).dtype
    if got != dtype:
        raise ModelSetupError(f"ZeRO-3 built the MLP head in {got} but the backbone in {dtype}: DeepSpeed needs one "
                              "dtype; use pooler=cls_before_pooler or avg, or report this DeepSpeed version")
    return head


DEFAULT_MAX_TOKENS = 4096  # token positions per evaluation batch (Encoder.encode)


def _length_batches(lengths: Sequence[int], max_sentences: int, max_tokens: int) -> list[list[int]]:
    """Indices of ``lengths`` in batches of at most ``max_sentences`` sequences and
    ``max_tokens`` token positions (``Encoder.encode``).

    The sequences of one length are split into near-equal batches, so no batch has padding.
    Lengths with too few sequences to fill a quarter of a batch (the long tail of a length
    distribution) are merged instead, in length order, into padded batches.
    """
    by_length: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        by_length.setdefault(n, []).append(i)

    def capacity(n: int) -> int:
        return max(1, min(max_sentences, max_tokens // n))

    batches, tail = [], []
    for n, group in sorted(by_length.items()):
        cap = capacity(n)
        if 4 * len(group) < cap:
            tail.extend(group)
            continue
        size = -(-len(group) // -(-len(group) // cap))  # ceil(len / number of batches)
        batches.extend(group[s : s + size] for s in range(0, len(group), size))
    batch: list[int] = []
    for i in tail:  # ascending length: the newest sequence is the longest of its batch
        if len(batch) >= capacity(lengths[i]):
            batches.append(batch)
            batch = []
        batch.append(i)
    if batch:
        batches.append(batch)
    return batches


class _DensePacking(Packing):
    """The packed layout of a batch without padding: the padded one, reshaped (no index
    copies, and no attention mask)."""

    def __init__(self, batch: int, length: int, device: torch.device | str):
        self.batch, self.length = batch, length
        self.lengths = torch.full((batch,), length, device=device)
        self.starts = torch.arange(0, batch * length, length, device=device)
        self.index = self.row = self.key_mask = None

    def to(self, device: torch.device | str) -> "_DensePacking":
        return _DensePacking(self.batch, self.length, device)

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        return padded.reshape(self.batch * self.length, -1)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        return packed.view(self.batch, self.length, -1)

    def mean(self, packed: torch.Tensor) -> torch.Tensor:
        return packed.view(self.batch, self.length, -1).mean(1)


class Encoder(nn.Module):
    """Backbone + pooler + MLP head; ``forward`` returns one embedding per sequence."""

    def __init__(self, backbone: nn.Module, tokenizer, pooler: str = "cls", mlp_only_train: bool = True,
                 packed: bool = True, append_eos: str = "auto", padding_side: str | None = None):
        """Checks the pooler against the architecture and prepares the tokenizer in place
        (pad token, EOS, padding side: ``families.prepare_tokenizer``); ``notes`` says what
        was changed. Raises ModelSetupError for combinations that cannot work."""
        super().__init__()
        if pooler not in POOLERS:
            raise ValueError(f"unknown pooler {pooler!r}: choose one of {', '.join(POOLERS)}")
        check_pooler(backbone, pooler)
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.pooler = pooler
        self.mlp_only_train = mlp_only_train
        self.lora: LoraSettings | None = None  # set by from_pretrained(lora=...): adapters in the backbone
        self.causal = is_causal(backbone)
        if self.causal and getattr(backbone.config, "use_cache", False):
            backbone.config.use_cache = False  # no key/value cache: one forward per batch, no generation
        self.notes: list[str] = prepare_tokenizer(tokenizer, backbone, append_eos, padding_side)
        hidden = backbone.config.hidden_size
        self.head = build_head(hidden, backbone) if pooler == "cls" else None
        # Padding-free forward (hncse_dist.packed) where the architecture allows it.
        self.packed = packed and supports_packing(backbone)
        if packed and not self.packed:
            self.notes.append(f"packed_forward: the padding-free forward covers BERT-family encoders with "
                              f"absolute positions, not {model_name(backbone)}: the model's own forward is used")

    @classmethod
    def from_pretrained(
        cls, name_or_path: str, pooler: str | None = "cls", mlp_only_train: bool = True, packed: bool = True,
        dropout: float | None = None, append_eos: str = "auto", padding_side: str | None = None,
        lora: LoraSettings | None = None, **model_kwargs,
    ) -> "Encoder":
        """``pooler=None``: the saved folder's pooler, else ``last`` for causal models and ``cls``
        for the others. ``dropout``: None keeps the model's own, a float sets every backbone
        dropout key of its config (``families.set_dropout``). ``lora``: inject LoRA adapters
        into the backbone and freeze its weights (``hncse_dist.lora``; the head stays
        trainable). A LoRA adapter folder (``lora_export: adapter``) loads as its base model
        with the adapter merged."""
        from transformers import AutoConfig, AutoModel, AutoTokenizer

        path = resolve_model_path(name_or_path)
        adapter_of = adapter_base(path)  # an adapter-only folder: the weights come from its base model
        weights_path = resolve_model_path(adapter_of) if adapter_of else path
        check_model_path(weights_path)
        saved = Path(path) / ENCODER_CONFIG_FILE
        if saved.is_file() and pooler is None:
            meta = json.loads(saved.read_text())
            pooler, mlp_only_train = meta["pooler"], meta["mlp_only_train"]
        config = AutoConfig.from_pretrained(weights_path)
        model_kwargs = {**backbone_load_kwargs(), **model_kwargs}
        dropout_keys = set_dropout(config, dropout) if dropout is not None else []
        from transformers.utils import logging as hf_logging

        verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
        hf_logging.set_verbosity_error()  # the dropped BERT pooler is expected, not news
        hf_logging.disable_progress_bar()  # a "Loading weights" bar per process is noise in run logs
        try:
            # BERT's pooler is never used here and would leave DDP with unused parameters.
            backbone = AutoModel.from_pretrained(weights_path, config=config, add_pooling_layer=False, **model_kwargs)
        except TypeError:
            backbone = AutoModel.from_pretrained(weights_path, config=config, **model_kwargs)
        finally:
            hf_logging.set_verbosity(verbosity)
            if bars:
                hf_logging.enable_progress_bar()
        if adapter_of:
            backbone = merge_adapter_folder(backbone, path)
        lora_layers = apply_lora(backbone, lora) if lora is not None else None
        tokenizer = AutoTokenizer.from_pretrained(path)
        pooler = pooler or ("last" if is_causal(backbone) else "cls")
        enc = cls(backbone, tokenizer, pooler=pooler, mlp_only_train=mlp_only_train, packed=packed,
                  append_eos=append_eos, padding_side=padding_side)
        enc.lora = lora
        if lora_layers is not None:
            enc.notes.insert(0, lora_note(lora, backbone, lora_layers))
        if dropout_keys:
            enc.notes.insert(0, f"dropout={dropout}: set {', '.join(dropout_keys)} of {model_name(backbone)}")
        head_file = Path(path) / HEAD_FILE
        if enc.head is not None and head_file.is_file():
            head_sd = torch.load(head_file, map_location="cpu", weights_only=True)
            if zero3_partitioned(enc.head):  # gather, load on rank 0, re-partition (a collective)
                import deepspeed

                with deepspeed.zero.GatheredParameters(list(enc.head.parameters()), modifier_rank=0):
                    enc.head.load_state_dict(head_sd)
            else:
                enc.head.load_state_dict(head_sd)
        return enc

    def enable_checkpointing(self) -> None:
        """Activation (gradient) checkpointing of the backbone's layers; torch.utils.checkpoint
        replays the saved RNG state in the recomputation, so both dropout views survive."""
        enable = getattr(self.backbone, "activation_checkpointing_enable", None)  # transformers >= 5.x name
        (enable or self.backbone.gradient_checkpointing_enable)()

    @property
    def config(self):
        """The backbone's config: DeepSpeed's "auto" bucket sizes are derived from hidden_size."""
        return self.backbone.config

    def uses_head(self) -> bool:
        return self.head is not None and (self.training or not self.mlp_only_train)

    def packing_for(self, attention_mask: torch.Tensor, device: torch.device | str) -> Packing | None:
        """The padding-free forward's index bookkeeping for ``attention_mask``, computed where
        the mask is (the CPU, before the batch is moved) and moved to ``device``; None when
        the forward will not pack (unsupported model or left padding)."""
        if not (self.packed and right_padded(attention_mask)):
            return None
        return Packing(attention_mask).to(device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                packing: Packing | None = None) -> torch.Tensor:
        """One embedding per sequence. ``packing``: from ``packing_for`` on the same mask."""
        need_all = self.pooler == "avg_first_last"
        if packing is not None or (self.packed and right_padded(attention_mask)):
            last, first, pk = packed_forward(self.backbone, input_ids, attention_mask, keep_first=need_all,
                                             packing=packing)
            first_token, mean = (lambda h: h.index_select(0, pk.starts)), pk.mean
            final_token = lambda h: h.index_select(0, pk.starts + pk.lengths - 1)  # noqa: E731
        else:
            out = self.backbone(
                input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=need_all
            )
            last, first = out.last_hidden_state, out.hidden_states[1] if need_all else None
            first_token, mean = (lambda h: h[:, 0]), (lambda h: masked_mean(h, attention_mask))
            final_token = lambda h: last_token(h, attention_mask)  # noqa: E731
        if self.pooler in ("cls", "cls_before_pooler"):
            pooled = first_token(last)
        elif self.pooler == "last":
            pooled = final_token(last)
        else:
            pooled = mean(last if self.pooler == "avg" else (first + last) / 2)
        if self.uses_head():
            pooled = self.head(pooled)
        return pooled

    def tokenize(self, sentences: Sequence[str], max_length: int) -> dict[str, torch.Tensor]:
        return self.tokenizer(
            list(sentences), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )

    def encode(
        self,
        sentences: Sequence[str],
        batch_size: int = 128,
        max_length: int = 512,
        device: torch.device | str | None = None,
        progress: bool = False,
        max_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> torch.Tensor:
        """Evaluation embeddings [len(sentences), d] in float32 on the CPU.

        The sentences are tokenized once and each distinct token sequence is encoded once, in
        batches of at most ``batch_size`` sequences and ``max_tokens`` token positions. A batch
        holds sequences of one length (``_length_batches``; only a length distribution's long
        tail shares padded batches): no padding, no attention mask, and the padding-free
        forward needs no index bookkeeping. The embeddings stay on ``device`` until one copy
        at the end (no synchronisation per batch). The model is in eval mode for the call, and
        no autograd graph is built; on a CPU the padding-free forward then runs its linear layers
        through oneDNN (``packed.fast_inference``).
        """
        # no_grad, not inference_mode: tensors made under inference_mode (ZeRO-3's gathered
        # parameters, a model's lazily built caches) would reach the next training step's
        # autograd, which refuses them.
        with torch.no_grad():
            return self._encode(sentences, batch_size, max_length, device, progress, max_tokens)

    def _encode(self, sentences: Sequence[str], batch_size: int, max_length: int,
                device: torch.device | str | None, progress: bool, max_tokens: int) -> torch.Tensor:
        was_training = self.training
        self.eval()
        device = torch.device(device) if device is not None else next(self.parameters()).device
        unique = list(dict.fromkeys(sentences))
        ids = self.tokenizer(unique, truncation=True, max_length=max_length)["input_ids"] if unique else []
        rows: dict[tuple[int, ...], int] = {}
        row_of_unique = [rows.setdefault(tuple(seq), len(rows)) for seq in ids]
        seqs = list(rows)
        out = torch.empty(len(seqs), self.backbone.config.hidden_size, device=device)
        batches = _length_batches([len(s) for s in seqs], batch_size, max_tokens)
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc="encode", unit="batch")
        try:
            for idx in batches:
                emb = self._encode_batch([seqs[i] for i in idx], device)
                out[torch.tensor(idx).to(device, non_blocking=True)] = emb.float()
        finally:
            self.train(was_training)
        position = {s: row_of_unique[i] for i, s in enumerate(unique)}
        return out.cpu()[[position[s] for s in sentences]]

    def _encode_batch(self, seqs: list[tuple[int, ...]], device: torch.device) -> torch.Tensor:
        """Embeddings of token sequences: a dense batch when they have one length, else padded
        on the tokenizer's padding side."""
        longest = max(len(s) for s in seqs)
        if all(len(s) == longest for s in seqs):
            ids = torch.tensor(seqs).to(device, non_blocking=True)
            packing = _DensePacking(len(seqs), longest, device) if self.packed else None
            return self(ids, torch.ones_like(ids), packing=packing)
        ids = torch.full((len(seqs), longest), self.tokenizer.pad_token_id)
        mask = torch.zeros_like(ids)
        left = self.tokenizer.padding_side == "left"
        for row, seq in enumerate(seqs):
            cols = slice(longest - len(seq), longest) if left else slice(0, len(seq))
            ids[row, cols], mask[row, cols] = torch.tensor(seq), 1
        return self(ids.to(device, non_blocking=True), mask.to(device, non_blocking=True),
                    packing=self.packing_for(mask, device))

    def save_pretrained(self, out_dir: str | os.PathLike, state_dict: dict | None = None,
                        max_seq_length: int | None = None, card: dict | None = None) -> None:
        """Write a folder loadable by transformers.AutoModel and SentenceTransformer, with a
        README.md model card.

        ``state_dict`` (of this Encoder) lets a ZeRO-3 run pass consolidated weights.
        ``max_seq_length``: where SentenceTransformer (and the saved tokenizer) cut inputs, the
        run's max_seq_length; None: the model's limit (``st_modules.model_max_length``).
        ``card``: the training run's facts for the model card (``hncse_dist.model_card``).
        """
        from .model_card import check

        check(card)  # a bad card fails before anything is written
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        if state_dict is None:
            state_dict = {k: v.detach().cpu() for k, v in self.state_dict().items()}
        backbone_sd = {k[len("backbone."):]: v for k, v in state_dict.items() if k.startswith("backbone.")}
        save_kwargs = {"state_dict": backbone_sd}
        if "save_original_format" in inspect.signature(self.backbone.save_pretrained).parameters:
            # transformers 5 may "revert" canonical names (LayerNorm.weight -> gamma) on save;
            # keep the names every loader understands.
            save_kwargs["save_original_format"] = False
        from transformers.utils import logging as hf_logging

        bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a "Writing model shards" bar per export is noise in run logs
        try:
            self.backbone.save_pretrained(out, **save_kwargs)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
        self._finish_folder(out, state_dict, max_seq_length, card)

    def save_beside_weights(self, out_dir: str | os.PathLike, head_state: dict, max_seq_length: int | None = None,
                            card: dict | None = None) -> None:
        """``save_pretrained``'s folder around the model.safetensors that the caller has written
        (an export that streams the weights): config.json as transformers writes it with the
        weights, and the companion files. ``head_state``: the ``head.`` entries of the state dict."""
        import copy

        from .model_card import check

        check(card)
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        config = copy.deepcopy(self.backbone.config)
        config.architectures = [type(self.backbone).__name__]  # what the model's save_pretrained records
        config.save_pretrained(out)
        self._finish_folder(out, head_state, max_seq_length, card)

    def _finish_folder(self, out: Path, state_dict: dict, max_seq_length: int | None, card: dict | None) -> None:
        # SentenceTransformer's Transformer hands on the hidden layers where the pooler reads them
        hidden_states = needs_hidden_states(self.pooler)
        if hidden_states or getattr(self.backbone.config, "output_hidden_states", False):
            patch_json(out / "config.json", output_hidden_states=hidden_states)
        self.save_companion_files(out, state_dict, max_seq_length, card)

    def save_companion_files(self, out_dir: str | os.PathLike, state_dict: dict, max_seq_length: int | None = None,
                             card: dict | None = None, st_library: bool = True) -> None:
        """What ``save_pretrained`` writes beside the backbone: tokenizer, pooler record, head,
        SentenceTransformer modules and model card (a LoRA adapter folder has these and no
        backbone: its base model supplies the weights). ``st_library``: re-save the
        SentenceTransformer files through the installed library (``st_modules``)."""
        from .model_card import check

        card = check(card)
        out = Path(out_dir)
        self.tokenizer.save_pretrained(out)
        max_seq_length = max_seq_length or model_max_length(self.backbone, self.tokenizer)
        # transformers 5 does not write a padding side set after loading (families.prepare_tokenizer)
        patch_json(out / "tokenizer_config.json", model_max_length=max_seq_length,
                   padding_side=self.tokenizer.padding_side)
        head_sd = {k[len("head."):]: v for k, v in state_dict.items() if k.startswith("head.")}
        if head_sd:
            torch.save(head_sd, out / HEAD_FILE)
        (out / ENCODER_CONFIG_FILE).write_text(
            json.dumps({"pooler": self.pooler, "mlp_only_train": self.mlp_only_train}, indent=2)
        )
        write_sentence_transformers_files(out, self.pooler, self.backbone.config, max_seq_length,
                                          head_sd if not self.mlp_only_train else None, card, st_library)


def write_sentence_transformers_files(out: Path, pooler: str, config, max_seq_length: int,
                                      head_sd: dict | None, card: dict | None = None,
                                      use_library: bool = True) -> None:
    """modules.json and the modules of ``pooler`` (+ the Dense head when evaluation uses it)
    for SentenceTransformer(path), and the README.md model card (``hncse_dist.st_modules``)."""
    from . import model_card

    layout = st_layout(pooler, config.hidden_size, config.num_hidden_layers, max_seq_length, head_sd or None)
    st_write(out, layout, use_library=use_library)
    (out / "README.md").write_text(model_card.render(
        card, pooler=pooler, hidden=config.hidden_size, max_seq_length=max_seq_length,
        layout=[m.kind for m in layout], name_or_path=getattr(config, "_name_or_path", "") or str(out),
        head_used=bool(head_sd)))
