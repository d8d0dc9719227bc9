"""Results of a generation run, as plain data: readable from JSON without torch (the dashboard's view).

JSON schema ``packcache.video/v1``::

    {"schema": "packcache.video/v1",
     "meta": {"policy": str, "mode": "masked" | "raster", "num_frames": int, "steps": int, "cfg_scale": float,
              "seed": int, "rebase": bool, "temperature": float, "history_mask_ratio": float, "prompt": [int],
              "budget_tokens": int | null, "layout": {...SequenceLayout.summary()}, "model": str},
     "frames": [[[int]]],                   # [num_frames][height][width] token (colour) ids; frame 0 = condition
     "records": [{"frame": int, "seconds": float, "compaction_seconds": float, "slots_before": int | null,
                  "cache_tokens": [int per layer], "kv_bytes": int, "forwards": int}, ...]}

``records[k]`` describes frame ``k``: ``cache_tokens`` / ``kv_bytes`` are what its forwards attended to (after the
compaction that preceded it; for frame 0, the cache after prefill), ``seconds`` its wall time including that
compaction, ``compaction_seconds`` the compaction alone.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from packcache.budget import atomic_write_text

__all__ = ["FrameRecord", "VideoResult", "VIDEO_SCHEMA"]

VIDEO_SCHEMA = "packcache.video/v1"


@dataclass
class FrameRecord:
    """Per-frame cost of a generation run (see the module docstring)."""

    frame: int
    seconds: float
    compaction_seconds: float
    cache_tokens: list[int]
    kv_bytes: int
    forwards: int
    slots_before: int | None = None


@dataclass
class VideoResult:
    """Generated frames ``[num_frames, H, W]`` (numpy ints), one :class:`FrameRecord` per frame, run metadata."""

    frames: np.ndarray
    records: list[FrameRecord]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def total_seconds(self) -> float:
        return float(sum(r.seconds for r in self.records))

    def to_dict(self) -> dict[str, Any]:
        return {"schema": VIDEO_SCHEMA, "meta": self.meta, "frames": np.asarray(self.frames).tolist(),
                "records": [asdict(r) for r in self.records]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VideoResult:
        if not isinstance(data, dict) or data.get("schema") != VIDEO_SCHEMA:
            got = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise ValueError(f"schema: expected {VIDEO_SCHEMA!r}, got {got!r}")
        try:
            return cls(frames=np.asarray(data["frames"], dtype=np.int64),
                       records=[FrameRecord(**r) for r in data["records"]], meta=dict(data["meta"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a valid {VIDEO_SCHEMA} result: {exc}") from None

    def save(self, path: str | os.PathLike) -> None:
        """Write the result as JSON, atomically."""
        atomic_write_text(path, json.dumps(self.to_dict()) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> VideoResult:
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot read a video result ({exc})") from None
        return cls.from_dict(data)
