"""Video generation on a compact KV cache: Lumos-1's AR-DF masked loop and Emu3-style raster decoding.

Every forward gets absolute position ids from the layout (:meth:`CompactCache.position_ids`, rebased when asked);
the policy compacts the cache at every frame boundary. Any :class:`~packcache.policies.CachePolicy` plugs in.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import numpy as np
import torch

from packcache.cache import CompactCache, cache_kwargs
from packcache.demo.clips import VOCAB, ClipFormat, Vocab, clip_layout, clip_token_ids, encode_prompt, frame_token_ids
from packcache.demo.model import ardf_mask
from packcache.layout import SequenceLayout
from packcache.policies.base import CachePolicy
from packcache.progress import ProgressBar
from packcache.records import FrameRecord, VideoResult
from packcache.rope import position_dims

__all__ = ["generate_video", "ardf_forward", "FrameRecord", "VideoResult", "position_dims", "history_tube",
           "still_masked", "MODES"]

MODES = ("masked", "raster")


def history_tube(height: int, width: int, ratio: float, seed: int = 0) -> np.ndarray:
    """The fixed tube of cells masked when a finished frame is re-encoded (same cells in every frame)."""
    cells = height * width
    tube = np.zeros(cells, dtype=bool)
    k = int(round(ratio * cells))
    if k:
        tube[np.random.default_rng(seed).choice(cells, size=k, replace=False)] = True
    return tube.reshape(height, width)


def still_masked(cells: int, it: int, steps: int, remaining: int) -> int:
    """MaskGIT cosine schedule: how many of a frame's ``cells`` stay masked after iteration ``it`` of ``steps``,
    when ``remaining`` are masked before it (every iteration unmasks at least one; the last unmasks all)."""
    if it == steps - 1:
        return 0
    return max(0, min(math.floor(cells * math.cos(math.pi / 2 * (it + 1) / steps)), remaining - 1))


def _positions(cache: CompactCache, tokens: slice, dims: int, rows: int) -> torch.Tensor:
    pos = cache.position_ids(tokens, dims=dims)
    return pos.expand(3, rows, -1) if dims == 3 else pos.expand(rows, -1)


def ardf_forward(model: torch.nn.Module, cache: CompactCache, tokens: slice, ids: np.ndarray | torch.Tensor,
                 dims: int = 3) -> torch.Tensor:
    """One forward of a chunk ``ids [rows, n]`` (layout ``tokens``) over ``cache`` with the AR-DF mask: every cached
    slot is visible (all earlier blocks), and within the chunk a token sees its own block and earlier ones. Returns
    the logits; the chunk is appended to the cache unless inside :meth:`CompactCache.frozen`."""
    ids = torch.as_tensor(np.ascontiguousarray(ids))
    rows = ids.shape[0]
    cache.feed(tokens, ids)
    block = torch.from_numpy(cache.layout.frame[tokens].copy())
    chunk = ardf_mask(block, block, block, block)
    cached = cache.get_seq_length() if cache.layers else 0
    mask = torch.cat([torch.zeros(1, 1, chunk.shape[-2], cached), chunk], dim=-1).expand(rows, -1, -1, -1)
    out = model(input_ids=ids, position_ids=_positions(cache, tokens, dims, rows), attention_mask=mask,
                use_cache=True, **cache_kwargs(model, cache))
    return out.logits


def _colour_logits(logits: torch.Tensor, vocab: Vocab) -> torch.Tensor:
    """Logits over the colour codebook, from a colour head or a full-vocabulary LM head."""
    return logits if logits.shape[-1] == vocab.num_colours else logits[..., list(vocab.colour_ids)]


def _guided(logits: torch.Tensor, cfg_scale: float) -> torch.Tensor:
    """Row 0 conditional, row 1 unconditional: ``uncond + s * (cond - uncond)``."""
    if logits.shape[0] == 1:
        return logits[0]
    return logits[1] + cfg_scale * (logits[0] - logits[1])


def _sample(logits: torch.Tensor, temperature: float, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sampled (argmax when ``temperature == 0``) tokens and their probabilities, for ``logits [..., C]``."""
    if temperature <= 0:
        probs = logits.float().softmax(-1)
        tokens = probs.argmax(-1)
    else:
        probs = (logits.float() / temperature).softmax(-1)
        tokens = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=gen).view(probs.shape[:-1])
    return tokens, probs.gather(-1, tokens[..., None])[..., 0]


def generate_video(
    model: torch.nn.Module,
    prompt: str | Sequence[int] | np.ndarray,
    cond_frame: np.ndarray,
    num_frames: int,
    policy: CachePolicy,
    mode: str = "masked",
    *,
    steps: int = 8,
    cfg_scale: float = 3.0,
    seed: int = 0,
    progress: bool = True,
    rebase: bool = False,
    temperature: float = 0.0,
    history_mask_ratio: float = 0.0,
    vocab: Vocab = VOCAB,
    layout: SequenceLayout | None = None,
) -> VideoResult:
    """Generate ``num_frames`` frames (frame 0 = ``cond_frame [H, W]``) under ``policy``.

    * ``mode="masked"`` -- AR-DF (Lumos-1): each frame starts fully masked and is filled over ``steps`` iterations
      (MaskGIT cosine schedule: the most confident predictions are kept). Iterations run inside
      :meth:`CompactCache.frozen`, so the current frame's keys are never stored. The finished frame is appended
      (re-encoded with a fixed tube of ``history_mask_ratio`` masked cells when > 0), then the policy compacts.
      The model must take a 4-D float mask (AR-DF: bidirectional within the frame).
    * ``mode="raster"`` -- token by token, causal within the frame (Emu3 style); specials are fed as given and
      visual tokens are sampled; the policy compacts after each finished frame.

    Classifier-free guidance (``cfg_scale != 1``): the conditional (prompt) and unconditional (null prompt)
    sequences run as the two batch rows of one :class:`CompactCache` -- their layouts coincide, so every policy
    keeps the same slots in both, exactly as two separate caches would. ``temperature=0`` decodes greedily;
    otherwise sampling is seeded by ``seed``. ``rebase`` renumbers kept frames contiguously in time (3-D rotary
    models). ``layout`` defaults to the demo layout (:func:`packcache.demo.clip_layout`) in the sequence format
    the model's config records (:class:`~packcache.demo.ClipFormat`; its prefix specials follow the prompt).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if not 0.0 <= history_mask_ratio < 1.0:
        raise ValueError(f"history_mask_ratio must lie in [0, 1), got {history_mask_ratio}")
    text = encode_prompt(prompt) if isinstance(prompt, str) else np.asarray(prompt, dtype=np.int64)
    cond = np.asarray(cond_frame, dtype=np.int64)
    clip_format = ClipFormat.of(model.config)
    layout = layout or clip_layout(num_frames, text_tokens=len(text), clip_format=clip_format)
    if layout.num_frames != num_frames or layout.text_tokens != len(text):
        raise ValueError(f"layout has {layout.num_frames} frames and {layout.text_tokens} text tokens, "
                         f"the request {num_frames} and {len(text)}")
    if layout.prefix_specials != len(clip_format.prefix_ids):
        raise ValueError(f"layout has {layout.prefix_specials} specials before frame 0, the model's sequence "
                         f"format {len(clip_format.prefix_ids)}")
    if cond.shape != (layout.height, layout.width):
        raise ValueError(f"cond_frame must be a {layout.height}x{layout.width} grid, got shape {cond.shape}")
    rows = 1 if cfg_scale == 1.0 else 2
    texts = [text, vocab.null_prompt(len(text))][:rows]
    dims = position_dims(model)
    cache = CompactCache(policy, layout, model=model, rebase=rebase)
    gen = torch.Generator().manual_seed(seed)
    frames = np.zeros((num_frames, layout.height, layout.width), dtype=np.int64)
    frames[0] = cond
    tube = history_tube(layout.height, layout.width, history_mask_ratio, seed)
    sl0 = layout.frame_slice(0)
    vis = torch.from_numpy(np.flatnonzero(layout.row[sl0] >= 0))
    records: list[FrameRecord] = []
    bar = ProgressBar(num_frames, f"{mode} {policy.name}", enabled=progress)
    masked = mode == "masked"

    def forward(tokens: slice, ids: np.ndarray) -> torch.Tensor:
        if masked:
            return ardf_forward(model, cache, tokens, ids, dims)
        batch = torch.from_numpy(np.ascontiguousarray(ids)).view(rows, -1)
        cache.feed(tokens, batch)  # raster: the model's own causal mask
        return model(input_ids=batch, position_ids=_positions(cache, tokens, dims, rows), use_cache=True,
                     **cache_kwargs(model, cache)).logits

    with torch.no_grad():
        start = time.perf_counter()
        first = slice(0, sl0.stop)
        logits = forward(first, np.stack([clip_token_ids(t, cond[None], vocab, clip_format) for t in texts]))
        records.append(FrameRecord(0, time.perf_counter() - start, 0.0, cache.slots_per_layer(), cache.kv_bytes(), 1))
        bar.update(1)
        last = logits[:, -1]
        for k in range(1, num_frames):
            start = time.perf_counter()
            compaction = cache.compact(k)
            cache_tokens, kv_bytes = cache.slots_per_layer(), cache.kv_bytes()
            sl = layout.frame_slice(k)
            if masked:
                grid, forwards = _masked_frame(forward, cache, sl, layout, vis, rows, steps, cfg_scale,
                                               temperature, gen, vocab)
                appended = np.where(tube, vocab.mask, grid)
                forward(sl, np.tile(frame_token_ids(appended, vocab), (rows, 1)))
                forwards += 1
            else:
                grid, last, forwards = _raster_frame(forward, sl, layout, last, rows, cfg_scale, temperature, gen,
                                                     vocab)
            frames[k] = grid
            records.append(FrameRecord(k, time.perf_counter() - start,
                                       compaction.seconds if compaction else 0.0, cache_tokens, kv_bytes, forwards,
                                       compaction.slots_before if compaction else None))
            bar.update(1, f"cache {cache_tokens[0]} tok")
    bar.close()
    meta = {"policy": policy.name, "mode": mode, "num_frames": num_frames, "steps": steps, "cfg_scale": cfg_scale,
            "seed": seed, "rebase": rebase, "temperature": temperature, "history_mask_ratio": history_mask_ratio,
            "prompt": text.tolist(), "budget_tokens": policy.budget_tokens(layout), "layout": layout.summary(),
            "model": str(getattr(model.config, "name_or_path", "") or type(model).__name__)}
    return VideoResult(frames=frames, records=records, meta=meta)


def _masked_frame(forward, cache: CompactCache, sl: slice, layout: SequenceLayout, vis: torch.Tensor, rows: int,
                  steps: int, cfg_scale: float, temperature: float, gen: torch.Generator, vocab: Vocab
                  ) -> tuple[np.ndarray, int]:
    """One AR-DF frame: ``steps`` frozen forwards with a MaskGIT schedule; returns the grid and forward count."""
    cells = layout.height * layout.width
    grid = np.full(cells, vocab.mask, dtype=np.int64)
    known = torch.zeros(cells, dtype=torch.bool)
    for it in range(steps):
        ids = np.tile(frame_token_ids(grid.reshape(layout.height, layout.width), vocab), (rows, 1))
        with cache.frozen():
            logits = forward(sl, ids)[:, vis]
        tokens, conf = _sample(_guided(_colour_logits(logits, vocab), cfg_scale), temperature, gen)
        conf = conf.masked_fill(known, float("inf"))
        order = conf.argsort(descending=True, stable=True)
        newly = order[: cells - still_masked(cells, it, steps, int((~known).sum()))]
        newly = newly[~known[newly]]
        grid[newly.numpy()] = tokens[newly].numpy()
        known[newly] = True
    return grid.reshape(layout.height, layout.width), steps


def _raster_frame(forward, sl: slice, layout: SequenceLayout, last: torch.Tensor, rows: int, cfg_scale: float,
                  temperature: float, gen: torch.Generator, vocab: Vocab) -> tuple[np.ndarray, torch.Tensor, int]:
    """One raster frame: feed specials as given, sample visual tokens from the previous token's logits."""
    template = frame_token_ids(np.zeros((layout.height, layout.width), dtype=np.int64), vocab)
    is_visual = layout.row[sl] >= 0
    out = []
    for j in range(len(template)):
        token = int(template[j])
        if is_visual[j]:
            sampled, _ = _sample(_guided(_colour_logits(last, vocab), cfg_scale), temperature, gen)
            token = vocab.colour_ids[int(sampled)]
            out.append(token)
        idx = slice(sl.start + j, sl.start + j + 1)
        last = forward(idx, np.full((rows, 1), token, dtype=np.int64))[:, -1]
    return np.array(out, dtype=np.int64).reshape(layout.height, layout.width), last, len(template)
