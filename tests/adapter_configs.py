"""Tiny configs of every supported family (random weights, built on CPU, saved and loaded back by path)."""

from __future__ import annotations

from typing import Any

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            bos_token_id=None, eos_token_id=None, pad_token_id=None)
VOCAB = 160


def emu3_vocabulary_map() -> dict[str, int]:
    """Emu3's special tokens, 64 visual tokens and the meta-text characters, in a 160-token vocabulary."""
    vocab = {"<|image start|>": 150, "<|image end|>": 151, "<|image token|>": 152, "<|extra_200|>": 153,
             "<|extra_201|>": 154, "<image>": 155}
    vocab.update({f"<|visual token {i:06d}|>": 80 + i for i in range(64)})
    vocab.update({c: 60 + i for i, c in enumerate("0123456789*")})
    return vocab


def llama_config() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, max_position_embeddings=4096, architectures=["LlamaForCausalLM"], **TEXT)


def emu3_config() -> Any:
    from transformers import Emu3Config

    vq = dict(codebook_size=64, embed_dim=4, latent_channels=4, base_channels=32, channel_multiplier=[1, 1],
              num_res_blocks=1, attn_resolutions=[], hidden_size=8, temporal_downsample_factor=1)
    text = dict(vocab_size=VOCAB, max_position_embeddings=4096, **{**TEXT, "eos_token_id": 156, "pad_token_id": 157,
                                                                 "bos_token_id": 158})
    return Emu3Config(vq_config=vq, text_config=text, vocabulary_map=emu3_vocabulary_map(),
                      architectures=["Emu3ForConditionalGeneration"])


def chameleon_config() -> Any:
    from transformers import ChameleonConfig

    vocab = {"<racm3:break>": 150, "<eoss>": 151, "<image>": 152}
    vocab.update({f"IMGIMG{i}Z": 80 + i for i in range(64)})
    vq = dict(embed_dim=8, num_embeddings=64, base_channels=32, channel_multiplier=[1, 1], num_res_blocks=1,
              resolution=8, attn_resolutions=[])
    return ChameleonConfig(vocab_size=VOCAB, max_position_embeddings=4096, vq_config=vq, vocabulary_map=vocab,
                           architectures=["ChameleonForConditionalGeneration"], **TEXT)


def _qwen(config_cls: Any, arch: str, section: list[int], head_dim: int | None = None, **vision: Any) -> Any:
    text = dict(vocab_size=VOCAB, max_position_embeddings=4096,
                rope_parameters=dict(rope_type="default", rope_theta=1e4, mrope_section=section), **TEXT)
    if head_dim:
        text["head_dim"] = head_dim
    vision = dict(depth=1, hidden_size=64, num_heads=2, spatial_merge_size=2, patch_size=2, temporal_patch_size=2,
                  in_channels=3, **vision)
    return config_cls(text_config=text, vision_config=vision, image_token_id=150, video_token_id=151,
                      vision_start_token_id=152, vision_end_token_id=153, architectures=[arch])


def qwen2_vl_config() -> Any:
    from transformers import Qwen2VLConfig

    return _qwen(Qwen2VLConfig, "Qwen2VLForConditionalGeneration", [2, 3, 3], embed_dim=32)


def qwen2_5_vl_config() -> Any:
    from transformers import Qwen2_5_VLConfig

    return _qwen(Qwen2_5_VLConfig, "Qwen2_5_VLForConditionalGeneration", [2, 3, 3], intermediate_size=64,
                 out_hidden_size=64, tokens_per_second=2, window_size=8, fullatt_block_indexes=[0])


def qwen3_vl_config() -> Any:
    from transformers import Qwen3VLConfig

    return _qwen(Qwen3VLConfig, "Qwen3VLForConditionalGeneration", [4, 2, 2], head_dim=16, intermediate_size=64,
                 out_hidden_size=64, num_position_embeddings=64, deepstack_visual_indexes=[0])


CONFIGS = {"llama": llama_config, "emu3": emu3_config, "chameleon": chameleon_config, "qwen2_vl": qwen2_vl_config,
           "qwen2_5_vl": qwen2_5_vl_config, "qwen3_vl": qwen3_vl_config}


def save_tiny(name: str, path: str, seed: int = 0) -> str:
    """Build the tiny ``name`` model with random weights and ``save_pretrained`` it to ``path``."""
    import torch
    import transformers

    config = CONFIGS[name]()
    torch.manual_seed(seed)
    model = getattr(transformers, config.architectures[0])(config).eval()
    model.save_pretrained(path)
    return path
