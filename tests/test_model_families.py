"""Model families beyond BERT: decoder-only LLMs (Llama, Mistral, Qwen2) as embedders and
models whose config ships without dropout (ModernBERT, Qwen2).

Every model is a tiny random-init config (hidden 64, 2 layers) with a tokenizer trained
offline on the packaged wiki sample (tests/model_families.py).
"""

import json
import math
import subprocess
import sys

import pytest
import torch

from hncse_dist.encoder import Encoder, ModelSetupError, require_dropout
from hncse_dist.train import contrastive_step
from tests.launch import REPO, child_env
from tests.model_families import DECODERS, WIKI, build_model, decoder_tokenizer

SENTENCES = ["a cat sleeps", "the dog runs over the old wooden house by the river", "music",
             "old trees grow slowly in the north"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return lambda kind: build_model(kind, root / kind)


def batch(enc, sentences=SENTENCES, length=24):
    f = enc.tokenize(sentences, length)
    return f["input_ids"], f["attention_mask"]


def last_real_token(hidden, mask):
    """By hand: the hidden state of each row's last attended position."""
    rows = []
    for i in range(mask.shape[0]):
        pos = [j for j in range(mask.shape[1]) if mask[i, j]][-1]
        rows.append(hidden[i, pos])
    return torch.stack(rows)


# ------------------------------------------------------------------ decoder-only embedders


@pytest.mark.parametrize("kind", DECODERS)
def test_decoder_gets_a_pad_token_an_eos_and_the_last_token_pooler(models, kind):
    enc = Encoder.from_pretrained(models(kind), pooler="last", dropout=0.1)
    tok = enc.tokenizer
    assert enc.causal and not enc.packed  # the padding-free forward is BERT-family only
    assert tok.pad_token == "</s>" and tok.pad_token_id == tok.eos_token_id
    assert any("pad token" in note and "'</s>'" in note for note in enc.notes), enc.notes
    assert any("EOS" in note and "appended" in note for note in enc.notes), enc.notes
    ids, mask = batch(enc)
    lengths = mask.sum(1)
    # every sentence ends with EOS, BOS only where the tokenizer adds it (Llama/Mistral, not Qwen2)
    assert all(ids[i, lengths[i] - 1] == tok.eos_token_id for i in range(len(SENTENCES)))
    assert bool((ids[:, 0] == tok.bos_token_id).all()) == (kind != "qwen2")
    # truncation keeps the EOS
    short_ids, short_mask = batch(enc, length=5)
    assert short_ids.shape[1] == 5 and bool((short_ids[:, -1] == tok.eos_token_id).all())

    enc.eval()
    with torch.no_grad():
        got = enc(ids, mask)
        hidden = enc.backbone(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(got, last_real_token(hidden, mask))
    # distinct sentences, distinct embeddings (cls would pool BOS: all rows equal)
    assert torch.cdist(got, got).fill_diagonal_(1.0).min() > 1e-3


@pytest.mark.parametrize("kind", DECODERS)
def test_last_pooler_is_the_same_under_left_and_right_padding(models, kind):
    right = Encoder.from_pretrained(models(kind), pooler="last", padding_side="right").eval()
    left = Encoder.from_pretrained(models(kind), pooler="last", padding_side="left").eval()
    assert right.tokenizer.padding_side == "right" and left.tokenizer.padding_side == "left"
    r_ids, r_mask = batch(right)
    l_ids, l_mask = batch(left)
    assert r_mask[:, -1].min() == 0 and l_mask[:, 0].min() == 0  # really padded on each side
    with torch.no_grad():
        torch.testing.assert_close(left(l_ids, l_mask), right(r_ids, r_mask), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(left.encode(SENTENCES, batch_size=4), right.encode(SENTENCES, batch_size=1),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", DECODERS)
def test_decoder_dropout_views_differ_and_the_loss_learns(models, kind):
    enc = Encoder.from_pretrained(models(kind), pooler="last", dropout=0.1)
    assert enc.backbone.config.attention_dropout == 0.1
    ids, mask = batch(enc)
    enc.train()
    torch.manual_seed(0)
    loss, z1, z2, _, stats = contrastive_step(enc, ids, mask, "simcse", None)
    assert stats["cos/positive"] < 0.9999
    # not the degenerate ln(2N) of identical embeddings
    assert loss.item() < math.log(2 * len(SENTENCES)) - 0.05
    loss.backward()
    grads = [p.grad for p in enc.parameters() if p.grad is not None]
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)


@pytest.mark.parametrize("pooler", ["cls", "cls_before_pooler"])
def test_first_token_pooler_on_a_causal_model_is_refused(models, pooler):
    with pytest.raises(ModelSetupError, match=f"pooler={pooler} .* causal .* use pooler=last"):
        Encoder.from_pretrained(models("llama"), pooler=pooler)


def test_tokenizer_with_nothing_to_pad_with_is_refused(tmp_path):
    tok = decoder_tokenizer("llama", eos=False, unk=False)
    path = build_model("llama", tmp_path / "m", tokenizer=tok)
    with pytest.raises(ModelSetupError, match="no pad, eos or unk token"):
        Encoder.from_pretrained(path, pooler="last")


def test_unk_pads_when_there_is_no_eos(tmp_path):
    tok = decoder_tokenizer("llama", eos=False, unk=True)
    enc = Encoder.from_pretrained(build_model("llama", tmp_path / "m", tokenizer=tok), pooler="last")
    assert enc.tokenizer.pad_token == "<unk>"
    assert any("no EOS token" in note for note in enc.notes), enc.notes
    with pytest.raises(ModelSetupError, match="append_eos=true .* no EOS token"):
        Encoder.from_pretrained(build_model("llama", tmp_path / "m", tokenizer=tok), pooler="last",
                                append_eos="true")


def test_append_eos_false_keeps_the_tokenizer_as_it_is(models):
    enc = Encoder.from_pretrained(models("llama"), pooler="last", append_eos="false")
    ids, mask = batch(enc)
    ends = ids[torch.arange(len(SENTENCES)), mask.sum(1) - 1]
    assert not bool((ends == enc.tokenizer.eos_token_id).any())


def test_encoders_keep_their_special_tokens(models):
    enc = Encoder.from_pretrained(models("roberta"), pooler="cls")
    ids, mask = batch(enc)
    assert not enc.causal and enc.packed and enc.notes == []
    # <s> ... </s> once: auto does not append a second EOS to an encoder
    assert int((ids[0] == enc.tokenizer.eos_token_id).sum()) == 1


# ------------------------------------------------------------------ dropout


@pytest.mark.parametrize("kind, keys", [
    ("modernbert", "attention_dropout=0.0, embedding_dropout=0.0, mlp_dropout=0.0"),
    ("qwen2", "attention_dropout=0.0"),
])
def test_model_without_dropout_is_refused_and_dropout_option_gives_distinct_views(models, kind, keys):
    pooler = "last" if kind == "qwen2" else "cls"
    enc = Encoder.from_pretrained(models(kind), pooler=pooler)
    with pytest.raises(ModelSetupError) as err:
        require_dropout(enc, None)
    assert f"({keys})" in str(err.value) and "dropout=0.1" in str(err.value)
    enc.train()
    ids, mask = batch(enc)
    _, _, _, _, stats = contrastive_step(enc, ids, mask, "simcse", None)
    assert stats["cos/positive"] > 0.99999  # the fault: identical views

    enc = Encoder.from_pretrained(models(kind), pooler=pooler, dropout=0.1)
    assert require_dropout(enc, 0.1) is None
    for key in keys.replace("=0.0", "").split(", "):
        assert getattr(enc.backbone.config, key) == 0.1
    enc.train()
    torch.manual_seed(0)
    _, _, _, _, stats = contrastive_step(enc, ids, mask, "simcse", None)
    assert stats["cos/positive"] < 0.9999
    # an explicit 0 is the user's choice: a warning, not a refusal
    assert "identical" in require_dropout(Encoder.from_pretrained(models(kind), pooler=pooler, dropout=0.0), 0.0)


def test_dropout_option_on_bert_sets_both_keys(tiny_bert):
    enc = Encoder.from_pretrained(tiny_bert, pooler="cls", dropout=0.25)
    cfg = enc.backbone.config
    assert cfg.hidden_dropout_prob == cfg.attention_probs_dropout_prob == 0.25
    assert require_dropout(Encoder.from_pretrained(tiny_bert), None) is None  # BERT's own 0.1


# ------------------------------------------------------------------ every family, every mode


@pytest.mark.parametrize("kind", ["bert", "roberta", "xlm-roberta", "deberta-v2", "modernbert", *DECODERS])
def test_every_family_trains_in_every_mode(models, tiny_bert, kind):
    path = tiny_bert if kind == "bert" else models(kind)
    pooler = "last" if kind in DECODERS else "cls"
    for packed in (True, False):
        for checkpointing in (False, True):
            for dtype in (None, torch.bfloat16):
                enc = Encoder.from_pretrained(path, pooler=pooler, dropout=0.1, packed=packed)
                assert enc.packed == (packed and kind in ("bert", "roberta", "xlm-roberta"))
                if checkpointing:
                    enc.enable_checkpointing()
                enc.train()
                ids, mask = batch(enc)
                torch.manual_seed(0)
                with torch.autocast("cpu", dtype=dtype or torch.float32, enabled=dtype is not None):
                    loss, _, _, _, stats = contrastive_step(enc, ids, mask, "hncse", None)
                loss.backward()
                mode = f"{kind} packed={packed} checkpointing={checkpointing} {dtype}"
                assert math.isfinite(loss.item()) and stats["cos/positive"] < 0.9999, mode
                assert all(bool(torch.isfinite(p.grad).all()) for p in enc.parameters() if p.grad is not None), mode


# ------------------------------------------------------------------ CLI


def run_cli(args, timeout=600):
    return subprocess.run([sys.executable, "-m", "hncse_dist.cli", *args], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=timeout)


def train_args(model, out, train_file, **kw):
    args = {"model_name_or_path": model, "train_file": train_file, "output_dir": str(out), "batch_size": 16,
            "max_steps": 8, "log_every": 1, "stats_every": 1, "eval_every": 0, "bank_size": 2,
            "num_workers": 1, "progress": "false", "hnm_k": 4, "hnm_m": 6, "pooler": "last",
            "dropout": 0.1, "learning_rate": 1e-3, "save_every": 8, "param_digest": "true"}
    args.update(kw)
    return [f"{k}={v}" for k, v in args.items()]


@pytest.fixture(scope="module")
def wiki_lines(tmp_path_factory):
    path = tmp_path_factory.mktemp("wiki") / "train.txt"
    path.write_text("\n".join(WIKI.read_text().splitlines()[1000:1400]) + "\n")
    return str(path)


@pytest.mark.parametrize("override, nproc, message", [
    ("pooler=cls", 2, "pooler=cls pools the first token"),
    ("dropout=null", 1, "has no dropout (attention_dropout=0.0): both views"),
])
def test_cli_refuses_a_causal_misconfiguration_in_one_line(models, tmp_path, wiki_lines, override, nproc, message):
    args = train_args(models("qwen2"), tmp_path / "r", wiki_lines) + [override]
    proc = run_cli(["train", "--nproc-per-node", str(nproc), *args], timeout=180)
    err = [l for l in proc.stderr.splitlines() if l.strip() and "WARNING" not in l]
    assert proc.returncode == 2 and len(err) == 1 and message in err[0], proc.stderr[-3000:]


@pytest.mark.dist
@pytest.mark.slow
def test_two_process_llama_run_learns_and_exports_to_sentence_transformers(models, tmp_path, wiki_lines):
    model = models("llama")
    out = tmp_path / "run"
    proc = run_cli(["train", "--nproc-per-node", "2", *train_args(model, out, wiki_lines)])
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-5000:]
    assert "world size 2 | global batch 32" in log
    assert "no pad token: padding with the EOS token '</s>'" in log
    assert "'</s>' appended to every sentence (append_eos=auto)" in log
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    positives = [l["cos/positive"] for l in lines if "cos/positive" in l]
    assert len(positives) == 8 and max(positives) < 0.9999
    losses = [l["loss"] for l in lines if "loss" in l]
    # it learns: pooling BOS gave every sentence the same embedding and a flat loss of ln(2N)
    assert losses[0] < math.log(2 * 16) and losses[-1] < losses[0] / 5, losses
    ck = out / "checkpoints" / "step-00000008"
    r0 = torch.load(ck / "hncse_rank0.pt", weights_only=False)
    r1 = torch.load(ck / "hncse_rank1.pt", weights_only=False)
    assert r0["param_digest"] is not None and r0["param_digest"] == r1["param_digest"]
    dev = [l["eval/stsb_dev_spearman"] for l in lines if "eval/stsb_dev_spearman" in l]
    assert len(dev) == 1 and math.isfinite(dev[0]) and dev[0] > 20.0, dev  # BOS pooling: NaN

    from sentence_transformers import SentenceTransformer

    final = str(out / "final")
    sentences = SENTENCES + ["a bird sings in the city", "the river is dark and old"]
    ours = Encoder.from_pretrained(final, pooler=None).encode(sentences)
    st = SentenceTransformer(final, device="cpu").encode(sentences, convert_to_tensor=True, batch_size=3).cpu()
    cos = torch.nn.functional.cosine_similarity(ours, st)
    assert cos.min() > 0.9999, cos
    pooling = json.loads((out / "final" / "1_Pooling" / "config.json").read_text())
    assert pooling.get("pooling_mode") == "lasttoken" or pooling.get("pooling_mode_lasttoken")  # sentence-transformers 6 / 3


def test_stream_refuses_a_tokenizer_without_pad_token_at_construction(tmp_path, wiki_lines):
    from hncse_dist.data.shards import write_shards
    from hncse_dist.data.stream import ShardStream

    write_shards([wiki_lines], str(tmp_path / "shards"), samples_per_shard=200, progress=False)
    with pytest.raises(ValueError, match="tokenizer has no pad token .* Encoder.from_pretrained"):
        ShardStream(str(tmp_path / "shards"), decoder_tokenizer("llama"), 8, 16, num_workers=1)


def test_launcher_preflight_makes_the_training_checks_without_weights(models):
    from hncse_dist.encoder import check_model_setup

    check_model_setup(models("llama"), "last", dropout=0.1)  # a valid setup passes
    with pytest.raises(ModelSetupError, match=r"qwen2 has no dropout \(attention_dropout=0.0\)"):
        check_model_setup(models("qwen2"), "last")
    with pytest.raises(ModelSetupError, match="pooler=cls pools the first token"):
        check_model_setup(models("mistral"), "cls", dropout=0.1)
    with pytest.raises(ModelSetupError, match="append_eos='maybe': use auto, true or false"):
        check_model_setup(models("llama"), "last", dropout=0.1, append_eos="maybe")


@pytest.mark.parametrize("kind", ["llama", "qwen2", "roberta", "xlm-roberta", "deberta-v2", "modernbert"])
def test_the_folder_around_streamed_weights_equals_save_pretrained(models, tmp_path, kind):
    """A DeepSpeed export streams model.safetensors itself and writes the rest of the folder with
    ``save_beside_weights``: config.json and every other file as ``save_pretrained`` writes them."""
    import filecmp
    import shutil

    from tests.model_families import DECODERS

    enc = Encoder.from_pretrained(models(kind), pooler="last" if kind in DECODERS else "avg")
    whole, beside = tmp_path / "whole", tmp_path / "beside"
    enc.save_pretrained(whole)
    beside.mkdir()
    shutil.copy(whole / "model.safetensors", beside)
    enc.save_beside_weights(beside, {})
    files = sorted(p.relative_to(whole) for p in whole.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(beside) for p in beside.rglob("*") if p.is_file())
    for name in files:
        assert filecmp.cmp(whole / name, beside / name, shallow=False), name
