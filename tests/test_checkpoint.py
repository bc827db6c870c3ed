"""Checkpoint selection: only complete checkpoints count, newest first."""

from hncse_dist.checkpoint import MARKER, complete_checkpoints


def test_incomplete_checkpoint_is_never_picked(tmp_path):
    for step, complete in [(10, True), (20, True), (30, False)]:
        d = tmp_path / f"step-{step:08d}"
        d.mkdir()
        (d / "model.safetensors").write_text("x")
        if complete:
            (d / MARKER).write_text("{}")
    found = complete_checkpoints(tmp_path)
    assert [p.name for p in found] == ["step-00000010", "step-00000020"]


def test_numeric_not_lexical_order(tmp_path):
    for step in (9, 100, 20):
        d = tmp_path / f"step-{step}"
        d.mkdir()
        (d / MARKER).write_text("{}")
    assert [p.name for p in complete_checkpoints(tmp_path)] == ["step-9", "step-20", "step-100"]


def test_missing_root_has_no_checkpoints(tmp_path):
    assert complete_checkpoints(tmp_path / "nope") == []
