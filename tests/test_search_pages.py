"""Search pages are exact whichever way their rows are found: on PostgreSQL a page is looked
for in a window of the first rows in its order (search_window: SEARCH_WINDOW for a page of
20 or fewer), then among all the matches beyond it (store/queries/consumers.py). Pages are
checked against a brute-force filter of the rows, across the window's end, in both
directions, on plain and nullable sorts."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest

from consumers_graphql.store.queries.consumers import SEARCH_WINDOW, search_window
from tests.conftest import GraphQL
from tests.factories import BASE_TIME, consumer_row, insert_consumers

PAGE = """
query($search: String, $sortBy: ConsumerSortField!, $sortDir: SortDirection!, $first: Int,
      $after: String, $last: Int, $before: String) {
  consumers(search: $search, sortBy: $sortBy, sortDir: $sortDir, first: $first, after: $after,
            last: $last, before: $before) {
    pageInfo { hasNextPage hasPreviousPage startCursor endCursor }
    nodes { id }
  }
}
"""

# The first page of 20 or fewer rows is looked for among the first SEARCH_WINDOW rows of its
# order; EXTRA more lie beyond them, at either end (a page of 100 has them all in its window).
EXTRA = 400
TOTAL = SEARCH_WINDOW + EXTRA


def given_rows() -> list[dict[str, Any]]:
    rows = []
    for n in range(TOTAL):
        fields: dict[str, Any] = {
            # two consumers per minute: the id breaks the ties
            "created_at": BASE_TIME + timedelta(minutes=n // 2),
            "full_name": f"Person {(n * 7919) % TOTAL:05d}",  # not in creation order
        }
        if n % 151 == 0:  # a rare term, on both sides of either end's window
            fields["full_name"] = f"Needle {(n * 31) % 997:03d}"
        if n in (5, 17, 150, TOTAL - 3):  # found beyond the window of a first page only
            fields["full_name"] = f"Oldie {n}"
        if n % 3 == 0:  # a common term: every page found within its window
            fields["email"] = f"user{n}@common.example"
        if n % 7 == 0:
            fields["email"] = None  # a nullable sort's second segment
        rows.append(consumer_row(n, **fields))
    return rows


def expected(rows: list[dict[str, Any]], term: str, sort_by: str, descending: bool
             ) -> list[str]:
    """The brute force: every matching row, in the connection's order (NULLs last)."""
    found = [r for r in rows if term in r["search_text"]]
    column = {"CREATED_AT": "created_at", "FULL_NAME": "full_name_key",
              "EMAIL": "email_key"}[sort_by]
    present = sorted((r for r in found if r[column] is not None),
                     key=lambda r: (r[column], r["id"]), reverse=descending)
    missing = sorted((r["id"] for r in found if r[column] is None), reverse=descending)
    return [r["id"] for r in present] + missing


async def walk(gql: GraphQL, term: str, sort_by: str, direction: str, size: int, *,
               forward: bool) -> list[str]:
    """Every page of the search, following cursors; the page flags checked on the way."""
    ids: list[str] = []
    cursor = None
    while True:
        variables: dict[str, Any] = {"search": term, "sortBy": sort_by, "sortDir": direction}
        if forward:
            variables.update(first=size, after=cursor)
        else:
            variables.update(last=size, before=cursor)
        page = (await gql.data(PAGE, variables))["consumers"]
        nodes = [n["id"] for n in page["nodes"]]
        info = page["pageInfo"]
        more = info["hasNextPage"] if forward else info["hasPreviousPage"]
        back = info["hasPreviousPage"] if forward else info["hasNextPage"]
        assert back is (cursor is not None)  # the cursor's own row lies behind
        ids = ids + nodes if forward else nodes + ids
        if not more:
            assert len(nodes) <= size
            return ids
        assert len(nodes) == size
        cursor = info["endCursor"] if forward else info["startCursor"]


SORTS = [("CREATED_AT", "DESC"), ("CREATED_AT", "ASC"), ("FULL_NAME", "ASC"),
         ("EMAIL", "DESC")]


@pytest.mark.parametrize(("term", "sizes"), [
    ("needle", (100, 20, 6)),     # 16 matches: a first page of 20 runs past the window
    ("oldie", (20, 2)),           # 4 matches, all beyond the window of a first page
    ("@common.ex", (100,)),      # hundreds of matches: every page within its window
    ("nobody-at-all", (20,)),
])
async def test_search_pages_equal_a_brute_force_filter(
    gql: GraphQL, write_engine: Any, term: str, sizes: tuple[int, ...]
) -> None:
    rows = given_rows()
    await insert_consumers(write_engine, rows)
    for sort_by, direction in SORTS:
        want = expected(rows, term, sort_by, direction == "DESC")
        for size in sizes:
            for forward in (True, False):
                got = await walk(gql, term, sort_by, direction, size, forward=forward)
                assert got == want, (sort_by, direction, size, forward)


async def test_a_page_runs_past_the_window_exactly(gql: GraphQL, write_engine: Any) -> None:
    rows = given_rows()
    await insert_consumers(write_engine, rows)
    want = expected(rows, "needle", "CREATED_AT", True)
    assert search_window(20) == SEARCH_WINDOW < TOTAL
    in_window = [r["id"] for r in rows[-SEARCH_WINDOW:] if "needle" in r["search_text"]]
    assert 0 < len(in_window) < 20 < len(want) + 5  # the first page needs rows beyond it
    page = (await gql.data(PAGE, {"search": "needle", "sortBy": "CREATED_AT",
                                  "sortDir": "DESC", "first": 20}))["consumers"]
    assert [n["id"] for n in page["nodes"]] == want
    assert page["pageInfo"]["hasNextPage"] is False
    page = (await gql.data(PAGE, {"search": "needle", "sortBy": "CREATED_AT",
                                  "sortDir": "DESC", "first": len(want) - 1}))["consumers"]
    assert [n["id"] for n in page["nodes"]] == want[:-1]
    assert page["pageInfo"]["hasNextPage"] is True
