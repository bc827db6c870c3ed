"""One encoder pass for many tasks: unique sentences -> embedding rows."""

from __future__ import annotations

from typing import Iterable, Protocol, Sequence

import numpy as np


class SupportsEncode(Protocol):
    """What the evaluators need from a model (``hncse_dist.encoder.Encoder`` has it)."""

    def encode(self, sentences: Sequence[str], batch_size: int = ..., max_length: int = ...,
               progress: bool = ...):  # -> torch.Tensor | np.ndarray [n, d]; may take max_tokens=
        ...


class EmbeddingTable:
    """Maps sentence text to its embedding; each distinct sentence is stored once."""

    def __init__(self, sentences: Sequence[str], vectors: np.ndarray):
        if len(sentences) != len(vectors):
            raise ValueError(f"{len(sentences)} sentences but {len(vectors)} vectors")
        self.index = {s: i for i, s in enumerate(sentences)}
        self.vectors = np.asarray(vectors)

    @classmethod
    def encode(
        cls,
        encoder: SupportsEncode,
        sentences: Iterable[str],
        batch_size: int = 128,
        max_length: int = 512,
        progress: bool = False,
        max_tokens: int | None = None,
    ) -> "EmbeddingTable":
        """Encode the distinct sentences in a single ``encoder.encode`` call (``max_tokens``:
        token positions per batch, passed on when given; None: the encoder's default)."""
        unique = list(dict.fromkeys(sentences))
        extra = {} if max_tokens is None else {"max_tokens": max_tokens}
        vectors = encoder.encode(unique, batch_size=batch_size, max_length=max_length, progress=progress, **extra)
        if hasattr(vectors, "numpy"):
            vectors = vectors.detach().cpu().float().numpy()
        return cls(unique, vectors)

    def __len__(self) -> int:
        return len(self.index)

    def __call__(self, sentences: Sequence[str]) -> np.ndarray:
        return self.vectors[[self.index[s] for s in sentences]]
