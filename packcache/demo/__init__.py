"""The demo: synthetic token-grid videos, a small trained AR-DF video model, and its training script."""

from packcache.demo.clips import (
    PLAIN,
    VOCAB,
    Clip,
    ClipFormat,
    Vocab,
    clip_layout,
    clip_token_ids,
    decode_prompt,
    encode_prompt,
    frame_token_ids,
    make_clip,
    make_clips,
    reverse_directions,
)
from packcache.demo.model import DemoVideoConfig, DemoVideoModel, ardf_mask, load_demo_model

__all__ = [
    "PLAIN",
    "VOCAB",
    "Clip",
    "ClipFormat",
    "Vocab",
    "clip_layout",
    "clip_token_ids",
    "decode_prompt",
    "encode_prompt",
    "frame_token_ids",
    "make_clip",
    "make_clips",
    "reverse_directions",
    "DemoVideoConfig",
    "DemoVideoModel",
    "ardf_mask",
    "load_demo_model",
]
