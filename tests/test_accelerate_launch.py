"""``accelerate launch --config_file`` with a DeepSpeed config: the launcher's DeepSpeed file
becomes the run's ``deepspeed=`` (one source of truth), and a mix the trainer cannot honour
is refused with one line."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
import torch

from hncse_dist.config import ConfigError, TrainConfig
from hncse_dist.train import adopt_launcher_deepspeed
from tests.launch import REPO, child_env, free_port

ZERO2 = str(REPO / "ds_configs" / "zero2.json")


def test_a_launcher_deepspeed_file_becomes_the_run_s(monkeypatch):
    cfg = TrainConfig()
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    assert adopt_launcher_deepspeed(cfg) is None and cfg.deepspeed is None
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", ZERO2)
    assert adopt_launcher_deepspeed(cfg) == f"DeepSpeed config from accelerate launch: deepspeed={ZERO2}"
    assert cfg.deepspeed == ZERO2
    assert adopt_launcher_deepspeed(cfg) is None  # the same file twice: nothing to say


@pytest.mark.parametrize("env, deepspeed, message", [
    ({"ACCELERATE_DEEPSPEED_CONFIG_FILE": "none", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2"}, None,
     "accelerate launch set up DeepSpeed (ZeRO stage 2) from its own config fields"),
    ({"ACCELERATE_DEEPSPEED_CONFIG_FILE": "/nonexistent/ds.json"}, None,
     "deepspeed_config_file=/nonexistent/ds.json, which does not exist"),
    ({"ACCELERATE_DEEPSPEED_CONFIG_FILE": ZERO2}, str(REPO / "ds_configs" / "zero3.json"),
     "two DeepSpeed configs"),
])
def test_a_mix_the_trainer_cannot_honour_is_refused(monkeypatch, env, deepspeed, message):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.delenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ConfigError, match=re.escape(message)):
        adopt_launcher_deepspeed(TrainConfig(deepspeed=deepspeed))


def _accelerate_config(path, deepspeed_file: str | None, zero_stage: int = 2) -> str:
    ds = {"deepspeed_config_file": deepspeed_file, "zero3_init_flag": False} if deepspeed_file else \
        {"zero_stage": zero_stage, "offload_optimizer_device": "none", "offload_param_device": "none"}
    lines = ["compute_environment: LOCAL_MACHINE", "distributed_type: DEEPSPEED", "num_machines: 1",
             "num_processes: 2", "machine_rank: 0", "main_training_function: main", "use_cpu: false",
             "deepspeed_config:", *[f"  {k}: {json.dumps(v)}" for k, v in ds.items()]]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _launch(config_file: str, train_args: list[str], timeout=600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", config_file,
           "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
           "-m", "hncse_dist.cli", "train", *train_args]
    return subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout)


def _train_args(tiny_bert, corpus, out):
    args = {"model_name_or_path": tiny_bert, "train_file": corpus, "output_dir": str(out), "batch_size": 8,
            "max_steps": 3, "log_every": 1, "eval_every": 0, "save_every": 3, "bank_size": 2, "num_workers": 0,
            "progress": "false", "hnm_k": 4, "hnm_m": 6}
    return [f"{k}={v}" for k, v in args.items()]


@pytest.mark.dist
@pytest.mark.deepspeed
@pytest.mark.slow
def test_accelerate_launch_with_a_deepspeed_yaml_trains_under_the_trainer_s_deepspeed(tmp_path, tiny_bert, corpus):
    out = tmp_path / "run"
    proc = _launch(_accelerate_config(tmp_path / "acc.yaml", ZERO2), _train_args(tiny_bert, corpus, out))
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-6000:]
    assert f"DeepSpeed config from accelerate launch: deepspeed={ZERO2}" in log
    assert "world size 2 | global batch 16" in log
    run = json.loads((out / "config.json").read_text())
    assert run["deepspeed"] == ZERO2  # recorded: a resume or export knows the run used ZeRO
    ck = out / "checkpoints" / "step-00000003"
    assert (ck / "COMPLETE").is_file() and any(p.is_dir() for p in ck.glob("pytorch_model*"))  # DeepSpeed engine state
    from safetensors.torch import load_file

    final = load_file(str(out / "final" / "model.safetensors"))
    assert all(t.dtype == torch.float32 for t in final.values() if t.is_floating_point())


@pytest.mark.dist
@pytest.mark.slow
def test_accelerate_launch_with_deepspeed_fields_only_is_refused_in_one_line(tmp_path, tiny_bert, corpus):
    proc = _launch(_accelerate_config(tmp_path / "acc.yaml", None), _train_args(tiny_bert, corpus, tmp_path / "r"),
                   timeout=300)
    assert proc.returncode != 0
    errors = [l for l in proc.stderr.splitlines() if l.startswith("hncse-dist train: error:")]
    assert errors and "from its own config fields, which the trainer does not read" in errors[0], proc.stderr[-3000:]
