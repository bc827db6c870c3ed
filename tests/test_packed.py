"""The padding-free forward equals the model's own forward: values and gradients."""

import pytest
import torch

import hncse_dist.encoder as encoder_mod
from hncse_dist.encoder import Encoder
from hncse_dist.packed import right_padded, supports_packing
from tests.fixtures import MINILM

SENTENCES = ["a cat sleeps", "the dog runs over the old wooden house by the river", "music",
             "old trees grow slowly in the north", "why"]


def build(kind: str, dropout: float = 0.1, **extra):
    from transformers import AutoTokenizer, BertConfig, BertModel, RobertaConfig, RobertaModel

    tok = AutoTokenizer.from_pretrained(MINILM)
    common = dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=dropout,
                  attention_probs_dropout_prob=dropout, pad_token_id=tok.pad_token_id, **extra)
    torch.manual_seed(0)
    if kind == "bert":
        backbone = BertModel(BertConfig(**common), add_pooling_layer=False)
    else:  # RoBERTa: position ids start after padding_idx, computed from the input ids
        backbone = RobertaModel(RobertaConfig(**common), add_pooling_layer=False)
    return backbone, tok


def outputs_and_grads(enc: Encoder, ids, mask):
    enc.zero_grad()
    out = enc(ids, mask)
    weights = torch.linspace(-1, 1, out.numel()).view_as(out)
    (out * weights).sum().backward()
    return out.detach(), {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("pooler", ["cls", "cls_before_pooler", "avg", "avg_first_last"])
def test_packed_forward_equals_the_models_forward(kind, pooler, monkeypatch):
    backbone, tok = build(kind)
    enc = Encoder(backbone, tok, pooler=pooler, mlp_only_train=False).eval()
    assert enc.packed
    f = enc.tokenize(SENTENCES, 16)
    ids, mask = f["input_ids"], f["attention_mask"]
    assert not mask.all()  # the batch has padding to remove
    calls = []
    real = encoder_mod.packed_forward
    monkeypatch.setattr(encoder_mod, "packed_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    out_p, g_p = outputs_and_grads(enc, ids, mask)
    assert calls, "the packed path was not taken"
    enc.packed = False
    out_h, g_h = outputs_and_grads(enc, ids, mask)
    assert len(calls) == 1
    torch.testing.assert_close(out_p, out_h, rtol=1e-5, atol=1e-6)
    assert g_p.keys() == g_h.keys()
    scale = max(g.abs().max().item() for g in g_h.values())
    for name in g_h:  # absolute tolerance on the global scale: the key biases' true gradient is 0
        torch.testing.assert_close(g_p[name], g_h[name], rtol=1e-4, atol=1e-5 * scale, msg=name)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_packed_training_mode_without_dropout_equals_the_models_forward(checkpointing, monkeypatch):
    backbone, tok = build("bert", dropout=0.0)
    enc = Encoder(backbone, tok, pooler="cls").train()
    if checkpointing:
        enc.enable_checkpointing()
    calls = []
    real = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    f = enc.tokenize(SENTENCES, 16)
    out_p, g_p = outputs_and_grads(enc, f["input_ids"], f["attention_mask"])
    assert len(calls) == (2 if checkpointing else 0)  # one per layer in the packed path
    monkeypatch.undo()
    enc.packed = False
    out_h, g_h = outputs_and_grads(enc, f["input_ids"], f["attention_mask"])
    torch.testing.assert_close(out_p, out_h, rtol=1e-5, atol=1e-6)
    for name in g_h:
        torch.testing.assert_close(g_p[name], g_h[name], rtol=1e-4, atol=1e-6, msg=name)


def test_packed_dropout_makes_two_views_differ():
    backbone, tok = build("bert", dropout=0.1)
    enc = Encoder(backbone, tok, pooler="cls_before_pooler").train()
    f = enc.tokenize(SENTENCES, 16)
    z = enc(f["input_ids"].repeat(2, 1), f["attention_mask"].repeat(2, 1))
    z1, z2 = z.chunk(2)
    assert not torch.allclose(z1, z2)
    assert torch.nn.functional.cosine_similarity(z1, z2).min() > 0.5  # still the same sentences


def test_left_padding_and_unsupported_models_use_the_models_forward(monkeypatch):
    backbone, tok = build("bert")
    tok.padding_side = "left"
    enc = Encoder(backbone, tok, pooler="avg").eval()
    f = enc.tokenize(SENTENCES, 16)
    assert not right_padded(f["attention_mask"]) and enc.packed
    monkeypatch.setattr(encoder_mod, "packed_forward", lambda *a, **k: pytest.fail("packed path on left padding"))
    with torch.no_grad():
        auto = enc(f["input_ids"], f["attention_mask"])
        enc.packed = False
        own = enc(f["input_ids"], f["attention_mask"])
    assert torch.equal(auto, own)
    relative, _ = build("bert", position_embedding_type="relative_key")
    assert not supports_packing(relative)


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_fast_dropout_mask_statistics(p):
    from hncse_dist.packed import dropout, keep_mask

    torch.manual_seed(0)
    m = keep_mask((1001, 999), p, torch.float32)  # an element count that is not a multiple of 4
    dropped = (m == 0).float().mean().item()
    sigma = (p * (1 - p) / m.numel()) ** 0.5
    assert abs(dropped - p) < 5 * sigma
    values = m.unique().tolist()
    assert values[0] == 0.0 and values[1] == pytest.approx(1 / (1 - p), rel=1e-4) and len(values) == 2
    assert m.mean().item() == pytest.approx(1.0, abs=5 * sigma / (1 - p))
    # the four 16-bit lanes of each 64-bit draw are independent: no lane drops more than the others
    lanes = (keep_mask((4 * 200_000,), p, torch.float32) == 0).view(-1, 4).float().mean(0)
    assert (lanes - p).abs().max().item() < 5 * (p * (1 - p) / 200_000) ** 0.5
    # seeded like torch's own dropout; gradient = the same mask
    torch.manual_seed(3)
    a = keep_mask((64, 33), p, torch.float32)
    torch.manual_seed(3)
    x = torch.ones(64, 33, requires_grad=True)
    y = dropout(x, p, True)
    y.sum().backward()
    assert torch.equal(y.detach(), a) and torch.equal(x.grad, a)
    assert dropout(x, p, False) is x


def test_batch_without_padding_takes_the_packed_path_too(monkeypatch):
    backbone, tok = build("bert")
    enc = Encoder(backbone, tok, pooler="avg").eval()
    f = enc.tokenize(["one two three", "four five six"], 16)
    assert f["attention_mask"].all()
    calls = []
    real = encoder_mod.packed_forward
    monkeypatch.setattr(encoder_mod, "packed_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        packed = enc(f["input_ids"], f["attention_mask"])
        enc.packed = False
        own = enc(f["input_ids"], f["attention_mask"])
    assert calls == [1]
    torch.testing.assert_close(packed, own, rtol=1e-5, atol=1e-6)


def test_packing_built_before_the_transfer_gives_the_same_embeddings(monkeypatch):
    backbone, tok = build("bert")
    enc = Encoder(backbone, tok, pooler="avg_first_last").eval()
    f = enc.tokenize(SENTENCES, 16)
    packing = enc.packing_for(f["attention_mask"], "cpu")
    assert packing is not None and packing.index.numel() == int(f["attention_mask"].sum())
    with torch.no_grad():
        inside = enc(f["input_ids"], f["attention_mask"])
        monkeypatch.setattr(encoder_mod, "right_padded", lambda m: pytest.fail("mask checked again"))
        given = enc(f["input_ids"], f["attention_mask"], packing=packing)
    assert torch.equal(inside, given)
    monkeypatch.undo()
    tok.padding_side = "left"
    g = enc.tokenize(SENTENCES, 16)
    assert enc.packing_for(g["attention_mask"], "cpu") is None  # left padding: the model's forward


def _naive_embeddings(enc: Encoder, sentences: list[str]) -> torch.Tensor:
    """The model's own padded forward, one padded batch, no oneDNN kernels."""
    packed, enc.packed = enc.packed, False
    try:
        with torch.no_grad():
            f = enc.tokenize(sentences, 64)
            return enc(f["input_ids"], f["attention_mask"])
    finally:
        enc.packed = packed


needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch")


@needs_onednn
@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("pooler", ["cls", "cls_before_pooler", "avg", "avg_first_last"])
def test_encode_fast_path_equals_the_naive_padded_forward(kind, pooler, monkeypatch):
    import hncse_dist.packed as packed_mod

    backbone, tok = build(kind, dropout=0.1, initializer_range=0.3)  # activations of order 1: GELU variants differ
    enc = Encoder(backbone, tok, pooler=pooler, mlp_only_train=False)  # cls: the head is used too
    # lengths repeat (dense batches) and one is alone (the padded tail); one sentence twice
    sentences = SENTENCES + ["a dog sleeps", "the cat runs", "music", "a cat sleeps"]
    calls = {"linear": 0, "gelu": 0}
    real = torch.ops.mkldnn._linear_pointwise

    class CountingOps:
        @staticmethod
        def _linear_pointwise(x, w, b, attr, scalars, algorithm):
            calls["gelu" if attr == "gelu" else "linear"] += 1
            return real(x, w, b, attr, scalars, algorithm)

    monkeypatch.setattr(packed_mod.torch.ops, "mkldnn", CountingOps, raising=False)
    fast = enc.encode(sentences, batch_size=3)
    monkeypatch.undo()
    layers = len(backbone.encoder.layer)
    assert calls["gelu"] >= layers and calls["linear"] >= 3 * layers  # the oneDNN kernels ran
    assert enc.training  # encode restores the mode
    naive = _naive_embeddings(enc.eval(), sentences)
    cos = torch.nn.functional.cosine_similarity(fast, naive)
    assert cos.min().item() > 0.99999
    torch.testing.assert_close(fast, naive, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_minilm_encode_equals_the_naive_forward():
    from hncse_dist.packed import fast_inference

    assert not fast_inference(torch.zeros(1))  # autograd on (training): the modules' own forward
    with torch.no_grad():
        assert fast_inference(torch.zeros(1)) and not fast_inference(torch.zeros(1, dtype=torch.bfloat16))
    enc = Encoder.from_pretrained(MINILM, pooler="avg")
    sentences = SENTENCES + ["two dogs are playing in the snow", "a man is slicing a tomato ."] * 3
    fast = enc.encode(sentences, batch_size=4)
    naive = _naive_embeddings(enc.eval(), sentences)
    assert torch.nn.functional.cosine_similarity(fast, naive).min().item() > 0.99999
    torch.testing.assert_close(fast, naive, rtol=1e-4, atol=2e-5)


@needs_onednn
@pytest.mark.parametrize("pooler", ["cls", "avg"])
def test_encode_under_bf16_autocast_keeps_the_models_own_linear_layers(pooler):
    """A bf16 training run evaluates STS-B dev under its autocast: the activations turn bf16
    next to fp32 weights, which oneDNN's fp32 matmul refuses ("could not create a primitive
    descriptor"); the evaluation must take the modules' own (autocast) forward."""
    from hncse_dist.packed import fast_inference

    backbone, tok = build("bert", dropout=0.1)
    enc = Encoder(backbone, tok, pooler=pooler, mlp_only_train=False)
    sentences = SENTENCES + ["a dog sleeps", "the cat runs"]
    fp32 = enc.encode(sentences, batch_size=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with torch.no_grad():
            assert not fast_inference(torch.zeros(1))
        mixed = enc.encode(sentences, batch_size=3)
    assert mixed.shape == fp32.shape and torch.isfinite(mixed).all()
    assert torch.nn.functional.cosine_similarity(mixed.float(), fp32).min().item() > 0.99
