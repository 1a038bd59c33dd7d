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

BATCH_UPSERT = """mutation BatchUpsert($input: [ConsumerUpsertInput!]!) {
  consumerBatchUpsert(input: $input) {
    count
    results { consumer { id } created userErrors { code } }
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


# W6: consumers the upserts update (made before the run, with old timestamps so that they
# sort after every consumer of W1's page), and the new ones they create; each by its own
# externalId prefix, apart from W5's.
W6_DOMAIN = "bench-w6.example.com"
W6_BASE_PREFIX = "bw6-base-"
W6_NEW_PREFIX = "bw6-n-"
W6_EXISTING = BATCH_SIZE // 2
W6_NULLABLE = ("email", "phone", "fullName", "metadata", None)


def upsert_input(tag: str, size: int = BATCH_SIZE) -> list[dict[str, Any]]:
    """A sync job's batch: every other item (W6_EXISTING in all) updates a consumer made
    before the run, the others create new ones unique per `tag`; each item sends every
    field (name and metadata new each time), and item i leaves field i % 5 of email, phone,
    fullName, metadata null when there is one (16 % of the fields, as W5's mix)."""
    items = []
    for i in range(size):
        existing = i % 2 == 0 and i // 2 < W6_EXISTING
        item: dict[str, Any] = {
            "externalId": f"{W6_BASE_PREFIX}{i // 2}" if existing
            else f"{W6_NEW_PREFIX}{tag}-{i}",
            "email": f"w6.{'base' if existing else tag}.{i}@{W6_DOMAIN}",
            "phone": f"+1415{2_000_000 + i}",
            "fullName": f"Bench Upsert {tag} {i}",
            "metadata": {"tier": "gold", "n": i, "tag": tag},
        }
        nulled = W6_NULLABLE[i % len(W6_NULLABLE)]
        if nulled is not None:
            item[nulled] = None
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
    write: bool = False  # W5, W6: rows are created, and removed between rounds
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.database}:{self.name}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
