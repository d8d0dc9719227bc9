"""Cache policies: one per file, all on the :class:`CachePolicy` interface."""

from packcache.policies.base import CachePolicy, SlotView
from packcache.policies.full import FullCache
from packcache.policies.packcache import PackCache
from packcache.policies.sliding_window import SlidingWindow
from packcache.policies.streaming_llm import StreamingLLM

__all__ = ["CachePolicy", "SlotView", "FullCache", "PackCache", "SlidingWindow", "StreamingLLM"]
