"""NegativeBank: a FIFO of the detached positives of the last B global minibatches.

Every rank pushes the same all-gathered tensor (the global batch's z2 and sentence keys, which
``hncse_loss`` gathers anyway and hands back), so the bank is identical everywhere without any
broadcast or extra communication; it is saved in (and restored from) the checkpoint.
"""

from __future__ import annotations

import torch

_HASH_MOD = (1 << 61) - 1


def sentence_keys(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """int64 hash of each row's tokens (padding ignored): equal sentences, equal keys."""
    ids = (input_ids.long() + 1) * attention_mask.long()
    pos = torch.arange(ids.shape[1], device=ids.device, dtype=torch.long)
    # Two multiplicative mixes keep collisions negligible for the bank's few thousand rows.
    mult = (pos * 1_000_003 + 7_919) % 2_147_483_647
    h1 = (ids * mult).sum(1) % _HASH_MOD
    h2 = (ids * ((pos + 1) ** 2 % 65_521)).sum(1)
    return h1 * 65_537 + h2


class NegativeBank:
    """Ring buffer of ``batches`` global minibatches of embeddings (and their sentence keys)."""

    def __init__(self, batches: int):
        if batches < 0:
            raise ValueError(f"bank size must be >= 0 minibatches, got {batches}")
        self.batches = batches
        self.embeddings: torch.Tensor | None = None  # [batches * rows, d]
        self.keys: torch.Tensor | None = None
        self.rows = 0  # rows per global minibatch
        self.filled = 0  # minibatches held
        self.next = 0  # slot the next push overwrites

    def __len__(self) -> int:
        return self.filled * self.rows

    @property
    def fill_fraction(self) -> float:
        return self.filled / self.batches if self.batches else 0.0

    @torch.no_grad()
    def push(self, z: torch.Tensor, keys: torch.Tensor) -> None:
        if self.batches == 0:
            return
        z = z.detach()
        if self.embeddings is None:
            self.rows = z.shape[0]
            self.embeddings = z.new_zeros((self.batches * self.rows, z.shape[1]))
            self.keys = torch.zeros(self.batches * self.rows, dtype=torch.long, device=z.device)
        if z.shape[0] != self.rows:
            raise ValueError(f"bank holds minibatches of {self.rows} rows, got {z.shape[0]}")
        sl = slice(self.next * self.rows, (self.next + 1) * self.rows)
        self.embeddings[sl] = z.to(self.embeddings.dtype)
        self.keys[sl] = keys.to(self.keys.device)
        self.next = (self.next + 1) % self.batches
        self.filled = min(self.filled + 1, self.batches)

    def contents(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(embeddings, keys) currently held (a view, no copy), or (None, None) when empty."""
        if self.filled == 0:
            return None, None
        used = self.filled * self.rows
        return self.embeddings[:used], self.keys[:used]

    def state_dict(self) -> dict:
        return {"batches": self.batches, "rows": self.rows, "filled": self.filled, "next": self.next,
                "embeddings": None if self.embeddings is None else self.embeddings.cpu().clone(),
                "keys": None if self.keys is None else self.keys.cpu().clone()}

    def load_state_dict(self, state: dict, device: torch.device | str | None = None) -> None:
        if state["batches"] != self.batches:
            raise ValueError(
                f"checkpoint bank holds {state['batches']} minibatches, config says {self.batches}: "
                f"set bank_size={state['batches']} to resume"
            )
        self.rows, self.filled, self.next = state["rows"], state["filled"], state["next"]
        self.embeddings = None if state["embeddings"] is None else state["embeddings"].to(device or "cpu")
        self.keys = None if state["keys"] is None else state["keys"].to(device or "cpu")


class HardNegatives:
    """The negative bank and the generator of hard-negative mixing's random draws: the state
    HNM carries from step to step, saved and restored as one unit.

    ``read_after``: optimizer steps before the bank is read (it fills from the start)."""

    def __init__(self, batches: int, device: torch.device | str, seed: int, read_after: int = 0):
        self.bank = NegativeBank(batches)
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.read_after = read_after

    @property
    def active(self) -> bool:
        return self.bank.batches > 0

    def readable(self, step: int) -> bool:
        return step >= self.read_after

    def push(self, z: torch.Tensor, keys: torch.Tensor) -> None:
        self.bank.push(z, keys)

    def state_dict(self) -> dict:
        return {"bank": self.bank.state_dict(), "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.bank.load_state_dict(state["bank"], device=self.device)
        self.generator.set_state(state["generator"])
