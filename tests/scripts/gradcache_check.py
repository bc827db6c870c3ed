"""Run under torchrun: GradCache's parameter gradients equal the uncached step's.

A tiny BERT Encoder under DDP (gloo), each rank with its own 6 sentences (12 sequences,
chunks of 5), for every objective with a negative bank holding entries, with the padding-free
forward (with and without gradient checkpointing) and the model's own forward:
  dropout off: cached == the uncached full-batch step (contrastive_step) and its loss/stats/push;
  dropout on:  cached == the same chunks encoded WITH gradient for the whole batch from the same
               RNG state (the replay is exact), and cached without the RNG replay differs.
Also with every chunk re-encoded (keep_last=False) and, dropout off, with one chunk for the
whole batch. A counting DDP comm hook checks that a cached step all-reduces each gradient
bucket once.
Rank 0 writes the worst error over ranks of every case to a JSON report.
"""

import json
import sys
from dataclasses import replace

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel as DDP

from hncse_dist.bank import NegativeBank
from hncse_dist.encoder import Encoder
from hncse_dist.gradcache import cached_contrastive_step
from hncse_dist.objective import HncseLoss, ObjectiveConfig
from hncse_dist.train import contrastive_step

SENTENCES = [
    "a cat sleeps", "the old dog runs over the green river quickly", "music", "a small bird sings in the dark tree",
    "the city", "young people read old books slowly under the light", "blue house", "a large tree",
    "the river runs under the old bridge of the city", "dogs", "a green light", "the bird writes music",
]
N_LOCAL, CHUNK = 6, 5


def build(path, dropout: bool, packed: bool, ckpt: bool) -> Encoder:
    """Dropout off: the avg pooler. A random-init BERT's [CLS] vectors are nearly parallel
    (cos 0.9999), so the cls-pooled loss gradient is a difference of almost equal terms and
    amplifies the chunk-shape-dependent fp32 rounding of the encoder to ~1e-4; mean pooling
    separates the sentences. Dropout on: the cls pooler with its MLP head (the replay is
    op-for-op identical, so no rounding is amplified)."""
    torch.manual_seed(0)  # same MLP head everywhere
    kw = {} if dropout else {"dropout": 0.0}
    enc = Encoder.from_pretrained(path, pooler="cls" if dropout else "avg", packed=packed, **kw)
    if ckpt:
        enc.enable_checkpointing()
    return enc.train()


def grads(model):
    return [p.grad.detach().clone() for p in model.parameters()]


def rel_err(a, b):
    """Worst per-tensor max|a - b| / max|b|; a tensor whose reference gradient is below 1e-6 of
    the largest is measured against that floor (the attention key biases: their exact gradient
    is 0, softmax being shift-invariant, and fp32 leaves ~1e-11 of noise)."""
    floor = 1e-6 * max(y.abs().max() for y in b)
    return max(((x - y).abs().max() / y.abs().max().clamp_min(floor)).item() for x, y in zip(a, b))


def seed_all(rank):
    torch.manual_seed(1000 + rank)
    return torch.Generator().manual_seed(77 + rank)


def chunked_with_grad(ddp, ids, mask, objective, obj_cfg, bank, gen, world):
    """The reference for dropout on: the chunks encoded with gradient, one loss, one backward
    (on the bare module; DDP's average done by hand)."""
    module = ddp.module
    v_ids, v_mask = ids.repeat(2, 1), mask.repeat(2, 1)
    emb = torch.cat([module(v_ids[s:s + CHUNK], v_mask[s:s + CHUNK]).float() for s in range(0, len(v_ids), CHUNK)])
    out = contrastive_step(lambda *a, **k: emb, ids, mask, HncseLoss(replace(obj_cfg, objective=objective)), bank, gen)
    out[0].backward()
    for p in module.parameters():
        dist.all_reduce(p.grad)
        p.grad /= world
    return out


def main():
    path, out_path = sys.argv[1], sys.argv[2]
    modes = sys.argv[3].split(",") if len(sys.argv) > 3 else ["packed", "packed+ckpt", "padded"]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tok = Encoder.from_pretrained(path).tokenizer
    feats = tok(SENTENCES[rank * N_LOCAL:(rank + 1) * N_LOCAL], padding=True, return_tensors="pt")
    ids, mask = feats["input_ids"], feats["attention_mask"]
    # A bank holding two earlier global batches, identical on every rank.
    g = torch.Generator().manual_seed(5)
    bank = NegativeBank(3)
    for _ in range(2):
        bank.push(torch.randn(world * N_LOCAL, 64, generator=g), torch.randint(0, 2**40, (world * N_LOCAL,), generator=g))
    obj_cfg = ObjectiveConfig(pm_threshold=0.3, hnm_k=4, hnm_m=6)
    report = {}
    for mode in modes:
        for dropout in (False, True):
            enc = build(path, dropout, packed=mode != "padded", ckpt=mode.endswith("ckpt"))
            ddp = DDP(enc, bucket_cap_mb=0.1)  # several gradient buckets
            calls = {"n": 0}

            def hook(state, bucket):
                state["n"] += 1
                return default_hooks.allreduce_hook(None, bucket)

            ddp.register_comm_hook(calls, hook)
            # one uncached step first: DDP rebuilds its buckets after the first backward
            contrastive_step(ddp, ids, mask, HncseLoss(replace(obj_cfg, objective="simcse")))[0].backward()
            ddp.zero_grad(set_to_none=True)
            for objective in ("simcse", "pm", "hnm", "hncse"):
                case = f"{objective}/{mode}/{'dropout' if dropout else 'no-dropout'}"
                gen = seed_all(rank)
                calls["n"] = 0
                if not dropout:
                    ref = contrastive_step(ddp, ids, mask, HncseLoss(replace(obj_cfg, objective=objective)), bank, gen,
                                           packing=enc.packing_for(mask.repeat(2, 1), "cpu"))
                    ref[0].backward()
                else:
                    ref = chunked_with_grad(ddp, ids, mask, objective, obj_cfg, bank, gen, world)
                ref_calls, ref_grads, ref_rng = calls["n"], grads(ddp), torch.get_rng_state()
                ddp.zero_grad(set_to_none=True)

                gen = seed_all(rank)
                calls["n"] = 0
                got = cached_contrastive_step(ddp, ids, mask, HncseLoss(replace(obj_cfg, objective=objective)), bank, gen, chunk_size=CHUNK,
                                              packing_for=enc.packing_for)
                got[0].backward()
                res = {
                    "grad_rel_err": rel_err(grads(ddp), ref_grads),
                    "loss_abs_err": (got[0] - ref[0]).abs().item(),
                    "stats_abs_err": max((got[4][k] - ref[4][k]).abs().item() for k in ref[4]),
                    "same_stat_keys": int(sorted(got[4]) == sorted(ref[4])),
                    "push_abs_err": (got[3][0] - ref[3][0]).abs().max().item(),
                    "push_keys_equal": int(torch.equal(got[3][1], ref[3][1])),
                    "rng_after_equal": int(torch.equal(torch.get_rng_state(), ref_rng)),
                    "allreduce_calls": calls["n"],
                    "ref_allreduce_calls": ref_calls,
                }
                ddp.zero_grad(set_to_none=True)
                # every chunk re-encoded (no graph kept); one chunk for the whole batch (nothing re-encoded)
                for tag, kw in (("no_keep", dict(chunk_size=CHUNK, keep_last=False)), ("one_chunk", dict(chunk_size=2 * N_LOCAL))):
                    if dropout and tag == "one_chunk":
                        continue  # one chunk draws the masks of the uncached forward, not of the 5-row chunks
                    gen = seed_all(rank)
                    calls["n"] = 0
                    alt = cached_contrastive_step(ddp, ids, mask, HncseLoss(replace(obj_cfg, objective=objective)), bank, gen,
                                                  packing_for=enc.packing_for, **kw)
                    alt[0].backward()
                    res[f"grad_rel_err_{tag}"] = rel_err(grads(ddp), ref_grads)
                    res[f"allreduce_calls_{tag}"] = calls["n"]
                    ddp.zero_grad(set_to_none=True)
                if dropout:
                    gen = seed_all(rank)
                    bad = cached_contrastive_step(ddp, ids, mask, HncseLoss(replace(obj_cfg, objective=objective)), bank, gen, chunk_size=CHUNK,
                                                  packing_for=enc.packing_for, replay_rng=False)
                    bad[0].backward()
                    res["no_replay_grad_rel_err"] = rel_err(grads(ddp), ref_grads)
                    ddp.zero_grad(set_to_none=True)
                # worst case over ranks (MIN for the equality flags and the no-replay error)
                for k, v in res.items():
                    t = torch.tensor([float(v)], dtype=torch.float64)
                    low = k.startswith(("same_", "push_keys", "rng_", "no_replay"))
                    dist.all_reduce(t, op=dist.ReduceOp.MIN if low else dist.ReduceOp.MAX)
                    res[k] = t.item()
                report[case] = res
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump({"world": world, "cases": report}, f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
