"""Tiny random-init models of several architecture families, with tokenizers trained offline
on the packaged Wikipedia sample (never the hub).

Decoder tokenizers mimic the released ones: bos/eos/unk and NO pad token; the Llama/Mistral
style adds BOS and no EOS, the Qwen2 style adds neither.
"""

from __future__ import annotations

from pathlib import Path

WIKI = Path(__file__).resolve().parents[1] / "hncse_dist" / "resources" / "wiki_sample.txt"
DECODERS = ("llama", "mistral", "qwen2")
ENCODERS = ("bert", "roberta", "xlm-roberta", "deberta-v2", "modernbert")
HIDDEN, LAYERS = 64, 2


def train_tokenizer(specials: list[str], bos: str | None, n_lines: int = 400, vocab_size: int = 800):
    """A lower-cased BPE tokenizer on the first ``n_lines`` of the wiki sample; ``bos``: the
    token its post-processor puts in front of every sequence (None: nothing added)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

    lines = WIKI.read_text().splitlines()[:n_lines]
    tok = Tokenizer(models.BPE(unk_token="<unk>" if "<unk>" in specials else None))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials))
    if bos is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def decoder_tokenizer(style: str = "llama", eos: bool = True, unk: bool = True):
    """PreTrainedTokenizerFast with bos (+ eos, unk) and no pad token."""
    from transformers import PreTrainedTokenizerFast

    specials = (["<unk>"] if unk else []) + ["<s>"] + (["</s>"] if eos else [])
    tok = train_tokenizer(specials, bos="<s>" if style in ("llama", "mistral") else None)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>" if eos else None,
                                   unk_token="<unk>" if unk else None)


def encoder_tokenizer():
    """RoBERTa-style: <s> $A </s>, with a pad and a mask token."""
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    tok = train_tokenizer(["<s>", "<pad>", "</s>", "<unk>", "<mask>"], bos=None)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", cls_token="<s>", sep_token="</s>", mask_token="<mask>")


def decoder_config(kind: str, vocab_size: int, **extra):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}[kind]
    return cls(vocab_size=vocab_size, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
               num_key_value_heads=2, intermediate_size=2 * HIDDEN, max_position_embeddings=128, **extra)


def encoder_config(kind: str, tok, **extra):
    from transformers import (BertConfig, DebertaV2Config, ModernBertConfig, RobertaConfig,
                              XLMRobertaConfig)

    common = dict(vocab_size=len(tok), hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=2,
                  intermediate_size=2 * HIDDEN, max_position_embeddings=128, pad_token_id=tok.pad_token_id)
    if kind == "modernbert":
        return ModernBertConfig(**common, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                cls_token_id=tok.cls_token_id, sep_token_id=tok.sep_token_id, **extra)
    if kind == "deberta-v2":
        return DebertaV2Config(**common, relative_attention=True, position_buckets=32,
                               pos_att_type=["p2c", "c2p"], **extra)
    cls = {"bert": BertConfig, "roberta": RobertaConfig, "xlm-roberta": XLMRobertaConfig}[kind]
    return cls(**common, **extra)


def build_model(kind: str, out_dir: str | Path, seed: int = 0, tokenizer=None, **extra) -> str:
    """Save a tiny random ``kind`` model and its tokenizer to ``out_dir``; returns the folder."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    out = Path(out_dir)
    if (out / "config.json").is_file():
        return str(out)
    if kind == "bert":
        from tests.fixtures import MINILM

        tok = tokenizer or AutoTokenizer.from_pretrained(MINILM)
    elif kind in DECODERS:
        tok = tokenizer or decoder_tokenizer(kind)
    else:
        tok = tokenizer or encoder_tokenizer()
    if kind in DECODERS:
        cfg = decoder_config(kind, len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, **extra)
    else:
        cfg = encoder_config(kind, tok, **extra)
    torch.manual_seed(seed)
    AutoModel.from_config(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)
