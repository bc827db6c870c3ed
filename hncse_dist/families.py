"""What the trainer must know about a backbone beyond BERT: causal (decoder-only) models,
tokenizers without a pad token or a final EOS, and configs that ship without dropout.

A causal model's first token is computed before the sentence is read, so it cannot be the
sentence embedding (every sentence would get the same vector); the last real token, which
has attended to everything, is (``pooler=last``), best after an appended EOS. Unsupervised
SimCSE / HNCSE get their two views from dropout only: a model without dropout makes them
identical and the loss trivial.
"""

from __future__ import annotations

from torch import nn

APPEND_EOS = ("auto", "true", "false")
PADDING_SIDES = ("left", "right")
FIRST_TOKEN_POOLERS = ("cls", "cls_before_pooler")
# Dropout keys of heads this trainer never builds (classification, summary, pooler).
_HEAD_KEY_WORDS = ("classifier", "pooler", "summary", "cls_", "head")


class ModelSetupError(ValueError):
    """A model / tokenizer / option combination that cannot train; the message names the fix."""


def model_name(backbone: nn.Module) -> str:
    return getattr(backbone.config, "model_type", None) or type(backbone).__name__


def is_causal(backbone: nn.Module) -> bool:
    """True for decoder-only models: their attention modules declare ``is_causal`` (Llama,
    Mistral, Qwen2, GPT-2, ...) or the config says ``is_decoder``; a config that sets
    ``is_causal: false`` (a decoder converted to bidirectional attention) is taken at its word."""
    cfg = backbone.config
    if getattr(cfg, "is_causal", None) is False:
        return False
    if getattr(cfg, "is_decoder", False):
        return True
    return any(getattr(m, "is_causal", None) is True for m in backbone.modules())


def check_pooler(backbone: nn.Module, pooler: str) -> None:
    if pooler in FIRST_TOKEN_POOLERS and is_causal(backbone):
        raise ModelSetupError(
            f"pooler={pooler} pools the first token, which a causal (decoder-only) model such as "
            f"{model_name(backbone)} computes before reading the sentence (every sentence would get the "
            "same embedding): use pooler=last (or avg)"
        )


# ----------------------------------------------------------------------------- dropout


def dropout_keys(config) -> dict[str, float]:
    """The config's dropout probabilities of the backbone itself, by key, sorted by name:
    *dropout* / *dropout_prob* / *_pdrop entries, without those of task heads."""
    found = {}
    for key, value in config.to_dict().items():
        if not ("dropout" in key or key.endswith("pdrop")) or any(w in key for w in _HEAD_KEY_WORDS):
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            found[key] = float(value)
    return dict(sorted(found.items()))


def set_dropout(config, p: float) -> list[str]:
    """Set every backbone dropout key of ``config`` (before the model is built from it) to ``p``."""
    keys = list(dropout_keys(config))
    if not keys:
        raise ModelSetupError(
            f"dropout={p}: the {getattr(config, 'model_type', 'model')} config has no dropout keys "
            "(*dropout* or *_pdrop) to set: leave dropout=null"
        )
    for key in keys:
        setattr(config, key, p)
    return keys


def has_dropout(backbone: nn.Module) -> bool:
    if any(v > 0 for v in dropout_keys(backbone.config).values()):
        return True
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in backbone.modules())


def require_dropout(model: nn.Module, dropout: float | None) -> str | None:
    """Refuse (dropout unset) or warn about (dropout=0 set) a backbone without dropout, whose two
    views of a sentence are identical; None when the model has dropout. ``model``: an Encoder or
    a backbone."""
    backbone = getattr(model, "backbone", model)
    if has_dropout(backbone):
        return None
    keys = ", ".join(f"{k}={v}" for k, v in dropout_keys(backbone.config).items()) or "no dropout keys"
    what = f"{model_name(backbone)} has no dropout ({keys}): both views of a sentence are identical"
    if dropout is None:
        raise ModelSetupError(f"{what} and the unsupervised loss is trivial: set dropout=0.1")
    return f"warning: dropout={dropout}: {what}, the unsupervised loss has nothing to learn from"


# ----------------------------------------------------------------------------- tokenizer


def _usable(tokenizer, name: str, vocab_rows: int) -> bool:
    tid = getattr(tokenizer, f"{name}_token_id", None)
    return getattr(tokenizer, f"{name}_token", None) is not None and tid is not None and 0 <= tid < vocab_rows


def _set_pad_token(tokenizer, vocab_rows: int, name: str) -> str | None:
    if _usable(tokenizer, "pad", vocab_rows):
        return None
    if tokenizer.pad_token is None:
        why = "no pad token"
    else:
        why = (f"pad token {tokenizer.pad_token!r} (id {tokenizer.pad_token_id}) outside the model's "
               f"{vocab_rows}-row vocabulary")
    for special in ("eos", "unk"):
        if _usable(tokenizer, special, vocab_rows):
            token = getattr(tokenizer, f"{special}_token")
            tokenizer.pad_token = token
            return (f"tokenizer of {name} has {why}: padding with the {special.upper()} token {token!r} "
                    f"(id {tokenizer.pad_token_id}); padded positions are masked out")
    raise ModelSetupError(
        f"tokenizer of {name} has {why} and no pad, eos or unk token to pad with: add one "
        "(tokenizer.add_special_tokens({'pad_token': '<pad>'}), model.resize_token_embeddings) and save both"
    )


def _append_eos(tokenizer, name: str) -> None:
    """Make the tokenizer itself end every sequence with EOS (its post-processor), so the saved
    tokenizer does it for SentenceTransformer and every other loader too."""
    before = tokenizer("a")["input_ids"]
    if not hasattr(tokenizer, "update_post_processor"):
        raise ModelSetupError(
            f"the {type(tokenizer).__name__} tokenizer of {name} cannot be made to append EOS: "
            "set append_eos=false (the sentence's own last token is pooled)"
        )
    old_processor = tokenizer.backend_tokenizer.post_processor
    old_bos = tokenizer.add_bos_token
    adds_bos = tokenizer.bos_token_id is not None and bool(before) and before[0] == tokenizer.bos_token_id
    object.__setattr__(tokenizer, "_add_bos_token", adds_bos)  # keep what the tokenizer did
    tokenizer.add_eos_token = True  # rebuilds the post-processor: [bos] $A eos
    if tokenizer("a")["input_ids"] != before + [tokenizer.eos_token_id]:
        object.__setattr__(tokenizer, "_add_bos_token", old_bos)
        object.__setattr__(tokenizer, "_add_eos_token", False)
        tokenizer.backend_tokenizer.post_processor = old_processor
        raise ModelSetupError(
            f"the tokenizer of {name} adds special tokens that appending EOS would change: "
            "set append_eos=false (the sentence's own last token is pooled)"
        )


def prepare_tokenizer(tokenizer, backbone: nn.Module, append_eos: str = "auto",
                      padding_side: str | None = None) -> list[str]:
    """Give ``tokenizer`` what batching and pooling need, in place; returns one line per change.

    - a pad token where there is none (or it lies outside the vocabulary): EOS, else unk
      (the attention mask excludes padding, so the choice does not change embeddings);
    - ``append_eos``: auto appends EOS for causal models whose tokenizer does not, true for
      every model, false never;
    - ``padding_side``: left / right, None keeps the tokenizer's own.
    """
    if append_eos not in APPEND_EOS:
        raise ModelSetupError(f"append_eos={append_eos!r}: use auto, true or false")
    if padding_side is not None and padding_side not in PADDING_SIDES:
        raise ModelSetupError(f"padding_side={padding_side!r}: use left, right or null (the tokenizer's own)")
    name = model_name(backbone)
    vocab_rows = backbone.get_input_embeddings().num_embeddings
    notes = []
    pad_note = _set_pad_token(tokenizer, vocab_rows, name)
    if pad_note:
        notes.append(pad_note)
    if append_eos == "true" or (append_eos == "auto" and is_causal(backbone)):
        if not _usable(tokenizer, "eos", vocab_rows):
            if append_eos == "true":
                raise ModelSetupError(f"append_eos=true but the tokenizer of {name} has no EOS token: "
                                      "set append_eos=auto or false")
            notes.append(f"tokenizer of {name} has no EOS token: the sentence's own last token is pooled")
        elif tokenizer("a")["input_ids"][-1:] != [tokenizer.eos_token_id]:
            _append_eos(tokenizer, name)
            notes.append(f"tokenizer of {name} does not end sentences with EOS: {tokenizer.eos_token!r} "
                         f"appended to every sentence (append_eos={append_eos})")
    if padding_side is not None:
        tokenizer.padding_side = padding_side
    return notes
