"""The demo video model: a stock transformers ``Qwen3VLTextModel`` (interleaved 3-D M-RoPE) plus a linear head
over the colour codebook. AR-DF attention (causal across frames, bidirectional within a frame) comes from a
4-D float mask built by :func:`ardf_mask`."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedModel, Qwen3VLTextConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel
from transformers.utils import ModelOutput

from packcache.cache import cache_kwargs
from packcache.demo.clips import ClipFormat

__all__ = ["DemoVideoConfig", "DemoVideoModel", "DemoVideoOutput", "ardf_mask", "load_demo_model",
           "DEFAULT_MODEL_DIR"]

#: Where the shipped checkpoint lives (repo ``data/demo-model``).
DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[2] / "data" / "demo-model"


#: The MLP width of a demo model unless its config (or ``--intermediate-size``) says otherwise.
DEFAULT_INTERMEDIATE_SIZE = 384


class DemoVideoConfig(Qwen3VLTextConfig):
    """A ``Qwen3VLTextConfig`` with the colour-head size; ``packcache_rotary`` names the rotary layout and
    ``packcache_video_start`` / ``packcache_condition_gap`` / ``packcache_bound_words`` the sequence format
    (:class:`~packcache.demo.clips.ClipFormat`)."""

    model_type = "packcache_demo_video"

    def __init__(self, num_colours: int = 6, packcache_rotary: str = "mrope_interleaved",
                 packcache_video_start: bool = False, packcache_condition_gap: int = 1,
                 packcache_bound_words: bool = False, **kwargs) -> None:
        defaults = dict(vocab_size=24, hidden_size=128, intermediate_size=DEFAULT_INTERMEDIATE_SIZE,
                        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4, head_dim=32,
                        max_position_embeddings=512,
                        rope_parameters={"rope_type": "default", "rope_theta": 1000.0, "mrope_section": [6, 5, 5]},
                        attn_implementation="sdpa", bos_token_id=None, eos_token_id=None, pad_token_id=None,
                        tie_word_embeddings=False)
        for key, value in defaults.items():
            kwargs.setdefault(key, value)
        super().__init__(**kwargs)
        self.num_colours = num_colours
        self.packcache_rotary = packcache_rotary
        self.packcache_video_start = packcache_video_start
        self.packcache_condition_gap = packcache_condition_gap
        self.packcache_bound_words = packcache_bound_words


@dataclass
class DemoVideoOutput(ModelOutput):
    """``logits [B, L, num_colours]`` and the cache (``cache``, as transformers >= 5.24 names it)."""

    logits: torch.Tensor | None = None
    cache: object | None = None

    @property
    def past_key_values(self) -> object | None:
        """The cache under its name before transformers 5.24."""
        return self.cache


class DemoVideoModel(PreTrainedModel):
    """``Qwen3VLTextModel`` + ``Linear(hidden, num_colours)``; loads and saves with ``from_pretrained`` /
    ``save_pretrained`` (safetensors + config.json)."""

    config_class = DemoVideoConfig
    base_model_prefix = "demo"
    _supports_sdpa = True
    _supports_attention_backend = True
    _no_split_modules = ["Qwen3VLTextDecoderLayer"]

    def __init__(self, config: DemoVideoConfig) -> None:
        super().__init__(config)
        self.model = Qwen3VLTextModel(config)
        self.head = nn.Linear(config.hidden_size, config.num_colours)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor,
        position_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> DemoVideoOutput:
        """``position_ids [3, B, L]`` (t, h, w) from the layout; ``attention_mask [B, 1, L, kv]`` additive float
        (:func:`ardf_mask`). Without a mask the decoder falls back to a causal one."""
        out = self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                         use_cache=use_cache, **cache_kwargs(self.model, past_key_values), **kwargs)
        cache = out.cache if hasattr(out, "cache") else out.past_key_values  # renamed in transformers 5.24
        return DemoVideoOutput(logits=self.head(out.last_hidden_state), cache=cache)


def ardf_mask(q_block: torch.Tensor, q_segment: torch.Tensor, k_block: torch.Tensor, k_segment: torch.Tensor,
              k_history: torch.Tensor | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """AR-DF additive mask ``[B, 1, q, k]`` from per-token block and segment ids (``[B, n]`` or ``[n]``).

    A query sees a key in its own segment (bidirectional within a frame), or a history key (``k_history``,
    default all) of an earlier block (causal across frames). Blocks: -1 for text, ``f`` for frame ``f``.
    """
    def b(x: torch.Tensor) -> torch.Tensor:
        return x if x.ndim == 2 else x[None]

    q_block, q_segment, k_block, k_segment = b(q_block), b(q_segment), b(k_block), b(k_segment)
    allowed = q_segment[:, :, None] == k_segment[:, None, :]
    earlier = k_block[:, None, :] < q_block[:, :, None]
    if k_history is not None:
        earlier &= b(k_history)[:, None, :]
    allowed |= earlier
    mask = torch.zeros(allowed.shape, dtype=dtype)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None]


def load_demo_model(path: str | os.PathLike | None = None, *, attn_implementation: str = "sdpa") -> DemoVideoModel:
    """Load the shipped (or another) demo checkpoint offline, in eval mode."""
    path = Path(path) if path is not None else DEFAULT_MODEL_DIR
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"no demo checkpoint at {path} (train one: python -m packcache.demo.train --out DIR)")
    model = DemoVideoModel.from_pretrained(path, attn_implementation=attn_implementation)
    try:
        needed = ClipFormat.of(model.config).vocab_size
    except ValueError as exc:
        raise ValueError(f"demo checkpoint {path}: {exc}") from None
    if model.config.vocab_size < needed:
        raise ValueError(f"demo checkpoint {path}: its sequence format needs {needed} token ids, "
                         f"the model embeds {model.config.vocab_size}")
    return model.eval()
