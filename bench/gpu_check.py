"""The checks behind bench/gpu_check.sh: the branches of hncse-dist that only run on a CUDA GPU.

Run through the shell script (it refuses machines without CUDA); each check records
``ok``, its numbers and its seconds in one JSON report; the exit status is 1 when any check
failed. Checks:

  packed_forward_cuda  the padding-free forward on CUDA (native dropout kernel, SDPA with
                       dropout): equals the model's own forward in eval mode (values and
                       gradients, fp32), and in training mode draws fresh dropout masks that
                       a fixed seed reproduces; bf16 autocast output is finite.
  pinned_copies        ``Encoder.packing_for`` (index bookkeeping built on the CPU, copied with
                       non_blocking) and pinned-memory batch copies equal the same tensors
                       built on the GPU.
  fp16_gradscaler      ``hncse-dist train mixed_precision=fp16`` (Accelerate's GradScaler):
                       finite losses, the scaler's state in the checkpoint, weights that moved.
  zero3_bf16 / zero3_fp16  ``hncse-dist train deepspeed=ds_configs/zero3.json`` on 1 GPU with
                       the cls pooler: final/ in fp32 and equal to ``hncse-dist export`` of the
                       last checkpoint.
  throughput           ``bench/throughput.py --device cuda`` (hncse-dist step vs
                       sentence-transformers' MNRL step), its summary copied in.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
CORPUS = REPO_ROOT / "hncse_dist" / "resources" / "wiki_sample.txt"


def tiny_bert(out: Path, hidden: int = 256, layers: int = 4) -> str:
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    from hncse_dist.encoder import resolve_model_path

    if (out / "config.json").is_file():
        return str(out)
    tok = AutoTokenizer.from_pretrained(resolve_model_path("packaged"))
    cfg = BertConfig(vocab_size=len(tok), hidden_size=hidden, num_hidden_layers=layers,
                     num_attention_heads=hidden // 64, intermediate_size=4 * hidden)
    torch.manual_seed(0)
    BertModel(cfg, add_pooling_layer=False).save_pretrained(out)
    tok.save_pretrained(out)
    return str(out)


def sentences(n: int) -> list[str]:
    return [l for l in CORPUS.read_text(encoding="utf-8").splitlines() if l.strip()][:n]


def check_packed_forward(model: str) -> dict:
    import torch

    from hncse_dist.encoder import Encoder

    enc = Encoder.from_pretrained(model, "avg", packed=True).cuda()
    feats = enc.tokenize(sentences(32), 32)
    ids, mask = feats["input_ids"].cuda(), feats["attention_mask"].cuda()
    assert not bool(mask.all()), "the batch needs padding for the check to mean anything"
    enc.eval()
    packed = enc(ids, mask)
    enc.packed = False
    padded = enc(ids, mask)
    enc.packed = True
    value_diff = float((packed - padded).abs().max())
    grads = []
    for use_packed in (True, False):
        enc.zero_grad(set_to_none=True)
        enc.packed = use_packed
        enc(ids, mask).pow(2).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in enc.parameters() if p.grad is not None]))
    enc.packed = True
    grad_diff = float((grads[0] - grads[1]).abs().max() / grads[1].abs().max())
    enc.train()
    torch.manual_seed(1)
    a = enc(ids, mask)
    b = enc(ids, mask)
    torch.manual_seed(1)
    a_again = enc(ids, mask)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = enc(ids, mask).float()
    result = {"eval_max_abs_diff_vs_model_forward": value_diff, "eval_grad_max_rel_diff": grad_diff,
              "train_views_differ": bool((a - b).abs().max() > 1e-4),
              "train_seed_reproduces": bool(torch.equal(a, a_again)),
              "bf16_finite": bool(torch.isfinite(bf16).all())}
    result["ok"] = (value_diff < 1e-4 and grad_diff < 1e-3 and result["train_views_differ"]
                    and result["train_seed_reproduces"] and result["bf16_finite"])
    return result


def check_pinned_copies(model: str) -> dict:
    import torch

    from hncse_dist.encoder import Encoder
    from hncse_dist.packed import Packing

    enc = Encoder.from_pretrained(model, "avg", packed=True)
    feats = enc.tokenize(sentences(64), 32)
    mask = feats["attention_mask"].repeat(2, 1).pin_memory()
    ids = feats["input_ids"].pin_memory()
    from_cpu = enc.packing_for(mask, torch.device("cuda"))
    on_gpu = Packing(mask.cuda())
    moved_ids = ids.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    fields = ("index", "lengths", "row", "starts", "key_mask")
    equal = {f: bool(torch.equal(getattr(from_cpu, f), getattr(on_gpu, f))) for f in fields}
    equal["input_ids"] = bool(torch.equal(moved_ids.cpu(), ids))
    return {"equal": equal, "on_cuda": all(getattr(from_cpu, f).is_cuda for f in fields), "ok": all(equal.values())}


def train_cli(out: Path, model: str, *overrides: str) -> subprocess.CompletedProcess:
    args = [sys.executable, "-m", "hncse_dist.cli", "train", f"model_name_or_path={model}",
            f"train_file={CORPUS}", f"output_dir={out}", "batch_size=32", "max_steps=20", "log_every=1",
            "eval_every=0", "save_every=20", "eval_file=null", "num_workers=2", "progress=false", "bank_size=4",
            *overrides]
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    return subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=400)


def losses(out: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


def run_failed(proc: subprocess.CompletedProcess) -> dict:
    return {"ok": False, "exit": proc.returncode, "stderr_tail": proc.stderr[-3000:]}


def check_fp16(model: str, tmp: Path) -> dict:
    import math

    from safetensors.torch import load_file

    out = tmp / "fp16"
    proc = train_cli(out, model, "mixed_precision=fp16")
    if proc.returncode != 0:
        return run_failed(proc)
    curve = losses(out)
    ckpt = out / "checkpoints" / "step-00000020"
    scaler = sorted(p.name for p in ckpt.glob("scaler*"))
    init, final = load_file(f"{model}/model.safetensors"), load_file(str(out / "final" / "model.safetensors"))
    moved = max(float((final[k].float() - init[k].float()).abs().max()) for k in init if k in final)
    return {"losses": curve, "scaler_files": scaler, "max_weight_change": moved,
            "ok": all(math.isfinite(x) for x in curve) and bool(scaler) and moved > 0}


def check_zero3(model: str, tmp: Path, precision: str) -> dict:
    import math

    import torch
    from safetensors.torch import load_file

    out = tmp / f"zero3-{precision}"
    proc = train_cli(out, model, "deepspeed=ds_configs/zero3.json", f"mixed_precision={precision}", "pooler=cls")
    if proc.returncode != 0:
        return run_failed(proc)
    exported = tmp / f"zero3-{precision}-exported"
    exp = subprocess.run([sys.executable, "-m", "hncse_dist.cli", "export", str(out / "checkpoints" / "step-00000020"),
                          str(exported)], cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
                         capture_output=True, text=True, timeout=300)
    if exp.returncode != 0:
        return run_failed(exp)
    final, again = load_file(str(out / "final" / "model.safetensors")), load_file(str(exported / "model.safetensors"))
    curve = losses(out)
    dtypes = sorted({str(v.dtype) for v in final.values()})
    same = final.keys() == again.keys() and all(torch.equal(final[k], again[k]) for k in final)
    return {"losses": curve, "final_dtypes": dtypes, "final_equals_export_of_checkpoint": same,
            "ok": all(math.isfinite(x) for x in curve) and dtypes == ["torch.float32"] and same}


def check_throughput(tmp: Path, steps: int) -> dict:
    out = tmp / "throughput.json"
    cmd = [sys.executable, str(REPO_ROOT / "bench" / "throughput.py"), "--device", "cuda", "--steps", str(steps),
           "--warmup", "2", "--precision", "both", "--models", "minilm,tiny", "--corpus", str(CORPUS),
           "--output", str(out)]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=dict(os.environ, PYTHONPATH=str(REPO_ROOT)),
                          capture_output=True, text=True, timeout=420)
    if proc.returncode != 0 or not out.is_file():
        return run_failed(proc)
    report = json.loads(out.read_text())
    return {"summary": report.get("summary"), "targets": report.get("targets"), "ok": True}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "bench" / "results" / "gpu_check.json")
    parser.add_argument("--throughput-steps", type=int, default=8)
    parser.add_argument("--skip", default="", help="comma list of checks to leave out")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False): run it on a GPU machine "
              "with the CUDA build of torch", file=sys.stderr)
        return 2
    skip = {s for s in args.skip.split(",") if s}
    report: dict = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "torch": torch.__version__,
                    "cuda": torch.version.cuda, "device": torch.cuda.get_device_name(0), "checks": {}}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = tiny_bert(tmp / "tiny")
        checks = {
            "packed_forward_cuda": lambda: check_packed_forward(model),
            "pinned_copies": lambda: check_pinned_copies(model),
            "fp16_gradscaler": lambda: check_fp16(model, tmp),
            "zero3_bf16": lambda: check_zero3(model, tmp, "bf16"),
            "zero3_fp16": lambda: check_zero3(model, tmp, "fp16"),
            "throughput": lambda: check_throughput(tmp, args.throughput_steps),
        }
        for name, check in checks.items():
            if name in skip:
                continue
            start = time.perf_counter()
            try:
                result = check()
            except Exception as err:  # a failed check is reported, the others still run
                result = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()[-3000:]}
            result["seconds"] = round(time.perf_counter() - start, 1)
            report["checks"][name] = result
            print(f"gpu_check: {name}: {'ok' if result['ok'] else 'FAILED'} ({result['seconds']} s)", flush=True)
    report["ok"] = all(c["ok"] for c in report["checks"].values())
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2, default=str))
    print(f"gpu_check: report in {args.output}: {'all checks passed' if report['ok'] else 'SOME CHECKS FAILED'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
