"""The budget file: everything the PackCache policy needs, as versioned, validated JSON.

Schema ``packcache.budget/v1`` (every key is required unless marked optional)::

    {
      "schema": "packcache.budget/v1",
      "model": {"id": str, "num_layers": int, "num_heads": int, "num_kv_heads": int},
      "layout": {"tokens_per_frame": int, "visual_per_frame": int, "height": int, "width": int,
                 "text_tokens": int, "cond_frames": int, ...},          # SequenceLayout.summary()
      "anchors": {"groups": ["text", "cond", "special"]},             # never dropped
      "decay": {"model": "exponential" | "power" | "exponential_floor" | "fixed",
                "global": {"rho": float, ...fit quality...},
                "per_layer": [{"rho": float, ...}, ...] | null,
                "per_kv_head": [[{"rho": float, ...}, ...], ...] | null},   # optional
      "window": int,                                                   # W: history frames kept
      "keep_ratios": [[r_1..r_W] per layer]  or  [[[r_1..r_W] per kv head] per layer],
      "selection": "uniform_grid" | "novelty" | "score",              # in-frame selection rule
      "positions": "preserve" | "rebase",                             # temporal position rule
      "provenance": {"model_id": str, "num_samples": int, "date": str, "packcache_version": str}
    }

``keep_ratios[l][d-1]`` is the fraction of a history frame's visual tokens that layer ``l`` keeps at temporal
distance ``d`` (1 = the most recent finished frame). Ratios lie in [0, 1] and never increase with ``d``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

__all__ = ["Budget", "BudgetError", "SCHEMA", "atomic_write_text"]

SCHEMA = "packcache.budget/v1"
SELECTIONS = ("uniform_grid", "novelty", "score")
POSITION_RULES = ("preserve", "rebase")
DECAY_MODELS = ("exponential", "power", "exponential_floor", "fixed")


class BudgetError(ValueError):
    """A budget file or budget request that cannot be used; the message names the offending field."""


def atomic_write_text(path: str | os.PathLike, text: str | bytes) -> None:
    """Write ``text`` (or raw ``bytes``) to ``path`` through a temporary file in the same directory, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if isinstance(text, bytes) else "w") as fh:
            fh.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _version() -> str:
    from packcache import __version__

    return __version__


@dataclass
class Budget:
    """A validated cache budget; see the module docstring for the JSON schema."""

    model: dict[str, Any]
    layout: dict[str, Any]
    decay: dict[str, Any]
    window: int
    keep_ratios: list
    anchors: dict[str, Any] = field(default_factory=lambda: {"groups": ["text", "cond", "special"]})
    selection: str = "uniform_grid"
    positions: str = "preserve"
    provenance: dict[str, Any] = field(default_factory=dict)
    schema: str = SCHEMA

    def __post_init__(self) -> None:
        self.validate()

    # ----------------------------------------------------------------------------------------------------
    @classmethod
    def paper_default(
        cls,
        num_layers: int,
        num_heads: int,
        num_kv_heads: int | None = None,
        layout: dict[str, Any] | None = None,
        *,
        model_id: str = "unspecified",
        window: int = 4,
        positions: str = "preserve",
    ) -> Budget:
        """The paper's hand-set rule: rho = 1/2, W = 4, ratios 1/2, 1/4, 1/8, 1/8 in every layer."""
        ratios = decay_ratios(0.5, window)
        return cls(
            model={"id": model_id, "num_layers": num_layers, "num_heads": num_heads,
                   "num_kv_heads": num_kv_heads or num_heads},
            layout=dict(layout or {}),
            decay={"model": "fixed", "global": {"rho": 0.5}, "per_layer": None, "per_kv_head": None},
            window=window,
            keep_ratios=[list(ratios) for _ in range(num_layers)],
            positions=positions,
            provenance={"model_id": model_id, "num_samples": 0, "date": _today(), "packcache_version": _version(),
                        "source": "paper_default"},
        )

    @classmethod
    def from_dict(cls, data: Any) -> Budget:
        """Validate a parsed JSON object and build a Budget; raises :class:`BudgetError` naming the field."""
        if not isinstance(data, dict):
            raise BudgetError(f"budget: expected a JSON object, got {type(data).__name__}")
        schema = data.get("schema")
        if schema != SCHEMA:
            raise BudgetError(f"schema: unknown budget schema {schema!r} (this packcache reads {SCHEMA!r})")
        for key in ("model", "layout", "anchors", "decay", "window", "keep_ratios", "selection", "positions",
                    "provenance"):
            if key not in data:
                raise BudgetError(f"{key}: missing field")
        unknown = set(data) - {"schema", "model", "layout", "anchors", "decay", "window", "keep_ratios",
                               "selection", "positions", "provenance"}
        if unknown:
            raise BudgetError(f"{sorted(unknown)[0]}: unknown field")
        return cls(**{k: data[k] for k in data})

    @classmethod
    def load(cls, path: str | os.PathLike, *, num_layers: int | None = None, num_kv_heads: int | None = None
             ) -> Budget:
        """Read and validate a budget file; optionally check it against a model's layer / kv-head counts."""
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise BudgetError(f"{path}: cannot read budget file ({exc.strerror})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BudgetError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
        budget = cls.from_dict(data)
        budget.check_model(num_layers=num_layers, num_kv_heads=num_kv_heads)
        return budget

    def to_dict(self) -> dict[str, Any]:
        return {
            "schema": self.schema,
            "model": self.model,
            "layout": self.layout,
            "anchors": self.anchors,
            "decay": self.decay,
            "window": self.window,
            "keep_ratios": self.keep_ratios,
            "selection": self.selection,
            "positions": self.positions,
            "provenance": self.provenance,
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the budget as JSON, atomically (temporary file, then rename)."""
        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    # ----------------------------------------------------------------------------------------------------
    @property
    def per_kv_head(self) -> bool:
        """Whether keep ratios are given per kv head (``[layer][kv_head][d]``) rather than per layer."""
        return isinstance(self.keep_ratios[0][0], list)

    def ratios(self) -> list[list[list[float]]]:
        """Keep ratios as ``[layer][kv_head][d-1]`` (per-layer ratios broadcast over kv heads)."""
        if self.per_kv_head:
            return self.keep_ratios
        return [[list(r) for _ in range(self.model["num_kv_heads"])] for r in self.keep_ratios]

    def check_model(self, *, num_layers: int | None = None, num_kv_heads: int | None = None) -> None:
        """Raise :class:`BudgetError` if the budget was made for a model of another shape."""
        if num_layers is not None and num_layers != self.model["num_layers"]:
            raise BudgetError(f"model.num_layers: budget is for {self.model['num_layers']} layers, "
                              f"the model has {num_layers}")
        if num_kv_heads is not None and num_kv_heads != self.model["num_kv_heads"]:
            raise BudgetError(f"model.num_kv_heads: budget is for {self.model['num_kv_heads']} kv heads, "
                              f"the model has {num_kv_heads}")

    def check_layout(self, layout) -> None:
        """Raise :class:`BudgetError` if ``layout`` (a SequenceLayout) has another frame shape than the budget."""
        for key in ("height", "width", "tokens_per_frame"):
            if key in self.layout and self.layout[key] != getattr(layout, key):
                raise BudgetError(f"layout.{key}: budget was made for {self.layout[key]}, "
                                  f"the sequence has {getattr(layout, key)}")

    def validate(self) -> None:
        """Check every field; raises :class:`BudgetError` naming the first bad one."""
        if self.schema != SCHEMA:
            raise BudgetError(f"schema: unknown budget schema {self.schema!r} (this packcache reads {SCHEMA!r})")
        _need_dict("model", self.model)
        for key in ("num_layers", "num_heads", "num_kv_heads"):
            _need_int(f"model.{key}", self.model.get(key, _MISSING), minimum=1)
        if not isinstance(self.model.get("id", _MISSING), str):
            raise BudgetError("model.id: missing field or not a string")
        _need_dict("layout", self.layout)
        for key, value in self.layout.items():
            if not isinstance(value, (int, bool, str)) or (isinstance(value, int) and value < 0):
                raise BudgetError(f"layout.{key}: expected a non-negative integer, a bool or a string, got {value!r}")
        _need_dict("anchors", self.anchors)
        groups = self.anchors.get("groups", _MISSING)
        if not isinstance(groups, list) or not {"text", "cond"} <= set(groups):
            raise BudgetError("anchors.groups: must be a list that includes 'text' and 'cond'")
        _need_dict("decay", self.decay)
        if self.decay.get("model") not in DECAY_MODELS:
            raise BudgetError(f"decay.model: expected one of {DECAY_MODELS}, got {self.decay.get('model')!r}")
        _need_dict("decay.global", self.decay.get("global", _MISSING))
        _need_number("decay.global.rho", self.decay["global"].get("rho", _MISSING), 0.0, 1.0)
        per_layer = self.decay.get("per_layer")
        if per_layer is not None:
            if not isinstance(per_layer, list) or len(per_layer) != self.model["num_layers"]:
                raise BudgetError(f"decay.per_layer: expected a list of {self.model['num_layers']} fits")
            for i, fit in enumerate(per_layer):
                _need_dict(f"decay.per_layer[{i}]", fit)
                _need_number(f"decay.per_layer[{i}].rho", fit.get("rho", _MISSING), 0.0, 1.0)
        _need_int("window", self.window, minimum=1)
        self._validate_ratios()
        if self.selection not in SELECTIONS:
            raise BudgetError(f"selection: expected one of {SELECTIONS}, got {self.selection!r}")
        if self.positions not in POSITION_RULES:
            raise BudgetError(f"positions: expected one of {POSITION_RULES}, got {self.positions!r}")
        _need_dict("provenance", self.provenance)

    def _validate_ratios(self) -> None:
        n_layers, n_kv = self.model["num_layers"], self.model["num_kv_heads"]
        if not isinstance(self.keep_ratios, list) or len(self.keep_ratios) != n_layers:
            got = len(self.keep_ratios) if isinstance(self.keep_ratios, list) else type(self.keep_ratios).__name__
            raise BudgetError(f"keep_ratios: expected one entry per layer ({n_layers}), got {got}")
        if not isinstance(self.keep_ratios[0], list) or not self.keep_ratios[0]:
            raise BudgetError("keep_ratios[0]: expected a list of ratios (or of per-kv-head lists)")
        nested = isinstance(self.keep_ratios[0][0], list)
        for li, layer in enumerate(self.keep_ratios):
            rows = layer if nested else [layer]
            if nested and (not isinstance(layer, list) or len(layer) != n_kv):
                raise BudgetError(f"keep_ratios[{li}]: expected one list per kv head ({n_kv})")
            for hi, row in enumerate(rows):
                name = f"keep_ratios[{li}][{hi}]" if nested else f"keep_ratios[{li}]"
                if not isinstance(row, list) or len(row) != self.window:
                    raise BudgetError(f"{name}: expected {self.window} ratios (one per distance up to the window)")
                for di, r in enumerate(row):
                    _need_number(f"{name}[{di}]", r, 0.0, 1.0)
                if any(b > a + 1e-12 for a, b in zip(row, row[1:])):
                    raise BudgetError(f"{name}: ratios must not increase with temporal distance, got {row}")


_MISSING = object()


def _need_dict(name: str, value: Any) -> None:
    if value is _MISSING:
        raise BudgetError(f"{name}: missing field")
    if not isinstance(value, dict):
        raise BudgetError(f"{name}: expected an object, got {type(value).__name__}")


def _need_int(name: str, value: Any, *, minimum: int) -> None:
    if value is _MISSING:
        raise BudgetError(f"{name}: missing field")
    if isinstance(value, bool) or not isinstance(value, int):
        raise BudgetError(f"{name}: expected an integer, got {type(value).__name__}")
    if value < minimum:
        raise BudgetError(f"{name}: must be >= {minimum}, got {value}")


def _need_number(name: str, value: Any, lo: float, hi: float) -> None:
    if value is _MISSING:
        raise BudgetError(f"{name}: missing field")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise BudgetError(f"{name}: expected a number, got {value!r}")
    if not lo <= value <= hi:
        raise BudgetError(f"{name}: must lie in [{lo:g}, {hi:g}], got {value}")


def decay_ratios(rho: float, window: int) -> list[float]:
    """The paper's per-distance shares for decay ``rho``: rho^d for d < W, the geometric tail folded into d = W.

    For rho = 1/2 and W = 4 this is [1/2, 1/4, 1/8, 1/8]; the shares sum to 1 (one frame of history).
    """
    shares = [(1 - rho) * rho ** (d - 1) for d in range(1, window)]
    shares.append(rho ** (window - 1))
    return shares


def _today() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d")
