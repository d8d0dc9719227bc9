"""A minimal progress bar on stderr (no dependency): ``for x in progress(items, "label"): ...``."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

__all__ = ["ProgressBar", "progress"]

T = TypeVar("T")


class ProgressBar:
    """``bar = ProgressBar(total, label); bar.update(n, note); bar.close()``; redraws at most every 0.2 s."""

    def __init__(self, total: int, label: str = "", *, enabled: bool = True, width: int = 30) -> None:
        self.total, self.label, self.enabled, self.width = max(total, 1), label, enabled, width
        self.done, self.note = 0, ""
        self.start = self._last = time.perf_counter()

    def update(self, n: int = 1, note: str | None = None) -> None:
        self.done += n
        if note is not None:
            self.note = note
        now = time.perf_counter()
        if self.enabled and (now - self._last >= 0.2 or self.done >= self.total):
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        frac = min(self.done / self.total, 1.0)
        elapsed = now - self.start
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        bar = "#" * int(frac * self.width) + "-" * (self.width - int(frac * self.width))
        sys.stderr.write(f"\r{self.label} [{bar}] {self.done}/{self.total} {elapsed:6.0f}s eta {eta:5.0f}s "
                         f"{self.note}\033[K")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.perf_counter())
            sys.stderr.write("\n")
            sys.stderr.flush()


def progress(items: Iterable[T], label: str = "", *, total: int | None = None, enabled: bool = True) -> Iterator[T]:
    """Iterate ``items`` while drawing a :class:`ProgressBar`."""
    if total is None:
        total = len(items) if hasattr(items, "__len__") else 0  # type: ignore[arg-type]
    bar = ProgressBar(total, label, enabled=enabled)
    try:
        for item in items:
            yield item
            bar.update()
    finally:
        bar.close()
