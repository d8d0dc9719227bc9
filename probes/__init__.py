"""Attention probes: a transformers attention backend that returns the normal sdpa output and, alongside, the exact
per-head attention mass by token group (text, condition, specials, frame t-d), without materialising scores."""

from probes.backend import BACKEND, AttentionProbe, ProbeError, attention_modules, register_backend
from probes.stats import FIRST_DISTANCE, SCHEMA, AttentionStats, StatsError, key_group_names

__all__ = [
    "BACKEND",
    "FIRST_DISTANCE",
    "SCHEMA",
    "AttentionProbe",
    "AttentionStats",
    "ProbeError",
    "StatsError",
    "attention_modules",
    "key_group_names",
    "register_backend",
]
