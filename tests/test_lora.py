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


def test_gradient_checkpointing_keeps_the_adapter_gradients(tiny_bert):
    """The embeddings are frozen, so no checkpointed layer's input requires grad: the adapters
    inside must still get their gradients (the model's own forward, which checkpoints)."""
    grads = []
    for checkpointing in (False, True):
        enc = lora_encoder(tiny_bert)  # the same seed: the same backbone dropout masks in both runs
        enc.packed = False
        if checkpointing:
            enc.enable_checkpointing()
        feats = enc.train().tokenize(SENTENCES, 32)
        enc(feats["input_ids"], feats["attention_mask"]).pow(2).sum().backward()
        grads.append({n: p.grad for n, p in enc.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for n, g in grads[0].items():
        assert grads[1][n] is not None, n
        torch.testing.assert_close(grads[1][n], g, rtol=1e-5, atol=1e-7)


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
    assert len(config["target_modules"]) == 12  # the adapted layers by full name: BERT's pooler is not one
    assert {t.rsplit(".", 1)[-1] for t in config["target_modules"]} == {"dense", "key", "query", "value"}
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
    # 'hncse-dist export' of the adapter folder: a plain model with the same embeddings
    from hncse_dist.export import export_any

    export_any(str(adapter), str(tmp_path / "plain"))
    assert (tmp_path / "plain" / "model.safetensors").is_file()
    plain = SentenceTransformer(str(tmp_path / "plain"), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    assert cosines(plain.cpu(), want).min() > 0.9999


def test_adapter_folder_of_the_first_last_pooler_in_sentence_transformers(tmp_path, tiny_bert):
    """SentenceTransformer builds an adapter folder's config from the base model's, which does
    not output the hidden layers avg_first_last reads: the folder asks for them."""
    from sentence_transformers import SentenceTransformer

    from hncse_dist.export import write_export

    enc = lora_encoder(tiny_bert, pooler="avg_first_last", export="adapter")
    want = enc.encode(SENTENCES)
    write_export(enc, tmp_path / "a", {k: v.detach() for k, v in enc.state_dict().items()})
    assert not (tmp_path / "a" / "config.json").exists()
    st = SentenceTransformer(str(tmp_path / "a"), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    assert cosines(st.cpu(), want).min() > 0.9999


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


# ------------------------------------------------------------------------------ training runs

LR = 1e-2  # large enough that 6 steps move the adapters visibly


def run_args(tiny_bert, corpus, out, **kw):
    from tests.test_train_e2e import common

    return common(tiny_bert, corpus, out, **{"max_steps": 6, "save_every": 3, "keep_last": 0, "lora_r": 4,
                                             "learning_rate": LR, **kw})


def curve(out):
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}


@pytest.fixture(scope="module")
def ddp_lora_run(tmp_path_factory, tiny_bert, corpus):
    from tests.test_train_e2e import run_cli

    out = tmp_path_factory.mktemp("lora-ddp") / "run"
    run_cli(["train", "--nproc-per-node", "2", *run_args(tiny_bert, corpus, out)], timeout=900)
    return out


def trained_peft_embeddings(tiny_bert, ckpt, sentences):
    """CLS embeddings of peft's own model (the untouched base + the checkpoint's adapter, not merged)."""
    from peft import get_peft_model, set_peft_model_state_dict
    from transformers import AutoModel, AutoTokenizer

    from hncse_dist.export import _checkpoint_state_dict

    raw = _checkpoint_state_dict(ckpt)
    base = AutoModel.from_pretrained(tiny_bert, add_pooling_layer=False)
    model = get_peft_model(base, peft_config(LoraSettings(r=4), base))
    assert not set_peft_model_state_dict(model, adapter_state(raw)).unexpected_keys
    feats = AutoTokenizer.from_pretrained(tiny_bert)(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model.eval()(**feats).last_hidden_state[:, 0], raw


def check_lora_run(out, tiny_bert, tmp_path):
    """Base weights bit-identical to the pretrained ones, adapters trained, final/ (merged) loads in
    AutoModel and SentenceTransformer with peft's embeddings, and equals 'hncse-dist export'."""
    from safetensors.torch import load_file
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel, AutoTokenizer

    from tests.test_train_e2e import run_cli

    ckpt = out / "checkpoints" / "step-00000006"
    want, raw = trained_peft_embeddings(tiny_bert, ckpt, SENTENCES)
    pretrained = load_file(str(Path(tiny_bert) / "model.safetensors"))
    backbone = {k[len("backbone."):].replace(".base_layer.", "."): v for k, v in raw.items()
                if k.startswith("backbone.") and ".lora_" not in k}
    assert backbone.keys() == pretrained.keys()
    for k, v in pretrained.items():
        assert torch.equal(backbone[k], v), k  # frozen: not one bit moved
    lora_b = [v for k, v in raw.items() if ".lora_B." in k]
    assert len(lora_b) == 12 and min(float(v.detach().abs().max()) for v in lora_b) > 1e-4  # B starts at 0: trained
    final = out / "final"
    plain = AutoModel.from_pretrained(str(final))
    assert not any("lora" in k or "base_layer" in k for k in plain.state_dict())
    feats = AutoTokenizer.from_pretrained(str(final))(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        auto = plain.eval()(**feats).last_hidden_state[:, 0]
    assert cosines(auto, want).min() > 0.9999
    st = SentenceTransformer(str(final), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    assert cosines(st.cpu(), want).min() > 0.9999
    run_cli(["export", str(ckpt), str(tmp_path / "exported")])
    a, b = load_file(str(final / "model.safetensors")), load_file(str(tmp_path / "exported" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return want


@pytest.mark.slow
@pytest.mark.dist
def test_ddp_lora_run_freezes_the_base_and_exports_a_plain_model(tmp_path, tiny_bert, ddp_lora_run):
    assert sorted(curve(ddp_lora_run)) == list(range(1, 7))
    check_lora_run(ddp_lora_run, tiny_bert, tmp_path)


@pytest.mark.slow
@pytest.mark.deepspeed
@pytest.mark.dist
@pytest.mark.parametrize("stage", [2, 3])
def test_zero_lora_run_matches_ddp_and_exports(tmp_path, tiny_bert, corpus, ddp_lora_run, stage):
    """ZeRO-2 and ZeRO-3 (adapters and head partitioned with the base) follow DDP's loss curve
    (fp32); final/ holds the merged model and, with lora_export=both, peft's adapter folder."""
    from sentence_transformers import SentenceTransformer

    from tests.test_train_e2e import run_cli

    out = tmp_path / "run"
    run_cli(["train", "--nproc-per-node", "2", *run_args(tiny_bert, corpus, out, deepspeed=f"ds_configs/zero{stage}.json",
                                                        lora_export="both")], timeout=900)
    got, ref = curve(out), curve(ddp_lora_run)
    assert sorted(got) == sorted(ref) == list(range(1, 7))
    assert [got[s] for s in got] == pytest.approx([ref[s] for s in got], rel=1e-4, abs=1e-5)
    want = check_lora_run(out, tiny_bert, tmp_path)
    adapter = out / "final" / "adapter"
    assert (adapter / "adapter_model.safetensors").is_file() and not (adapter / "model.safetensors").exists()
    st = SentenceTransformer(str(adapter), device="cpu").encode(SENTENCES, convert_to_tensor=True)
    assert cosines(st.cpu(), want).min() > 0.9999


@pytest.mark.slow
@pytest.mark.dist
def test_resume_from_a_lora_checkpoint_continues_the_loss_curve(tmp_path, tiny_bert, corpus, ddp_lora_run):
    """The run folder as it was at the step-3 checkpoint, resumed: steps 4-6 and the final model
    equal the uninterrupted run's (fp32, CPU: bit for bit)."""
    import shutil

    from safetensors.torch import load_file

    from tests.test_train_e2e import run_cli

    out = tmp_path / "cut"
    shutil.copytree(ddp_lora_run, out, ignore=shutil.ignore_patterns("run.lock"))
    for name in ("checkpoints/step-00000006", "final", "best", "summary.json"):
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    lines = [line for line in (out / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 3]
    (out / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    proc = run_cli(["train", "--nproc-per-node", "2", *run_args(tiny_bert, corpus, out, resume="latest")], timeout=900)
    assert "at step 3" in proc.stdout + proc.stderr
    got, want = curve(out), curve(ddp_lora_run)
    assert sorted(got) == list(range(1, 7))
    assert [got[s] for s in range(1, 7)] == [want[s] for s in range(1, 7)]
    a = load_file(str(out / "checkpoints" / "step-00000006" / "model.safetensors"))
    b = load_file(str(ddp_lora_run / "checkpoints" / "step-00000006" / "model.safetensors"))
    assert any(".lora_A." in k for k in a) and all(torch.equal(a[k], b[k]) for k in b)


@pytest.mark.slow
def test_unknown_target_module_under_the_launcher_is_one_line(tmp_path, tiny_bert, corpus):
    from tests.test_train_e2e import run_cli

    proc = run_cli(["train", "--nproc-per-node", "2", *run_args(tiny_bert, corpus, tmp_path / "r",
                                                                lora_target_modules="q_proj,v_proj")],
                   check=False, timeout=120)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("hncse-dist train: error: lora_target_modules=q_proj,v_proj: ")
    assert lines[0].endswith("the linear layers of bert are named dense, key, query, value")
