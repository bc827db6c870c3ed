"""Shard writer: input formats, cleaning report, bad input, resume, manifest, CLI, cache."""

from __future__ import annotations

import gzip
import hashlib
import json
import multiprocessing
import os
import tarfile

import pytest

from hncse_dist.data import ensure_shards, load_manifest, shards_main, write_shards
from hncse_dist.data import shards as shards_module
from hncse_dist.data.tario import ShardReader


def read_all(shard_dir: str) -> list[tuple[str, str]]:
    manifest = load_manifest(shard_dir)
    out = []
    for entry in manifest["shards"]:
        with ShardReader(os.path.join(shard_dir, entry["name"])) as reader:
            out.extend(reader)
    return out


def texts_of(shard_dir: str) -> list[str]:
    return [text for _, text in read_all(shard_dir)]


def write_lines(path, lines: list[str]) -> str:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


# ----------------------------------------------------------------------------- cleaning


def test_cleaning_drops_and_counts_by_reason(tmp_path):
    lines = [
        "  keep me please  ",
        "",
        "   ",
        "ab",  # too short with min_chars=3
        "x" * 51,  # too long with max_chars=50
        "keep me please",  # duplicate after strip
        "\ufb01ne ligature",  # NFKC: "fi" ligature -> "fine ligature"
        "\uff21\uff22\uff23 fullwidth",  # NFKC: "ABC fullwidth"
        "fine ligature",  # duplicate only after normalization
    ]
    src = write_lines(tmp_path / "in.txt", lines)
    manifest = write_shards([src], str(tmp_path / "out"), 2, min_chars=3, max_chars=50, dedupe=True, progress=False)

    assert texts_of(str(tmp_path / "out")) == ["keep me please", "fine ligature", "ABC fullwidth"]
    assert manifest["dropped"] == {"empty": 2, "too_short": 1, "too_long": 1, "duplicate": 2}
    assert manifest["read"] == len(lines)
    assert manifest["total"] == 3
    assert [s["count"] for s in manifest["shards"]] == [2, 1]


def test_no_normalize_and_no_dedupe_keep_text_as_is(tmp_path):
    src = write_lines(tmp_path / "in.txt", ["\ufb01ne", "\ufb01ne"])
    write_shards([src], str(tmp_path / "out"), normalize=None, progress=False)
    assert texts_of(str(tmp_path / "out")) == ["\ufb01ne", "\ufb01ne"]


# ----------------------------------------------------------------------------- formats


def test_gzip_jsonl_csv_tsv_inputs(tmp_path):
    gz = tmp_path / "a.txt.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write("gz one\ngz two\n")
    jsonl = tmp_path / "b.jsonl"
    jsonl.write_text(
        '{"text": "json one"}\n'
        "not json\n"
        '{"other": "no text field"}\n'
        '{"text": 42}\n'
        '{"text": "json two"}\n',
        encoding="utf-8",
    )
    csv_path = tmp_path / "c.csv"
    csv_path.write_text('id,sentence\n1,"csv, with comma"\n2,"csv\nmultiline"\n', encoding="utf-8")
    tsv_path = tmp_path / "d.tsv"
    tsv_path.write_text("0.5\ttsv first\ttsv second\n", encoding="utf-8")

    out = tmp_path / "out"
    m1 = write_shards([str(gz), str(jsonl)], str(out / "1"), progress=False)
    m2 = write_shards([str(csv_path)], str(out / "2"), column="sentence", progress=False)
    m3 = write_shards([str(tsv_path)], str(out / "3"), column=2, progress=False)

    assert texts_of(str(out / "1")) == ["gz one", "gz two", "json one", "json two"]
    assert m1["dropped"] == {"bad_json": 1, "missing_field": 1, "not_text": 1}
    assert texts_of(str(out / "2")) == ["csv, with comma", "csv\nmultiline"]
    assert m2["read"] == 2
    assert texts_of(str(out / "3")) == ["tsv second"]
    assert m3["total"] == 1


def test_csv_unknown_column_is_a_clear_error(tmp_path):
    csv_path = tmp_path / "c.csv"
    csv_path.write_text("id,sentence\n1,hello\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"column 'text' not in header \['id', 'sentence'\].*--column"):
        write_shards([str(csv_path)], str(tmp_path / "out"), progress=False)


def test_parquet_through_datasets(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"sentence": ["pq one", "", "pq two"]}), str(path))
    manifest = write_shards([str(path)], str(tmp_path / "out"), text_field="sentence", progress=False)
    assert texts_of(str(tmp_path / "out")) == ["pq one", "pq two"]
    assert manifest["dropped"] == {"empty": 1}


# ----------------------------------------------------------------------------- bad bytes


def test_bad_utf8_nul_bytes_and_enormous_lines_are_counted(tmp_path):
    src = tmp_path / "bad.txt"
    src.write_bytes(
        b"good line\n"
        b"bad \xff\xfe bytes\n"
        b"nul\x00inside\n"
        + b"y" * 5000 + b"\n"  # longer than max_line_bytes below
        + b"after the long one\n"
        b"\x00\x00\x00\n"  # only NULs -> empty
        b"no newline at end"
    )
    # 3 of 6 lines need repair: refused by default (test_data_integrity.py), kept when allowed.
    manifest = write_shards([str(src)], str(tmp_path / "out"), max_line_bytes=1000, progress=False, allow_repairs=True)
    assert texts_of(str(tmp_path / "out")) == [
        "good line",
        "bad \ufffd\ufffd bytes",
        "nulinside",
        "after the long one",
        "no newline at end",
    ]
    assert manifest["repaired"] == {"invalid_utf8": 1, "nul_bytes": 2}
    assert manifest["dropped"] == {"oversized_line": 1, "empty": 1}


def test_truncated_gzip_keeps_what_was_read(tmp_path):
    data = gzip.compress(("\n".join(f"line {i}" for i in range(20000)) + "\n").encode())
    src = tmp_path / "cut.txt.gz"
    src.write_bytes(data[: len(data) // 2])
    manifest = write_shards([str(src)], str(tmp_path / "out"), progress=False)
    assert manifest["dropped"]["truncated_gzip"] == 1
    assert 0 < manifest["total"] < 20000


# ----------------------------------------------------------------------------- manifest


def test_manifest_sha_counts_and_determinism(tmp_path):
    src = write_lines(tmp_path / "in.txt", [f"sentence number {i}" for i in range(25)])
    m1 = write_shards([src], str(tmp_path / "a"), 10, progress=False)
    m2 = write_shards([src], str(tmp_path / "b"), 10, progress=False)
    assert m1["total"] == 25 and [s["count"] for s in m1["shards"]] == [10, 10, 5]
    for entry in m1["shards"]:
        path = tmp_path / "a" / entry["name"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
        assert path.stat().st_size == entry["bytes"]
    assert [s["sha256"] for s in m1["shards"]] == [s["sha256"] for s in m2["shards"]]
    assert m1["sources"][0]["path"] == os.path.abspath(src)
    assert m1["options"]["samples_per_shard"] == 10
    # Plain tar readable by standard tools, WebDataset layout: <key>.txt members.
    with tarfile.open(tmp_path / "a" / "shard-000000.tar") as tar:
        assert tar.getnames()[:2] == ["000000000000.txt", "000000000001.txt"]
    assert read_all(str(tmp_path / "a"))[11] == ("000000000011", "sentence number 11")
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["total"] == 25


# ----------------------------------------------------------------------------- resume


def _mtimes(directory) -> dict[str, int]:
    return {p.name: p.stat().st_mtime_ns for p in directory.glob("shard-*.tar")}


def test_rerun_is_a_no_op_and_corrupt_shard_is_rewritten(tmp_path):
    src = write_lines(tmp_path / "in.txt", [f"s {i}" for i in range(30)])
    out = tmp_path / "out"
    write_shards([src], str(out), 10, progress=False)
    before = _mtimes(out)

    again = write_shards([src], str(out), 10, progress=False)
    assert _mtimes(out) == before and again["kept_from_previous_run"] == 3

    damaged = out / "shard-000001.tar"
    damaged.write_bytes(b"garbage" + damaged.read_bytes()[7:])
    repaired = write_shards([src], str(out), 10, progress=False)
    after = _mtimes(out)
    assert repaired["kept_from_previous_run"] == 2
    assert after["shard-000000.tar"] == before["shard-000000.tar"]
    assert after["shard-000001.tar"] != before["shard-000001.tar"]
    assert hashlib.sha256(damaged.read_bytes()).hexdigest() == repaired["shards"][1]["sha256"]
    assert texts_of(str(out)) == [f"s {i}" for i in range(30)]


def test_interrupted_run_resumes_with_finished_shards(tmp_path, monkeypatch):
    src = write_lines(tmp_path / "in.txt", [f"s {i}" for i in range(50)])
    out = tmp_path / "out"
    real_write = shards_module.write_text_tar
    calls = {"n": 0}

    def crash_on_third(samples, path):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_write(samples, path)

    monkeypatch.setattr(shards_module, "write_text_tar", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        write_shards([src], str(out), 10, progress=False)
    assert not (out / "manifest.json").exists()
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert not list(out.glob(".*tmp*"))  # no half-written shard left behind

    monkeypatch.setattr(shards_module, "write_text_tar", real_write)
    manifest = write_shards([src], str(out), 10, progress=False)
    assert manifest["kept_from_previous_run"] == 2
    assert manifest["total"] == 50
    assert texts_of(str(out)) == [f"s {i}" for i in range(50)]


def test_changed_options_rewrite_and_remove_stale_shards(tmp_path):
    src = write_lines(tmp_path / "in.txt", [f"s {i}" for i in range(30)])
    out = tmp_path / "out"
    write_shards([src], str(out), 5, progress=False)
    manifest = write_shards([src], str(out), 20, progress=False)
    assert manifest["kept_from_previous_run"] == 0
    assert sorted(p.name for p in out.glob("shard-*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    assert texts_of(str(out)) == [f"s {i}" for i in range(30)]


# ----------------------------------------------------------------------------- CLI


def test_cli_help_mentions_every_option(capsys):
    with pytest.raises(SystemExit) as exc:
        shards_main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--input", "--output", "--samples-per-shard", "--text-field", "--column",
                 "--min-chars", "--max-chars", "--dedupe", "--no-normalize"):
        assert flag in text


def test_cli_reports_drops(tmp_path, capsys):
    src = write_lines(tmp_path / "in.txt", ["one", "", "one", "two"])
    code = shards_main(["--input", src, "--output", str(tmp_path / "out"), "--samples-per-shard", "2",
                        "--dedupe", "--quiet"])
    out = capsys.readouterr().out
    assert code == 0
    assert "wrote 2 samples in 1 shards" in out
    assert "empty" in out and "duplicate" in out


def test_cli_missing_file_is_one_line_error(tmp_path, capsys):
    code = shards_main(["--input", str(tmp_path / "nope.txt"), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1
    assert "input not found" in err and "nope.txt" in err


def test_cli_empty_input_is_one_line_error(tmp_path, capsys):
    src = write_lines(tmp_path / "blank.txt", ["", "  ", ""])
    code = shards_main(["--input", src, "--output", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert len(err.splitlines()) == 1
    assert "no samples left" in err and "empty: 3" in err and "Fix:" in err


# ----------------------------------------------------------------------------- cache


def _ensure_in_child(args: tuple[str, str, multiprocessing.Queue]) -> None:
    text_path, cache_dir, queue = args
    queue.put(ensure_shards(text_path, cache_dir, 7))


def test_ensure_shards_caches_and_is_safe_concurrently(tmp_path):
    src = write_lines(tmp_path / "corpus.txt", [f"line {i}" for i in range(40)])
    cache = str(tmp_path / "cache")
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ensure_in_child, args=((src, cache, queue),)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    dirs = {queue.get(timeout=5) for _ in procs}
    assert len(dirs) == 1
    shard_dir = dirs.pop()
    assert texts_of(shard_dir) == [f"line {i}" for i in range(40)]
    leftovers = [n for n in os.listdir(cache) if ".tmp-" in n]
    assert leftovers == []

    mtime = os.stat(os.path.join(shard_dir, "manifest.json")).st_mtime_ns
    assert ensure_shards(src, cache, 7) == shard_dir
    assert os.stat(os.path.join(shard_dir, "manifest.json")).st_mtime_ns == mtime

    with open(src, "a", encoding="utf-8") as f:
        f.write("one more line\n")
    changed = ensure_shards(src, cache, 7)
    assert changed != shard_dir and texts_of(changed)[-1] == "one more line"


# ----------------------------------------------------------------------------- interop


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # webdataset leaks file handles
def test_webdataset_reads_our_shards(tmp_path):
    wds = pytest.importorskip("webdataset")
    src = write_lines(tmp_path / "in.txt", [f"line {i}" for i in range(12)])
    write_shards([src], str(tmp_path / "out"), 5, progress=False)
    urls = sorted(str(p) for p in (tmp_path / "out").glob("shard-*.tar"))
    samples = [(s["__key__"], s["txt"].decode()) for s in wds.WebDataset(urls, shardshuffle=False)]
    assert samples == read_all(str(tmp_path / "out"))


def test_index_shards_makes_foreign_shards_readable(tmp_path):
    wds = pytest.importorskip("webdataset")
    out = tmp_path / "foreign"
    out.mkdir()
    with wds.ShardWriter(str(out / "part-%04d.tar"), maxcount=4, verbose=0) as sink:
        for i in range(10):
            sink.write({"__key__": f"doc{i:03d}", "txt": f"text {i}", "json": {"i": i}})
    manifest = shards_module.index_shards(str(out))
    assert [e["count"] for e in manifest["shards"]] == [4, 4, 2]
    assert read_all(str(out)) == [(f"doc{i:03d}", f"text {i}") for i in range(10)]


def test_gzip_shards_are_smaller_deterministic_and_read_the_same(tmp_path):
    lines = [f"sentence number {i} of a small corpus." for i in range(400)]
    src = write_lines(tmp_path / "in.txt", lines)
    plain = write_shards([src], str(tmp_path / "plain"), 150, progress=False)
    packed = write_shards([src], str(tmp_path / "gz"), 150, progress=False, gzip=True)
    assert [e["name"] for e in packed["shards"]] == [f"shard-00000{i}.tar.gz" for i in range(3)]
    assert read_all(str(tmp_path / "gz")) == read_all(str(tmp_path / "plain"))
    plain_bytes = sum(e["bytes"] for e in plain["shards"])
    gz_bytes = sum(e["bytes"] for e in packed["shards"])
    assert plain_bytes >= 1024 * len(lines) and gz_bytes < plain_bytes / 8
    for e in packed["shards"]:  # recorded sha256 and size are those of the file
        path = tmp_path / "gz" / e["name"]
        assert hashlib.sha256(path.read_bytes()).hexdigest() == e["sha256"] and path.stat().st_size == e["bytes"]
    again = write_shards([src], str(tmp_path / "gz2"), 150, progress=False, gzip=True)
    assert [e["sha256"] for e in again["shards"]] == [e["sha256"] for e in packed["shards"]]
    # switching compression rewrites the directory and removes the other kind of shard
    write_shards([src], str(tmp_path / "gz"), 150, progress=False)
    assert sorted(p.name for p in (tmp_path / "gz").glob("shard-*")) == [f"shard-00000{i}.tar" for i in range(3)]


def test_truncated_gzip_shard_is_an_error_naming_it(tmp_path):
    from hncse_dist.data import ShardError, ShardStream
    from tests.fixtures import MINILM
    from transformers import AutoTokenizer

    src = write_lines(tmp_path / "in.txt", [f"text {i} " * 20 for i in range(300)])
    out = tmp_path / "gz"
    manifest = write_shards([src], str(out), 100, progress=False, gzip=True)
    victim = out / manifest["shards"][1]["name"]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    with pytest.raises(ShardError, match="shard-000001.tar.gz"):  # the size check of the manifest
        ShardStream(str(out), AutoTokenizer.from_pretrained(MINILM), 10, 8, num_workers=0, shuffle_buffer=1)
    with pytest.raises(ShardError, match="shard-000001.tar.gz"):  # and the reader itself
        with ShardReader(str(victim)) as reader:
            reader.read(100)


def test_cli_gzip_flag(tmp_path, capsys):
    src = write_lines(tmp_path / "in.txt", [f"line {i}" for i in range(20)])
    assert shards_main(["--input", src, "--output", str(tmp_path / "o"), "--samples-per-shard", "8",
                        "--gzip", "--quiet"]) == 0
    assert sorted(p.name for p in (tmp_path / "o").glob("shard-*")) == [f"shard-00000{i}.tar.gz" for i in range(3)]
    assert texts_of(str(tmp_path / "o")) == [f"line {i}" for i in range(20)]
