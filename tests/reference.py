"""Independent references for exactness tests: one full forward with per-layer (per-head) masks that hide what a
compact cache dropped."""

from __future__ import annotations

from contextlib import contextmanager

import torch


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
