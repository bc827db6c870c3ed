"""Analytic communication / bank cost model of hncse-dist's data-parallel step (no GPU needed).

Run from the repository root:

    .venv/bin/python bench/comm_model.py

Writes bench/results/comm_model.json and bench/results/comm_model.md (also printed).

What one training step of the product moves between ranks (hncse_dist.objective.hncse_loss,
hncse_dist.bank.NegativeBank, hncse_dist.train), per rank, objective = hncse:
  * z2 all-gather with gradient: forward all-gather of [n, h] from every rank, backward
    reduce-scatter of the [W*n, h] gradient (same ring bytes);
  * PM's mixed positives z2': a second all-gather + reduce-scatter of [n, h];
  * HNM duplicate masking: all-gather of the int64 sentence keys [n];
  * bank push: nothing: the loss hands its gathered z2 and keys to the bank (earlier versions
    all-gathered z2.detach() and the keys a second time for it; the last table prices that);
  * two 4-byte all-reduces (non-finite-loss skip, preemption flag), modelled as trees.
Those sit on the critical path (the loss needs z2_all; the encoder backward needs the
reduce-scattered gradient). DDP's gradient all-reduce
(2 (W-1)/W * params * grad bytes on the wire per rank, ring) is bucketed and overlaps the
backward, so it is reported separately, not added to the exposed time.

Ring all-gather / reduce-scatter of an OUTPUT of T bytes: (W-1)/W * T / bw + (W-1) * alpha;
all-reduce of S bytes: 2 (W-1)/W * S / bw + 2 (W-1) * alpha. A log2(W)-latency algorithm
(recursive doubling / NCCL trees / PAT) replaces (W-1) by ceil(log2 W) in the latency term;
both are in the JSON, the tables use ring.

Compute of the step: model FLOPs of forward + backward of n sentences x 2 views x 32 tokens,
6 * P_layers * tokens + 12 * L * s^2 * h * sequences (bench/throughput.py's formula), at a
stated achieved A100 rate (ACHIEVED_TFLOPS, bf16 autocast; about a third of the 312 TFLOP/s
peak, typical of BERT at sequence length 32), floored at the kernel-launch time (60 kernels per layer at 5 us), plus nothing for the optimizer.

Bank (hnm / hncse): B = 16 global minibatches, identical on every rank: memory B * G * h * b
(G = global batch). Per step each rank scores its n queries against C = (B + 1) * G candidates
(bank + current global batch). The product as written: torch.cat([z2_all, bank]) (copy),
F.normalize of all C rows (about 3 passes), one fp32 [n, C] matmul whose result serves the
top-k, the synthetic logits (closed form, no [n, m, h] synthetics) and the logged statistics,
masked_fill + top-k. "Optimized": bank stored already normalized at push time and scored in
place (no cat, no normalize). Each kernel costs max(bytes / HBM_BW, flops / rate).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]

WORLD_SIZES = (8, 16, 32, 64, 128, 256, 512)
LINK_GBPS = (25.0, 100.0)  # per-GPU inter-node bandwidth, GB/s
ALPHA_S = 10e-6  # per-hop latency of an inter-node collective step
ACHIEVED_TFLOPS = 100.0  # A100 bf16 achieved on the encoder's forward + backward
# A step cannot be faster than launching its kernels: about 60 kernels per layer for forward +
# backward at about 5 us each. Matters only for the tiny per-GPU batches of the global-512 runs.
KERNELS_PER_LAYER = 60
KERNEL_LAUNCH_S = 5e-6
FP32_MATMUL_TFLOPS = 19.5  # A100 fp32 without TF32 (torch's default for matmul): the objective runs in fp32
BF16_MATMUL_TFLOPS = 312.0 * 0.6
HBM_GBPS = 1500.0  # A100 80GB effective HBM bandwidth
GPU_MEMORY_GB = 80.0
SEQ_LEN = 32
VIEWS = 2
BANK_BATCHES = 16
HNM_K = 10
HNM_M = 40
KEY_BYTES = 8  # int64 sentence hashes
FLAG_BYTES = 4
PER_GPU_BATCH = 64
GLOBAL_BATCH = 512
FREE_FRACTION = 0.05  # "free" = under 5% of the step's compute time
VOCAB = 30522
MAX_POSITIONS = 512


@dataclass(frozen=True)
class Model:
    name: str
    hidden: int
    layers: int
    ffn: int

    @property
    def layer_matmul_params(self) -> int:
        return self.layers * (4 * self.hidden**2 + 2 * self.hidden * self.ffn)

    @property
    def params(self) -> int:
        """All trainable parameters DDP all-reduces: embeddings, layers (with biases and
        LayerNorms) and the SimCSE MLP head; BERT's pooler is not loaded."""
        h, f = self.hidden, self.ffn
        embeddings = (VOCAB + MAX_POSITIONS + 2) * h + 2 * h
        layer = 4 * h * h + 4 * h + 2 * h * f + f + h + 2 * 2 * h
        head = h * h + h
        return embeddings + self.layers * layer + head

    def step_seconds(self, n: int) -> float:
        return max(self.step_flops(n) / (ACHIEVED_TFLOPS * 1e12), self.layers * KERNELS_PER_LAYER * KERNEL_LAUNCH_S)

    def step_flops(self, n: int) -> float:
        sequences = VIEWS * n
        return 6.0 * self.layer_matmul_params * sequences * SEQ_LEN + 12.0 * self.layers * SEQ_LEN**2 * self.hidden * sequences


MODELS = (Model("bert-base", 768, 12, 3072), Model("bert-large", 1024, 24, 4096))


def ring_gather_s(total_bytes: float, world: int, bw_gbps: float, log_latency: bool = False) -> float:
    """All-gather (or reduce-scatter) whose full output is ``total_bytes``."""
    hops = math.ceil(math.log2(world)) if log_latency else world - 1
    return (world - 1) / world * total_bytes / (bw_gbps * 1e9) + hops * ALPHA_S


def ring_allreduce_s(total_bytes: float, world: int, bw_gbps: float, log_latency: bool = False) -> float:
    hops = 2 * math.ceil(math.log2(world)) if log_latency else 2 * (world - 1)
    return 2 * (world - 1) / world * total_bytes / (bw_gbps * 1e9) + hops * ALPHA_S


def kernel_s(bytes_moved: float, flops: float = 0.0, tflops: float = FP32_MATMUL_TFLOPS) -> float:
    """Roofline time of one kernel: bound by HBM traffic or by arithmetic."""
    return max(bytes_moved / (HBM_GBPS * 1e9), flops / (tflops * 1e12))


def collectives(n: int, world: int, hidden: int, emb_bytes: int) -> dict[str, list[float]]:
    """Per-step collectives of objective=hncse, as OUTPUT sizes in bytes, grouped by purpose."""
    g = world * n
    z = g * hidden * emb_bytes
    keys = g * KEY_BYTES
    return {
        "z2_allgather_fwd": [z],
        "z2_reducescatter_bwd": [z],
        "pm_mixed_allgather_fwd": [z],
        "pm_mixed_reducescatter_bwd": [z],
        "hnm_keys_allgather": [keys],
    }


def separate_bank_push(n: int, world: int, hidden: int, emb_bytes: int) -> list[float]:
    """What a bank push with its own gathers would add (earlier versions): z2.detach() and keys."""
    g = world * n
    return [g * hidden * emb_bytes, g * KEY_BYTES]


def bank_costs(model: Model, n: int, world: int, emb_bytes: int) -> dict[str, float]:
    """Bank memory and the per-step HNM scoring time, product as written vs optimized."""
    h, g = model.hidden, world * n
    bank_rows = BANK_BATCHES * g
    cand = bank_rows + g  # hnm_use_batch: the current global batch is scored too
    row_bytes = h * emb_bytes
    sim_flops = 2.0 * n * cand * h
    sim_bytes = n * cand * 4
    topk_bytes = 2 * sim_bytes + n * cand  # masked_fill read/write + bool mask
    matmul_rate = FP32_MATMUL_TFLOPS if emb_bytes == 4 else BF16_MATMUL_TFLOPS
    as_is = (
        kernel_s(2 * cand * row_bytes)  # torch.cat([z2_all, bank])
        + kernel_s(3 * cand * row_bytes)  # F.normalize(candidates)
        + kernel_s(cand * row_bytes + sim_bytes, sim_flops, matmul_rate)
        + kernel_s(topk_bytes)
    )
    optimized = kernel_s(cand * row_bytes + sim_bytes, sim_flops, matmul_rate) + kernel_s(topk_bytes)
    return {
        "bank_rows": bank_rows,
        "candidates": cand,
        "similarities_per_rank": n * cand,
        "bank_memory_gb": (bank_rows * row_bytes + bank_rows * KEY_BYTES) / 1e9,
        "hnm_gflop_per_rank": 2 * sim_flops / 1e9,
        "hnm_as_is_s": as_is,
        "hnm_optimized_s": optimized,
    }


def scenario(model: Model, world: int, n: int, emb_bytes: int, batch_mode: str) -> dict:
    grad_bytes = 4  # fp32 master weights: DDP reduces fp32 gradients (bf16 only with a comm hook)
    compute_s = model.step_seconds(n)
    colls = collectives(n, world, model.hidden, emb_bytes)
    out: dict = {
        "model": model.name, "world": world, "per_gpu_batch": n, "global_batch": world * n,
        "batch_mode": batch_mode, "emb_dtype": "fp32" if emb_bytes == 4 else "bf16", "params": model.params,
        "compute_s": compute_s,
        "gathered_bytes": {k: sum(v) for k, v in colls.items()},
        "ddp_allreduce_bytes": model.params * grad_bytes,
    }
    flat = [b for v in colls.values() for b in v]
    out["gathered_total_bytes"] = sum(flat)
    out["gathered_wire_bytes_per_rank"] = (world - 1) / world * sum(flat)
    out["ddp_wire_bytes_per_rank"] = 2 * (world - 1) / world * out["ddp_allreduce_bytes"]
    extra_push = separate_bank_push(n, world, model.hidden, emb_bytes)
    out["links"] = {}
    for bw in LINK_GBPS:
        row = {}
        for latency in ("ring", "log"):
            log = latency == "log"
            gathers = sum(ring_gather_s(b, world, bw, log) for b in flat)
            # 4-byte all-reduces run as trees (NCCL picks tree/LL for tiny messages): log latency.
            flags = 2 * ring_allreduce_s(FLAG_BYTES, world, bw, log_latency=True)
            bandwidth_part = sum((world - 1) / world * b / (bw * 1e9) for b in flat)
            comm = gathers + flags
            row[latency] = {
                "contrastive_comm_s": comm,
                "contrastive_comm_frac_of_compute": comm / compute_s,
                "latency_share": 1.0 - bandwidth_part / comm,
                "collectives_per_step": len(flat) + 2,
                "ddp_allreduce_s": ring_allreduce_s(out["ddp_allreduce_bytes"], world, bw, log),
                "separate_bank_push_s": sum(ring_gather_s(b, world, bw, log) for b in extra_push),
            }
        out["links"][f"{bw:g}GBps"] = row
    out["bank"] = bank_costs(model, n, world, emb_bytes)
    out["bank"]["as_is_frac_of_compute"] = out["bank"]["hnm_as_is_s"] / compute_s
    out["bank"]["optimized_frac_of_compute"] = out["bank"]["hnm_optimized_s"] / compute_s
    out["bank"]["memory_frac_of_gpu"] = out["bank"]["bank_memory_gb"] / GPU_MEMORY_GB
    out["separate_bank_push_bytes"] = sum(extra_push)
    return out


def build(world_sizes: tuple[int, ...]) -> list[dict]:
    rows = []
    for model in MODELS:
        for batch_mode in ("per_gpu_64", "global_512"):
            for world in world_sizes:
                n = PER_GPU_BATCH if batch_mode == "per_gpu_64" else GLOBAL_BATCH // world
                if n < 1:
                    continue
                for emb_bytes in (4, 2):
                    rows.append(scenario(model, world, n, emb_bytes, batch_mode))
    return rows


def first_world(rows: list[dict], pred) -> int | None:
    hits = [r["world"] for r in rows if pred(r)]
    return min(hits) if hits else None


def thresholds(rows: list[dict]) -> list[dict]:
    """For each (model, batch mode, dtype): the first W where a cost stops being "free"."""
    out = []
    keys = sorted({(r["model"], r["batch_mode"], r["emb_dtype"]) for r in rows})
    for model, mode, dtype in keys:
        sel = [r for r in rows if (r["model"], r["batch_mode"], r["emb_dtype"]) == (model, mode, dtype)]
        entry = {"model": model, "batch_mode": mode, "emb_dtype": dtype}
        for bw in LINK_GBPS:
            k = f"{bw:g}GBps"
            for lat in ("ring", "log"):
                entry[f"contrastive_comm_over_5pct_{k}_{lat}"] = first_world(
                    sel, lambda r: r["links"][k][lat]["contrastive_comm_frac_of_compute"] > FREE_FRACTION)
            entry[f"contrastive_comm_over_ddp_{k}"] = first_world(
                sel, lambda r: r["links"][k]["ring"]["contrastive_comm_s"] > r["links"][k]["ring"]["ddp_allreduce_s"])
        entry["bank_as_is_over_5pct"] = first_world(sel, lambda r: r["bank"]["as_is_frac_of_compute"] > FREE_FRACTION)
        entry["bank_optimized_over_5pct"] = first_world(
            sel, lambda r: r["bank"]["optimized_frac_of_compute"] > FREE_FRACTION)
        entry["bank_memory_over_5pct_gpu"] = first_world(sel, lambda r: r["bank"]["memory_frac_of_gpu"] > FREE_FRACTION)
        out.append(entry)
    return out


def fmt_w(w: int | None) -> str:
    return str(w) if w is not None else f">{WORLD_SIZES[-1]}"


def markdown(rows: list[dict], limits: list[dict]) -> str:
    lines = [
        f"Assumptions: A100, encoder fwd+bwd at {ACHIEVED_TFLOPS:g} TFLOP/s (bf16), objective matmuls fp32 at "
        f"{FP32_MATMUL_TFLOPS:g} TFLOP/s (bf16 bank: {BF16_MATMUL_TFLOPS:g}), HBM {HBM_GBPS:g} GB/s, "
        f"{ALPHA_S * 1e6:g} us per ring hop, objective hncse (k={HNM_K}, m={HNM_M}), bank {BANK_BATCHES} global "
        f"batches, {VIEWS} views x {SEQ_LEN} tokens. 'comm' = exposed contrastive collectives per step "
        "(z2 and PM gathers + their reduce-scatters, keys, 2 flags), ring latency. DDP all-reduce "
        "of fp32 gradients overlaps the backward and is listed for scale. Bank 'as is' = the product's "
        "current HNM scoring (one matmul, closed-form synthetic logits); 'opt' = also a pre-normalized bank "
        "scored in place (no cat, no normalize).",
        "",
    ]
    lines += [
        "### Bytes per step (output size of each collective; a ring moves (W-1)/W of it per rank)", "",
        "| model | batch | W | emb | z2 AG fwd MB | z2 RS bwd MB | PM z2' AG+RS MB | keys AG KB | "
        "total MB | wire/rank MB | DDP AR wire/rank MB (fp32 grads) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        g = r["gathered_bytes"]
        lines.append(
            f"| {r['model']} | {r['batch_mode'].replace('_', ' ')} | {r['world']} | {r['emb_dtype']} | "
            f"{g['z2_allgather_fwd'] / 1e6:.2f} | {g['z2_reducescatter_bwd'] / 1e6:.2f} | "
            f"{(g['pm_mixed_allgather_fwd'] + g['pm_mixed_reducescatter_bwd']) / 1e6:.2f} | "
            f"{g['hnm_keys_allgather'] / 1e3:.1f} | "
            f"{r['gathered_total_bytes'] / 1e6:.2f} | {r['gathered_wire_bytes_per_rank'] / 1e6:.2f} | "
            f"{r['ddp_wire_bytes_per_rank'] / 1e6:.0f} |"
        )
    lines.append("")
    for model in MODELS:
        for mode in ("per_gpu_64", "global_512"):
            sel = [r for r in rows if r["model"] == model.name and r["batch_mode"] == mode]
            if not sel:
                continue
            lines += [
                f"### {model.name} ({model.params / 1e6:.0f}M params), {mode.replace('_', ' ')}", "",
                "| W | n/GPU | emb | gathered MB/step (wire/rank) | DDP AR MB (wire/rank) | compute ms | "
                "comm ms @25 ring / log | comm ms @100 ring / log | comm % compute @25 / @100 (ring) | DDP AR ms @25 / @100 | "
                "bank GB | bank sims/rank | HNM ms as is / opt | HNM % compute as is / opt |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            ]
            for r in sel:
                l25, l100 = r["links"]["25GBps"]["ring"], r["links"]["100GBps"]["ring"]
                g25, g100 = r["links"]["25GBps"]["log"], r["links"]["100GBps"]["log"]
                b = r["bank"]
                lines.append(
                    f"| {r['world']} | {r['per_gpu_batch']} | {r['emb_dtype']} | "
                    f"{r['gathered_wire_bytes_per_rank'] / 1e6:.1f} | {r['ddp_wire_bytes_per_rank'] / 1e6:.0f} | "
                    f"{1e3 * r['compute_s']:.1f} | {1e3 * l25['contrastive_comm_s']:.2f} / "
                    f"{1e3 * g25['contrastive_comm_s']:.2f} | {1e3 * l100['contrastive_comm_s']:.2f} / "
                    f"{1e3 * g100['contrastive_comm_s']:.2f} | "
                    f"{100 * l25['contrastive_comm_frac_of_compute']:.0f}% / "
                    f"{100 * l100['contrastive_comm_frac_of_compute']:.0f}% | "
                    f"{1e3 * l25['ddp_allreduce_s']:.0f} / {1e3 * l100['ddp_allreduce_s']:.0f} | "
                    f"{b['bank_memory_gb']:.2f} | {b['similarities_per_rank'] / 1e6:.2f}M | "
                    f"{1e3 * b['hnm_as_is_s']:.2f} / {1e3 * b['hnm_optimized_s']:.2f} | "
                    f"{100 * b['as_is_frac_of_compute']:.1f}% / {100 * b['optimized_frac_of_compute']:.1f}% |"
                )
            lines.append("")
    lines += [
        "### Product fix: the bank push reuses the loss's gathered z2 and keys (2 fewer all-gathers a step)", "",
        "| model | W | emb | comm ms @25 separate push / now (ring) | @25 separate / now (log) | @100 separate / now (ring) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["batch_mode"] != "per_gpu_64":
            continue
        cells = []
        for bw, lat in (("25GBps", "ring"), ("25GBps", "log"), ("100GBps", "ring")):
            x = r["links"][bw][lat]
            cells.append(f"{1e3 * (x['contrastive_comm_s'] + x['separate_bank_push_s']):.2f} / "
                         f"{1e3 * x['contrastive_comm_s']:.2f}")
        lines.append(f"| {r['model']} | {r['world']} | {r['emb_dtype']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "### Where it stops being free (first W over the line; '>512' = never in range)", "",
        "| model | batch | emb | comm > 5% compute @25 / @100, ring | same, log latency | comm > DDP AR @25 / @100 | "
        "bank HNM > 5% as is / opt | bank memory > 5% of 80 GB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for e in limits:
        lines.append(
            f"| {e['model']} | {e['batch_mode'].replace('_', ' ')} | {e['emb_dtype']} | "
            f"{fmt_w(e['contrastive_comm_over_5pct_25GBps_ring'])} / {fmt_w(e['contrastive_comm_over_5pct_100GBps_ring'])} | "
            f"{fmt_w(e['contrastive_comm_over_5pct_25GBps_log'])} / {fmt_w(e['contrastive_comm_over_5pct_100GBps_log'])} | "
            f"{fmt_w(e['contrastive_comm_over_ddp_25GBps'])} / {fmt_w(e['contrastive_comm_over_ddp_100GBps'])} | "
            f"{fmt_w(e['bank_as_is_over_5pct'])} / {fmt_w(e['bank_optimized_over_5pct'])} | "
            f"{fmt_w(e['bank_memory_over_5pct_gpu'])} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "bench" / "results" / "comm_model.json")
    args = parser.parse_args()
    rows = build(WORLD_SIZES)
    limits = thresholds(rows)
    assumptions = {
        "link_GBps": LINK_GBPS, "alpha_s_per_hop": ALPHA_S, "achieved_tflops_bf16": ACHIEVED_TFLOPS,
        "fp32_matmul_tflops": FP32_MATMUL_TFLOPS, "bf16_matmul_tflops": BF16_MATMUL_TFLOPS, "hbm_GBps": HBM_GBPS,
        "gpu_memory_gb": GPU_MEMORY_GB, "seq_len": SEQ_LEN, "views": VIEWS, "bank_batches": BANK_BATCHES,
        "hnm_k": HNM_K, "hnm_m": HNM_M, "free_fraction": FREE_FRACTION, "ddp_grad_bytes": 4,
        "models": [asdict(m) | {"params": m.params, "layer_matmul_params": m.layer_matmul_params} for m in MODELS],
        "allgather_cost": "(W-1)/W * output_bytes / bw + hops * alpha, hops = W-1 (ring) or ceil(log2 W)",
        "allreduce_cost": "2 (W-1)/W * bytes / bw + 2 hops * alpha",
        "compute": "max(6 * L(4h^2+2hf) * 2n*32 + 12 L 32^2 h 2n FLOPs at achieved_tflops_bf16, "
                   "L * kernels_per_layer * kernel_launch_s)",
        "kernels_per_layer": KERNELS_PER_LAYER, "kernel_launch_s": KERNEL_LAUNCH_S,
    }
    result = {"assumptions": assumptions, "rows": rows, "thresholds": limits}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    table = markdown(rows, limits)
    args.output.with_suffix(".md").write_text(table, encoding="utf-8")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
