"""Model families packcache supports, and the loader the CLI uses.

* :func:`load_model` -- ``from_pretrained`` by hub id or local path (or a GGUF file), never running code from a
  model repository unless ``trust_remote_code=True`` is asked for explicitly; failures raise
  :class:`ModelLoadError` with a one-line message.
* :func:`adapter_for` -- the :class:`~packcache.adapters.base.Adapter` of a model or config (Emu3, Qwen2-VL /
  Qwen2.5-VL / Qwen3-VL, Chameleon, Llama-style decoders, Lumos-1 when declared).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from packcache.adapters.base import Adapter, AdapterError, model_type_of
from packcache.adapters.emu3 import Emu3Adapter, Emu3Tokens
from packcache.adapters.llama import ChameleonAdapter, LlamaAdapter, pseudo_frame_layout
from packcache.adapters.lumos import LumosAdapter, LumosTokens
from packcache.adapters.qwen_vl import QwenVLAdapter

__all__ = [
    "ADAPTERS",
    "Adapter",
    "AdapterError",
    "ChameleonAdapter",
    "Emu3Adapter",
    "Emu3Tokens",
    "LlamaAdapter",
    "LumosAdapter",
    "LumosTokens",
    "ModelLoadError",
    "QwenVLAdapter",
    "UnsupportedModelError",
    "adapter_for",
    "load_model",
    "pseudo_frame_layout",
]

#: Adapter classes in detection order (Lumos first: it is declared on top of a Chameleon/Llama-like config).
ADAPTERS: tuple[type[Adapter], ...] = (LumosAdapter, Emu3Adapter, QwenVLAdapter, ChameleonAdapter, LlamaAdapter)


class ModelLoadError(RuntimeError):
    """A model that cannot be loaded (unknown id, offline, missing files, remote code refused); one-line message."""


class UnsupportedModelError(AdapterError):
    """A model type no adapter handles."""


def adapter_for(model_or_config: Any) -> Adapter:
    """The adapter for a model (or its config), bound to that config; raises :class:`UnsupportedModelError`."""
    config = getattr(model_or_config, "config", model_or_config)
    for cls in ADAPTERS:
        adapter = cls() if cls in (LlamaAdapter, LumosAdapter) else cls(config)
        if adapter.matches(config):
            return adapter
    outer, text = model_type_of(config)
    supported = sorted({t for cls in ADAPTERS for t in cls.model_types})
    raise UnsupportedModelError(f"no packcache adapter for model type {outer or text or type(config).__name__!r}; "
                                f"supported: {', '.join(supported)}")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _model_class(config: Any) -> Any:
    """The class named by ``config.architectures`` if transformers has it, else the auto class for the type."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto import modeling_auto

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    if config.model_type in modeling_auto.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM


def load_model(model_id_or_path: str, *, trust_remote_code: bool = False, attn_implementation: str = "sdpa",
               gguf_file: str | None = None) -> torch.nn.Module:
    """Load a model for packcache with transformers' ``from_pretrained``, in eval mode.

    ``model_id_or_path`` is a local directory or a hub id (``gguf_file`` names a GGUF file inside it).
    ``trust_remote_code`` stays False unless the caller opts in: a repository's own Python code would otherwise
    run on this machine. Raises :class:`ModelLoadError` (one line) when the model cannot be loaded.
    """
    from transformers import AutoConfig

    where = str(model_id_or_path)
    local = Path(where).expanduser().exists()
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf_file is not None:
        kwargs["gguf_file"] = gguf_file
    try:
        config = AutoConfig.from_pretrained(where, **kwargs)
        cls = _model_class(config)
        model = cls.from_pretrained(where, config=config, attn_implementation=attn_implementation, **kwargs)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ImportError, ... here
        message = _first_line(exc)
        if "trust_remote_code" in str(exc) or "contains custom code" in message:
            raise ModelLoadError(f"{where}: this model needs code from its repository; pass trust_remote_code=True "
                                 "(--trust-remote-code) only if you trust that code") from None
        if not local and offline:
            raise ModelLoadError(f"{where}: not a local path, and the hub is offline (HF_HUB_OFFLINE=1): "
                                 f"{message}") from None
        if not local:
            raise ModelLoadError(f"{where}: not a local path and not loadable from the hub: {message}") from None
        raise ModelLoadError(f"{where}: cannot load model: {message}") from None
    return model.eval()
