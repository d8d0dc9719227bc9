"""SlidingWindow: anchors plus the last N whole frames (N = 1 is the paper's baseline; N = 0 is anchors only)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from packcache.layout import SequenceLayout
from packcache.policies.base import CachePolicy, SlotView, mask_to_indices

__all__ = ["SlidingWindow"]


@dataclass
class SlidingWindow(CachePolicy):
    """Keep text, condition and the ``frames`` most recent finished frames whole; drop older frames."""

    frames: int = 1

    def __post_init__(self) -> None:
        if self.frames < 0:
            raise ValueError(f"frames must be >= 0, got {self.frames}")

    def keep(self, slots: SlotView, next_frame: int) -> torch.Tensor | None:
        frame = slots.frame
        keep = slots.anchor | (frame >= next_frame - self.frames)
        if bool(keep.all()):
            return None
        return mask_to_indices(keep)

    def budget_tokens(self, layout: SequenceLayout) -> int | None:
        return layout.anchor_tokens + self.frames * layout.tokens_per_frame

    @property
    def name(self) -> str:
        return f"SlidingWindow({self.frames})"
