"""Encoder: poolers, one forward for both views, gradient checkpointing keeps dropout views."""

import pytest
import torch

from hncse_dist.encoder import Encoder
from hncse_dist.objective import hncse_loss
from hncse_dist.train import contrastive_step


def batch(enc):
    f = enc.tokenize(["a cat sleeps", "the dog runs over the house", "music in the city", "old trees"], 16)
    return f["input_ids"], f["attention_mask"]


def loss_and_grads(tiny_bert, checkpointing):
    torch.manual_seed(0)  # the MLP head is freshly initialised
    enc = Encoder.from_pretrained(tiny_bert, pooler="cls")
    if checkpointing:
        enc.enable_checkpointing()
    enc.train()
    torch.manual_seed(7)
    loss, *_ = contrastive_step(enc, *batch(enc), "pm", None)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_keeps_the_dropout_views(tiny_bert):
    l0, g0 = loss_and_grads(tiny_bert, False)
    l1, g1 = loss_and_grads(tiny_bert, True)
    assert l0.item() == pytest.approx(l1.item(), rel=1e-6)
    assert g0.keys() == g1.keys()
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=1e-4, atol=1e-6)


def test_two_views_differ_by_dropout_only(tiny_bert):
    enc = Encoder.from_pretrained(tiny_bert, pooler="cls_before_pooler")
    ids, mask = batch(enc)
    enc.train()
    _, z1, z2, _, _ = contrastive_step(enc, ids, mask, "simcse", None)
    assert not torch.allclose(z1, z2)  # dropout on
    enc.eval()
    with torch.no_grad():
        _, z1, z2, _, _ = contrastive_step(enc, ids, mask, "simcse", None)
    torch.testing.assert_close(z1, z2)


@pytest.mark.parametrize("pooler", ["cls", "cls_before_pooler", "avg", "avg_first_last"])
def test_poolers_by_hand(tiny_bert, pooler):
    enc = Encoder.from_pretrained(tiny_bert, pooler=pooler, mlp_only_train=False).eval()
    ids, mask = batch(enc)
    with torch.no_grad():
        got = enc(ids, mask)
        out = enc.backbone(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    m = mask.unsqueeze(-1).float()
    expected = {
        "cls": lambda: enc.head(out.last_hidden_state[:, 0]),
        "cls_before_pooler": lambda: out.last_hidden_state[:, 0],
        "avg": lambda: (out.last_hidden_state * m).sum(1) / m.sum(1),
        "avg_first_last": lambda: ((out.hidden_states[1] + out.hidden_states[-1]) / 2 * m).sum(1) / m.sum(1),
    }[pooler]()
    torch.testing.assert_close(got, expected)


def test_mlp_head_only_in_training(tiny_bert):
    enc = Encoder.from_pretrained(tiny_bert, pooler="cls", mlp_only_train=True)
    ids, mask = batch(enc)
    enc.eval()
    with torch.no_grad():
        ev = enc(ids, mask)
        cls = enc.backbone(input_ids=ids, attention_mask=mask).last_hidden_state[:, 0]
    torch.testing.assert_close(ev, cls)


def test_encode_dedupes_and_keeps_order(tiny_bert):
    enc = Encoder.from_pretrained(tiny_bert, pooler="avg")
    sents = ["b longer sentence here", "a", "b longer sentence here", "c mid one"]
    got = enc.encode(sents, batch_size=2)
    for i, s in enumerate(sents):
        torch.testing.assert_close(got[i], enc.encode([s])[0], rtol=1e-5, atol=1e-6)


def test_not_a_model_folder_names_the_fix(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a Hugging Face model folder"):
        Encoder.from_pretrained(str(tmp_path))


def test_the_backbone_keeps_its_own_layers(tiny_bert, monkeypatch):
    """transformers 5.25 turned hub kernels on by default: every load replaced layers with kernels
    fetched from the hub (none on the meta device, so the export's re-save read the weights). The
    encoder asks for the model's own layers, and a caller may still choose."""
    from transformers import AutoModel

    seen = []
    real = AutoModel.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("use_kernels"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModel, "from_pretrained", classmethod(spy))
    enc = Encoder.from_pretrained(tiny_bert, pooler="cls")
    assert seen == [False] and not getattr(enc.backbone, "use_kernels", False)
    Encoder.from_pretrained(tiny_bert, pooler="cls", use_kernels=None)
    assert seen[-1] is None
