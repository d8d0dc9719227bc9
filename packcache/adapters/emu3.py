"""Emu3: raster (token-by-token) image and video generation with 1-D RoPE.

Token stream (Emu3 paper, and transformers' ``Emu3Processor`` for one image)::

    [text] <|image start|> H*W <|image token|>  frame_0 ... frame_{T-1}  <|image end|> [eos]
    frame = H rows of (W visual tokens, <|extra_200|> end-of-line), then <|extra_201|> end-of-frame

``<|image start|>``, the ``H*W`` meta text and ``<|image token|>`` are prefix specials (anchors); every frame has
row separators and one suffix special (end-of-frame). The special ids come from ``config.vocabulary_map``
(real checkpoints ship the tokenizer's map there).

Generation with a compact cache, as one line around the stock ``generate()``::

    adapter = adapter_for(model)                       # Emu3Adapter bound to model.config
    with attach(model, cache := CompactCache(policy, layout, model=model)):
        out = model.generate(prompt, past_key_values=cache, max_new_tokens=n,
                             prefix_allowed_tokens_fn=adapter.raster_constraint(layout))

``attach`` feeds the layout indices, passes absolute 1-D positions and compacts whenever a frame has just been
completed (the token count crosses a frame boundary of ``layout``); ``raster_constraint`` forces the
end-of-line / end-of-frame tokens at their layout positions so the generated stream keeps the layout.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from packcache.adapters.base import Adapter, AdapterError, random_ids, token_list, vocab_size_of
from packcache.layout import LayoutError, SequenceLayout

__all__ = ["Emu3Adapter", "Emu3Tokens"]

NAMES = {"image_start": "<|image start|>", "image_end": "<|image end|>", "image_token": "<|image token|>",
         "eol": "<|extra_200|>", "eof": "<|extra_201|>"}


@dataclass(frozen=True)
class Emu3Tokens:
    """Emu3 special token ids, and the visual token ids generation may choose from."""

    image_start: int
    image_end: int
    image_token: int
    eol: int
    eof: int
    eos: int | None = None
    visual: tuple[int, ...] = ()

    @classmethod
    def from_config(cls, config: Any) -> Emu3Tokens:
        """Read the ids from ``config.vocabulary_map`` (and ``eos_token_id`` from the text config)."""
        vocab = getattr(config, "vocabulary_map", None) or {}
        missing = [name for name in NAMES.values() if name not in vocab]
        if missing:
            raise AdapterError(f"emu3: config.vocabulary_map lacks {missing}; pass tokens=Emu3Tokens(...)")
        text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        eos = getattr(text, "eos_token_id", None)
        visual = tuple(sorted(v for k, v in vocab.items() if k.startswith("<|visual token")))
        return cls(**{k: int(vocab[v]) for k, v in NAMES.items()}, eos=eos if isinstance(eos, int) else None,
                   visual=visual)

    @property
    def specials(self) -> tuple[int, ...]:
        return tuple(t for t in (self.image_start, self.image_end, self.image_token, self.eol, self.eof, self.eos)
                     if t is not None)


class Emu3Adapter(Adapter):
    """Emu3 (``Emu3ForConditionalGeneration`` / ``Emu3ForCausalLM``): 1-D positions, raster frames."""

    name = "emu3"
    model_types = ("emu3", "emu3_text_model")
    position_dims = 1

    def __init__(self, config: Any = None) -> None:
        self.config = config

    def tokens(self, config: Any = None) -> Emu3Tokens:
        return Emu3Tokens.from_config(config if config is not None else self.config)

    def layout_from_ids(self, ids: Sequence[int] | np.ndarray | torch.Tensor, *, tokens: Emu3Tokens | None = None,
                        cond_frames: int = 1, **kw: Any) -> SequenceLayout:
        """Parse ``[text] <image start> meta <image token> frames... [<image end> <eos>]``."""
        if kw:
            raise AdapterError(f"{self.name}: unexpected arguments {sorted(kw)}")
        tok = tokens or self.tokens()
        seq = token_list(ids)
        try:
            sot = seq.index(tok.image_token)
        except ValueError:
            raise LayoutError(f"no <|image token|> ({tok.image_token}) in {len(seq)} tokens") from None
        boi = max((i for i in range(sot) if seq[i] == tok.image_start), default=None)
        if boi is None:
            raise LayoutError(f"<|image token|> at {sot} has no <|image start|> ({tok.image_start}) before it")
        grids: list[tuple[int, int]] = []
        i = sot + 1
        while i < len(seq) and seq[i] not in (tok.image_end, tok.eos):
            rows, cur = [], 0
            while i < len(seq) and seq[i] != tok.eof:
                if seq[i] == tok.eol:
                    rows.append(cur)
                    cur = 0
                elif seq[i] in tok.specials:
                    raise LayoutError(f"unexpected special token {seq[i]} at {i} inside frame {len(grids)}")
                else:
                    cur += 1
                i += 1
            if i == len(seq):
                raise LayoutError(f"frame {len(grids)} has no end-of-frame token ({tok.eof})")
            if cur or not rows or len(set(rows)) != 1:
                raise LayoutError(f"frame {len(grids)} ending at {i}: rows of unequal length or without "
                                  f"end-of-line {sorted(set(rows + ([cur] if cur else [])))}")
            grids.append((len(rows), rows[0]))
            i += 1
        if not grids:
            raise LayoutError(f"no frame after <|image token|> at {sot}")
        if len(set(grids)) != 1:
            raise LayoutError(f"frames have different grids: {sorted(set(grids))}")
        suffix = seq[i:]
        allowed = {tok.image_end, tok.eos}
        if any(t not in allowed for t in suffix) or len(suffix) > 2:
            raise LayoutError(f"unexpected tokens {suffix[:4]} after the last frame at {i}")
        h, w = grids[0]
        return SequenceLayout(text_tokens=boi, prefix_specials=sot - boi + 1, num_frames=len(grids), height=h,
                              width=w, row_separator=True, frame_prefix=0, frame_suffix=1,
                              suffix_specials=len(suffix), cond_frames=cond_frames)

    def raster_constraint(self, layout: SequenceLayout, tokens: Emu3Tokens | None = None
                          ) -> Callable[[int, torch.Tensor], list[int]]:
        """A ``prefix_allowed_tokens_fn`` for ``generate()``: end-of-line, end-of-frame, image-end and eos where
        ``layout`` puts them, a visual token everywhere else."""
        tok = tokens or self.tokens()
        template = self.template(layout, tok)
        visual = list(tok.visual) or None

        def allowed(batch_id: int, input_ids: torch.Tensor) -> list[int]:
            i = input_ids.shape[-1]
            if i >= layout.num_tokens or template[i] < 0:
                if visual is None:
                    raise AdapterError("emu3: no visual token ids known (config.vocabulary_map has none)")
                return visual
            return [int(template[i])]

        return allowed

    def template(self, layout: SequenceLayout, tokens: Emu3Tokens | None = None) -> np.ndarray:
        """The special token id at each frame / suffix position of ``layout`` (-1 for visual and earlier tokens)."""
        tok = tokens or self.tokens()
        out = np.full(layout.num_tokens, -1, dtype=np.int64)
        in_frame = layout.frame >= 0
        out[in_frame & (layout.row < 0)] = tok.eol
        for f in range(layout.num_frames):
            out[layout.frame_slice(f).stop - 1] = tok.eof
        tail = [tok.image_end, tok.eos if tok.eos is not None else tok.image_end]
        out[layout.num_tokens - layout.suffix_specials:] = tail[: layout.suffix_specials]
        return out

    def example(self, config: Any, num_frames: int, height: int, width: int, seed: int = 0
                ) -> tuple[torch.Tensor, SequenceLayout]:
        """Prompt, ``<image start> H*W <image token>``, ``num_frames`` raster frames, ``<image end>``."""
        tok = Emu3Tokens.from_config(config)
        vocab = config.vocabulary_map
        n_vocab = vocab_size_of(config)
        gen = torch.Generator().manual_seed(seed)
        text_pool_exclude = set(tok.specials) | set(tok.visual)
        meta = [vocab.get(c) for c in f"{height}*{width}"]
        meta_ids = (torch.tensor(meta) if None not in meta
                    else random_ids(gen, 3, n_vocab, exclude=text_pool_exclude))
        parts = [random_ids(gen, 6, n_vocab, exclude=text_pool_exclude), torch.tensor([tok.image_start]), meta_ids,
                 torch.tensor([tok.image_token])]
        pool = list(tok.visual) or None
        for _ in range(num_frames):
            grid = random_ids(gen, height * width, n_vocab, exclude=text_pool_exclude if pool is None else (),
                              pool=pool).view(height, width)
            rows = torch.cat([grid, torch.full((height, 1), tok.eol)], dim=1).flatten()
            parts += [rows, torch.tensor([tok.eof])]
        parts.append(torch.tensor([tok.image_end]))
        ids = torch.cat(parts).long()
        return ids[None], self.layout_from_ids(ids, tokens=tok)
