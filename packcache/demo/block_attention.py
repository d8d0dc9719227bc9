"""AR-DF attention for the teacher-forced training sequence, computed block by block.

The training sequence (``text | clean frames 0..T-2 | masked copies of frames 1..T-1``) has a block structure:
text sees text; clean frame ``f`` sees text and clean frames ``0..f``; the masked copy of frame ``k`` sees text,
clean frames ``0..k-1`` and itself. One dense sdpa call with the 4-D mask computes every query against every key
and discards two thirds of the products. :data:`BACKEND` computes each query block against only the keys it may
see -- a contiguous prefix, plus its own block for a masked copy -- with unmasked sdpa calls. The result is the
same attention (tested against the masked dense call, forward and gradients) at about a third of the FLOPs.

The model calls it with ``model.set_attn_implementation(BACKEND)`` and ``ardf_blocks=...`` in the forward call;
without ``ardf_blocks`` it is plain masked sdpa.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

__all__ = ["BACKEND", "ArdfBlocks", "register_block_attention", "block_attention_forward"]

BACKEND = "packcache_ardf_blocks"


@dataclass(frozen=True)
class ArdfBlocks:
    """A partition of the sequence into blocks ``queries[i] = (start, stop)`` and, for each block, the indices of
    the blocks its queries see (``key_blocks[i]``, in sequence order; attention within them is unmasked)."""

    queries: tuple[tuple[int, int], ...]
    key_blocks: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        stops = [0] + [e for _, e in self.queries[:-1]]
        if [s for s, _ in self.queries] != stops or any(e <= s for s, e in self.queries):
            raise ValueError(f"query blocks must partition the sequence in order, got {self.queries}")
        if len(self.key_blocks) != len(self.queries) or any(
                not ks or list(ks) != sorted(set(ks)) or ks[-1] >= len(self.queries) for ks in self.key_blocks):
            raise ValueError("key_blocks must give each query block a sorted list of existing block indices")

    @classmethod
    def training_sequence(cls, text_tokens: int, tokens_per_frame: int, frames: int,
                          history_window: int = 0) -> ArdfBlocks:
        """The blocks of ``text | clean frames 0..frames-2 | masked copies of frames 1..frames-1``: text sees
        text, clean frame ``f`` sees text and clean frames ``0..f``, the copy of frame ``k`` sees text, clean
        frames ``0..k-1`` and itself. ``history_window`` w > 0 hides the history frames more than w frames back
        (never the text or the condition frame 0), as a sliding-window cache would."""
        n = frames - 1
        starts = [0] + [text_tokens + i * tokens_per_frame for i in range(2 * n)]
        stops = starts[1:] + [text_tokens + 2 * n * tokens_per_frame]

        def seen(frame: int) -> tuple[int, ...]:  # text and the clean frames before ``frame`` (block f + 1)
            first = max(1, frame - history_window) if history_window else 1
            return (0, 1) + tuple(f + 1 for f in range(first, frame))

        clean = [seen(f) + ((f + 1,) if f else ()) for f in range(n)]
        copies = [seen(k) + (n + k,) for k in range(1, n + 1)]
        return cls(tuple(zip(starts, stops)), ((0,), *clean, *copies))

    @property
    def length(self) -> int:
        """Tokens in the sequence."""
        return self.queries[-1][1]


def block_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            ardf_blocks: ArdfBlocks | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers attention function: ``query [B, H, L, D]`` block by block (``ardf_blocks``), else sdpa."""
    if ardf_blocks is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if query.shape[2] != ardf_blocks.length or key.shape[2] != ardf_blocks.length:
        raise ValueError(f"ardf_blocks cover {ardf_blocks.length} tokens, the forward has {query.shape[2]} queries "
                         f"and {key.shape[2]} keys (block attention is for a whole sequence without a cache)")
    groups = getattr(module, "num_key_value_groups", 1)
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    # split once into the query blocks (the backward of a split is one concatenation; slicing each block out
    # of the whole tensor would zero-fill a full-size gradient per slice)
    sizes = [e - s for s, e in ardf_blocks.queries]
    queries, keys, values = (x.split(sizes, dim=2) for x in (query, key, value))
    out = []
    for i, ranges in enumerate(ardf_blocks.key_blocks):
        k = torch.cat([keys[j] for j in ranges], dim=2)
        v = torch.cat([values[j] for j in ranges], dim=2)
        out.append(F.scaled_dot_product_attention(queries[i], k, v, dropout_p=dropout, scale=scaling))
    return torch.cat(out, dim=2).transpose(1, 2).contiguous(), None


def register_block_attention() -> None:
    """Register :data:`BACKEND` (attention function and sdpa mask) with transformers; idempotent."""
    AttentionInterface.register(BACKEND, block_attention_forward)
    AttentionMaskInterface.register(BACKEND, sdpa_mask)
