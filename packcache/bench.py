"""``packcache-bench``: speed, memory and fidelity of PackCache against full cache and the baselines.

Every policy runs on identical inputs in one process, interleaved (A B C, then rotated), after a warm-up;
figures are medians over repeats and speedups are per-repeat ratios (median and min-max spread). Sections:

* **speed** -- a randomly initialised model (timing only) whose attention-to-linear cost at the last frame
  matches Lumos-1-3B at 384p and 13 latent frames (about 3), generating 13 latent frames plus the condition
  frame with AR-DF masked decoding and CFG; per policy: end-to-end time, last-4-frame time, per-frame latency,
  peak KV bytes and compaction overhead; the anchors-only run is the floor no anchor-keeping policy can beat.
* **ideal** -- multiply-accumulates of exactly the forwards each run made (from its per-frame cache sizes);
  the FLOP-ideal speedup and the measured speedup as a fraction of it.
* **fidelity** -- the trained demo model at 13 frames (beyond its 7-frame training length) at equal cache
  memory, over several seeds (see :func:`packcache.metrics.policy_fidelity`).
* **profile** (not in the default set) -- one run per speed policy under ``torch.profiler``: self CPU time by
  kind of op (attention, linear, cache copies, other) and time per MAC of attention and of the linear layers.
* **scaling** -- per-frame latency and KV bytes out to 48 latent frames, FullCache vs PackCache, and where a
  24 GiB budget runs out.

Absolute times are CPU-only; the ratios are what compare.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from packcache.budget import Budget, BudgetError, atomic_write_text
from packcache.layout import SequenceLayout
from packcache.policies import CachePolicy, FullCache, PackCache, SlidingWindow
from packcache.progress import ProgressBar
from packcache.records import VideoResult

__all__ = ["SpeedConfig", "PRESETS", "forward_macs", "frame_macs", "run_macs", "op_kind", "run_speed", "run_profile",
           "run_scaling", "main", "BENCH_SCHEMA"]

BENCH_SCHEMA = "packcache.bench/v1"
GIB = 1024**3


@dataclass(frozen=True)
class SpeedConfig:
    """Model shape and video size of a timing run (random weights)."""

    hidden: int = 256
    layers: int = 8
    heads: int = 4
    intermediate: int = 683
    height: int = 16
    width: int = 20
    text_tokens: int = 6
    num_frames: int = 14  # the condition frame + 13 latent frames
    steps: int = 4
    cfg_scale: float = 3.0

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def layout(self, num_frames: int | None = None) -> SequenceLayout:
        """Demo-style layout (Lumos-1 specials, MM-RoPE scales (1, 4, 4)) at this frame size."""
        from packcache.demo.clips import SCALES

        return SequenceLayout(text_tokens=self.text_tokens, num_frames=num_frames or self.num_frames,
                              height=self.height, width=self.width, row_separator=True, frame_prefix=1,
                              frame_suffix=1, scales=SCALES)

    def model(self) -> torch.nn.Module:
        """A randomly initialised demo-architecture model of this shape (timing only)."""
        from packcache.demo.model import DemoVideoConfig, DemoVideoModel

        pairs = self.head_dim // 2
        section = [pairs - 2 * (pairs // 3), pairs // 3, pairs // 3]
        torch.manual_seed(0)
        config = DemoVideoConfig(hidden_size=self.hidden, intermediate_size=self.intermediate,
                                 num_hidden_layers=self.layers, num_attention_heads=self.heads,
                                 num_key_value_heads=self.heads, head_dim=self.head_dim,
                                 max_position_embeddings=8192,
                                 rope_parameters={"rope_type": "default", "rope_theta": 1000.0,
                                                  "mrope_section": section})
        return DemoVideoModel(config).eval()

    def attention_linear_ratio(self) -> float:
        """Attention MACs over linear MACs per query token at the last frame (full cache)."""
        kv = self.layout().num_tokens
        linear, attention = forward_macs(self, 1, kv)
        return attention / linear


PRESETS: dict[str, dict[str, Any]] = {
    "quick": {"speed": SpeedConfig(hidden=128, layers=4, intermediate=341, height=8, width=10, num_frames=8,
                                   steps=2), "repeats": 2, "scaling_frames": 16, "fidelity_seeds": 1,
              "fidelity_clips": 4},
    "full": {"speed": SpeedConfig(), "repeats": 3, "scaling_frames": 48, "fidelity_seeds": 3,
             "fidelity_clips": 16},
}


def forward_macs(cfg: SpeedConfig, q: int, kv: int) -> tuple[int, int]:
    """(linear, attention) multiply-accumulates of one forward of ``q`` query tokens over ``kv`` keys, one row."""
    d, layers = cfg.hidden, cfg.layers
    kv_dim = cfg.heads * cfg.head_dim
    linear = layers * q * (2 * d * d + 2 * d * kv_dim + 3 * d * cfg.intermediate)
    attention = layers * q * kv * 2 * cfg.heads * cfg.head_dim
    return linear, attention


def frame_macs(cfg: SpeedConfig, result: VideoResult) -> list[tuple[int, int]]:
    """(linear, attention) MACs of every frame of a masked run, from the cache size its forwards attended to."""
    layout = cfg.layout(len(result.records))
    rows = 1 if cfg.cfg_scale == 1.0 else 2
    per_frame = []
    for rec in result.records:
        if rec.frame == 0:
            q, kv, n = layout.frame_slice(0).stop, layout.frame_slice(0).stop, 1
        else:
            q = layout.tokens_per_frame
            kv, n = rec.cache_tokens[0] + q, rec.forwards
        linear, attention = forward_macs(cfg, q, kv)
        per_frame.append((rows * n * linear, rows * n * attention))
    return per_frame


def run_macs(cfg: SpeedConfig, result: VideoResult) -> list[int]:
    """MACs of every frame of a masked run (linear + attention)."""
    return [linear + attention for linear, attention in frame_macs(cfg, result)]


def _speed_policies(layout: SequenceLayout, cfg: SpeedConfig) -> dict[str, Callable[[], CachePolicy]]:
    budget = Budget.paper_default(cfg.layers, cfg.heads, cfg.heads, layout.summary(), model_id="bench-random")
    return {
        "FullCache": FullCache,
        "PackCache(paper)": lambda: PackCache(budget),
        "AnchorsOnly": lambda: SlidingWindow(frames=0),
    }


def _summary(runs: list[VideoResult], macs: list[list[int]]) -> dict[str, Any]:
    totals = [r.total_seconds for r in runs]
    last4 = [sum(rec.seconds for rec in r.records[-4:]) for r in runs]
    per_frame = np.median(np.array([[rec.seconds for rec in r.records] for r in runs]), axis=0)
    compaction = [sum(rec.compaction_seconds for rec in r.records) for r in runs]
    frac = [max((rec.compaction_seconds / rec.seconds) for rec in r.records[1:]) for r in runs]
    return {
        "end_to_end_s": statistics.median(totals),
        "last4_s": statistics.median(last4),
        "per_frame_s": per_frame.tolist(),
        "cache_tokens": [rec.cache_tokens[0] for rec in runs[0].records],
        "kv_bytes": [rec.kv_bytes for rec in runs[0].records],
        "peak_kv_bytes": max(rec.kv_bytes for rec in runs[0].records),
        "compaction_s": statistics.median(compaction),
        "compaction_fraction_of_total": statistics.median(c / t for c, t in zip(compaction, totals)),
        "max_compaction_fraction_of_frame": max(frac),
        "macs_total": sum(macs[0]),
        "macs_last4": sum(macs[0][-4:]),
        "macs_per_frame": macs[0],
        "repeats_end_to_end_s": totals,
        "repeats_last4_s": last4,
    }


def _ratio_stats(num: list[float], den: list[float]) -> dict[str, float]:
    ratios = [a / b for a, b in zip(num, den)]
    return {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios)}


def _inputs(cfg: SpeedConfig, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A random prompt and condition frame for the timing model."""
    rng = np.random.default_rng(seed)
    return rng.integers(11, 24, size=cfg.text_tokens), rng.integers(0, 6, size=(cfg.height, cfg.width))


def _speed_runner(cfg: SpeedConfig) -> tuple[list[str], Callable[[str, int], VideoResult]]:
    """The speed policies' names and ``one(name, frames)``: one masked run of the timing model, warmed up."""
    from packcache.runtime import generate_video

    model = cfg.model()
    policies = _speed_policies(cfg.layout(), cfg)
    prompt, cond = _inputs(cfg, 0)

    def one(name: str, frames: int) -> VideoResult:
        return generate_video(model, prompt, cond, frames, policies[name](), "masked", steps=cfg.steps,
                              cfg_scale=cfg.cfg_scale, seed=0, progress=False,
                              layout=cfg.layout(frames))

    names = list(policies)
    for name in names:  # warm-up: allocator, kernels, caches of the layout
        one(name, 3)
    return names, one


def run_speed(cfg: SpeedConfig, repeats: int, *, progress: bool = True) -> dict[str, Any]:
    """Interleaved timing of FullCache, PackCache(paper) and the anchors-only floor."""
    layout = cfg.layout()
    names, one = _speed_runner(cfg)
    runs: dict[str, list[VideoResult]] = {n: [] for n in names}
    bar = ProgressBar(repeats * len(names), "speed", enabled=progress)
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            runs[name].append(one(name, cfg.num_frames))
            bar.update(1, f"{name} {runs[name][-1].total_seconds:.1f}s")
    bar.close()
    macs = {n: [run_macs(cfg, res) for res in runs[n]] for n in names}
    summary = {n: _summary(runs[n], macs[n]) for n in names}
    full, pack, floor = (summary[n] for n in names)
    ideal_e2e = full["macs_total"] / pack["macs_total"]
    ideal_last4 = full["macs_last4"] / pack["macs_last4"]
    e2e = _ratio_stats(full["repeats_end_to_end_s"], pack["repeats_end_to_end_s"])
    last4 = _ratio_stats(full["repeats_last4_s"], pack["repeats_last4_s"])
    over_floor = _ratio_stats(pack["repeats_end_to_end_s"], floor["repeats_end_to_end_s"])
    return {
        "config": asdict(cfg),
        "layout": layout.summary() | {"num_tokens": layout.num_tokens},
        "attention_linear_ratio_last_frame": cfg.attention_linear_ratio(),
        "weights": "random (timing only)",
        "policies": summary,
        "speedup_end_to_end": e2e,
        "speedup_last4": last4,
        "ideal_speedup_end_to_end": ideal_e2e,
        "ideal_speedup_last4": ideal_last4,
        "fraction_of_ideal_end_to_end": e2e["median"] / ideal_e2e,
        "fraction_of_ideal_last4": last4["median"] / ideal_last4,
        "packcache_over_floor_time": over_floor,
        "packcache_over_floor_macs": pack["macs_total"] / floor["macs_total"],
        "kv_memory_ratio": full["peak_kv_bytes"] / pack["peak_kv_bytes"],
    }


#: torch ops by the kind of work they do (self CPU time); anything else counts as "other"
OP_KINDS = {
    "attention": ("scaled_dot_product", "flash_attention", "_softmax", "baddbmm", "bmm"),
    "linear": ("aten::addmm", "aten::mm", "aten::linear"),
    "cache copies": ("aten::cat", "aten::copy_", "aten::index_select", "aten::gather", "aten::clone"),
}


def op_kind(name: str) -> str:
    """The :data:`OP_KINDS` kind of a profiled op name (``"other"`` if none)."""
    for kind, patterns in OP_KINDS.items():
        if any(p in name for p in patterns):
            return kind
    return "other"


def run_profile(cfg: SpeedConfig, *, progress: bool = True) -> dict[str, Any]:
    """Where each speed policy's time goes: one full run per policy under ``torch.profiler`` (self CPU time by
    :func:`op_kind`), next to its linear and attention MACs, so time per MAC can be compared between the two."""
    from torch.profiler import ProfilerActivity, profile

    names, one = _speed_runner(cfg)
    out: dict[str, Any] = {"frames": cfg.num_frames, "policies": {}}
    bar = ProgressBar(len(names), "profile", enabled=progress)
    for name in names:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            result = one(name, cfg.num_frames)
        seconds = dict.fromkeys([*OP_KINDS, "other"], 0.0)
        for event in prof.key_averages():
            seconds[op_kind(event.key)] += event.self_cpu_time_total / 1e6
        linear, attention = (sum(m) for m in zip(*frame_macs(cfg, result)))
        out["policies"][name] = {
            "seconds_by_kind": seconds,
            "macs_linear": linear,
            "macs_attention": attention,
            "ns_per_mac_linear": 1e9 * seconds["linear"] / linear,
            "ns_per_mac_attention": 1e9 * seconds["attention"] / attention,
        }
        bar.update(1, name)
    bar.close()
    return out


def run_scaling(cfg: SpeedConfig, frames: int, *, progress: bool = True) -> dict[str, Any]:
    """Per-frame latency and KV bytes of FullCache vs PackCache out to ``frames`` latent frames."""
    from packcache.runtime import generate_video

    model = cfg.model()
    layout = cfg.layout(frames + 1)
    policies = _speed_policies(layout, cfg)
    prompt, cond = _inputs(cfg, 1)
    out: dict[str, Any] = {"frames": frames + 1, "steps": 1, "policies": {}}
    for name in ("FullCache", "PackCache(paper)"):
        res = generate_video(model, prompt, cond, frames + 1, policies[name](), "masked", steps=1,
                             cfg_scale=cfg.cfg_scale, seed=0, progress=progress, layout=layout)
        out["policies"][name] = {"per_frame_s": [r.seconds for r in res.records],
                                 "kv_bytes": [r.kv_bytes for r in res.records],
                                 "cache_tokens": [r.cache_tokens[0] for r in res.records]}
    full = out["policies"]["FullCache"]["kv_bytes"]
    pack = out["policies"]["PackCache(paper)"]["kv_bytes"]
    per_frame = (full[-1] - full[1]) / (len(full) - 2)
    out["kv_bytes_per_frame_full"] = per_frame
    out["packcache_kv_bytes_constant"] = pack[-1]
    out["lumos_3b_estimate"] = lumos_memory_estimate()
    return out


def lumos_memory_estimate(budget_gib: float = 24.0) -> dict[str, Any]:
    """Where a 24 GiB GPU runs out for a Lumos-1-3B-sized model (assumed Llama-3.2-3B shape: 28 layers, 8 kv
    heads of 128, bf16, 6 GiB of weights), two caches for CFG, 4,084 tokens per latent frame."""
    layers, kv_heads, head_dim, bytes_per, caches = 28, 8, 128, 2, 2
    per_token = 2 * layers * kv_heads * head_dim * bytes_per * caches
    per_frame = per_token * 4084
    free = (budget_gib - 6.0) * GIB
    anchors = per_token * (4084 + 64)  # conditioning frame + prompt
    packcache = anchors + per_token * (4084 + 4 * (48 + 4))  # one frame of history + the window's specials
    return {
        "assumptions": "28 layers, 8 kv heads x 128, bf16, CFG = 2 caches, 6 GiB weights, 4,084 tokens/frame",
        "kv_gib_per_latent_frame": per_frame / GIB,
        "full_cache_latent_frames_that_fit": int((free - anchors) // per_frame),
        "packcache_kv_gib": packcache / GIB,
    }


def _fidelity(preset: dict[str, Any], model_dir: Path | None, budget_path: Path | None, progress: bool
              ) -> dict[str, Any] | None:
    from packcache.demo.model import load_demo_model
    from packcache.metrics import policy_fidelity

    model = load_demo_model(model_dir)
    result = policy_fidelity(model=model, budget_path=budget_path, seeds=preset["fidelity_seeds"],
                             clips=preset["fidelity_clips"], progress=progress)
    return {"model": str(model_dir) if model_dir is not None else "the shipped demo model", **result}


def format_table(results: dict[str, Any]) -> str:
    """The printed summary."""
    lines = []
    speed = results.get("speed")
    if speed:
        cfg = speed["config"]
        lines.append(f"speed: random weights (timing only); d={cfg['hidden']}, {cfg['layers']} layers, "
                     f"{cfg['height']}x{cfg['width']} grid, {speed['layout']['num_tokens']} tokens at frame "
                     f"{cfg['num_frames'] - 1}; attention/linear at the last frame = "
                     f"{speed['attention_linear_ratio_last_frame']:.2f}; AR-DF {cfg['steps']} steps + CFG")
        lines.append(f"{'policy':<18}{'end-to-end s':>14}{'last-4 s':>10}{'peak KV MiB':>13}{'compaction %':>14}")
        for name, p in speed["policies"].items():
            lines.append(f"{name:<18}{p['end_to_end_s']:>14.2f}{p['last4_s']:>10.2f}"
                         f"{p['peak_kv_bytes'] / 2**20:>13.1f}{100 * p['compaction_fraction_of_total']:>14.2f}")
        e, l4 = speed["speedup_end_to_end"], speed["speedup_last4"]
        lines.append(f"speedup vs FullCache: end-to-end {e['median']:.2f}x [{e['min']:.2f}-{e['max']:.2f}], "
                     f"last 4 frames {l4['median']:.2f}x [{l4['min']:.2f}-{l4['max']:.2f}]")
        lines.append(f"FLOP-ideal: end-to-end {speed['ideal_speedup_end_to_end']:.2f}x, last 4 "
                     f"{speed['ideal_speedup_last4']:.2f}x; measured/ideal {speed['fraction_of_ideal_end_to_end']:.0%}"
                     f" / {speed['fraction_of_ideal_last4']:.0%}")
        lines.append(f"PackCache / anchors-only floor: time {speed['packcache_over_floor_time']['median']:.3f}, "
                     f"MACs {speed['packcache_over_floor_macs']:.3f}; KV memory ratio full/pack "
                     f"{speed['kv_memory_ratio']:.2f}x")
    scaling = results.get("scaling")
    if scaling:
        full = scaling["policies"]["FullCache"]
        pack = scaling["policies"]["PackCache(paper)"]
        lines.append(f"scaling to {scaling['frames'] - 1} latent frames: last-frame latency full "
                     f"{full['per_frame_s'][-1]:.2f}s vs pack {pack['per_frame_s'][-1]:.2f}s; KV "
                     f"{full['kv_bytes'][-1] / 2**20:.1f} MiB vs {pack['kv_bytes'][-1] / 2**20:.1f} MiB (constant "
                     f"from frame {_first_constant(pack['kv_bytes'])})")
        est = scaling["lumos_3b_estimate"]
        lines.append(f"Lumos-1-3B-sized estimate: {est['kv_gib_per_latent_frame']:.2f} GiB KV per latent frame; "
                     f"FullCache fits {est['full_cache_latent_frames_that_fit']} latent frames in 24 GiB, PackCache "
                     f"needs {est['packcache_kv_gib']:.2f} GiB at any length")
    prof = results.get("profile")
    if prof:
        kinds = [*OP_KINDS, "other"]
        lines.append("profile (torch.profiler, self CPU seconds by kind of op, one run each):")
        lines.append(f"{'policy':<18}" + "".join(f"{k:>14}" for k in kinds) + f"{'attn ns/MAC':>13}{'lin ns/MAC':>12}")
        for name, p in prof["policies"].items():
            lines.append(f"{name:<18}" + "".join(f"{p['seconds_by_kind'][k]:>14.2f}" for k in kinds)
                         + f"{p['ns_per_mac_attention']:>13.3f}{p['ns_per_mac_linear']:>12.3f}")
    fidelity = results.get("fidelity")
    if fidelity:
        lines.append(fidelity["table"])
    return "\n".join(lines)


def _first_constant(values: list[int]) -> int:
    for i in range(len(values)):
        if len(set(values[i:])) == 1:
            return i
    return len(values)


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``packcache-bench``."""
    parser = argparse.ArgumentParser(prog="packcache-bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full")
    parser.add_argument("--quick", action="store_const", const="quick", dest="preset", help="same as --preset quick")
    parser.add_argument("-o", "--out", type=Path, default=Path("out/bench.json"), help="results JSON")
    parser.add_argument("--model", type=Path, default=None,
                        help="demo checkpoint for the fidelity rows (default: the shipped data/demo-model)")
    parser.add_argument("--budget", type=Path, default=None, help="fitted budget for the fidelity rows")
    parser.add_argument("--sections", default="speed,scaling,fidelity",
                        help="comma-separated subset of speed, scaling, profile, fidelity")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: one core per run gives the steadiest ratios)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    unknown = sections - {"speed", "scaling", "profile", "fidelity"}
    if unknown:
        print(f"packcache-bench: unknown section {sorted(unknown)[0]!r}", file=sys.stderr)
        return 2
    if args.model is not None and not (args.model / "config.json").is_file():
        print(f"packcache-bench: no demo checkpoint at {args.model}", file=sys.stderr)
        return 2
    if args.budget is not None:
        try:
            Budget.load(args.budget)
        except BudgetError as exc:
            print(f"packcache-bench: {exc}", file=sys.stderr)
            return 2
    torch.set_num_threads(max(1, args.threads))
    progress = not args.no_progress
    started = time.time()
    results: dict[str, Any] = {"schema": BENCH_SCHEMA, "preset": args.preset,
                               "machine": {"threads": torch.get_num_threads(), "device": "cpu"}}
    if "speed" in sections:
        results["speed"] = run_speed(preset["speed"], args.repeats or preset["repeats"], progress=progress)
    if "scaling" in sections:
        results["scaling"] = run_scaling(preset["speed"], preset["scaling_frames"], progress=progress)
    if "profile" in sections:
        results["profile"] = run_profile(preset["speed"], progress=progress)
    if "fidelity" in sections:
        results["fidelity"] = _fidelity(preset, args.model, args.budget, progress)
    results["seconds"] = time.time() - started
    atomic_write_text(args.out, json.dumps(results, indent=1) + "\n")
    print(format_table(results))
    print(f"wrote {args.out} ({results['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
