"""`hncse-dist report`: table numbers, CSV, figure and errors on realistic run directories."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from hncse_dist.report import ReportError, load_run, report_main


def make_run(root: Path, name: str, world: int, sps: float, *, per_proc_batch: int = 32,
             steps: int = 40, eval_every: int = 10, stsb: list[float] | None = None,
             write_summary: bool = True, best: float | None = None) -> Path:
    """A run directory laid out as the trainer writes it (metrics.jsonl + summary.json)."""
    run = root / name
    run.mkdir(parents=True)
    lines = []
    stsb = stsb or []
    for step in range(1, steps + 1):
        lines.append({"step": step, "loss": 3.0 / step, "lr": 3e-5, "sentences_per_s": sps,
                      "world_size": world, "global_batch": per_proc_batch * world})
        if step % eval_every == 0 and step // eval_every <= len(stsb):
            lines.append({"step": step, "eval/stsb_dev_spearman": stsb[step // eval_every - 1]})
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    if write_summary:
        summary = {"world_size": world, "global_batch": per_proc_batch * world, "steps": steps,
                   "sentences_per_s": sps, "final_loss": 3.0 / steps,
                   "best_stsb_dev": best if best is not None else (max(stsb) if stsb else None),
                   "config": {"objective": "hncse"}}
        (run / "summary.json").write_text(json.dumps(summary))
    return run


@pytest.fixture()
def runs(tmp_path: Path) -> list[Path]:
    # world 2 at 400 sentences/s (200/process), world 4 at 720 (180/process: 90 %),
    # world 8 at 1200 (150/process: 75 %).  Listed out of order on purpose.
    return [
        make_run(tmp_path, "n2-p4", 8, 1200.0, stsb=[60.0, 70.0, 74.0, 73.5]),
        make_run(tmp_path, "n1-p2", 2, 400.0, stsb=[61.0, 71.5, 75.25, 75.0]),
        make_run(tmp_path, "n1-p4", 4, 720.0, stsb=[60.5, 70.0, 74.5, 76.0]),
    ]


def test_report_table_csv_and_figure(runs: list[Path], tmp_path: Path) -> None:
    prefix = tmp_path / "out" / "scaling"
    assert report_main([str(r) for r in runs] + ["--output", str(prefix)]) == 0

    rows = list(csv.DictReader((tmp_path / "out" / "scaling.csv").open()))
    assert [r["run"] for r in rows] == ["n1-p2", "n1-p4", "n2-p4"]  # sorted by world size
    assert [int(r["world_size"]) for r in rows] == [2, 4, 8]
    assert [int(r["global_batch"]) for r in rows] == [64, 128, 256]
    assert [float(r["scaling_efficiency"]) for r in rows] == pytest.approx([1.0, 0.9, 0.75])
    assert [float(r["sentences_per_s"]) for r in rows] == pytest.approx([400, 720, 1200])
    assert [float(r["best_stsb_dev"]) for r in rows] == pytest.approx([75.25, 76.0, 74.0])
    assert [float(r["final_loss"]) for r in rows] == pytest.approx([3.0 / 40] * 3)
    assert [int(r["steps"]) for r in rows] == [40, 40, 40]

    md = (tmp_path / "out" / "scaling.md").read_text()
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert table[0] == ("| run | world size | global batch | steps | sentences/s | "
                        "scaling efficiency | final loss | best STS-B dev |")
    assert table[2] == "| n1-p2 | 2 | 64 | 40 | 400.0 | 1.00 | 0.0750 | 75.2500 |"
    assert table[3] == "| n1-p4 | 4 | 128 | 40 | 720.0 | 0.90 | 0.0750 | 76.0000 |"
    assert table[4] == "| n2-p4 | 8 | 256 | 40 | 1200.0 | 0.75 | 0.0750 | 74.0000 |"
    assert "baseline run `n1-p2`" in md

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    png = tmp_path / "out" / "scaling.png"
    assert png.stat().st_size > 10_000
    image = plt.imread(png)
    assert image.shape[:2] == (450, 1200)  # 12 x 4.5 in at 100 dpi
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_missing_values_are_recomputed_from_metrics(tmp_path: Path) -> None:
    run = make_run(tmp_path, "partial", 2, 300.0, stsb=[50.0, 65.0], write_summary=False)
    (run / "summary.json").write_text(json.dumps({"world_size": 2}))
    # A job killed mid-write leaves a torn last line: skipped, not an error.
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 41, "lo')
    result = load_run(run)
    assert result.global_batch == 64
    assert result.steps == 40
    assert result.sentences_per_s == pytest.approx(300.0)
    assert result.best_stsb_dev == pytest.approx(65.0)
    assert result.stsb_curve == [(10, 50.0), (20, 65.0)]


def test_bad_run_dir_names_the_missing_file(tmp_path: Path, capsys) -> None:
    good = make_run(tmp_path, "good", 1, 100.0)
    no_summary = make_run(tmp_path, "unfinished", 2, 180.0, write_summary=False)
    assert report_main([str(good), str(no_summary), "--output", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert str(no_summary / "summary.json") in err and "missing" in err
    assert not (tmp_path / "r.md").exists()

    with pytest.raises(ReportError, match="not a directory"):
        load_run(tmp_path / "does-not-exist")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="summary.json: missing"):
        load_run(tmp_path / "empty")


def test_same_directory_names_are_told_apart(tmp_path: Path) -> None:
    a = make_run(tmp_path / "study-a", "n1", 1, 100.0)
    b = make_run(tmp_path / "study-b", "n1", 2, 190.0)
    assert report_main([str(a), str(b), "--output", str(tmp_path / "r")]) == 0
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert [r["run"] for r in rows] == ["study-a/n1", "study-b/n1"]
    assert float(rows[1]["scaling_efficiency"]) == pytest.approx(0.95)


def test_cli_routes_report(runs: list[Path], tmp_path: Path) -> None:
    from hncse_dist.cli import main

    assert main(["report", str(runs[0]), str(runs[1]), "--output", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli.png").is_file()


def test_runs_that_record_nodes_get_nodes_and_device_columns(tmp_path: Path) -> None:
    one = make_run(tmp_path, "n1-p2", 2, 400.0)
    two = make_run(tmp_path, "n2-p2", 4, 720.0)
    for run, nodes in ((one, 1), (two, 2)):
        summary = json.loads((run / "summary.json").read_text())
        summary.update(nodes=nodes, procs_per_node=2, device="cpu")
        (run / "summary.json").write_text(json.dumps(summary))
    assert report_main([str(two), str(one), "--output", str(tmp_path / "r")]) == 0
    table = [line for line in (tmp_path / "r.md").read_text().splitlines() if line.startswith("|")]
    assert table[0].endswith("| best STS-B dev | nodes | device |")
    assert table[2] == "| n1-p2 | 2 | 64 | 40 | 400.0 | 1.00 | 0.0750 | – | 1 | cpu |"
    assert table[3] == "| n2-p2 | 4 | 128 | 40 | 720.0 | 0.90 | 0.0750 | – | 2 | cpu |"
    rows = list(csv.DictReader((tmp_path / "r.csv").open()))
    assert [(r["nodes"], r["device"]) for r in rows] == [("1", "cpu"), ("2", "cpu")]
    assert load_run(two).placement == "2 nodes x 2 cpu"
