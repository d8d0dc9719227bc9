"""Dashboard: every figure function on saved statistics (made by the real probes on a tiny random demo model),
the loaders' error messages, the CLI's exit code, the background run manager, the Dash wiring, and payload size
on a 50k-token profile."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest

from dashboard import figures as F
from dashboard.examples import write_example_inputs
from dashboard.sources import (
    DEFAULTS,
    KeepMaps,
    RunCurves,
    SourceError,
    frame_agreement,
    frame_ranges,
    keep_maps,
    load_budget,
    load_quality_tables,
    load_runs,
    load_sources,
    load_stats,
    load_time_profiles,
    quality_rows,
    reference_for,
    run_summary,
    runs_from_file,
)
from packcache.budget import Budget
from packcache.layout import SequenceLayout
from packcache.policies.packcache import PackCache, grid_priority
from probes.stats import AttentionStats

LAYERS, HEADS, KV = 2, 4, 2


@pytest.fixture(scope="module")
def example(tmp_path_factory) -> dict[str, Path]:
    """Saved example inputs: probes on a tiny random demo model, a fitted per-kv-head budget, four runs."""
    return write_example_inputs(tmp_path_factory.mktemp("dash"), frames=6, steps=2, layers=LAYERS, heads=HEADS,
                                kv_heads=KV, window=3)


@pytest.fixture(scope="module")
def sources(example):
    src = load_sources(example["stats"], example["budget"], [example["runs"]], strict=True)
    assert not src.errors, src.errors
    return src


def _json_size(fig: go.Figure) -> int:
    return len(fig.to_json())


# --------------------------------------------------------------------------------------------------------
# loading
def test_sources_load_saved_files(sources, example):
    assert isinstance(sources.stats, AttentionStats)
    assert (sources.stats.num_layers, sources.stats.num_heads, sources.stats.num_kv_heads) == (LAYERS, HEADS, KV)
    assert sources.fits is not None and len(sources.fits.per_layer) == LAYERS
    assert sources.budget.per_kv_head
    assert isinstance(sources.keep, KeepMaps) and sources.keep.keep.shape == (LAYERS, KV, 3, 8, 8)
    assert sorted(r.name for r in sources.runs) == ["full", "packcache", "sliding", "streaming"]
    assert sources.paths["stats"] == str(example["stats"])


def test_defaults_table_points_into_data():
    assert set(DEFAULTS) == {"stats", "budget", "runs", "model"}
    assert all(not Path(p).is_absolute() for candidates in DEFAULTS.values() for p in candidates)


def test_no_arguments_reads_the_embedded_defaults(tmp_path, example):
    import shutil

    (tmp_path / "demo-profile").mkdir()
    shutil.copy(example["stats"], tmp_path / "demo-profile" / "stats.npz")
    shutil.copy(example["budget"], tmp_path / "demo-profile" / "budget.json")
    shutil.copytree(example["runs"], tmp_path / "runs")
    bench = {"schema": "packcache.bench/v1", "speed": {"policies": {
        "FullCache": {"per_frame_s": [0.1, 0.2], "cache_tokens": [10, 20], "kv_bytes": [1, 2]}}}}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    src = load_sources(data_dir=tmp_path)
    assert not src.errors, src.errors
    assert src.stats is not None and src.budget is not None and src.fits is not None
    assert len(src.runs) == 5 and src.paths["runs"] == [str(tmp_path / "runs"), str(tmp_path / "bench.json")]


def test_embedded_demo_inputs_render():
    """The files shipped in data/ (when present) load without errors and every figure renders from them."""
    from dashboard.sources import default_paths, quality_rows

    if not (default_paths()["stats"] and default_paths()["budget"]):
        pytest.skip("no embedded demo profile in data/ yet")
    src = load_sources()
    assert not {"stats", "budget"} & set(src.errors), src.errors
    st = src.stats
    figs = [F.attention_by_group_figure(st, g, s) for g in F.group_choices(st) for s in (None, st.num_steps - 1)]
    figs += [F.step_evolution_figure(st), F.decay_figure(src.fits), F.rho_figure(src.fits), F.spatial_figure(st),
             F.keep_ratio_figure(src.budget), F.keep_map_figure(src.keep), F.runtime_figure(src.runs),
             F.run_table_figure(run_summary(src.runs))]
    figs += [F.decay_figure(src.fits, layer, head) for layer in range(st.num_layers) for head in (None, 0)]
    figs += [F.quality_table_figure(quality_rows(t)) for _, t in src.quality]
    figs += [F.time_by_kind_figure(p) for _, p in src.profiles]
    figs += [F.frames_figure(r.video, (reference_for(r, src.runs) or r).video) for r in src.runs if r.video]
    for fig in figs:
        assert fig.data and _json_size(fig) < 150_000


def test_missing_and_malformed_files_give_one_line(tmp_path, example):
    with pytest.raises(SourceError, match="statistics file not found"):
        load_stats(tmp_path / "nope.npz")
    (tmp_path / "bad.npz").write_bytes(b"not an npz")
    with pytest.raises(SourceError) as err:
        load_stats(tmp_path / "bad.npz")
    assert "\n" not in str(err.value) and "bad.npz" in str(err.value)
    with pytest.raises(SourceError, match="budget file not found"):
        load_budget(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{ not json")
    with pytest.raises(SourceError, match="not valid JSON"):
        load_budget(tmp_path / "bad.json")
    data = json.loads(Path(example["budget"]).read_text())
    data["window"] = 0
    (tmp_path / "invalid.json").write_text(json.dumps(data))
    with pytest.raises(SourceError, match="window"):
        load_budget(tmp_path / "invalid.json")
    with pytest.raises(SourceError, match="not a run file"):
        runs_from_file(example["budget"])
    with pytest.raises(SourceError, match="not found"):
        load_runs([tmp_path / "missing-dir"])


def test_missing_defaults_are_reported_not_raised(tmp_path):
    src = load_sources(data_dir=tmp_path)  # an empty data dir: nothing embedded
    assert src.stats is None and src.budget is None and src.runs == []
    assert set(src.errors) >= {"stats", "budget", "runs"}
    with pytest.raises(SourceError):
        load_sources(stats=tmp_path / "x.npz", strict=True, data_dir=tmp_path)
    lenient = load_sources(stats=tmp_path / "x.npz", data_dir=tmp_path)
    assert "not found" in lenient.errors["stats"]


def test_run_directory_skips_other_json(tmp_path, example):
    (tmp_path / "a.json").write_text(Path(example["runs"] / "full.json").read_text())
    (tmp_path / "budget.json").write_text(Path(example["budget"]).read_text())
    runs = load_runs([tmp_path])
    assert [r.name for r in runs] == ["a"]
    twice = load_runs([tmp_path / "a.json", tmp_path / "a.json"])
    assert [r.name for r in twice] == ["a", "a#2"]


def test_bench_file_curves(tmp_path):
    bench = {"schema": "packcache.bench/v1", "speed": {"policies": {
        "FullCache": {"per_frame_s": [0.1, 0.2, 0.3], "cache_tokens": [10, 20, 30], "kv_bytes": [1, 2, 3]},
        "PackCache(paper)": {"per_frame_s": [0.1, 0.15, 0.15], "cache_tokens": [10, 20, 20],
                             "kv_bytes": [1, 2, 2]}}},
        "scaling": {"policies": {"FullCache": {"per_frame_s": [0.1], "cache_tokens": [5], "kv_bytes": [7]}}}}
    (tmp_path / "bench.json").write_text(json.dumps(bench))
    runs = load_runs([tmp_path / "bench.json"])
    assert [(r.name, r.policy) for r in runs] == [("bench:speed:FullCache", "FullCache"),
                                                 ("bench:speed:PackCache(paper)", "PackCache(paper)"),
                                                 ("bench:scaling:FullCache", "FullCache")]
    assert runs[1].cache_tokens.tolist() == [10, 20, 20] and runs[1].video is None
    assert reference_for(runs[1], runs) is runs[0] and reference_for(runs[0], runs) is None
    row = run_summary(runs)[1]
    assert row["speedup"] == pytest.approx(0.6 / 0.4) and row["memory_ratio"] == pytest.approx(1.5)
    fig = F.runtime_figure(runs, "cache_tokens")
    assert len(fig.data) == 3


def test_real_bench_results(tmp_path):
    """The curves of packcache.bench's own output (a tiny timing config) load as runs."""
    from packcache.bench import BENCH_SCHEMA, SpeedConfig, run_profile, run_scaling, run_speed

    cfg = SpeedConfig(hidden=64, layers=2, intermediate=128, height=4, width=4, num_frames=5, steps=1)
    results = {"schema": BENCH_SCHEMA, "speed": run_speed(cfg, 1, progress=False),
               "scaling": run_scaling(cfg, 4, progress=False), "profile": run_profile(cfg, progress=False)}
    (tmp_path / "bench.json").write_text(json.dumps(results))
    runs = load_runs([tmp_path])
    speed = [r for r in runs if r.meta["section"] == "speed"]
    assert {r.policy for r in speed} >= {"FullCache", "PackCache(paper)"}
    assert all(len(r.frame) == cfg.num_frames for r in speed)
    rows = {r["policy"]: r for r in run_summary(speed)}
    assert rows["PackCache(paper)"]["memory_ratio"] > 1 and rows["PackCache(paper)"]["speedup"] > 0
    assert len(F.runtime_figure(runs, "kv_bytes").data) == len(runs)
    assert not [r for r in runs if r.meta["section"] == "profile"]  # no per-frame curves there
    # the profile section: stacked seconds by kind of op per policy
    (name, section), = load_time_profiles([tmp_path])
    assert name == "bench" and list(section["policies"]) == ["FullCache", "PackCache(paper)", "AnchorsOnly"]
    fig = F.time_by_kind_figure(section)
    assert [t.name for t in fig.data] == ["attention", "linear", "cache copies", "other"]
    for i, policy in enumerate(section["policies"].values()):
        assert sum(t.x[i] for t in fig.data) == pytest.approx(sum(policy["seconds_by_kind"].values()))
    assert "packcache-bench" in F.time_by_kind_figure({}).layout.annotations[0].text


def test_reference_and_agreement(sources):
    by = {r.name: r for r in sources.runs}
    ref = reference_for(by["packcache"], sources.runs)
    assert ref is by["full"]
    agree = frame_agreement(by["packcache"].video, ref.video)
    assert len(agree) == 6 and agree[0] == 1.0 and all(0.0 <= a <= 1.0 for a in agree)
    assert frame_agreement(by["full"].video, by["full"].video) == [1.0] * 6


# --------------------------------------------------------------------------------------------------------
# view 1: attention by group
def test_group_mass_partitions_attention(sources):
    st = sources.stats
    total = sum(F.group_mass(st, g) for g in F.ANCHOR_GROUPS) + F.group_mass(st, "future")
    np.testing.assert_allclose(total, 1.0, atol=1e-5)  # every query's softmax mass sums to one
    hist = F.group_mass(st, "history")
    parts = sum(F.group_mass(st, g) for g in F.group_choices(st) if g.startswith("d") or g == "older")
    np.testing.assert_allclose(hist, parts, atol=1e-12)
    for step in range(st.num_steps):
        per_step = sum(F.group_mass(st, g, step) for g in (*F.ANCHOR_GROUPS, "future"))
        np.testing.assert_allclose(per_step, 1.0, atol=1e-5)
    with pytest.raises(ValueError):
        F.group_mass(st, "text", st.num_steps)


def test_attention_by_group_figure(sources):
    st = sources.stats
    fig = F.attention_by_group_figure(st, "cond", 1)
    (heat,) = fig.data
    assert np.asarray(heat.z).shape == (LAYERS, HEADS)
    np.testing.assert_allclose(np.asarray(heat.z), F.group_mass(st, "cond", 1), rtol=1e-6)
    assert "cond" in fig.layout.title.text and "step 1" in fig.layout.title.text
    assert "all decoding steps" in F.attention_by_group_figure(st, "d1").layout.title.text


def test_step_evolution_figure(sources):
    st = sources.stats
    fig = F.step_evolution_figure(st)
    assert [t.name for t in fig.data] == ["text", "cond", "special", "current", "history"]
    assert all(len(t.y) == st.num_steps for t in fig.data)
    one = F.step_evolution_figure(st, layer=1, head=0)
    np.testing.assert_allclose(one.data[0].y, st.step_mass[1, 0, :, 0] / st.step_queries, rtol=1e-6)


# --------------------------------------------------------------------------------------------------------
# view 2: decay
def test_decay_figure_uses_the_fits(sources):
    fits = sources.fits
    fig = F.decay_figure(fits)
    names = [t.name for t in fig.data]
    assert names[0].startswith("measured") and names[-1] == "paper ρ = 1/2"
    exp = next(t for t in fig.data if t.name.startswith("exponential"))
    np.testing.assert_allclose(exp.y, fits.global_fit.predict(exp.x, "exponential"), rtol=1e-5)
    power = next(t for t in fig.data if t.name.startswith("power"))
    np.testing.assert_allclose(power.y, fits.global_fit.predict(power.x, "power"), rtol=1e-5)
    assert f"{fits.global_fit.rho:.3f}" in fig.layout.title.text and "paper ρ = 0.5" in fig.layout.title.text
    floor = [t for t in fig.data if t.name.startswith("exponential + floor")]
    if np.isfinite(fits.global_fit.rho_floor):  # a floor model needs more distances than parameters
        np.testing.assert_allclose(floor[0].y, fits.global_fit.predict(floor[0].x, "exponential_floor"), rtol=1e-5)
    else:
        assert not floor
    assert fig.layout.yaxis.type == "log" and F.decay_figure(fits, log_y=False).layout.yaxis.type == "linear"
    layer = F.decay_figure(fits, 1)
    exp1 = next(t for t in layer.data if t.name.startswith("exponential"))
    np.testing.assert_allclose(exp1.y, fits.per_layer[1].predict(exp1.x, "exponential"), rtol=1e-5)
    head = F.decay_figure(fits, 0, 3)
    measured = head.data[0]
    np.testing.assert_allclose(measured.y, fits.mean[0, 3][np.isfinite(fits.mean[0, 3])], rtol=1e-6)


def test_rho_figure(sources):
    fits = sources.fits
    fig = F.rho_figure(fits)
    per_layer = next(t for t in fig.data if t.name.startswith("per layer"))
    np.testing.assert_allclose(per_layer.y, [f.rho for f in fits.per_layer])
    assert len(next(t for t in fig.data if t.name == "per head").y) == LAYERS * HEADS


# --------------------------------------------------------------------------------------------------------
# view 3: where it looks
def test_spatial_figure(sources):
    st = sources.stats
    fig = F.spatial_figure(st)
    assert len(fig.data) == st.recent_frames
    for trace in fig.data:
        z = np.asarray(trace.z)
        assert z.shape == (8, 8)
        assert z.sum() == pytest.approx(1.0, abs=1e-4)  # normalised: share of the frame's mass
    raw = F.spatial_figure(st, layer=1, head=2, normalize=False)
    np.testing.assert_allclose(np.asarray(raw.data[1].z), st.spatial[1, 2, 1] / st.spatial_queries[1], rtol=1e-5)
    small = F.spatial_figure(st, max_side=3)
    assert max(np.asarray(small.data[0].z).shape) <= 3


def test_downsample():
    a = np.arange(16, dtype=float).reshape(4, 4)
    np.testing.assert_allclose(F.downsample(a, 2), [[2.5, 4.5], [10.5, 12.5]])
    assert F.downsample(a, 4) is a
    odd = F.downsample(np.ones((5, 3)), 2)
    assert odd.shape == (2, 2) and np.allclose(odd, 1.0)


# --------------------------------------------------------------------------------------------------------
# view 4: budget
def test_keep_ratio_figure(sources):
    budget = sources.budget
    fig = F.keep_ratio_figure(budget)
    (heat,) = fig.data
    z = np.asarray(heat.z)
    assert z.shape == (LAYERS * KV, budget.window)
    np.testing.assert_allclose(z, np.asarray(budget.keep_ratios).reshape(-1, budget.window), rtol=1e-6)
    assert list(heat.y)[:2] == ["L0 kv0", "L0 kv1"]
    paper = Budget.paper_default(3, 4, 2, sources.stats.layout.summary())
    pz = np.asarray(F.keep_ratio_figure(paper).data[0].z)
    np.testing.assert_allclose(pz, [[0.5, 0.25, 0.125, 0.125]] * 3)


def test_keep_map_matches_the_policy(sources):
    budget, layout = sources.budget, sources.stats.layout
    keep = sources.keep
    counts = PackCache(budget).keep_counts(layout).numpy()  # [L, K, W]
    np.testing.assert_array_equal(keep.keep.sum(axis=(-2, -1)), counts)
    fig = F.keep_map_figure(keep, 1, 1)
    assert len(fig.data) == budget.window
    for d, trace in enumerate(fig.data):
        assert np.asarray(trace.z).sum() == counts[1, 1, d]
    assert f"{counts[1, 1, 0]}/64 kept" in fig.layout.annotations[0].text


def test_keep_map_in_layer_chunks_equals_all_at_once(sources):
    whole = keep_maps(sources.budget, sources.stats.layout, chunk_layers=0)
    chunked = keep_maps(sources.budget, sources.stats.layout, chunk_layers=1)
    np.testing.assert_array_equal(whole.keep, chunked.keep)
    assert whole.budget_tokens == chunked.budget_tokens == PackCache(sources.budget).budget_tokens(
        sources.stats.layout.with_frames(6))


def test_keep_map_paper_default_is_a_uniform_subgrid():
    layout = SequenceLayout(text_tokens=4, num_frames=3, height=8, width=8, row_separator=True, frame_prefix=1,
                            frame_suffix=1)
    maps = keep_maps(Budget.paper_default(1, 2, 2, layout.summary()))
    half, quarter = maps.keep[0, 0, 0], maps.keep[0, 0, 1]
    assert half.sum() == 32 and quarter.sum() == 16
    np.testing.assert_array_equal(half, grid_priority(8, 8) < 32)  # the policy's ordered-dither ranks
    assert (quarter <= half).all()  # nested: an aging frame keeps a subset
    assert half.sum(0).min() == half.sum(0).max() == 4  # every column equally represented


# --------------------------------------------------------------------------------------------------------
# view 5: runtime
def test_runtime_figure(sources):
    runs = sources.runs
    fig = F.runtime_figure(runs, "seconds")
    assert len(fig.data) == len(runs)
    full = next(r for r in runs if r.is_full)
    trace = next(t for t in fig.data if full.name in t.name)
    np.testing.assert_allclose(trace.y, full.seconds * 1000, rtol=1e-5)
    tokens = F.runtime_figure(runs, "cache_tokens")
    by_name = {t.name.split(" · ")[1]: np.asarray(t.y) for t in tokens.data}
    assert by_name["full"][-1] > by_name["packcache"][-1]  # the full cache grows, PackCache stays packed
    assert by_name["packcache"][-1] == by_name["packcache"][-2]
    kib = F.runtime_figure(runs, "kv_bytes")
    np.testing.assert_allclose(kib.data[0].y, runs[0].kv_bytes / 1024, rtol=1e-5)
    with pytest.raises(ValueError):
        F.runtime_figure(runs, "nope")
    empty = F.runtime_figure([], "seconds")
    assert not empty.data and "no recorded runs" in empty.layout.annotations[0].text


def test_run_summary_and_table(sources, tmp_path):
    rows = {r["run"]: r for r in run_summary(sources.runs)}
    full, pack = rows["full"], rows["packcache"]
    assert full["speedup"] is None and full["agreement"] is None
    run = next(r for r in sources.runs if r.name == "packcache")
    ref = next(r for r in sources.runs if r.name == "full")
    assert pack["speedup"] == pytest.approx(ref.seconds.sum() / run.seconds.sum())
    assert pack["memory_ratio"] == pytest.approx(ref.kv_bytes.max() / run.kv_bytes.max()) and pack["memory_ratio"] > 1
    assert pack["agreement"] == pytest.approx(np.mean(frame_agreement(run.video, ref.video)[1:]))
    assert pack["peak_tokens"] == run.cache_tokens.max() < full["peak_tokens"]
    fig = F.run_table_figure(list(rows.values()))
    (table,) = fig.data
    assert list(table.cells.values[0]) == list(rows)
    assert table.cells.values[6][list(rows).index("packcache")].endswith("×")
    assert not F.run_table_figure([]).data


def test_policy_colours_are_fixed():
    assert F.policy_colour("PackCache(fitted)") == F.policy_colour("PackCache(paper)")
    assert F.policy_colour("FullCache") != F.policy_colour("PackCache(paper)")


# --------------------------------------------------------------------------------------------------------
# view 6: frames
def test_frames_figure(sources):
    by = {r.name: r for r in sources.runs}
    cand, ref = by["sliding"].video, by["full"].video
    agree = frame_agreement(cand, ref)
    fig = F.frames_figure(cand, ref, agreement=agree, per_line=4)
    assert len(fig.data) == 2 and all(isinstance(t, go.Image) for t in fig.data)  # 6 frames in blocks of 4
    block = np.asarray(fig.data[0].z)
    assert block.shape == (3 * 9 - 1, 4 * 9 - 1, 3)  # reference / candidate / differs rows of 8x8 frames
    from packcache.render import frames_to_rgb

    np.testing.assert_array_equal(block[:8, :8], frames_to_rgb(ref.frames[:1], cell=1)[0])
    np.testing.assert_array_equal(block[9:17, 9:17], frames_to_rgb(cand.frames[1:2], cell=1)[0])
    changed = cand.frames != ref.frames
    assert (block[18:26, 9:17] == [200, 30, 30]).all(-1).sum() == changed[1].sum()
    assert list(fig.layout.yaxis.ticktext) == ["FullCache", "SlidingWindow(1)", "differs"]
    assert fig.layout.xaxis2.ticktext[-1] == f"f5<br>{agree[5]:.0%}"
    alone = F.frames_figure(cand)
    assert len(alone.data) == 1 and np.asarray(alone.data[0].z).shape == (8, 6 * 9 - 1, 3)
    many = F.frames_figure(cand, ref, max_frames=3)
    assert np.asarray(many.data[0].z).shape[1] == 3 * 9 - 1


def test_quality_table(sources, example, tmp_path):
    assert [name for name, _ in sources.quality] == ["policy-table"]
    table = json.loads(Path(example["policy_table"]).read_text())
    assert frame_ranges(table) == ["all", "1-6", "7-12"]
    rows = quality_rows(table, "1-6")
    assert [r["policy"] for r in rows] == [r["policy"] for r in table["rows"]]
    assert rows[0]["gen_agreement"] == 1.0  # the full cache agrees with itself
    fig = F.quality_table_figure(rows, "1-6")
    (t,) = fig.data
    assert list(t.cells.values[0]) == [r["policy"] for r in rows] and t.cells.values[4][0] == "100.0%"
    late = F.quality_table_figure(quality_rows(table, "7-12"))  # beyond a 6-frame clip: NaN entries
    assert set(late.data[0].cells.values[2]) == {"–"}
    assert "packcache.metrics" in F.quality_table_figure([]).layout.annotations[0].text
    assert runs_from_file(example["policy_table"]) == []  # a table, not a run: no error
    # a packcache-bench file with only its fidelity section: no runs, one table (the means over seeds)
    bench = tmp_path / "bench-fidelity.json"
    bench.write_text(json.dumps({"schema": "packcache.bench/v1", "fidelity": {"rows": table["rows"], "seeds": 3}}))
    assert runs_from_file(bench) == []
    assert [name for name, _ in load_quality_tables([bench])] == ["bench-fidelity"]
    extra = load_sources(example["stats"], example["budget"], [example["runs"] / "full.json"],
                         quality=[example["policy_table"]], strict=True)
    assert [name for name, _ in extra.quality] == ["policy-table"]
    with pytest.raises(SourceError, match="not a fidelity table"):
        load_sources(example["stats"], example["budget"], [example["runs"]], quality=[example["budget"]],
                     strict=True)


def test_message_figure():
    fig = F.message_figure("nothing here", "T")
    assert fig.layout.annotations[0].text == "nothing here" and not fig.data
    long = F.message_figure("word " * 40)
    assert long.layout.annotations[0].text.count("<br>") >= 2


# --------------------------------------------------------------------------------------------------------
# responsiveness: a 50k-token profile sends aggregates only
def _large_stats() -> AttentionStats:
    """Lumos-1-sized layout (13 latent frames of 48 x (84 + separator) + specials = 53k tokens), random sums."""
    layout = SequenceLayout(text_tokens=64, num_frames=14, height=48, width=84, row_separator=True, frame_prefix=3,
                            frame_suffix=1, prefix_specials=3)
    assert layout.num_tokens > 50_000
    st = AttentionStats.empty("large", 8, 8, 4, layout, recent_frames=2, num_steps=9)
    rng = np.random.default_rng(0)
    q = 4032
    st.arrays["queries"][:] = q
    d = np.arange(st.max_distance)
    base = np.concatenate([[0.1, 0.15, 0.05, 0.0], 0.3 * 0.6 ** d, [0.01]])
    mass = base * rng.uniform(0.8, 1.2, size=st.mass.shape)
    st.arrays["mass"][:] = mass * q
    st.arrays["mass_sq"][:] = mass ** 2 * q * 1.1
    st.arrays["step_queries"][:] = q
    st.arrays["step_mass"][:] = mass[:, :, :9] * q
    st.arrays["spatial_queries"][:] = q
    st.arrays["spatial"][:] = rng.uniform(size=st.spatial.shape) * q / 4032
    return st


def test_large_profile_payloads_stay_small():
    from packcache.fit import fit_stats

    st = _large_stats()
    fits = fit_stats(st)
    budget = Budget.paper_default(8, 8, 4, st.layout.summary())
    keep = keep_maps(budget, st.layout)
    figs = {
        "group": F.attention_by_group_figure(st, "history", 3),
        "steps": F.step_evolution_figure(st),
        "decay": F.decay_figure(fits, 2, 3),
        "rho": F.rho_figure(fits),
        "spatial": F.spatial_figure(st),
        "ratios": F.keep_ratio_figure(budget),
        "keep": F.keep_map_figure(keep, 0, 0),
    }
    sizes = {k: _json_size(f) for k, f in figs.items()}
    assert max(sizes.values()) < 150_000, sizes
    assert sum(sizes.values()) < 400_000, sizes
    for trace in figs["spatial"].data:
        assert max(np.asarray(trace.z).shape) <= 64


def test_large_runs_payload_stays_small():
    n = 48
    runs = [RunCurves(f"r{i}", p, np.arange(n), np.full(n, 0.5), np.arange(n) * 4084, np.arange(n) * 10**6)
            for i, p in enumerate(("FullCache", "PackCache(paper)", "SlidingWindow(1)", "StreamingLLM(4)"))]
    assert _json_size(F.runtime_figure(runs, "kv_bytes")) < 60_000


# --------------------------------------------------------------------------------------------------------
# the app: wiring, CLI, background runs
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys):
    from dashboard.app import main

    with pytest.raises(SystemExit) as exc:
        main(["--stats", str(tmp_path / "missing.npz")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "missing.npz" in err and "Traceback" not in err
    (tmp_path / "b.json").write_text("[1, 2")
    with pytest.raises(SystemExit) as exc:
        main(["--budget", str(tmp_path / "b.json")])
    assert exc.value.code == 2 and "not valid JSON" in capsys.readouterr().err


def test_cli_busy_port_exits_2(tmp_path, capsys, example):
    import socket

    from dashboard.app import main

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(SystemExit) as exc:
            main(["--stats", str(example["stats"]), "--budget", str(example["budget"]), "--runs",
                  str(example["runs"]), "--port", str(port)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f"127.0.0.1:{port}" in err


def _dash_post(client, output: str, inputs: list[dict], state: list[dict] | None = None) -> dict:
    body = {"output": output, "outputs": {"id": output.split(".")[0], "property": output.split(".")[1]},
            "inputs": inputs, "state": state or [], "changedPropIds": [f"{i['id']}.{i['property']}" for i in inputs]}
    resp = client.post("/_dash-update-component", json=body)
    assert resp.status_code == 200, resp.data[:300]
    return resp.get_json()["response"]


def test_app_callbacks_return_figures(sources):
    from dashboard.app import create_app

    app = create_app(sources)
    client = app.server.test_client()
    assert client.get("/").status_code == 200
    out = _dash_post(client, "fig-group.figure", [{"id": "group", "property": "value", "value": "text"},
                                                  {"id": "step", "property": "value", "value": "1"}])
    fig = out["fig-group"]["figure"]
    assert "text" in fig["layout"]["title"]["text"] and fig["data"][0]["type"] == "heatmap"
    out = _dash_post(client, "fig-decay.figure", [{"id": "decay-layer", "property": "value", "value": "1"},
                                                  {"id": "decay-head", "property": "value", "value": "2"},
                                                  {"id": "decay-log", "property": "value", "value": []}])
    assert "layer 1, head 2" in out["fig-decay"]["figure"]["layout"]["title"]["text"]
    # a bad selection becomes a message figure, not a server error
    out = _dash_post(client, "fig-keep.figure", [{"id": "keep-layer", "property": "value", "value": "99"},
                                                 {"id": "keep-head", "property": "value", "value": "0"}])
    assert out["fig-keep"]["figure"]["layout"]["annotations"]


def test_app_without_inputs_explains_in_page(tmp_path):
    from dashboard.app import create_app

    src = load_sources(data_dir=tmp_path)
    app = create_app(src)
    client = app.server.test_client()
    out = _dash_post(client, "fig-group.figure", [{"id": "group", "property": "value", "value": "history"},
                                                  {"id": "step", "property": "value", "value": "all"}])
    text = out["fig-group"]["figure"]["layout"]["annotations"][0]["text"]
    assert "packcache-profile" in text.replace("<br>", " ")


def test_run_manager_adds_a_run(example):
    from dashboard.runner import RunManager, RunRequest

    src = load_sources(example["stats"], example["budget"], [example["runs"]], strict=True)
    src.model_dir = None  # a random demo model (the budget's 2 layers do not fit it: paper budget)
    manager = RunManager(src)
    with pytest.raises(ValueError):
        manager.start(RunRequest("Nope"))
    before = len(src.runs)
    job = manager.start(RunRequest("PackCache", "paper", frames=3, steps=1))
    job = manager.wait(job.id, timeout=120)
    assert job.status == "done", job.message
    assert len(src.runs) == before + 1 and job.run is src.runs[-1]
    assert job.run.policy == "PackCache(paper)" and job.frame == job.total == 3
    assert job.run.video.frames.shape == (3, 8, 8)
    failed = manager.start(RunRequest("PackCache", "loaded", frames=3, steps=1))  # 2-layer budget, 4-layer model
    failed = manager.wait(failed.id, timeout=120)
    assert failed.status == "error" and "num_layers" in failed.message


def test_embedded_profile_shows_in_the_runtime_view():
    from dashboard.app import create_app

    src = load_sources()
    assert [name for name, _ in src.profiles] == ["bench-profile"]
    app = create_app(src)
    assert "fig-time-by-kind" in str(app.layout)
    assert app.server.test_client().get("/").status_code == 200
