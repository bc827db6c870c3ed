"""The sentence-transformers side of an exported folder: which modules give each pooler, and
the files that describe them.

Every pooler maps to stock sentence-transformers modules, so a folder loads with
``SentenceTransformer(path)`` alone (no hncse-dist, no ``trust_remote_code``):

  cls, cls_before_pooler  Transformer -> Pooling(cls) [-> Dense(Tanh): cls with the head used
                          at evaluation, mlp_only_train=false]
  avg                     Transformer -> Pooling(mean)
  last                    Transformer -> Pooling(lasttoken) (left and right padding alike)
  avg_first_last          Transformer -> WeightedLayerPooling(layer_start=1, weight 1 on the first
                          and the last layer, 0 between) -> Pooling(mean); the folder's
                          config.json sets ``output_hidden_states`` so that the Transformer
                          passes the hidden layers on (without them WeightedLayerPooling would
                          silently pool the last layer alone)

``st_layout`` is the one description of these files. ``write_files`` writes it in the format of
sentence-transformers 3, which every later version reads. When sentence-transformers is
installed, ``save_with_library`` then loads the folder with it and saves it again, so that
modules.json, config_sentence_transformers.json, sentence_bert_config.json and the module
folders are the installed version's own; the backbone, its config and the tokenizer stay the
exporter's (the library would add, for one, BERT's unused pooler). The library's backbone is
built on the meta device and not saved: the round trip reads and writes no weights (on the
exporting rank of a ZeRO run it would otherwise hold one more copy of the model). A trainer
may have it run in a child process (``set_resave_in_child``; ``export_st_resave``): the import
alone holds ~270 MB, which a training rank would keep after its first export.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.metadata
import importlib.util
import inspect
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .model_path import backbone_load_kwargs

ROOT_CONFIG = "sentence_bert_config.json"  # the Transformer module's file, in the folder's root
# The format written without the library: sentence-transformers 3's, which versions 3 to 6 load.
FORMAT_VERSION = "3.0.0"
POOLING_MODES = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens", "lasttoken")
# Each pooler's Pooling mode (the short names of ``Pooling(pooling_mode=...)``).
POOLING_OF = {"cls": "cls", "cls_before_pooler": "cls", "avg": "mean", "avg_first_last": "mean", "last": "lasttoken"}
_LONG_MODE = {"cls": "cls_token", "mean": "mean_tokens", "lasttoken": "lasttoken"}
# transformers' model_max_length when a tokenizer names no limit is int(1e30)
_NO_LIMIT = 1_000_000


@dataclass
class StModule:
    """One module of the layout: its class in ``sentence_transformers.models``, its config file
    (the keys sentence-transformers 3 writes) and its weights, if any."""

    kind: str
    config: dict
    weights: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def type(self) -> str:
        return f"sentence_transformers.models.{self.kind}"


def layer_weights(pooler: str, num_layers: int) -> list[float] | None:
    """WeightedLayerPooling's weights over hidden layers 1..num_layers for poolers that average
    more than the last layer; None for those that read the last layer only."""
    if pooler != "avg_first_last":
        return None
    weights = [0.0] * num_layers
    weights[0] += 1.0
    weights[-1] += 1.0  # one layer: first == last, (h + h) / 2 = h
    return weights


def needs_hidden_states(pooler: str) -> bool:
    return layer_weights(pooler, 1) is not None


def st_layout(pooler: str, hidden: int, num_layers: int, max_seq_length: int,
              head_sd: dict[str, torch.Tensor] | None = None) -> list[StModule]:
    """The modules of ``pooler`` (see the module docstring); ``head_sd``: the MLP head's state
    dict (``0.weight``, ``0.bias``) when evaluation uses it."""
    if pooler not in POOLING_OF:
        raise ValueError(f"no sentence-transformers layout for pooler {pooler!r}")
    modules = [StModule("Transformer", {"max_seq_length": int(max_seq_length), "do_lower_case": False})]
    weights = layer_weights(pooler, num_layers)
    if weights is not None:
        modules.append(StModule(
            "WeightedLayerPooling",
            {"word_embedding_dimension": hidden, "layer_start": 1, "num_hidden_layers": num_layers},
            {"layer_weights": torch.tensor(weights, dtype=torch.float32)}))
    mode = _LONG_MODE[POOLING_OF[pooler]]
    modules.append(StModule("Pooling", {"word_embedding_dimension": hidden,
                                        **{f"pooling_mode_{m}": m == mode for m in POOLING_MODES},
                                        "include_prompt": True}))
    if head_sd is not None:
        modules.append(StModule(
            "Dense",
            {"in_features": hidden, "out_features": hidden, "bias": True,
             "activation_function": "torch.nn.modules.activation.Tanh"},
            {"linear.weight": head_sd["0.weight"], "linear.bias": head_sd["0.bias"]}))
    return modules


def module_path(idx: int, module: StModule) -> str:
    """The folder sentence-transformers gives module ``idx``: the root for the Transformer."""
    return "" if idx == 0 else f"{idx}_{module.kind}"


def model_max_length(backbone: nn.Module, tokenizer) -> int:
    """The longest input the model takes: min(its position table, the tokenizer's limit).
    Learned positions counted from padding_idx + 1 (RoBERTa, XLM-R) lose those first rows."""
    limits = []
    positions = getattr(backbone.config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        offset = next((m.padding_idx + 1 for m in backbone.modules()
                       if isinstance(getattr(m, "padding_idx", None), int)
                       and isinstance(getattr(m, "position_embeddings", None), nn.Embedding)), 0)
        limits.append(positions - offset)
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_limit, int) and 0 < tokenizer_limit < _NO_LIMIT:
        limits.append(tokenizer_limit)
    return min(limits) if limits else 512


def patch_json(path: Path, **values) -> None:
    """Set ``values`` in the JSON object stored at ``path``."""
    data = json.loads(path.read_text())
    data.update(values)
    path.write_text(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def write_files(out: Path, layout: list[StModule]) -> None:
    """modules.json, config_sentence_transformers.json and every module's config (+ weights),
    as sentence-transformers 3 writes them."""
    import transformers
    from safetensors.torch import save_file

    entries = []
    for idx, module in enumerate(layout):
        path = module_path(idx, module)
        folder = out / path
        folder.mkdir(parents=True, exist_ok=True)
        (folder / (ROOT_CONFIG if idx == 0 else "config.json")).write_text(json.dumps(module.config, indent=4))
        if module.weights:
            save_file({k: v.detach().cpu().contiguous() for k, v in module.weights.items()},
                      str(folder / "model.safetensors"))
        entries.append({"idx": idx, "name": str(idx), "path": path, "type": module.type})
    (out / "modules.json").write_text(json.dumps(entries, indent=2))
    config = {"__version__": {"sentence_transformers": FORMAT_VERSION, "transformers": transformers.__version__,
                              "pytorch": torch.__version__},
              "model_type": "SentenceTransformer", "prompts": {}, "default_prompt_name": None,
              "similarity_fn_name": "cosine"}
    (out / "config_sentence_transformers.json").write_text(json.dumps(config, indent=2, sort_keys=True))


def library_version() -> str | None:
    """The installed sentence-transformers' version, or None; without importing it (an import
    holds ~270 MB for the rest of the process: a training rank's memory)."""
    if "sentence_transformers" in sys.modules:
        module = sys.modules["sentence_transformers"]
        return None if module is None else module.__version__
    if importlib.util.find_spec("sentence_transformers") is None:
        return None
    return importlib.metadata.version("sentence-transformers")


@contextlib.contextmanager
def _quiet_transformers():
    """No load report (BERT's pooler, which exports leave out), no progress bars and no
    sentence-transformers warning that ``device_map`` places the backbone."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    st_logger = logging.getLogger("sentence_transformers")
    st_level = st_logger.level
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    st_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        st_logger.setLevel(st_level)
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _whole_models():
    """While a ZeRO-3 run's DeepSpeed config is registered, transformers builds every model it
    loads inside zero.Init: partitioned across the ranks, a collective. The model loaded here
    lives on the main process alone (the other ranks wait for the export): load it whole."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    if ref is None or not hf_deepspeed.is_deepspeed_zero3_enabled():
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        if ref() is not None:
            hf_deepspeed.set_hf_deepspeed_config(ref())


def _load_kwargs(st_class, meta: bool = True) -> dict:
    """Load from the local folder only, in the dtype of the saved weights; ``meta``: the
    Transformer's backbone on the meta device (no weights read), else on the CPU."""
    import transformers
    from packaging import version

    dtype_key = "dtype" if version.parse(transformers.__version__) >= version.parse("4.56") else "torch_dtype"
    kwargs = {"device": "cpu", "model_kwargs": {dtype_key: "auto", **backbone_load_kwargs()}}
    if meta:  # sentence-transformers 6 places the backbone by device_map, the rest on the CPU
        kwargs["model_kwargs"]["device_map"] = "meta"
    if "local_files_only" in inspect.signature(st_class.__init__).parameters:
        kwargs["local_files_only"] = True
    return kwargs


def _load_without_weights(st_class, folder: Path):
    """``st_class(folder)`` with the Transformer module's backbone on the meta device and its
    weights left out of ``save``; the other modules (which sentence-transformers 6 builds on
    the meta device too) take theirs from their folders. Where the installed transformers
    cannot build a model on the meta device (or the installed sentence-transformers moves it
    to the CPU), loaded whole."""
    from safetensors.torch import load_file

    def whole():
        return st_class(str(folder), **_load_kwargs(st_class, meta=False))

    try:
        model = st_class(str(folder), **_load_kwargs(st_class))
    except (ValueError, TypeError, RuntimeError, NotImplementedError):
        return whole()
    backbone = getattr(model[0], "auto_model", None)
    if backbone is None or next(backbone.parameters()).device.type != "meta":
        return model
    entries = json.loads((folder / "modules.json").read_text())
    for module, entry in zip(list(model)[1:], entries[1:]):
        if any(t.is_meta for t in module.state_dict().values()):
            module.to_empty(device="cpu")
            try:
                module.load_state_dict(load_file(str(folder / entry["path"] / "model.safetensors")))
            except (RuntimeError, OSError):  # named or stored otherwise by this version
                return whole()
    backbone.save_pretrained = lambda *args, **kwargs: None  # its folder keeps the exporter's files
    return model


def resave(out: Path) -> None:
    """Load ``out`` (written by ``write_files``) with sentence-transformers, in this process,
    and save it again; keep the library's sentence-transformers files, not its backbone."""
    from sentence_transformers import SentenceTransformer

    ours = {e["path"] for e in json.loads((out / "modules.json").read_text()) if e["path"]}
    with _quiet_transformers(), _whole_models():
        model = _load_without_weights(SentenceTransformer, out)
        with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}-st-") as tmp:
            model.save(tmp, create_model_card=False)
            # Loaded whole, the weights are views of the memory-mapped model.safetensors, and
            # the library's modules hold reference cycles: without a collection here the
            # mapping (the model's size, of a file the next export replaces) outlives every export.
            del model
            gc.collect()
            saved = Path(tmp)
            folders = {e["path"] for e in json.loads((saved / "modules.json").read_text()) if e["path"]}
            for stale in ours - folders:
                shutil.rmtree(out / stale, ignore_errors=True)
            for path in folders:
                shutil.rmtree(out / path, ignore_errors=True)
                shutil.copytree(saved / path, out / path)
            for name in ("modules.json", "config_sentence_transformers.json", ROOT_CONFIG):
                shutil.copyfile(saved / name, out / name)


_RESAVE = {"in_child": False}


def set_resave_in_child(in_child: bool) -> None:
    """Where ``save_with_library`` re-saves from now on in this process (the trainer sets it
    from ``export_st_resave``): a child process, or this one (the default)."""
    _RESAVE["in_child"] = bool(in_child)


def save_with_library(out: Path, timeout: float = 600) -> None:
    """``resave(out)``: in a child process where ``set_resave_in_child`` asked for it and this
    process has not imported sentence-transformers (a training rank then never keeps the
    library's memory, at ~8 s an export on a CPU), else here."""
    if not _RESAVE["in_child"] or sys.modules.get("sentence_transformers") is not None:
        resave(out)
        return
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, (str(Path(__file__).resolve().parents[1]),
                                                         os.environ.get("PYTHONPATH")))))
    child = subprocess.run([sys.executable, "-m", "hncse_dist.st_modules", str(out)], env=env,
                           capture_output=True, text=True, timeout=timeout)
    if child.returncode != 0:
        lines = (child.stderr or child.stdout).strip().splitlines()
        raise RuntimeError(lines[-1] if lines else f"the re-save exited {child.returncode}")


def write_sentence_transformers_files(out: Path, layout: list[StModule], use_library: bool = True) -> None:
    """The folder's sentence-transformers files: through the installed library when there is
    one (and ``use_library``), else in sentence-transformers 3's format."""
    write_files(out, layout)
    version = library_version() if use_library else None
    if version is None:
        return
    try:
        save_with_library(out)
    except Exception as err:  # noqa: BLE001 - the files written above still load
        warnings.warn(f"sentence-transformers {version} could not re-save {out} "
                      f"({type(err).__name__}: {err}); its files stay in the sentence-transformers "
                      f"{FORMAT_VERSION} format", stacklevel=2)


if __name__ == "__main__":  # save_with_library's child process: python -m hncse_dist.st_modules FOLDER
    resave(Path(sys.argv[1]))
