"""AMPN: activation-only mixed precision — per-layer sensitivities and the exact bit allocation."""

from robuq.ampn.allocate import Allocation, allocate_bits

__all__ = ["Allocation", "allocate_bits"]
