"""What the dashboard shows, loaded from files: statistics, their decay fits, a budget, and recorded runs.

Everything that needs computing (decay fits through :mod:`packcache.fit`, keep maps through the real
:class:`~packcache.policies.PackCache` policy) happens here, once, at load time; :mod:`dashboard.figures` only
turns these objects into plotly figures and :mod:`dashboard.app` only wires controls to them.

The embedded defaults (used when no path is given) are one table, :data:`DEFAULTS`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from packcache.budget import Budget, BudgetError
from packcache.layout import LayoutError, SequenceLayout
from packcache.records import VIDEO_SCHEMA, VideoResult
from probes.stats import AttentionStats, StatsError

__all__ = ["DATA_DIR", "DEFAULTS", "SourceError", "RunCurves", "KeepMaps", "Sources", "load_stats", "load_budget",
           "load_runs", "runs_from_file", "run_curves", "frame_agreement", "reference_for", "run_summary",
           "quality_rows", "frame_ranges", "load_quality_tables", "load_time_profiles", "keep_maps",
           "layout_from_summary", "load_sources", "default_paths"]

#: The repository's ``data/`` directory (the embedded demo artefacts).
DATA_DIR = Path(__file__).resolve().parents[1] / "data"

#: Embedded defaults, relative to ``data/``: for stats, budget and model the first existing candidate wins; every
#: existing run location is read (directories: all ``*.json`` holding runs or benchmark curves).
DEFAULTS: dict[str, tuple[str, ...]] = {
    "stats": ("demo-profile/stats.npz",),
    "budget": ("demo-profile/budget.json",),
    "runs": ("runs", "samples", "bench", "bench.json", "bench-fidelity.json", "bench-long-clips.json",
             "bench-profile.json", "demo-policy-table.json", "demo-profile/fidelity.json"),
    "model": ("demo-model",),
}


class SourceError(ValueError):
    """A dashboard input that is missing or malformed; the message is one line naming the file."""


def default_paths(data_dir: Path = DATA_DIR) -> dict[str, Any]:
    """The default inputs under ``data_dir``: a path (or ``None``) for stats, budget and model, a list for runs."""
    out: dict[str, Any] = {}
    for key, candidates in DEFAULTS.items():
        found = [data_dir / c for c in candidates if (data_dir / c).exists()]
        out[key] = found if key == "runs" else (found[0] if found else None)
    return out


# --------------------------------------------------------------------------------------------------------
# statistics and budget
def load_stats(path: str | os.PathLike) -> AttentionStats:
    """Read a ``packcache.stats/v1`` file; :class:`SourceError` with one line when missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: statistics file not found (write one with: packcache-profile --stats-out {path})")
    try:
        return AttentionStats.load(path)
    except (StatsError, LayoutError, KeyError, TypeError, ValueError) as exc:
        raise SourceError(_one_line(f"{path}: {exc}" if str(path) not in str(exc) else str(exc))) from None


def load_budget(path: str | os.PathLike) -> Budget:
    """Read and validate a ``packcache.budget/v1`` file; :class:`SourceError` when missing or malformed."""
    path = Path(path)
    if not path.is_file():
        raise SourceError(f"{path}: budget file not found (write one with: packcache-profile -o {path})")
    try:
        return Budget.load(path)
    except (BudgetError, TypeError) as exc:
        msg = str(exc)
        raise SourceError(_one_line(msg if str(path) in msg else f"{path}: {msg}")) from None


def layout_from_summary(summary: dict[str, Any], num_frames: int) -> SequenceLayout:
    """Rebuild a :class:`SequenceLayout` with ``num_frames`` frames from ``SequenceLayout.summary()`` fields."""
    keys = ("text_tokens", "cond_frames", "height", "width", "row_separator", "frame_prefix", "frame_suffix",
            "prefix_specials", "convention", "cond_time_gap")
    missing = [k for k in ("height", "width") if k not in summary]
    if missing:
        raise SourceError(f"layout summary lacks {missing[0]}")
    fields = {k: summary[k] for k in keys if k in summary}
    try:
        return SequenceLayout(num_frames=num_frames, **fields)
    except (LayoutError, TypeError) as exc:
        raise SourceError(f"layout summary does not describe a layout: {exc}") from None


# --------------------------------------------------------------------------------------------------------
# keep maps (the real PackCache policy on a layout)
@dataclass(frozen=True)
class KeepMaps:
    """Which grid cells of a history frame survive packing: ``keep [layers, kv_heads, W, height, width]`` bool.

    ``keep[l, k, d-1]`` is the frame at temporal distance ``d`` just before a new frame is generated, once the
    cache is in the Pack/Slide stage. ``budget_tokens`` is the packed cache size per layer and head. ``selection``
    is the budget's in-frame rule; for ``"novelty"`` the maps are those of a video in which nothing changed (its
    sub-grid fallback order), since a live run keeps whatever differs from the condition frame first.
    """

    keep: np.ndarray
    budget_tokens: int
    visual_per_frame: int
    selection: str = "uniform_grid"

    @property
    def window(self) -> int:
        return int(self.keep.shape[2])


def keep_maps(budget: Budget, layout: SequenceLayout | None = None, *, chunk_layers: int = 4) -> KeepMaps:
    """Run :class:`~packcache.policies.PackCache` on a full cache of ``W + 1`` generated frames and record
    which cells of each history frame it keeps, per layer and kv head.

    ``layout`` (any number of frames; only its frame shape is used) defaults to the budget's layout summary.
    When every layer and kv head keeps the same number of tokens (so the policy's equal-slot top-up is a no-op),
    layers are evaluated ``chunk_layers`` at a time to bound memory on long layouts.
    """
    from packcache.policies.packcache import PackCache

    window = budget.window
    summary = budget.layout if layout is None else layout.summary()
    probe_layout = layout_from_summary(summary, 1)
    probe_layout = probe_layout.with_frames(probe_layout.cond_frames + window + 2)
    policy = PackCache(budget)
    n_layers = budget.model["num_layers"]
    totals = policy.keep_counts(probe_layout).sum(-1)
    if chunk_layers < 1 or n_layers <= chunk_layers or bool((totals != totals.flatten()[0]).any()):
        out = _keep_cells(policy, probe_layout)
    else:
        parts = []
        for start in range(0, n_layers, chunk_layers):
            ratios = budget.keep_ratios[start:start + chunk_layers]
            part = Budget(model={**budget.model, "num_layers": len(ratios)}, layout=budget.layout,
                          decay={"model": "fixed", "global": dict(budget.decay["global"]), "per_layer": None,
                                 "per_kv_head": None},
                          window=window, keep_ratios=ratios, anchors=budget.anchors, selection=budget.selection,
                          positions=budget.positions, provenance=budget.provenance)
            parts.append(_keep_cells(PackCache(part), probe_layout))
        out = np.concatenate(parts)
    return KeepMaps(out, int(policy.budget_tokens(probe_layout) or 0), probe_layout.visual_per_frame,
                    budget.selection)


def _keep_cells(policy: Any, layout: SequenceLayout) -> np.ndarray:
    """``[layers, kv_heads, W, height, width]``: the cells ``policy`` keeps of each history frame just before the
    last frame of ``layout`` is generated (every earlier token cached)."""
    import torch

    from packcache.policies.base import SlotView

    n_layers, n_kv, window = policy.keep_counts(layout).shape
    next_frame = layout.num_frames - 1
    cached = layout.frame_slice(next_frame).start
    tokens = torch.arange(cached).expand(n_layers, n_kv, cached)
    static_video = torch.zeros(1, layout.num_tokens, dtype=torch.long)  # no token differs from the condition
    idx = policy.keep(SlotView(tokens, layout, ids=static_video), next_frame)
    kept = np.zeros((n_layers, n_kv, cached), dtype=bool)
    if idx is None:
        kept[:] = True
    else:
        np.put_along_axis(kept, idx.numpy(), True, axis=-1)
    out = np.zeros((n_layers, n_kv, window, layout.height, layout.width), dtype=bool)
    for d in range(1, window + 1):
        sl = layout.frame_slice(next_frame - d)
        grid = np.flatnonzero(layout.row[sl] >= 0) + sl.start
        out[:, :, d - 1, layout.row[grid], layout.col[grid]] = kept[:, :, grid]
    return out


# --------------------------------------------------------------------------------------------------------
# recorded runs
@dataclass(frozen=True)
class RunCurves:
    """One recorded generation run reduced to what the runtime view plots (per generated frame).

    ``seconds`` is the wall time per frame, ``cache_tokens`` the largest per-layer cache size its forwards saw,
    ``kv_bytes`` the KV memory. ``video`` keeps the frames (for the frames view) when the source had them.
    """

    name: str
    policy: str
    frame: np.ndarray
    seconds: np.ndarray
    cache_tokens: np.ndarray
    kv_bytes: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)
    video: VideoResult | None = None

    @property
    def is_full(self) -> bool:
        return self.policy.startswith("FullCache")


def run_curves(video: VideoResult, name: str) -> RunCurves:
    """Per-frame curves of a :class:`VideoResult`."""
    recs = video.records
    return RunCurves(name=name, policy=str(video.meta.get("policy", "?")),
                     frame=np.array([r.frame for r in recs], dtype=np.int64),
                     seconds=np.array([r.seconds for r in recs], dtype=float),
                     cache_tokens=np.array([max(r.cache_tokens) if r.cache_tokens else 0 for r in recs],
                                           dtype=np.int64),
                     kv_bytes=np.array([r.kv_bytes for r in recs], dtype=np.int64), meta=dict(video.meta),
                     video=video)


def runs_from_file(path: str | os.PathLike, *, strict: bool = True) -> list[RunCurves]:
    """The runs in one JSON file: a ``packcache.video/v1`` result, or a benchmark file holding such results.

    A readable JSON file that holds no run is an error with ``strict``, else skipped (``[]``).
    """
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise SourceError(f"{path}: cannot read run file ({exc.strerror})") from None
    except json.JSONDecodeError as exc:
        raise SourceError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    schema = data.get("schema") if isinstance(data, dict) else None
    if schema == VIDEO_SCHEMA:
        try:
            return [run_curves(VideoResult.from_dict(data), path.stem)]
        except (ValueError, TypeError) as exc:
            raise SourceError(_one_line(f"{path}: {exc}")) from None
    runs = _bench_runs(data, path)
    if runs is None:
        if not strict or _quality_table(data) is not None or _profile_section(data) is not None:
            return []
        raise SourceError(f"{path}: not a run file (schema {schema!r}; expected {VIDEO_SCHEMA!r} or a benchmark)")
    return runs


def _bench_runs(data: Any, path: Path) -> list[RunCurves] | None:
    """Runs inside a benchmark file (``None`` if there are none).

    Reads the per-policy curves of a ``packcache.bench/v1`` file (``<section>.policies.<name>`` with
    ``per_frame_s``, ``cache_tokens``, ``kv_bytes``) and any embedded ``packcache.video/v1`` objects.
    """
    found: list[RunCurves] = []
    if not isinstance(data, dict):
        return None
    if str(data.get("schema", "")).startswith("packcache.bench/"):
        for section, body in data.items():
            policies = body.get("policies") if isinstance(body, dict) else None
            if not isinstance(policies, dict):
                continue
            for name, curves in policies.items():
                try:
                    seconds = np.asarray(curves["per_frame_s"], dtype=float)
                    tokens = np.asarray(curves["cache_tokens"], dtype=np.int64)
                    kv = np.asarray(curves["kv_bytes"], dtype=np.int64)
                except (KeyError, TypeError, ValueError):
                    continue
                if not (len(seconds) == len(tokens) == len(kv)):
                    continue
                found.append(RunCurves(name=f"{path.stem}:{section}:{name}", policy=str(name),
                                       frame=np.arange(len(seconds)), seconds=seconds, cache_tokens=tokens,
                                       kv_bytes=kv, meta={"source": str(path), "section": section}))

    def walk(obj: Any, trail: str) -> None:
        if isinstance(obj, dict):
            if obj.get("schema") == VIDEO_SCHEMA:
                try:
                    video = VideoResult.from_dict(obj)
                except (ValueError, TypeError):
                    return
                found.append(run_curves(video, f"{path.stem}:{trail or video.meta.get('policy', '?')}"))
                return
            for key, value in obj.items():
                walk(value, f"{trail}/{key}" if trail else str(key))
        elif isinstance(obj, list):
            for i, value in enumerate(obj):
                walk(value, f"{trail}[{i}]")

    walk(data, "")
    return found or None


POLICY_TABLE_SCHEMA = "packcache.policy_table/v1"


def _quality_table(data: Any) -> dict[str, Any] | None:
    """The fidelity table in a parsed JSON object (rows as a list, each with its ``policy``): a
    ``packcache.policy_table/v1`` object (:func:`packcache.metrics.policy_table`), a schema-less table whose
    ``rows`` map policy -> results, or either under a benchmark's ``fidelity`` key; ``None`` otherwise."""
    if not isinstance(data, dict):
        return None
    schema = str(data.get("schema", ""))
    if schema.startswith("packcache.bench/"):
        return _quality_table(data.get("fidelity"))
    if schema not in ("", POLICY_TABLE_SCHEMA):
        return None
    rows = data.get("rows")
    if isinstance(rows, dict):  # {policy: {...}} -> [{"policy": policy, ...}]
        rows = [{"policy": name, **row} for name, row in rows.items() if isinstance(row, dict)]
    if not isinstance(rows, list) or not rows:
        return None
    if not all(isinstance(r, dict) and ("teacher_forced" in r or "generated" in r) for r in rows):
        return None
    return {**data, "rows": rows}


def _found_in_files(paths: Iterable[str | os.PathLike], extract: Callable[[Any], Any]) -> list[tuple[str, Any]]:
    """(file stem, ``extract(data)``) for every JSON file in ``paths`` (files, or directories of ``*.json``) where
    it is not ``None``; unreadable files are skipped here (:func:`load_runs` reports them)."""
    found = []
    for p in paths:
        p = Path(p)
        for f in sorted(p.glob("*.json")) if p.is_dir() else [p] if p.is_file() else []:
            try:
                item = extract(json.loads(f.read_text()))
            except (OSError, json.JSONDecodeError):
                continue
            if item is not None:
                found.append((f.stem, item))
    return found


def load_quality_tables(paths: Iterable[str | os.PathLike]) -> list[tuple[str, dict[str, Any]]]:
    """Fidelity tables (name, table) found in run files and directories."""
    return _found_in_files(paths, _quality_table)


def _profile_section(data: Any) -> dict[str, Any] | None:
    """A benchmark's ``profile`` section (policies carrying ``seconds_by_kind``), or ``None``."""
    section = data.get("profile") if isinstance(data, dict) else None
    policies = section.get("policies") if isinstance(section, dict) else None
    if isinstance(policies, dict) and policies and all(
            isinstance(v, dict) and isinstance(v.get("seconds_by_kind"), dict) for v in policies.values()):
        return section
    return None


def load_time_profiles(paths: Iterable[str | os.PathLike]) -> list[tuple[str, dict[str, Any]]]:
    """The ``profile`` sections (``packcache-bench --sections profile``) found in benchmark files and directories,
    as (file stem, section) pairs."""
    return _found_in_files(paths, _profile_section)


def quality_rows(table: dict[str, Any], frame_range: str = "all") -> list[dict[str, Any]]:
    """Rows of a fidelity table for one frame range: policy, cache tokens, teacher-forced and generated accuracy
    (overall and on changed cells) and agreement with the full cache. Missing entries are ``None``."""
    rows = []
    for r in table.get("rows", []):
        if not isinstance(r, dict):
            continue
        tf = (r.get("teacher_forced") or {}).get(frame_range) or {}
        gen = (r.get("generated") or {}).get(frame_range) or {}
        rows.append({"policy": str(r.get("policy", "?")),
                     "cache_tokens": r.get("cache_tokens_last_frame", r.get("budget_tokens")),
                     "tf_acc": tf.get("acc"), "tf_changed": tf.get("changed_acc"), "tf_nll": tf.get("nll"),
                     "gen_agreement": gen.get("agreement_with_full"), "gen_acc": gen.get("acc"),
                     "gen_changed": gen.get("changed_acc")})
    return rows


def frame_ranges(table: dict[str, Any]) -> list[str]:
    """The frame ranges a fidelity table reports (e.g. ``all``, ``1-6``, ``7-12``)."""
    for r in table.get("rows", []):
        if isinstance(r, dict) and isinstance(r.get("teacher_forced") or r.get("generated"), dict):
            return list((r.get("teacher_forced") or r.get("generated")).keys())
    return []


def frame_agreement(candidate: VideoResult, reference: VideoResult) -> list[float] | None:
    """Per-frame token agreement of ``candidate`` with ``reference`` (:func:`packcache.metrics.token_agreement`);
    ``None`` when the videos differ in shape."""
    from packcache.metrics import token_agreement

    a, b = np.asarray(candidate.frames), np.asarray(reference.frames)
    if a.shape != b.shape:
        return None
    return [token_agreement(a[k:k + 1], b[k:k + 1], start=0) for k in range(a.shape[0])]


def reference_for(run: RunCurves, runs: Sequence[RunCurves]) -> RunCurves | None:
    """The full-cache run to compare ``run`` with: same prompt, condition frame and length for recorded videos,
    the same benchmark section (same name) for benchmark curves; ``None`` if there is none."""
    if run.video is None:
        where = (run.meta.get("source"), run.meta.get("section"))
        return next((o for o in runs if o is not run and o.is_full and o.video is None
                     and len(o.frame) == len(run.frame) and (o.meta.get("source"), o.meta.get("section")) == where),
                    None)
    for other in runs:
        if other is run or other.video is None or not other.is_full:
            continue
        a, b = np.asarray(run.video.frames), np.asarray(other.video.frames)
        if a.shape == b.shape and np.array_equal(a[0], b[0]) and \
                run.meta.get("prompt") == other.meta.get("prompt"):
            return other
    return None


def load_runs(paths: Iterable[str | os.PathLike]) -> list[RunCurves]:
    """Runs from files and directories (every ``*.json`` inside, sorted); :class:`SourceError` on a bad file."""
    runs: list[RunCurves] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            for f in sorted(p.glob("*.json")):
                runs.extend(runs_from_file(f, strict=False))
        elif p.is_file():
            runs.extend(runs_from_file(p))
        else:
            raise SourceError(f"{p}: run file or directory not found")
    seen: dict[str, int] = {}
    unique = []
    for r in runs:  # names are identifiers in the page: keep them unique
        n = seen.get(r.name, 0)
        seen[r.name] = n + 1
        unique.append(r if n == 0 else RunCurves(**{**r.__dict__, "name": f"{r.name}#{n + 1}"}))
    return unique


def run_summary(runs: Sequence[RunCurves]) -> list[dict[str, Any]]:
    """One row per run: time, last-4-frame latency, peak cache, and, against its full-cache reference (see
    :func:`reference_for`), the end-to-end speedup, the KV memory ratio and the token agreement of the frames."""
    rows = []
    for run in runs:
        ref = reference_for(run, runs)
        row: dict[str, Any] = {
            "run": run.name, "policy": run.policy, "frames": int(len(run.frame)),
            "total_s": float(run.seconds.sum()), "last4_ms": float(run.seconds[-4:].mean() * 1000),
            "peak_tokens": int(run.cache_tokens.max()) if len(run.cache_tokens) else 0,
            "peak_kv_mib": float(run.kv_bytes.max() / 2**20) if len(run.kv_bytes) else 0.0,
            "speedup": None, "memory_ratio": None, "agreement": None}
        if ref is not None and not run.is_full:
            row["speedup"] = float(ref.seconds.sum() / max(run.seconds.sum(), 1e-12))
            row["memory_ratio"] = float(ref.kv_bytes.max() / max(run.kv_bytes.max(), 1))
            if run.video is not None and ref.video is not None:
                agree = frame_agreement(run.video, ref.video)
                if agree is not None and len(agree) > 1:
                    row["agreement"] = float(np.mean(agree[1:]))
        rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------------
# everything together
@dataclass
class Sources:
    """The loaded inputs; any of them may be missing, with the reason in ``errors[key]`` (shown in the page)."""

    stats: AttentionStats | None = None
    fits: Any = None  # packcache.fit.FitReport
    budget: Budget | None = None
    keep: KeepMaps | None = None
    runs: list[RunCurves] = field(default_factory=list)
    quality: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    profiles: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    paths: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    model_dir: Path | None = None

    def add_run(self, run: RunCurves) -> None:
        names = {r.name for r in self.runs}
        name, i = run.name, 2
        while name in names:
            name, i = f"{run.name}#{i}", i + 1
        self.runs.append(run if name == run.name else RunCurves(**{**run.__dict__, "name": name}))


def load_sources(stats: str | os.PathLike | None = None, budget: str | os.PathLike | None = None,
                 runs: Sequence[str | os.PathLike] | None = None, *, model: str | os.PathLike | None = None,
                 quality: Sequence[str | os.PathLike] | None = None, strict: bool = False,
                 data_dir: Path = DATA_DIR) -> Sources:
    """Load every input (defaults from :data:`DEFAULTS` for those not given), fit the decay, build keep maps.

    Fidelity tables come from the run locations plus ``quality`` (files). With ``strict``, a path that was given
    explicitly and cannot be read raises :class:`SourceError` (the CLI turns it into one line and exit code 2);
    otherwise the reason goes to ``Sources.errors``.
    """
    defaults = default_paths(data_dir)
    src = Sources()
    explicit = {"stats": stats is not None, "budget": budget is not None, "runs": bool(runs),
                "model": model is not None}
    chosen = {"stats": stats if stats is not None else defaults["stats"],
              "budget": budget if budget is not None else defaults["budget"],
              "runs": list(runs) if runs else defaults["runs"],
              "model": model if model is not None else defaults["model"]}
    src.paths = {k: (str(v) if not isinstance(v, list) else [str(x) for x in v]) if v else None
                 for k, v in chosen.items()}

    def attempt(key: str, fn):
        try:
            return fn()
        except SourceError as exc:
            if strict and explicit[key]:
                raise
            src.errors[key] = str(exc)
            return None

    if chosen["stats"] is not None:
        src.stats = attempt("stats", lambda: load_stats(chosen["stats"]))
    else:
        src.errors["stats"] = ("no statistics given and no embedded profile in data/ "
                               "(make one with: packcache-profile --stats-out data/demo-profile/stats.npz)")
    if src.stats is not None:
        src.fits = attempt("stats", lambda: _fit(src.stats))
    if chosen["budget"] is not None:
        src.budget = attempt("budget", lambda: load_budget(chosen["budget"]))
    else:
        src.errors["budget"] = ("no budget given and no embedded budget in data/ "
                                "(make one with: packcache-profile -o data/demo-profile/budget.json)")
    if src.budget is not None:
        src.keep = attempt("budget", lambda: _keep(src.budget, src.stats))
    src.runs = attempt("runs", lambda: load_runs(chosen["runs"])) or []
    for q in quality or []:
        if strict and not Path(q).is_file():
            raise SourceError(f"{q}: fidelity table not found")
        tables = load_quality_tables([q])
        if strict and not tables:
            raise SourceError(f"{q}: not a fidelity table (expected {POLICY_TABLE_SCHEMA!r})")
    src.quality = load_quality_tables([*chosen["runs"], *(quality or [])])
    src.profiles = load_time_profiles(chosen["runs"])
    if not src.runs and "runs" not in src.errors:
        src.errors["runs"] = "no recorded runs yet: start one with the run control above"
    if chosen["model"] is not None:
        src.model_dir = Path(chosen["model"])
        if strict and explicit["model"] and not (src.model_dir / "config.json").is_file():
            raise SourceError(f"{src.model_dir}: no demo checkpoint (config.json) there")
    return src


def _fit(stats: AttentionStats):
    from packcache.fit import fit_stats

    try:
        return fit_stats(stats)
    except (BudgetError, ValueError) as exc:
        raise SourceError(_one_line(f"decay fit: {exc}")) from None


def _keep(budget: Budget, stats: AttentionStats | None) -> KeepMaps:
    layout = None
    if stats is not None:
        try:
            budget.check_layout(stats.layout)
            layout = stats.layout
        except BudgetError:
            layout = None
    try:
        return keep_maps(budget, layout)
    except (BudgetError, LayoutError) as exc:
        raise SourceError(_one_line(f"keep map: {exc}")) from None


def _one_line(msg: str) -> str:
    return " ".join(str(msg).split())
