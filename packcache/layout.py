"""Token layout of a unified AR video sequence: who every token is, and where it sits.

A :class:`SequenceLayout` describes one token sequence as

    [text] [prefix specials] [frame 0] [frame 1] ... [frame N-1] [suffix specials]

where every frame is ``frame_prefix`` specials (e.g. ``<image_start>`` and grid-size tokens), ``height`` rows
of ``width`` visual tokens (each row optionally followed by a row-separator token), then ``frame_suffix``
specials (e.g. ``<image_end>``). The first ``cond_frames`` frames are the conditioning image(s).

For every token the layout gives its group (:class:`TokenGroup`), frame index (-1 outside frames), grid row
and column (-1 for non-grid tokens), its true 1-D position and its 3-D ``(t, h, w)`` position under one of
two conventions:

* ``"mmrope"`` -- Lumos-1 MM-RoPE: text is 1-D ``(i, i, i)``; a visual token of frame ``f`` at ``(r, c)`` sits
  at ``offset + (st*f, sh*r, sw*c)`` with ``offset`` the index of the first frame token and scales
  ``(st, sh, sw) = (4, 8, 8)`` by default. In-frame specials take their frame's time and the grid edge as
  ``(h, w)``; suffix specials continue 1-D after the largest position. [our choice for the specials]
  ``cond_time_gap`` (default 1) is how many time steps the first frame after the conditioning frames sits after
  the last of them; every later frame keeps its step of 1 (``st`` in positions).
* ``"mrope"`` -- transformers' Qwen2-VL / Qwen3-VL M-RoPE as ``get_rope_index`` gives it: text and specials
  advance 1-D from the previous maximum + 1; a vision block of grid ``(T, H, W)`` starting at ``s`` puts token
  ``(t, r, c)`` at ``(s+t, s+r, s+c)``. Frames separated by specials are one block each (``T = 1``); frames
  with nothing between them form one video block whose time advances by ``time_interval`` per frame (1 for
  Qwen2-VL; ``tokens_per_second * second_per_grid_t`` for Qwen2.5-VL), and the tokens after that block continue
  1-D from ``s + max(H, W)``, as transformers 5's ``get_rope_index`` does.

Positions come from the layout alone, never from a cache length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch

__all__ = ["TokenGroup", "SpecialTokens", "SequenceLayout", "LayoutError"]


class LayoutError(ValueError):
    """A token sequence or a layout specification that does not describe a valid layout."""


class TokenGroup(IntEnum):
    """What a token is: the groups that attention statistics and cache policies reason about."""

    TEXT = 0
    COND = 1
    FRAME = 2
    SPECIAL = 3


CONVENTIONS = ("mmrope", "mrope")


@dataclass(frozen=True)
class SpecialTokens:
    """Special token ids used to parse a token stream into a :class:`SequenceLayout`.

    ``frame_start`` opens a frame and ``frame_end`` closes it; ``row_separator`` (optional) ends every grid
    row; ``grid_tokens`` is the number of tokens right after ``frame_start`` that encode the grid size
    (Lumos-1 has two); ``prefix_ids``/``suffix_ids`` are specials allowed before the first / after the last
    frame (e.g. ``<video_start>``, duration, fps, ``<video_end>``).
    """

    frame_start: int
    frame_end: int
    row_separator: int | None = None
    grid_tokens: int = 0
    prefix_ids: tuple[int, ...] = ()
    suffix_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class SequenceLayout:
    """The token layout of one sequence; see the module docstring for the segment order and conventions.

    All per-token arrays are numpy int64 of length :attr:`num_tokens`; ``pos3d`` is ``[num_tokens, 3]``.
    """

    text_tokens: int
    num_frames: int
    height: int
    width: int
    cond_frames: int = 1
    row_separator: bool = False
    frame_prefix: int = 0
    frame_suffix: int = 0
    prefix_specials: int = 0
    suffix_specials: int = 0
    convention: str = "mmrope"
    scales: tuple[int, int, int] = (4, 8, 8)
    time_interval: float = 1.0
    cond_time_gap: int = 1

    def __post_init__(self) -> None:
        for name in ("text_tokens", "prefix_specials", "suffix_specials", "frame_prefix", "frame_suffix"):
            if getattr(self, name) < 0:
                raise LayoutError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.height < 1 or self.width < 1:
            raise LayoutError(f"grid must be at least 1x1, got {self.height}x{self.width}")
        if self.num_frames < 1:
            raise LayoutError(f"num_frames must be >= 1, got {self.num_frames}")
        if not 0 <= self.cond_frames <= self.num_frames:
            raise LayoutError(f"cond_frames must be in [0, num_frames={self.num_frames}], got {self.cond_frames}")
        if self.convention not in CONVENTIONS:
            raise LayoutError(f"convention must be one of {CONVENTIONS}, got {self.convention!r}")
        if len(self.scales) != 3 or min(self.scales) < 1:
            raise LayoutError(f"scales must be three positive integers, got {self.scales}")
        if not self.time_interval > 0:
            raise LayoutError(f"time_interval must be > 0, got {self.time_interval}")
        if self.cond_time_gap < 1:
            raise LayoutError(f"cond_time_gap must be >= 1, got {self.cond_time_gap}")
        if self.cond_time_gap != 1 and (self.convention != "mmrope" or not self.cond_frames):
            raise LayoutError("cond_time_gap applies to the 'mmrope' convention with a conditioning frame")
        if self.convention == "mrope" and self.row_separator:
            raise LayoutError("the 'mrope' convention has no row separators (Qwen-VL grids are contiguous)")
        object.__setattr__(self, "_arrays", self._build())

    # ----------------------------------------------------------------------------------------------------
    # construction
    @classmethod
    def from_counts(cls, **kwargs) -> SequenceLayout:
        """Build a layout from counts (the dataclass fields); the explicit, self-documenting constructor."""
        return cls(**kwargs)

    @classmethod
    def from_token_ids(
        cls,
        ids: Sequence[int] | np.ndarray | torch.Tensor,
        special: SpecialTokens,
        *,
        cond_frames: int = 1,
        convention: str = "mmrope",
        scales: tuple[int, int, int] = (4, 8, 8),
        cond_time_gap: int = 1,
    ) -> SequenceLayout:
        """Parse a token stream given its special token ids.

        Every frame must have the same grid and the same specials. Raises :class:`LayoutError` naming the first
        token that does not fit.
        """
        seq = [int(x) for x in (ids.tolist() if hasattr(ids, "tolist") else ids)]
        starts = [i for i, t in enumerate(seq) if t == special.frame_start]
        if not starts:
            raise LayoutError(f"no frame_start token ({special.frame_start}) in a sequence of {len(seq)} tokens")
        first = starts[0]
        prefix = 0
        while first - prefix - 1 >= 0 and seq[first - prefix - 1] in special.prefix_ids:
            prefix += 1
        text = first - prefix
        grids: list[tuple[int, int]] = []
        pos = first
        for f, s in enumerate(starts):
            if s != pos:
                raise LayoutError(f"frame {f} starts at token {s}, expected {pos} right after frame {f - 1}")
            try:
                end = seq.index(special.frame_end, s + 1)
            except ValueError:
                raise LayoutError(f"frame {f} starting at token {s} has no frame_end token") from None
            body = seq[s + 1 + special.grid_tokens : end]
            if special.row_separator is not None:
                rows, cur = [], 0
                for j, t in enumerate(body):
                    if t == special.row_separator:
                        rows.append(cur)
                        cur = 0
                    elif t in (special.frame_start,):
                        raise LayoutError(f"frame_start inside frame {f} at token {s + 1 + special.grid_tokens + j}")
                    else:
                        cur += 1
                if cur:
                    raise LayoutError(f"frame {f}: last row has no row separator before frame_end at token {end}")
                if not rows or len(set(rows)) != 1:
                    raise LayoutError(f"frame {f}: rows have unequal lengths {sorted(set(rows))}")
                grids.append((len(rows), rows[0]))
            else:
                grids.append((1, len(body)))
            pos = end + 1
        if len(set(grids)) != 1:
            raise LayoutError(f"frames have different grids: {sorted(set(grids))}")
        suffix = seq[pos:]
        bad = [i for i, t in enumerate(suffix) if t not in special.suffix_ids]
        if bad:
            raise LayoutError(f"unexpected token {suffix[bad[0]]} at position {pos + bad[0]} after the last frame")
        h, w = grids[0]
        if special.row_separator is None and h == 1:
            raise LayoutError("without a row_separator the grid height cannot be parsed; use from_counts")
        return cls(
            text_tokens=text,
            num_frames=len(starts),
            height=h,
            width=w,
            cond_frames=cond_frames,
            row_separator=special.row_separator is not None,
            frame_prefix=1 + special.grid_tokens,
            frame_suffix=1,
            prefix_specials=prefix,
            suffix_specials=len(suffix),
            convention=convention,
            scales=scales,
            cond_time_gap=cond_time_gap,
        )

    # ----------------------------------------------------------------------------------------------------
    # sizes
    @property
    def visual_per_frame(self) -> int:
        """Visual (grid) tokens in one frame."""
        return self.height * self.width

    @property
    def tokens_per_frame(self) -> int:
        """All tokens of one frame: grid, row separators and frame specials."""
        return self.frame_prefix + self.height * (self.width + int(self.row_separator)) + self.frame_suffix

    @property
    def first_frame_token(self) -> int:
        """Index of the first token of frame 0."""
        return self.text_tokens + self.prefix_specials

    @property
    def num_tokens(self) -> int:
        """Length of the whole sequence."""
        return self.first_frame_token + self.num_frames * self.tokens_per_frame + self.suffix_specials

    @property
    def anchor_tokens(self) -> int:
        """Anchor tokens present before the first generated frame: text, prefix specials, conditioning frames."""
        return self.first_frame_token + self.cond_frames * self.tokens_per_frame

    def frame_slice(self, frame: int) -> slice:
        """Token indices of frame ``frame`` (its specials included)."""
        if not 0 <= frame < self.num_frames:
            raise LayoutError(f"frame {frame} outside [0, {self.num_frames})")
        start = self.first_frame_token + frame * self.tokens_per_frame
        return slice(start, start + self.tokens_per_frame)

    def with_frames(self, num_frames: int) -> SequenceLayout:
        """The same layout with another number of frames."""
        from dataclasses import replace

        return replace(self, num_frames=num_frames)

    # ----------------------------------------------------------------------------------------------------
    # per-token arrays
    @property
    def group(self) -> np.ndarray:
        return self._arrays["group"]

    @property
    def frame(self) -> np.ndarray:
        return self._arrays["frame"]

    @property
    def row(self) -> np.ndarray:
        return self._arrays["row"]

    @property
    def col(self) -> np.ndarray:
        return self._arrays["col"]

    @property
    def pos1d(self) -> np.ndarray:
        return self._arrays["pos1d"]

    @property
    def pos3d(self) -> np.ndarray:
        return self._arrays["pos3d"]

    @property
    def anchor(self) -> np.ndarray:
        """True for tokens PackCache never drops: text, conditioning frames and the specials outside frames."""
        return self._arrays["anchor"]

    def cond_cell_index(self) -> np.ndarray:
        """For every token, the layout index of the same grid cell in the last conditioning frame (-1 for tokens
        off the grid, or without a conditioning frame)."""
        return self._arrays["cond_cell"]

    def frame_time(self, frame: int | np.ndarray) -> np.ndarray:
        """Temporal (t) position of the visual tokens of ``frame``; defined for any frame index >= 0."""
        return self._frame_time(np.asarray(frame))

    def position_ids(self, tokens: slice | np.ndarray | None = None, *, dims: int = 3) -> torch.Tensor:
        """Absolute position ids for ``tokens``: ``[1, n]`` for ``dims=1``, ``[3, 1, n]`` (t, h, w) for ``dims=3``."""
        idx = np.arange(self.num_tokens)[tokens] if tokens is not None else np.arange(self.num_tokens)
        if dims == 1:
            return torch.from_numpy(self.pos1d[idx]).view(1, -1)
        if dims == 3:
            return torch.from_numpy(np.ascontiguousarray(self.pos3d[idx].T)).view(3, 1, -1)
        raise LayoutError(f"dims must be 1 or 3, got {dims}")

    def summary(self) -> dict:
        """The layout facts a budget records (JSON-ready)."""
        return {
            "text_tokens": self.text_tokens,
            "cond_frames": self.cond_frames,
            "height": self.height,
            "width": self.width,
            "tokens_per_frame": self.tokens_per_frame,
            "visual_per_frame": self.visual_per_frame,
            "row_separator": self.row_separator,
            "frame_prefix": self.frame_prefix,
            "frame_suffix": self.frame_suffix,
            "prefix_specials": self.prefix_specials,
            "convention": self.convention,
            "cond_time_gap": self.cond_time_gap,
        }

    # ----------------------------------------------------------------------------------------------------
    def _frame_time(self, frame: np.ndarray) -> np.ndarray:
        offset = self.first_frame_token
        if self.convention == "mmrope":
            gap = np.where(frame >= self.cond_frames, self.cond_time_gap - 1, 0) if self.cond_frames else 0
            return offset + self.scales[0] * (frame + gap)
        if self._video_block:
            # float32 product truncated to int, exactly as get_vision_position_ids computes it
            return offset + (frame.astype(np.float32) * np.float32(self.time_interval)).astype(np.int64)
        # one block per frame: each block starts one past the previous maximum
        span = self.frame_prefix + max(self.height, self.width) + self.frame_suffix
        return offset + self.frame_prefix + frame * span

    @property
    def _video_block(self) -> bool:
        return self.frame_prefix == 0 and self.frame_suffix == 0

    def _build(self) -> dict[str, np.ndarray]:
        n = self.num_tokens
        group = np.full(n, TokenGroup.SPECIAL, dtype=np.int64)
        frame = np.full(n, -1, dtype=np.int64)
        row = np.full(n, -1, dtype=np.int64)
        col = np.full(n, -1, dtype=np.int64)
        pos3d = np.zeros((n, 3), dtype=np.int64)
        group[: self.text_tokens] = TokenGroup.TEXT
        head = self.first_frame_token
        pos3d[:head] = np.arange(head)[:, None]
        st, sh, sw = self.scales if self.convention == "mmrope" else (1, 1, 1)
        h, w = self.height, self.width
        rsep = int(self.row_separator)
        # one frame's token pattern, relative to the frame start
        local_row = np.full(self.tokens_per_frame, -1, dtype=np.int64)
        local_col = np.full(self.tokens_per_frame, -1, dtype=np.int64)
        grid_at = self.frame_prefix + np.arange(h)[:, None] * (w + rsep) + np.arange(w)[None, :]
        local_row[grid_at] = np.repeat(np.arange(h), w).reshape(h, w)
        local_col[grid_at] = np.tile(np.arange(w), h).reshape(h, w)
        is_grid = local_row >= 0
        sep_at = self.frame_prefix + np.arange(h) * (w + rsep) + w if rsep else np.zeros(0, dtype=np.int64)
        spatial_base = head if self.convention == "mmrope" else None
        for f in range(self.num_frames):
            sl = self.frame_slice(f)
            frame[sl] = f
            row[sl] = local_row
            col[sl] = local_col
            g = np.full(self.tokens_per_frame, TokenGroup.SPECIAL, dtype=np.int64)
            g[is_grid] = TokenGroup.COND if f < self.cond_frames else TokenGroup.FRAME
            group[sl] = g
            t = int(self._frame_time(np.asarray(f)))
            p = np.empty((self.tokens_per_frame, 3), dtype=np.int64)
            if self.convention == "mmrope":
                p[:, 0] = t
                p[:, 1] = spatial_base
                p[:, 2] = spatial_base
                p[is_grid, 1] = spatial_base + sh * local_row[is_grid]
                p[is_grid, 2] = spatial_base + sw * local_col[is_grid]
                if rsep:
                    p[sep_at, 1] = spatial_base + sh * np.arange(h)
                    p[sep_at, 2] = spatial_base + sw * w
                p[self.tokens_per_frame - self.frame_suffix :, 1] = spatial_base + sh * h
                p[self.tokens_per_frame - self.frame_suffix :, 2] = spatial_base + sw * w
            else:
                # Qwen-VL: specials are text-like (1-D), the grid is a block starting one past them
                start = t - (0 if self._video_block else self.frame_prefix)
                p[: self.frame_prefix] = (start + np.arange(self.frame_prefix))[:, None]
                s = t if not self._video_block else head
                p[is_grid, 0] = t
                p[is_grid, 1] = s + sh * local_row[is_grid]
                p[is_grid, 2] = s + sw * local_col[is_grid]
                after = s + max(h, w)
                p[self.tokens_per_frame - self.frame_suffix :] = (after + np.arange(self.frame_suffix))[:, None]
            pos3d[sl] = p
        tail = self.num_tokens - self.suffix_specials
        if self.suffix_specials:
            start = int(pos3d[:tail].max()) + 1
            if self.convention == "mrope" and self._video_block:
                start = head + max(h, w)  # get_rope_index advances past a vision block by its spatial extent only
            pos3d[tail:] = (start + np.arange(self.suffix_specials))[:, None]
        anchor = (group == TokenGroup.TEXT) | (group == TokenGroup.COND) | (frame < 0)
        anchor |= (frame >= 0) & (frame < self.cond_frames)
        cond_cell = np.full(n, -1, dtype=np.int64)
        if self.cond_frames:
            cond = np.flatnonzero((frame == self.cond_frames - 1) & (row >= 0))
            at_cell = np.empty(h * w, dtype=np.int64)
            at_cell[row[cond] * w + col[cond]] = cond
            grid = row >= 0
            cond_cell[grid] = at_cell[row[grid] * w + col[grid]]
        for a in (group, frame, row, col, pos3d, anchor, cond_cell):
            a.setflags(write=False)
        pos1d = np.arange(n, dtype=np.int64)
        pos1d.setflags(write=False)
        return {
            "group": group,
            "frame": frame,
            "row": row,
            "col": col,
            "pos1d": pos1d,
            "pos3d": pos3d,
            "anchor": anchor,
            "cond_cell": cond_cell,
        }
