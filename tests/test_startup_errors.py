"""Configuration problems stop the CLI before any training with exit 2 and one line; an
evaluation that fails mid-run checkpoints first and then exits 1 (nothing trained is lost)."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.launch import REPO, child_env
from tests.test_train_e2e import common, run_cli


def assert_one_line_exit_2(proc, message):
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stdout + proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("hncse-dist train: error: ") and message in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def long_corpus(tmp_path_factory):
    """Sentences of ~300 tokens: longer than the tiny BERT's 128 positions."""
    path = tmp_path_factory.mktemp("long") / "long.txt"
    path.write_text("".join(f"{i} " + " ".join(["river"] * 300) + "\n" for i in range(40)))
    return str(path)


def test_missing_eval_file_is_refused_before_training(tmp_path, tiny_bert, corpus):
    out = tmp_path / "r"
    proc = run_cli(["train", *common(tiny_bert, corpus, out, eval_every=2), "eval_file=/nonexistent.csv"],
                   check=False, timeout=120)
    assert_one_line_exit_2(proc, "eval_file=/nonexistent.csv does not exist")
    assert not (out / "metrics.jsonl").exists()  # no step was trained


def test_garbage_eval_file_is_refused_before_training(tmp_path, tiny_bert, corpus):
    bad = tmp_path / "dev.csv"
    bad.write_text("score,sentence1,sentence2\n0.5,a cat,a dog\n")
    proc = run_cli(["train", *common(tiny_bert, corpus, tmp_path / "r"), f"eval_file={bad}"],
                   check=False, timeout=120)
    assert_one_line_exit_2(proc, f"eval_file={bad} is not an STS-B dev file (line 1: 1 TAB-separated column")


def test_missing_model_folder_is_one_line(tmp_path, corpus):
    proc = run_cli(["train", *common("/nonexistent", corpus, tmp_path / "r")], check=False, timeout=120)
    assert_one_line_exit_2(proc, "model_name_or_path=/nonexistent is not a Hugging Face model folder")


def test_max_seq_length_beyond_the_model_positions_is_refused(tmp_path, tiny_bert, long_corpus):
    out = tmp_path / "r"
    proc = run_cli(["train", *common(tiny_bert, long_corpus, out, max_seq_length=302)], check=False, timeout=120)
    assert_one_line_exit_2(proc, "max_seq_length=302 exceeds the model's 128 positions "
                                 "(max_position_embeddings of bert): use max_seq_length <= 128")
    assert not (out / "metrics.jsonl").exists()


def test_a_bank_beyond_the_memory_share_is_refused(tmp_path, tiny_bert, corpus):
    proc = run_cli(["train", *common(tiny_bert, corpus, tmp_path / "r", bank_size=100_000_000)],
                   check=False, timeout=120)
    line = assert_one_line_exit_2(proc, "bank_size=100000000 needs 196.7 GiB for the negative bank "
                                        "(100000000 batches x 8 rows x 64 dims), more than 25% of the ")
    assert "use bank_size <= " in line


def test_hnm_k_beyond_the_pool_is_refused(tmp_path, tiny_bert, corpus):
    proc = run_cli(["train", *common(tiny_bert, corpus, tmp_path / "r", bank_size=0, hnm_k=10)],
                   check=False, timeout=120)
    assert_one_line_exit_2(proc, "hnm_k=10 exceeds the 7 candidates HNM can ever choose from (global batch 8 - 1)")


def test_start_up_checks_run_once_in_the_launcher_with_the_world_to_come(tmp_path, tiny_bert, corpus):
    out = tmp_path / "r"
    proc = run_cli(["train", "--nproc-per-node", "2", *common(tiny_bert, corpus, out, bank_size=0, hnm_k=20)],
                   check=False, timeout=120)
    assert_one_line_exit_2(proc, "hnm_k=20 exceeds the 15 candidates HNM can ever choose from (global batch 16 - 1)")
    assert not out.exists()  # no process was started


def test_zero_stats_every_is_refused(tmp_path, tiny_bert, corpus):
    proc = run_cli(["train", *common(tiny_bert, corpus, tmp_path / "r", stats_every=0)], check=False, timeout=120)
    assert_one_line_exit_2(proc, "stats_every=0 is out of range: use an integer >= 1")


def test_broken_yaml_config_is_one_line_with_its_position(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("learning_rate: 1e-5\nbatch_size: [8, 16\nmax_steps: 3\n")
    proc = run_cli(["train", "--config", str(f)], check=False, timeout=120)
    assert_one_line_exit_2(proc, f"config file {f}: invalid YAML at line 3, column 10")


def test_unreadable_config_is_one_line(tmp_path):
    f = tmp_path / "bin.yaml"
    f.write_bytes(b"\xff\xfe\x00a: 1\n")
    proc = run_cli(["train", "--config", str(f)], check=False, timeout=120)
    assert_one_line_exit_2(proc, f"config file {f} cannot be read: ")


def test_overrides_are_accepted_on_both_sides_of_options(tmp_path, tiny_bert, corpus):
    out = tmp_path / "r"
    args = common(tiny_bert, corpus, out, max_steps=2, save_every=0)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("log_every: 1\n")
    proc = run_cli(["train", *args[:4], "--nproc-per-node", "1", *args[4:], "--config", str(cfg), "max_steps=3"],
                   timeout=300)
    assert "world size 1 | global batch 8 | 3 steps" in proc.stdout + proc.stderr
    assert [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()
            if "loss" in l] == [1, 2, 3]
    # a bad override after an option is parsed (and refused) like any other
    proc = run_cli(["train", *args, "--nproc-per-node", "1", "objective=moco"], check=False, timeout=120)
    assert_one_line_exit_2(proc, "objective='moco' does not exist")


FAILING_EVAL = textwrap.dedent("""
    import sys
    import hncse_dist.eval.sts as sts

    real, calls = sts.dev_spearman, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(*args, **kwargs)

    sts.dev_spearman = flaky
    from hncse_dist.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_an_evaluation_failure_mid_run_checkpoints_first_then_exits_1(tmp_path, tiny_bert, corpus):
    out = tmp_path / "r"
    args = ["train", *common(tiny_bert, corpus, out, max_steps=6, eval_every=2, save_every=0)]
    proc = subprocess.run([sys.executable, "-c", FAILING_EVAL, *args], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = [l for l in proc.stderr.splitlines() if l.strip()][-1]
    ck = out / "checkpoints" / "step-00000004"
    assert last == (f"hncse-dist train: error: evaluation at step 4 failed (RuntimeError: CUDA out of memory "
                    f"(simulated)); the training state is saved in {ck}: fix the cause (or set eval_file=null) "
                    "and continue with resume=latest")
    assert (ck / "COMPLETE").is_file()
    assert torch.load(ck / "hncse_rank0.pt", weights_only=False)["trainer"]["step"] == 4
    assert not (out / "final").exists()
    # the saved state continues to the end
    resumed = run_cli([*args, "resume=latest"], timeout=300)
    assert "resumed from" in resumed.stdout + resumed.stderr and "at step 4" in resumed.stdout + resumed.stderr
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert (out / "final" / "config.json").is_file()


SPOIL_AFTER_START = textwrap.dedent("""
    import sys
    import hncse_dist.train as train

    checks = train.startup_checks

    def then_spoil(cfg, *args, **kwargs):
        checks(cfg, *args, **kwargs)  # the file was fine at start-up ...
        with open(cfg.eval_file, "w") as f:  # ... and is garbage by the first evaluation
            f.write("score,sentence1,sentence2\\n0.5,a cat,a dog\\n")

    train.startup_checks = then_spoil
    from hncse_dist.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_an_eval_file_spoiled_after_start_up_checkpoints_and_names_the_file(tmp_path, tiny_bert, corpus):
    from hncse_dist.train import PACKAGED_STSB_DEV

    dev = tmp_path / "dev.csv"
    dev.write_text(PACKAGED_STSB_DEV.read_text())
    out = tmp_path / "r"
    args = ["train", *common(tiny_bert, corpus, out, max_steps=4, eval_every=2, save_every=0), f"eval_file={dev}"]
    proc = subprocess.run([sys.executable, "-c", SPOIL_AFTER_START, *args], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = [l for l in proc.stderr.splitlines() if l.strip()][-1]
    ck = out / "checkpoints" / "step-00000002"
    assert last.startswith(f"hncse-dist train: error: evaluation at step 2 failed (ConfigError: eval_file={dev} "
                           "is not an STS-B dev file (line 1: 1 TAB-separated column, need 7)")
    assert last.endswith(f"the training state is saved in {ck}: fix the cause (or set eval_file=null) and "
                         "continue with resume=latest")
    assert (ck / "COMPLETE").is_file()
