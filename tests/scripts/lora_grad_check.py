"""Run under torchrun: the LoRA adapters' (and the head's) gradients of a 2-rank DDP step equal
one process's gradients on the whole global batch.

A tiny BERT with adapters (random B, so every adapter matrix has a gradient) and dropout 0 (the
views are then deterministic and the single-process reference sees the very same forward), the
SimCSE loss gathered across ranks, DDP's gradient averaging over gloo. Rank 0 writes the largest
relative error per tensor.
"""

import sys

import torch
import torch.distributed as dist

from hncse_dist.encoder import Encoder
from hncse_dist.lora import LoraSettings
from hncse_dist.objective import HncseLoss, ObjectiveConfig
from tests.fixtures import write_corpus
from script_report import finish


def build(path):
    torch.manual_seed(0)
    enc = Encoder.from_pretrained(path, "cls", dropout=0.0, lora=LoraSettings(r=4, alpha=8.0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return enc.train()


def simcse_loss(model, enc, sentences, gather=True):
    """SimCSE loss of ``sentences`` encoded twice in one forward by ``model`` (``enc`` or its DDP wrapper)."""
    feats = enc.tokenize(sentences, 32)
    z1, z2 = model(feats["input_ids"].repeat(2, 1), feats["attention_mask"].repeat(2, 1)).float().chunk(2)
    return HncseLoss(ObjectiveConfig(objective="simcse"), gather=gather)(z1, z2, None).loss


def main():
    model_path, out_path, corpus_path = sys.argv[1], sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    n_local = 4
    sentences = open(write_corpus(corpus_path + f".{rank}", n_local * world)).read().splitlines()
    enc = build(model_path)
    ddp = torch.nn.parallel.DistributedDataParallel(enc)
    mine = sentences[rank * n_local:(rank + 1) * n_local]
    simcse_loss(ddp, enc, mine).backward()  # gathers the other rank's candidates; DDP averages the gradients
    got = {n: p.grad.clone() for n, p in enc.named_parameters() if p.requires_grad}
    frozen_grads = [n for n, p in enc.named_parameters() if not p.requires_grad and p.grad is not None]
    report = None
    if rank == 0:
        ref = build(model_path)
        simcse_loss(ref, ref, sentences, gather=False).backward()
        want = {n: p.grad for n, p in ref.named_parameters() if p.requires_grad}
        errors = {n: float((got[n] - want[n]).abs().max() / want[n].abs().max().clamp_min(1e-12)) for n in want}
        report = {"world": world, "names": sorted(want), "max_rel_err": errors,
                  "grad_norms": {n: float(want[n].norm()) for n in want}, "frozen_with_grad": frozen_grads}
    finish(report, out_path)


if __name__ == "__main__":
    main()
