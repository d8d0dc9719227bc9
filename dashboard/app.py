"""``packcache-dashboard``: the Dash app. It only reads files (through :mod:`dashboard.sources`) and wires controls
to the pure figure functions of :mod:`dashboard.figures`; runs start in the background (:mod:`dashboard.runner`).

    packcache-dashboard [--stats stats.npz] [--budget budget.json] [--runs DIR_OR_JSON ...] [--quality JSON ...]
                        [--model DIR] [--save-runs DIR] [--port 8050] [--host 127.0.0.1]

Without arguments it shows the embedded demo profile, budget and recorded runs from ``data/`` (see
:data:`dashboard.sources.DEFAULTS`). A file given on the command line that is missing or malformed prints one line
and exits with code 2; a missing default is explained in the page instead.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Callable
from typing import Any

import plotly.graph_objects as go
from dash import Dash, Input, Output, State, dcc, html, no_update

from dashboard import figures as F
from dashboard.runner import POLICIES, RunManager, RunRequest
from dashboard.sources import (
    SourceError,
    Sources,
    frame_agreement,
    frame_ranges,
    load_sources,
    quality_rows,
    reference_for,
    run_summary,
)

__all__ = ["create_app", "main", "build_parser"]

_CARD = {"background": "white", "border": "1px solid #ddd", "borderRadius": "8px", "padding": "12px 16px",
         "boxShadow": "0 1px 2px rgba(0,0,0,0.05)", "minWidth": "0"}
_ROW = {"display": "flex", "gap": "18px", "alignItems": "center", "flexWrap": "wrap", "margin": "6px 0"}
_GRID = {"display": "grid", "gridTemplateColumns": "repeat(auto-fit, minmax(620px, 1fr))", "gap": "16px"}
_ERROR = {"color": "#a33", "background": "#fdecea", "padding": "6px 10px", "borderRadius": "4px", "margin": "4px 0"}


def _safe(title: str) -> Callable:
    """Turn any exception of a figure callback into a message figure (never a traceback in the page)."""
    def wrap(fn: Callable[..., go.Figure]) -> Callable[..., go.Figure]:
        @functools.wraps(fn)
        def inner(*args: Any) -> go.Figure:
            try:
                return fn(*args)
            except Exception as exc:  # noqa: BLE001 - shown to the user
                return F.message_figure(" ".join(str(exc).split()) or type(exc).__name__, title)
        return inner
    return wrap


def _opt(value: str | None) -> int | None:
    """Dropdown value -> index (``"all"`` -> ``None``)."""
    return None if value in (None, "all") else int(value)


def _index_options(n: int, prefix: str, *, everything: str | None = "all") -> list[dict[str, str]]:
    opts = [{"label": everything, "value": "all"}] if everything else []
    return opts + [{"label": f"{prefix}{i}", "value": str(i)} for i in range(n)]


def _labelled(label: str, control: Any) -> html.Div:
    return html.Div([html.Label(label, style={"fontWeight": "600", "marginRight": "6px"}), control],
                    style={"display": "flex", "alignItems": "center"})


def _dropdown(id_: str, options: list[dict[str, str]], value: str, width: str = "120px") -> dcc.Dropdown:
    return dcc.Dropdown(id=id_, options=options, value=value, clearable=False, searchable=False,
                        style={"width": width})


def _radio(id_: str, options: list[str] | list[dict[str, str]], value: str) -> dcc.RadioItems:
    return dcc.RadioItems(id=id_, options=options, value=value, inline=True,
                          inputStyle={"marginRight": "4px"}, labelStyle={"marginRight": "12px"})


def _graph(id_: str, figure: go.Figure | None = None) -> dcc.Graph:
    return dcc.Graph(id=id_, figure=figure if figure is not None else go.Figure(),
                     config={"displaylogo": False})


def _section(id_: str, title: str, note: str, *children: Any) -> html.Section:
    return html.Section([html.H3(title, style={"margin": "4px 0"}),
                         html.P(note, style={"color": "#555", "margin": "2px 0 8px"}), *children],
                        id=id_, style=_CARD)


def _static(fn: Callable[[], go.Figure], title: str) -> go.Figure:
    return _safe(title)(fn)()


# --------------------------------------------------------------------------------------------------------
def create_app(sources: Sources, runner: RunManager | None = None) -> Dash:
    """The Dash app over loaded :class:`Sources` (a :class:`RunManager` is made when not given)."""
    runner = runner or RunManager(sources)
    st, fits, budget, keep = sources.stats, sources.fits, sources.budget, sources.keep
    app = Dash(__name__, title="packcache dashboard", update_title=None)

    n_layers = st.num_layers if st is not None else 0
    n_heads = st.num_heads if st is not None else 0
    groups = F.group_choices(st) if st is not None else list(F.ANCHOR_GROUPS)
    steps = st.num_steps if st is not None else 0
    n_kv_layers = budget.model["num_layers"] if budget is not None else 0
    n_kv = budget.model["num_kv_heads"] if budget is not None else 0
    default_frames = next((int(r.meta.get("num_frames", 8)) for r in sources.runs if r.is_full and r.video), 8)
    default_steps = next((int(r.meta.get("steps", 4)) for r in sources.runs if r.is_full and r.video), 4)

    quality_options = [{"label": name, "value": str(i)} for i, (name, _) in enumerate(sources.quality)]
    ranges = frame_ranges(sources.quality[0][1]) if sources.quality else []

    def missing(key: str, title: str) -> go.Figure:
        return F.message_figure(sources.errors.get(key, f"no {key} loaded"), title)

    steps_fig = (_static(lambda: F.step_evolution_figure(st), "Steps") if st is not None
                 else missing("stats", "Steps"))
    rho_fig = _static(lambda: F.rho_figure(fits), "Decay rate") if fits is not None else missing("stats", "Decay rate")
    ratio_fig = (_static(lambda: F.keep_ratio_figure(budget), "Budget") if budget is not None
                 else missing("budget", "Budget"))
    profile_fig = (_static(lambda: F.time_by_kind_figure(sources.profiles[0][1]), "Where the time goes")
                   if sources.profiles else None)

    summary = []
    if st is not None:
        lay = st.layout
        summary.append(f"model {st.model_id}: {st.num_layers} layers x {st.num_heads} heads "
                       f"({st.num_kv_heads} kv); layout {lay.num_frames} frames of {lay.height}x{lay.width} "
                       f"({lay.num_tokens} tokens); {st.num_samples} samples")
    for key in ("stats", "budget", "runs", "model"):
        if sources.paths.get(key):
            value = sources.paths[key]
            summary.append(f"{key}: {', '.join(value) if isinstance(value, list) else value}")
    errors = [html.Div(f"{key}: {msg}", className="source-error", style=_ERROR)
              for key, msg in sources.errors.items()]

    run_panel = html.Section([
        html.H3("Run a generation", style={"margin": "4px 0"}),
        html.P("Generates a short video on the demo model in the background; the run joins the runtime and "
               "frames views when done.", style={"color": "#555", "margin": "2px 0 8px"}),
        html.Div([
            _labelled("policy", _radio("run-policy", list(POLICIES), "PackCache")),
            _labelled("budget", _radio("run-budget", [{"label": "loaded (fitted)", "value": "loaded"},
                                                      {"label": "paper ρ=1/2, W=4", "value": "paper"}], "loaded")),
            _labelled("frames", dcc.Input(id="run-frames", type="number", min=2, max=64, step=1,
                                          value=default_frames, style={"width": "70px"})),
            _labelled("steps", dcc.Input(id="run-steps", type="number", min=1, max=64, step=1,
                                         value=default_steps, style={"width": "70px"})),
            html.Button("Run", id="run-button", n_clicks=0,
                        style={"padding": "6px 18px", "fontWeight": "600", "cursor": "pointer"}),
        ], style=_ROW),
        html.Div([html.Progress(id="run-progress", value="0", max="1", style={"width": "240px"}),
                  html.Span("idle", id="run-status", style={"marginLeft": "10px"})], style=_ROW),
        dcc.Interval(id="run-poll", interval=400, disabled=True),
        dcc.Store(id="run-job"),
        dcc.Store(id="runs-version", data=0),
    ], id="run-panel", style=_CARD)

    views = html.Div([
        _section("view-attention", "1 · Attention by group",
                 "Mean attention mass per query token on each key group, per layer and head.",
                 html.Div([_labelled("group", _radio("group", groups, "history")),
                           _labelled("step", _dropdown("step", [{"label": "all steps", "value": "all"}] +
                                                       [{"label": f"step {s}", "value": str(s)}
                                                        for s in range(steps)], "all", "130px"))], style=_ROW),
                 _graph("fig-group"), _graph("fig-steps", steps_fig)),
        _section("view-decay", "2 · Decay",
                 "Mass on the frame d steps back, with the decay models fitted by packcache.fit (exponential, "
                 "power law, exponential over a floor).",
                 html.Div([_labelled("layer", _dropdown("decay-layer", _index_options(n_layers, "L"), "all")),
                           _labelled("head", _dropdown("decay-head", _index_options(n_heads, "h"), "all")),
                           dcc.Checklist(id="decay-log", options=[{"label": " log scale", "value": "log"}],
                                         value=["log"])], style=_ROW),
                 _graph("fig-decay"), _graph("fig-rho", rho_fig)),
        _section("view-spatial", "3 · Where it looks",
                 "Spatial attention on the current frame and the most recent history frame(s).",
                 html.Div([_labelled("layer", _dropdown("spatial-layer", _index_options(n_layers, "L"), "all")),
                           _labelled("head", _dropdown("spatial-head", _index_options(n_heads, "h"), "all")),
                           dcc.Checklist(id="spatial-norm", options=[{"label": " share of frame", "value": "norm"}],
                                         value=["norm"])], style=_ROW),
                 _graph("fig-spatial")),
        _section("view-budget", "4 · Budget",
                 "Per-distance keep ratios, and the grid cells that survive packing (the PackCache policy).",
                 _graph("fig-ratios", ratio_fig),
                 html.Div([_labelled("layer", _dropdown("keep-layer", _index_options(n_kv_layers, "L", everything=None),
                                                        "0")),
                           _labelled("kv head", _dropdown("keep-head", _index_options(n_kv, "kv", everything=None),
                                                          "0"))], style=_ROW),
                 _graph("fig-keep")),
        _section("view-runtime", "5 · Runtime",
                 "Per-frame latency and cache size of recorded runs: full cache, PackCache and the baselines.",
                 html.Div([_labelled("metric", _radio("runtime-metric", [
                     {"label": "latency", "value": "seconds"}, {"label": "cache tokens", "value": "cache_tokens"},
                     {"label": "KV bytes", "value": "kv_bytes"}], "seconds"))], style=_ROW),
                 _graph("fig-runtime"), _graph("fig-run-table"),
                 *([_graph("fig-time-by-kind", profile_fig)] if profile_fig is not None else [])),
        _section("view-frames", "6 · Frames",
                 "Generated frames: full-cache reference above the chosen run; per-frame agreement under each frame.",
                 html.Div([_labelled("run", _dropdown("frames-run", [], None, "360px"))], style=_ROW),
                 _graph("fig-frames"),
                 html.Div([_labelled("fidelity table", _dropdown("quality-table", quality_options,
                                                                 quality_options[0]["value"] if quality_options
                                                                 else None, "220px")),
                           _labelled("frames", _radio("quality-range", ranges, ranges[0] if ranges else None))],
                          style={**_ROW, "display": "flex" if quality_options else "none"}),
                 _graph("fig-quality", None if sources.quality else
                        F.message_figure("no fidelity table (python -m packcache.metrics --out "
                                         "data/demo-policy-table.json)", "Quality"))),
    ], style=_GRID)

    app.layout = html.Div([
        html.H2("packcache dashboard", style={"margin": "0 0 4px"}),
        html.Div([html.Div(s) for s in summary], id="sources-summary", style={"color": "#444", "fontSize": "13px"}),
        html.Div(errors, id="source-errors"),
        html.Div(style={"height": "10px"}),
        run_panel,
        html.Div(style={"height": "16px"}),
        views,
    ], style={"fontFamily": "system-ui, sans-serif", "background": "#f6f7f9", "padding": "16px 20px"})

    # ----------------------------------------------------------------------------------------------------
    @app.callback(Output("fig-group", "figure"), Input("group", "value"), Input("step", "value"))
    @_safe("Attention by group")
    def _group(group: str, step: str) -> go.Figure:
        if st is None:
            return missing("stats", "Attention by group")
        return F.attention_by_group_figure(st, group, _opt(step))

    @app.callback(Output("fig-decay", "figure"), Input("decay-layer", "value"), Input("decay-head", "value"),
                  Input("decay-log", "value"))
    @_safe("Decay")
    def _decay(layer: str, head: str, log: list[str]) -> go.Figure:
        if fits is None:
            return missing("stats", "Decay")
        return F.decay_figure(fits, _opt(layer), _opt(head) if _opt(layer) is not None else None,
                              log_y="log" in (log or []))

    @app.callback(Output("fig-spatial", "figure"), Input("spatial-layer", "value"), Input("spatial-head", "value"),
                  Input("spatial-norm", "value"))
    @_safe("Where it looks")
    def _spatial(layer: str, head: str, norm: list[str]) -> go.Figure:
        if st is None:
            return missing("stats", "Where it looks")
        return F.spatial_figure(st, _opt(layer), _opt(head) if _opt(layer) is not None else None,
                                normalize="norm" in (norm or []))

    @app.callback(Output("fig-keep", "figure"), Input("keep-layer", "value"), Input("keep-head", "value"))
    @_safe("Keep map")
    def _keep(layer: str, head: str) -> go.Figure:
        if keep is None:
            return missing("budget", "Keep map")
        return F.keep_map_figure(keep, int(layer or 0), int(head or 0))

    @app.callback(Output("fig-runtime", "figure"), Input("runtime-metric", "value"), Input("runs-version", "data"))
    @_safe("Runtime")
    def _runtime(metric: str, _version: int) -> go.Figure:
        return F.runtime_figure(list(sources.runs), metric)

    @app.callback(Output("fig-run-table", "figure"), Input("runs-version", "data"))
    @_safe("Runs")
    def _run_table(_version: int) -> go.Figure:
        return F.run_table_figure(run_summary(list(sources.runs)))

    @app.callback(Output("fig-quality", "figure"), Input("quality-table", "value"), Input("quality-range", "value"),
                  prevent_initial_call=not sources.quality)
    @_safe("Quality")
    def _quality(index: str | None, frame_range: str | None) -> go.Figure:
        if not sources.quality or index is None:
            return F.message_figure("no fidelity table", "Quality")
        name, table = sources.quality[int(index)]
        frame_range = frame_range if frame_range in frame_ranges(table) else (frame_ranges(table) or ["all"])[0]
        return F.quality_table_figure(quality_rows(table, frame_range), f"{frame_range} · {name}")

    @app.callback(Output("frames-run", "options"), Output("frames-run", "value"), Input("runs-version", "data"),
                  State("frames-run", "value"))
    def _frames_options(_version: int, current: str | None) -> tuple[list[dict[str, str]], str | None]:
        with_video = [r for r in sources.runs if r.video is not None]
        options = [{"label": f"{r.policy} · {r.name}", "value": r.name} for r in with_video]
        candidates = [r.name for r in with_video if not r.is_full] or [r.name for r in with_video]
        names = {o["value"] for o in options}
        if _version and candidates:  # a new run finished: show it
            return options, candidates[-1]
        return options, current if current in names else (candidates[0] if candidates else None)

    @app.callback(Output("fig-frames", "figure"), Input("frames-run", "value"), Input("runs-version", "data"))
    @_safe("Frames")
    def _frames(name: str | None, _version: int) -> go.Figure:
        run = next((r for r in sources.runs if r.name == name and r.video is not None), None)
        if run is None:
            return F.message_figure(sources.errors.get("runs") or "no run with frames yet: start one above",
                                    "Frames")
        ref = reference_for(run, sources.runs)
        agreement = frame_agreement(run.video, ref.video) if ref is not None else None
        return F.frames_figure(run.video, ref.video if ref is not None else None, agreement=agreement)

    @app.callback(Output("run-job", "data"), Output("run-poll", "disabled"), Output("run-status", "children"),
                  Input("run-button", "n_clicks"), State("run-policy", "value"), State("run-budget", "value"),
                  State("run-frames", "value"), State("run-steps", "value"), prevent_initial_call=True)
    def _start(_clicks: int, policy: str, budget_choice: str, frames: Any, steps: Any) -> tuple:
        try:
            job = runner.start(RunRequest(policy, budget_choice, int(frames or 0), int(steps or 0)))
        except (ValueError, TypeError) as exc:
            return no_update, True, f"cannot start: {exc}"
        return job.id, False, f"run {job.id} queued"

    @app.callback(Output("run-progress", "value"), Output("run-progress", "max"),
                  Output("run-status", "children", allow_duplicate=True), Output("run-poll", "disabled",
                                                                                  allow_duplicate=True),
                  Output("runs-version", "data"), Input("run-poll", "n_intervals"), State("run-job", "data"),
                  State("runs-version", "data"), prevent_initial_call=True)
    def _poll(_n: int, job_id: int | None, version: int) -> tuple:
        job = runner.status(job_id) if job_id is not None else None
        if job is None:
            return no_update, no_update, no_update, True, no_update
        text = f"run {job.id} ({job.request.policy}): {job.status} — {job.message}"
        if job.status == "done":
            return str(job.total), str(job.total), text, True, (version or 0) + 1
        if job.status == "error":
            return "0", str(job.total), text, True, no_update
        return str(job.frame), str(job.total), text, False, no_update

    return app


# --------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="packcache-dashboard", description="Serve the packcache dashboard: attention "
                                "statistics, fitted decay, budget and the compact-cache runtime.")
    p.add_argument("--stats", help="attention statistics (.npz from packcache-profile --stats-out); "
                   "default: the embedded demo profile")
    p.add_argument("--budget", help="budget JSON (packcache-profile -o); default: the embedded demo budget")
    p.add_argument("--runs", nargs="+", action="extend", help="recorded runs: packcache.video/v1 JSON files, "
                   "benchmark JSON files, or directories of them; default: the embedded runs in data/")
    p.add_argument("--quality", nargs="+", action="extend", help="fidelity tables to show (JSON from "
                   "python -m packcache.metrics --out); tables inside the run locations are shown too")
    p.add_argument("--model", help="demo checkpoint for the run control; default: data/demo-model")
    p.add_argument("--save-runs", help="also write runs started from the page to this directory")
    p.add_argument("--threads", type=int, default=1, help="torch threads for runs started from the page (default 1)")
    p.add_argument("--port", type=int, default=8050)
    p.add_argument("--host", default="127.0.0.1")
    return p


def _port_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be served (``None`` if it can)."""
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return f"unknown host: {exc.strerror}"
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(addr)
        except OSError as exc:
            return exc.strerror or str(exc)
    return None


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``packcache-dashboard``; exit code 2 with one line for an unusable input."""
    args = build_parser().parse_args(argv)
    try:
        sources = load_sources(args.stats, args.budget, args.runs, model=args.model, quality=args.quality,
                               strict=True)
    except SourceError as exc:
        print(f"packcache-dashboard: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    problem = _port_problem(args.host, args.port)
    if problem:
        print(f"packcache-dashboard: error: cannot serve on {args.host}:{args.port} ({problem}); "
              "choose another --port", file=sys.stderr)
        raise SystemExit(2)
    import torch

    torch.set_num_threads(max(1, args.threads))
    app = create_app(sources, RunManager(sources, save_dir=args.save_runs))
    for key, msg in sources.errors.items():
        print(f"packcache-dashboard: note: {key}: {msg}", file=sys.stderr)
    print(f"packcache dashboard: open http://{args.host}:{args.port}/", flush=True)
    try:
        app.run(host=args.host, port=args.port, debug=False)
    except OSError as exc:
        print(f"packcache-dashboard: error: cannot serve on {args.host}:{args.port} ({exc.strerror or exc})",
              file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
