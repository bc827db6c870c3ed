"""hncse-dist command line: train, eval, shards, export, report."""

from __future__ import annotations

import argparse
import os
import sys

TRAIN_HELP = """\
Train a sentence encoder with SimCSE / HNCSE.

  hncse-dist train --config configs/quickstart.yaml
  hncse-dist train --config configs/quickstart.yaml objective=simcse max_steps=100
  hncse-dist train --config configs/quickstart.yaml --nproc-per-node 2      # 2 local processes
  hncse-dist train --config configs/bert-base-unsup.yaml deepspeed=ds_configs/zero2.json
  hncse-dist train --config configs/quickstart.yaml resume=latest           # continue a run

Any config key can be overridden as key=value (YAML syntax: 1e-5, true, null).
Objectives: simcse | pm (positive mixing) | hnm (hard negative mixing) | hncse (both).
Every key with its default and meaning, as a YAML config: hncse-dist train --help-config > my.yaml
Signals: SIGTERM / SIGUSR1 (Slurm's warnings) and Ctrl-C checkpoint at the end of the current
step, then exit; a second Ctrl-C exits at once. With --nproc-per-node they are forwarded to
every rank, and the ranks die with the launcher.
Exit codes: 0 done, 1 failed (the loss stayed non-finite, an evaluation failed: checkpointed
first, or a checkpoint could not be written: the previous one is kept), 2 bad configuration,
75 checkpointed after SIGTERM/SIGUSR1 (requeue), 130 checkpointed after Ctrl-C.
"""


def _train(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="hncse-dist train", description=TRAIN_HELP, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", help="YAML config file (keys as in --help-config)")
    parser.add_argument("--nproc-per-node", type=int, default=0,
                        help="start N local processes, one per rank (CPU: gloo, GPU: one per device)")
    parser.add_argument("--help-config", action="store_true",
                        help="print every config key with its default and meaning, as a YAML config to start from")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    # Overrides may stand before, between and after the options.
    args = parser.parse_intermixed_args(argv)
    from .config import ConfigError, config_template, load_config, startup_checks

    if args.help_config:
        print(config_template(), end="")
        return 0
    try:
        cfg = load_config(args.config, args.overrides).validate()
        relaunch = args.nproc_per_node > 1 and "WORLD_SIZE" not in os.environ
        if relaunch:  # once here, not once per started process
            startup_checks(cfg, world_size=args.nproc_per_node)
    except ConfigError as err:
        print(f"hncse-dist train: error: {err}", file=sys.stderr)
        return 2
    if relaunch:
        from .encoder import ModelSetupError, check_model_setup
        from .launcher import launch

        try:  # one error line from the launcher, not one per process
            from .lora import LoraSettings

            check_model_setup(cfg.model_name_or_path, cfg.pooler, cfg.dropout, cfg.append_eos, cfg.padding_side,
                              lora=LoraSettings.from_config(cfg))
        except ModelSetupError as err:
            print(f"hncse-dist train: error: {err}", file=sys.stderr)
            return 2
        except (OSError, ValueError):
            pass  # e.g. a hub name offline: every process reports it with its context
        return launch(args.nproc_per_node, argv)
    code = _run_training(cfg)
    if cfg.deepspeed or _distributed_initialized():
        # A rank that leaves with its process group (gloo, DeepSpeed's CPU communication) still
        # up can abort in the interpreter's teardown ("terminate called without an active
        # exception", SIGABRT), turning exit 0 or 2 into 134: what the rank had to say is said
        # and written, so it leaves without the teardown.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _distributed_initialized() -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized()


def _run_training(cfg) -> int:
    """train(cfg), with each way it can end as an exit code and (at most) one line."""
    from .checkpoint import CheckpointWriteError
    from .config import ConfigError
    from .data.tario import ShardError
    from .train import EvalFailed, TrainingDiverged, train

    try:
        return train(cfg)
    except ConfigError as err:
        print(f"hncse-dist train: error: {err}", file=sys.stderr)
        return 2
    except TrainingDiverged as err:  # a joint decision: every rank stops here; rank 0 reports
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"hncse-dist train: error: {err}", file=sys.stderr)
        return 1
    except ShardError as err:  # a shard failed while training (after its retries): one line, exit 1
        print(f"hncse-dist train: error: {err}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C while the first one's checkpoint was pending
        print("hncse-dist train: interrupted", file=sys.stderr)
        return 130
    except EvalFailed as err:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"hncse-dist train: error: {err}", file=sys.stderr)
        return 1
    except CheckpointWriteError as err:  # raised on every rank together; the previous checkpoint is kept
        print(f"hncse-dist train: error: {err}", file=sys.stderr)
        return 1


def _export(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="hncse-dist export",
        description="Write a checkpoint or model folder as a transformers.AutoModel + SentenceTransformer folder.",
    )
    parser.add_argument("source", help="a model folder, or a checkpoint folder (runs/x/checkpoints/step-...)")
    parser.add_argument("output", help="destination folder")
    parser.add_argument("--pooler", default=None, help="override the pooler recorded with the model")
    args = parser.parse_args(argv)
    from .export import export_any

    try:
        export_any(args.source, args.output, pooler=args.pooler)
    except (FileNotFoundError, ValueError) as err:
        print(f"hncse-dist export: error: {err}", file=sys.stderr)
        return 2
    print(f"exported to {args.output}")
    return 0


COMMANDS = {
    "train": ("train an encoder (SimCSE / PM / HNM / HNCSE)", _train),
    "eval": ("STS suite and SentEval transfer tasks", lambda a: _lazy("hncse_dist.eval.run", "eval_main", a)),
    "shards": ("write WebDataset tar shards from text / jsonl / csv / datasets",
               lambda a: _lazy("hncse_dist.data.shards", "shards_main", a)),
    "export": ("checkpoint or model -> HF + sentence-transformers folder", _export),
    "report": ("table + plot of scaling runs", lambda a: _lazy("hncse_dist.report", "report_main", a)),
}


def _lazy(module: str, func: str, argv: list[str]) -> int:
    import importlib

    return getattr(importlib.import_module(module), func)(argv)


def _quiet_deepspeed_probe() -> None:
    """DeepSpeed warns "Setting accelerator to CPU" whenever it is imported on a machine without
    a GPU, DeepSpeed in use or not; naming the accelerator it would pick anyway keeps logs clean."""
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


# bf16 matmuls on CPU go through ideep (PyTorch's oneDNN wrapper), which keeps an LRU cache of
# prepared matmuls (LRU_CACHE_CAPACITY, 1024 by default), over oneDNN's own cache of compiled
# kernels (ONEDNN_PRIMITIVE_CACHE_CAPACITY, 1024). Both key on the shape, and the padding-free
# forward packs a different number of tokens every step, so nearly every step adds entries that
# are never hit again: a MiniLM run grew by about 1 GB over 900 steps. Caches of 64 and 32 hold
# more than the ~18 shapes of one forward and backward (all layers share them), so a step still
# reuses its kernels, and they are full after a few steps (bench/memory_long.py, BENCHMARKS.md);
# caches of 8 are flat too but recompile within every step. GPU runs use neither cache.
CPU_CACHE_DEFAULTS = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64", "LRU_CACHE_CAPACITY": "32"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    for name, value in CPU_CACHE_DEFAULTS.items():  # before torch loads oneDNN
        os.environ.setdefault(name, value)
    if argv and argv[0] in ("train", "eval", "export"):
        _quiet_deepspeed_probe()
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        print("usage: hncse-dist COMMAND [args]  (hncse-dist COMMAND --help for more)\n")
        for name, (desc, _) in COMMANDS.items():
            print(f"  {name:8s} {desc}")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nhncse-dist: error: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    return COMMANDS[argv[0]][1](argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
