"""Rotary channel layouts, and re-rotation of cached keys along the temporal axis (temporal rebasing).

Keys are cached after RoPE in the rotate-half form ``k * cos(p*theta) + rotate_half(k) * sin(p*theta)``.
Rotations compose, so moving a cached key from temporal position ``t`` to ``t + delta`` multiplies only its
temporal frequency pairs by ``R(delta * theta)``; the spatial (h, w) pairs are untouched.

Supported layouts (``axis`` of each frequency pair ``i < head_dim/2``; 0 = t, 1 = h, 2 = w):

* ``"mrope"`` -- Qwen2-VL / Qwen2.5-VL: contiguous sections ``[t | h | w]`` of ``mrope_section`` pairs.
* ``"mrope_interleaved"`` -- Qwen3-VL: pair ``i`` is h if ``i % 3 == 1`` and ``i < 3*sec[1]``, w if
  ``i % 3 == 2`` and ``i < 3*sec[2]``, else t.
* ``"mmrope"`` -- Lumos-1 MM-RoPE: t:h:w = 2:3:3 interleaved in groups of 16 channels (8 pairs: 2 t, 3 h, 3 w).
  [our reading of the paper; no reference code]

1-D RoPE has no temporal axis of its own; rebasing there is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["RotaryLayout", "RebaseError", "rotary_layout_of", "text_inv_freq", "position_dims"]


class RebaseError(ValueError):
    """Temporal rebasing asked of a model whose rotary layout is unknown or has no temporal channels."""


@dataclass(frozen=True)
class RotaryLayout:
    """Which frequency pair rotates with which position axis, and the pair frequencies."""

    kind: str
    axis: torch.Tensor  # [head_dim/2] in {0, 1, 2}
    inv_freq: torch.Tensor  # [head_dim/2]

    @classmethod
    def mrope(cls, inv_freq: torch.Tensor, section: list[int]) -> RotaryLayout:
        """Qwen2-VL contiguous sections."""
        _check_section(inv_freq, section)
        axis = torch.cat([torch.full((n,), a, dtype=torch.long) for a, n in enumerate(section)])
        return cls("mrope", axis, inv_freq.float())

    @classmethod
    def mrope_interleaved(cls, inv_freq: torch.Tensor, section: list[int]) -> RotaryLayout:
        """Qwen3-VL interleaved sections."""
        _check_section(inv_freq, section)
        i = torch.arange(inv_freq.numel())
        axis = torch.zeros_like(i)
        axis[(i % 3 == 1) & (i < 3 * section[1])] = 1
        axis[(i % 3 == 2) & (i < 3 * section[2])] = 2
        return cls("mrope_interleaved", axis, inv_freq.float())

    @classmethod
    def mmrope(cls, inv_freq: torch.Tensor) -> RotaryLayout:
        """Lumos-1 MM-RoPE: per 8 frequency pairs, 2 temporal then 3 height then 3 width."""
        if inv_freq.numel() % 8:
            raise RebaseError(f"MM-RoPE needs head_dim a multiple of 16, got {2 * inv_freq.numel()}")
        pattern = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2])
        return cls("mmrope", pattern.repeat(inv_freq.numel() // 8), inv_freq.float())

    def rotate_time(self, keys: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Move cached ``keys [B, H, S, D]`` by ``delta [H, S]`` (or ``[S]``) temporal positions."""
        theta = self.inv_freq.to(keys.device) * (self.axis.to(keys.device) == 0)
        angle = delta.to(torch.float32)[..., None] * theta  # [H, S, D/2]
        angle = torch.cat([angle, angle], dim=-1)
        cos, sin = angle.cos().to(keys.dtype), angle.sin().to(keys.dtype)
        half = keys.shape[-1] // 2
        rotated_half = torch.cat([-keys[..., half:], keys[..., :half]], dim=-1)
        return keys * cos + rotated_half * sin


def _check_section(inv_freq: torch.Tensor, section: list[int]) -> None:
    if len(section) != 3 or sum(section) != inv_freq.numel():
        raise RebaseError(f"mrope_section {section} must have 3 entries summing to head_dim/2 = {inv_freq.numel()}")


def rotary_layout_of(model: torch.nn.Module) -> RotaryLayout:
    """Detect the rotary layout of a transformers model; raise :class:`RebaseError` if unknown or 1-D.

    A config attribute ``packcache_rotary`` (``"mmrope"``, ``"mrope"`` or ``"mrope_interleaved"``) overrides the
    detection from ``model_type`` (Qwen2-VL / Qwen2.5-VL contiguous, Qwen3-VL interleaved).
    """
    config = getattr(model, "config", None)
    text_config = config.get_text_config(decoder=True) if config is not None else None
    model_type = str(getattr(text_config, "model_type", "") or getattr(config, "model_type", ""))
    declared = getattr(config, "packcache_rotary", None) or getattr(text_config, "packcache_rotary", None)
    inv_freq = text_inv_freq(model)
    params = getattr(text_config, "rope_parameters", None) or {}
    section = params.get("mrope_section") if isinstance(params, dict) else None
    if declared == "mmrope":
        return RotaryLayout.mmrope(inv_freq)
    if declared == "mrope_interleaved" and section is not None:
        return RotaryLayout.mrope_interleaved(inv_freq, list(section))
    if declared == "mrope" and section is not None:
        return RotaryLayout.mrope(inv_freq, list(section))
    if section is not None and model_type.startswith("qwen3"):
        return RotaryLayout.mrope_interleaved(inv_freq, list(section))
    if section is not None and model_type.startswith(("qwen2_vl", "qwen2_5_vl")):
        return RotaryLayout.mrope(inv_freq, list(section))
    raise RebaseError(f"cannot rebase: rotary layout of model type {model_type or type(model).__name__!r} is "
                      "unknown or 1-D (temporal rebasing needs 3-D M-RoPE / MM-RoPE channels)")


def text_inv_freq(model: torch.nn.Module) -> torch.Tensor:
    """Pair frequencies of the text decoder's rotary embedding (skipping a vision tower's own rotary module)."""
    config = model.config.get_text_config(decoder=True)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rotaries = [m for m in model.modules() if hasattr(m, "inv_freq") and "rotary" in type(m).__name__.lower()]
    rotary = next((m for m in rotaries if m.inv_freq.numel() == head_dim // 2), None)
    if rotary is None:
        raise RebaseError(f"cannot rebase: no rotary embedding of head_dim {head_dim} found in {type(model).__name__}")
    return rotary.inv_freq.detach().cpu()


def position_dims(model: torch.nn.Module) -> int:
    """3 for models with 3-D (M-RoPE) positions, 1 otherwise."""
    params = getattr(model.config.get_text_config(decoder=True), "rope_parameters", None) or {}
    return 3 if isinstance(params, dict) and params.get("mrope_section") else 1
