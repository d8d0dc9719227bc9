"""The README's main job, ``packcache-demo``, end to end on the shipped demo model (without serving)."""

from __future__ import annotations

import json

import pytest

from packcache import Budget
from packcache.demo_command import main
from packcache.records import VideoResult

pytestmark = pytest.mark.integration


def test_demo_profiles_fits_and_compares(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["--no-serve", "--out", str(out), "--samples", "2", "--frames", "7", "--steps", "2"]) == 0
    budget = Budget.load(out / "budget.json", num_layers=4, num_kv_heads=4)
    assert budget.provenance["source"] == "fitted" and (out / "stats.npz").is_file()
    runs = {p.stem: VideoResult.load(p) for p in (out / "runs").glob("*.json")}
    assert set(runs) == {"fullcache", "packcache-paper", "packcache-fitted-novelty", "slidingwindow-1", "streamingllm"}
    full = [r.cache_tokens[0] for r in runs["fullcache"].records]
    packed = [r.cache_tokens[0] for r in runs["packcache-fitted-novelty"].records]
    assert full == sorted(full) and full[-1] > full[2]
    assert len(set(packed[5:])) == 1 and packed[-1] < full[-1], packed
    assert (out / "frames" / "packcache-fitted-novelty.gif").is_file()
    text = capsys.readouterr().out
    assert "cache tokens per frame" in text and "agree w/ full" in text


def test_bad_budget_is_one_line_exit_2_and_nothing_is_written(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    data = Budget.paper_default(4, 4, 4).to_dict()
    data["keep_ratios"][1] = [0.5, 0.9, 0.1, 0.1]
    bad.write_text(json.dumps(data))
    out = tmp_path / "demo"
    out.mkdir()
    (out / "keep.txt").write_text("OLD")
    assert main(["--no-serve", "--out", str(out), "--budget", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "keep_ratios[1]" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "OLD"


def test_budget_for_another_model_is_refused(tmp_path, capsys):
    other = tmp_path / "other.json"
    Budget.paper_default(12, 4, 4).save(other)
    assert main(["--no-serve", "--out", str(tmp_path / "o"), "--budget", str(other)]) == 2
    assert "model.num_layers: budget is for 12 layers, the model has 4" in capsys.readouterr().err
