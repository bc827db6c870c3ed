"""Run under torchrun: under ZeRO-3 the trainer's accelerator makes Encoder.from_pretrained load
the model already partitioned (transformers' zero.Init), the cls head included, in one dtype.

argv: model folder, mixed precision (fp32 | bf16 | fp16), output json.
"""

import json
import sys

import torch


def main():
    model, precision, out_path = sys.argv[1], sys.argv[2], sys.argv[3]
    from hncse_dist.config import TrainConfig
    from hncse_dist.encoder import Encoder
    from hncse_dist.train import make_accelerator

    cfg = TrainConfig(model_name_or_path=model, deepspeed="ds_configs/zero3.json", mixed_precision=precision)
    acc = make_accelerator(cfg)
    enc = Encoder.from_pretrained(model, "cls")
    params = list(enc.parameters())
    record = {
        "rank": acc.process_index,
        "all_partitioned": all(hasattr(p, "ds_id") for p in params),
        "full_elements": sum(int(p.ds_numel) for p in params if hasattr(p, "ds_numel")),
        "held_elements": sum(int(p.ds_tensor.numel()) for p in params if hasattr(p, "ds_tensor")),
        "materialised_elements": sum(p.numel() for p in params),
        "dtypes": sorted({str(p.dtype) for p in params}),
        "head_dtypes": sorted({str(p.dtype) for p in enc.head.parameters()}),
    }
    with open(out_path.replace(".json", f"-{acc.process_index}.json"), "w") as f:
        json.dump(record, f)
    acc.wait_for_everyone()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
