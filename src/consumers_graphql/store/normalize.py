"""Derived columns: the case-folded keys that uniqueness, ordering and search are built on.

Computed here, in Python, rather than with SQL functions, because SQLite's lower() folds only
ASCII while PostgreSQL's folds all of Unicode: one function keeps both databases identical.
"""

from __future__ import annotations

from typing import Any

SEARCH_SEPARATOR = "\n"


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
