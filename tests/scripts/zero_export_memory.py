"""Run under torchrun: one DeepSpeed run's export, either the whole fp32 state dict gathered on
the main process and then written (``whole``: ``master_state_dict`` + ``write_export``) or
streamed (``streamed``: ``stream_export``), measured by the main process's peak RSS growth
(VmHWM after resetting it). The run's first export: freed memory of an earlier one would
serve part of the next from the heap and hide it.

argv: model folder, ZeRO config, mixed precision, mode, output folder.
"""

import json
import sys
from pathlib import Path

import torch

from tests.fixtures import reset_peak_rss, status_mb


def main():
    model, ds_config, precision, mode, out = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4], Path(sys.argv[5])
    from hncse_dist.config import TrainConfig
    from hncse_dist.encoder import Encoder
    from hncse_dist.export import master_state_dict, stream_export, streamable, write_export
    from hncse_dist.hostmem import set_mmap_threshold
    from hncse_dist.st_modules import set_resave_in_child
    from hncse_dist.train import make_accelerator

    set_mmap_threshold(1)  # as the trainer does under DeepSpeed
    set_resave_in_child(True)
    cfg = TrainConfig(model_name_or_path=model, deepspeed=ds_config, mixed_precision=precision)
    acc = make_accelerator(cfg)
    enc = Encoder.from_pretrained(model, "avg")
    optimizer = torch.optim.AdamW(enc.parameters(), lr=1e-3)
    enc, optimizer = acc.prepare(enc, optimizer)
    card = {"config": {"max_seq_length": 40}}

    def export(folder: Path) -> None:
        if mode == "streamed":
            stream_export(acc, enc, folder, card=card)
            return
        state = master_state_dict(acc, enc, merge_lora=False)
        if acc.is_main_process:
            write_export(acc.unwrap_model(enc), folder, state, card=card)
        del state
        acc.wait_for_everyone()

    acc.wait_for_everyone()
    base = reset_peak_rss()
    export(out / mode)
    record = {"grew_mb": status_mb("VmHWM") - base, "streamable": streamable(acc, enc)}
    (out / f"{mode}-rank{acc.process_index}.json").write_text(json.dumps(record))
    acc.wait_for_everyone()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
