"""Bit packing of integer weight levels: ternary at 2 bits or 1.6 bits (5 trits per byte), int4 two per byte.

All packers take a flat integer tensor and return uint8 bytes; the unpacker needs the element count
back, which the export file stores beside the bytes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from robuq.core.errors import RobuqError

TRITS_PER_BYTE = 5  # 3^5 = 243 ≤ 256


def _check_range(levels: torch.Tensor, low: int, high: int, what: str) -> None:
    if levels.numel() and (levels.min() < low or levels.max() > high):
        raise RobuqError(f"{what} levels must lie in [{low}, {high}], got [{int(levels.min())}, {int(levels.max())}]")


def _pad(values: torch.Tensor, multiple: int, fill: int) -> torch.Tensor:
    extra = (-values.numel()) % multiple
    return torch.cat([values, values.new_full((extra,), fill)]) if extra else values


def pack_ternary_2bit(levels: torch.Tensor) -> torch.Tensor:
    """{−1, 0, 1} → codes {0, 1, 2}, four per byte (little end first)."""
    flat = levels.reshape(-1).to(torch.int16)
    _check_range(flat, -1, 1, "ternary")
    codes = _pad(flat + 1, 4, 1).view(-1, 4).to(torch.uint8)
    return codes[:, 0] | (codes[:, 1] << 2) | (codes[:, 2] << 4) | (codes[:, 3] << 6)


def unpack_ternary_2bit(packed: torch.Tensor, count: int) -> torch.Tensor:
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    codes = ((packed.unsqueeze(1) >> shifts) & 3).reshape(-1)[:count]
    if codes.numel() and int(codes.max()) > 2:
        raise RobuqError("corrupt 2-bit ternary data: code 3 stands for no level (−1, 0, 1 are 0, 1, 2)")
    return codes.to(torch.int8) - 1


def pack_ternary_trits(levels: torch.Tensor) -> torch.Tensor:
    """{−1, 0, 1} → base-3 digits, five per byte: byte = Σ dᵢ·3ⁱ (≤ 242): 1.6 bits per weight."""
    flat = levels.reshape(-1).to(torch.int16)
    _check_range(flat, -1, 1, "ternary")
    digits = _pad(flat + 1, TRITS_PER_BYTE, 1).view(-1, TRITS_PER_BYTE)
    powers = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int16, device=digits.device)
    return (digits * powers).sum(dim=1).to(torch.uint8)


@functools.lru_cache(maxsize=None)
def _trit_table(device: str) -> torch.Tensor:
    values = torch.arange(243, dtype=torch.int16)
    digits = torch.stack([(values // 3**i) % 3 for i in range(TRITS_PER_BYTE)], dim=1)
    return (digits - 1).to(torch.int8).to(device)


def unpack_ternary_trits(packed: torch.Tensor, count: int) -> torch.Tensor:
    if packed.numel() and int(packed.max()) > 242:
        raise RobuqError("corrupt trit-packed data: a byte exceeds 242 (3^5 − 1)")
    return _trit_table(str(packed.device))[packed.long()].reshape(-1)[:count]


def pack_int4(levels: torch.Tensor) -> torch.Tensor:
    """Signed levels in [−8, 7] → offset-binary nibbles, two per byte (low nibble first)."""
    flat = levels.reshape(-1).to(torch.int16)
    _check_range(flat, -8, 7, "int4")
    nibbles = _pad(flat + 8, 2, 8).view(-1, 2).to(torch.uint8)
    return nibbles[:, 0] | (nibbles[:, 1] << 4)


def unpack_int4(packed: torch.Tensor, count: int) -> torch.Tensor:
    nibbles = torch.stack([packed & 15, packed >> 4], dim=1)
    return nibbles.reshape(-1)[:count].to(torch.int8) - 8


@dataclass(frozen=True)
class Packer:
    """One packing: levels → bytes, bytes (and the element count) → levels, and its bits per weight."""

    pack: Callable[[torch.Tensor], torch.Tensor]
    unpack: Callable[[torch.Tensor, int], torch.Tensor]
    bits: float

    def packed_bytes(self, count: int) -> int:
        """Bytes that ``count`` levels take (whole groups: a trailing partial byte or group is padded)."""
        per_byte = round(8 / self.bits)
        return -(-count // per_byte)


PACKERS = {
    "ternary-2bit": Packer(pack_ternary_2bit, unpack_ternary_2bit, 2.0),
    "ternary-trits": Packer(pack_ternary_trits, unpack_ternary_trits, 8 / TRITS_PER_BYTE),
    "int4": Packer(pack_int4, unpack_int4, 4.0),
}


def packed_bits_per_weight(fmt: str) -> float:
    return PACKERS[fmt].bits
