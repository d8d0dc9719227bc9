"""StreamingLLM: the first ``sinks`` tokens (attention sinks) plus the most recent tokens, up to a token budget."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from packcache.budget import BudgetError
from packcache.layout import SequenceLayout
from packcache.policies.base import CachePolicy, SlotView, mask_to_indices

__all__ = ["StreamingLLM"]


@dataclass
class StreamingLLM(CachePolicy):
    """Keep slots ``0..sinks-1`` and the most recent ``max_tokens - sinks`` slots (Xiao et al., 2023).

    It knows nothing of frames or anchors: at equal memory it is the layout-blind baseline.
    """

    max_tokens: int
    sinks: int = 4

    def __post_init__(self) -> None:
        if self.sinks < 0 or self.max_tokens < self.sinks:
            raise BudgetError(f"max_tokens ({self.max_tokens}) must be >= sinks ({self.sinks}) >= 0")

    def keep(self, slots: SlotView, next_frame: int) -> torch.Tensor | None:
        n = slots.shape[-1]
        if n <= self.max_tokens:
            return None
        position = torch.arange(n).expand(slots.shape)
        keep = (position < self.sinks) | (position >= n - (self.max_tokens - self.sinks))
        return mask_to_indices(keep)

    def budget_tokens(self, layout: SequenceLayout) -> int | None:
        return self.max_tokens

    def check(self, layout: SequenceLayout, *, num_layers: int, num_kv_heads: int) -> None:
        # StreamingLLM drops anchors by design; only the sink count has to fit.
        if self.max_tokens < self.sinks:
            raise BudgetError(f"max_tokens ({self.max_tokens}) is smaller than sinks ({self.sinks})")

    @property
    def name(self) -> str:
        return f"StreamingLLM({self.sinks})"
