"""packcache-bench: the FLOP model and a tiny end-to-end run of the harness (no timing assertions)."""

from __future__ import annotations

import json

import pytest

from packcache.bench import PRESETS, SpeedConfig, forward_macs, frame_macs, main, op_kind, run_macs
from packcache.records import FrameRecord, VideoResult

TINY = SpeedConfig(hidden=32, layers=1, heads=2, intermediate=64, height=3, width=4, num_frames=7, steps=1)


def test_forward_macs_closed_form():
    cfg = SpeedConfig(hidden=8, layers=2, heads=2, intermediate=16)
    linear, attention = forward_macs(cfg, q=3, kv=10)
    assert linear == 2 * 3 * (2 * 64 + 2 * 64 + 3 * 8 * 16)
    assert attention == 2 * 3 * 10 * 2 * 2 * 4
    # the matched configuration: attention / linear at the last frame is about 3, as for Lumos-1-3B at 384p
    assert 2.9 < PRESETS["full"]["speed"].attention_linear_ratio() < 3.2


def test_run_macs_counts_every_forward_of_a_masked_run():
    layout = TINY.layout(3)
    records = [FrameRecord(0, 0.1, 0.0, [layout.frame_slice(0).stop], 0, 1),
               FrameRecord(1, 0.1, 0.0, [40], 0, 2), FrameRecord(2, 0.1, 0.0, [50], 0, 2)]
    macs = run_macs(TINY, VideoResult(frames=None, records=records))
    q = layout.tokens_per_frame
    assert macs[1] == 2 * 2 * sum(forward_macs(TINY, q, 40 + q))  # CFG rows x forwards x (linear + attention)
    assert macs[2] > macs[1]
    assert macs == [a + b for a, b in frame_macs(TINY, VideoResult(frames=None, records=records))]


def test_profiled_ops_fall_into_kinds():
    assert op_kind("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert op_kind("aten::addmm") == op_kind("aten::mm") == "linear"
    assert op_kind("aten::index_select") == op_kind("aten::cat") == "cache copies"
    assert op_kind("aten::silu") == "other"


@pytest.mark.integration
def test_bench_end_to_end_writes_results(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(PRESETS, "quick", {**PRESETS["quick"], "speed": TINY, "repeats": 1, "scaling_frames": 8})
    out = tmp_path / "bench.json"
    assert main(["--quick", "--sections", "speed,scaling,profile", "-o", str(out), "--no-progress"]) == 0
    data = json.loads(out.read_text())
    speed = data["speed"]
    assert set(speed["policies"]) == {"FullCache", "PackCache(paper)", "AnchorsOnly"}
    full, pack = speed["policies"]["FullCache"], speed["policies"]["PackCache(paper)"]
    assert len(full["per_frame_s"]) == TINY.num_frames
    assert full["peak_kv_bytes"] > pack["peak_kv_bytes"] and pack["macs_total"] < full["macs_total"]
    assert speed["ideal_speedup_end_to_end"] == pytest.approx(full["macs_total"] / pack["macs_total"])
    scaling = data["scaling"]["policies"]["PackCache(paper)"]["kv_bytes"]
    assert scaling[-1] == scaling[-2], "PackCache memory must be flat once packed"
    prof = data["profile"]["policies"]
    assert set(prof) == set(speed["policies"])
    for name, p in prof.items():
        assert p["seconds_by_kind"]["attention"] > 0 and p["seconds_by_kind"]["linear"] > 0, (name, p)
        assert p["macs_linear"] + p["macs_attention"] == speed["policies"][name]["macs_total"]
    assert prof["FullCache"]["macs_attention"] > prof["PackCache(paper)"]["macs_attention"]
    assert prof["FullCache"]["macs_linear"] == prof["PackCache(paper)"]["macs_linear"]
    printed = capsys.readouterr().out
    assert "speedup vs FullCache" in printed and "profile (torch.profiler" in printed


def test_bench_rejects_bad_input(tmp_path, capsys):
    assert main(["--sections", "speed,colour", "-o", str(tmp_path / "x.json")]) == 2
    bad = tmp_path / "budget.json"
    bad.write_text("{")
    assert main(["--budget", str(bad), "-o", str(tmp_path / "x.json")]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_bench_rejects_a_missing_checkpoint(tmp_path, capsys):
    assert main(["--sections", "fidelity", "--model", str(tmp_path / "nowhere"), "-o", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no demo checkpoint" in err
    assert not (tmp_path / "x.json").exists()
