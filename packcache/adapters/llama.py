"""Llama-style 1-D decoders (Llama, Mistral, Qwen2/3, SmolLM2, ...) and Chameleon.

Positions are 1-D: a token's absolute index in the sequence. A kept token keeps its index after compaction
(keys are cached after RoPE), so there is no temporal channel to rebase and :meth:`rotary` raises
:class:`~packcache.rope.RebaseError`.

Layouts:

* **Pseudo-frames** (plain text models): a prompt of ``text_tokens`` anchor tokens followed by segments of
  ``frame_tokens`` tokens, each treated as a 1 x ``frame_tokens`` frame; a shorter tail is kept as suffix
  specials. This is how packcache exercises its probes and compact cache on real text weights.
* **Image blocks** (Chameleon): every image is ``<image start> h*w tokens <image end>`` with no row separator
  (Chameleon: ``<racm3:break>`` ... ``<eoss>``, a 32 x 32 grid for the 512 px VQ-GAN); consecutive images are
  the frames of a clip.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from packcache.adapters.base import Adapter, AdapterError, random_ids, spans_between, token_list, vocab_size_of
from packcache.layout import LayoutError, SequenceLayout

__all__ = ["LlamaAdapter", "ChameleonAdapter"]


class LlamaAdapter(Adapter):
    """Llama-style text decoders with 1-D RoPE; text segments become pseudo-frames."""

    name = "llama"
    model_types = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "olmo", "olmo2", "granite", "phi3",
                   "smollm3")
    position_dims = 1

    def layout_from_ids(self, ids: Sequence[int] | np.ndarray | torch.Tensor, *, frame_tokens: int = 32,
                        text_tokens: int = 0, cond_frames: int = 0, **kw: Any) -> SequenceLayout:
        """Pseudo-frames: ``text_tokens`` anchors, then frames of ``frame_tokens`` tokens (1 x frame_tokens)."""
        if kw:
            raise AdapterError(f"{self.name}: unexpected arguments {sorted(kw)}")
        n = len(token_list(ids))
        return pseudo_frame_layout(n, frame_tokens=frame_tokens, text_tokens=text_tokens, cond_frames=cond_frames)

    def example(self, config: Any, num_frames: int, height: int, width: int, seed: int = 0
                ) -> tuple[torch.Tensor, SequenceLayout]:
        """Random text ids: 8 prompt tokens then ``num_frames`` pseudo-frames of ``height * width`` tokens."""
        gen = torch.Generator().manual_seed(seed)
        layout = SequenceLayout(text_tokens=8, num_frames=num_frames, height=1, width=height * width, cond_frames=0)
        ids = random_ids(gen, layout.num_tokens, vocab_size_of(config), exclude=_special_ids(config))
        return ids[None], layout


def pseudo_frame_layout(num_tokens: int, *, frame_tokens: int, text_tokens: int = 0, cond_frames: int = 0
                        ) -> SequenceLayout:
    """Layout of ``num_tokens`` text tokens: ``text_tokens`` anchors, whole ``frame_tokens`` segments as frames and
    the remainder as suffix specials."""
    if frame_tokens < 1:
        raise AdapterError(f"frame_tokens must be >= 1, got {frame_tokens}")
    frames = (num_tokens - text_tokens) // frame_tokens
    if frames < 1:
        raise LayoutError(f"{num_tokens} tokens leave no whole pseudo-frame of {frame_tokens} after "
                          f"{text_tokens} text tokens")
    return SequenceLayout(text_tokens=text_tokens, num_frames=frames, height=1, width=frame_tokens,
                          cond_frames=cond_frames, suffix_specials=num_tokens - text_tokens - frames * frame_tokens)


def _special_ids(config: Any) -> list[int]:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    out = []
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(text, name, None)
        out.extend(value if isinstance(value, list) else [value] if value is not None else [])
    return out


class ChameleonAdapter(Adapter):
    """Chameleon: 1-D RoPE; images are ``<racm3:break>`` + h*w VQ tokens + ``<eoss>``, consecutive images are frames."""

    name = "chameleon"
    model_types = ("chameleon",)
    position_dims = 1
    BOI, EOI = "<racm3:break>", "<eoss>"

    def __init__(self, config: Any = None) -> None:
        self.config = config

    def special_ids(self, config: Any = None) -> tuple[int, int]:
        """``(image_start, image_end)`` token ids from the config's ``vocabulary_map``."""
        vocab = getattr(config or self.config, "vocabulary_map", None) or {}
        if self.BOI not in vocab or self.EOI not in vocab:
            raise AdapterError(f"chameleon: config.vocabulary_map lacks {self.BOI!r} / {self.EOI!r}; "
                               "pass image_start= and image_end= token ids")
        return int(vocab[self.BOI]), int(vocab[self.EOI])

    def grid(self, config: Any = None) -> tuple[int, int]:
        """VQ token grid ``(h, w)``: ``resolution / 2**(len(channel_multiplier) - 1)`` on each side."""
        vq = getattr(config or self.config, "vq_config", None)
        if vq is None:
            raise AdapterError("chameleon: config has no vq_config; pass height= and width=")
        side = int(vq.resolution) // 2 ** (len(vq.channel_multiplier) - 1)
        return side, side

    def layout_from_ids(self, ids: Sequence[int] | np.ndarray | torch.Tensor, *, image_start: int | None = None,
                        image_end: int | None = None, height: int | None = None, width: int | None = None,
                        cond_frames: int = 1, **kw: Any) -> SequenceLayout:
        """Parse consecutive image blocks as frames; text before the first image is the prompt."""
        if kw:
            raise AdapterError(f"{self.name}: unexpected arguments {sorted(kw)}")
        if image_start is None or image_end is None:
            image_start, image_end = self.special_ids()
        if height is None or width is None:
            height, width = self.grid()
        seq = token_list(ids)
        spans = spans_between(seq, image_start, image_end)
        if not spans:
            raise LayoutError(f"no image block (token {image_start} ... {image_end}) in {len(seq)} tokens")
        for f, (s, e) in enumerate(spans):
            if e - s != height * width:
                raise LayoutError(f"image {f} at token {s - 1} has {e - s} tokens, expected {height}x{width}")
            if f and s - 1 != spans[f - 1][1] + 1:
                raise LayoutError(f"image {f} starts at token {s - 1}, expected right after image {f - 1}")
        suffix = len(seq) - (spans[-1][1] + 1)
        return SequenceLayout(text_tokens=spans[0][0] - 1, num_frames=len(spans), height=height, width=width,
                              frame_prefix=1, frame_suffix=1, suffix_specials=suffix, cond_frames=cond_frames)

    def example(self, config: Any, num_frames: int, height: int, width: int, seed: int = 0
                ) -> tuple[torch.Tensor, SequenceLayout]:
        """Prompt, then ``num_frames`` image blocks of ``height x width`` VQ tokens (ids from the vocabulary map)."""
        boi, eoi = self.special_ids(config)
        vocab = config.vocabulary_map
        pool = [v for k, v in vocab.items() if k.startswith("IMGIMG")] or None
        specials = [boi, eoi, *_special_ids(config), *(v for k, v in vocab.items() if k.startswith("<"))]
        gen = torch.Generator().manual_seed(seed)
        n_vocab = vocab_size_of(config)
        parts = [random_ids(gen, 6, n_vocab, exclude=specials)]
        for _ in range(num_frames):
            parts += [torch.tensor([boi]), random_ids(gen, height * width, n_vocab, exclude=specials, pool=pool),
                      torch.tensor([eoi])]
        ids = torch.cat(parts)
        return ids[None], self.layout_from_ids(ids, image_start=boi, image_end=eoi, height=height, width=width)
