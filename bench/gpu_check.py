"""The checks behind bench/gpu_check.sh (run it through the script): the branches of hncse-dist that
only run on a CUDA GPU; one JSON report, exit 1 when a check failed. The checks: BENCHMARKS.md.
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path

from common import WIKI_SAMPLE, cli, cpu_only, head, machine, parser, python, random_bert, write


def sentences(n: int) -> list[str]:
    return head(WIKI_SAMPLE, 10 * n)[:n]


def check_packed_forward(model: str) -> dict:
    """Padding-free forward vs the model's own (eval), dropout masks and seeds (train), bf16."""
    import torch

    from hncse_dist.encoder import Encoder

    enc = Encoder.from_pretrained(model, "avg", packed=True).cuda().eval()
    feats = enc.tokenize(sentences(32), 32)
    ids, mask = feats["input_ids"].cuda(), feats["attention_mask"].cuda()
    assert not bool(mask.all()), "the batch needs padding for the check to mean anything"
    out, grads = {}, {}
    for packed in (True, False):
        enc.packed = packed
        enc.zero_grad(set_to_none=True)
        out[packed] = enc(ids, mask)
        out[packed].pow(2).sum().backward()
        grads[packed] = torch.cat([p.grad.flatten() for p in enc.parameters() if p.grad is not None])
    enc.packed = True
    enc.train()
    torch.manual_seed(1)
    a, b = enc(ids, mask), enc(ids, mask)
    torch.manual_seed(1)
    a_again = enc(ids, mask)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = enc(ids, mask).float()
    r = {"eval_max_abs_diff_vs_model_forward": float((out[True] - out[False]).abs().max()),
         "eval_grad_max_rel_diff": float((grads[True] - grads[False]).abs().max() / grads[False].abs().max()),
         "train_views_differ": bool((a - b).abs().max() > 1e-4), "train_seed_reproduces": bool(torch.equal(a, a_again)),
         "bf16_finite": bool(torch.isfinite(bf16).all())}
    r["ok"] = (r["eval_max_abs_diff_vs_model_forward"] < 1e-4 and r["eval_grad_max_rel_diff"] < 1e-3
               and r["train_views_differ"] and r["train_seed_reproduces"] and r["bf16_finite"])
    return r


def check_pinned_copies(model: str) -> dict:
    """``Encoder.packing_for`` and pinned copies equal the tensors built on the GPU."""
    import torch

    from hncse_dist.encoder import Encoder
    from hncse_dist.packed import Packing

    enc = Encoder.from_pretrained(model, "avg", packed=True)
    feats = enc.tokenize(sentences(64), 32)
    mask, ids = feats["attention_mask"].repeat(2, 1).pin_memory(), feats["input_ids"].pin_memory()
    from_cpu, on_gpu = enc.packing_for(mask, torch.device("cuda")), Packing(mask.cuda())
    moved_ids = ids.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    fields = ("index", "lengths", "row", "starts", "key_mask")
    equal = {f: bool(torch.equal(getattr(from_cpu, f), getattr(on_gpu, f))) for f in fields}
    equal["input_ids"] = bool(torch.equal(moved_ids.cpu(), ids))
    return {"equal": equal, "on_cuda": all(getattr(from_cpu, f).is_cuda for f in fields), "ok": all(equal.values())}


def train(out: Path, model: str, *overrides: str):
    return cli("train", f"model_name_or_path={model}", f"train_file={WIKI_SAMPLE}", f"output_dir={out}",
               "batch_size=32", "max_steps=20", "log_every=1", "eval_every=0", "save_every=20", "eval_file=null",
               "num_workers=2", "progress=false", "bank_size=4", *overrides, timeout=400)


def failed(proc) -> dict:
    return {"ok": False, "exit": proc.returncode, "stderr_tail": proc.stderr[-3000:]}


def losses(out: Path) -> list[float]:
    from hncse_dist.report import read_metrics

    return [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]


def check_fp16(model: str, tmp: Path) -> dict:
    """mixed_precision=fp16: finite losses, the GradScaler in the checkpoint, weights moved."""
    from safetensors.torch import load_file

    out = tmp / "fp16"
    if (proc := train(out, model, "mixed_precision=fp16")).returncode != 0:
        return failed(proc)
    curve, scaler = losses(out), sorted(p.name for p in (out / "checkpoints" / "step-00000020").glob("scaler*"))
    init, final = load_file(f"{model}/model.safetensors"), load_file(str(out / "final" / "model.safetensors"))
    moved = max(float((final[k].float() - init[k].float()).abs().max()) for k in init if k in final)
    return {"losses": curve, "scaler_files": scaler, "max_weight_change": moved,
            "ok": all(math.isfinite(x) for x in curve) and bool(scaler) and moved > 0}


def check_zero3(model: str, tmp: Path, precision: str) -> dict:
    """ZeRO-3 on 1 GPU: final/ in fp32 and equal to ``hncse-dist export`` of the last checkpoint."""
    import torch
    from safetensors.torch import load_file

    out, exported = tmp / f"zero3-{precision}", tmp / f"zero3-{precision}-exported"
    if (proc := train(out, model, "deepspeed=ds_configs/zero3.json", f"mixed_precision={precision}",
                      "pooler=cls")).returncode != 0:
        return failed(proc)
    if (exp := cli("export", str(out / "checkpoints" / "step-00000020"), str(exported), timeout=300)).returncode != 0:
        return failed(exp)
    final, again = load_file(str(out / "final" / "model.safetensors")), load_file(str(exported / "model.safetensors"))
    curve, dtypes = losses(out), sorted({str(v.dtype) for v in final.values()})
    same = final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)
    return {"losses": curve, "final_dtypes": dtypes, "final_equals_export_of_checkpoint": same,
            "ok": all(math.isfinite(x) for x in curve) and dtypes == ["torch.float32"] and same}


def check_throughput(tmp: Path, steps: int) -> dict:
    out = tmp / "throughput.json"
    proc = python("bench/throughput.py", "--device", "cuda", "--steps", steps, "--warmup", 2, "--precision", "both",
                  "--models", "minilm,tiny", "--corpus", WIKI_SAMPLE, "--output", out, timeout=420)
    if proc.returncode != 0 or not out.is_file():
        return failed(proc)
    report = json.loads(out.read_text())
    return {"summary": report.get("summary"), "targets": report.get("targets"), "ok": True}


def main() -> int:
    p = parser(__doc__, "gpu_check.json")
    p.add_argument("--throughput-steps", type=int, default=8)
    p.add_argument("--skip", default="", help="comma list of checks to leave out")
    args = p.parse_args()
    cpu_only("cuda")  # refuses without CUDA
    import torch

    report: dict = {**machine(), "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0), "checks": {}}
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        model = random_bert(tmp / "tiny", 256, 4)
        checks = {"packed_forward_cuda": lambda: check_packed_forward(model),
                  "pinned_copies": lambda: check_pinned_copies(model),
                  "fp16_gradscaler": lambda: check_fp16(model, tmp),
                  "zero3_bf16": lambda: check_zero3(model, tmp, "bf16"),
                  "zero3_fp16": lambda: check_zero3(model, tmp, "fp16"),
                  "throughput": lambda: check_throughput(tmp, args.throughput_steps)}
        for name, check in checks.items():
            if name in args.skip.split(","):
                continue
            start = time.perf_counter()
            try:
                result = check()
            except Exception as err:  # a failed check is reported, the others still run
                result = {"ok": False, "error": f"{type(err).__name__}: {err}",
                          "traceback": traceback.format_exc()[-3000:]}
            result["seconds"] = round(time.perf_counter() - start, 1)
            report["checks"][name] = result
            print(f"gpu_check: {name}: {'ok' if result['ok'] else 'FAILED'} ({result['seconds']} s)", flush=True)
    report["ok"] = all(c["ok"] for c in report["checks"].values())
    write(args.output, report)
    print(f"gpu_check: report in {args.output}: {'all checks passed' if report['ok'] else 'SOME CHECKS FAILED'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
