"""Config: YAML + key=value overrides with declared types and errors that name the fix."""

from dataclasses import fields

import pytest

from hncse_dist.config import ConfigError, load_config


def test_overrides_take_the_declared_types(tmp_path):
    cfg = load_config(None, ["learning_rate=3e-5", "hnm_alpha=null", "output_dir=2024", "max_steps=10",
                             "progress=false", "pm_w1=1"])
    assert cfg.learning_rate == 3e-5 and isinstance(cfg.learning_rate, float)
    assert cfg.hnm_alpha is None and cfg.output_dir == "2024" and cfg.max_steps == 10
    assert cfg.progress is False and isinstance(cfg.pm_w1, float)


def test_yaml_values_are_typed_and_paths_resolve_next_to_the_file(tmp_path):
    (tmp_path / "data.txt").write_text("a\nb\n")
    f = tmp_path / "c.yaml"
    f.write_text("learning_rate: 1e-5\ntrain_file: data.txt\nbatch_size: 8\n")
    cfg = load_config(f)
    assert cfg.learning_rate == 1e-5 and cfg.batch_size == 8
    assert cfg.train_file == str(tmp_path / "data.txt")


@pytest.mark.parametrize("override, message", [
    ("max_steps=abc", "max_steps='abc' is not a valid int"),
    ("progress=maybe", "progress='maybe' is not a valid bool"),
    ("batch_sise=4", "did you mean 'batch_size'?"),
    ("max_steps", "is not key=value"),
])
def test_bad_overrides_name_the_fix(override, message):
    with pytest.raises(ConfigError, match=message.replace("?", r"\?")):
        load_config(None, [override])


def test_validation_errors(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("x\n")
    with pytest.raises(ConfigError, match="pooler='max' does not exist"):
        load_config(None, [f"train_file={corpus}", "pooler=max"]).validate()
    with pytest.raises(ConfigError, match="no training data"):
        load_config(None, []).validate()
    with pytest.raises(ConfigError, match="pm_nonpositive"):
        load_config(None, [f"train_file={corpus}", "pm_nonpositive=drop"]).validate()


def test_help_config_is_a_yaml_config_of_the_defaults(tmp_path):
    from hncse_dist.config import CONFIG_KEYS, TrainConfig, config_template, load_config

    text = config_template()
    assert "# null: alpha ~ U(0, 1)" in text and "packed_forward: true" in text
    path = tmp_path / "defaults.yaml"
    path.write_text(text)
    loaded = load_config(path)
    defaults = TrainConfig()
    assert {k: getattr(loaded, k) for k in CONFIG_KEYS} == {k: getattr(defaults, k) for k in CONFIG_KEYS}


# ---------------------------------------------------------------- value ranges

# key -> (values refused, values accepted at the edges, the allowed range the message names)
RANGE_CASES = {
    "temperature": (["0", "-0.05", "nan", "inf"], ["1e-4", "1"], "a number > 0"),
    "pm_threshold": (["0", "-0.1", "1.5", "nan"], ["1e-6", "1"], "a number in (0, 1]"),
    "hnm_k": (["0", "-3"], ["1"], "an integer >= 1 (at most the HNM pool: global batch - 1 + bank rows)"),
    "hnm_m": (["-1"], ["0", "200"], "an integer >= 0 (0: no synthetic negatives)"),
    "hnm_alpha": (["-0.1", "1.01", "nan"], ["0", "1", "null"], "a number in [0, 1], or null for alpha ~ U(0, 1)"),
    "hnm_query_mix": (["-1"], ["0", "5"], "an integer >= 0 (0: no query mixing)"),
    "hnm_beta_max": (["-0.5", "1.5", "inf"], ["0", "1"], "a number in [0, 1]"),
    "max_seq_length": (["0", "-32"], ["1", "128"], "an integer >= 1 (at most the model's position limit)"),
    "batch_size": (["0", "-8"], ["1"], "an integer >= 1 (per process)"),
    "num_workers": (["-1"], ["0", "4"], "an integer >= 0 (0: load data in the training process)"),
    "malloc_mmap_threshold_mb": (["-1", "33", "nan"], ["0", "0.5", "32", "null"],
                                 "a number in [0, 32], or null for auto: 1 under DeepSpeed, else glibc's default "
                                 "(0: glibc's default)"),
    "shuffle_buffer": (["-1"], ["0", "100000"], "an integer >= 0"),
    "learning_rate": (["0", "-3e-5", "3e5", "nan", "inf"], ["1e-9", "1"], "a number in (0, 1]"),
    "weight_decay": (["-0.01", "1.5", "nan"], ["0", "1"], "a number in [0, 1]"),
    "warmup_steps": (["-1"], ["0", "1000"], "an integer >= 0"),
    "max_steps": (["-1", "-100"], ["0", "1"],
                  "an integer >= 0 (N > 0: train N optimizer steps; 0: train num_epochs epochs; "
                  "negative values such as -1 are not accepted)"),
    "num_epochs": (["0", "-1"], ["1"], "an integer >= 1 (used when max_steps=0)"),
    "gradient_accumulation_steps": (["0"], ["1", "8"], "an integer >= 1"),
    "max_grad_norm": (["-1", "nan"], ["0", "5"], "a number >= 0 (0: no clipping)"),
    "seed": (["-1", "2147483648"], ["0", "2147483647"], "an integer in [0, 2147483647]"),
    "bank_size": (["-1"], ["0", "64"], "an integer >= 0 (0: no bank; its memory must fit, see bank_size's comment)"),
    "bank_warmup_steps": (["-5"], ["0", "10"], "an integer >= 0"),
    "log_every": (["0"], ["1"], "an integer >= 1"),
    "stats_every": (["0", "-1"], ["1"], "an integer >= 1"),
    "eval_every": (["-1"], ["0", "1"], "an integer >= 0 (0: evaluate only at the end)"),
    "eval_batch_size": (["0"], ["1"], "an integer >= 1"),
    "save_every": (["-1"], ["0", "1"], "an integer >= 0 (0: checkpoint only at the end and on preemption)"),
    "keep_last": (["-1"], ["0", "1"], "an integer >= 0 (0: keep every checkpoint)"),
    "max_nonfinite_skips": (["-1"], ["0", "20"], "an integer >= 0 (0: never stop on non-finite losses)"),
    "peak_flops": (["-1", "nan"], ["0", "3.1e14"],
                   "a number >= 0 (0: datasheet figure for known GPUs, measured on CPU)"),
    "cache_chunk_size": (["-1"], ["0", "16"], "an integer >= 0 (0: off)"),
    "shard_retries": (["-1"], ["0", "3"], "an integer >= 0 (0: a failed URL / pipe: shard fails at once)"),
    "shard_retry_delay": (["-1", "nan"], ["0", "1.5"], "a number >= 0 (seconds before the first retry, doubling)"),
    "dist_timeout_minutes": (["0", "-1", "nan"], ["0.25", "30"],
                             "a number > 0 (a collective waits this long for a lost rank)"),
    "dropout": (["-0.1", "1", "1.5", "nan"], ["0", "0.1", "0.99", "null"],
                "a number in [0, 1), or null for the model's own dropout"),
    "lora_r": (["-1"], ["0", "8"], "an integer >= 0 (0: no LoRA, full fine-tuning)"),
    "lora_alpha": (["0", "-16", "nan"], ["1", "32"],
                   "a number > 0 (the adapter's update is scaled by lora_alpha / lora_r)"),
    "lora_dropout": (["-0.1", "1", "nan"], ["0", "0.05"], "a number in [0, 1)"),
}


def _numeric_keys():
    from hncse_dist.config import TrainConfig

    return sorted(f.name for f in fields(TrainConfig)
                  if any(t in str(f.type) for t in ("int", "float")) and "bool" not in str(f.type))


def test_every_numeric_key_has_a_range_rule_and_a_case_here():
    from hncse_dist.config import RANGES

    numeric = set(_numeric_keys()) - {"pm_w1", "pm_w2"}  # the weights: test_pm_weights_*
    assert numeric == set(RANGE_CASES), "a numeric key without a row in RANGE_CASES"
    assert set(_numeric_keys()) <= set(RANGES), "a numeric key without a range in config.RANGES"


@pytest.mark.parametrize("key", sorted(RANGE_CASES))
def test_numeric_keys_refuse_values_out_of_range(key, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("x\n")
    bad, good, allowed = RANGE_CASES[key]
    base = [f"train_file={corpus}", "eval_file=null"]
    for raw in bad:
        cfg = load_config(None, [*base, f"{key}={raw}"])
        with pytest.raises(ConfigError) as err:
            cfg.validate()
        assert str(err.value) == f"{key}={getattr(cfg, key)} is out of range: use {allowed}"
    for raw in good:
        load_config(None, [*base, f"{key}={raw}"]).validate()


@pytest.mark.parametrize("w1, w2", [("0.8", "0.3"), ("0.5", "0.4"), ("1.2", "-0.2")])
def test_pm_weights_must_be_nonnegative_and_sum_to_one(w1, w2, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("x\n")
    cfg = load_config(None, [f"train_file={corpus}", "eval_file=null", f"pm_w1={w1}", f"pm_w2={w2}"])
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    if float(w2) < 0:
        assert str(err.value) == "pm_w1=1.2 is out of range: use a number in [0, 1] (pm_w1 + pm_w2 must be 1)"
    else:
        assert str(err.value) == (f"pm_w1 + pm_w2 must be 1 (the mixed positive is w1 * positive + w2 * "
                                  f"hardest negative), got {float(w1)} + {float(w2)} = {float(w1) + float(w2):g}")


def test_pm_weights_summing_to_one_are_accepted(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("x\n")
    for w1, w2 in (("0.7", "0.3"), ("1", "0"), ("0.1", "0.9")):
        load_config(None, [f"train_file={corpus}", "eval_file=null", f"pm_w1={w1}", f"pm_w2={w2}"]).validate()


# ---------------------------------------------------------------- checks against the model and the machine


def _bert_config(positions=128, hidden=64):
    from transformers import BertConfig

    return BertConfig(hidden_size=hidden, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                      max_position_embeddings=positions)


def _cfg(tmp_path, *overrides):
    corpus = tmp_path / "c.txt"
    corpus.write_text("x\n")
    return load_config(None, [f"train_file={corpus}", "eval_file=null", *overrides]).validate()


def test_max_seq_length_is_checked_against_the_position_limit(tmp_path):
    from transformers import RobertaConfig

    from hncse_dist.config import check_against_model

    check_against_model(_cfg(tmp_path, "max_seq_length=128"), _bert_config(128), 1, 10**12)
    with pytest.raises(ConfigError) as err:
        check_against_model(_cfg(tmp_path, "max_seq_length=302"), _bert_config(128), 1, 10**12)
    assert str(err.value) == ("max_seq_length=302 exceeds the model's 128 positions "
                              "(max_position_embeddings of bert): use max_seq_length <= 128")
    # RoBERTa's positions start after the padding index: 514 embeddings, 512 usable.
    roberta = RobertaConfig(max_position_embeddings=514, pad_token_id=1)
    check_against_model(_cfg(tmp_path, "max_seq_length=512"), roberta, 1, 10**12)
    with pytest.raises(ConfigError, match="max_seq_length=513 exceeds the model's 512 positions"):
        check_against_model(_cfg(tmp_path, "max_seq_length=513"), roberta, 1, 10**12)


def test_a_bank_larger_than_its_memory_share_is_refused_with_the_largest_that_fits(tmp_path):
    from hncse_dist.config import BANK_MEMORY_FRACTION, bank_bytes, check_against_model

    # 16 batches x (64 per process x 4 processes) rows x (768 floats + one int64 key)
    assert bank_bytes(16, 256, 768) == 16 * 256 * (768 * 4 + 8)
    memory = 8 * 2**30
    fits = int(BANK_MEMORY_FRACTION * memory // (256 * (768 * 4 + 8)))
    check_against_model(_cfg(tmp_path, "batch_size=64", f"bank_size={fits}"), _bert_config(hidden=768), 4, memory)
    with pytest.raises(ConfigError) as err:
        check_against_model(_cfg(tmp_path, "batch_size=64", "bank_size=100000"), _bert_config(hidden=768), 4,
                            memory, memory_name="GPU memory")
    assert str(err.value) == (
        f"bank_size=100000 needs 73.4 GiB for the negative bank (100000 batches x 256 rows x 768 dims), "
        f"more than {BANK_MEMORY_FRACTION:.0%} of the 8.0 GiB GPU memory: use bank_size <= {fits}")
    # the bank only exists for the HNM objectives
    check_against_model(_cfg(tmp_path, "objective=pm", "bank_size=100000"), _bert_config(hidden=768), 4, memory)


def test_hnm_k_beyond_the_largest_pool_is_refused(tmp_path):
    from hncse_dist.config import check_against_model

    # global batch 16 (8 x 2 processes): 15 batch candidates + 2 x 16 bank rows = 47
    check_against_model(_cfg(tmp_path, "batch_size=8", "bank_size=2", "hnm_k=47"), _bert_config(), 2, 10**12)
    with pytest.raises(ConfigError) as err:
        check_against_model(_cfg(tmp_path, "batch_size=8", "bank_size=2", "hnm_k=48"), _bert_config(), 2, 10**12)
    assert str(err.value) == ("hnm_k=48 exceeds the 47 candidates HNM can ever choose from (global batch 16 - 1 "
                              "+ bank 2 x 16): use hnm_k <= 47, or raise batch_size or bank_size")
    with pytest.raises(ConfigError, match=r"hnm_k=10 exceeds the 7 candidates .*\(global batch 8 - 1\)"):
        check_against_model(_cfg(tmp_path, "batch_size=8", "bank_size=0", "hnm_k=10"), _bert_config(), 1, 10**12)
    with pytest.raises(ConfigError) as err:
        check_against_model(_cfg(tmp_path, "bank_size=0", "hnm_use_batch=false"), _bert_config(), 1, 10**12)
    assert str(err.value) == ("objective=hncse has no hard-negative candidates with hnm_use_batch=false and "
                              "bank_size=0: set bank_size >= 1 or hnm_use_batch=true")
    # simcse and pm never draw hard negatives
    check_against_model(_cfg(tmp_path, "objective=pm", "bank_size=0", "hnm_k=1000"), _bert_config(), 1, 10**12)
    # no synthetic negatives at all: k is unused
    check_against_model(_cfg(tmp_path, "hnm_m=0", "hnm_k=1000"), _bert_config(), 1, 10**12)


# ---------------------------------------------------------------- config files and the eval file


def test_broken_yaml_names_line_and_column(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("learning_rate: 1e-5\nbatch_size: [8, 16\nmax_steps: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(f)
    assert str(err.value) == (f"config file {f}: invalid YAML at line 3, column 10: expected ',' or ']', "
                              "but got ':' (while parsing a flow sequence from line 2, column 13)")


def test_unreadable_config_files_are_config_errors(tmp_path):
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00a: 1\n")
    with pytest.raises(ConfigError) as err:
        load_config(binary)
    assert str(err.value).startswith(f"config file {binary} cannot be read: ")
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path)
    assert str(err.value) == f"config file {tmp_path} is not a file: pass a YAML file such as configs/quickstart.yaml"


def test_eval_file_is_checked_when_the_config_is_validated(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("x\n")
    base = [f"train_file={corpus}"]
    with pytest.raises(ConfigError) as err:
        load_config(None, [*base, "eval_file=/nonexistent.csv"]).validate()
    assert str(err.value) == ("eval_file=/nonexistent.csv does not exist: pass an STS-B dev csv, "
                              "'packaged' (the shipped copy) or null (no evaluation)")
    garbage = tmp_path / "garbage.csv"
    garbage.write_text("this is not\ta dev file\n")
    with pytest.raises(ConfigError, match=r"eval_file=.*garbage.csv is not an STS-B dev file \(line 1: "):
        load_config(None, [*base, f"eval_file={garbage}"]).validate()
    scores = tmp_path / "scores.csv"
    scores.write_text("a\tb\tc\td\tnot-a-number\tx y\tz w\n")
    with pytest.raises(ConfigError, match=r"line 1: score 'not-a-number' is not a number"):
        load_config(None, [*base, f"eval_file={scores}"]).validate()
    empty = tmp_path / "empty.csv"
    empty.write_text("\n")
    with pytest.raises(ConfigError) as err:
        load_config(None, [*base, f"eval_file={empty}"]).validate()
    assert str(err.value) == (f"eval_file={empty} holds 0 scored pairs, too few for a Spearman correlation: "
                              "pass an STS-B dev csv, 'packaged' or null")
    one = tmp_path / "one.csv"
    one.write_text("g\tf\t2012\t1\t4.5\ta cat\ta dog\ng\tf\t2012\t2\t1.0\ta car\ta tree\n")
    load_config(None, [*base, f"eval_file={one}"]).validate()
    load_config(None, [*base, "eval_file=packaged"]).validate()
    load_config(None, [*base, "eval_file=null"]).validate()


def test_missing_model_folder_is_a_config_error(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("x\n")
    with pytest.raises(ConfigError) as err:
        load_config(None, [f"train_file={corpus}", "model_name_or_path=/nonexistent"]).validate()
    assert str(err.value).startswith("model_name_or_path=/nonexistent is not a Hugging Face model folder "
                                     "(no config.json)")


def test_yaml_no_stays_the_word_for_string_keys(tmp_path):
    """`mixed_precision=no` (or `mixed_precision: no` in a file): YAML reads it as False."""
    corpus = tmp_path / "c.txt"
    corpus.write_text("x\n")
    cfg = load_config(None, [f"train_file={corpus}", "eval_file=null", "mixed_precision=no"]).validate()
    assert cfg.mixed_precision == "no"
    conf = tmp_path / "c.yaml"
    conf.write_text(f"train_file: {corpus}\neval_file: null\nmixed_precision: no\n")
    assert load_config(str(conf)).validate().mixed_precision == "no"
