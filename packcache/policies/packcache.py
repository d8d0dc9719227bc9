"""PackCache (arXiv 2601.04359): condition anchoring, cross-frame decay allocation, spatially uniform packing.

Stages, re-derived at every frame boundary from what is cached:

* **Fill** -- while the cache holds no more than the packed budget, nothing is dropped.
* **Pack** -- once it exceeds the budget, the history frame at distance ``d`` (1 = most recent) keeps
  ``round(keep_ratios[layer][head][d-1] * visual_per_frame)`` of its visual tokens; frames beyond the window W
  are dropped. Text, conditioning frames and specials outside frames are anchors and never dropped; a frame
  inside the window keeps its own specials (start/end, row separators).
* **Slide** -- every further frame re-packs the window, so the size stays constant.

In-frame selection is nested: a frame that ages from ratio 1/2 to 1/4 keeps a subset of what it had. By
default the kept tokens form a spatially uniform sub-grid at their original (h, w) (an ordered-dither rank,
so 1/2 is a checkerboard and 1/4 every other row and column). With ``selection="novelty"`` (beyond the paper) the
tokens whose id differs from the same cell of the conditioning frame go first -- what moved, or what a moving
object uncovered; the unchanged rest is already held by the condition anchor -- and the sub-grid order fills the
remaining budget. This needs the token ids (``CompactCache.feed(tokens, ids)``, as the generation runtime and
:func:`~packcache.cache.attach` do). With ``selection="score"`` and per-slot scores supplied by the cache, the
highest-scoring tokens are kept instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np
import torch

from packcache.budget import Budget, BudgetError
from packcache.layout import SequenceLayout
from packcache.policies.base import CachePolicy, SlotView, mask_to_indices

__all__ = ["PackCache", "grid_priority"]


@lru_cache(maxsize=32)
def grid_priority(height: int, width: int) -> np.ndarray:
    """Rank of every grid cell ``[height, width]``: keeping ranks < k gives a spatially uniform k-cell sub-grid.

    Ranks come from a Bayer (ordered-dither) matrix tiled over the grid, ties broken in raster order.
    """
    n = 1
    while n < max(height, width):
        n *= 2
    bayer = np.zeros((1, 1), dtype=np.int64)
    while bayer.shape[0] < n:
        bayer = np.block([[4 * bayer, 4 * bayer + 2], [4 * bayer + 3, 4 * bayer + 1]])
    value = bayer[:height, :width].ravel()
    order = np.lexsort((np.arange(height * width), value))
    rank = np.empty(height * width, dtype=np.int64)
    rank[order] = np.arange(height * width)
    return rank.reshape(height, width)


@dataclass
class PackCache(CachePolicy):
    """The PackCache policy driven by a :class:`~packcache.budget.Budget` (paper default or fitted)."""

    budget: Budget
    _ratios: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._ratios = torch.tensor(self.budget.ratios(), dtype=torch.float64)  # [layers, kv_heads, W]

    @property
    def window(self) -> int:
        return self.budget.window

    def keep_counts(self, layout: SequenceLayout) -> torch.Tensor:
        """Visual tokens kept per layer, kv head and distance: ``[layers, kv_heads, W]``."""
        return torch.floor(self._ratios * layout.visual_per_frame + 0.5).long()

    def budget_tokens(self, layout: SequenceLayout) -> int | None:
        specials = layout.tokens_per_frame - layout.visual_per_frame
        history = int(self.keep_counts(layout).sum(-1).max())
        return layout.anchor_tokens + history + self.window * specials

    def check(self, layout: SequenceLayout, *, num_layers: int, num_kv_heads: int) -> None:
        self.budget.check_model(num_layers=num_layers, num_kv_heads=num_kv_heads)
        self.budget.check_layout(layout)
        super().check(layout, num_layers=num_layers, num_kv_heads=num_kv_heads)

    def keep(self, slots: SlotView, next_frame: int) -> torch.Tensor | None:
        layout = slots.layout
        if slots.shape[-1] <= self.budget_tokens(layout):
            return None  # Fill
        if self.budget.selection == "score" and slots.scores is None:
            raise BudgetError("selection: the budget selects by score, but the cache has no per-slot scores")
        if self.budget.selection == "novelty" and slots.ids is None:
            raise BudgetError("selection: the budget selects by novelty, but the cache was fed no token ids")
        frame, visual, anchor = slots.frame, slots.is_visual, slots.anchor
        distance = next_frame - frame
        keep = anchor | (frame >= next_frame) | (~visual & (frame >= 0) & (distance <= self.window))
        priority = self._priority(slots)
        counts = self.keep_counts(layout)
        for d in range(1, self.window + 1):
            candidate = visual & (distance == d) & ~anchor
            if not bool(candidate.any()):
                continue
            masked = torch.where(candidate, priority, torch.full_like(priority, float("inf")))
            order = masked.argsort(dim=-1, stable=True)
            rank = torch.empty_like(order)
            rank.scatter_(-1, order, torch.arange(order.shape[-1]).expand_as(order).contiguous())
            keep |= candidate & (rank < counts[:, :, d - 1, None])
        return mask_to_indices(keep)

    def _priority(self, slots: SlotView) -> torch.Tensor:
        layout = slots.layout
        grid = torch.from_numpy(grid_priority(layout.height, layout.width)).double()
        row, col = slots.row.clamp(min=0), slots.col.clamp(min=0)
        spatial = grid[row, col]
        if self.budget.selection == "novelty":
            return spatial - (layout.height * layout.width) * slots.novel.double()
        if self.budget.selection != "score":
            return spatial
        # highest score first, the spatial rank breaking ties: a lexicographic rank from two stable sorts
        by_space = spatial.argsort(dim=-1, stable=True)
        by_score = (-slots.scores.double()).gather(-1, by_space).argsort(dim=-1, stable=True)
        order = by_space.gather(-1, by_score)
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(order.shape[-1]).expand_as(order).contiguous())
        return rank.double()

    @property
    def reads_token_ids(self) -> bool:
        return self.budget.selection == "novelty"

    @property
    def name(self) -> str:
        source = self.budget.provenance.get("source", "fitted")
        name = "PackCache(paper)" if source == "paper_default" else "PackCache(fitted)"
        return name[:-1] + ", novelty)" if self.budget.selection == "novelty" else name
