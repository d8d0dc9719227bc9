"""packcache-profile: demo profiling end to end (budget drives a PackCache generation), errors exit 2 and write
nothing, hub-style local models through the adapters, and 2-process gloo profiling equals 1 process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from probe_reference import tiny_demo

from packcache import Budget, PackCache
from packcache.demo import make_clip
from packcache.demo.model import DEFAULT_MODEL_DIR, load_demo_model
from packcache.profile import main, parse_layout_spec
from packcache.runtime import generate_video
from probes import AttentionStats

FAST = ["--samples", "2", "--frames", "6", "--steps", "2", "--quiet"]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("demo") / "model"
    tiny_demo().save_pretrained(path)
    return path


def test_profile_demo_checkpoint_writes_stats_and_a_budget_that_drives_generation(demo_dir, tmp_path, capsys):
    out, stats_out = tmp_path / "budget.json", tmp_path / "stats.npz"
    assert main([str(demo_dir), "-o", str(out), "--stats-out", str(stats_out), *FAST]) == 0
    table = capsys.readouterr().out
    assert "rho" in table and "wrote" in table
    stats = AttentionStats.load(stats_out)
    assert stats.num_samples == 2 and stats.step_queries[:3].all()  # steps 0, 1 and the re-encode forward
    budget = Budget.load(out, num_layers=2, num_kv_heads=2)
    assert budget.provenance["source"] == "fitted" and len(budget.decay["per_layer"]) == 2
    model = load_demo_model(demo_dir)
    clip = make_clip(3, 8)
    policy = PackCache(budget)
    result = generate_video(model, clip.text, clip.frames[0], 8, policy, steps=2, cfg_scale=1.0, progress=False)
    assert result.frames.shape == (8, 8, 8)
    slots = [r.cache_tokens[0] for r in result.records]
    assert slots[-1] == slots[-2] == policy.budget_tokens(stats.layout)  # packed and sliding at constant size


def test_per_kv_head_budget_and_token_target(demo_dir, tmp_path):
    out = tmp_path / "b.json"
    assert main([str(demo_dir), "-o", str(out), "--per-kv-head", "--target-tokens", "300", *FAST]) == 0
    budget = Budget.load(out)
    assert budget.per_kv_head and PackCache(budget).budget_tokens(parse_layout_spec(
        "text=6,frames=6,height=8,width=8,rowsep=1,prefix=1,suffix=1")) == 300


@pytest.mark.parametrize("args, message", [
    (["no-such-org/no-such-model-xyz"], "offline"),
    (["--layout", "text=6,frames=6,height=4,width=4"], "does not fit the demo clips"),
    (["--target-tokens", "20"], "smaller than the"),
    (["--layout", "frames=3,height=2,width=oops"], "needs an integer"),
])
def test_errors_are_one_line_exit_2_and_write_nothing(demo_dir, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out, stats_out = tmp_path / "budget.json", tmp_path / "stats.npz"
    model = [] if args[0].startswith("no-such") else [str(demo_dir)]
    code = main([*model, *args, "-o", str(out), "--stats-out", str(stats_out), *FAST])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and message in err[-1] and err[-1].startswith("packcache-profile: error:")
    assert not out.exists() and not stats_out.exists() and list(tmp_path.iterdir()) == []


def test_a_local_transformers_model_is_profiled_through_the_adapters(tmp_path):
    from conftest import tiny_llama

    path = tmp_path / "llama"
    tiny_llama().save_pretrained(path)
    out = tmp_path / "b.json"
    assert main([str(path), "-o", str(out), "--samples", "2", "--quiet", "--layout",
                 "text=8,frames=6,height=2,width=4,cond=1"]) == 0
    budget = Budget.load(out, num_layers=2, num_kv_heads=2)
    assert budget.layout["visual_per_frame"] == 8


def test_two_gloo_processes_equal_one_process(demo_dir, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    common = [str(demo_dir), "--samples", "3", "--frames", "5", "--steps", "2", "--quiet"]
    single = [sys.executable, "-m", "packcache.profile", *common, "-o", str(tmp_path / "one.json"),
              "--stats-out", str(tmp_path / "one.npz")]
    multi = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
             "packcache.profile", *common, "-o", str(tmp_path / "two.json"), "--stats-out", str(tmp_path / "two.npz")]
    for cmd in (single, multi):
        subprocess.run(cmd, check=True, env=env, capture_output=True, timeout=600)
    one, two = AttentionStats.load(tmp_path / "one.npz"), AttentionStats.load(tmp_path / "two.npz")
    assert one.header() == two.header() and one.num_samples == 3
    for name in one.arrays:
        np.testing.assert_allclose(two.arrays[name], one.arrays[name], rtol=1e-12, atol=1e-12)
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert a["keep_ratios"] == b["keep_ratios"]
    for fa, fb in zip(a["decay"]["per_layer"], b["decay"]["per_layer"]):
        assert fa["model"] == fb["model"] and fa["rho"] == pytest.approx(fb["rho"], abs=1e-6)


@pytest.mark.integration
@pytest.mark.skipif(not (DEFAULT_MODEL_DIR / "config.json").is_file(), reason="trained demo checkpoint not shipped yet")
def test_no_arguments_profiles_the_shipped_demo_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["--quiet"]) == 0
    budget = Budget.load(tmp_path / "budget.json")
    assert PackCache(budget).budget_tokens(parse_layout_spec(
        "text=6,frames=7,height=8,width=8,rowsep=1,prefix=1,suffix=1")) is not None
