"""Adapters on tiny models of every family, saved to disk and loaded back by path through ``load_model``:
compacted decode == masked full forward, layouts parsed from the models' own token formats, Qwen-VL positions
equal to the model's ``get_rope_index``, and loader errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from adapter_configs import CONFIGS, save_tiny
from reference import compacted_vs_masked

from packcache import Budget, LayoutError, PackCache, RebaseError, SlidingWindow
from packcache.adapters import (
    ChameleonAdapter,
    Emu3Adapter,
    LlamaAdapter,
    LumosAdapter,
    LumosTokens,
    ModelLoadError,
    QwenVLAdapter,
    UnsupportedModelError,
    adapter_for,
    load_model,
)

FAMILIES = sorted(CONFIGS)
ADAPTER_OF = {"llama": LlamaAdapter, "emu3": Emu3Adapter, "chameleon": ChameleonAdapter, "qwen2_vl": QwenVLAdapter,
              "qwen2_5_vl": QwenVLAdapter, "qwen3_vl": QwenVLAdapter}
FRAMES, HEIGHT, WIDTH = 7, 4, 4


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every tiny family saved once per module: ``{name: path}``."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {name: save_tiny(name, str(root / name)) for name in FAMILIES}


def policy_for(name: str, layout, model) -> object:
    config = model.config.get_text_config(decoder=True)
    if name == "sliding_window":
        return SlidingWindow(frames=1)
    return PackCache(Budget.paper_default(config.num_hidden_layers, config.num_attention_heads,
                                          config.num_key_value_heads, layout.summary()))


def inputs_for(family: str, model, ids: torch.Tensor, layout):
    """Forward inputs: token ids, or for Qwen-VL the embeddings with vision-tower features at the video pads."""
    if not family.startswith("qwen"):
        return lambda sl: {"input_ids": ids[:, sl]}
    adapter = adapter_for(model)
    grid = adapter.rope_index_inputs(layout)["video_grid_thw"]
    vision = model.config.vision_config
    patch_dim = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    pixels = torch.randn(int(grid.prod(-1).sum()), patch_dim, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        embeds = model.model.get_input_embeddings()(ids)
        feats = torch.cat(model.model.get_video_features(pixels, grid).pooler_output)
    pads = ids[0] == model.config.video_token_id
    assert int(pads.sum()) == feats.shape[0] == layout.num_frames * layout.visual_per_frame
    embeds[0, pads] = feats
    return lambda sl: {"inputs_embeds": embeds[:, sl]}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("policy_name", ["packcache", "sliding_window"])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_compacted_decode_matches_masked_full_forward(saved, family, attn, policy_name):
    model = load_model(saved[family], attn_implementation=attn)
    adapter = adapter_for(model)
    assert isinstance(adapter, ADAPTER_OF[family])
    ids, layout = adapter.example(model.config, FRAMES, HEIGHT, WIDTH, seed=1)
    assert ids.shape == (1, layout.num_tokens)
    diff, cache, effect = compacted_vs_masked(model, layout, policy_for(policy_name, layout, model),
                                              inputs_for(family, model, ids, layout), dims=adapter.position_dims)
    assert cache.slots_per_layer()[0] < layout.num_tokens - 2 * layout.tokens_per_frame, "nothing was dropped"
    assert diff <= 1e-4, diff
    assert effect > 1e-3, f"dropping slots changed nothing ({effect}): the check would be vacuous"


def test_unsupported_model_type_is_a_clear_error():
    from transformers import GPT2Config

    with pytest.raises(UnsupportedModelError, match="no packcache adapter for model type 'gpt2'; supported: "):
        adapter_for(GPT2Config())


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize(("frames", "height", "width"), [(3, 2, 3), (6, 2, 2), (1, 3, 2)])
def test_qwen_positions_equal_get_rope_index(saved, family, frames, height, width):
    """The layout's 3-D positions are the model's own: a video (T > max(H, W) included), and images as frames."""
    model = load_model(saved[family])
    adapter = adapter_for(model)
    ids, layout = adapter.example(model.config, frames, height, width, seed=2)
    real, _ = model.model.get_rope_index(ids, **adapter.rope_index_inputs(layout))
    assert np.array_equal(real[:, 0].T.numpy(), layout.pos3d)
    # the same frames as a run of images, one <|vision_start|> block each
    sp = adapter.special_ids()
    block = [sp["vision_start"], *[sp["image"]] * (height * width), sp["vision_end"]]
    image_ids = torch.tensor([[5, 6, 7] + block * frames + [8]])
    m = adapter.merge_size()
    images = adapter.layout_from_ids(image_ids, image_grid_thw=[[1, height * m, width * m]] * frames)
    real, _ = model.model.get_rope_index(image_ids, **adapter.rope_index_inputs(images, video=False))
    assert np.array_equal(real[:, 0].T.numpy(), images.pos3d)


def test_qwen2_5_time_interval_follows_tokens_per_second(saved):
    model = load_model(saved["qwen2_5_vl"])
    adapter = adapter_for(model)
    ids, layout = adapter.example(model.config, 4, 2, 2)
    assert layout.time_interval == model.config.vision_config.tokens_per_second == 2
    half = adapter.layout_from_ids(ids, video_grid_thw=[[4, 4, 4]], second_per_grid_t=0.75)
    real, _ = model.model.get_rope_index(ids, second_per_grid_ts=torch.tensor([0.75]),
                                         **adapter.rope_index_inputs(half))
    assert np.array_equal(real[:, 0].T.numpy(), half.pos3d)
    assert half.frame_time(3) - half.frame_time(0) == 4  # int(3 * 1.5)


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_qwen_rotary_layouts(saved, family):
    model = load_model(saved[family])
    kind = adapter_for(model).rotary(model).kind
    assert kind == ("mrope_interleaved" if family == "qwen3_vl" else "mrope")


@pytest.mark.parametrize("family", ["llama", "emu3", "chameleon"])
def test_one_d_families_refuse_rebasing(saved, family):
    model = load_model(saved[family])
    with pytest.raises(RebaseError, match="cannot rebase"):
        adapter_for(model).rotary(model)


def test_emu3_parses_its_token_format_and_rejects_broken_rows(saved):
    model = load_model(saved["emu3"])
    adapter = adapter_for(model)
    ids, layout = adapter.example(model.config, 3, 2, 3)
    tok = adapter.tokens()
    assert layout.text_tokens == 6 and layout.prefix_specials == 5  # boi, "2", "*", "3", <|image token|>
    assert (layout.height, layout.width, layout.tokens_per_frame) == (2, 3, 9)
    assert ids[0, layout.frame_slice(0)].tolist()[3] == tok.eol and ids[0, layout.frame_slice(1).start - 1] == tok.eof
    assert adapter.template(layout)[layout.num_tokens - 1] == tok.image_end
    broken = ids[0].tolist()
    del broken[layout.frame_slice(1).start + 1]  # one visual token short in frame 1's first row
    with pytest.raises(LayoutError, match="frame 1 .*rows of unequal length"):
        adapter.layout_from_ids(broken)


def test_chameleon_grid_from_vq_config_and_parse(saved):
    model = load_model(saved["chameleon"])
    adapter = adapter_for(model)
    assert adapter.grid() == (8 // 2, 8 // 2)
    ids, layout = adapter.example(model.config, 3, *adapter.grid())
    assert adapter.layout_from_ids(ids) == layout
    with pytest.raises(LayoutError, match="image 0 at token 6 has 15 tokens, expected 4x4"):
        adapter.layout_from_ids(torch.cat([ids[0, :8], ids[0, 9:]]))


def test_pseudo_frames_for_text_models():
    layout = LlamaAdapter().layout_from_ids(list(range(100)), frame_tokens=32, text_tokens=10)
    assert (layout.text_tokens, layout.num_frames, layout.width, layout.suffix_specials) == (10, 2, 32, 26)
    with pytest.raises(LayoutError, match="no whole pseudo-frame"):
        LlamaAdapter().layout_from_ids(list(range(20)), frame_tokens=32)


LUMOS = LumosTokens(video_start=90, video_end=91, image_start=92, image_end=93, row_separator=94,
                    meta_ids=(95, 96), eos=97)


def test_lumos_layout_mmrope_positions_and_rotary():
    from conftest import tiny_qwen3vl_text

    model = tiny_qwen3vl_text()
    adapter = LumosAdapter(LUMOS)
    ids, layout = adapter.example(model.config, 3, 2, 3)
    assert layout.prefix_specials == 3 and layout.frame_prefix == 3 and layout.row_separator
    first = layout.first_frame_token
    grid = layout.frame_slice(1).start + 3 + 4 + 1  # frame 1, row 1, col 1 (rows of 3 tokens + separator)
    assert layout.pos3d[grid].tolist() == [first + 4, first + 8, first + 8]
    axis = adapter.rotary(model).axis
    assert axis[:8].tolist() == [0, 0, 1, 1, 1, 2, 2, 2]
    with pytest.raises(LayoutError):
        adapter.layout_from_ids(ids[0, :-3])  # truncated: last frame has no image_end


@pytest.mark.parametrize("policy_name", ["packcache", "sliding_window"])
def test_lumos_stream_on_a_3d_rope_decoder_is_exact(policy_name):
    """Lumos-1 is not in transformers: its parsed layout and MM-RoPE positions drive a 3-D RoPE text decoder."""
    from conftest import tiny_qwen3vl_text

    model = tiny_qwen3vl_text(vocab=128)
    adapter = LumosAdapter(LUMOS)
    ids, layout = adapter.example(model.config, FRAMES, 3, 3, seed=4)
    diff, _, effect = compacted_vs_masked(model, layout, policy_for(policy_name, layout, model),
                                          lambda sl: {"input_ids": ids[:, sl]}, dims=3)
    assert diff <= 1e-4 < 1e-3 < effect, (diff, effect)


def test_lumos_declared_in_config_is_detected():
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=128, hidden_size=64, num_hidden_layers=1, num_attention_heads=4)
    config.packcache_layout = "lumos"
    config.packcache_lumos_tokens = {"video_start": 90, "video_end": 91, "image_start": 92, "image_end": 93,
                                     "row_separator": 94, "meta_ids": [95, 96]}
    adapter = adapter_for(config)
    assert isinstance(adapter, LumosAdapter) and adapter.tokens(config).meta_ids == (95, 96)


def test_load_unknown_hub_id_offline_raises(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="not a local path, and the hub is offline") as info:
        load_model("packcache-test/no-such-model-anywhere")
    assert "\n" not in str(info.value)


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(ModelLoadError, match="cannot load model") as info:
        load_model(str(tmp_path))  # an empty directory
    assert "\n" not in str(info.value)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "custom_thing", "architectures": ["X"],
                                                      "auto_map": {"AutoConfig": "configuration_x.XConfig"}}))
    with pytest.raises(ModelLoadError, match="needs code from its repository; pass trust_remote_code=True"):
        load_model(str(tmp_path))


@pytest.mark.parametrize("family", ["emu3", "qwen2_vl", "chameleon"])
def test_packcache_profile_on_a_saved_tiny_model_writes_a_valid_budget(saved, family, tmp_path, capsys):
    from packcache.profile import main

    out = tmp_path / "budget.json"
    assert main([saved[family], "-o", str(out), "--samples", "2", "--quiet"]) == 0
    budget = Budget.load(out, num_layers=2, num_kv_heads=2)
    assert budget.model["id"] == saved[family] and budget.layout["height"] == 4


def test_packcache_profile_unknown_model_offline_exits_2(monkeypatch, capsys):
    from packcache.profile import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["packcache-test/no-such-model-anywhere", "--quiet"]) == 2
    assert "hub is offline" in capsys.readouterr().err
