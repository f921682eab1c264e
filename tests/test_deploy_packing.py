import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from robuq.deploy.packing import (
    pack_int4,
    pack_ternary_2bit,
    pack_ternary_trits,
    unpack_int4,
    unpack_ternary_2bit,
    unpack_ternary_trits,
)

sizes = st.integers(0, 300)


@settings(max_examples=60, deadline=None)
@given(n=sizes, seed=st.integers(0, 2**16))
def test_ternary_round_trips(n, seed):
    levels = torch.randint(-1, 2, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    two_bit = pack_ternary_2bit(levels)
    assert two_bit.dtype == torch.uint8 and two_bit.numel() == -(-n // 4)
    assert torch.equal(unpack_ternary_2bit(two_bit, n), levels)
    trits = pack_ternary_trits(levels)
    assert trits.numel() == -(-n // 5) and (trits.numel() == 0 or int(trits.max()) <= 242)
    assert torch.equal(unpack_ternary_trits(trits, n), levels)


@settings(max_examples=60, deadline=None)
@given(n=sizes, seed=st.integers(0, 2**16))
def test_int4_round_trips(n, seed):
    levels = torch.randint(-8, 8, (n,), generator=torch.Generator().manual_seed(seed), dtype=torch.int8)
    packed = pack_int4(levels)
    assert packed.numel() == -(-n // 2)
    assert torch.equal(unpack_int4(packed, n), levels)


def test_out_of_range_levels_are_refused():
    with pytest.raises(ValueError, match=r"ternary levels must lie in \[-1, 1\]"):
        pack_ternary_2bit(torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="int4"):
        pack_int4(torch.tensor([9]))


def test_corrupt_trits_are_detected():
    with pytest.raises(ValueError, match="corrupt"):
        unpack_ternary_trits(torch.tensor([250], dtype=torch.uint8), 5)


def test_unpacking_refuses_codes_that_stand_for_no_ternary_level():
    import pytest

    from robuq.deploy.packing import unpack_ternary_2bit, unpack_ternary_trits

    with pytest.raises(ValueError, match="code 3"):
        unpack_ternary_2bit(torch.tensor([0b11_01_00_10], dtype=torch.uint8), 4)  # a damaged byte: −1, 0, 1, then "2"
    assert unpack_ternary_2bit(torch.tensor([0b11_01_00_10], dtype=torch.uint8), 3).tolist() == [1, -1, 0]
    with pytest.raises(ValueError, match="exceeds 242"):
        unpack_ternary_trits(torch.tensor([243], dtype=torch.uint8), 5)
