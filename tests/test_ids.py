"""Batch ids: a ULID and its successors, as python-ulid writes each of them, carries
across the last two characters (10 bits) and the top of the range included."""

from __future__ import annotations

import random

import pytest
from ulid import ULID

from consumers_graphql.ids import IdKind, kind_of, sequential_ids

_RNG = random.Random(7)
STARTS = [
    0, 1, 1023 - 3, 1024 - 500, (1 << 20) - 7, (12345 << 80) | ((1 << 80) - 9),
    (1 << 128) - 500, *(_RNG.getrandbits(127) for _ in range(20)),
]


@pytest.mark.parametrize("start", STARTS)
def test_sequential_ids_are_the_ulids_that_follow(start: int) -> None:
    ids = sequential_ids(IdKind.CONSUMER, ULID.from_int(start), 500)

    assert ids == [f"cons_{ULID.from_int(start + n)}" for n in range(500)]
    assert ids == sorted(ids)
    assert all(kind_of(id_) is IdKind.CONSUMER for id_ in ids)
