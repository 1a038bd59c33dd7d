"""Keyset (seek) pagination with the Relay connection rules, for both databases.

Rows are ordered by ``(sort column, id)`` in the requested direction, NULLs last in both
directions. A cursor is the ``(value, id)`` of a row plus the order it was made under; a page
is the rows strictly after/before cursors, never an OFFSET, so rows inserted or deleted
between two requests cannot shift a page.

NULLs last is built from *segments*: the rows whose sort value is set, ordered by
``(value, id)``, then the rows where it is NULL, ordered by id. Each segment is a plain
range over the ``(sort, id)`` index; which segments a cursor reaches is decided here in
Python, so the database never sees a catch-all ``OR … IS NULL`` predicate that no index
serves. The segments, and the probes that make ``hasPreviousPage``/``hasNextPage`` exact,
are sent as one UNION ALL statement.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal, InvalidOperation
from enum import Enum
from typing import Any, Generic, TypeVar

from sqlalchemy import (
    ColumnElement,
    Integer,
    Select,
    bindparam,
    func,
    literal_column,
    select,
    tuple_,
    union_all,
)
from sqlalchemy.engine import Row

from consumers_graphql.errors import BadUserInput
from consumers_graphql.ids import kind_of
from consumers_graphql.store.normalize import forbidden_character

DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100

T = TypeVar("T")


class ValueKind(Enum):
    DATETIME = "datetime"
    DECIMAL = "decimal"
    INT = "int"
    TEXT = "text"


@dataclass(frozen=True)
class SortKey:
    """An order of a connection: a sort column (with the id as tiebreaker) and a direction."""

    connection: str  # the kind of list ("consumers", "audiences", "orders"): cursors stay in it
    name: str  # the public name of the sort field, e.g. "createdAt"
    column: Any  # the table column to order by
    id_column: Any
    kind: ValueKind
    descending: bool
    nullable: bool

    @property
    def scope(self) -> str:
        return f"{self.connection}:{self.name}:{'desc' if self.descending else 'asc'}"


@dataclass(frozen=True)
class Cursor:
    value: Any
    id: str


@dataclass(frozen=True)
class PageRequest:
    """Validated page arguments. Exactly one of first/last is set."""

    first: int | None
    last: int | None
    after: Cursor | None
    before: Cursor | None

    @property
    def size(self) -> int:
        return self.first if self.first is not None else self.last  # type: ignore[return-value]  # one is always set

    @property
    def forward(self) -> bool:
        return self.last is None


@dataclass
class Page(Generic[T]):
    items: list[T]
    has_next_page: bool
    has_previous_page: bool
    sort: SortKey | None = None
    # where each item (a row) holds its sort value and its id, from which its cursor is
    # made when asked for (most pages are answered without one)
    key_at: tuple[int, int] = (0, 0)
    # the items' column names, when they are rows of one statement
    fields: tuple[str, ...] = ()

    def cursor(self, index: int) -> str:
        assert self.sort is not None
        item: Any = self.items[index]
        value_at, id_at = self.key_at
        return encode_cursor(self.sort, item[value_at], item[id_at])

    @property
    def start_cursor(self) -> str | None:
        return self.cursor(0) if self.items else None

    @property
    def end_cursor(self) -> str | None:
        return self.cursor(len(self.items) - 1) if self.items else None


# --- arguments and cursors -------------------------------------------------------------------


def page_request(
    sort: SortKey,
    *,
    first: int | None = None,
    after: str | None = None,
    last: int | None = None,
    before: str | None = None,
    default_size: int = DEFAULT_PAGE_SIZE,
) -> PageRequest:
    """Check the Relay arguments; every misuse is a BadUserInput naming the argument."""
    # The same arguments come again for every node of a page (its nested connections):
    # checked once and kept, a bounded number of them and of cursors no longer than the
    # server writes (what a cursor decodes to depends only on the sort's scope, kind and
    # nullability).
    if len(after or "") + len(before or "") > _KEPT_CURSORS_MAX:
        return _page_request(sort, first, after, last, before, default_size)
    key = (sort.scope, sort.kind, sort.nullable, first, after, last, before, default_size)
    request = _requests.get(key)
    if request is None:
        request = _page_request(sort, first, after, last, before, default_size)
        if len(_requests) >= _REQUESTS_MAX:
            _requests.clear()
        _requests[key] = request
    return request


_requests: dict[tuple[Any, ...], PageRequest] = {}
_REQUESTS_MAX = 1024
_KEPT_CURSORS_MAX = 1024


def _page_request(
    sort: SortKey, first: int | None, after: str | None, last: int | None,
    before: str | None, default_size: int,
) -> PageRequest:
    if first is not None and last is not None:
        raise BadUserInput(
            "Passing both `first` and `last` is not supported: choose one.", field=["last"]
        )
    for name, size in (("first", first), ("last", last)):
        if size is not None and not 0 <= size <= MAX_PAGE_SIZE:
            raise BadUserInput(
                f"`{name}` must be between 0 and {MAX_PAGE_SIZE}; {size} was given.",
                field=[name],
            )
    if first is None and last is None:
        first = default_size
    return PageRequest(
        first=first,
        last=last,
        after=decode_cursor(sort, after, "after") if after is not None else None,
        before=decode_cursor(sort, before, "before") if before is not None else None,
    )


def encode_cursor(sort: SortKey, value: Any, row_id: str) -> str:
    if isinstance(value, datetime):
        value = value.isoformat()
    elif isinstance(value, Decimal):
        value = str(value)
    payload = json.dumps([sort.scope, value, row_id], separators=(",", ":"), ensure_ascii=False)
    return base64.urlsafe_b64encode(payload.encode()).decode().rstrip("=")


def decode_cursor(sort: SortKey, token: str, argument: str) -> Cursor:
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        scope, value, row_id = json.loads(raw)
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
        raise BadUserInput(f"`{argument}` is not a valid cursor.", field=[argument]) from None
    if scope != sort.scope:
        raise BadUserInput(
            f"`{argument}` is a cursor of another connection or sort order; "
            "cursors are only valid with the arguments they were made under.",
            field=[argument],
        )
    if (not isinstance(row_id, str) or kind_of(row_id) is None
            or (value is None and not sort.nullable)):
        raise BadUserInput(f"`{argument}` is not a valid cursor.", field=[argument])
    try:
        return Cursor(value=_decode_value(sort.kind, value), id=row_id)
    except (ValueError, TypeError, InvalidOperation, OverflowError):
        raise BadUserInput(f"`{argument}` is not a valid cursor.", field=[argument]) from None


_INT_RANGE = range(-(2**31), 2**31)  # the columns' range on both databases
_DECIMAL_LIMIT = Decimal(10) ** 15
_UTC = timedelta(0)


def _decode_value(kind: ValueKind, value: Any) -> Any:
    """A sort value as the server wrote it into a cursor; anything else (a forged cursor)
    is refused here rather than by the database."""
    if value is None:
        return None
    if kind is ValueKind.DATETIME:
        parsed = datetime.fromisoformat(value)
        if parsed.utcoffset() != _UTC:  # the server writes UTC; also refuses naive values
            raise ValueError("not a UTC timestamp")
        return parsed
    if kind is ValueKind.DECIMAL:
        if not isinstance(value, str):
            raise TypeError("decimal must be a string")
        decimal = Decimal(value)
        exponent = decimal.as_tuple().exponent
        if (not decimal.is_finite() or not isinstance(exponent, int) or exponent < -4
                or abs(decimal) >= _DECIMAL_LIMIT):
            raise ValueError("not a stored amount")
        return decimal
    if kind is ValueKind.INT:
        if not isinstance(value, int) or isinstance(value, bool) or value not in _INT_RANGE:
            raise TypeError("not a stored count")
        return value
    if not isinstance(value, str) or forbidden_character(value) is not None:
        raise TypeError("not a stored text")
    return value


# --- statements ------------------------------------------------------------------------------

_PAGE, _BEFORE_PROBE, _AFTER_PROBE = 0, 1, 2
_SET, _NULL = 0, 1  # segment ranks: rows with a sort value come first, NULLs last


def _segments(sort: SortKey) -> tuple[int, ...]:
    return (_SET, _NULL) if sort.nullable else (_SET,)


def _segment_of(sort: SortKey, cursor: Cursor) -> int:
    return _NULL if sort.nullable and cursor.value is None else _SET


def _bound(
    sort: SortKey, segment: int, cursor_segment: int, name: str, *, after: bool, inclusive: bool
) -> ColumnElement[bool] | bool:
    """Rows of `segment` after (or before) the cursor bound as `name` in the connection's
    order: a predicate, True (the whole segment) or False (none of it)."""
    if segment != cursor_segment:
        return (segment > cursor_segment) == after
    ascending_op = after != sort.descending  # "after" in an ascending order means greater
    cursor_id = bindparam(f"{name}_id", type_=sort.id_column.type)
    left: ColumnElement[Any]
    right: ColumnElement[Any]
    if segment == _NULL:
        left, right = sort.id_column, cursor_id
    else:
        left = tuple_(sort.column, sort.id_column)
        right = tuple_(bindparam(f"{name}_value", type_=sort.column.type), cursor_id)
    if ascending_op:
        return left >= right if inclusive else left > right
    return left <= right if inclusive else left < right


def _ordering(sort: SortKey, columns: Any, *, forward: bool) -> list[Any]:
    descending = sort.descending == forward  # reading backward reverses the order
    col, id_col = columns[sort.column.name], columns[sort.id_column.name]
    return [col.desc(), id_col.desc()] if descending else [col.asc(), id_col.asc()]


@dataclass(frozen=True)
class _Shape:
    """What a page statement's SQL depends on; values travel as bound parameters, so one
    statement (and one compiled form) serves every page of the same shape."""

    base: Hashable
    scope: str
    forward: bool
    after_segment: int | None
    before_segment: int | None


_statements: dict[_Shape, Select[Any]] = {}
_STATEMENT_CACHE_MAX = 4096

# How one ordered part of a page statement takes its first rows: given the rows' select
# (filters and cursor bounds applied), its order and its limit, the limited select.
Limiter = Callable[[Select[Any], list[Any], Any], Select[Any]]


def order_and_limit(tagged: Select[Any], ordering: list[Any], limit: Any) -> Select[Any]:
    """The default Limiter: ORDER BY ... LIMIT, the plan left to the database."""
    return tagged.order_by(*ordering).limit(limit)


def page_statement(
    base_key: Hashable,
    base: Callable[[], Select[Any]],
    sort: SortKey,
    request: PageRequest,
    *,
    partition_by: Any = None,
    per_parent: tuple[Callable[[Any], Any], int] | None = None,
    limiter: Limiter = order_and_limit,
) -> tuple[Select[Any], dict[str, Any]]:
    """The statement returning the page (size + 1 rows, to see whether more follow) and the
    probes for the flags that the extra row cannot tell, with its parameters. `base_key`
    names the shape of `base()` (its filters), which builds it when it is not cached yet.
    With `partition_by`, it pages every partition (parent) separately, with a window
    function: the nested connections of a whole batch at once. With `per_parent` (a function
    from a parent's bound parameter to the condition "belongs to it", and the number of
    parents, bound as `parent_0`, `parent_1`, …) it does the same with one ordered, limited
    select per parent, which reports the parent as `_parent`: each stops after its page,
    where a window function would number every child of every parent first (an audience
    may have a million members). `limiter` (fixed for a `base_key`) takes each ordered
    part's rows (see Limiter; a consumer search's, store/queries/consumers.py)."""
    shape = _Shape(
        base=base_key,
        scope=sort.scope,
        forward=request.forward,
        after_segment=None if request.after is None else _segment_of(sort, request.after),
        before_segment=None if request.before is None else _segment_of(sort, request.before),
    )
    statement = _statements.get(shape)
    if statement is None:
        if len(_statements) >= _STATEMENT_CACHE_MAX:
            _statements.clear()
        statement = _statements[shape] = _build(base(), sort, shape, partition_by, per_parent,
                                                limiter)
    params: dict[str, Any] = {"page_limit": request.size + 1}
    for name, cursor in (("after", request.after), ("before", request.before)):
        if cursor is not None:
            params[f"{name}_id"] = cursor.id
            if cursor.value is not None:
                params[f"{name}_value"] = cursor.value
    return statement, params


def _build(
    base: Select[Any],
    sort: SortKey,
    shape: _Shape,
    partition_by: Any,
    per_parent: tuple[Callable[[Any], Any], int] | None = None,
    limiter: Limiter = order_and_limit,
) -> Select[Any]:
    parts: list[Select[Any]] = []
    if per_parent is not None:
        belongs_to, count = per_parent
        for index in range(count):
            parent = bindparam(f"parent_{index}", type_=sort.id_column.type)
            scoped = base.add_columns(parent.label("_parent")).where(belongs_to(parent))
            for segment in _segments(sort):
                parts += _segment_selects(scoped, sort, shape, segment, None)
        wrapped = [select(part.subquery()) for part in parts]
        union = (union_all(*wrapped) if len(wrapped) > 1 else wrapped[0]).subquery("page")
        seg_order = union.c._seg.asc() if shape.forward else union.c._seg.desc()
        return select(union).order_by(
            union.c._kind, seg_order, *_ordering(sort, union.c, forward=shape.forward)
        )
    for segment in _segments(sort):
        parts += _segment_selects(base, sort, shape, segment, partition_by, limiter)
    if len(parts) == 1 and partition_by is None:
        return parts[0]  # already ordered and limited: the common case, a plain index range
    wrapped = [select(part.subquery()) if partition_by is None else part for part in parts]
    union = (union_all(*wrapped) if len(wrapped) > 1 else wrapped[0]).subquery("page")
    seg_order = union.c._seg.asc() if shape.forward else union.c._seg.desc()
    return select(union).order_by(
        union.c._kind, seg_order, *_ordering(sort, union.c, forward=shape.forward)
    )


def _segment_selects(
    base: Select[Any], sort: SortKey, shape: _Shape, segment: int, partition_by: Any,
    limiter: Limiter = order_and_limit,
) -> list[Select[Any]]:
    in_segment: list[ColumnElement[bool]] = []
    if sort.nullable:
        in_segment.append(sort.column.is_(None) if segment == _NULL else sort.column.isnot(None))

    def restricted(*bounds: ColumnElement[bool] | bool) -> list[ColumnElement[bool]] | None:
        if any(b is False for b in bounds):
            return None
        return in_segment + [b for b in bounds if not isinstance(b, bool)]

    after, before = shape.after_segment, shape.before_segment
    selects = []
    page_bounds = []
    if after is not None:
        page_bounds.append(_bound(sort, segment, after, "after", after=True, inclusive=False))
    if before is not None:
        page_bounds.append(
            _bound(sort, segment, before, "before", after=False, inclusive=False)
        )
    where = restricted(*page_bounds)
    page_limit = bindparam("page_limit", type_=Integer)
    if where is not None:
        selects.append(
            _limited(base, sort, where, _PAGE, segment, page_limit, shape.forward, partition_by,
                     limiter)
        )
    # hasPreviousPage: does any row lie at or before `after`? hasNextPage: at or after `before`?
    if after is not None:
        where = restricted(_bound(sort, segment, after, "after", after=False, inclusive=True))
        if where is not None:
            selects.append(_limited(base, sort, where, _BEFORE_PROBE, segment, 1, False,
                                    partition_by, limiter))
    if before is not None:
        where = restricted(_bound(sort, segment, before, "before", after=True, inclusive=True))
        if where is not None:
            selects.append(_limited(base, sort, where, _AFTER_PROBE, segment, 1, True,
                                    partition_by, limiter))
    return selects


def _limited(
    base: Select[Any],
    sort: SortKey,
    where: list[ColumnElement[bool]],
    kind: int,
    segment: int,
    limit: Any,
    forward: bool,
    partition_by: Any,
    limiter: Limiter = order_and_limit,
) -> Select[Any]:
    tagged = base.add_columns(
        literal_column(str(kind)).label("_kind"), literal_column(str(segment)).label("_seg")
    ).where(*where)
    table_columns = {sort.column.name: sort.column, sort.id_column.name: sort.id_column}
    ordering = _ordering(sort, table_columns, forward=forward)
    if partition_by is None:
        return limiter(tagged, ordering, limit)
    numbered = tagged.add_columns(
        func.row_number().over(partition_by=partition_by, order_by=ordering).label("_rn")
    ).subquery()
    return select(*[c for c in numbered.c if c.name != "_rn"]).where(numbered.c._rn <= limit)


# --- assembling pages ------------------------------------------------------------------------


_Positions = tuple[tuple[str, ...], int | None, int, int]


def _positions(rows: Sequence[Row[Any]], sort: SortKey) -> _Positions:
    """The rows' column names, and where the probe kind, the sort value and the id are
    among them (rows of one statement share their columns: looked up once, then read by
    position)."""
    fields = rows[0]._fields
    kind = fields.index("_kind") if "_kind" in fields else None
    return fields, kind, fields.index(sort.column.name), fields.index(sort.id_column.name)


def assemble_page(
    rows: Sequence[Row[Any]],
    sort: SortKey,
    request: PageRequest,
    positions: _Positions | None = None,
) -> Page[Row[Any]]:
    page_rows: list[Row[Any]] = []
    before_probe = after_probe = False
    if rows and positions is None:
        positions = _positions(rows, sort)
    fields, kind_at, value_at, id_at = positions or ((), None, 0, 0)
    if kind_at is None or (request.after is None and request.before is None):
        page_rows = list(rows)  # probes are sent only with a cursor
    else:
        for row in rows:
            kind = row[kind_at]
            if kind == _PAGE:
                page_rows.append(row)
            elif kind == _BEFORE_PROBE:
                before_probe = True
            else:
                after_probe = True
    has_next, has_previous = _cut(page_rows, request.size, request.forward,
                                  before_probe, after_probe)
    return Page(
        items=page_rows,
        has_next_page=has_next,
        has_previous_page=has_previous,
        sort=sort,
        key_at=(value_at, id_at),
        fields=fields,
    )


def _cut(items: list[Any], size: int, forward: bool, before_probe: bool = False,
         after_probe: bool = False) -> tuple[bool, bool]:
    """Cuts a page's rows (a list of its own: changed in place) to its size, in the page's
    order; its hasNextPage and hasPreviousPage."""
    more = len(items) > size
    if more:
        del items[size:]
    if forward:
        return more or after_probe, before_probe
    items.reverse()
    return after_probe, more or before_probe


def assemble_pages(
    rows: Sequence[Row[Any]],
    keys: Sequence[Hashable],
    partition_name: str,
    sort: SortKey,
    request: PageRequest,
) -> list[Page[Row[Any]]]:
    """Split a partitioned page statement's rows into one page per key, in key order."""
    grouped: dict[Hashable, list[Row[Any]]] = {key: [] for key in keys}
    positions = None
    if rows:
        positions = _positions(rows, sort)
        partition_at = positions[0].index(partition_name)
        for row in rows:
            grouped[row[partition_at]].append(row)
    if request.after is not None or request.before is not None:
        return [assemble_page(grouped[key], sort, request, positions) for key in keys]
    # Without a cursor (a look-ahead's usual page: `first: n`) no probe is sent, and each
    # key's rows, a list of its own, are its page and at most one more: assemble_page's
    # work without its copies, once per key of a page of parents (a key given twice gets
    # the one page).
    fields, _kind_at, value_at, id_at = positions or ((), None, 0, 0)
    size, forward, key_at = request.size, request.forward, (value_at, id_at)
    pages: dict[Hashable, Page[Row[Any]]] = {}
    for key, items in grouped.items():
        has_next, has_previous = _cut(items, size, forward)
        pages[key] = Page(items, has_next, has_previous, sort, key_at, fields)
    return [pages[key] for key in keys]
