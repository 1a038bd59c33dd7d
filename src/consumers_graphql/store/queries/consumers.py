"""Consumer reads: filtered and searched pages, counts, look-ups, an audience's members.

The search is the bulk of it: LIKE over the folded search text, narrowed by SQLite's FTS5
trigram tables or PostgreSQL's pg_trgm index.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import Enum
from functools import lru_cache
from typing import Any

import phonenumbers
from sqlalchemy import (
    ColumnElement,
    Select,
    Text,
    and_,
    bindparam,
    column,
    func,
    literal_column,
    select,
    table,
    union,
    union_all,
)
from sqlalchemy.engine import Row
from sqlalchemy.sql.util import ClauseAdapter

from consumers_graphql.errors import BadUserInput
from consumers_graphql.ids import IdKind, is_id_of
from consumers_graphql.store.normalize import fold, forbidden_character
from consumers_graphql.store.pagination import (
    Limiter,
    Page,
    PageRequest,
    SortKey,
    ValueKind,
    assemble_page,
    assemble_pages,
    page_statement,
)
from consumers_graphql.store.queries.common import (
    CONSUMER_COLUMNS,
    Reads,
    consumers,
    memberships,
)

SEARCH_MIN = 2
SEARCH_MAX = 200
# SQLite's search indexes (migration 0002): FTS5 trigram tables over the folded email and
# name, and over the phone.
_text_fts = table("consumers_text_fts", column("rowid"))
_phone_fts = table("consumers_phone_fts", column("rowid"))
# PostgreSQL's narrow copy of consumers.search_text (migration 0003), for counts.
_consumer_search = table("consumer_search", column("search_text", Text()))


class ConsumerSortField(Enum):
    """The orders a consumers connection can take; values are the public (REST) names."""

    CREATED_AT = "createdAt"
    EMAIL = "email"
    FULL_NAME = "fullName"
    LAST_ORDER_AT = "lastOrderAt"
    TOTAL_ORDER_VALUE = "totalOrderValue"
    TOTAL_ORDERS = "totalOrders"


_CONSUMER_SORT_COLUMNS: dict[ConsumerSortField, tuple[Any, ValueKind, bool]] = {
    ConsumerSortField.CREATED_AT: (consumers.c.created_at, ValueKind.DATETIME, False),
    ConsumerSortField.EMAIL: (consumers.c.email_key, ValueKind.TEXT, True),
    ConsumerSortField.FULL_NAME: (consumers.c.full_name_key, ValueKind.TEXT, True),
    ConsumerSortField.LAST_ORDER_AT: (consumers.c.last_order_at, ValueKind.DATETIME, True),
    ConsumerSortField.TOTAL_ORDER_VALUE: (consumers.c.total_order_value, ValueKind.DECIMAL, False),
    ConsumerSortField.TOTAL_ORDERS: (consumers.c.total_orders, ValueKind.INT, False),
}


def consumer_sort(
    field: ConsumerSortField = ConsumerSortField.CREATED_AT,
    descending: bool = True
) -> SortKey:
    col, kind, nullable = _CONSUMER_SORT_COLUMNS[field]
    return SortKey("consumers", field.value, col, consumers.c.id, kind, descending, nullable)


AUDIENCE_CONSUMER_SORT = consumer_sort()


@dataclass(frozen=True)
class ConsumerFilter:
    """Filters of a consumers connection; all given ones must hold."""

    search: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    audience_id: str | None = None
    email: str | None = None
    phone: str | None = None
    external_id: str | None = None


_PHONE_LIKE = re.compile(r"^\+?[\d\s().\-]+$")


def search_term(raw: str, argument: str = "search") -> str:
    """The folded substring a search looks for; phone-like input loses its formatting so
    ``(415) 555`` finds ``+14155550100``."""
    if forbidden_character(raw) is not None:
        raise BadUserInput(f"`{argument}` contains a control character.", field=[argument])
    term = raw.strip()
    if len(term) < SEARCH_MIN:
        raise BadUserInput(
            f"`{argument}` must be at least {SEARCH_MIN} characters long.", field=[argument]
        )
    if len(term) > SEARCH_MAX:
        raise BadUserInput(
            f"`{argument}` must be at most {SEARCH_MAX} characters long.", field=[argument]
        )
    if _PHONE_LIKE.match(term) and sum(ch.isdigit() for ch in term) >= SEARCH_MIN:
        term = ("+" if term.startswith("+") else "") + "".join(ch for ch in term if ch.isdigit())
    return fold(term) or ""


def _like_pattern(term: str) -> str:
    escaped = term.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


_NOT_WORD = re.compile(r"[^\w]|_")


def _trigram_pattern(term: str) -> str:
    """A wider LIKE pattern for pg_trgm's index: the term's words (runs of letters and
    digits) in order, anything between. pg_trgm pads each word that a non-word character
    starts or ends (`lucas.silva` gives `  s`, `as `), and such trigrams (every word
    starting with s) have the longest posting lists: `%lucas%silva%1%` reads about a
    quarter of the index pages `%lucas.silva.1%` does. Every row the term matches matches this too;
    the exact LIKE then filters (see _FILTERS["search_trgm"])."""
    words = [word for word in _NOT_WORD.split(term) if word]
    return "%" + "%".join(words) + "%" if words else _like_pattern(term)


def _normalized_phone(raw: str) -> str:
    try:
        parsed = phonenumbers.parse(raw, None)
    except phonenumbers.NumberParseException:
        return raw.strip()
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def _search_conditions(search_text: Any, name: str) -> list[Any]:
    """A search's conditions on a search text column (consumers', or PostgreSQL's narrow
    copy): the exact LIKE. For "search_trgm" (PostgreSQL, a term with characters other
    than letters and digits: `lucas.silva.1`, `+44770091`) the index answers the wider
    pattern of its words (_trigram_pattern), and the exact one is checked on the rows
    found, as an expression the planner cannot send to the index (where it would add back
    the padded trigrams)."""
    if name == "search_trgm":
        return [search_text.like(bindparam("search_trgm")),
                (search_text + literal_column("''", Text())).like(
                    bindparam("search_like"), escape="\\")]
    return [search_text.like(bindparam("search_like"), escape="\\")]


# Each filter as WHERE conditions over bound parameters: a filtered statement is built (and
# compiled) once per combination of filters, never per request.
_FILTERS: dict[str, Callable[[], list[Any]]] = {
    "search": lambda: [_SEARCH_LIKE],
    "search_trgm": lambda: _search_conditions(consumers.c.search_text, "search_trgm"),
    "created_after": lambda: [
        consumers.c.created_at > bindparam("created_after", type_=consumers.c.created_at.type)
    ],
    "created_before": lambda: [
        consumers.c.created_at < bindparam("created_before", type_=consumers.c.created_at.type)
    ],
    "audience_id": lambda: [member_of(bindparam("audience_id"))],
    "email": lambda: [consumers.c.email_key == bindparam("email")],
    "phone": lambda: [consumers.c.phone == bindparam("phone")],
    "external_id": lambda: [consumers.c.external_id == bindparam("external_id")],
}
_SEARCH_LIKE: ColumnElement[bool]  # declared: the lambdas above use it
(_SEARCH_LIKE,) = _search_conditions(consumers.c.search_text, "search")


# SQLite, a term of 3 characters or more: the trigram indexes narrow the rows down, the LIKE
# (the definition of a match) decides. Which indexes a term needs depends on what it can be
# part of; phones are stored in E.164 (`+` and ASCII digits), so:
_TEXT = "text"  # a term with any other character: only an email or a name
_DIGITS = "digits"  # ASCII digits: anywhere in a phone, too
_PHONE_START = "phone_start"  # `+` and digits: also the start of a phone, a B-tree range
_SEARCH_KINDS = (_TEXT, _DIGITS, _PHONE_START)


def _search_kind(term: str) -> str:
    if term.isascii() and term.isdigit():
        return _DIGITS
    if term.startswith("+") and term[1:].isascii() and term[1:].isdigit():
        return _PHONE_START
    return _TEXT


def _match(fts: str) -> Any:
    return literal_column(fts).op("MATCH")(bindparam("search_match"))


def _search_hits(kind: str, *, distinct: bool = True) -> Any:
    """The rowids of the rows a search may match (every row it matches among them)."""
    hits = select(_text_fts.c.rowid).where(_match("consumers_text_fts"))
    if kind == _TEXT:
        return hits
    if kind == _DIGITS:
        phones = select(_phone_fts.c.rowid).where(_match("consumers_phone_fts"))
    else:
        phones = select(literal_column("consumers.rowid")).where(
            consumers.c.phone >= bindparam("phone_from"), consumers.c.phone < bindparam("phone_to")
        )
    return union(hits, phones) if distinct else union_all(hits, phones)


def _search_filter(kind: str) -> Callable[[], list[Any]]:
    return lambda: [literal_column("consumers.rowid").in_(_search_hits(kind)), _SEARCH_LIKE]


for _kind in _SEARCH_KINDS:
    # A count with other filters: the rows the indexes give, then the LIKE (a search
    # alone is counted by _search_count).
    _FILTERS[f"search_fts_{_kind}"] = _search_filter(_kind)
    # A page of a selective search (see _search_probe): driven by the indexes, the few
    # matching rows then sorted; the FROM clause joins the hits (see _page_base).
    _FILTERS[f"search_join_{_kind}"] = lambda: [_SEARCH_LIKE]

# SQLite's planner cannot know how many rows a trigram search matches. With few matches the
# indexes should drive (then sort them); with many, walking the sort index and testing each
# row finds a page after a few hundred rows. One cheap look at the indexes decides.
SELECTIVE_SEARCH_MAX = 2000


@lru_cache(maxsize=len(_SEARCH_KINDS))
def _search_probe(kind: str) -> Select[Any]:
    hits = _search_hits(kind, distinct=False).limit(SELECTIVE_SEARCH_MAX + 1).subquery()
    return select(func.count()).select_from(hits)


@lru_cache(maxsize=2)
def _narrow_search_count(names: tuple[str, ...]) -> Select[Any]:
    """PostgreSQL, a search alone: counted in consumer_search, whose rows hold only the
    search text (a count re-reads every candidate the lossy trigram index gives, and
    those of the wide consumers table are three times the pages)."""
    (name,) = names
    return select(func.count()).select_from(_consumer_search).where(
        *_search_conditions(_consumer_search.c.search_text, name)
    )


@lru_cache(maxsize=len(_SEARCH_KINDS))
def _search_count(kind: str) -> Select[Any]:
    """A search alone, counted in the indexes without visiting the table: a trigram phrase
    match is the substring match on the folded text, and a range of E.164 phones the
    prefix match (the LIKE re-check of pages guards only against an index out of step,
    e.g. after a VACUUM renumbered rows)."""
    return select(func.count()).select_from(_search_hits(kind).subquery())


# PostgreSQL's planner picks a search page's plan from its estimate of how many rows the LIKE
# matches, and without fresh statistics (a bulk load autovacuum has not analysed yet) it
# guesses a handful: `garcia`, 22,000 of a million, was read whole through the trigram index
# and sorted (82 ms) where walking the sort index finds its page after ~1,000 rows. So a
# search page takes its rows in two steps whose plans no estimate can turn around:
# - the window: the first rows in the page's order (cursor bounds and the other filters
#   applied), read by the sort index (an ORDER BY ... LIMIT of a literal), the LIKE tested on
#   each; 100 rows per row of the page (search_window), so that a term matching one row in
#   a hundred finds its page there, and at least SEARCH_WINDOW;
# - only when it did not (a rarer term, or the window reached the end), every match through
#   the trigram index (a MATERIALIZED CTE: a set, no order to walk), minus the window's
#   matches, sorted: a few thousand rows at most, since the term is rare.
# Both are one statement; the second step is a one-time filter on the window's counts, so
# it is not run at all when the window filled the page. The window keeps whole rows, but
# only its matches: a page found there is read once, with no look-up by primary key after
# (0.77 to 0.61 ms of PostgreSQL's time for `garcia` on the 100k bench data).
SEARCH_WINDOW = 2000


def search_window(size: int) -> int:
    """The window of a page of `size` rows: 100 rows per row, in steps of 1,000 (each size
    class is a statement of its own), at least SEARCH_WINDOW."""
    return max(SEARCH_WINDOW, -(-size // 10) * 1000)


@lru_cache(maxsize=32)
def _windowed(name: str, window_rows: int) -> Limiter:
    """The pagination.Limiter of a PostgreSQL search page (see SEARCH_WINDOW): `tagged` has
    the page's other filters and cursor bounds, _FILTERS[name] is the search."""
    conditions = _FILTERS[name]

    def limited(tagged: Select[Any], ordering: list[Any], limit: Any) -> Select[Any]:
        search = and_(*conditions())
        keys = [o.element for o in ordering]  # (sort column, id)
        size: Any = literal_column(str(window_rows))  # a literal, for the planner
        # The window's matches, whole rows: the LIKE is a column of the window (no index
        # can serve it there), tested above its LIMIT. The CTE is read on demand, in the
        # order its rows were made (the index's): only as far as the page's matches.
        window = (tagged.add_columns(_SEARCH_LIKE.label("_hit")).order_by(*ordering)
                  .limit(size).subquery())
        hits = (select(*(c for c in window.c if c.name != "_hit")).where(window.c._hit)
                .cte().prefix_with("MATERIALIZED"))
        found = select(hits.c.id).limit(limit).subquery()
        # the window's rows counted (whole: as many as it holds), by the same index walk
        whole = (tagged.with_only_columns(literal_column("1"), maintain_column_froms=True)
                 .order_by(*ordering).limit(size).subquery())
        matches = tagged.with_only_columns(*keys).where(search).cte().prefix_with("MATERIALIZED")
        beyond = select(*matches.c).where(
            # A one-time filter, evaluated in order: the window fell short of a page, and
            # the window is whole (not the last rows there are).
            select(func.count()).select_from(found).scalar_subquery() < limit,
            select(func.count()).select_from(whole).scalar_subquery() >= size,
            matches.c.id.not_in(select(hits.c.id)),
        ).order_by(*[ClauseAdapter(matches).traverse(o) for o in ordering]).limit(limit)
        beyond_keys = beyond.subquery()  # at most a page of them, read whole by primary key
        beyond_rows = select(*tagged.selected_columns).select_from(
            beyond_keys.join(consumers, consumers.c.id == beyond_keys.c.id))
        both = union_all(select(*hits.c).limit(limit), beyond_rows).subquery()
        adapter = ClauseAdapter(both)
        return select(both).order_by(*[adapter.traverse(o) for o in ordering]).limit(limit)

    return limited


_WINDOWED = ("search", "search_trgm")


def _page_base(names: tuple[str, ...]) -> Select[Any]:
    base = select(*CONSUMER_COLUMNS)
    for kind in _SEARCH_KINDS:
        if f"search_join_{kind}" in names:
            hits = _search_hits(kind).subquery("hits")
            base = base.select_from(
                hits.join(consumers, literal_column("consumers.rowid") == hits.c.rowid)
            )
    return base.where(*_conditions(names))


def _conditions(names: tuple[str, ...]) -> list[Any]:
    return [condition for name in names for condition in _FILTERS[name]()]


@lru_cache(maxsize=256)
def _count_statement(names: tuple[str, ...]) -> Select[Any]:
    return select(func.count()).select_from(consumers).where(*_conditions(names))


def member_of(audience_id: Any) -> Any:
    """A consumer is in the audience. As a correlated EXISTS (a primary-key probe per row)
    rather than IN (…): a page then walks the sort index and stops after the page instead of
    gathering every member first (170 ms -> 0.2 ms for a 37,000-member audience on SQLite)."""
    return (
        select(memberships.c.consumer_id)
        .where(memberships.c.consumer_id == consumers.c.id,
               memberships.c.audience_id == audience_id)
        .exists()
    )


def _members_base() -> Select[Any]:
    return select(*CONSUMER_COLUMNS)


class ConsumerReads(Reads):
    """Reads of consumers."""

    async def _consumer_filter(
        self, f: ConsumerFilter, *, page: bool
    ) -> tuple[tuple[str, ...], dict[str, Any]]:
        """The names of the filters given, and their parameters. SQLite searches of 3
        characters or more use the trigram indexes: for a count always, for a page when
        the search is selective."""
        names: list[str] = []
        params: dict[str, Any] = {}
        if f.search is not None:
            term = search_term(f.search)
            params["search_like"] = _like_pattern(term)
            if self._reader.dialect == "sqlite" and len(term) >= 3:
                kind = _search_kind(term)
                params["search_match"] = '"' + term.replace('"', '""') + '"'
                if kind == _PHONE_START:
                    params["phone_from"] = term
                    params["phone_to"] = term[:-1] + chr(ord(term[-1]) + 1)
                if not page:
                    names.append(f"search_fts_{kind}")
                else:
                    probe = await self._reader.execute(_search_probe(kind), params, inline=False)
                    selective = probe.scalar_one() <= SELECTIVE_SEARCH_MAX
                    names.append(f"search_join_{kind}" if selective else "search")
            elif self._reader.dialect == "postgresql" and (
                    wider := _trigram_pattern(term)) != params["search_like"]:
                names.append("search_trgm")
                params["search_trgm"] = wider
            else:
                names.append("search")
        if f.created_after is not None:
            names.append("created_after")
            params["created_after"] = f.created_after
        if f.created_before is not None:
            names.append("created_before")
            params["created_before"] = f.created_before
        if f.audience_id is not None:
            if not is_id_of(f.audience_id, IdKind.AUDIENCE):
                raise BadUserInput("`audienceId` is not an audience id.", field=["audienceId"])
            names.append("audience_id")
            params["audience_id"] = f.audience_id
        for name, value in (("email", f.email), ("phone", f.phone),
                            ("externalId", f.external_id)):
            if value is not None and forbidden_character(value) is not None:
                raise BadUserInput(f"`{name}` contains a control character.", field=[name])
        if f.email is not None:
            names.append("email")
            params["email"] = fold(f.email.strip())
        if f.phone is not None:
            names.append("phone")
            params["phone"] = _normalized_phone(f.phone)
        if f.external_id is not None:
            names.append("external_id")
            params["external_id"] = f.external_id
        return tuple(names), params

    async def consumer_page(
        self, f: ConsumerFilter, sort: SortKey, request: PageRequest
    ) -> Page[Row[Any]]:
        names, params = await self._consumer_filter(f, page=True)
        search = next((n for n in names if n in _WINDOWED), None)
        if search is not None and self._reader.dialect == "postgresql":
            others = tuple(n for n in names if n != search)
            window = search_window(request.size)
            statement, page_params = page_statement(
                ("consumers", names, window), lambda: _page_base(others), sort, request,
                limiter=_windowed(search, window),
            )
        else:
            statement, page_params = page_statement(
                ("consumers", names), lambda: _page_base(names), sort, request
            )
        # A filtered page may walk many rows before it has its page: not on the loop.
        rows = await self._rows(statement, {**params, **page_params}, inline=not names)
        return assemble_page(rows, sort, request)

    async def consumer_count(self, f: ConsumerFilter) -> int:
        names, params = await self._consumer_filter(f, page=False)
        if len(names) == 1 and names[0].startswith("search_fts_"):  # SQLite
            statement = _search_count(names[0][len("search_fts_"):])
        elif names in (("search",), ("search_trgm",)) and self._reader.dialect == "postgresql":
            statement = _narrow_search_count(names)
        else:
            statement = _count_statement(names)
        return await self._count(statement, params)

    async def consumers_by_ids(self, ids: Sequence[str]) -> list[Row[Any] | None]:
        return await self._by_ids("consumers", ids)

    async def consumer_pages_by_audience_ids(
        self, audience_ids: Sequence[str], request: PageRequest
    ) -> list[Page[Row[Any]]]:
        # One limited select per audience: each walks the members in page order and stops
        # after the page, however many members the audience has.
        parents = list(dict.fromkeys(audience_ids))
        statement, params = page_statement(
            ("Audience.consumers", len(parents)), _members_base, AUDIENCE_CONSUMER_SORT,
            request, per_parent=(member_of, len(parents)),
        )
        params.update({f"parent_{i}": parent for i, parent in enumerate(parents)})
        rows = await self._rows(statement, params)
        return assemble_pages(rows, audience_ids, "_parent", AUDIENCE_CONSUMER_SORT, request)

    async def consumer_counts_by_audience_ids(self, audience_ids: Sequence[str]) -> list[int]:
        return await self._counts(memberships.c.audience_id, audience_ids)
