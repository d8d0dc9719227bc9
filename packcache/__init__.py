"""packcache: measure where a video model's attention goes, turn it into a cache budget, and generate on a
compact KV cache that stays the same size however long the video gets (PackCache, arXiv 2601.04359)."""

__version__ = "0.1.0"

from packcache.budget import Budget, BudgetError  # noqa: E402
from packcache.cache import CompactCache, attach  # noqa: E402
from packcache.layout import LayoutError, SequenceLayout, SpecialTokens, TokenGroup  # noqa: E402
from packcache.policies import CachePolicy, FullCache, PackCache, SlidingWindow, StreamingLLM  # noqa: E402
from packcache.rope import RebaseError, RotaryLayout  # noqa: E402
from packcache.runtime import generate_video  # noqa: E402

__all__ = [
    "__version__",
    "Budget",
    "BudgetError",
    "CachePolicy",
    "CompactCache",
    "FullCache",
    "LayoutError",
    "PackCache",
    "RebaseError",
    "RotaryLayout",
    "SequenceLayout",
    "SlidingWindow",
    "SpecialTokens",
    "StreamingLLM",
    "TokenGroup",
    "attach",
    "generate_video",
]
