"""Independent references for exactness tests: one full forward with per-layer (per-head) masks that hide what a
compact cache dropped."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from packcache.cache import cache_kwargs


def output_of(model, out) -> torch.Tensor:
    """Logits for causal LMs, last hidden state for bare decoders."""
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def attention_modules(model) -> list[torch.nn.Module]:
    return [m for name, m in model.named_modules() if name.endswith("self_attn")]


@contextmanager
def per_layer_masks(model, masks: list[torch.Tensor]):
    """Replace the attention mask of layer ``i`` by ``masks[i]`` (``[1, H or 1, L, L]`` additive float)."""
    handles = []
    for i, module in enumerate(attention_modules(model)):
        def hook(mod, args, kwargs, mask=masks[i]):
            kwargs["attention_mask"] = mask
            return args, kwargs
        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def visibility_masks(n_tokens: int, chunks: list[slice], visible_before: list[list[torch.Tensor]],
                     num_heads: int, num_kv_heads: int, causal_within: bool = True) -> list[torch.Tensor]:
    """Build per-layer additive masks ``[1, num_heads, n, n]``.

    ``visible_before[c][layer]`` is ``[kv_heads, S]``: the layout indices cached when chunk ``c`` was fed.
    Tokens of a chunk also see their own chunk (causally, or bidirectionally when ``causal_within`` is False).
    """
    n_layers = len(visible_before[0])
    group = num_heads // num_kv_heads
    masks = []
    for layer in range(n_layers):
        allowed = torch.zeros(num_kv_heads, n_tokens, n_tokens, dtype=torch.bool)
        for c, chunk in enumerate(chunks):
            cached = visible_before[c][layer]
            for h in range(num_kv_heads):
                allowed[h, chunk, cached[h]] = True
            q = torch.arange(chunk.start, chunk.stop)
            own = (q[None, :] <= q[:, None]) if causal_within else torch.ones(len(q), len(q), dtype=torch.bool)
            allowed[:, chunk, chunk] = own
        allowed = allowed.repeat_interleave(group, dim=0)
        mask = torch.zeros(1, num_heads, n_tokens, n_tokens)
        mask.masked_fill_(~allowed[None], torch.finfo(mask.dtype).min)
        masks.append(mask)
    return masks


def frame_chunks(layout) -> list[slice]:
    """The forwards of a frame-by-frame decode: the prompt up to the end of frame 0, each later frame, the suffix."""
    chunks = [slice(0, layout.frame_slice(0).stop)] + [layout.frame_slice(f) for f in range(1, layout.num_frames)]
    if layout.suffix_specials:
        chunks.append(slice(chunks[-1].stop, layout.num_tokens))
    return chunks


def compacted_vs_masked(model, layout, policy, inputs, *, dims: int, chunks: list[slice] | None = None):
    """Decode ``layout`` chunk by chunk on a compacting cache, then run one full forward whose per-layer masks hide
    what the cache had dropped. ``inputs(sl)`` gives the forward's input kwargs (``input_ids`` or
    ``inputs_embeds``) for the tokens ``sl``. Returns ``(max |diff| vs the masked reference, cache, max |diff| vs
    an unmasked full forward)``; the last is the effect of dropping, to show the comparison is not vacuous."""
    from packcache import CompactCache

    chunks = chunks or frame_chunks(layout)
    cache = CompactCache(policy, layout, model=model)
    visible, outputs = [], []
    with torch.no_grad():
        for chunk in chunks:
            frames = layout.frame[chunk.start]
            cache.compact(int(frames) if frames >= 0 else layout.num_frames)
            visible.append([t.clone() for t in cache.slot_tokens])
            kwargs = inputs(chunk)
            cache.feed(chunk, kwargs.get("input_ids"))
            out = model(**kwargs, **cache_kwargs(model, cache), use_cache=True,
                        position_ids=cache.position_ids(chunk, dims=dims))
            outputs.append(output_of(model, out)[0])
    config = model.config.get_text_config(decoder=True)
    n = layout.num_tokens
    masks = visibility_masks(n, chunks, visible, config.num_attention_heads, config.num_key_value_heads)
    assert len(attention_modules(model)) == config.num_hidden_layers, "self_attn modules != decoder layers"
    with torch.no_grad(), per_layer_masks(model, masks):
        ref = output_of(model, model(**inputs(slice(0, n)), attention_mask=torch.zeros(1, 1, n, n),
                                     position_ids=layout.position_ids(dims=dims)))[0]
    with torch.no_grad():
        full = output_of(model, model(**inputs(slice(0, n)), position_ids=layout.position_ids(dims=dims)))[0]
    diff = max(float((out - ref[chunk]).abs().max()) for chunk, out in zip(chunks, outputs))
    effect = max(float((out - full[chunk]).abs().max()) for chunk, out in zip(chunks, outputs))
    return diff, cache, effect
