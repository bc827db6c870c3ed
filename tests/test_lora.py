"""LoRA (hncse_dist/lora.py): which parameters train, the merge of the gathered state dict
against peft's own merge_and_unload, the exports (merged model, adapter folder) loading in
transformers, sentence-transformers and peft with the trained model's embeddings, the family
defaults, gradients across ranks, and training runs under DDP and DeepSpeed ZeRO."""

import json
import os
from pathlib import Path

import pytest
import torch

from hncse_dist.encoder import Encoder
from hncse_dist.lora import DEFAULT_TARGETS, LoraSettings, adapter_state, merge_lora_state, peft_config

SENTENCES = ["a cat sleeps under the tree", "the city music is loud", "a bird sings over the river",
             "old books and young readers"]


def lora_encoder(path, pooler="cls", r=4, alpha=8.0, seed=0, **kw):
    """An Encoder with adapters whose B matrices are random (peft starts them at zero, which
    would make every merge trivially exact)."""
    torch.manual_seed(seed)
    # mlp_only_train=False: the head is part of the evaluated (and exported) model
    enc = Encoder.from_pretrained(path, pooler, mlp_only_train=pooler != "cls", lora=LoraSettings(r=r, alpha=alpha, **kw))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in enc.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return enc.eval()


def cosines(a, b):
    return torch.nn.functional.cosine_similarity(torch.as_tensor(a), torch.as_tensor(b), dim=1)


def test_only_adapters_and_head_train(tiny_bert):
    enc = lora_encoder(tiny_bert)
    trainable = {n for n, p in enc.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n or n.startswith("head.") for n in trainable)
    assert {"head.0.weight", "head.0.bias"} <= trainable
    # every attention projection and MLP linear of both layers is adapted: 6 per layer
    adapted = {n.split(".lora_A.")[0] for n in trainable if ".lora_A." in n}
    assert len(adapted) == 2 * 6
    assert all(not p.requires_grad for n, p in enc.backbone.named_parameters() if ".lora_" not in n)
    assert any(n.startswith("LoRA r=4 alpha=8") for n in enc.notes)


def test_merge_of_the_state_dict_equals_peft_merge_and_unload(tiny_bert):
    from peft import get_peft_model, set_peft_model_state_dict
    from transformers import AutoModel

    settings = LoraSettings(r=4, alpha=8.0)
    enc = lora_encoder(tiny_bert, r=settings.r, alpha=settings.alpha)
    state = {k: v.detach().clone() for k, v in enc.state_dict().items()}
    merged = merge_lora_state(state, settings.scaling)
    ours = {k[len("backbone."):]: v for k, v in merged.items() if k.startswith("backbone.")}

    base = AutoModel.from_pretrained(tiny_bert, add_pooling_layer=False)
    ref = get_peft_model(base, peft_config(settings, base))
    result = set_peft_model_state_dict(ref, adapter_state(state))  # also checks peft's saved key names
    assert not result.unexpected_keys
    theirs = ref.merge_and_unload().state_dict()
    assert ours.keys() == theirs.keys()
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], rtol=1e-6, atol=1e-6)
    # the adapter really changed the weights it adapts (B is not zero)
    w = "encoder.layer.0.attention.self.query.weight"
    assert (ours[w] - state[f"backbone.encoder.layer.0.attention.self.query.base_layer.weight"]).abs().max() > 1e-3


def test_padding_free_forward_covers_adapted_layers(tiny_bert):
    """The padding-free forward runs the adapted linears (their own forward): values and the
    adapters' gradients equal the model's own forward."""
    enc = lora_encoder(tiny_bert)
    assert enc.packed
    feats = enc.tokenize(SENTENCES, 32)
    out = {}
    for packed in (True, False):
        enc.packed = packed
        enc.zero_grad()
        emb = enc(feats["input_ids"], feats["attention_mask"])
        emb.pow(2).sum().backward()
        grads = {n: p.grad.clone() for n, p in enc.named_parameters() if p.requires_grad}
        out[packed] = (emb.detach(), grads)
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=1e-5)
    for n, g in out[False][1].items():
        torch.testing.assert_close(out[True][1][n], g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("pooler", ["cls", "avg"])
def test_merged_export_loads_in_automodel_and_sentence_transformers(tmp_path, tiny_bert, pooler):
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    from hncse_dist.export import write_export

    enc = lora_encoder(tiny_bert, pooler=pooler)
    want = enc.encode(SENTENCES)
    write_export(enc, tmp_path / "m", {k: v.detach() for k, v in enc.state_dict().items()})
    files = {p.name for p in (tmp_path / "m").iterdir()}
    assert "model.safetensors" in files and "adapter_config.json" not in files
    plain = AutoModel.from_pretrained(str(tmp_path / "m"))
    assert not any("lora" in n or "base_layer" in n for n in plain.state_dict())
    st = SentenceTransformer(str(tmp_path / "m"), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    assert cosines(st.cpu(), want).min() > 0.9999
    again = Encoder.from_pretrained(str(tmp_path / "m"), pooler=None).encode(SENTENCES)
    torch.testing.assert_close(again, want, rtol=1e-5, atol=1e-5)


def test_adapter_export_loads_with_peft_sentence_transformers_and_encoder(tmp_path, tiny_bert):
    from peft import PeftModel
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    from hncse_dist.export import write_export

    enc = lora_encoder(tiny_bert, pooler="avg", export="both")
    want = enc.encode(SENTENCES)
    write_export(enc, tmp_path / "both", {k: v.detach() for k, v in enc.state_dict().items()})
    adapter = tmp_path / "both" / "adapter"
    assert (tmp_path / "both" / "model.safetensors").is_file()
    assert (adapter / "adapter_config.json").is_file() and not (adapter / "model.safetensors").exists()
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and Path(config["base_model_name_or_path"]) == Path(tiny_bert).resolve()
    assert sorted(config["target_modules"]) == ["dense", "key", "query", "value"]
    # peft on the untouched base model
    base = AutoModel.from_pretrained(tiny_bert, add_pooling_layer=False)
    peft_model = PeftModel.from_pretrained(base, str(adapter)).eval()
    feats = enc.tokenize(SENTENCES, 512)
    with torch.no_grad():
        hidden = peft_model(**feats).last_hidden_state
    m = feats["attention_mask"].unsqueeze(-1).float()
    assert cosines((hidden * m).sum(1) / m.sum(1), want).min() > 0.9999
    # sentence-transformers and this package load the adapter folder on its own
    st = SentenceTransformer(str(adapter), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    assert cosines(st.cpu(), want).min() > 0.9999
    ours = Encoder.from_pretrained(str(adapter), pooler=None).encode(SENTENCES)
    torch.testing.assert_close(ours, want, rtol=1e-5, atol=1e-5)


def test_family_default_targets_adapt_attention_and_mlp(tmp_path):
    from tests.model_families import DECODERS, ENCODERS, build_model

    for kind in ENCODERS + DECODERS:
        enc = Encoder.from_pretrained(build_model(kind, tmp_path / kind), "last" if kind in DECODERS else "avg",
                                      lora=LoraSettings(r=2))
        adapted = {n.split(".lora_A.")[0] for n, _ in enc.backbone.named_parameters() if ".lora_A." in n}
        kinds = {n.rsplit(".", 1)[-1] for n in adapted}
        assert kinds == set(DEFAULT_TARGETS[kind]), kind
        per_layer = len(adapted) / 2  # 2 layers
        # ModernBERT: attn.Wqkv, attn.Wo, mlp.Wi, mlp.Wo; decoders: q, k, v, o, gate, up, down
        expected = {"bert": 6, "roberta": 6, "xlm-roberta": 6, "deberta-v2": 6, "modernbert": 4}.get(kind, 7)
        assert per_layer == expected, (kind, sorted(adapted))


def test_unknown_target_module_is_one_clear_error(tiny_bert):
    from hncse_dist.families import ModelSetupError

    with pytest.raises(ModelSetupError, match=r"lora_target_modules=q_proj: .*named dense, key, query, value"):
        Encoder.from_pretrained(tiny_bert, "cls", lora=LoraSettings(r=2, targets=("q_proj",)))


def test_config_keys(tmp_path, tiny_bert):
    from hncse_dist.config import ConfigError, load_config

    corpus = tmp_path / "c.txt"
    corpus.write_text("x\n")
    base = [f"train_file={corpus}", "eval_file=null", f"model_name_or_path={tiny_bert}"]
    cfg = load_config(None, [*base, "lora_r=8", "lora_target_modules=query, value"]).validate()
    s = LoraSettings.from_config(cfg)
    assert (s.r, s.alpha, s.dropout, s.targets, s.export) == (8, 16.0, 0.0, ("query", "value"), "merged")
    assert LoraSettings.from_config(load_config(None, base).validate()) is None
    listed = load_config(None, [*base, "lora_r=2", "lora_target_modules=[query, key]"]).validate()
    assert LoraSettings.from_config(listed).targets == ("query", "key")
    with pytest.raises(ConfigError, match="lora_export='full': use one of merged, adapter, both"):
        load_config(None, [*base, "lora_export=full"]).validate()


@pytest.mark.slow
@pytest.mark.dist
def test_adapter_gradients_of_two_ranks_equal_one_process(tmp_path, tiny_bert):
    """Real DDP on 2 gloo processes, fp32: the adapters' and the head's gradients equal one
    process's on the global batch; the frozen weights get none."""
    from tests.launch import torchrun

    out = tmp_path / "report.json"
    torchrun(2, ["tests/scripts/lora_grad_check.py", tiny_bert, str(out), str(tmp_path / "corpus.txt")], timeout=300)
    report = json.loads(out.read_text())
    assert report["world"] == 2 and not report["frozen_with_grad"]
    names = report["names"]
    assert len([n for n in names if ".lora_A." in n]) == len([n for n in names if ".lora_B." in n]) == 12
    assert {"head.0.weight", "head.0.bias"} <= set(names)
    assert all(v > 0 for v in report["grad_norms"].values())  # every adapter really has a gradient
    worst = max(report["max_rel_err"].items(), key=lambda kv: kv[1])
    assert worst[1] < 1e-5, worst


def test_lora_without_peft_is_one_line_exit_2(tmp_path, tiny_bert, corpus):
    """A peft that cannot be imported (a package on the path that raises ImportError as a
    missing one does): the run stops before anything is trained or written."""
    import subprocess
    import sys

    from tests.launch import REPO, child_env
    from tests.test_train_e2e import common

    blocker = tmp_path / "no_peft" / "peft"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError(\"No module named 'peft'\")\n")
    env = child_env(PYTHONPATH=f"{blocker.parent}{os.pathsep}{REPO}")
    out = tmp_path / "run"
    for launch in ([], ["--nproc-per-node", "2"]):
        proc = subprocess.run([sys.executable, "-m", "hncse_dist.cli", "train", *launch,
                               *common(tiny_bert, corpus, out, lora_r=4)],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert lines == ["hncse-dist train: error: lora_r=4 needs the peft package: pip install hncse-dist[lora]"]
        assert not out.exists()
