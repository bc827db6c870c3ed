"""STS evaluation: loaders on the real files, statistics, "all" pooling, the batched encoder
against one sentence at a time, end to end, CLI errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from scipy import stats

from hncse_dist.encoder import Encoder, _length_batches
from hncse_dist.eval import eval_main
from hncse_dist.eval.embed import EmbeddingTable
from hncse_dist.eval.sts import (
    STS_TASKS,
    STS_YEARS,
    STSSubset,
    STSTask,
    cosine_rows,
    dev_spearman,
    evaluate_sts,
    load_pair_file,
    load_sts_task,
    pearson,
    score_sts_task,
    spearman,
    sts_pair_counts,
)

from tests.datadir import REPO_ROOT, data_dir, eval_tiny_bert, restore_torch_threads  # noqa: F401  (fixtures)
from tests.fixtures import HashEncoder

EXPECTED_PAIRS = {
    "STS12": 3108, "STS13": 1500, "STS14": 3750, "STS15": 3000, "STS16": 1186,
    "STSBenchmark": 1379, "SICKRelatedness": 4927,
}


# ---------------------------------------------------------------- loaders


def test_pair_counts_on_real_files(data_dir):
    assert sts_pair_counts(data_dir) == EXPECTED_PAIRS


def test_sts13_has_no_smt_and_sts15_skips_unscored(data_dir):
    assert [s.name for s in load_sts_task(data_dir, "STS13").subsets] == ["FNWN", "OnWN", "headlines"]
    sts15 = load_sts_task(data_dir, "STS15")
    assert {s.name: len(s) for s in sts15.subsets}["answers-forums"] == 375
    assert all(np.isfinite(s.scores).all() for s in sts15.subsets)


def test_sick_crlf_and_header_handled(data_dir):
    sick = load_pair_file(data_dir / "sts" / "SICK" / "SICK_test_annotated.txt")
    assert len(sick) == 4927
    assert not any("\r" in s for s in sick.sent1 + sick.sent2)
    assert sick.scores.min() >= 1.0 and sick.scores.max() <= 5.0


def test_missing_gold_file_is_named(tmp_path):
    year = tmp_path / "sts" / "STS12"
    year.mkdir(parents=True)
    (year / "STS.input.MSRpar.txt").write_text("a b\tc d\n")
    with pytest.raises(FileNotFoundError, match="STS.gs.MSRpar.txt.*expected layout"):
        load_sts_task(tmp_path, "STS12")


# ---------------------------------------------------------------- statistics


def test_spearman_with_ties_by_hand():
    # ranks of x: [4, 1, 4, 2, 4] (the three tied 3.0 share ranks 3..5); of y: 1..5.
    # Centred: dx = [1, -2, 1, -1, 1], dy = [-2, -1, 0, 1, 2]; rho = 1 / sqrt(8 * 10).
    assert spearman([3.0, 1.0, 3.0, 2.0, 3.0], [1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx(1 / np.sqrt(80))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spearman_and_pearson_match_scipy_with_ties(seed):
    rng = np.random.default_rng(seed)
    gold = rng.integers(0, 6, size=200).astype(float)  # many ties, like STS gold scores
    pred = np.round(gold + rng.normal(0, 2, size=200), 1)  # ties in predictions too
    assert spearman(gold, pred) == pytest.approx(stats.spearmanr(gold, pred).statistic, abs=1e-12)
    assert pearson(gold, pred) == pytest.approx(stats.pearsonr(gold, pred).statistic, abs=1e-12)


def test_cosine_rows():
    a = np.array([[1.0, 0.0], [1.0, 1.0]])
    b = np.array([[0.0, 2.0], [2.0, 2.0]])
    np.testing.assert_allclose(cosine_rows(a, b), [0.0, 1.0])


# ---------------------------------------------------------------- "all" pooling


def _unit(angle: float) -> np.ndarray:
    return np.array([math.cos(angle), math.sin(angle)])


def test_pooled_spearman_differs_from_mean_of_subsets_constructed():
    # Inside each subset the cosine order matches the gold order exactly (rho = 1 each), but
    # subset B's cosines all lie below subset A's while its gold scores lie above: pooled rho < 1.
    anchor = _unit(0.0)
    sims = {"a0": 0.9, "a1": 0.95, "a2": 0.99, "b0": 0.1, "b1": 0.2, "b2": 0.3}
    sentences = ["anchor"] + list(sims)
    vectors = np.stack([anchor] + [_unit(math.acos(c)) for c in sims.values()])
    table = EmbeddingTable(sentences, vectors)

    def subset(name, keys, gold):
        return STSSubset(name, ("anchor",) * 3, tuple(keys), np.array(gold))

    task = STSTask("toy", (subset("A", ["a0", "a1", "a2"], [0.0, 1.0, 2.0]),
                           subset("B", ["b0", "b1", "b2"], [3.0, 4.0, 5.0])))
    result = score_sts_task(task, table)
    assert [result["subsets"][n]["spearman"] for n in "AB"] == pytest.approx([100.0, 100.0])
    expected = stats.spearmanr([0, 1, 2, 3, 4, 5], [0.9, 0.95, 0.99, 0.1, 0.2, 0.3]).statistic
    assert result["spearman"] == pytest.approx(100 * expected)
    assert result["spearman"] < 0 and result["n"] == 6


def test_pooling_on_real_data_and_single_encode_call(data_dir):
    encoder = HashEncoder()
    results = evaluate_sts(encoder, data_dir)
    assert len(encoder.calls) == 1, "all tasks must be encoded in one call"
    assert len(encoder.calls[0]) == len(set(encoder.calls[0])), "sentences must be deduplicated"
    for year in STS_YEARS:
        detail = results["details"][year]
        task = load_sts_task(data_dir, year)
        table = EmbeddingTable.encode(HashEncoder(), task.sentences())
        gold = np.concatenate([s.scores for s in task.subsets])
        pred = np.concatenate([cosine_rows(table(s.sent1), table(s.sent2)) for s in task.subsets])
        assert results[year] == pytest.approx(100 * stats.spearmanr(gold, pred).statistic, abs=1e-9)
        mean_of_subsets = np.mean([d["spearman"] for d in detail["subsets"].values()])
        assert abs(results[year] - mean_of_subsets) > 0.01
        assert detail["n"] == EXPECTED_PAIRS[year]


def test_dev_spearman_reads_stsb_and_sick(data_dir):
    stsb = dev_spearman(HashEncoder(), str(data_dir / "sts" / "STSBenchmark" / "sts-dev.csv"))
    sick = dev_spearman(HashEncoder(), str(data_dir / "sts" / "SICK" / "SICK_trial.txt"))
    assert 0.0 < stsb < 100.0 and 0.0 < sick < 100.0


# ---------------------------------------------------------------- the batched encoder


def test_length_batches_cover_every_sequence_once_within_the_limits():
    lengths = [10] * 300 + [3] * 5 + [7] * 129 + [40] * 2 + [41] + [60]
    batches = _length_batches(lengths, max_sentences=128, max_tokens=1024)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 128 and len(b) * max(lengths[i] for i in b) <= 1024
    shapes = sorted((sorted({lengths[i] for i in b}), len(b)) for b in batches)
    # 300 of length 10: at most 1024 // 10 = 102 a batch -> 3 x 100; 129 of length 7: at most
    # 128 -> 65 + 64; the lengths that fill under a quarter of a batch share one padded batch.
    assert shapes == [([3, 40, 41, 60], 9), ([7], 64), ([7], 65), ([10], 100), ([10], 100), ([10], 100)]


def test_length_batches_split_the_tail_at_the_token_limit():
    lengths = [10] * 9 + [45]  # each length fills under a quarter of its batch: the tail
    batches = _length_batches(lengths, max_sentences=100, max_tokens=400)
    # nine of length 10 take 90 positions; with the 45 added they would take 10 x 45 = 450
    assert batches == [list(range(9)), [9]]


def one_at_a_time(encoder: Encoder, sentences) -> torch.Tensor:
    """The model's own forward, one sentence per call: no padding, no batch neighbours."""
    packed, encoder.packed = encoder.packed, False
    try:
        with torch.inference_mode():
            feats = [encoder.tokenize([s], 512) for s in sentences]
            return torch.cat([encoder.eval()(f["input_ids"], f["attention_mask"]) for f in feats])
    finally:
        encoder.packed = packed


@pytest.mark.parametrize("pooler", ["cls", "avg", "avg_first_last", "last"])
def test_encode_equals_one_sentence_at_a_time(eval_tiny_bert, data_dir, pooler, restore_torch_threads):
    torch.set_num_threads(1)
    encoder = Encoder.from_pretrained(str(eval_tiny_bert), pooler=pooler)
    sub = load_sts_task(data_dir, "STS14").subsets[0]
    sentences = list(sub.sent1[:80] + sub.sent2[:80])
    # a repeat, and a different text with the same tokens (the tokenizer is uncased)
    sentences += [sentences[3], sentences[9].upper()]
    expected = one_at_a_time(encoder, sentences)
    lengths = [len(ids) for ids in encoder.tokenizer(sentences)["input_ids"]]
    kinds = set()
    for batch_size, max_tokens in ((128, 4096), (8, 96)):  # few sentences: padded; small batches: dense
        kinds.update(len({lengths[i] for i in b}) for b in _length_batches(lengths, batch_size, max_tokens))
        got = encoder.encode(sentences, batch_size=batch_size, max_tokens=max_tokens)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(got[-2], got[3]) and torch.equal(got[-1], got[9])
    assert 1 in kinds and max(kinds) > 1  # both kinds of batch were encoded


def small_sts_copy(data_dir, out, lines: int):
    """STS12 (MSRpar and MSRvid: repeated pairs, no self-pairs), STS-B and SICK test, first lines."""
    def head(src, dst, n):
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_text("\n".join(src.read_text(encoding="utf-8-sig").splitlines()[:n]) + "\n")

    sts = data_dir / "sts"
    for subset in ("MSRpar", "MSRvid"):
        for kind in ("input", "gs"):
            name = f"STS.{kind}.{subset}.txt"
            head(sts / "STS12" / name, out / "sts" / "STS12" / name, lines)
    head(sts / "STSBenchmark" / "sts-test.csv", out / "sts" / "STSBenchmark" / "sts-test.csv", lines)
    head(sts / "SICK" / "SICK_test_annotated.txt", out / "sts" / "SICK" / "SICK_test_annotated.txt", lines + 1)
    return out


def test_fast_evaluator_spearman_equals_a_naive_one(eval_tiny_bert, data_dir, tmp_path, restore_torch_threads):
    torch.set_num_threads(1)
    small = small_sts_copy(data_dir, tmp_path, lines=150)
    encoder = Encoder.from_pretrained(str(eval_tiny_bert), pooler="avg")
    names = ("STS12", "STSBenchmark", "SICKRelatedness")
    results = evaluate_sts(encoder, small, names)
    for name in names:
        task = load_sts_task(small, name)
        a = one_at_a_time(encoder, [s for sub in task.subsets for s in sub.sent1]).double().numpy()
        b = one_at_a_time(encoder, [s for sub in task.subsets for s in sub.sent2]).double().numpy()
        # one division by the product of the norms: a pair and its swapped copy tie exactly
        cosines = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
        gold = np.concatenate([sub.scores for sub in task.subsets])
        naive = stats.spearmanr(gold, cosines).statistic
        assert results["details"][name]["n"] == len(gold) == (300 if name == "STS12" else 150)
        assert abs(results[name] / 100 - naive) < 1e-6, name


@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.dist
def test_zero3_training_goes_on_after_a_dev_evaluation(tmp_path, tiny_bert, corpus):
    # Under ZeRO-3 the evaluation's forwards gather the parameters; under inference_mode the
    # next training step then failed ("Inference tensors cannot be saved for backward").
    from tests.test_train_e2e import common, run_cli

    out = tmp_path / "run"
    run_cli(["train", "--nproc-per-node", "2", *common(tiny_bert, corpus, out, eval_every=2, save_every=0,
                                                          deepspeed="ds_configs/zero3.json")], timeout=900)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    scores = [r["eval/stsb_dev_spearman"] for r in records if "eval/stsb_dev_spearman" in r]
    assert len(scores) == 2 and all(-100 < s < 100 for s in scores)


@pytest.mark.slow
def test_eval_speed_bench_runs_and_its_evaluators_agree(eval_tiny_bert, data_dir, tmp_path):
    out = tmp_path / "eval_speed.json"
    # rounding a random model's cosines (all within 0.94-1.0) to 5 decimals makes many near
    # ties, so its rounded-cosine Spearman is compared at 1e-5 here
    proc = subprocess.run([sys.executable, "bench/eval_speed.py", "--model", str(eval_tiny_bert), "--threads", "1",
                           "--repeats", "1", "--tolerance", "1e-5", "--output", str(out)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["sentences_encoded"] == {"ours": 26289, "naive": 2 * sum(EXPECTED_PAIRS.values())}
    assert set(report["scores"]["ours"]) == set(STS_TASKS) | {"avg"}
    assert max(report["max_abs_diff"]["score"].values()) < 1e-4
    assert report["speedup_median"]["cpu"] > 0 and "| median wall s |" in proc.stdout


# ---------------------------------------------------------------- end to end


def test_cli_end_to_end_with_tiny_bert(eval_tiny_bert, data_dir, tmp_path, capsys,
                                       restore_torch_threads):
    out = tmp_path / "results.json"
    code = eval_main(["--model", str(eval_tiny_bert), "--data-dir", str(data_dir), "--tasks", "sts",
                      "--pooler", "cls_before_pooler", "--output", str(out), "--no-progress",
                      "--threads", "1"])
    assert code == 0
    results = json.loads(out.read_text())["sts"]
    assert list(results) == list(STS_TASKS) + ["avg", "details"]
    scores = [results[t] for t in STS_TASKS]
    assert all(-100.0 <= s <= 100.0 for s in scores)
    assert results["avg"] == pytest.approx(np.mean(scores))
    assert {k: v["n"] for k, v in results["details"].items()} == EXPECTED_PAIRS
    assert results["details"]["STS12"]["subsets"]["MSRpar"]["n"] == 750
    assert "| STSBenchmark |" in capsys.readouterr().out


def test_dev_spearman_with_tiny_bert(eval_tiny_bert, data_dir, restore_torch_threads):
    from hncse_dist.encoder import Encoder

    torch.set_num_threads(1)  # a one-layer model gains nothing from more, and a busy CPU loses
    encoder = Encoder.from_pretrained(str(eval_tiny_bert), pooler="avg")
    score = dev_spearman(encoder, str(data_dir / "sts" / "STSBenchmark" / "sts-dev.csv"))
    assert math.isfinite(score) and -100.0 <= score <= 100.0


# ---------------------------------------------------------------- CLI errors


def test_cli_missing_task_file(tmp_path, capsys):
    (tmp_path / "sts" / "STSBenchmark").mkdir(parents=True)
    code = eval_main(["--model", "unused", "--data-dir", str(tmp_path), "--tasks", "STSBenchmark"])
    err = capsys.readouterr().err
    assert code != 0
    assert str(tmp_path / "sts" / "STSBenchmark" / "sts-test.csv") in err
    assert "expected layout" in err and len(err.strip().splitlines()) == 1


def test_cli_model_path_that_is_not_a_model(tmp_path, data_dir, capsys):
    not_a_model = tmp_path / "empty_folder"
    not_a_model.mkdir()
    code = eval_main(["--model", str(not_a_model), "--data-dir", str(data_dir), "--tasks", "STSBenchmark"])
    err = capsys.readouterr().err
    assert code != 0
    assert str(not_a_model) in err and "config.json" in err and len(err.strip().splitlines()) == 1


def test_cli_batch_limits_must_be_positive(tmp_path, capsys):
    code = eval_main(["--model", "unused", "--data-dir", str(tmp_path), "--max-tokens", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "--max-tokens 0: must be at least 1" in err and len(err.strip().splitlines()) == 1


def test_cli_unknown_task_lists_valid_ones(tmp_path, capsys):
    code = eval_main(["--model", "unused", "--data-dir", str(tmp_path), "--tasks", "sts,STS99"])
    err = capsys.readouterr().err
    assert code != 0
    assert "'STS99'" in err and "STSBenchmark" in err and "MRPC" in err
