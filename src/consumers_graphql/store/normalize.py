"""Derived columns: the case-folded keys that uniqueness, ordering and search are built on.

Computed here, in Python, rather than with SQL functions, because SQLite's lower() folds only
ASCII while PostgreSQL's folds all of Unicode: one function keeps both databases identical.
"""

from __future__ import annotations

import unicodedata
from typing import Any

SEARCH_SEPARATOR = "\n"
# Free text may span lines; names and ids may not.
_MULTILINE_ALLOWED = frozenset("\t\n\r")


def fold(value: str | None) -> str | None:
    return None if value is None else value.lower()


def search_text(email: str | None, phone: str | None, full_name: str | None) -> str:
    return SEARCH_SEPARATOR.join((fold(email) or "", phone or "", fold(full_name) or ""))


def derived_fields(email: str | None, phone: str | None, full_name: str | None) -> dict[str, Any]:
    """The derived column values for a consumer with these fields."""
    return {
        "email_key": fold(email),
        "full_name_key": fold(full_name),
        "search_text": search_text(email, phone, full_name),
    }


# What a stored string may not hold: here, since searches and cursors check it as well as the
# rules in domain/validation.py.
def forbidden_character(value: str, *, multiline: bool = False) -> str | None:
    if value.isprintable():  # no control character, no surrogate: the common case, in C
        return None
    for ch in value:
        category = unicodedata.category(ch)
        if category == "Cc" and not (multiline and ch in _MULTILINE_ALLOWED):
            return f"U+{ord(ch):04X}"
        if category == "Cs":  # a lone surrogate cannot be stored as UTF-8
            return f"U+{ord(ch):04X}"
    return None
