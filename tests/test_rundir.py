"""One output folder, one run: a second run never writes over another run's records."""

import json
import subprocess
import sys

from tests.launch import REPO, child_env
from tests.test_train_e2e import common


def train(args):
    return subprocess.run([sys.executable, "-m", "hncse_dist.cli", "train", *args], cwd=REPO, env=child_env(),
                          capture_output=True, text=True, timeout=300)


def logged_steps(out):
    return [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]


def test_a_folder_holding_another_run_is_refused_then_continued_or_replaced(tmp_path, tiny_bert, corpus):
    out = tmp_path / "run"
    first = train(common(tiny_bert, corpus, out, max_steps=2, save_every=0, eval_file="null"))
    assert first.returncode == 0, first.stderr[-3000:]
    before = (out / "metrics.jsonl").read_text()

    other = train(common(tiny_bert, corpus, out, max_steps=2, save_every=0, eval_file="null", objective="simcse"))
    assert other.returncode == 2, other.stderr[-3000:]
    err = [l for l in other.stderr.splitlines() if "error" in l]
    assert len(err) == 1 and "already holds another run" in err[0] and "objective: 'hncse' -> 'simcse'" in err[0]
    assert "resume=latest" in err[0] and "overwrite=true" in err[0]
    assert (out / "metrics.jsonl").read_text() == before  # nothing written

    same = train(common(tiny_bert, corpus, out, max_steps=2, save_every=0, eval_file="null"))
    assert same.returncode == 2 and "an earlier run of this config" in same.stderr

    cont = train(common(tiny_bert, corpus, out, max_steps=4, save_every=0, eval_file="null", resume="latest"))
    assert cont.returncode == 0, cont.stderr[-3000:]
    assert logged_steps(out) == [1, 2, 3, 4]

    fresh = train(common(tiny_bert, corpus, out, max_steps=3, save_every=0, eval_file="null", objective="simcse",
                         overwrite="true"))
    assert fresh.returncode == 0, fresh.stderr[-3000:]
    assert logged_steps(out) == [1, 2, 3]  # the old run's records are gone, not interleaved
    assert json.loads((out / "config.json").read_text())["objective"] == "simcse"
