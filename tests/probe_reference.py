"""Independent reference for the probes: eager attention weights, summed by token group with plain numpy loops."""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from reference import attention_modules

from packcache.layout import SequenceLayout, TokenGroup

FIRST_DISTANCE = 4  # written out here on purpose: the reference does not import the probes


@contextmanager
def eager_weights(model):
    """Collect ``weights[layer] -> [B, H, q, S]`` from an eager model's self-attention outputs."""
    weights: dict[int, torch.Tensor] = {}
    handles = [m.register_forward_hook(lambda mod, a, out, i=i: weights.__setitem__(i, out[1].detach().double()))
               for i, m in enumerate(attention_modules(model))]
    try:
        yield weights
    finally:
        for h in handles:
            h.remove()


def key_group(layout: SequenceLayout, query: int, key: int, max_distance: int) -> int:
    g = layout.group[key]
    if g == TokenGroup.TEXT:
        return 0
    if g == TokenGroup.COND:
        return 1
    if g == TokenGroup.SPECIAL:
        return 2
    d = int(layout.frame[query] - layout.frame[key])
    return 3 if d < 0 else FIRST_DISTANCE + min(d, max_distance)


def group_mass(weights: dict[int, torch.Tensor], layout: SequenceLayout, max_distance: int,
               queries: np.ndarray | None = None, keys: list[np.ndarray] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """``mass [L, H, F, G]`` and ``count [F]`` summed over visual queries.

    ``queries`` are the layout indices of the query rows (default: the last ``q`` of ``0..S-1``); ``keys[layer]``
    is ``[kv_heads, S]`` (a cache's slot tokens; default ``0..S-1`` for every head).
    """
    n_layers = len(weights)
    b, n_heads, q, s = weights[0].shape
    queries = np.arange(s - q, s) if queries is None else np.asarray(queries)
    keys = [np.arange(s)[None]] * n_layers if keys is None else [np.asarray(k) for k in keys]
    mass = np.zeros((n_layers, n_heads, layout.num_frames, FIRST_DISTANCE + max_distance + 1))
    count = np.zeros(layout.num_frames, dtype=np.int64)
    rows = [i for i, tok in enumerate(queries) if layout.group[tok] in (TokenGroup.FRAME, TokenGroup.COND)]
    for i in rows:
        count[layout.frame[queries[i]]] += b
    codes: dict[bytes, np.ndarray] = {}  # key row -> [len(rows), S] key group of every (query, key) pair
    for layer in range(n_layers):
        w = weights[layer].sum(0).numpy()  # [H, q, S]
        per_kv = n_heads // keys[layer].shape[0]
        for h in range(n_heads):
            row = keys[layer][h // per_kv]
            if row.tobytes() not in codes:
                codes[row.tobytes()] = np.array([[key_group(layout, queries[i], key, max_distance) for key in row]
                                                 for i in rows])
            code = codes[row.tobytes()]
            for r, i in enumerate(rows):
                np.add.at(mass[layer, h, layout.frame[queries[i]]], code[r], w[h, i])
    return mass, count


def spatial_mass(weights: dict[int, torch.Tensor], layout: SequenceLayout, recent: int) -> np.ndarray:
    """``[L, H, R, height, width]``: mass of visual queries on each cell of the generated frame ``d < R`` back."""
    n_layers = len(weights)
    b, n_heads, q, s = weights[0].shape
    out = np.zeros((n_layers, n_heads, recent, layout.height, layout.width))
    for i, tok in enumerate(range(s - q, s)):
        if layout.group[tok] not in (TokenGroup.FRAME, TokenGroup.COND):
            continue
        for key in range(s):
            if layout.group[key] != TokenGroup.FRAME:
                continue
            d = int(layout.frame[tok] - layout.frame[key])
            if 0 <= d < recent:
                for layer in range(n_layers):
                    out[layer, :, d, layout.row[key], layout.col[key]] += weights[layer][:, :, i, key].sum(0).numpy()
    return out


def tiny_demo(attn: str = "sdpa"):
    """A small randomly initialised :class:`packcache.demo.DemoVideoModel` (GQA, interleaved M-RoPE)."""
    from packcache.demo import DemoVideoConfig, DemoVideoModel

    torch.manual_seed(0)
    config = DemoVideoConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                             num_key_value_heads=2, head_dim=16, attn_implementation=attn,
                             rope_parameters={"rope_type": "default", "rope_theta": 1000.0, "mrope_section": [4, 2, 2]})
    return DemoVideoModel(config).eval()
