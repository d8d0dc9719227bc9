"""FullCache: keeps everything; the reference every other policy is compared with."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from packcache.layout import SequenceLayout
from packcache.policies.base import CachePolicy, SlotView

__all__ = ["FullCache"]


@dataclass
class FullCache(CachePolicy):
    """Never drops a slot; the cache grows linearly with the video."""

    def keep(self, slots: SlotView, next_frame: int) -> torch.Tensor | None:
        return None

    def budget_tokens(self, layout: SequenceLayout) -> int | None:
        return None
