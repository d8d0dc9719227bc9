"""Bounded-cost check: peak memory and time of a probed forward vs a plain sdpa forward at long context.

``python -m probes.cost --tokens 16384 [--head-dim 32] [--heads 4] [--layers 2]`` builds a random Qwen3-VL text
decoder, runs one causal forward over a video layout of about ``--tokens`` tokens in a fresh subprocess per mode
(so peak RSS is per mode), times both modes interleaved in one more subprocess (best of ``--repeats``, so both
see the same machine load), and prints time and peak RSS growth above the state after the model and inputs were
built, next to the size one L x L float32 score matrix per head would take.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

__all__ = ["measure", "main"]


def _model(head_dim: int, heads: int, layers: int):
    import torch
    from transformers import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel

    torch.manual_seed(0)
    half = head_dim // 2
    section = [half - 2 * (half // 3), half // 3, half // 3]
    config = Qwen3VLTextConfig(vocab_size=64, hidden_size=heads * head_dim, intermediate_size=3 * heads * head_dim,
                               num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                               head_dim=head_dim, attn_implementation="sdpa", max_position_embeddings=1 << 16,
                               rope_parameters=dict(rope_type="default", rope_theta=1e4, mrope_section=section),
                               bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return Qwen3VLTextModel(config).eval()


def _layout(tokens: int):
    from packcache.layout import SequenceLayout

    per_frame, text = 64, 6
    return SequenceLayout(text_tokens=text, num_frames=max(2, (tokens - text) // per_frame), height=8, width=8,
                          convention="mmrope", scales=(1, 1, 1))


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def _setup(tokens: int, head_dim: int, heads: int, layers: int):
    import torch

    torch.set_num_threads(1)
    model = _model(head_dim, heads, layers)
    layout = _layout(tokens)
    ids = torch.randint(0, 64, (1, layout.num_tokens), generator=torch.Generator().manual_seed(0))
    pos = layout.position_ids(dims=3)
    with torch.no_grad():  # warm-up at a small size
        model(input_ids=ids[:, :256], position_ids=pos[..., :256])
    return model, layout, ids, pos


def _forward(mode: str, model, layout, ids, pos, chunk: int) -> float:
    import torch

    from probes.backend import AttentionProbe

    start = time.perf_counter()
    with torch.no_grad():
        if mode == "probe":
            with AttentionProbe(model, layout, chunk_size=chunk):
                model(input_ids=ids, position_ids=pos)
        else:
            model(input_ids=ids, position_ids=pos)
    return time.perf_counter() - start


def _worker(mode: str, tokens: int, head_dim: int, heads: int, layers: int, repeats: int, chunk: int) -> dict:
    """``mode`` "sdpa"/"probe": one forward, peak RSS growth; "time": both modes interleaved, best of ``repeats``."""
    setup = _setup(tokens, head_dim, heads, layers)
    if mode == "time":
        best = {"sdpa": float("inf"), "probe": float("inf")}
        for _ in range(repeats):  # interleaved, so both modes see the same machine load
            for m in best:
                best[m] = min(best[m], _forward(m, *setup, chunk))
        return {"mode": mode, "tokens": setup[1].num_tokens, **best}
    base = _rss_bytes()
    seconds = _forward(mode, *setup, chunk)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": mode, "tokens": setup[1].num_tokens, "seconds": seconds, "peak_extra_bytes": peak - base}


def measure(tokens: int = 16384, *, head_dim: int = 32, heads: int = 4, layers: int = 2, repeats: int = 3,
            chunk: int = 1024) -> dict:
    """Peak memory of each mode in its own subprocess; time of both modes interleaved in a third (best of
    ``repeats``). Returns the records and the time ratio."""
    records = {}
    for mode in ("sdpa", "probe", "time"):
        cmd = [sys.executable, "-m", "probes.cost", "--worker", mode, "--tokens", str(tokens), "--head-dim",
               str(head_dim), "--heads", str(heads), "--layers", str(layers), "--repeats", str(repeats),
               "--chunk", str(chunk)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        records[mode] = json.loads(out.strip().splitlines()[-1])
    timing = records.pop("time")
    for mode in ("sdpa", "probe"):
        records[mode]["seconds"] = timing[mode]
    n = records["sdpa"]["tokens"]
    return {**records, "time_ratio": timing["probe"] / timing["sdpa"], "score_matrix_bytes_per_head": n * n * 4,
            "head_dim": head_dim, "heads": heads, "layers": layers, "chunk": chunk, "repeats": repeats}


def format_report(result: dict) -> str:
    mib = 1 << 20
    s, p = result["sdpa"], result["probe"]
    return (f"{s['tokens']} tokens, {result['layers']} layers x {result['heads']} heads, head_dim "
            f"{result['head_dim']}, chunk {result['chunk']}, best of {result['repeats']}\n"
            f"  plain sdpa : {s['seconds']:.2f} s, peak +{s['peak_extra_bytes'] / mib:.0f} MiB\n"
            f"  probed     : {p['seconds']:.2f} s, peak +{p['peak_extra_bytes'] / mib:.0f} MiB\n"
            f"  time ratio {result['time_ratio']:.2f}x; one L x L float32 score matrix per head would be "
            f"{result['score_matrix_bytes_per_head'] / mib:.0f} MiB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m probes.cost", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=16384)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--worker", choices=("sdpa", "probe", "time"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args.worker, args.tokens, args.head_dim, args.heads, args.layers, args.repeats,
                                 args.chunk)))
        return 0
    print(format_report(measure(args.tokens, head_dim=args.head_dim, heads=args.heads, layers=args.layers,
                                repeats=args.repeats, chunk=args.chunk)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
