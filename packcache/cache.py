"""CompactCache: a transformers ``DynamicCache`` that knows who every cached slot is and compacts at frame boundaries.

Storage contract (per layer, beside the ``DynamicLayer`` tensors ``keys/values [B, kv_heads, S, D]``):

* ``slot_tokens[layer]`` -- ``LongTensor [kv_heads, S]``: the :class:`~packcache.layout.SequenceLayout` index of
  the token each slot holds, so group, frame, grid cell and true position are layout lookups;
* every layer and kv head holds the same number of slots ``S`` (policies guarantee it), so the stock sdpa and
  eager masks of transformers apply unchanged.

Tokens are announced with :meth:`feed` before each forward; positions come from :meth:`position_ids`, which
reads the layout (plus the temporal shift of rebasing) and never the cache length. :meth:`compact` applies the
policy between forwards. Inside :meth:`frozen`, forwards attend to the cache without appending to it (the
masked-decoding iterations of AR-DF, whose keys are dropped afterwards anyway).
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from transformers import DynamicCache

from packcache.layout import SequenceLayout
from packcache.policies.base import CachePolicy, SlotView
from packcache.rope import RotaryLayout, position_dims, rotary_layout_of

__all__ = ["CompactCache", "CompactionRecord", "attach", "cache_kwargs", "decoder_module", "passed_cache"]


@dataclass(frozen=True)
class CompactionRecord:
    """One policy application: before/after slot counts and wall time."""

    next_frame: int
    slots_before: int
    slots_after: int
    seconds: float


def _decoder_shape(model: torch.nn.Module) -> tuple[int, int]:
    config = model.config.get_text_config(decoder=True)
    heads = config.num_attention_heads
    return config.num_hidden_layers, getattr(config, "num_key_value_heads", None) or heads


class CompactCache(DynamicCache):
    """A ``DynamicCache`` with per-slot layout metadata, policy-driven compaction and optional temporal rebasing.

    Args:
        policy: the cache policy applied at frame boundaries.
        layout: the layout of the whole sequence being generated.
        model: the model (gives layer and kv-head counts, and the rotary layout when ``rebase``).
        rebase: renumber kept frames contiguously in time after each compaction (3-D rotary models only).
        num_layers / num_kv_heads / rotary: explicit shape and rotary layout when no model is given.
    """

    def __init__(
        self,
        policy: CachePolicy,
        layout: SequenceLayout,
        *,
        model: torch.nn.Module | None = None,
        rebase: bool = False,
        num_layers: int | None = None,
        num_kv_heads: int | None = None,
        rotary: RotaryLayout | None = None,
    ) -> None:
        super().__init__()
        if model is not None:
            num_layers, num_kv_heads = _decoder_shape(model)
            if rebase and rotary is None:
                rotary = rotary_layout_of(model)
        if num_layers is None or num_kv_heads is None:
            raise ValueError("CompactCache needs a model, or num_layers and num_kv_heads")
        policy.check(layout, num_layers=num_layers, num_kv_heads=num_kv_heads)
        self.policy = policy
        self.layout = layout
        self.num_layers = num_layers
        self.num_kv_heads = num_kv_heads
        self.rebase = rebase
        self.rotary = rotary
        if rebase and rotary is None:
            raise ValueError("rebase=True needs the model or an explicit rotary layout")
        self.slot_tokens: list[torch.Tensor] = [torch.zeros(num_kv_heads, 0, dtype=torch.long)
                                                for _ in range(num_layers)]
        self.compactions: list[CompactionRecord] = []
        self.tokens_fed = 0
        self._incoming: torch.Tensor | None = None
        self.token_ids: torch.Tensor | None = None  # [rows, num_tokens], -1 where nothing was fed with ids
        self._frozen = False
        self._frame_time: dict[int, int] = {}

    # ----------------------------------------------------------------------------------------------------
    # feeding tokens
    def feed(self, tokens: slice | np.ndarray | torch.Tensor, ids: np.ndarray | torch.Tensor | None = None) -> None:
        """Announce the layout indices of the tokens of the next forward, and optionally their token ids
        ``[rows, n]`` (recorded in :attr:`token_ids` for content-aware policies; a later feed overwrites)."""
        idx = torch.arange(self.layout.num_tokens)[tokens] if isinstance(tokens, slice) else torch.as_tensor(tokens)
        idx = idx.long().flatten()
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= self.layout.num_tokens):
            raise IndexError(f"token indices outside the layout's {self.layout.num_tokens} tokens")
        if ids is not None:
            ids = torch.as_tensor(ids).long()
            ids = ids.view(1, -1) if ids.ndim == 1 else ids
            if ids.ndim != 2 or ids.shape[1] != idx.numel():
                raise ValueError(f"feed(): ids must be [rows, {idx.numel()}] for {idx.numel()} tokens, "
                                 f"got shape {tuple(ids.shape)}")
            if self.token_ids is None or self.token_ids.shape[0] != ids.shape[0]:
                self.token_ids = torch.full((ids.shape[0], self.layout.num_tokens), -1, dtype=torch.long)
            self.token_ids[:, idx] = ids
        self._incoming = idx
        self.tokens_fed = max(self.tokens_fed, int(idx.max()) + 1) if idx.numel() else self.tokens_fed

    @property
    def incoming(self) -> torch.Tensor | None:
        """Layout indices announced by the last :meth:`feed` (the queries of the current forward)."""
        return self._incoming

    @property
    def is_frozen(self) -> bool:
        """True inside :meth:`frozen`: forwards attend to ``slot_tokens`` plus :attr:`incoming`, appending nothing."""
        return self._frozen

    def position_ids(self, tokens: slice | np.ndarray | torch.Tensor, *, dims: int = 3) -> torch.Tensor:
        """Absolute position ids of ``tokens`` (``[1, n]`` or ``[3, 1, n]``), shifted in time if rebasing."""
        pos = self.layout.position_ids(tokens, dims=dims)
        if not self.rebase or dims == 1:
            return pos
        idx = np.arange(self.layout.num_tokens)[tokens] if isinstance(tokens, slice) else np.asarray(tokens)
        frames = self.layout.frame[idx]
        shift = np.zeros(len(idx), dtype=np.int64)
        for f in np.unique(frames[frames >= 0]):
            shift[frames == f] = self._time_of(int(f)) - int(self.layout.frame_time(int(f)))
        pos = pos.clone()
        pos[0, 0] += torch.from_numpy(shift)
        return pos

    def _time_of(self, frame: int) -> int:
        """Current temporal position of ``frame``: where it was cached, or right after the kept frames."""
        if frame in self._frame_time:
            return self._frame_time[frame]
        rank = sum(1 for f in self._frame_time if f < frame)
        return int(self.layout.frame_time(rank))

    @contextmanager
    def frozen(self) -> Iterator[None]:
        """Forwards inside attend to the cache and to themselves, but append nothing to it."""
        self._frozen = True
        try:
            yield
        finally:
            self._frozen = False

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if self._incoming is None:
            raise RuntimeError("CompactCache: call cache.feed(token_indices) before a forward (or use attach())")
        if key_states.shape[-2] != self._incoming.numel():
            raise RuntimeError(f"CompactCache: fed {self._incoming.numel()} token indices, "
                               f"the forward brings {key_states.shape[-2]}")
        if self._frozen:
            while len(self.layers) <= layer_idx:
                self.layers.append(self.layer_class_to_replicate())
            layer = self.layers[layer_idx]
            if not layer.is_initialized or layer.keys.numel() == 0:
                return key_states, value_states
            return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)
        keys, values = super().update(key_states, value_states, layer_idx, *args, **kwargs)
        new = self._incoming.expand(self.num_kv_heads, -1)
        self.slot_tokens[layer_idx] = torch.cat([self.slot_tokens[layer_idx], new], dim=-1)
        if layer_idx == 0:
            frames = self.layout.frame[self._incoming.numpy()]
            for f in np.unique(frames[frames >= 0]).tolist():
                self._frame_time.setdefault(f, self._time_of(f))
        return keys, values

    # ----------------------------------------------------------------------------------------------------
    # compaction
    def slot_view(self, scores: torch.Tensor | None = None) -> SlotView:
        """The metadata a policy reads: ``[layers, kv_heads, S]`` layout indices (all layers hold S slots)."""
        return SlotView(token=torch.stack(self.slot_tokens), layout=self.layout, scores=scores, ids=self.token_ids)

    def compact(self, next_frame: int, scores: torch.Tensor | None = None) -> CompactionRecord | None:
        """Apply the policy before ``next_frame`` is generated; rebase temporal positions if enabled."""
        if not self.slot_tokens[0].numel():
            return None
        start = time.perf_counter()
        before = self.slot_tokens[0].shape[-1]
        keep = self.policy.keep(self.slot_view(scores), next_frame)
        if keep is not None:
            for layer_idx, layer in enumerate(self.layers):
                idx = keep[layer_idx]
                if bool((idx == idx[:1]).all()):
                    layer.keys = layer.keys.index_select(-2, idx[0])
                    layer.values = layer.values.index_select(-2, idx[0])
                else:
                    gather = idx[None, :, :, None].expand(layer.keys.shape[0], -1, -1, layer.keys.shape[-1])
                    layer.keys = layer.keys.gather(-2, gather)
                    layer.values = layer.values.gather(-2, gather)
                self.slot_tokens[layer_idx] = self.slot_tokens[layer_idx].gather(-1, idx)
        if self.rebase:
            self._rebase()
        record = CompactionRecord(next_frame, before, self.slot_tokens[0].shape[-1], time.perf_counter() - start)
        self.compactions.append(record)
        return record

    def _rebase(self) -> None:
        """Renumber the kept frames 0, 1, 2, ... in time; re-rotate only the temporal channels of their keys."""
        present = set()
        for tokens in self.slot_tokens:
            f = self.layout.frame[tokens.unique().numpy()]
            present.update(f[f >= 0].tolist())
        kept = sorted(present)
        target = {f: int(self.layout.frame_time(rank)) for rank, f in enumerate(kept)}
        delta = {f: target[f] - self._time_of(f) for f in kept}
        self._frame_time = target
        if not any(delta.values()):
            return
        table = np.zeros(int(self.layout.frame.max()) + 2, dtype=np.int64)
        for f, d in delta.items():
            table[f] = d
        slot_delta_of_token = torch.from_numpy(table[self.layout.frame])  # frame -1 maps to the zero sentinel
        for layer_idx, layer in enumerate(self.layers):
            shift = slot_delta_of_token[self.slot_tokens[layer_idx]]
            layer.keys = self.rotary.rotate_time(layer.keys, shift)

    # ----------------------------------------------------------------------------------------------------
    # accounting
    def kv_bytes(self) -> int:
        """Bytes held by key and value tensors over all layers."""
        return sum(t.numel() * t.element_size() for layer in self.layers if layer.is_initialized
                   for t in (layer.keys, layer.values))

    def slots_per_layer(self) -> list[int]:
        """Cached slots in each layer."""
        return [t.shape[-1] for t in self.slot_tokens]


@contextmanager
def attach(model: torch.nn.Module, cache: CompactCache, *, dims: int | None = None) -> Iterator[CompactCache]:
    """Drive ``cache`` from transformers' ``generate()``: a decoder forward pre-hook feeds layout indices, sets
    absolute (optionally rebased) position ids, and compacts when a frame has just been completed.

    Example::

        cache = CompactCache(PackCache(Budget.load("budget.json")), layout, model=model)
        with attach(model, cache):
            model.generate(input_ids, past_key_values=cache, max_new_tokens=n)

    ``dims`` is 3 for M-RoPE models (detected from ``rope_parameters.mrope_section``), else 1.
    """
    decoder = decoder_module(model)
    dims = dims or position_dims(model)
    layout = cache.layout

    def hook(module, args, kwargs):
        if passed_cache(kwargs) is not cache:
            return None
        ids = kwargs.get("input_ids", args[0] if args else None)
        q = (ids if ids is not None else kwargs["inputs_embeds"]).shape[1]
        n = cache.tokens_fed
        offset = n - layout.first_frame_token
        if n and offset > 0 and offset % layout.tokens_per_frame == 0:
            cache.compact(offset // layout.tokens_per_frame)
        tokens = slice(n, n + q)
        cache.feed(tokens, ids.cpu() if ids is not None else None)
        kwargs["position_ids"] = cache.position_ids(tokens, dims=dims).to(
            (ids if ids is not None else kwargs["inputs_embeds"]).device)
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.ndim == 2:
            if not bool(mask.all()):
                raise ValueError("attach(): padded batches are not supported; pass unpadded inputs")
            kwargs["attention_mask"] = None
        return args, kwargs

    handle = decoder.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield cache
    finally:
        handle.remove()


def cache_kwargs(model: torch.nn.Module, cache: object) -> dict:
    """``{"cache": cache}`` for a forward that takes ``cache`` (transformers >= 5.24), else
    ``{"past_key_values": cache}``."""
    return {"cache" if _forward_takes_cache(type(model)) else "past_key_values": cache}


@functools.cache
def _forward_takes_cache(cls: type) -> bool:
    return "cache" in inspect.signature(cls.forward).parameters  # once per class, not per forward


def passed_cache(kwargs: dict) -> object | None:
    """The cache a decoder forward received: ``cache`` (transformers >= 5.24) or ``past_key_values``."""
    return kwargs.get("cache", kwargs.get("past_key_values"))


def decoder_module(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder stack whose forward receives the cache (``model.model[.language_model]``)."""
    inner = getattr(model, "model", model)
    return getattr(inner, "language_model", inner)
