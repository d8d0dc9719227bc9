"""Lumos-1 token streams (arXiv 2507.08801): not in transformers, so packcache parses its ids and computes positions.

Stream (token ids from the Lumos-1 tokenizer; pass them as :class:`LumosTokens`)::

    [text] <video_start> <duration> <fps>
      ( <image_start> <grid_h> <grid_w> (W visual tokens, <row_sep>) * H <image_end> ) * T
    <video_end>

Positions are MM-RoPE: text is 1-D ``(i, i, i)``; a visual token of latent frame ``f`` at ``(r, c)`` sits at
``offset + (4f, 8r, 8c)`` with ``offset`` the index of the first frame token (``convention="mmrope"``, scales
``(4, 8, 8)``). Rotary channels split t:h:w = 2:3:3 interleaved in groups of 16 (:meth:`RotaryLayout.mmrope`),
so kept frames can be rebased in time.

Plugging CompactCache into the Lumos-1 AR-DF frame loop (one cache per CFG branch; the unconditional one gets a
layout with ``text_tokens=0``)::

    layout = LumosAdapter(LumosTokens(...)).layout_from_ids(stream_ids) # or SequenceLayout(...) by counts
    cache = CompactCache(PackCache(budget), layout, model=model, rebase=True)
    head = slice(0, layout.frame_slice(cond_frames).start)              # text, specials, conditioning frames
    cache.feed(head); model(ids[head], past_key_values=cache, position_ids=cache.position_ids(head))
    for f in range(cond_frames, layout.num_frames):
        cache.compact(f)                                                # Pack / Slide at the frame boundary
        frame = layout.frame_slice(f)
        for step in range(num_steps):                                   # MaskGIT-style unmasking steps
            with cache.frozen():                                        # attend, but do not append
                cache.feed(frame)
                logits = model(current_ids[frame], past_key_values=cache,
                               position_ids=cache.position_ids(frame), attention_mask=bidirectional_in_frame)
            ...                                                         # unmask the most confident tokens
        cache.feed(frame)                                               # re-encode the finished frame
        model(partially_masked_ids[frame], past_key_values=cache, position_ids=cache.position_ids(frame))

Positions always come from the layout (plus the rebasing shift), never from the cache length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from packcache.adapters.base import Adapter, AdapterError, random_ids, token_list, vocab_size_of
from packcache.layout import SequenceLayout, SpecialTokens
from packcache.rope import RotaryLayout, text_inv_freq

__all__ = ["LumosAdapter", "LumosTokens"]


@dataclass(frozen=True)
class LumosTokens:
    """Lumos-1 special token ids. ``meta_ids`` are the ids allowed between ``<video_start>`` and the first frame
    (duration and fps tokens); ``grid_tokens`` is the number of grid-size tokens after ``<image_start>``."""

    video_start: int
    video_end: int
    image_start: int
    image_end: int
    row_separator: int
    meta_ids: tuple[int, ...] = ()
    grid_tokens: int = 2
    eos: int | None = None

    @property
    def special(self) -> SpecialTokens:
        """The :class:`SpecialTokens` that :meth:`SequenceLayout.from_token_ids` parses with."""
        suffix = (self.video_end,) + ((self.eos,) if self.eos is not None else ())
        return SpecialTokens(frame_start=self.image_start, frame_end=self.image_end, row_separator=self.row_separator,
                             grid_tokens=self.grid_tokens, prefix_ids=(self.video_start, *self.meta_ids),
                             suffix_ids=suffix)

    @property
    def all_ids(self) -> tuple[int, ...]:
        extra = (self.eos,) if self.eos is not None else ()
        return (self.video_start, self.video_end, self.image_start, self.image_end, self.row_separator,
                *self.meta_ids, *extra)


class LumosAdapter(Adapter):
    """Lumos-1: MM-RoPE (t, h, w) positions, row separators, bidirectional frames decoded by AR-DF.

    A model is recognised as Lumos-1 when its config declares ``packcache_layout = "lumos"`` (or model_type
    ``lumos``); the token ids come from ``config.packcache_lumos_tokens`` (a dict of :class:`LumosTokens` fields)
    or from the ``tokens`` argument.
    """

    name = "lumos"
    model_types = ("lumos", "lumos1")
    position_dims = 3

    def __init__(self, tokens: LumosTokens | None = None) -> None:
        self.ids = tokens

    def matches(self, config: Any) -> bool:
        return getattr(config, "packcache_layout", None) == "lumos" or super().matches(config)

    def tokens(self, config: Any = None) -> LumosTokens:
        if self.ids is not None:
            return self.ids
        declared = getattr(config, "packcache_lumos_tokens", None)
        if declared:
            return LumosTokens(**{k: tuple(v) if isinstance(v, list) else v for k, v in declared.items()})
        raise AdapterError("lumos: token ids unknown; pass tokens=LumosTokens(...) (from the Lumos-1 tokenizer)")

    def layout_from_ids(self, ids: Sequence[int] | np.ndarray | torch.Tensor, *, tokens: LumosTokens | None = None,
                        cond_frames: int = 1, **kw: Any) -> SequenceLayout:
        """Parse a Lumos-1 stream (MM-RoPE positions, scales (4, 8, 8))."""
        if kw:
            raise AdapterError(f"{self.name}: unexpected arguments {sorted(kw)}")
        tok = tokens or self.tokens()
        return SequenceLayout.from_token_ids(token_list(ids), tok.special, cond_frames=cond_frames,
                                             convention="mmrope", scales=(4, 8, 8))

    def rotary(self, model: torch.nn.Module) -> RotaryLayout:
        """MM-RoPE channels (2:3:3 per 16) over the frequencies of the model's rotary embedding."""
        return RotaryLayout.mmrope(text_inv_freq(model))

    def example(self, config: Any, num_frames: int, height: int, width: int, seed: int = 0,
                tokens: LumosTokens | None = None) -> tuple[torch.Tensor, SequenceLayout]:
        """Prompt, ``<video_start>`` + meta, ``num_frames`` frames with grid tokens and row separators, end."""
        tok = tokens or self.tokens(config)
        gen = torch.Generator().manual_seed(seed)
        n_vocab = vocab_size_of(config)
        rand = lambda n: random_ids(gen, n, n_vocab, exclude=tok.all_ids)  # noqa: E731
        meta = torch.tensor(list(tok.meta_ids[:2]), dtype=torch.long)
        parts = [rand(6), torch.tensor([tok.video_start]), meta]
        for _ in range(num_frames):
            grid = torch.cat([rand(height * width).view(height, width), torch.full((height, 1), tok.row_separator)], 1)
            parts += [torch.tensor([tok.image_start]), rand(tok.grid_tokens), grid.flatten(),
                      torch.tensor([tok.image_end])]
        parts.append(torch.tensor([tok.video_end]))
        ids = torch.cat(parts).long()
        return ids[None], self.layout_from_ids(ids, tokens=tok)
