"""The one interface every cache policy implements, and the slot metadata it reads.

A policy never touches key/value tensors. It sees :class:`SlotView` -- for every cached slot, per layer and
kv head, the layout index of the token it holds (hence its group, frame, grid row/col, anchor flag) -- and
returns which slots to keep before the next frame is generated.

Storage contract: every layer and kv head holds the same number of slots, so stock sdpa/eager masks apply.
:func:`equalize` tops up any (layer, head) that keeps fewer than the largest with its most recent slots.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np
import torch

from packcache.budget import BudgetError
from packcache.layout import SequenceLayout, TokenGroup

__all__ = ["SlotView", "CachePolicy", "equalize", "mask_to_indices"]


@dataclass(frozen=True)
class SlotView:
    """What is cached: the layout index of each slot, ``[layers, kv_heads, slots]``, plus derived metadata."""

    token: torch.Tensor
    layout: SequenceLayout
    scores: torch.Tensor | None = None
    ids: torch.Tensor | None = None  # token id at every layout index, [rows, num_tokens] (-1: not fed yet)

    def _lookup(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(array.copy())[self.token]

    @property
    def group(self) -> torch.Tensor:
        return self._lookup(self.layout.group)

    @property
    def frame(self) -> torch.Tensor:
        return self._lookup(self.layout.frame)

    @property
    def row(self) -> torch.Tensor:
        return self._lookup(self.layout.row)

    @property
    def col(self) -> torch.Tensor:
        return self._lookup(self.layout.col)

    @property
    def anchor(self) -> torch.Tensor:
        return self._lookup(self.layout.anchor)

    @property
    def is_visual(self) -> torch.Tensor:
        return self.group == TokenGroup.FRAME

    @property
    def novel(self) -> torch.Tensor:
        """Visual slots whose token id differs, in any batch row, from the same cell of the last conditioning frame
        (the anchor that already holds whatever has not changed). All False without ``ids`` or a condition."""
        layout = self.layout
        if self.ids is None or layout.cond_frames == 0:
            return torch.zeros(self.shape, dtype=torch.bool)
        ref = self._lookup(layout.cond_cell_index())
        own = self.ids[:, self.token]
        differs = ((own != self.ids[:, ref.clamp(min=0)]) & (own >= 0)).any(0)
        return differs & self.is_visual & (ref >= 0)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.token.shape)


class CachePolicy(ABC):
    """Decides which cached slots survive a frame boundary."""

    @abstractmethod
    def keep(self, slots: SlotView, next_frame: int) -> torch.Tensor | None:
        """Slot indices to keep, ``[layers, kv_heads, K]`` ascending, before ``next_frame`` is generated.

        ``None`` means keep everything (no compaction).
        """

    @abstractmethod
    def budget_tokens(self, layout: SequenceLayout) -> int | None:
        """Largest number of slots per layer and head once packed; ``None`` for an unbounded cache."""

    def check(self, layout: SequenceLayout, *, num_layers: int, num_kv_heads: int) -> None:
        """Raise :class:`BudgetError` if this policy cannot run on ``layout`` and this model shape."""
        budget = self.budget_tokens(layout)
        anchors = layout.anchor_tokens
        if budget is not None and budget < anchors:
            raise BudgetError(f"budget of {budget} tokens is smaller than the {anchors} anchor tokens "
                              f"(text, condition and specials) of this layout")

    @property
    def reads_token_ids(self) -> bool:
        """True if what it keeps depends on token content (:attr:`SlotView.ids`): batch rows that hold different
        videos then share one choice, so run one video per cache to keep each video's own selection."""
        return False

    @property
    def name(self) -> str:
        return type(self).__name__


def equalize(keep: torch.Tensor) -> torch.Tensor:
    """Top up a boolean keep mask ``[layers, kv_heads, S]`` so every row keeps the same count.

    Rows below the largest count add their most recent (highest-index) dropped slots.
    """
    counts = keep.sum(-1, keepdim=True)
    target = counts.max()
    if bool((counts == target).all()):
        return keep
    dropped = ~keep
    # rank dropped slots from the most recent: 1 for the last dropped slot, 2 for the one before, ...
    rank_from_end = dropped.flip(-1).cumsum(-1).flip(-1)
    return keep | (dropped & (rank_from_end <= (target - counts)))


def mask_to_indices(keep: torch.Tensor) -> torch.Tensor:
    """Boolean ``[layers, kv_heads, S]`` with equal row counts -> ascending indices ``[layers, kv_heads, K]``."""
    keep = equalize(keep)
    n_layers, n_heads, _ = keep.shape
    return torch.nonzero(keep.reshape(n_layers * n_heads, -1))[:, 1].view(n_layers, n_heads, -1)
