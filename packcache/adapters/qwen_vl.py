"""Qwen2-VL / Qwen2.5-VL / Qwen3-VL: 3-D M-RoPE positions exactly as transformers' ``get_rope_index`` gives them.

Token streams (grids in LLM tokens, i.e. after the ``spatial_merge_size`` merge)::

    Qwen2-VL / 2.5-VL video: [text] <|vision_start|> <|video_pad|> * (T*H*W) <|vision_end|> [text]
    Qwen3-VL video:          [text] (<t seconds> <|vision_start|> <|video_pad|> * (H*W) <|vision_end|>) * T [text]
    images as frames:        [text] (<|vision_start|> <|image_pad|> * (H*W) <|vision_end|>) * T [text]

A contiguous video block becomes a layout without frame specials (``convention="mrope"``; the time step is
``tokens_per_second * second_per_grid_t`` on Qwen2.5-VL, 1 on Qwen2-VL); per-frame blocks become frames whose
prefix is the timestamp text plus ``<|vision_start|>`` and whose suffix is ``<|vision_end|>``. Keys are rotated
with contiguous t|h|w sections (Qwen2/2.5) or interleaved channels (Qwen3), so temporal rebasing is available.

In a real model the pad tokens are replaced by vision-tower features; :meth:`QwenVLAdapter.rope_index_inputs`
gives the ``mm_token_type_ids`` and grid tensors that ``model.model.get_rope_index`` needs, so the layout's
positions can be checked against the model's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from packcache.adapters.base import (
    Adapter,
    AdapterError,
    model_type_of,
    random_ids,
    spans_between,
    token_list,
    vocab_size_of,
)
from packcache.layout import LayoutError, SequenceLayout

__all__ = ["QwenVLAdapter"]


class QwenVLAdapter(Adapter):
    """Qwen2-VL, Qwen2.5-VL and Qwen3-VL (full ``*ForConditionalGeneration`` models or their text decoders)."""

    name = "qwen_vl"
    model_types = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "qwen2_vl_text", "qwen2_5_vl_text", "qwen3_vl_text")
    position_dims = 3

    def __init__(self, config: Any = None) -> None:
        self.config = config

    # ----------------------------------------------------------------------------------------------------
    def _cfg(self, config: Any) -> Any:
        config = config if config is not None else self.config
        if config is None:
            raise AdapterError("qwen_vl: this needs the model config (adapter_for(model) binds it)")
        return config

    def variant(self, config: Any = None) -> str:
        """``"qwen2_vl"``, ``"qwen2_5_vl"`` or ``"qwen3_vl"``."""
        outer, text = model_type_of(self._cfg(config))
        for v in ("qwen2_5_vl", "qwen3_vl", "qwen2_vl"):
            if outer.startswith(v) or text.startswith(v):
                return v
        raise AdapterError(f"qwen_vl: not a Qwen-VL config ({outer or text!r})")

    def special_ids(self, config: Any = None) -> dict[str, int]:
        """``vision_start``, ``vision_end``, ``image``, ``video`` token ids of the config."""
        config = self._cfg(config)
        names = {"vision_start": "vision_start_token_id", "vision_end": "vision_end_token_id",
                 "image": "image_token_id", "video": "video_token_id"}
        out = {k: getattr(config, v, None) for k, v in names.items()}
        missing = [names[k] for k, v in out.items() if v is None]
        if missing:
            raise AdapterError(f"qwen_vl: config lacks {missing} (a text-decoder config has no vision tokens)")
        return {k: int(v) for k, v in out.items()}

    def merge_size(self, config: Any = None) -> int:
        vision = getattr(self._cfg(config), "vision_config", None)
        return int(getattr(vision, "spatial_merge_size", 2) or 2)

    def time_interval(self, config: Any = None, second_per_grid_t: float = 1.0) -> float:
        """Temporal step between video frames of one block (Qwen2.5-VL: tokens_per_second * second_per_grid_t)."""
        if self.variant(config) != "qwen2_5_vl":
            return 1.0
        vision = getattr(self._cfg(config), "vision_config", None)
        return float(getattr(vision, "tokens_per_second", 1)) * float(second_per_grid_t)

    # ----------------------------------------------------------------------------------------------------
    def layout_from_ids(self, ids: Sequence[int] | np.ndarray | torch.Tensor, *,
                        video_grid_thw: torch.Tensor | Sequence[int] | None = None,
                        image_grid_thw: torch.Tensor | Sequence[int] | None = None, second_per_grid_t: float = 1.0,
                        timestamp_tokens: int = 0, cond_frames: int = 1, **kw: Any) -> SequenceLayout:
        """Parse one video (or a run of same-size images) into a layout; grids are the processor's (pre-merge).

        ``timestamp_tokens`` is the number of text tokens before each frame's ``<|vision_start|>`` when the
        stream has a single per-frame block (with two or more, it is read from the gap between blocks).
        """
        if kw:
            raise AdapterError(f"{self.name}: unexpected arguments {sorted(kw)}")
        sp = self.special_ids()
        seq = token_list(ids)
        spans = spans_between(seq, sp["vision_start"], sp["vision_end"])
        if not spans:
            raise LayoutError(f"no vision block (<|vision_start|> {sp['vision_start']}) in {len(seq)} tokens")
        grid = video_grid_thw if video_grid_thw is not None else image_grid_thw
        if grid is None:
            raise AdapterError("qwen_vl: pass video_grid_thw or image_grid_thw (from the processor)")
        grid = torch.as_tensor(grid).view(-1, 3)
        if len({tuple(g[1:].tolist()) for g in grid}) != 1:
            raise LayoutError(f"frames of different sizes: {grid.tolist()}")
        m = self.merge_size()
        h, w = int(grid[0, 1]) // m, int(grid[0, 2]) // m
        pad = sp["video"] if video_grid_thw is not None else sp["image"]
        for s, e in spans:
            bad = [i for i in range(s, e) if seq[i] != pad]
            if bad:
                raise LayoutError(f"token {seq[bad[0]]} at {bad[0]} inside a vision block, expected pad {pad}")
        frames = int(grid[:, 0].sum())
        video_block = len(spans) == 1 and video_grid_thw is not None and self.variant() != "qwen3_vl"
        if video_block:
            (s, e), = spans
            if e - s != frames * h * w:
                raise LayoutError(f"vision block at {s - 1} has {e - s} tokens, grid {grid.tolist()} / merge {m} "
                                  f"needs {frames * h * w}")
            return SequenceLayout(text_tokens=s - 1, prefix_specials=1, num_frames=frames, height=h, width=w,
                                  suffix_specials=len(seq) - e, cond_frames=cond_frames, convention="mrope",
                                  time_interval=self.time_interval(second_per_grid_t=second_per_grid_t))
        if len(spans) != frames:
            raise LayoutError(f"{len(spans)} vision blocks for a grid of {frames} frames")
        gaps = {spans[i][0] - spans[i - 1][1] - 2 for i in range(1, len(spans))}
        if len(gaps) > 1:
            raise LayoutError(f"unequal text between frames ({sorted(gaps)} tokens): the frames' timestamps must "
                              "tokenize to the same length")
        stamp = gaps.pop() if gaps else timestamp_tokens
        for f, (s, e) in enumerate(spans):
            if e - s != h * w:
                raise LayoutError(f"vision block {f} at {s - 1} has {e - s} tokens, expected {h}x{w}")
        text = spans[0][0] - 1 - stamp
        if text < 0:
            raise LayoutError(f"first frame has fewer than {stamp} timestamp tokens before it")
        return SequenceLayout(text_tokens=text, num_frames=frames, height=h, width=w, frame_prefix=stamp + 1,
                              frame_suffix=1, suffix_specials=len(seq) - spans[-1][1] - 1, cond_frames=cond_frames,
                              convention="mrope")

    def rope_index_inputs(self, layout: SequenceLayout, *, video: bool = True) -> dict[str, torch.Tensor]:
        """``mm_token_type_ids`` and the grid tensor that ``get_rope_index`` needs for ``layout``'s stream."""
        m = self.merge_size()
        types = torch.zeros(1, layout.num_tokens, dtype=torch.int)
        types[0, torch.from_numpy(layout.row >= 0)] = 2 if video else 1
        one_block = layout.frame_prefix == 0 and layout.frame_suffix == 0
        if video and (one_block or self.variant() == "qwen3_vl"):  # Qwen3-VL splits a video grid into frames
            grid = torch.tensor([[layout.num_frames, layout.height * m, layout.width * m]])
        else:
            grid = torch.tensor([[1, layout.height * m, layout.width * m]] * layout.num_frames)
        return {"mm_token_type_ids": types, ("video_grid_thw" if video else "image_grid_thw"): grid}

    def example(self, config: Any, num_frames: int, height: int, width: int, seed: int = 0
                ) -> tuple[torch.Tensor, SequenceLayout]:
        """A prompt and one video of ``num_frames`` x ``height`` x ``width`` LLM tokens in the variant's format
        (Qwen3-VL: two timestamp tokens before each frame), then two text tokens."""
        sp = self.special_ids(config)
        gen = torch.Generator().manual_seed(seed)
        text_ids = lambda n: random_ids(gen, n, vocab_size_of(config), exclude=sp.values())  # noqa: E731
        m = self.merge_size(config)
        grid = torch.tensor([[num_frames, height * m, width * m]])
        start, end, pad = torch.tensor([sp["vision_start"]]), torch.tensor([sp["vision_end"]]), sp["video"]
        if self.variant(config) == "qwen3_vl":
            frames = [torch.cat([text_ids(2), start, torch.full((height * width,), pad), end])
                      for _ in range(num_frames)]
        else:
            frames = [start, torch.full((num_frames * height * width,), pad), end]
        ids = torch.cat([text_ids(6), *frames, text_ids(2)]).long()
        bound = QwenVLAdapter(config)
        return ids[None], bound.layout_from_ids(ids, video_grid_thw=grid)

