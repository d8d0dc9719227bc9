"""Decay fits and budget derivation: measured attention statistics become a :class:`~packcache.budget.Budget`.

For every layer and head (and per kv head, aggregating the query heads of a group), the mean attention mass on
the history frame at temporal distance ``d`` is fitted with an exponential ``C * rho**d``, a power law
``C * d**-alpha`` and an exponential over a floor ``C * rho**d + F`` by weighted least squares (scipy
``curve_fit``, weights from the per-distance standard errors). The uncertainty on ``rho`` comes from the fit
covariance; AIC (BIC reported too) chooses the model; R^2 reports the goodness of fit. The floor ``F`` is mass
spread evenly over all history, whatever the distance; when that model is chosen, the budget follows only the
part that decays with distance (a floor says nothing about which frame to keep).

A budget keeps, per layer (or per kv head), the same number of history tokens (the cache's storage contract:
every layer and kv head holds the same number of slots). That number comes from the target (frames of
history, or total cache tokens); it is shared across distances ``d = 1..W`` in proportion to the fitted mass,
the mass beyond ``W`` folded into ``d = W`` as the paper does (:func:`packcache.budget.decay_ratios`), shares
made non-increasing (pool-adjacent-violators), each distance capped at one whole frame, and rounded to whole
tokens so that ``round(ratio * visual_per_frame)`` sums exactly to the total.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy.optimize import OptimizeWarning, curve_fit

from packcache.budget import Budget, BudgetError, _today, _version

__all__ = ["DecayFit", "FitReport", "fit_decay", "fit_stats", "allocate", "budget_from_stats", "shares_from_fit"]

MODELS = ("exponential", "power", "exponential_floor")
_PARAMS = {"exponential": 2, "power": 2, "exponential_floor": 3}


def _exponential(d: np.ndarray, c: float, rho: float) -> np.ndarray:
    return c * np.power(rho, d)


def _power(d: np.ndarray, c: float, alpha: float) -> np.ndarray:
    return c * np.power(d, -alpha)


def _exponential_floor(d: np.ndarray, c: float, rho: float, floor: float) -> np.ndarray:
    return c * np.power(rho, d) + floor


@dataclass(frozen=True)
class DecayFit:
    """Fits of mass vs distance. ``rho``/``rho_se`` are the exponential's; ``model`` is the AIC choice."""

    model: str
    c: float
    rho: float
    rho_se: float | None
    c_power: float
    alpha: float
    alpha_se: float | None
    aic: dict[str, float]
    bic: dict[str, float]
    r2: dict[str, float]
    n: int
    c_floor: float = 0.0
    rho_floor: float = float("nan")
    rho_floor_se: float | None = None
    floor: float = 0.0
    distances: tuple[int, ...] = field(default=(), repr=False)
    observed: tuple[float, ...] = field(default=(), repr=False)

    def predict(self, d: np.ndarray | Sequence[int], model: str | None = None) -> np.ndarray:
        """Fitted mass at distances ``d`` under ``model`` (default: the selected one)."""
        d = np.asarray(d, dtype=float)
        model = model or self.model
        if model == "exponential":
            return _exponential(d, self.c, self.rho)
        if model == "exponential_floor":
            return _exponential_floor(d, self.c_floor, self.rho_floor, self.floor)
        return _power(d, self.c_power, self.alpha)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (no NaN: undefined values are ``None``)."""
        def clean(x):
            return None if x is None or not math.isfinite(x) else round(float(x), 6)
        return {"model": self.model, "rho": clean(self.rho), "rho_se": clean(self.rho_se), "C": clean(self.c),
                "alpha": clean(self.alpha), "alpha_se": clean(self.alpha_se),
                "rho_excess": clean(self.rho_floor), "rho_excess_se": clean(self.rho_floor_se),
                "floor": clean(self.floor), "C_excess": clean(self.c_floor),
                "aic": {k: clean(v) for k, v in self.aic.items()}, "bic": {k: clean(v) for k, v in self.bic.items()},
                "r2": {k: clean(v) for k, v in self.r2.items()}, "n": self.n}


def fit_decay(distances: Sequence[int] | np.ndarray, mass: Sequence[float] | np.ndarray,
              stderr: Sequence[float] | np.ndarray | None = None) -> DecayFit:
    """Fit ``mass`` (mean attention on the frame at each distance >= 1) with both models; NaN points are skipped.

    Raises ``ValueError`` with fewer than two usable distances.
    """
    d = np.asarray(distances, dtype=float)
    y = np.asarray(mass, dtype=float)
    ok = np.isfinite(y)
    if stderr is not None:
        se = np.asarray(stderr, dtype=float)
        ok &= np.isfinite(se)
    d, y = d[ok], np.maximum(y[ok], 0.0)
    n = len(d)
    if n < 2:
        raise ValueError(f"a decay fit needs at least 2 distances with data, got {n}")
    if stderr is not None:
        floor = max(1e-3 * float(y.max()), 1e-12)
        sigma = np.maximum(se[ok], floor)
    else:
        sigma = np.ones(n)
    results: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    pos = np.maximum(y, 1e-12)
    slope, icpt = np.polyfit(d, np.log(pos), 1)
    guesses = {
        "exponential": (_exponential, [float(np.exp(icpt)), float(np.clip(np.exp(slope), 1e-3, 1.0))],
                        ([0.0, 1e-6], [np.inf, 1.0])),
        "power": (_power, [float(y[0] * d[0]) if y[0] > 0 else 1.0, 1.0], ([0.0, 0.0], [np.inf, 20.0])),
        "exponential_floor": (_exponential_floor, [max(float(y[0] - y.min()), 1e-6) / 0.5, 0.5, 0.9 * float(y.min())],
                              ([0.0, 1e-6, 0.0], [np.inf, 1.0, np.inf])),
    }
    for name, (fn, p0, bounds) in guesses.items():
        if n <= _PARAMS[name] and name == "exponential_floor":  # as many parameters as points: no fit
            results[name] = (np.full(_PARAMS[name], np.nan), np.full((2, 2), np.inf))
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", OptimizeWarning)
            try:
                popt, pcov = curve_fit(fn, d, y, p0=p0, sigma=sigma, absolute_sigma=stderr is not None,
                                       bounds=bounds, maxfev=20000)
            except RuntimeError:
                popt, pcov = np.asarray(p0, dtype=float), np.full((2, 2), np.inf)
        results[name] = (popt, pcov)
    aic, bic, r2 = {}, {}, {}
    tss = float(((y - y.mean()) ** 2).sum())
    for name, (popt, _) in results.items():
        if n <= _PARAMS[name] and name == "exponential_floor":
            aic[name] = bic[name] = r2[name] = float("nan")
            continue
        pred = guesses[name][0](d, *popt)
        rss_w = float((((y - pred) / sigma) ** 2).sum())
        loglik_term = n * math.log(max(rss_w / n, 1e-300))
        k = _PARAMS[name]
        aic[name] = loglik_term + 2 * k
        bic[name] = loglik_term + k * math.log(n)
        rss = float(((y - pred) ** 2).sum())
        r2[name] = 1.0 - rss / tss if tss > 0 else (1.0 if rss < 1e-18 else 0.0)
    # the 3-parameter model needs a spare point; among near-ties (AIC within 2) the simpler model wins
    candidates = [m for m in MODELS if n > _PARAMS[m]] or ["exponential"]  # 2 points: an exact exponential
    top = min(aic[m] for m in candidates)
    best = min((m for m in candidates if aic[m] <= top + 2.0), key=lambda m: (_PARAMS[m], aic[m]))

    def se_of(pcov: np.ndarray, k: int) -> float | None:
        v = float(pcov[1, 1])
        return math.sqrt(v) if n > k and math.isfinite(v) and v >= 0 else None

    (c, rho), pcov_e = results["exponential"]
    (cp, alpha), pcov_p = results["power"]
    (cf, rhof, floor), pcov_f = results["exponential_floor"]
    return DecayFit(best, float(c), float(rho), se_of(pcov_e, 2), float(cp), float(alpha), se_of(pcov_p, 2), aic, bic,
                    r2, n, float(cf), float(rhof), se_of(pcov_f, 3), float(floor), tuple(int(x) for x in d),
                    tuple(float(x) for x in y))


# --------------------------------------------------------------------------------------------------------
@dataclass
class FitReport:
    """Every fit for one statistics object: per layer, per (layer, head), per (layer, kv head), and global."""

    global_fit: DecayFit
    per_layer: list[DecayFit]
    per_head: list[list[DecayFit | None]]
    per_kv_head: list[list[DecayFit]]
    shares: dict[str, np.ndarray]  # [L, H] mean shares: text, cond, special, current, history
    distances: np.ndarray
    mean: np.ndarray  # [L, H, D] mean mass by distance
    stderr: np.ndarray

    def anchor_share(self) -> np.ndarray:
        """Mean share of text + condition (+ specials) per layer ``[L]``."""
        s = self.shares
        return (s["text"] + s["cond"] + s["special"]).mean(-1)

    def summary_rows(self) -> list[dict[str, Any]]:
        """One row per layer: shares, fitted rho (with standard error), the selected model (and, for the floor
        model, the decay rate of the excess over the floor and the floor)."""
        rows = []
        for layer, fit in enumerate(self.per_layer):
            rows.append({"layer": layer, "text": float(self.shares["text"][layer].mean()),
                         "cond": float(self.shares["cond"][layer].mean()),
                         "special": float(self.shares["special"][layer].mean()),
                         "current": float(self.shares["current"][layer].mean()),
                         "history": float(self.shares["history"][layer].mean()),
                         "rho": fit.rho, "rho_se": fit.rho_se, "model": fit.model, "r2": fit.r2[fit.model],
                         "rho_excess": fit.rho_floor if fit.model == "exponential_floor" else None,
                         "floor": fit.floor if fit.model == "exponential_floor" else None})
        return rows


def _pooled(mean: np.ndarray, err: np.ndarray, axis: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Average profiles over ``axis``; standard error of the average (independent errors)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # distances without data stay NaN
        m = np.nanmean(mean, axis=axis)
    count = np.prod([mean.shape[a] for a in axis])
    e = np.sqrt(np.nansum(err ** 2, axis=axis)) / count
    return m, e


def fit_stats(stats) -> FitReport:
    """Fit every layer, head and kv head of :class:`probes.AttentionStats` (needs >= 2 history distances)."""
    distances, mean, err = stats.distance_profile(first=1)
    usable = np.isfinite(mean[0, 0])
    if usable.sum() < 2:
        raise BudgetError(f"the statistics cover {int(usable.sum())} history distance(s); a decay fit needs 2 or "
                          "more: profile clips with more frames")
    n_layers, n_heads = mean.shape[:2]
    group = n_heads // stats.num_kv_heads
    g_mean, g_err = _pooled(mean, err, (0, 1))
    global_fit = fit_decay(distances, g_mean, g_err)
    per_layer = [fit_decay(distances, *(_pooled(mean[layer], err[layer], (0,)))) for layer in range(n_layers)]

    def safe(m, e):
        try:
            return fit_decay(distances, m, e)
        except ValueError:
            return None

    per_head = [[safe(mean[layer, h], err[layer, h]) for h in range(n_heads)] for layer in range(n_layers)]
    per_kv = [[fit_decay(distances, *_pooled(mean[layer, k * group:(k + 1) * group], err[layer, k * group:(k + 1) *
                                                                                          group], (0,)))
               for k in range(stats.num_kv_heads)] for layer in range(n_layers)]
    return FitReport(global_fit, per_layer, per_head, per_kv, stats.group_shares(), distances, mean, err)


# --------------------------------------------------------------------------------------------------------
def _non_increasing(x: np.ndarray) -> np.ndarray:
    """Closest non-increasing sequence in least squares (pool adjacent violators)."""
    blocks: list[list[float]] = []  # [sum, count]
    for v in x:
        blocks.append([float(v), 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] < blocks[-1][0] / blocks[-1][1]:
            s, c = blocks.pop()
            blocks[-1][0] += s
            blocks[-1][1] += c
    return np.concatenate([np.full(int(c), s / c) for s, c in blocks])


def shares_from_fit(fit: DecayFit, window: int, horizon: int | None = None, sharpness: float = 1.0) -> np.ndarray:
    """Budget shares of distances ``1..window`` (sum 1, non-increasing) from the fitted mass.

    The mass beyond ``window`` is folded into ``d = window``: in closed form for an exponential with
    ``rho < 1`` (as the paper does), else summed up to ``horizon`` (default: the largest fitted distance). For the
    exponential over a floor only the decaying part ``C * rho**d`` counts.
    Shares are proportional to ``mass ** sharpness``: 1 is the paper's proportional rule; larger values favour
    the frames with the most mass (the limit keeps whole frames in order of mass).
    """
    d = np.arange(1, window + 1, dtype=float)
    if fit.model == "exponential_floor":  # only the part that decays with distance says which frame to keep
        c, rho = fit.c_floor, fit.rho_floor
        pred = _exponential(d, c, rho)
    else:
        c, rho = fit.c, fit.rho
        pred = fit.predict(d)
    if fit.model in ("exponential", "exponential_floor") and rho < 1.0:
        pred[-1] = c * rho ** window / (1.0 - rho)
    else:
        top = max(window, horizon or max(fit.distances, default=window))
        pred[-1] = float(fit.predict(np.arange(window, top + 1)).sum())
    pred = np.maximum(pred, 0.0)
    if pred.max() > 0:
        pred = (pred / pred.max()) ** sharpness
    if not np.isfinite(pred).all() or pred.sum() <= 0:
        pred = np.ones(window)
    return _non_increasing(pred / pred.sum())


def allocate(shares: np.ndarray, total: int, cap: int) -> list[int]:
    """Whole-token counts per distance: proportional to ``shares``, each <= ``cap``, summing to ``total``,
    non-increasing when ``shares`` is."""
    w = len(shares)
    if total > w * cap:
        raise BudgetError(f"{total} history tokens do not fit in a window of {w} frames of {cap} visual tokens")
    x = np.zeros(w)
    free = np.ones(w, dtype=bool)
    remaining = float(total)
    while free.any():  # water-filling under the cap
        s = shares[free]
        part = remaining * s / s.sum() if s.sum() > 0 else np.full(free.sum(), remaining / free.sum())
        over = part > cap
        if not over.any():
            x[free] = part
            break
        idx = np.flatnonzero(free)[over]
        x[idx] = cap
        free[idx] = False
        remaining -= cap * len(idx)
    counts = np.floor(x + 1e-9).astype(int)
    short = total - int(counts.sum())
    order = sorted(range(w), key=lambda i: (-(x[i] - counts[i]), i))
    for i in order[:short]:
        counts[i] += 1
    return [int(c) for c in counts]


def budget_from_stats(stats, *, target_frames: float | None = None, target_tokens: int | None = None,
                      window: int = 4, per_kv_head: bool = False, model_id: str | None = None,
                      report: FitReport | None = None, sharpness: float = 1.0,
                      selection: str = "novelty") -> Budget:
    """Turn :class:`probes.AttentionStats` into a fitted :class:`Budget`.

    Give exactly one target: ``target_frames`` (history worth that many frames of visual tokens; the paper uses
    1) or ``target_tokens`` (the whole cache once packed: anchors + history + the specials of the ``window``
    frames). Every layer (and kv head) keeps the same number of history tokens; ``sharpness`` is the exponent of
    :func:`shares_from_fit`; ``selection`` is the in-frame rule (``"uniform_grid"``, the paper's, or ``"novelty"``).
    Raises :class:`BudgetError`.
    """
    layout = stats.layout
    if (target_frames is None) == (target_tokens is None):
        raise BudgetError("give exactly one target: target_frames or target_tokens")
    if window < 1:
        raise BudgetError(f"window must be >= 1, got {window}")
    if not sharpness > 0 or not math.isfinite(sharpness):
        raise BudgetError(f"sharpness must be a positive number, got {sharpness}")
    visual = layout.visual_per_frame
    specials = layout.tokens_per_frame - visual
    if target_tokens is not None:
        anchors = layout.anchor_tokens
        if target_tokens < anchors:
            raise BudgetError(f"target of {target_tokens} tokens is smaller than the {anchors} anchor tokens "
                              f"(text, condition and specials) of this layout")
        history = target_tokens - anchors - window * specials
        if history < 0:
            raise BudgetError(f"target of {target_tokens} tokens leaves no room for the {window * specials} special "
                              f"tokens of a {window}-frame window after the {anchors} anchor tokens")
        target = {"tokens": int(target_tokens)}
    else:
        if target_frames <= 0:
            raise BudgetError(f"target_frames must be > 0, got {target_frames}")
        history = round(target_frames * visual)
        target = {"frames": float(target_frames)}
    if history > window * visual:
        raise BudgetError(f"a history of {history} tokens exceeds what a {window}-frame window holds "
                          f"({window * visual}); raise the window")
    report = report or fit_stats(stats)
    horizon = int(report.distances[np.isfinite(report.mean[0, 0])].max())

    def ratios(fit: DecayFit) -> list[float]:
        counts = allocate(shares_from_fit(fit, window, horizon, sharpness), history, visual)
        return [c / visual for c in counts]

    if per_kv_head:
        keep = [[ratios(fit) for fit in layer] for layer in report.per_kv_head]
    else:
        keep = [ratios(fit) for fit in report.per_layer]
    anchor = report.anchor_share()
    per_layer = [{**fit.to_dict(), "anchor_share": round(float(anchor[i]), 6)} for i, fit in
                 enumerate(report.per_layer)]
    mid = model_id or stats.model_id
    return Budget(
        model={"id": mid, "num_layers": stats.num_layers, "num_heads": stats.num_heads,
               "num_kv_heads": stats.num_kv_heads},
        layout=layout.summary(),
        decay={"model": report.global_fit.model, "global": report.global_fit.to_dict(), "per_layer": per_layer,
               "per_kv_head": [[f.to_dict() for f in layer] for layer in report.per_kv_head] if per_kv_head else None},
        window=window,
        keep_ratios=keep,
        selection=selection,
        provenance={"model_id": mid, "num_samples": int(stats.num_samples), "date": _today(),
                    "packcache_version": _version(), "source": "fitted", "target": target,
                    "history_tokens": int(history), "allocation": {"rule": "mass**sharpness", "sharpness": sharpness}},
    )
