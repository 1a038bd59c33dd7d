"""Prefixed ULIDs: ``cons_01JD…``. The prefix names the type, so any id can be routed."""

from datetime import datetime
from enum import StrEnum

from ulid import ULID


class IdKind(StrEnum):
    CONSUMER = "cons"
    AUDIENCE = "aud"
    ORDER = "ord"
    API_KEY = "key"


_ULID_LENGTH = 26
_CROCKFORD = frozenset("0123456789ABCDEFGHJKMNPQRSTVWXYZ")


def new_id(kind: IdKind, at: datetime | None = None) -> str:
    ulid = ULID.from_datetime(at) if at is not None else ULID()
    return f"{kind.value}_{ulid}"


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
