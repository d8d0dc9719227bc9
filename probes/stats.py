"""AttentionStats: the attention statistics the probes accumulate, and the file the fit and the dashboard read.

File format ``packcache.stats/v1``: one ``.npz`` (numpy only, no pickles) holding the arrays below plus
``header``, a 0-d string array with a small JSON object::

    {"schema": "packcache.stats/v1", "model_id": str, "num_layers": L, "num_heads": H, "num_kv_heads": K,
     "layout": {SequenceLayout fields}, "key_groups": ["text", "cond", "special", "future", "d0", ..., "older"],
     "max_distance": D, "recent_frames": R, "num_steps": S, "num_samples": int, "forwards": int}

Arrays (float64 sums over query tokens and batch rows; divide by the matching count for means):

* ``mass [L, H, F, G]`` -- attention mass of query frame ``f`` (layout frame index, F = layout.num_frames) on
  key group ``g``; ``mass_sq`` the sum of squared per-query masses (for standard errors);
* ``queries [F]`` -- query tokens counted per query frame (identical for every layer and head);
* ``step_mass [L, H, S, G]`` / ``step_queries [S]`` -- the same summed over query frames, per decoding step;
* ``spatial [L, H, R, height, width]`` / ``spatial_queries [R]`` -- mass on every grid cell of the frame at
  distance ``d < R`` (visual tokens of generated frames only, so ``spatial[l, h, d].sum()`` equals the ``d``
  column of ``mass`` summed over query frames that have such a frame).

Key groups: ``text``, ``cond`` (visual tokens of conditioning frames), ``special`` (every special token, inside
or outside frames), ``future`` (visual tokens of later frames; zero under causal masks), ``d{k}`` (visual tokens
of the frame ``k`` frames before the query's frame, ``d0`` its own frame) and ``older`` (``d >= max_distance``).
Queries outside frames (text, specials outside frames) are not counted.
"""

from __future__ import annotations

import io
import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from packcache.budget import atomic_write_text
from packcache.layout import SequenceLayout

__all__ = ["AttentionStats", "StatsError", "SCHEMA", "FIRST_DISTANCE", "key_group_names"]

SCHEMA = "packcache.stats/v1"
FIRST_DISTANCE = 4  # index of the "d0" key group
_ARRAYS = ("mass", "mass_sq", "queries", "step_mass", "step_queries", "spatial", "spatial_queries")


class StatsError(ValueError):
    """A statistics file or a merge of statistics that does not fit."""


def key_group_names(max_distance: int) -> list[str]:
    """Names of the key-group axis: text, cond, special, future, d0 .. d{max_distance-1}, older."""
    return ["text", "cond", "special", "future", *[f"d{d}" for d in range(max_distance)], "older"]


@dataclass
class AttentionStats:
    """Summed attention statistics of one model on one layout; see the module docstring for the arrays."""

    model_id: str
    num_layers: int
    num_heads: int
    num_kv_heads: int
    layout: SequenceLayout
    max_distance: int
    recent_frames: int
    num_steps: int
    num_samples: int = 0
    forwards: int = 0
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_distance < 1 or self.recent_frames < 0 or self.num_steps < 1:
            raise StatsError("max_distance and num_steps must be >= 1, recent_frames >= 0")
        shapes = self.shapes()
        for name, shape in shapes.items():
            if name not in self.arrays:
                dtype = np.int64 if name.endswith("queries") else np.float64
                self.arrays[name] = np.zeros(shape, dtype=dtype)
            elif self.arrays[name].shape != shape:
                raise StatsError(f"{name}: expected shape {shape}, got {self.arrays[name].shape}")

    @classmethod
    def empty(cls, model_id: str, num_layers: int, num_heads: int, num_kv_heads: int, layout: SequenceLayout, *,
              max_distance: int | None = None, recent_frames: int = 2, num_steps: int = 1) -> AttentionStats:
        """Zeroed statistics; ``max_distance`` defaults to ``min(layout.num_frames, 8)``."""
        return cls(model_id, num_layers, num_heads, num_kv_heads, layout,
                   max_distance or min(layout.num_frames, 8), recent_frames, num_steps)

    # ----------------------------------------------------------------------------------------------------
    def shapes(self) -> dict[str, tuple[int, ...]]:
        n_l, n_h, n_f = self.num_layers, self.num_heads, self.layout.num_frames
        n_g = self.num_groups
        return {
            "mass": (n_l, n_h, n_f, n_g),
            "mass_sq": (n_l, n_h, n_f, n_g),
            "queries": (n_f,),
            "step_mass": (n_l, n_h, self.num_steps, n_g),
            "step_queries": (self.num_steps,),
            "spatial": (n_l, n_h, self.recent_frames, self.layout.height, self.layout.width),
            "spatial_queries": (self.recent_frames,),
        }

    @property
    def num_groups(self) -> int:
        return FIRST_DISTANCE + self.max_distance + 1

    @property
    def key_groups(self) -> list[str]:
        return key_group_names(self.max_distance)

    def group_index(self, name: str) -> int:
        """Index of a key group by name (``"text"``, ``"d1"``, ``"older"``, ...)."""
        try:
            return self.key_groups.index(name)
        except ValueError:
            raise StatsError(f"unknown key group {name!r}; known: {self.key_groups}") from None

    def __getattr__(self, name: str) -> np.ndarray:
        if name in _ARRAYS and "arrays" in self.__dict__:
            return self.__dict__["arrays"][name]
        raise AttributeError(name)

    # ----------------------------------------------------------------------------------------------------
    # derived quantities
    def mean_mass(self) -> np.ndarray:
        """Mean mass per query token ``[L, H, G]`` over all query frames."""
        total = self.queries.sum()
        return self.mass.sum(2) / max(int(total), 1)

    def distance_profile(self, first: int = 1) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Mean and standard error of the mass on the frame at distance ``d`` for ``d = first .. max_distance-1``.

        A distance only averages over query frames that have a generated frame that far back
        (``query_frame - d >= cond_frames``). Returns ``(distances [D], mean [L, H, D], stderr [L, H, D])``;
        entries without any query are NaN.
        """
        cond = self.layout.cond_frames
        frames = np.arange(self.layout.num_frames)
        ds = np.arange(first, self.max_distance)
        mean = np.full((self.num_layers, self.num_heads, len(ds)), np.nan)
        err = np.full_like(mean, np.nan)
        for i, d in enumerate(ds):
            valid = frames - d >= cond
            n = int(self.queries[valid].sum())
            if n == 0:
                continue
            s = self.mass[:, :, valid, FIRST_DISTANCE + d].sum(-1)
            sq = self.mass_sq[:, :, valid, FIRST_DISTANCE + d].sum(-1)
            mean[:, :, i] = s / n
            var = np.maximum(sq / n - (s / n) ** 2, 0.0)
            err[:, :, i] = np.sqrt(var / max(n - 1, 1))
        return ds, mean, err

    def group_shares(self) -> dict[str, np.ndarray]:
        """Mean share ``[L, H]`` of the anchor groups and of all history (d >= 1, older) per query token."""
        m = self.mean_mass()
        return {"text": m[..., 0], "cond": m[..., 1], "special": m[..., 2], "current": m[..., FIRST_DISTANCE],
                "history": m[..., FIRST_DISTANCE + 1:].sum(-1)}

    # ----------------------------------------------------------------------------------------------------
    # merging
    def _check_compatible(self, other: AttentionStats) -> None:
        mine = self.header(counts=False)
        theirs = other.header(counts=False)
        for key in mine:
            if key != "model_id" and mine[key] != theirs[key]:
                raise StatsError(f"cannot merge statistics with different {key}: {mine[key]!r} vs {theirs[key]!r}")

    def merge(self, other: AttentionStats) -> AttentionStats:
        """Add ``other`` into this object (same model shape, layout and axes); returns self."""
        self._check_compatible(other)
        for name in _ARRAYS:
            self.arrays[name] += other.arrays[name]
        self.num_samples += other.num_samples
        self.forwards += other.forwards
        return self

    def __add__(self, other: AttentionStats) -> AttentionStats:
        return self.copy().merge(other)

    def copy(self) -> AttentionStats:
        return AttentionStats(self.model_id, self.num_layers, self.num_heads, self.num_kv_heads, self.layout,
                              self.max_distance, self.recent_frames, self.num_steps, self.num_samples,
                              self.forwards, {k: v.copy() for k, v in self.arrays.items()})

    def all_reduce(self) -> AttentionStats:
        """Sum these statistics over all ranks of the default ``torch.distributed`` group, in place."""
        import torch
        import torch.distributed as dist

        for name in _ARRAYS:
            t = torch.from_numpy(self.arrays[name])
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
            self.arrays[name] = t.numpy()
        counts = torch.tensor([self.num_samples, self.forwards], dtype=torch.int64)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        self.num_samples, self.forwards = (int(x) for x in counts)
        return self

    # ----------------------------------------------------------------------------------------------------
    # files
    def header(self, *, counts: bool = True) -> dict[str, Any]:
        head = {
            "schema": SCHEMA,
            "model_id": self.model_id,
            "num_layers": self.num_layers,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "layout": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self.layout).items()},
            "key_groups": self.key_groups,
            "max_distance": self.max_distance,
            "recent_frames": self.recent_frames,
            "num_steps": self.num_steps,
        }
        if counts:
            head.update(num_samples=self.num_samples, forwards=self.forwards)
        return head

    def save(self, path: str | os.PathLike) -> None:
        """Write ``.npz`` (arrays + JSON header) atomically: temporary file in the same directory, then rename."""
        buf = io.BytesIO()
        np.savez(buf, header=np.array(json.dumps(self.header())), **self.arrays)
        atomic_write_text(path, buf.getvalue())

    @classmethod
    def load(cls, path: str | os.PathLike) -> AttentionStats:
        """Read a file written by :meth:`save`; raises :class:`StatsError` with a one-line reason."""
        try:
            with np.load(path, allow_pickle=False) as data:
                header = json.loads(str(data["header"]))
                arrays = {name: data[name] for name in _ARRAYS}
        except (OSError, KeyError, ValueError) as exc:
            raise StatsError(f"{path}: not a packcache statistics file ({exc})") from None
        if header.get("schema") != SCHEMA:
            raise StatsError(f"{path}: unknown statistics schema {header.get('schema')!r} (expected {SCHEMA!r})")
        fields = dict(header["layout"])
        fields["scales"] = tuple(fields["scales"])
        return cls(header["model_id"], header["num_layers"], header["num_heads"], header["num_kv_heads"],
                   SequenceLayout(**fields), header["max_distance"], header["recent_frames"], header["num_steps"],
                   header.get("num_samples", 0), header.get("forwards", 0), arrays)
