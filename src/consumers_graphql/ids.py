"""Prefixed ULIDs: ``cons_01JD…``. The prefix names the type, so any id can be routed."""

import secrets
from datetime import datetime
from enum import StrEnum

from ulid import ULID


class IdKind(StrEnum):
    CONSUMER = "cons"
    AUDIENCE = "aud"
    ORDER = "ord"
    API_KEY = "key"
    EVENT = "evt"


_ULID_LENGTH = 26
_CROCKFORD = frozenset("0123456789ABCDEFGHJKMNPQRSTVWXYZ")


def new_id(kind: IdKind, at: datetime | None = None) -> str:
    ulid = ULID.from_datetime(at) if at is not None else ULID()
    return f"{kind.value}_{ulid}"


def block_start(at: datetime) -> ULID:
    """A ULID of `at` (to the millisecond) with 79 random bits of its own: the first of a
    block of `sequential_ids` that no other block overlaps. (python-ulid makes the ULIDs of
    one millisecond consecutive, so two blocks started from ULID.from_datetime in the same
    millisecond share all but one id.)"""
    return ULID.from_int((int(at.timestamp() * 1000) << 80) | secrets.randbits(79))


# The text of a ULID is its 128 bits in base 32, the last two characters its lowest 10 bits.
_LAST_TWO = [a + b for a in "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
             for b in "0123456789ABCDEFGHJKMNPQRSTVWXYZ"]


def sequential_ids(kind: IdKind, first: ULID, count: int) -> list[str]:
    """`first` and its successors: ids that sort in the order given. Successors differ in
    their last two characters, but where a carry reaches the bits above: the rest of the
    text is encoded once per carry (a 500-row batch: 0.06 ms instead of 1.2)."""
    start = int(first)
    ids = []
    heads: dict[int, str] = {}
    for value in range(start, start + count):
        head = heads.get(value >> 10)
        if head is None:
            head = heads[value >> 10] = f"{kind.value}_{str(ULID.from_int(value))[:-2]}"
        ids.append(head + _LAST_TWO[value & 1023])
    return ids


def kind_of(value: str) -> IdKind | None:
    """The kind an id names, or None when it is not a well-formed id of any kind."""
    prefix, sep, body = value.partition("_")
    if not sep or len(body) != _ULID_LENGTH or not _CROCKFORD.issuperset(body):
        return None
    try:
        return IdKind(prefix)
    except ValueError:
        return None


def is_id_of(value: str, kind: IdKind) -> bool:
    return kind_of(value) is kind
