"""The adapter interface: what packcache needs to know about one model family.

An adapter detects its model type from a config, turns a token stream into a
:class:`~packcache.layout.SequenceLayout`, gives the absolute position ids the model expects (1-D or 3-D), its
rotary channel layout for temporal rebasing, the decoder module that :func:`packcache.cache.attach` hooks, and a
valid synthetic token stream for profiling and tests.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from packcache.cache import decoder_module
from packcache.layout import SequenceLayout
from packcache.rope import RotaryLayout, rotary_layout_of

__all__ = ["Adapter", "AdapterError", "model_type_of", "token_list"]


class AdapterError(ValueError):
    """A model, config or token stream that an adapter cannot handle; the message says what is missing."""


def model_type_of(config: Any) -> tuple[str, str]:
    """``(model_type, text_model_type)`` of a transformers config (the text one from ``get_text_config``)."""
    outer = str(getattr(config, "model_type", "") or "")
    try:
        text = config.get_text_config(decoder=True)
    except (AttributeError, TypeError):
        text = config
    return outer, str(getattr(text, "model_type", "") or "")


def token_list(ids: Sequence[int] | np.ndarray | torch.Tensor) -> list[int]:
    """A flat list of ints from ids given as a list, a numpy array or a ``[L]`` / ``[1, L]`` tensor."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()
    if ids and isinstance(ids[0], list):
        if len(ids) != 1:
            raise AdapterError(f"one sequence at a time: got a batch of {len(ids)}")
        ids = ids[0]
    return [int(x) for x in ids]


class Adapter(ABC):
    """One model family. Subclasses set :attr:`name`, :attr:`model_types` and :attr:`position_dims`."""

    name: str = ""
    #: ``model_type`` values (outer or text config) this adapter handles.
    model_types: tuple[str, ...] = ()
    #: 1 for 1-D RoPE models, 3 for (t, h, w) M-RoPE / MM-RoPE models.
    position_dims: int = 1

    def matches(self, config: Any) -> bool:
        """Whether this adapter handles a model with this config."""
        return any(t in self.model_types for t in model_type_of(config))

    @abstractmethod
    def layout_from_ids(self, ids: Sequence[int] | np.ndarray | torch.Tensor, **kw: Any) -> SequenceLayout:
        """Parse one token stream into its layout; raises :class:`~packcache.layout.LayoutError` or
        :class:`AdapterError` naming what does not fit."""

    def position_ids(self, layout: SequenceLayout, tokens: slice | np.ndarray | None = None) -> torch.Tensor:
        """Absolute position ids of ``tokens`` (all by default): ``[1, n]`` or ``[3, 1, n]``."""
        return layout.position_ids(tokens, dims=self.position_dims)

    def rotary(self, model: torch.nn.Module) -> RotaryLayout:
        """The rotary channel layout for temporal rebasing; raises :class:`~packcache.rope.RebaseError` for 1-D."""
        return rotary_layout_of(model)

    def decoder(self, model: torch.nn.Module) -> torch.nn.Module:
        """The decoder module whose forward :func:`packcache.cache.attach` hooks (it receives the cache)."""
        return decoder_module(model)

    @abstractmethod
    def example(self, config: Any, num_frames: int, height: int, width: int, seed: int = 0
                ) -> tuple[torch.Tensor, SequenceLayout]:
        """A valid synthetic token stream ``[1, L]`` of this family and its layout (profiling and tests)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def vocab_size_of(config: Any) -> int:
    """The text vocabulary size of a config."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    size = getattr(text, "vocab_size", None)
    if not size:
        raise AdapterError(f"config of type {type(config).__name__} has no vocab_size")
    return int(size)


def random_ids(generator: torch.Generator, n: int, vocab: int, exclude: Sequence[int] = (),
               pool: Sequence[int] | None = None) -> torch.Tensor:
    """``n`` random token ids from ``pool`` (or ``range(vocab)``), avoiding ``exclude``."""
    candidates = torch.tensor(sorted(set(pool if pool is not None else range(vocab)) - set(exclude)), dtype=torch.long)
    if not candidates.numel():
        raise AdapterError("no token ids left to sample from")
    return candidates[torch.randint(0, candidates.numel(), (n,), generator=generator)]


def spans_between(seq: Sequence[int], start_id: int, end_id: int) -> list[tuple[int, int]]:
    """``(first, stop)`` token ranges strictly between each ``start_id`` and the next ``end_id``."""
    spans, i = [], 0
    while True:
        try:
            s = seq.index(start_id, i)
        except ValueError:
            return spans
        try:
            e = seq.index(end_id, s + 1)
        except ValueError:
            raise AdapterError(f"block opened by token {start_id} at {s} is never closed by {end_id}") from None
        spans.append((s + 1, e))
        i = e + 1
