"""The operations the benchmark sends, and how each workload variant is built from a dataset."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SCALARS = (
    "id email phone fullName metadata externalId totalOrders totalOrderValue lastOrderAt "
    "createdAt updatedAt"
)
RELATIONS = (
    "audiences { nodes { id name } } orders(first: 5) { nodes { id amount currency placedAt } }"
)

# W1/W2: one document for every page, the position and order coming in as variables.
PAGE = f"""query Page($after: String, $sortBy: ConsumerSortField, $sortDir: SortDirection) {{
  consumers(first: 20, after: $after, sortBy: $sortBy, sortDir: $sortDir) {{
    nodes {{ {SCALARS} {RELATIONS} }}
  }}
}}"""
PAGE_COUNT = f"""query PageCount($after: String, $sortBy: ConsumerSortField,
    $sortDir: SortDirection) {{
  consumers(first: 20, after: $after, sortBy: $sortBy, sortDir: $sortDir) {{
    totalCount
    nodes {{ {SCALARS} {RELATIONS} }}
  }}
}}"""
SEARCH = f"""query Search($search: String!) {{
  consumers(first: 20, search: $search) {{ nodes {{ {SCALARS} }} }}
}}"""
SEARCH_COUNT = f"""query SearchCount($search: String!) {{
  consumers(first: 20, search: $search) {{ totalCount nodes {{ {SCALARS} }} }}
}}"""
CONSUMER = f"""query Consumer($id: ID!) {{ consumer(id: $id) {{ {SCALARS} }} }}"""
NODES = f"""query Nodes($ids: [ID!]!) {{
  nodes(ids: $ids) {{ ... on Consumer {{ {SCALARS} }} }}
}}"""
BATCH_CREATE = """mutation BatchCreate($input: [ConsumerCreateInput!]!) {
  consumerBatchCreate(input: $input) {
    count
    results { consumer { id } userErrors { code } }
    userErrors { field code }
  }
}"""

BATCH_SIZE = 500
# Marks what W5 writes, so a worker can take it out again (and clean up after a crash).
W5_DOMAIN = "bench-w5.example.com"  # .test is refused by email validation
W5_EXTERNAL_PREFIX = "bw5-"
W5_FIELDS = ("email", "phone", "fullName", "metadata", "externalId")


def batch_input(tag: str, size: int = BATCH_SIZE) -> list[dict[str, Any]]:
    """`size` new consumers, unique per `tag`; item i leaves field i % 5 null: 20 % of the
    fields null, in a mix that differs from row to row (and every item keeps an email or
    an externalId to be found by)."""
    items = []
    for i in range(size):
        item: dict[str, Any] = {
            "email": f"w5.{tag}.{i}@{W5_DOMAIN}",
            "phone": f"+1415{2_000_000 + i}",
            "fullName": f"Bench Batch {i}",
            "metadata": {"tier": "gold", "n": i},
            "externalId": f"{W5_EXTERNAL_PREFIX}{tag}-{i}",
        }
        item[W5_FIELDS[i % len(W5_FIELDS)]] = None
        items.append(item)
    return items


@dataclass
class Variant:
    """One measured thing: a GraphQL operation (or a baseline) against one database."""

    name: str  # e.g. "W1", "W2 deep", "R1"
    kind: str  # "graphql", "r1", "hello"
    database: str  # "sqlite" or "postgresql"
    url: str  # SQLAlchemy URL of the dataset
    query: str = ""
    variables: dict[str, Any] = field(default_factory=dict)
    write: bool = False  # W5: rows are created, and removed between rounds
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.database}:{self.name}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
