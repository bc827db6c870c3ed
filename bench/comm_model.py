"""Analytic communication / bank cost model of the product's data-parallel HNCSE step (no GPU
needed). Command, the model, its assumptions and the results: BENCHMARKS.md."""

from __future__ import annotations

import math
import sys

from common import md_table, parser, write

WORLD_SIZES = (8, 16, 32, 64, 128, 256, 512)
LINKS = {"25GBps": 25.0, "100GBps": 100.0}  # per-GPU inter-node bandwidth, GB/s
ALPHA_S = 10e-6  # per-hop latency of an inter-node collective step
ACHIEVED_TFLOPS = 100.0  # A100 bf16 achieved on the encoder's forward + backward
KERNELS_PER_LAYER, KERNEL_LAUNCH_S = 60, 5e-6  # a step is never faster than launching its kernels
FP32_MATMUL_TFLOPS, BF16_MATMUL_TFLOPS = 19.5, 312.0 * 0.6  # the objective's matmuls (fp32 unless the bank is bf16)
HBM_GBPS, GPU_MEMORY_GB = 1500.0, 80.0
SEQ_LEN, VIEWS, BANK_BATCHES, HNM_K, HNM_M = 32, 2, 16, 10, 40
KEY_BYTES, FLAG_BYTES, GRAD_BYTES = 8, 4, 4  # int64 sentence keys, the 2 flags, fp32 gradients
PER_GPU_BATCH, GLOBAL_BATCH, FREE = 64, 512, 0.05  # "free" = under 5% of the step's compute
SHAPES = {"bert-base": (768, 12, 3072), "bert-large": (1024, 24, 4096)}


def model(name: str) -> dict:
    """Parameters (what DDP all-reduces: BERT without its pooler + the cls pooler's MLP head) and
    the product's FLOPs count (metrics.FlopsModel) of a BERT shape, built on the meta device."""
    import torch
    from transformers import BertConfig, BertModel

    from hncse_dist.metrics import FlopsModel

    h, layers, ffn = SHAPES[name]
    with torch.device("meta"):
        bert = BertModel(BertConfig(hidden_size=h, num_hidden_layers=layers, intermediate_size=ffn,
                                    num_attention_heads=h // 64), add_pooling_layer=False)
    return {"name": name, "hidden": h, "layers": layers, "ffn": ffn, "flops": FlopsModel(bert),
            "params": sum(p.numel() for p in bert.parameters()) + h * h + h}


def gather_s(nbytes: float, world: int, bw: float, log: bool) -> float:
    """Ring all-gather / reduce-scatter whose whole output is ``nbytes``; ``log``: ceil(log2 W) hops."""
    return (world - 1) / world * nbytes / (bw * 1e9) + (math.ceil(math.log2(world)) if log else world - 1) * ALPHA_S


def allreduce_s(nbytes: float, world: int, bw: float, log: bool) -> float:
    return 2 * gather_s(nbytes, world, bw, log)


def kernel_s(nbytes: float, flops: float = 0.0, tflops: float = FP32_MATMUL_TFLOPS) -> float:
    return max(nbytes / (HBM_GBPS * 1e9), flops / (tflops * 1e12))  # roofline: HBM or arithmetic


def scenario(m: dict, world: int, n: int, emb_bytes: int, mode: str) -> dict:
    g, h = world * n, m["hidden"]
    sequences = VIEWS * n
    compute = max(m["flops"].step(sequences * SEQ_LEN, sequences, SEQ_LEN) / (ACHIEVED_TFLOPS * 1e12),
                  m["layers"] * KERNELS_PER_LAYER * KERNEL_LAUNCH_S)
    z = g * h * emb_bytes
    gathered = {"z2_allgather_fwd": z, "z2_reducescatter_bwd": z, "pm_mixed_allgather_fwd": z,
                "pm_mixed_reducescatter_bwd": z, "hnm_keys_allgather": g * KEY_BYTES}
    separate_push = [z, g * KEY_BYTES]  # a bank push with its own gathers (z2.detach() and keys), as before
    ddp = m["params"] * GRAD_BYTES
    row = {"model": m["name"], "world": world, "per_gpu_batch": n, "global_batch": g, "batch_mode": mode,
           "emb_dtype": "fp32" if emb_bytes == 4 else "bf16", "params": m["params"], "compute_s": compute,
           "gathered_bytes": gathered, "ddp_allreduce_bytes": ddp, "gathered_total_bytes": sum(gathered.values()),
           "gathered_wire_bytes_per_rank": (world - 1) / world * sum(gathered.values()),
           "ddp_wire_bytes_per_rank": 2 * (world - 1) / world * ddp, "separate_bank_push_bytes": sum(separate_push),
           "links": {}}
    for link, bw in LINKS.items():
        row["links"][link] = {}
        for lat in ("ring", "log"):
            log = lat == "log"
            # the two 4-byte all-reduces (non-finite skip, preemption) run as trees: log latency
            comm = (sum(gather_s(b, world, bw, log) for b in gathered.values())
                    + 2 * allreduce_s(FLAG_BYTES, world, bw, True))
            bandwidth = sum((world - 1) / world * b / (bw * 1e9) for b in gathered.values())
            row["links"][link][lat] = {
                "contrastive_comm_s": comm, "contrastive_comm_frac_of_compute": comm / compute,
                "latency_share": 1.0 - bandwidth / comm, "collectives_per_step": len(gathered) + 2,
                "ddp_allreduce_s": allreduce_s(ddp, world, bw, log),
                "separate_bank_push_s": sum(gather_s(b, world, bw, log) for b in separate_push)}
    rows, cand = BANK_BATCHES * g, BANK_BATCHES * g + g  # candidates: the bank and the current global batch
    sim_flops, sim_bytes, row_bytes = 2.0 * n * cand * h, n * cand * 4, h * emb_bytes
    rate = FP32_MATMUL_TFLOPS if emb_bytes == 4 else BF16_MATMUL_TFLOPS
    matmul = kernel_s(cand * row_bytes + sim_bytes, sim_flops, rate)
    topk = kernel_s(2 * sim_bytes + n * cand)  # masked_fill read/write + bool mask
    as_is = kernel_s(2 * cand * row_bytes) + kernel_s(3 * cand * row_bytes) + matmul + topk  # cat, normalize
    memory = (rows * row_bytes + rows * KEY_BYTES) / 1e9
    row["bank"] = {"bank_rows": rows, "candidates": cand, "similarities_per_rank": n * cand, "bank_memory_gb": memory,
                   "hnm_gflop_per_rank": 2 * sim_flops / 1e9, "hnm_as_is_s": as_is, "hnm_optimized_s": matmul + topk,
                   "as_is_frac_of_compute": as_is / compute, "optimized_frac_of_compute": (matmul + topk) / compute,
                   "memory_frac_of_gpu": memory / GPU_MEMORY_GB}
    return row


def thresholds(rows: list[dict]) -> list[dict]:
    """Per (model, batch mode, dtype): the first W where a cost stops being free (None: never in range)."""
    out = []
    for key in sorted({(r["model"], r["batch_mode"], r["emb_dtype"]) for r in rows}):
        sel = [r for r in rows if (r["model"], r["batch_mode"], r["emb_dtype"]) == key]

        def first(pred):
            return min((r["world"] for r in sel if pred(r)), default=None)

        e = dict(zip(("model", "batch_mode", "emb_dtype"), key))
        for link in LINKS:
            for lat in ("ring", "log"):
                e[f"contrastive_comm_over_5pct_{link}_{lat}"] = first(
                    lambda r: r["links"][link][lat]["contrastive_comm_frac_of_compute"] > FREE)
            e[f"contrastive_comm_over_ddp_{link}"] = first(
                lambda r: r["links"][link]["ring"]["contrastive_comm_s"] > r["links"][link]["ring"]["ddp_allreduce_s"])
        e["bank_as_is_over_5pct"] = first(lambda r: r["bank"]["as_is_frac_of_compute"] > FREE)
        e["bank_optimized_over_5pct"] = first(lambda r: r["bank"]["optimized_frac_of_compute"] > FREE)
        e["bank_memory_over_5pct_gpu"] = first(lambda r: r["bank"]["memory_frac_of_gpu"] > FREE)
        out.append(e)
    return out


def markdown(rows: list[dict], limits: list[dict]) -> str:
    def ms(x: float) -> str:
        return f"{1e3 * x:.2f}"

    def w(x) -> str:
        return str(x) if x is not None else f">{WORLD_SIZES[-1]}"

    mode = {"per_gpu_64": "per gpu 64", "global_512": "global 512"}
    out = ["### Bytes per step (output size of each collective; a ring moves (W-1)/W of it per rank)\n", md_table(
        ["model", "batch", "W", "emb", "z2 AG fwd MB", "z2 RS bwd MB", "PM z2' AG+RS MB", "keys AG KB", "total MB",
         "wire/rank MB", "DDP AR wire/rank MB (fp32 grads)"],
        [[r["model"], mode[r["batch_mode"]], r["world"], r["emb_dtype"], f"{g['z2_allgather_fwd'] / 1e6:.2f}",
          f"{g['z2_reducescatter_bwd'] / 1e6:.2f}",
          f"{(g['pm_mixed_allgather_fwd'] + g['pm_mixed_reducescatter_bwd']) / 1e6:.2f}",
          f"{g['hnm_keys_allgather'] / 1e3:.1f}", f"{r['gathered_total_bytes'] / 1e6:.2f}",
          f"{r['gathered_wire_bytes_per_rank'] / 1e6:.2f}", f"{r['ddp_wire_bytes_per_rank'] / 1e6:.0f}"]
         for r in rows for g in [r["gathered_bytes"]]])]
    for name in SHAPES:
        for key, label in mode.items():
            sel = [r for r in rows if r["model"] == name and r["batch_mode"] == key]
            out += [f"### {name} ({sel[0]['params'] / 1e6:.0f}M params), {label}\n", md_table(
                ["W", "n/GPU", "emb", "gathered MB/step (wire/rank)", "DDP AR MB (wire/rank)", "compute ms",
                 "comm ms @25 ring / log", "comm ms @100 ring / log", "comm % compute @25 / @100 (ring)",
                 "DDP AR ms @25 / @100", "bank GB", "bank sims/rank", "HNM ms as is / opt", "HNM % compute as is / opt"],
                [[r["world"], r["per_gpu_batch"], r["emb_dtype"], f"{r['gathered_wire_bytes_per_rank'] / 1e6:.1f}",
                  f"{r['ddp_wire_bytes_per_rank'] / 1e6:.0f}", f"{1e3 * r['compute_s']:.1f}",
                  *(f"{ms(L[k]['ring']['contrastive_comm_s'])} / {ms(L[k]['log']['contrastive_comm_s'])}" for k in LINKS),
                  " / ".join(f"{100 * L[k]['ring']['contrastive_comm_frac_of_compute']:.0f}%" for k in LINKS),
                  " / ".join(f"{1e3 * L[k]['ring']['ddp_allreduce_s']:.0f}" for k in LINKS),
                  f"{b['bank_memory_gb']:.2f}", f"{b['similarities_per_rank'] / 1e6:.2f}M",
                  f"{ms(b['hnm_as_is_s'])} / {ms(b['hnm_optimized_s'])}",
                  f"{100 * b['as_is_frac_of_compute']:.1f}% / {100 * b['optimized_frac_of_compute']:.1f}%"]
                 for r in sel for L, b in [(r["links"], r["bank"])]])]
    out += ["### Product fix: the bank push reuses the loss's gathered z2 and keys (2 fewer all-gathers a step)\n",
            md_table(["model", "W", "emb", "comm ms @25 separate push / now (ring)", "@25 separate / now (log)",
                      "@100 separate / now (ring)"],
                     [[r["model"], r["world"], r["emb_dtype"],
                       *(f"{ms(x['contrastive_comm_s'] + x['separate_bank_push_s'])} / {ms(x['contrastive_comm_s'])}"
                         for x in (r["links"]["25GBps"]["ring"], r["links"]["25GBps"]["log"],
                                   r["links"]["100GBps"]["ring"]))] for r in rows if r["batch_mode"] == "per_gpu_64"]),
            f"### Where it stops being free (first W over the line; '>{WORLD_SIZES[-1]}' = never in range)\n",
            md_table(["model", "batch", "emb", "comm > 5% compute @25 / @100, ring", "same, log latency",
                      "comm > DDP AR @25 / @100", "bank HNM > 5% as is / opt", "bank memory > 5% of 80 GB"],
                     [[e["model"], mode[e["batch_mode"]], e["emb_dtype"],
                       *(" / ".join(w(e[f"contrastive_comm_over_5pct_{k}_{lat}"]) for k in LINKS) for lat in ("ring", "log")),
                       " / ".join(w(e[f"contrastive_comm_over_ddp_{k}"]) for k in LINKS),
                       f"{w(e['bank_as_is_over_5pct'])} / {w(e['bank_optimized_over_5pct'])}",
                       w(e["bank_memory_over_5pct_gpu"])] for e in limits])]
    return "\n".join(out)


def main() -> int:
    args = parser(__doc__, "comm_model.json").parse_args()
    models = [model(name) for name in SHAPES]
    rows = [scenario(m, world, n, emb_bytes, mode) for m in models for mode in ("per_gpu_64", "global_512")
            for world in WORLD_SIZES for n in [PER_GPU_BATCH if mode == "per_gpu_64" else GLOBAL_BATCH // world]
            if n >= 1 for emb_bytes in (4, 2)]
    limits = thresholds(rows)
    assumptions = {k: v for k, v in globals().items() if k.isupper() and isinstance(v, (int, float, tuple, dict))}
    assumptions["models"] = [{k: m[k] for k in ("name", "hidden", "layers", "ffn", "params")} for m in models]
    assumptions["compute"] = ("max(metrics.FlopsModel.step(2n x 32 tokens) at ACHIEVED_TFLOPS, "
                              "layers x KERNELS_PER_LAYER x KERNEL_LAUNCH_S)")
    write(args.output, {"assumptions": assumptions, "rows": rows, "thresholds": limits}, markdown(rows, limits))
    return 0


if __name__ == "__main__":
    sys.exit(main())
