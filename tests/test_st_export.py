"""Exported folders load in sentence-transformers with the trainer's own embeddings, for every
pooler (decoders with left and right padding included), whether sentence-transformers wrote the
files or, not installed, the exporter did; the real max_seq_length; the model card."""

import filecmp
import json
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from hncse_dist.encoder import POOLERS, Encoder
from hncse_dist.export import export_from_training, save_encoder
from hncse_dist.st_modules import FORMAT_VERSION
from tests.model_families import build_model

SENTENCES = ["a cat sleeps under the old tree near the river", "music", "the dog runs over the house quickly",
             "a bird sings", "green light in a dark city", "the old man reads a small book by the river at night"]
# (model, pooler, mlp_only_train, padding_side): every pooler on BERT, the cls head at evaluation
# time, and decoders padded on either side.
CASES = [("bert", p, True, None) for p in POOLERS] + [
    ("bert", "cls", False, None),
    ("llama", "last", True, "left"), ("llama", "last", True, "right"),
    ("qwen2", "last", True, "left"), ("qwen2", "last", True, "right"),
    ("llama", "avg", True, "left"), ("llama", "avg_first_last", True, "right"),
]
ST_FILES = {"modules.json", "config_sentence_transformers.json", "sentence_bert_config.json"}


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_bert):
    root = tmp_path_factory.mktemp("st_models")
    return lambda kind: tiny_bert if kind == "bert" else build_model(kind, root / kind)


def spread(enc: Encoder, std: float = 0.1) -> Encoder:
    """Wider random weights: at the default init (std 0.02) a 2-layer model's layers barely
    differ (avg vs avg_first_last: cosine 0.99988) and could not tell the poolers apart."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in enc.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return enc


def encoder(models, kind, pooler, mlp_only_train=True, padding_side=None) -> Encoder:
    torch.manual_seed(0)  # the MLP head
    return spread(Encoder.from_pretrained(models(kind), pooler=pooler, mlp_only_train=mlp_only_train,
                                          padding_side=padding_side))


def st_model(folder):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu")


def st_encode(model, sentences=SENTENCES):
    return model.encode(sentences, convert_to_tensor=True, batch_size=3).cpu().float()


def cosines(a, b):
    return torch.nn.functional.cosine_similarity(a, b)


@pytest.mark.parametrize("kind, pooler, mlp_only_train, padding_side", CASES)
def test_sentence_transformers_gives_the_encoders_embeddings(models, tmp_path, kind, pooler, mlp_only_train,
                                                             padding_side):
    enc = encoder(models, kind, pooler, mlp_only_train, padding_side)
    enc.save_pretrained(tmp_path / "out")
    model = st_model(tmp_path / "out")
    ours = enc.encode(SENTENCES, batch_size=2)
    cos = cosines(st_encode(model), ours)
    assert cos.min() > 0.9999, cos
    assert model.tokenizer.padding_side == enc.tokenizer.padding_side
    names = [type(m).__name__ for m in model]
    assert names[-1] == ("Dense" if not mlp_only_train else "Pooling")
    assert ("WeightedLayerPooling" in names) == (pooler == "avg_first_last")


def test_the_poolers_are_told_apart(models):
    """The check above has teeth: on these weights every pair of poolers that differ at
    evaluation gives embeddings far below cosine 0.9999 for some sentence."""
    for kind, poolers in (("bert", ["cls_before_pooler", "avg", "avg_first_last", "last", "cls+head"]),
                          ("llama", ["avg", "avg_first_last", "last"])):
        embs = {p: encoder(models, kind, p.removesuffix("+head"), mlp_only_train=not p.endswith("+head"))
                .encode(SENTENCES) for p in poolers}
        for i, a in enumerate(poolers):
            for b in poolers[i + 1:]:
                assert cosines(embs[a], embs[b]).min() < 0.99, (kind, a, b)


def _export(enc, folder, hidden_library, monkeypatch, **kw):
    with monkeypatch.context() as m:
        if hidden_library:
            m.setitem(sys.modules, "sentence_transformers", None)  # import sentence_transformers -> ImportError
        save_encoder(enc, folder, {k: v.detach() for k, v in enc.state_dict().items()}, **kw)


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("kind, pooler, mlp_only_train, padding_side", [
    ("bert", "cls", False, None), ("bert", "avg_first_last", True, None), ("llama", "last", True, "left")])
def test_folders_with_and_without_the_library_load_identically(models, tmp_path, monkeypatch, kind, pooler,
                                                               mlp_only_train, padding_side):
    import sentence_transformers

    enc = encoder(models, kind, pooler, mlp_only_train, padding_side)
    lib, own = tmp_path / "library", tmp_path / "own"
    _export(enc, lib, False, monkeypatch, max_seq_length=24)
    _export(enc, own, True, monkeypatch, max_seq_length=24)
    # the library wrote its own files; without it they are sentence-transformers 3's
    versions = {f: json.loads((f / "config_sentence_transformers.json").read_text())["__version__"] for f in (lib, own)}
    assert versions[lib]["sentence_transformers"] == sentence_transformers.__version__
    assert versions[own]["sentence_transformers"] == FORMAT_VERSION
    types = json.loads((own / "modules.json").read_text())
    assert all(t["type"].startswith("sentence_transformers.models.") for t in types)
    # the same files; those of the model, the tokenizer and the card byte for byte
    assert _files(lib) == _files(own)
    st_owned = ST_FILES | {f for f in _files(own) if "/" in f}
    for name in _files(own) - st_owned:
        assert filecmp.cmp(lib / name, own / name, shallow=False), name
    a, b = st_model(lib), st_model(own)
    assert [type(m) for m in a] == [type(m) for m in b]
    assert [m.get_config_dict() for m in a] == [m.get_config_dict() for m in b]
    assert a.max_seq_length == b.max_seq_length == 24
    assert a.similarity_fn_name == b.similarity_fn_name == "cosine"
    assert torch.equal(st_encode(a), st_encode(b))


def test_max_seq_length_is_the_runs(models, tmp_path):
    from transformers import AutoTokenizer

    enc = encoder(models, "bert", "avg")
    state = {k: v.detach() for k, v in enc.state_dict().items()}
    save_encoder(enc, tmp_path / "out", state, card={"config": {"max_seq_length": 12}})
    model = st_model(tmp_path / "out")
    assert model.max_seq_length == 12
    assert AutoTokenizer.from_pretrained(str(tmp_path / "out")).model_max_length == 12
    long = [" ".join(SENTENCES)]  # ~50 tokens
    got = st_encode(model, long)
    assert cosines(got, enc.encode(long, max_length=12)).min() > 0.9999
    assert cosines(got, enc.encode(long, max_length=128)).min() < 0.99  # it really was cut at 12
    # an explicit max_seq_length wins over the card's
    save_encoder(enc, tmp_path / "explicit", state, max_seq_length=20, card={"config": {"max_seq_length": 12}})
    assert st_model(tmp_path / "explicit").max_seq_length == 20


@pytest.mark.parametrize("kind, limit", [
    ("bert", 128),      # 128 positions, tokenizer limit 512
    ("roberta", 126),   # positions counted from padding_idx + 1 = 2
    ("llama", 128),     # the tokenizer names no limit
])
def test_max_seq_length_defaults_to_the_models_limit(models, tmp_path, kind, limit):
    enc = Encoder.from_pretrained(models(kind), pooler="avg")
    enc.save_pretrained(tmp_path / "out")
    model = st_model(tmp_path / "out")
    assert model.max_seq_length == limit
    text = [" ".join(["the old city music reads a small book"] * 40)]  # far more tokens than positions
    assert len(model.tokenizer(text)["input_ids"][0]) > 128
    st_encode(model, text)  # cut at the limit: every position exists
    if kind == "roberta":
        model.max_seq_length = 128  # the table's size is two positions too many
        with pytest.raises((IndexError, RuntimeError), match="out of (range|bounds)"):
            st_encode(model, text)


@pytest.mark.parametrize("hidden_library", [False, True])
def test_re_export_of_an_exported_folder_keeps_its_max_seq_length(models, tmp_path, monkeypatch, hidden_library):
    from hncse_dist.export import export_any

    enc = encoder(models, "bert", "avg_first_last")
    _export(enc, tmp_path / "a", hidden_library, monkeypatch, max_seq_length=20)
    with monkeypatch.context() as m:
        if hidden_library:
            m.setitem(sys.modules, "sentence_transformers", None)
        export_any(str(tmp_path / "a"), str(tmp_path / "b"))
    model = st_model(tmp_path / "b")
    assert model.max_seq_length == 20
    assert cosines(st_encode(model), enc.encode(SENTENCES)).min() > 0.9999
    # another pooler: the hidden layers are no longer handed on
    export_any(str(tmp_path / "a"), str(tmp_path / "c"), pooler="avg")
    assert json.loads((tmp_path / "c" / "config.json").read_text())["output_hidden_states"] is False
    model = st_model(tmp_path / "c")
    assert [type(m).__name__ for m in model] == ["Transformer", "Pooling"]
    avg = Encoder.from_pretrained(str(tmp_path / "c"), pooler=None)
    assert avg.pooler == "avg" and cosines(st_encode(model), avg.encode(SENTENCES)).min() > 0.9999


def _fake_run(tmp_path, tiny_bert):
    """A run folder as the trainer leaves it: config.json, metrics.jsonl and a complete
    checkpoint at step 4 of 10 written by 2 processes (weights: the model's own)."""
    from safetensors.torch import save_file

    from hncse_dist.checkpoint import MARKER, step_dir_name
    from hncse_dist.config import TrainConfig
    from hncse_dist.metrics import STSB_DEV_KEY

    run = tmp_path / "run"
    cfg = TrainConfig(model_name_or_path=tiny_bert, train_file=str(tmp_path / "wiki.txt"), objective="hncse",
                      pooler="avg", batch_size=8, max_steps=10, max_seq_length=20, learning_rate=1e-5,
                      temperature=0.07, pm_w1=0.7, pm_w2=0.3, hnm_k=4, hnm_alpha=None, bank_size=3,
                      output_dir=str(run), resume="latest")
    ckpt = run / "checkpoints" / step_dir_name(4)
    ckpt.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    records = [{"step": 2, STSB_DEV_KEY: 61.25}, {"step": 3, "loss": 1.0}, {"step": 4, STSB_DEV_KEY: 58.5},
               {"step": 6, STSB_DEV_KEY: 70.0}]  # step 6 comes after the checkpoint
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 7, "lo')
    enc = Encoder.from_pretrained(tiny_bert, pooler="avg")
    save_file({k: v.contiguous() for k, v in enc.state_dict().items()}, str(ckpt / "model.safetensors"))
    (ckpt / MARKER).write_text(json.dumps({"step": 4, "world_size": 2, "run_id": "r", "time": 0.0}))
    return cfg, ckpt, enc


def test_export_of_a_checkpoint_writes_the_runs_model_card(tmp_path, tiny_bert):
    from hncse_dist.cli import main
    from hncse_dist.config import load_config

    cfg, ckpt, enc = _fake_run(tmp_path, tiny_bert)
    out = tmp_path / "exported"
    assert main(["export", str(ckpt), str(out)]) == 0
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: sentence-transformers\n")
    assert "base_model:" not in card  # a local folder is no Hub id
    for row in ("| objective | `hncse`: HNCSE: SimCSE with positive mixing and hard negative mixing |",
                "| pooler | `avg` |", "| temperature | 0.07 |", "| learning_rate | 1e-05 |",
                "| batch size | 8 per process x 2 processes = 16 sentences a step |", "| steps | 4 of 10 |",
                "| max_seq_length | 20 |",
                "| positive mixing | threshold 0.1, w1 0.7, w2 0.3, nonpositive skip, weight_grad False |",
                "| hard negative mixing | k 4, m 40, alpha U(0,1), query_mix 0, beta_max 0.5, use_batch True, "
                "grad False, mask_duplicates True |",
                "| negative bank | bank_size 3, bank_warmup_steps 0, bank_in_logits False |",
                "STS-B dev Spearman x 100: 58.50 for these weights (step 4); best of the run 61.25."):
        assert row in card, row
    # the card's command is the run again: every key as recorded (resume aside)
    command = card.split("as overrides:\n\n```bash\n")[1].split("\n```")[0]
    words = shlex.split(command)
    assert words[:2] == ["hncse-dist", "train"] and not any(w.startswith("resume=") for w in words)
    again = asdict(load_config(None, words[2:]))
    assert again == {**asdict(cfg), "resume": None}
    model = st_model(out)
    assert model.max_seq_length == 20
    assert cosines(st_encode(model), enc.encode(SENTENCES)).min() > 0.9999


def test_export_from_training_takes_the_card(tmp_path, tiny_bert):
    from accelerate import Accelerator

    from hncse_dist.model_card import command_line

    enc = Encoder.from_pretrained(tiny_bert, pooler="cls_before_pooler")
    card = {"config": {"model_name_or_path": "all-MiniLM-L6-v2", "objective": "simcse", "max_seq_length": 16,
                       "pooler": "cls_before_pooler", "batch_size": 4},
            "world_size": 1, "step": 7, "stsb_dev": 80.0, "best_stsb_dev": 80.0,
            "command": command_line(["train", "--config", "configs/quickstart.yaml", "objective=simcse"])}
    export_from_training(Accelerator(cpu=True), enc, tmp_path / "best", "fp32", card=card)
    text = (tmp_path / "best" / "README.md").read_text()
    assert "base_model: sentence-transformers/all-MiniLM-L6-v2" in text
    assert "# SIMCSE sentence encoder from sentence-transformers/all-MiniLM-L6-v2" in text
    assert "hncse-dist train --config configs/quickstart.yaml objective=simcse\n" in text
    assert "| batch size | 4 per process x 1 process = 4 sentences a step |" in text
    assert "80.00 for these weights (step 7)" in text
    assert st_model(tmp_path / "best").max_seq_length == 16


def test_a_folder_without_a_run_gets_a_card_without_training(tmp_path, tiny_bert):
    Encoder.from_pretrained(tiny_bert, pooler="avg").save_pretrained(tmp_path / "out")
    text = (tmp_path / "out" / "README.md").read_text()
    assert "Transformer -> Pooling" in text and "## Training" not in text and "Inputs are cut at 128 tokens" in text


def test_an_unknown_card_key_is_refused(tmp_path, tiny_bert):
    enc = Encoder.from_pretrained(tiny_bert, pooler="avg")
    with pytest.raises(ValueError, match=r"unknown model card keys \['stsb'\]"):
        enc.save_pretrained(tmp_path / "out", card={"stsb": 80.0})


def test_a_zero3_run_loads_the_library_copy_whole(tmp_path, tiny_bert, monkeypatch):
    """Under ZeRO-3 transformers builds models in zero.Init, a collective: the export's
    round trip through sentence-transformers, on the main process alone, would wait forever."""
    import deepspeed
    import sentence_transformers
    from transformers.integrations import HfDeepSpeedConfig
    from transformers.integrations import deepspeed as hf_deepspeed

    def collective(*args, **kwargs):
        raise AssertionError("zero.Init on one rank")

    enc = Encoder.from_pretrained(tiny_bert, pooler="avg")
    monkeypatch.setattr(deepspeed.zero.Init, "__init__", collective)
    registered = HfDeepSpeedConfig({"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    try:
        assert hf_deepspeed.is_deepspeed_zero3_enabled()
        enc.save_pretrained(tmp_path / "out")
        assert hf_deepspeed.is_deepspeed_zero3_enabled()  # registered again afterwards
    finally:
        hf_deepspeed.unset_hf_deepspeed_config()
        del registered
    version = json.loads((tmp_path / "out" / "config_sentence_transformers.json").read_text())["__version__"]
    assert version["sentence_transformers"] == sentence_transformers.__version__  # not the fallback


def test_repeated_exports_keep_no_mapping_of_the_weights(models, tmp_path):
    """Each export loads the folder with sentence-transformers to re-save its files; the loaded
    weights are views of the memory-mapped model.safetensors. A run exports best/ at every
    improving evaluation: a mapping left behind by each one (of a file since replaced) grew a
    long run's memory by the model's size per export."""
    enc = encoder(models, "bert", "avg")
    out = tmp_path / "best"

    def mappings() -> int:
        with open("/proc/self/maps") as maps:
            return sum(str(out / "model.safetensors") in line for line in maps)

    for _ in range(3):
        enc.save_pretrained(out)
        assert mappings() == 0


def test_the_library_re_save_does_not_load_the_weights(tmp_path):
    """The re-save only takes the library's configuration files: loading the backbone for it
    would hold the model's size more on the exporting rank (its peak under ZeRO, beside the
    gathered state dict), and write a copy of it that is thrown away."""
    from hncse_dist.st_modules import resave
    from tests.fixtures import build_tiny_bert, reset_peak_rss, status_mb

    # 30522 x 512 embeddings + 2 layers: 78 MB of fp32 weights
    enc = Encoder.from_pretrained(build_tiny_bert(tmp_path / "bert", hidden=512, heads=8), pooler="avg")
    out = tmp_path / "out"
    enc.save_pretrained(out)
    weights_mb = (out / "model.safetensors").stat().st_size / 2**20
    assert weights_mb > 70
    before = {f: (out / f).read_bytes() for f in ("modules.json", "sentence_bert_config.json")}
    base = reset_peak_rss()
    resave(out)
    grew = status_mb("VmHWM") - base
    assert grew < 0.25 * weights_mb, f"the re-save's peak grew by {grew:.0f} MB ({weights_mb:.0f} MB of weights)"
    assert {f: (out / f).read_bytes() for f in before} == before  # the same files as the full load wrote
    assert not list(tmp_path.glob(".out-st-*"))  # no copy of the weights left behind


def test_where_the_backbone_cannot_be_built_on_meta_the_re_save_loads_it_whole(models, tmp_path):
    """Older transformers / sentence-transformers releases refuse a meta backbone (or move it to
    the CPU, which a meta tensor cannot do): the re-save then loads the weights, as before."""
    from sentence_transformers import SentenceTransformer

    from hncse_dist.st_modules import _load_without_weights

    class NoMeta(SentenceTransformer):
        def __init__(self, *args, model_kwargs=None, **kwargs):
            if (model_kwargs or {}).get("device_map") == "meta":
                raise NotImplementedError("Cannot copy out of meta tensor")
            super().__init__(*args, model_kwargs=model_kwargs, **kwargs)

    enc = encoder(models, "bert", "cls", mlp_only_train=False)
    out = tmp_path / "out"
    enc.save_pretrained(out)
    whole, meta = _load_without_weights(NoMeta, out), _load_without_weights(SentenceTransformer, out)
    assert next(whole[0].auto_model.parameters()).device.type == "cpu"
    assert next(meta[0].auto_model.parameters()).device.type == "meta"
    assert torch.equal(st_encode(whole), st_encode(st_model(out)))
    for model, name in ((whole, "whole"), (meta, "meta")):
        model.save(str(tmp_path / name), create_model_card=False)
    assert (tmp_path / "whole" / "model.safetensors").is_file()
    assert not (tmp_path / "meta" / "model.safetensors").exists()
    for name in ("modules.json", "config_sentence_transformers.json", "sentence_bert_config.json",
                 "1_Pooling/config.json", "2_Dense/config.json", "2_Dense/model.safetensors"):
        assert filecmp.cmp(tmp_path / "whole" / name, tmp_path / "meta" / name, shallow=False), name


def test_a_process_without_the_library_imported_re_saves_in_a_child(tiny_bert, tmp_path):
    """Importing sentence-transformers holds ~270 MB for the rest of a process: a training rank
    that exports need not import it (``export_st_resave``, auto under DeepSpeed); the re-save then
    runs in a child and writes the same files."""
    import subprocess
    import sys

    import sentence_transformers

    from tests.launch import REPO, child_env

    here = tmp_path / "here"
    Encoder.from_pretrained(tiny_bert, pooler="cls", mlp_only_train=False).save_pretrained(here)
    script = ("import sys, json; from hncse_dist.encoder import Encoder; "
              "from hncse_dist.st_modules import set_resave_in_child; set_resave_in_child(True); "
              f"Encoder.from_pretrained({str(here)!r}, pooler=None).save_pretrained({str(tmp_path / 'child')!r}); "
              "print(json.dumps('sentence_transformers' in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=child_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "false"  # the exporting process never imported it
    assert "could not re-save" not in proc.stderr
    child = tmp_path / "child"
    version = json.loads((child / "config_sentence_transformers.json").read_text())["__version__"]
    assert version["sentence_transformers"] == sentence_transformers.__version__  # the library's files
    assert _files(child) == _files(here)
    for name in _files(here) - {"README.md"}:
        assert filecmp.cmp(child / name, here / name, shallow=False), name
