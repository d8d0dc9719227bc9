"""Pure figure functions: result objects in, plotly figures out (explainerdashboard-style).

Every function takes already-loaded objects -- :class:`probes.AttentionStats`, :class:`packcache.fit.FitReport`,
:class:`packcache.budget.Budget`, :class:`dashboard.sources.KeepMaps`, :class:`dashboard.sources.RunCurves`,
:class:`packcache.records.VideoResult` -- and returns a :class:`plotly.graph_objects.Figure`. They never read
files or fit anything, so they work the same from Python, in tests and behind the Dash controls.

Payloads stay small whatever the sequence length: the statistics are already aggregated per layer, head, frame
and key group; spatial maps and keep maps are block-averaged down to at most ``max_side`` cells a side, and
arrays go out as float32.
"""

from __future__ import annotations

import textwrap
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from packcache.budget import Budget
from probes.stats import FIRST_DISTANCE, AttentionStats

if TYPE_CHECKING:
    from dashboard.sources import KeepMaps, RunCurves
    from packcache.fit import FitReport
    from packcache.records import VideoResult

__all__ = [
    "ANCHOR_GROUPS",
    "METRICS",
    "group_choices",
    "group_mass",
    "attention_by_group_figure",
    "step_evolution_figure",
    "decay_figure",
    "rho_figure",
    "spatial_figure",
    "keep_ratio_figure",
    "keep_map_figure",
    "runtime_figure",
    "time_by_kind_figure",
    "run_table_figure",
    "quality_table_figure",
    "frames_figure",
    "message_figure",
    "policy_colour",
    "downsample",
]

#: Aggregate key groups offered by the attention view (per-distance groups ``d1..`` and ``older`` follow).
ANCHOR_GROUPS = ("text", "cond", "special", "current", "history")
#: Runtime metrics: key -> (axis title, scale applied to the values).
METRICS: dict[str, tuple[str, float]] = {
    "seconds": ("latency per frame (ms)", 1000.0),
    "cache_tokens": ("KV cache (tokens per layer)", 1.0),
    "kv_bytes": ("KV cache (KiB, all layers)", 1.0 / 1024),
}
_POLICY_COLOURS = {"FullCache": "#444444", "PackCache": "#1f77b4", "SlidingWindow": "#ff7f0e",
                   "StreamingLLM": "#2ca02c"}
_TEMPLATE = "plotly_white"
_MARGIN = dict(l=60, r=20, t=60, b=50)


# --------------------------------------------------------------------------------------------------------
# helpers
def message_figure(text: str, title: str = "") -> go.Figure:
    """An empty figure carrying a message (missing inputs, nothing recorded yet)."""
    fig = go.Figure()
    text = "<br>".join(textwrap.wrap(text, 70)) or " "
    fig.add_annotation(text=text, x=0.5, y=0.5, xref="paper", yref="paper", showarrow=False,
                       font=dict(size=14, color="#a33"))
    fig.update_layout(title=title, template=_TEMPLATE, xaxis=dict(visible=False), yaxis=dict(visible=False),
                      height=300, margin=_MARGIN)
    return fig


def policy_colour(policy: str) -> str:
    """Fixed colour of a policy family (``"PackCache(fitted)"`` -> PackCache's colour)."""
    for family, colour in _POLICY_COLOURS.items():
        if policy.startswith(family):
            return colour
    return "#9467bd"


def downsample(grid: np.ndarray, max_side: int) -> np.ndarray:
    """Block-average the last two axes so that neither exceeds ``max_side`` (NaN-free input)."""
    h, w = grid.shape[-2:]
    fh, fw = -(-h // max_side), -(-w // max_side)
    if fh == 1 and fw == 1:
        return grid
    ph, pw = -(-h // fh) * fh, -(-w // fw) * fw
    pad = [(0, 0)] * (grid.ndim - 2) + [(0, ph - h), (0, pw - w)]
    g = np.pad(grid.astype(float), pad, constant_values=np.nan)
    g = g.reshape(*grid.shape[:-2], ph // fh, fh, pw // fw, fw)
    return np.nanmean(g, axis=(-3, -1))


def _f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


def _scope(layer: int | None, head: int | None) -> str:
    if layer is None:
        return "all layers and heads"
    return f"layer {layer}" + (", all heads" if head is None else f", head {head}")


def _select(a: np.ndarray, layer: int | None, head: int | None) -> np.ndarray:
    """Mean over layers and heads of ``a [L, H, ...]``, or the selected layer (and head)."""
    if layer is None:
        return a.mean(axis=(0, 1))
    if head is None:
        return a[layer].mean(axis=0)
    return a[layer, head]


# --------------------------------------------------------------------------------------------------------
# 1. attention by group
def group_choices(stats: AttentionStats) -> list[str]:
    """Groups the attention view offers: anchors, current, all history, then ``d1 .. d{D-1}``, ``older``."""
    return [*ANCHOR_GROUPS, *[f"d{d}" for d in range(1, stats.max_distance)], "older"]


def group_mass(stats: AttentionStats, group: str, step: int | None = None) -> np.ndarray:
    """Mean attention mass per query token on ``group``, ``[layers, heads]``; all steps or one decoding step."""
    if step is None:
        per_group = stats.mass.sum(2) / max(int(stats.queries.sum()), 1)
    else:
        if not 0 <= step < stats.num_steps:
            raise ValueError(f"step {step} outside [0, {stats.num_steps})")
        n = int(stats.step_queries[step])
        per_group = stats.step_mass[:, :, step] / n if n else np.full(stats.step_mass[:, :, step].shape, np.nan)
    if group == "current":
        return per_group[..., FIRST_DISTANCE]
    if group == "history":
        return per_group[..., FIRST_DISTANCE + 1:].sum(-1)
    return per_group[..., stats.group_index(group)]


def attention_by_group_figure(stats: AttentionStats, group: str = "history", step: int | None = None) -> go.Figure:
    """Layer x head heatmap of the mean attention mass on one key group (view 1)."""
    z = group_mass(stats, group, step)
    n_l, n_h = z.shape
    annotate = n_l * n_h <= 256
    fig = go.Figure(go.Heatmap(
        z=_f32(z), x=[f"h{h}" for h in range(n_h)], y=[f"L{layer}" for layer in range(n_l)], colorscale="Viridis",
        zmin=0.0, colorbar=dict(title="mass"), texttemplate="%{z:.2f}" if annotate else None,
        hovertemplate="layer %{y}, head %{x}<br>mass %{z:.3f}<extra></extra>"))
    when = "all decoding steps" if step is None else f"decoding step {step}"
    fig.update_layout(title=f"Attention on <b>{group}</b> per layer and head ({when})", template=_TEMPLATE,
                      xaxis_title="head", yaxis_title="layer", yaxis_autorange="reversed", height=360,
                      margin=_MARGIN)
    return fig


def step_evolution_figure(stats: AttentionStats, layer: int | None = None, head: int | None = None) -> go.Figure:
    """Share of attention on text, condition, specials, current frame and history per decoding step."""
    n = stats.step_queries.astype(float)
    with np.errstate(invalid="ignore", divide="ignore"):
        per = stats.step_mass / np.where(n > 0, n, np.nan)[None, None, :, None]  # [L, H, S, G]
    sel = _select(per, layer, head)  # [S, G]
    series = {"text": sel[:, 0], "cond": sel[:, 1], "special": sel[:, 2], "current": sel[:, FIRST_DISTANCE],
              "history": sel[:, FIRST_DISTANCE + 1:].sum(-1)}
    steps = np.arange(stats.num_steps)
    fig = go.Figure()
    for name, y in series.items():
        fig.add_trace(go.Scatter(x=steps, y=_f32(y), mode="lines+markers", name=name))
    fig.update_layout(title=f"Attention by decoding step ({_scope(layer, head)})", template=_TEMPLATE,
                      xaxis_title="decoding step within a frame", yaxis_title="mass per query token",
                      yaxis_rangemode="tozero", height=360, margin=_MARGIN)
    fig.update_xaxes(dtick=1)
    return fig


# --------------------------------------------------------------------------------------------------------
# 2. decay
def _pooled(mean: np.ndarray, err: np.ndarray, layer: int | None, head: int | None) -> tuple[np.ndarray, np.ndarray]:
    if layer is None:
        m, e = mean.reshape(-1, mean.shape[-1]), err.reshape(-1, err.shape[-1])
    elif head is None:
        m, e = mean[layer], err[layer]
    else:
        return mean[layer, head], err[layer, head]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # distances without data stay NaN
        pm = np.nanmean(m, axis=0)
    pe = np.sqrt(np.nansum(e ** 2, axis=0)) / m.shape[0]
    return pm, pe


def _fmt_se(value: float, se: float | None) -> str:
    if se is None:
        return f"{value:.3f}"
    return f"{value:.3f} ± {se:.3f}" if se >= 5e-4 else f"{value:.4f} ± {se:.1e}"


def decay_figure(fits: FitReport, layer: int | None = None, head: int | None = None, *,
                 log_y: bool = True) -> go.Figure:
    """Mass vs temporal distance with the fitted exponential, power law (and exponential over a floor, when
    fitted) and the paper's rho = 1/2 (view 2).

    ``fits`` is a :class:`packcache.fit.FitReport`; ``layer``/``head`` select its per-layer or per-head fit
    (``None``: the global fit over all layers and heads).
    """
    d = np.asarray(fits.distances, dtype=float)
    mean, err = _pooled(np.asarray(fits.mean), np.asarray(fits.stderr), layer, head)
    if layer is None:
        fit = fits.global_fit
    elif head is None:
        fit = fits.per_layer[layer]
    else:
        fit = fits.per_head[layer][head]
    ok = np.isfinite(mean)
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=d[ok], y=_f32(mean[ok]), mode="markers", name="measured (mean ± s.e.)",
                             marker=dict(size=9, color="#222"),
                             error_y=dict(type="data", array=_f32(np.nan_to_num(err[ok])), visible=True)))
    dense = np.linspace(d[ok].min(), d[ok].max(), 60) if ok.sum() >= 2 else d[ok]
    title = f"Decay with temporal distance ({_scope(layer, head)})"
    if fit is not None:
        best = fit.model

        def r2(model: str) -> str:
            value = fit.r2.get(model)
            return f", R² = {value:.3f}" if value is not None and np.isfinite(value) else ""

        def star(model: str) -> str:
            return " (AIC best)" if best == model else ""

        fig.add_trace(go.Scatter(
            x=dense, y=_f32(fit.predict(dense, "exponential")), mode="lines", line=dict(color="#1f77b4", width=3),
            name=f"exponential C·ρ^d, ρ = {_fmt_se(fit.rho, fit.rho_se)}{r2('exponential')}{star('exponential')}"))
        fig.add_trace(go.Scatter(
            x=dense, y=_f32(fit.predict(dense, "power")), mode="lines", line=dict(color="#d62728", width=2, dash="dot"),
            name=f"power law C·d^-α, α = {_fmt_se(fit.alpha, fit.alpha_se)}{r2('power')}{star('power')}"))
        rho_floor = getattr(fit, "rho_floor", float("nan"))
        if rho_floor is not None and np.isfinite(rho_floor):
            fig.add_trace(go.Scatter(
                x=dense, y=_f32(fit.predict(dense, "exponential_floor")), mode="lines",
                line=dict(color="#2ca02c", width=2, dash="dashdot"),
                name=f"exponential + floor C·ρ^d + F, ρ = {_fmt_se(rho_floor, fit.rho_floor_se)}, "
                     f"F = {fit.floor:.3g}{r2('exponential_floor')}{star('exponential_floor')}"))
        if best == "exponential_floor" and np.isfinite(rho_floor):
            title += (f"<br><sup>fitted ρ = {_fmt_se(fit.rho, fit.rho_se)}; over a floor F = {fit.floor:.3g}: "
                      f"ρ = {_fmt_se(rho_floor, fit.rho_floor_se)}; paper ρ = 0.5</sup>")
        else:
            title += f"<br><sup>fitted ρ = {_fmt_se(fit.rho, fit.rho_se)}; paper ρ = 0.5</sup>"
    else:
        title += "<br><sup>no fit for this selection (too few distances with data)</sup>"
    if ok.any():
        d0, y0 = float(d[ok][0]), float(mean[ok][0])
        fig.add_trace(go.Scatter(x=dense, y=_f32(y0 * 0.5 ** (dense - d0)), mode="lines", name="paper ρ = 1/2",
                                 line=dict(color="#7f7f7f", dash="dash")))
    if log_y and ok.any():
        lo, hi = float(np.nanmin(mean[ok])), float(np.nanmax(mean[ok]))
        fig.update_yaxes(tickvals=_log_ticks(lo, hi), tickformat=".2g")
    fig.update_layout(title=title, template=_TEMPLATE, xaxis_title="temporal distance d (frames back)",
                      yaxis_title="mean mass on frame t-d", yaxis_type="log" if log_y else "linear", height=400,
                      legend=dict(orientation="h", y=-0.25), margin=dict(l=60, r=20, t=70, b=40))
    fig.update_xaxes(dtick=1)
    return fig


def _log_ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 tick values covering ``[lo / 4, hi * 2]`` (a log axis without crowded minor labels)."""
    lo, hi = max(lo, 1e-9) / 4, max(hi, 1e-9) * 2
    ticks = [m * 10.0 ** e for e in range(int(np.floor(np.log10(lo))), int(np.ceil(np.log10(hi))) + 1)
             for m in (1, 2, 5)]
    return [t for t in ticks if lo <= t <= hi]


def rho_figure(fits: FitReport) -> go.Figure:
    """Fitted rho per layer (with its standard error), per head as points, global band, paper rho = 1/2."""
    n_layers = len(fits.per_layer)
    fig = go.Figure()
    xs, ys, texts = [], [], []
    for layer, row in enumerate(fits.per_head):
        for h, f in enumerate(row):
            if f is not None:
                xs.append(layer + (h - (len(row) - 1) / 2) * 0.08)
                ys.append(f.rho)
                texts.append(f"layer {layer}, head {h}: ρ = {_fmt_se(f.rho, f.rho_se)}")
    fig.add_trace(go.Scatter(x=xs, y=ys, mode="markers", name="per head", text=texts, hoverinfo="text",
                             marker=dict(size=6, color="#aec7e8")))
    per_layer = fits.per_layer
    fig.add_trace(go.Scatter(
        x=list(range(n_layers)), y=[f.rho for f in per_layer], mode="markers+lines", name="per layer (± s.e.)",
        marker=dict(size=10, color="#1f77b4"), text=[f"layer {i}: AIC prefers {f.model}" for i, f in
                                                    enumerate(per_layer)],
        error_y=dict(type="data", array=[f.rho_se or 0.0 for f in per_layer], visible=True)))
    floors = [getattr(f, "rho_floor", float("nan")) for f in per_layer]
    if any(x is not None and np.isfinite(x) for x in floors):
        fig.add_trace(go.Scatter(
            x=list(range(n_layers)), y=[x if x is not None and np.isfinite(x) else None for x in floors],
            mode="markers", name="per layer, ρ over a floor (± s.e.)", marker=dict(size=10, symbol="diamond",
                                                                                     color="#2ca02c"),
            error_y=dict(type="data", array=[getattr(f, "rho_floor_se", None) or 0.0 for f in per_layer],
                         visible=True)))
    g = fits.global_fit
    fig.add_hline(y=g.rho, line=dict(color="#1f77b4", dash="dot"),
                  annotation_text=f"global ρ = {_fmt_se(g.rho, g.rho_se)}", annotation_position="top left")
    fig.add_hline(y=0.5, line=dict(color="#7f7f7f", dash="dash"), annotation_text="paper ρ = 1/2",
                  annotation_position="bottom right")
    fig.update_layout(title="Fitted decay rate ρ per layer", template=_TEMPLATE, xaxis_title="layer",
                      yaxis_title="ρ (mass ratio per frame of distance)", yaxis_range=[0, 1.05], height=400,
                      margin=dict(l=60, r=20, t=70, b=40))
    fig.update_xaxes(dtick=1)
    return fig


# --------------------------------------------------------------------------------------------------------
# 3. where it looks
def spatial_figure(stats: AttentionStats, layer: int | None = None, head: int | None = None, *,
                   normalize: bool = True, max_side: int = 64) -> go.Figure:
    """Spatial H x W attention map on the most recent frames (``d = 0`` the current one, ``d = 1`` ...) (view 3).

    With ``normalize`` each map shows the share of that frame's mass per cell (the pattern), its total mass in
    the subplot title; otherwise the absolute mass per query token.
    """
    n_r = stats.recent_frames
    if n_r == 0:
        return message_figure("these statistics have no spatial maps (recent_frames = 0)", "Where it looks")
    q = stats.spatial_queries.astype(float)
    maps, titles = [], []
    for d in range(n_r):
        grid = _select(stats.spatial[:, :, d], layer, head) / q[d] if q[d] > 0 else None
        if grid is None:
            maps.append(None)
            titles.append(f"d = {d}: no data")
            continue
        total = float(grid.sum())
        if normalize and total > 0:
            grid = grid / total
        maps.append(downsample(grid, max_side))
        titles.append(f"{'current frame' if d == 0 else f'frame t-{d}'}: mass {total:.3f}")
    fig = make_subplots(rows=1, cols=n_r, subplot_titles=titles, horizontal_spacing=0.06)
    zmax = max((float(np.nanmax(m)) for m in maps if m is not None), default=1.0)
    for d, grid in enumerate(maps):
        if grid is None:
            continue
        fig.add_trace(go.Heatmap(z=_f32(grid), coloraxis="coloraxis",
                                 hovertemplate="row %{y}, col %{x}<br>%{z:.4f}<extra>d=" + str(d) + "</extra>"),
                      row=1, col=d + 1)
        fig.update_yaxes(autorange="reversed", scaleanchor=f"x{d + 1 if d else ''}", constrain="domain", row=1,
                         col=d + 1)
        fig.update_xaxes(constrain="domain", row=1, col=d + 1)
    label = "share of the frame's mass" if normalize else "mass per query token"
    fig.update_layout(title=f"Where it looks: spatial attention on recent frames ({_scope(layer, head)})",
                      template=_TEMPLATE, coloraxis=dict(colorscale="Magma", cmin=0, cmax=zmax,
                                                         colorbar=dict(title=label)),
                      height=380, margin=_MARGIN)
    return fig


# --------------------------------------------------------------------------------------------------------
# 4. budget
def keep_ratio_figure(budget: Budget) -> go.Figure:
    """Per-distance keep ratios per layer (and kv head, for per-head budgets) from a budget (view 4)."""
    ratios = np.asarray(budget.ratios(), dtype=float)  # [L, K, W]
    n_l, n_k, n_w = ratios.shape
    if budget.per_kv_head:
        z = ratios.reshape(n_l * n_k, n_w)
        labels = [f"L{layer} kv{k}" for layer in range(n_l) for k in range(n_k)]
    else:
        z = ratios[:, 0]
        labels = [f"L{layer}" for layer in range(n_l)]
    visual = budget.layout.get("visual_per_frame")
    hover = "%{y}, d = %{x}<br>keep ratio %{z:.3f}"
    custom = None
    if visual:
        custom = np.rint(z * visual).astype(int)
        hover += f"<br>%{{customdata}} of {visual} tokens"
    fig = go.Figure(go.Heatmap(
        z=_f32(z), x=[str(d) for d in range(1, n_w + 1)], y=labels, zmin=0.0, zmax=1.0, colorscale="Blues",
        customdata=custom, texttemplate="%{z:.3f}" if z.size <= 400 else None, hovertemplate=hover + "<extra></extra>",
        colorbar=dict(title="keep ratio")))
    source = budget.provenance.get("source", "fitted")
    rho = budget.decay.get("global", {}).get("rho")
    sub = f"source: {source}, window W = {budget.window}, decay model: {budget.decay.get('model')}"
    if rho is not None:
        sub += f", global ρ = {rho:.3f}"
    fig.update_layout(title=f"Budget: share of each history frame kept<br><sup>{sub}</sup>", template=_TEMPLATE,
                      xaxis_title="temporal distance d", yaxis_title="layer", yaxis_autorange="reversed",
                      height=max(300, 80 + 28 * len(labels)) if len(labels) <= 40 else 900, margin=_MARGIN)
    return fig


def keep_map_figure(keep: KeepMaps, layer: int = 0, kv_head: int = 0, *, max_side: int = 64) -> go.Figure:
    """Which grid cells of each history frame survive packing, for one layer and kv head (view 4).

    ``keep`` is a :class:`dashboard.sources.KeepMaps` (computed by the real PackCache policy).
    """
    maps = np.asarray(keep.keep[layer, kv_head], dtype=float)  # [W, H, Wd]
    n_w = maps.shape[0]
    titles = [f"d = {d + 1}: {int(maps[d].sum())}/{keep.visual_per_frame} kept" for d in range(n_w)]
    fig = make_subplots(rows=1, cols=n_w, subplot_titles=titles, horizontal_spacing=0.03)
    for d in range(n_w):
        fig.add_trace(go.Heatmap(z=_f32(downsample(maps[d], max_side)), coloraxis="coloraxis",
                                 hovertemplate="row %{y}, col %{x}: %{z:.0%} kept<extra></extra>"), row=1, col=d + 1)
        fig.update_yaxes(autorange="reversed", scaleanchor=f"x{d + 1 if d else ''}", showticklabels=d == 0,
                         constrain="domain", row=1, col=d + 1)
        fig.update_xaxes(constrain="domain", row=1, col=d + 1)
    note = "; novelty selection, static video" if keep.selection == "novelty" else ""
    fig.update_layout(title=f"Keep map of packed frames (layer {layer}, kv head {kv_head}; "
                            f"packed cache {keep.budget_tokens} tokens{note})",
                      template=_TEMPLATE, height=300, margin=_MARGIN,
                      coloraxis=dict(colorscale=[[0, "#eeeeee"], [1, "#1f77b4"]], cmin=0, cmax=1, showscale=False))
    return fig


# --------------------------------------------------------------------------------------------------------
# 5. runtime
def runtime_figure(runs: Sequence[RunCurves], metric: str = "seconds") -> go.Figure:
    """Per-frame latency or cache size (tokens, bytes) of recorded runs, one line per run (view 5).

    ``runs`` are :class:`dashboard.sources.RunCurves`; ``metric`` is a key of :data:`METRICS`.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {tuple(METRICS)}, got {metric!r}")
    axis, scale = METRICS[metric]
    if not runs:
        return message_figure("no recorded runs yet: start one with the run control", "Runtime")
    fig = go.Figure()
    dashes = ["solid", "dash", "dot", "dashdot", "longdash"]
    count: dict[str, int] = {}
    for run in runs:
        family = run.policy.split("(")[0]
        k = count.get(family, 0)
        count[family] = k + 1
        y = np.asarray(getattr(run, metric), dtype=float) * scale
        label = run.name if run.policy in run.name else f"{run.policy} · {run.name}"
        fig.add_trace(go.Scatter(x=run.frame, y=_f32(y), mode="lines+markers", name=label,
                                 line=dict(color=policy_colour(run.policy), dash=dashes[k % len(dashes)]),
                                 hovertemplate=f"{run.policy}<br>frame %{{x}}: %{{y:.4g}}<extra>{run.name}</extra>"))
    fig.update_layout(title=f"Runtime: {axis} per generated frame", template=_TEMPLATE, xaxis_title="frame",
                      yaxis_title=axis, yaxis_rangemode="tozero", height=380,
                      legend=dict(orientation="h", y=-0.25), margin=_MARGIN)
    fig.update_xaxes(dtick=1)
    return fig


def run_table_figure(rows: Sequence[dict[str, Any]]) -> go.Figure:
    """A table of :func:`dashboard.sources.run_summary` rows: time, latency, memory, speedup and agreement."""
    if not rows:
        return message_figure("no recorded runs yet", "Runs")

    def fmt(value: Any, spec: str, suffix: str = "") -> str:
        return "–" if value is None else f"{value:{spec}}{suffix}"

    columns = {
        "run": [r["run"] for r in rows],
        "policy": [r["policy"] for r in rows],
        "total (s)": [fmt(r["total_s"], ".2f") for r in rows],
        "last 4 frames (ms/frame)": [fmt(r["last4_ms"], ".0f") for r in rows],
        "peak cache (tokens)": [str(r["peak_tokens"]) for r in rows],
        "peak KV (MiB)": [fmt(r["peak_kv_mib"], ".2f") for r in rows],
        "speedup vs full": [fmt(r["speedup"], ".2f", "×") for r in rows],
        "KV saved vs full": [fmt(r["memory_ratio"], ".2f", "×") for r in rows],
        "agreement with full": [fmt(r["agreement"], ".1%") for r in rows],
    }
    colours = [policy_colour(r["policy"]) for r in rows]
    fig = go.Figure(go.Table(
        columnwidth=[2.4, 1.8] + [1] * (len(columns) - 2),
        header=dict(values=[f"<b>{c}</b>" for c in columns], fill_color="#eef1f5", align="left", font=dict(size=11)),
        cells=dict(values=list(columns.values()), align="left",
                   font=dict(size=11, color=[colours] + [["#222"] * len(rows)] * (len(columns) - 1)))))
    fig.update_layout(template=_TEMPLATE, height=100 + 26 * len(rows), margin=dict(l=10, r=10, t=10, b=10))
    return fig


#: Colours of the kinds of work in :func:`time_by_kind_figure` (the kinds of ``packcache.bench.OP_KINDS``).
_KIND_COLOURS = {"attention": "#d62728", "linear": "#1f77b4", "cache copies": "#ff7f0e", "other": "#9e9e9e"}


def time_by_kind_figure(profile: dict[str, Any], title: str = "Where the time goes") -> go.Figure:
    """Stacked bars of profiled self CPU seconds by kind of op per policy (a ``packcache-bench`` ``profile``
    section); the hover adds each kind's share and, for attention and linear layers, the time per MAC."""
    policies = profile.get("policies") or {}
    if not policies:
        return message_figure("no profile section (packcache-bench --sections profile)", title)
    names = list(policies)
    fig = go.Figure()
    for kind, colour in _KIND_COLOURS.items():
        seconds = [float(policies[n]["seconds_by_kind"].get(kind, 0.0)) for n in names]
        totals = [sum(policies[n]["seconds_by_kind"].values()) or 1.0 for n in names]
        per_mac = [policies[n].get(f"ns_per_mac_{'linear' if kind == 'linear' else 'attention'}")
                   if kind in ("attention", "linear") else None for n in names]
        extra = [f"<br>{v:.3f} ns per MAC" if v is not None else "" for v in per_mac]
        fig.add_trace(go.Bar(y=names, x=seconds, name=kind, orientation="h", marker_color=colour,
                             customdata=[[s / t, e] for s, t, e in zip(seconds, totals, extra)],
                             hovertemplate=f"%{{y}}: {kind} %{{x:.2f}} s (%{{customdata[0]:.0%}})%{{customdata[1]}}"
                                           "<extra></extra>"))
    fig.update_layout(barmode="stack", title=f"{title} (torch.profiler, self CPU time of one run each)",
                      xaxis_title="seconds", template=_TEMPLATE, height=140 + 40 * len(names), margin=_MARGIN,
                      yaxis=dict(autorange="reversed"), legend=dict(orientation="h", y=-0.35))
    return fig


# --------------------------------------------------------------------------------------------------------
# 6. frames
def _montage(frames: np.ndarray, palette: Sequence[Sequence[int]] | None, gap: int = 1) -> np.ndarray:
    """``frames [T, H, W]`` colour ids -> one RGB strip ``[H, T*(W+gap)-gap, 3]`` (via :mod:`packcache.render`)."""
    from packcache.render import frames_to_rgb

    rgb = frames_to_rgb(frames, cell=1) if palette is None else frames_to_rgb(frames, palette, cell=1)
    t, h, w, _ = rgb.shape
    out = np.full((h, t * (w + gap) - gap, 3), 255, dtype=np.uint8)
    for i in range(t):
        out[:, i * (w + gap): i * (w + gap) + w] = rgb[i]
    return out


def quality_table_figure(rows: Sequence[dict[str, Any]], frame_range: str = "all") -> go.Figure:
    """A fidelity table (:func:`dashboard.sources.quality_rows`): teacher-forced and generated accuracy, overall and
    on the cells that change, and agreement with the full cache, per policy at equal memory."""
    if not rows:
        return message_figure("no fidelity table (python -m packcache.metrics --out data/demo-policy-table.json)",
                              "Quality")

    def pct(v: Any) -> str:
        return "–" if v is None or not np.isfinite(v) else f"{v:.1%}"

    columns = {
        "policy": [r["policy"] for r in rows],
        "cache (tokens)": ["–" if r["cache_tokens"] is None else str(r["cache_tokens"]) for r in rows],
        "teacher-forced acc": [pct(r["tf_acc"]) for r in rows],
        "teacher-forced acc, changed cells": [pct(r["tf_changed"]) for r in rows],
        "generated: agreement with full": [pct(r["gen_agreement"]) for r in rows],
        "generated acc": [pct(r["gen_acc"]) for r in rows],
        "generated acc, changed cells": [pct(r["gen_changed"]) for r in rows],
    }
    colours = [policy_colour(r["policy"]) for r in rows]
    fig = go.Figure(go.Table(
        columnwidth=[2.2] + [1] * (len(columns) - 1),
        header=dict(values=[f"<b>{c}</b>" for c in columns], fill_color="#eef1f5", align="left", font=dict(size=11)),
        cells=dict(values=list(columns.values()), align="left",
                   font=dict(size=11, color=[colours] + [["#222"] * len(rows)] * (len(columns) - 1)))))
    fig.update_layout(title=f"Quality at equal memory (frames {frame_range})", template=_TEMPLATE,
                      height=110 + 28 * len(rows), margin=dict(l=10, r=10, t=40, b=10))
    return fig


def frames_figure(candidate: VideoResult, reference: VideoResult | None = None, *,
                  palette: Sequence[Sequence[int]] | None = None,
                  agreement: Sequence[float] | None = None, max_frames: int = 16, per_line: int = 7) -> go.Figure:
    """Generated frames side by side (view 6): for each frame, the reference (full cache) above the candidate and
    the cells that differ (red) below; ``per_line`` frames per block.

    ``candidate``/``reference`` are :class:`packcache.records.VideoResult`; ``agreement[k]`` is the per-frame
    agreement score shown under frame ``k`` (from :mod:`packcache.metrics`); frames beyond ``max_frames`` are
    subsampled (the first and last kept). Each block is one image trace (RGB via :mod:`packcache.render`).
    """
    cand = np.asarray(candidate.frames)
    t, h, w = cand.shape
    ref = None if reference is None else np.asarray(reference.frames)
    if ref is not None and ref.shape != cand.shape:
        ref = None
    pick = np.arange(t) if t <= max_frames else np.unique(np.linspace(0, t - 1, max_frames).round().astype(int))
    names = [str(candidate.meta.get("policy", "candidate"))]
    if ref is not None:
        names = [str(reference.meta.get("policy", "reference")), names[0], "differs"]
    blocks = [pick[i:i + per_line] for i in range(0, len(pick), per_line)]
    fig = make_subplots(rows=len(blocks), cols=1, vertical_spacing=0.25 / len(blocks))
    for b, frames in enumerate(blocks):
        strips = [_montage(cand[frames], palette)]
        if ref is not None:
            differs = (ref[frames] != cand[frames]).astype(np.int64)
            strips = [_montage(ref[frames], palette), strips[0],
                      _montage(differs, ((235, 235, 235), (200, 30, 30)))]
        gap = np.full((1, strips[0].shape[1], 3), 255, dtype=np.uint8)
        image = np.concatenate([x for s in strips for x in (s, gap)][:-1])
        fig.add_trace(go.Image(z=image, hoverinfo="skip"), row=b + 1, col=1)
        labels = [f"f{k}" + (f"<br>{agreement[k]:.0%}" if agreement is not None and k < len(agreement) else "")
                  for k in frames]
        fig.update_xaxes(tickvals=[i * (w + 1) + (w - 1) / 2 for i in range(len(frames))], ticktext=labels,
                         showgrid=False, range=[-0.5, per_line * (w + 1) - 1.5] if len(blocks) > 1 else None,
                         row=b + 1, col=1)
        fig.update_yaxes(tickvals=[i * (h + 1) + (h - 1) / 2 for i in range(len(strips))], ticktext=names,
                         showgrid=False, row=b + 1, col=1)
    title = f"Frames: {names[1] if ref is not None else names[0]}"
    if ref is not None:
        title += f" vs {names[0]}"
        if agreement is not None and len(agreement) > 1:
            title += f"<br><sup>agreement with the full cache {np.mean(agreement[1:]):.1%} over generated frames</sup>"
    aspect = len(names) * (h + 1) / (min(per_line, len(pick)) * (w + 1))
    fig.update_layout(title=title, template=_TEMPLATE, height=int(len(blocks) * (560 * aspect + 60) + 90),
                      margin=dict(l=110, r=20, t=70, b=40))
    return fig
