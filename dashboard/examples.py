"""Small example inputs for the dashboard, made with the real tools on a randomly initialised demo model.

:func:`write_example_inputs` probes AR-DF generation (:class:`probes.AttentionProbe` around
:func:`packcache.runtime.generate_video`), saves the statistics, fits a budget with :mod:`packcache.fit`, and
records one run per policy. The tests use it; so can anyone who wants to try the dashboard before profiling::

    python -m dashboard.examples /tmp/pc-example && packcache-dashboard --stats /tmp/pc-example/stats.npz \\
        --budget /tmp/pc-example/budget.json --runs /tmp/pc-example/runs
"""

from __future__ import annotations

import argparse
import json
import os
import warnings
from pathlib import Path

__all__ = ["write_example_inputs", "tiny_demo_model"]


def tiny_demo_model(layers: int = 2, heads: int = 2, kv_heads: int | None = None, seed: int = 0):
    """A randomly initialised demo video model (hidden 64), for examples and tests."""
    import torch

    from packcache.demo.model import DemoVideoConfig, DemoVideoModel

    torch.manual_seed(seed)
    config = DemoVideoConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                             num_attention_heads=heads, num_key_value_heads=kv_heads or heads, head_dim=32,
                             rope_parameters={"rope_type": "default", "rope_theta": 1000.0,
                                              "mrope_section": [6, 5, 5]})
    return DemoVideoModel(config).eval()


def write_example_inputs(out_dir: str | os.PathLike, *, frames: int = 6, steps: int = 2, samples: int = 1,
                         layers: int = 2, heads: int = 2, kv_heads: int | None = None, window: int = 3,
                         seed: int = 0) -> dict[str, Path]:
    """Write ``stats.npz``, ``budget.json`` (fitted, per kv head), ``paper-budget.json``, ``runs/*.json`` (one
    run per policy) and ``runs/policy-table.json`` (:func:`packcache.metrics.policy_table` on two clips).

    Returns the paths by name (``stats``, ``budget``, ``paper_budget``, ``runs``, ``policy_table``).
    """
    import torch

    from packcache.budget import Budget, atomic_write_text
    from packcache.demo.clips import clip_layout, make_clip
    from packcache.fit import budget_from_stats
    from packcache.metrics import policy_table
    from packcache.policies import FullCache, PackCache, SlidingWindow, StreamingLLM
    from packcache.runtime import generate_video
    from probes import AttentionProbe

    out = Path(out_dir)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    model = tiny_demo_model(layers, heads, kv_heads, seed)
    layout = clip_layout(frames)
    with torch.no_grad(), AttentionProbe(model, layout, num_steps=steps + 1, recent_frames=2,
                                         max_distance=frames, model_id="example-random") as probe:
        for s in range(samples):
            clip = make_clip(seed + s, frames)
            generate_video(model, clip.text, clip.frames[0], frames, FullCache(), steps=steps, cfg_scale=1.0,
                           progress=False)
            probe.next_sample()
    stats = probe.stats
    stats.save(out / "stats.npz")
    fitted = budget_from_stats(stats, target_frames=1.0, window=window, per_kv_head=True)
    fitted.save(out / "budget.json")
    paper = Budget.paper_default(layers, heads, kv_heads or heads, layout.summary(), model_id="example-random",
                                 window=window)
    paper.save(out / "paper-budget.json")
    pack = PackCache(fitted)
    clip = make_clip(seed, frames)
    policies = {"full": FullCache(), "packcache": pack, "sliding": SlidingWindow(1),
                "streaming": StreamingLLM(max_tokens=int(pack.budget_tokens(layout)))}
    with torch.no_grad():
        for name, policy in policies.items():
            video = generate_video(model, clip.text, clip.frames[0], frames, policy, steps=steps, progress=False)
            video.save(out / "runs" / f"{name}.json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # empty frame ranges of a short clip give NaN entries
        table = policy_table(model, num_clips=2, num_frames=frames, gen_clips=1, steps=1, seed=seed, progress=False)
    atomic_write_text(out / "runs" / "policy-table.json", json.dumps(table) + "\n")
    return {"stats": out / "stats.npz", "budget": out / "budget.json", "paper_budget": out / "paper-budget.json",
            "runs": out / "runs", "policy_table": out / "runs" / "policy-table.json"}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Write small example dashboard inputs (random demo model).")
    p.add_argument("out", help="output directory")
    p.add_argument("--frames", type=int, default=6)
    p.add_argument("--steps", type=int, default=2)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    paths = write_example_inputs(args.out, frames=args.frames, steps=args.steps)
    for key, path in paths.items():
        print(f"{key}: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
