"""The probing attention backend: the normal attention output plus exact per-head attention mass by token group.

How the masses come with the output: for a chunk of query rows (frames ``f_lo..f_hi``), every key gets a one-hot
row ``A`` over columns text, cond, special, future, and one per recent frame ``f_lo-D+1..f_hi`` (``D`` =
``max_distance``). Attention with ``q' = [q | 0]``, ``k' = [k | 0]``, ``v' = [v | A]`` (explicit scale) returns
``softmax(q k^T) [v | A]``: the first ``head_dim`` columns are the output, the others the exact softmax mass of
every query row on every column, mapped per row to distances ``d = query frame - key frame`` (``older``, beyond
``D``, is what the rest leaves of 1). Nothing materialises a score matrix.

On CPU the chunk's keys are split into up to three ranges: keys older than every recent frame (they only need
the text/cond/special columns, so a narrow copy with 3 extra columns serves them), the other keys every row sees,
and the causal block (or masked rest). Each range is one fused flash call
(``aten._scaled_dot_product_flash_attention_for_cpu``, which also returns the log-sum-exp), merged exactly; no
mask is built for plain causal attention. Elsewhere (or with dropout) one masked sdpa call per chunk is made.
Extra memory is ``O(chunk x keys)`` (a chunk's mask rows) plus widened copies of k and v (``O(keys)``).
The spatial maps of the most recent frames re-score each frame's rows against that frame's keys only and
rescale the in-frame softmax by the frame's mass.

Token identities: the layout indices of queries and keys come from, in order, an explicit :meth:`AttentionProbe.feed`,
a :class:`~packcache.cache.CompactCache` (``slot_tokens`` and ``incoming``), or a plain forward of the layout from
its start (queries ``S-q .. S-1``, keys ``0 .. S-1``; also right for a ``DynamicCache`` decoded in layout order).

Hook points (TransformerLens-style names): ``blocks.{i}.attn.hook_group_mass`` receives
``(mass [B, H, rows, G], info)`` and ``blocks.{i}.attn.hook_spatial`` receives ``(spatial [H, R, height, width],
info)`` for every chunk; ``info`` holds ``layer``, ``query_frame``, ``step`` and ``rows``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from packcache.cache import passed_cache
from packcache.layout import SequenceLayout, TokenGroup
from probes.stats import FIRST_DISTANCE, AttentionStats

__all__ = ["BACKEND", "AttentionProbe", "ProbeError", "attention_modules", "register_backend"]

BACKEND = "packcache_probe"
_ACTIVE: dict[int, AttentionProbe] = {}

HookFn = Callable[[torch.Tensor, dict[str, Any]], None]


class ProbeError(RuntimeError):
    """The probe cannot tell which tokens a forward's queries and keys are."""


def register_backend() -> None:
    """Register the probing backend (attention function and sdpa mask) with transformers; idempotent."""
    AttentionInterface.register(BACKEND, probe_attention_forward)
    AttentionMaskInterface.register(BACKEND, sdpa_mask)


def probe_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: plain sdpa for modules no probe watches, else output plus statistics."""
    probe = _ACTIVE.get(id(module))
    if probe is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    return probe._attend(module, query, key, value, attention_mask, dropout, scaling, is_causal)


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder self-attention modules (named ``*self_attn`` and carrying ``layer_idx``), in layer order."""
    mods = [m for name, m in model.named_modules() if name.endswith("self_attn") and hasattr(m, "layer_idx")]
    return sorted(mods, key=lambda m: m.layer_idx)


def _decoder_shape(model: torch.nn.Module, modules: list[torch.nn.Module]) -> tuple[int, int, int]:
    config = modules[0].config
    heads = config.num_attention_heads
    return len(modules), heads, getattr(config, "num_key_value_heads", None) or heads


class AttentionProbe:
    """Context manager that switches ``model`` to the probing backend and accumulates :class:`AttentionStats`.

    Example::

        with AttentionProbe(model, layout, num_steps=8) as probe:
            model(input_ids=ids, position_ids=layout.position_ids(dims=3))
        probe.stats.save("stats.npz")

    Args:
        model: a transformers model (or a module containing one) whose decoder attention is ``*self_attn``.
        layout: the layout of the sequence the forwards run over.
        stats: statistics to accumulate into (default: new, empty ones).
        max_distance / recent_frames / num_steps: axes of new statistics (see :class:`AttentionStats`).
        chunk_size: largest number of query rows per sdpa call.
        model_id: recorded in new statistics.
    """

    def __init__(self, model: torch.nn.Module, layout: SequenceLayout, *, stats: AttentionStats | None = None,
                 max_distance: int | None = None, recent_frames: int = 2, num_steps: int = 1,
                 chunk_size: int = 1024, model_id: str = "") -> None:
        self.model = model
        self.layout = layout
        self.modules = attention_modules(model)
        if not self.modules:
            raise ProbeError(f"{type(model).__name__} has no '*self_attn' attention modules with a layer_idx")
        n_layers, n_heads, n_kv = _decoder_shape(model, self.modules)
        if stats is None:
            model_id = model_id or getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__
            stats = AttentionStats.empty(model_id, n_layers, n_heads, n_kv, layout, max_distance=max_distance,
                                         recent_frames=recent_frames, num_steps=num_steps)
        if (stats.num_layers, stats.num_heads) != (n_layers, n_heads) or stats.layout != layout:
            raise ProbeError("the statistics were made for another model shape or layout")
        self.stats = stats
        self.chunk_size = chunk_size
        self._layer_of = {id(m): i for i, m in enumerate(self.modules)}
        self._hooks: dict[str, list[HookFn]] = {}
        self._handles: list[Any] = []
        self._caches: dict[int, Any] = {}
        self._fed: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self._step: int | None = None
        self._last_step = 0
        self._auto_step: dict[Any, tuple[tuple, int]] = {}
        self._saved_impl: list[tuple[Any, str]] = []
        # per-layout lookup tables (torch, for indexing by token tensors)
        self._group = torch.from_numpy(layout.group.copy())
        self._frame = torch.from_numpy(layout.frame.copy())
        self._row = torch.from_numpy(layout.row.copy())
        self._col = torch.from_numpy(layout.col.copy())

    # ----------------------------------------------------------------------------------------------------
    # attach / detach
    def __enter__(self) -> AttentionProbe:
        register_backend()
        try:
            for module in self.modules:
                _ACTIVE[id(module)] = self
                self._handles.append(module.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
            self._switch_implementation()
        except BaseException:
            self.detach()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    def detach(self) -> None:
        """Remove hooks and restore every config's attention implementation (safe to call twice)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module in self.modules:
            if _ACTIVE.get(id(module)) is self:
                del _ACTIVE[id(module)]
        for config, impl in reversed(self._saved_impl):
            config._attn_implementation_internal = impl
        self._saved_impl.clear()

    def _switch_implementation(self) -> None:
        from transformers import PreTrainedModel

        seen: set[int] = set()
        for module in self.model.modules():
            config = getattr(module, "config", None)
            if config is not None and hasattr(config, "_attn_implementation_internal") and id(config) not in seen:
                seen.add(id(config))
                self._saved_impl.append((config, config._attn_implementation_internal))
                for sub in getattr(config, "sub_configs", {}):
                    subconfig = getattr(config, sub, None)
                    if subconfig is not None and id(subconfig) not in seen:
                        seen.add(id(subconfig))
                        self._saved_impl.append((subconfig, subconfig._attn_implementation_internal))
        tops = [m for m in self.model.modules() if isinstance(m, PreTrainedModel)]
        done: set[int] = set()
        for top in tops:
            if id(top.config) not in done:
                top.set_attn_implementation(BACKEND)
                done.add(id(top.config))
        for module in self.modules:
            if module.config._attn_implementation != BACKEND:
                module.config._attn_implementation_internal = BACKEND

    def _pre_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        self._caches[self._layer_of[id(module)]] = passed_cache(kwargs)

    # ----------------------------------------------------------------------------------------------------
    # user controls
    @property
    def hook_names(self) -> list[str]:
        """Stable hook point names, ``blocks.{i}.attn.hook_group_mass`` and ``blocks.{i}.attn.hook_spatial``."""
        return [f"blocks.{i}.attn.{kind}" for i in range(len(self.modules)) for kind in ("hook_group_mass",
                                                                                         "hook_spatial")]

    @contextmanager
    def hooks(self, hooks: Mapping[str, HookFn]) -> Iterator[None]:
        """Call ``hooks[name](tensor, info)`` at the named hook points inside the block; always removed."""
        unknown = set(hooks) - set(self.hook_names)
        if unknown:
            raise KeyError(f"unknown hook point {sorted(unknown)[0]!r}; e.g. {self.hook_names[0]!r}")
        for name, fn in hooks.items():
            self._hooks.setdefault(name, []).append(fn)
        try:
            yield
        finally:
            for name, fn in hooks.items():
                self._hooks[name].remove(fn)

    def feed(self, queries: torch.Tensor | np.ndarray | slice, keys: torch.Tensor | np.ndarray | None = None
             ) -> None:
        """Name the layout indices of the next forwards' queries (and keys, ``[S]`` or ``[kv_heads, S]``).

        Without ``keys``, a forward with as many keys as queries attends to the queries themselves. ``feed(None)``
        returns to automatic resolution.
        """
        if queries is None:
            self._fed = None
            return
        q = torch.arange(self.layout.num_tokens)[queries] if isinstance(queries, slice) else torch.as_tensor(queries)
        k = None if keys is None else torch.as_tensor(keys).long()
        self._fed = (q.long().flatten(), k if k is None or k.ndim == 2 else k[None])

    @contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Record forwards inside as decoding step ``step`` (otherwise steps are counted automatically: the n-th
        consecutive forward over the same query tokens and cache is step n)."""
        previous, self._step = self._step, step
        try:
            yield
        finally:
            self._step = previous

    def next_sample(self) -> None:
        """Count one more sample in the statistics and restart automatic step counting."""
        self.stats.num_samples += 1
        self._auto_step.clear()

    # ----------------------------------------------------------------------------------------------------
    # token resolution
    def _tokens(self, layer: int, q: int, s: int) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self._caches.get(layer)
        if self._fed is not None:
            qtok, ktok = self._fed
            if ktok is None:
                if s != q:
                    raise ProbeError(f"feed() named {q} queries but no keys, and the forward has {s} keys")
                ktok = qtok[None]
        elif hasattr(cache, "slot_tokens") and hasattr(cache, "incoming"):
            slots, qtok = cache.slot_tokens[layer], cache.incoming
            if qtok is None:
                raise ProbeError("the CompactCache was not fed before the forward")
            if slots.shape[-1] == s:
                ktok = slots
            elif slots.shape[-1] + q == s:
                ktok = torch.cat([slots, qtok.expand(slots.shape[0], -1)], dim=-1)
            else:
                raise ProbeError(f"layer {layer}: {s} keys but the CompactCache holds {slots.shape[-1]} slots")
        else:
            qtok = torch.arange(s - q, s)
            ktok = torch.arange(s)[None]
        if qtok.numel() != q or ktok.shape[-1] != s:
            raise ProbeError(f"layer {layer}: the forward has {q} queries and {s} keys, the probe was told "
                             f"{qtok.numel()} and {ktok.shape[-1]}")
        top = max(int(qtok.max()), int(ktok.max()))
        if top >= self.layout.num_tokens:
            raise ProbeError(f"token index {top} lies outside the layout's {self.layout.num_tokens} tokens; "
                             "pass the layout of the whole sequence")
        return qtok, ktok

    def _current_step(self, cache: Any, qtok: torch.Tensor) -> int:
        if self._step is not None:
            return self._step
        sig = (qtok.numel(), int(qtok[0]), int(qtok[-1]), int(qtok.sum()))
        last = self._auto_step.get(id(cache))
        step = last[1] + 1 if last is not None and last[0] == sig else 0
        self._auto_step[id(cache)] = (sig, step)
        return step

    # ----------------------------------------------------------------------------------------------------
    # the attention computation
    def _attend(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                attention_mask: torch.Tensor | None, dropout: float, scaling: float | None,
                is_causal: bool | None) -> tuple[torch.Tensor, None]:
        layer = self._layer_of[id(module)]
        st = self.stats
        b, n_heads, q, dim = query.shape
        n_kv, s = key.shape[1], key.shape[2]
        dim_v = value.shape[-1]
        scale = scaling if scaling is not None else dim ** -0.5
        causal = attention_mask is None and (is_causal if is_causal is not None else getattr(module, "is_causal", True))
        qtok, ktok = self._tokens(layer, q, s)
        count = layer == 0
        if count:
            self._last_step = self._current_step(self._caches.get(layer), qtok)
            st.forwards += 1
        step = self._last_step
        qframe = self._frame[qtok]
        qvisual = (self._group[qtok] == TokenGroup.FRAME) | (self._group[qtok] == TokenGroup.COND)
        # key groups relative to a query frame: [kvh, s] with kvh 1 (shared keys) or n_kv
        kgroup, kframe = self._group[ktok], self._frame[ktok]
        kvisual_frame = kgroup == TokenGroup.FRAME
        base = torch.where(kgroup == TokenGroup.TEXT, 0, torch.where(kgroup == TokenGroup.COND, 1, 2))
        n_dist = st.num_groups - 1  # distance-space columns; the last group ("older") is 1 - the others
        per_kv = n_heads // n_kv
        frame_keys: dict[int, list[torch.Tensor]] = {}
        # Per chunk of query rows spanning frames f_lo..f_hi, keys get one-hot value columns: text, cond, special,
        # future (frames > f_hi), then one per frame f_a..f_hi (f_a = f_lo - max_distance + 1); visual keys of
        # older frames get none. q' = [q | 0], k' = [k | 0], v' = [v | onehot], kv heads repeated. Keys before
        # frame f_a only need the text/cond/special columns: a narrow copy (built once per layer) serves them.
        span = -(-self.chunk_size // self.layout.tokens_per_frame) + 1
        n_wide = FIRST_DISTANCE + st.max_distance + span

        def widen(x: torch.Tensor, extra: torch.Tensor | int) -> torch.Tensor:
            pad = x.new_zeros(*x.shape[:-1], extra) if isinstance(extra, int) else extra.to(x.dtype)
            return torch.cat([x, pad], dim=-1)

        old_code = torch.where(kvisual_frame, 3, base)  # visual keys of old frames: "older", no column
        onehot3 = torch.nn.functional.one_hot(old_code, 4)[..., :3]
        onehot3 = (onehot3.repeat_interleave(n_kv, 0) if onehot3.shape[0] == 1 else onehot3)[None].expand(b, -1, -1, -1)
        q3, k3 = widen(query, 3), widen(key, 3).repeat_interleave(per_kv, dim=1)
        v3 = widen(value, onehot3).repeat_interleave(per_kv, dim=1)
        q_ext = widen(query, n_wide)
        k_ext = widen(key, n_wide).repeat_interleave(per_kv, dim=1)
        v_ext = widen(value, n_wide).repeat_interleave(per_kv, dim=1)
        split = _can_split(query, dropout)
        ordered = bool((ktok[:, 1:] >= ktok[:, :-1]).all())
        out = query.new_empty(b, n_heads, q, dim_v)
        qf_all = qframe.numpy()
        for r0 in range(0, q, self.chunk_size):
            r1 = min(q, r0 + self.chunk_size)
            rows_mask, s_vis, prefix, diag = self._chunk_keys(attention_mask, causal, r0, r1, q, s)
            frames_here = qf_all[r0:r1][qf_all[r0:r1] >= 0]
            stats_rows = frames_here.size > 0
            f_lo = int(frames_here.min()) if stats_rows else 0
            f_hi = int(frames_here.max()) if stats_rows else 0
            f_a = max(f_lo - st.max_distance + 1, 0)
            old = 0  # keys [0, old) are text, cond, specials or visual keys of frames before f_a
            if split and ordered:
                first = self.layout.frame_slice(f_a).start if stats_rows else s + 1
                old = min(int(torch.searchsorted(ktok, torch.full((ktok.shape[0], 1), first)).min()), prefix)
            kf = kframe[:, old:s_vis]
            code = torch.where(kf > f_hi, 3, torch.where(kf < f_a, n_wide, FIRST_DISTANCE + kf - f_a))
            code = torch.where(kvisual_frame[:, old:s_vis], code, base[:, old:s_vis])
            onehot = torch.nn.functional.one_hot(code, n_wide + 1)[..., :n_wide].to(value.dtype)
            if onehot.shape[0] > 1:
                onehot = onehot.repeat_interleave(per_kv, dim=0)
            v_ext[:, :, old:s_vis, dim_v:] = onehot[None]
            if split:
                parts = []
                if old > 0:
                    parts.append((q3[:, :, r0:r1], k3[:, :, :old], v3[:, :, :old], None, False))
                if prefix > old:
                    parts.append((q_ext[:, :, r0:r1], k_ext[:, :, old:prefix], v_ext[:, :, old:prefix], None, False))
                if s_vis > prefix:
                    parts.append((q_ext[:, :, r0:r1], k_ext[:, :, prefix:s_vis], v_ext[:, :, prefix:s_vis],
                                  None if rows_mask is None else rows_mask[..., prefix:s_vis], diag))
                res = _merged_attention(parts, dim_v + n_wide, scale)
            else:
                res = torch.nn.functional.scaled_dot_product_attention(
                    q_ext[:, :, r0:r1], k_ext[:, :, :s_vis], v_ext[:, :, :s_vis], attn_mask=_dense_mask(
                        rows_mask, diag, prefix, s_vis, r1 - r0, query.device), dropout_p=dropout, scale=scale)
            out[:, :, r0:r1] = res[..., :dim_v]
            if not stats_rows:
                continue
            masses = self._to_distances(res[..., dim_v:], qf_all[r0:r1], f_a, f_hi, n_dist)
            for f in range(f_lo, f_hi + 1):  # rows of one query frame are contiguous
                where = np.flatnonzero(qf_all[r0:r1] == f)
                if not where.size:
                    continue
                a, z = r0 + int(where[0]), r0 + int(where[-1]) + 1
                m, rows = masses[:, :, a - r0:z - r0], qvisual[a:z]
                self._accumulate(layer, f, step, m, rows, count)
                info = {"layer": layer, "query_frame": f, "step": step, "rows": (a, z)}
                for fn in self._hooks.get(f"blocks.{layer}.attn.hook_group_mass", []):
                    fn(m, info)
                if st.recent_frames:
                    def visible(idx: torch.Tensor, a: int = a, z: int = z, rm=rows_mask, r0: int = r0
                                ) -> torch.Tensor | None:
                        if rm is not None:
                            return rm[..., a - r0:z - r0, :][..., idx]
                        if not causal:
                            return None
                        return (idx[None, :] <= torch.arange(s - q + a, s - q + z)[:, None])[None, None]

                    self._spatial(layer, f, query[:, :, a:z], key, ktok, visible, m, rows, scale, count, info,
                                  frame_keys)
        return out.transpose(1, 2).contiguous(), None

    @staticmethod
    def _chunk_keys(mask: torch.Tensor | None, causal: bool, r0: int, r1: int, q: int, s: int
                    ) -> tuple[torch.Tensor | None, int, int, bool]:
        """For query rows ``r0:r1``: their mask rows (``None`` without a mask), the number of leading keys any of
        them sees (``s_vis``), how many leading keys all of them see unmasked (``prefix``), and whether the
        remaining keys form a square causal block (``diag``)."""
        if mask is None:
            if not causal:
                return None, s, s, False
            return None, s - q + r1, s - q + r0, True
        rows = mask[..., r0:r1, :]
        seen = rows if rows.dtype == torch.bool else rows > torch.finfo(rows.dtype).min / 2
        flat = seen.flatten(0, -2)
        cols = flat.any(0).nonzero()
        s_vis = int(cols.max()) + 1 if cols.numel() else s
        blocked = (~flat[:, :s_vis]).any(0).nonzero()
        prefix = int(blocked.min()) if blocked.numel() else s_vis
        if rows.dtype != torch.bool and bool((rows[..., :prefix] != 0).any()):
            prefix = 0  # a non-zero additive bias is not plain visibility
        return rows[..., :s_vis], s_vis, prefix, False

    @staticmethod
    def _to_distances(wide: torch.Tensor, qf: np.ndarray, f_a: int, f_hi: int, n_dist: int) -> torch.Tensor:
        """Chunk masses over [text, cond, special, future, frames f_a..f_hi] -> per-row key groups [text, cond,
        special, future, d0..d{D-1}, older] (``older`` is what the other groups leave of 1)."""
        n_rows, n_wide = len(qf), wide.shape[-1]
        cmap = np.zeros((n_rows, n_wide, n_dist), dtype=np.float32)
        cmap[:, np.arange(4), np.arange(4)] = 1.0
        for col in range(FIRST_DISTANCE, FIRST_DISTANCE + f_hi - f_a + 1):
            kf = f_a + col - FIRST_DISTANCE
            d = qf - kf
            target = np.where(d < 0, 3, np.where(d < n_dist - FIRST_DISTANCE, FIRST_DISTANCE + d, -1))
            ok = (target >= 0) & (qf >= 0)
            cmap[np.flatnonzero(ok), col, target[ok]] = 1.0
        dist = torch.einsum("bhrw,rwg->bhrg", wide.float(), torch.from_numpy(cmap))
        return torch.cat([dist, 1.0 - dist.sum(-1, keepdim=True)], dim=-1)

    def _accumulate(self, layer: int, qf: int, step: int, masses: torch.Tensor, rows: torch.Tensor,
                    count: bool) -> None:
        st = self.stats
        m = masses.detach().double()[:, :, rows]  # [B, H, n, G]
        total = m.sum((0, 2)).cpu().numpy()
        st.arrays["mass"][layer, :, qf] += total
        st.arrays["mass_sq"][layer, :, qf] += (m * m).sum((0, 2)).cpu().numpy()
        n = int(rows.sum()) * m.shape[0]
        if count:
            st.arrays["queries"][qf] += n
        if step < st.num_steps:
            st.arrays["step_mass"][layer, :, step] += total
            if count:
                st.arrays["step_queries"][step] += n

    def _frame_keys(self, ktok: torch.Tensor, kf: int) -> list[torch.Tensor]:
        """Per key row (``[kvh, S]``), the key positions holding visual tokens of generated frame ``kf``."""
        sl = self.layout.frame_slice(kf)
        out = []
        for row in ktok:
            lo, hi = (int(x) for x in torch.searchsorted(row, torch.tensor([sl.start, sl.stop])))
            idx = torch.arange(lo, hi)
            if not bool((self._frame[row[idx]] == kf).all()):  # keys not sorted: fall back to a full scan
                idx = (self._frame[row] == kf).nonzero().flatten()
            out.append(idx[self._group[row[idx]] == TokenGroup.FRAME])
        return out

    def _spatial(self, layer: int, qf: int, query: torch.Tensor, key: torch.Tensor, ktok: torch.Tensor,
                 visible: Callable[[torch.Tensor], torch.Tensor | None], masses: torch.Tensor, rows: torch.Tensor,
                 scale: float, count: bool, info: dict[str, Any], frame_keys: dict[int, list[torch.Tensor]]) -> None:
        """Exact per-cell mass on the frames at distance ``d < recent_frames``: in-frame softmax x frame mass."""
        st, layout = self.stats, self.layout
        b, n_heads = query.shape[:2]
        n_kv = key.shape[1]
        per_kv = n_heads // n_kv
        n_rows = int(rows.sum()) * b
        if n_rows == 0:
            return
        grid = torch.zeros(n_heads, st.recent_frames, layout.height * layout.width, dtype=torch.float64)
        for d in range(st.recent_frames):
            kf = qf - d
            if kf < layout.cond_frames:
                continue
            if count:
                st.arrays["spatial_queries"][d] += n_rows
            if kf not in frame_keys:
                frame_keys[kf] = self._frame_keys(ktok, kf)
            per_row = frame_keys[kf]
            # one group of query heads per distinct key row (all heads at once when keys are shared)
            groups = [(slice(0, n_heads), per_row[0])] if len(per_row) == 1 else [
                (slice(j * per_kv, (j + 1) * per_kv), per_row[j]) for j in range(n_kv)]
            for heads, idx in groups:
                if not idx.numel():
                    continue
                k_sel = key[:, :, idx] if len(per_row) == 1 else key[:, heads.start // per_kv, idx][:, None]
                k_sel = k_sel.repeat_interleave(per_kv, dim=1) if len(per_row) == 1 else k_sel
                scores = (query[:, heads] @ k_sel.transpose(-1, -2)) * scale  # [B, h, c, n]
                m = visible(idx)
                if m is not None:
                    if m.shape[1] > 1:
                        m = m[:, heads]
                    scores = scores.masked_fill(~m, float("-inf")) if m.dtype == torch.bool else scores + m
                local = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0)
                weight = local * masses[:, heads, :, FIRST_DISTANCE + d, None].float()
                cells = weight[:, :, rows].sum((0, 2)).double()  # [h, n]
                tok = ktok[0 if len(per_row) == 1 else heads.start // per_kv, idx].numpy()
                flat = torch.from_numpy(layout.row[tok] * layout.width + layout.col[tok])
                grid[heads, d].index_add_(-1, flat, cells)
        grid_np = grid.view(n_heads, st.recent_frames, layout.height, layout.width).numpy()
        st.arrays["spatial"][layer] += grid_np
        for fn in self._hooks.get(f"blocks.{layer}.attn.hook_spatial", []):
            fn(grid.view(n_heads, st.recent_frames, layout.height, layout.width), info)


def _can_split(query: torch.Tensor, dropout: float) -> bool:
    """Whether the CPU flash kernel with log-sum-exp output can run (prefix and causal block as two calls)."""
    return (query.device.type == "cpu" and dropout == 0.0 and query.dtype in (torch.float32, torch.bfloat16,
                                                                               torch.float16)
            and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"))


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype != torch.bool:
        return mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def _dense_mask(rows_mask: torch.Tensor | None, diag: bool, prefix: int, s_vis: int, n: int,
                device: torch.device) -> torch.Tensor | None:
    """One boolean/additive mask for the chunk's ``s_vis`` keys (the portable path)."""
    if rows_mask is not None:
        return rows_mask
    if not diag:
        return None
    return (torch.arange(s_vis, device=device)[None, :] <= prefix + torch.arange(n, device=device)[:, None])[None, None]


def _merged_attention(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, bool]],
                      width: int, scale: float) -> torch.Tensor:
    """Attention over the union of key ranges, one CPU flash call per ``(q, k, v, mask, causal_block)`` part
    (value widths may differ; narrower ones are zero-padded), merged exactly through their log-sum-exps."""
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    outs, lses = [], []
    for q, k, v, mask, causal_block in parts:
        if causal_block:
            o, lse = flash(q, k, v, is_causal=True, scale=scale)
        elif mask is not None:
            m = _additive(mask, q.dtype).expand(q.shape[0], q.shape[1], -1, -1)
            o, lse = flash(q, k, v, attn_mask=m, scale=scale)
            # the kernel reports lse 0 (not -inf) for rows that see none of these keys
            seen = (mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2).any(-1)
            lse = torch.where(seen.expand_as(lse), lse, float("-inf"))
        else:
            o, lse = flash(q, k, v, scale=scale)
        if o.shape[-1] < width:
            o = torch.cat([o, o.new_zeros(*o.shape[:-1], width - o.shape[-1])], dim=-1)
        outs.append(o)
        lses.append(lse)
    if len(outs) == 1:
        return outs[0]
    total = torch.logsumexp(torch.stack(lses), dim=0)
    res = torch.zeros_like(outs[0], dtype=torch.float32)
    for o, lse in zip(outs, lses):
        w = (lse - total).exp()[..., None]
        res += torch.where(w > 0, o.float() * w, 0.0)
    return res.to(outs[0].dtype)
