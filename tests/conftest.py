"""Shared fixtures: tiny randomly initialised transformers models built from a config (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(1)


def tiny_llama(attn: str = "sdpa", vocab: int = 96):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         attn_implementation=attn, bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return LlamaForCausalLM(config).eval()


def tiny_qwen2vl_text(attn: str = "sdpa", vocab: int = 96):
    from transformers import Qwen2VLTextConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLTextModel

    torch.manual_seed(0)
    config = Qwen2VLTextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, attn_implementation=attn,
                               rope_parameters=dict(rope_type="default", rope_theta=1e4, mrope_section=[2, 3, 3]),
                               bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return Qwen2VLTextModel(config).eval()


def tiny_qwen3vl_text(attn: str = "sdpa", vocab: int = 96):
    from transformers import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel

    torch.manual_seed(0)
    config = Qwen3VLTextConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, attn_implementation=attn,
                               rope_parameters=dict(rope_type="default", rope_theta=1e4, mrope_section=[4, 2, 2]),
                               bos_token_id=None, eos_token_id=None, pad_token_id=None)
    return Qwen3VLTextModel(config).eval()


def tiny_demo_model(clip_format=None):
    """A very small randomly initialised :class:`packcache.demo.DemoVideoModel` (2 layers, hidden 32), for the
    sequence format ``clip_format`` (default: the plain one)."""
    from packcache.demo.clips import PLAIN
    from packcache.demo.model import DemoVideoConfig, DemoVideoModel

    clip_format = clip_format or PLAIN
    torch.manual_seed(0)
    config = DemoVideoConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                             num_key_value_heads=2, head_dim=16, vocab_size=clip_format.vocab_size,
                             rope_parameters={"rope_type": "default", "rope_theta": 1000.0, "mrope_section": [4, 2, 2]},
                             **clip_format.config_fields())
    return DemoVideoModel(config).eval()


TINY_MODELS = {"llama": (tiny_llama, 1), "qwen2_vl": (tiny_qwen2vl_text, 3), "qwen3_vl": (tiny_qwen3vl_text, 3)}


@pytest.fixture(params=sorted(TINY_MODELS))
def tiny_model_name(request):
    return request.param
