"""The GraphiQL page at /graphql: GraphiQL 4 with the README's walk-through in its tabs, the
Headers panel open with where the key goes, the key typed once for every tab, and the schema
fetched again whenever the headers settle on a new value (the first introspection runs
before any key is entered)."""

from __future__ import annotations

import html
import json
from importlib import resources

from consumers_graphql.settings import UiAssets
from consumers_graphql.web.ui_assets import graphiql_urls

# The README's "GraphiQL walk-through", in its order (tests/test_ui_assets.py keeps them equal).
WALKTHROUGH = (
    """query ListConsumers {
  consumers(first: 20, search: "john", sortBy: CREATED_AT, sortDir: DESC) {
    totalCount
    pageInfo { hasNextPage endCursor }
    nodes { id email fullName createdAt }
  }
}""",
    """query NextPage($after: String!) {
  consumers(first: 20, search: "john", sortBy: CREATED_AT, sortDir: DESC, after: $after) {
    pageInfo { hasNextPage endCursor }
    nodes { id email fullName }
  }
}""",
    """query GetConsumer($id: ID!) {
  consumer(id: $id) {
    id email phone fullName metadata externalId
    totalOrders totalOrderValue lastOrderAt createdAt updatedAt
    audiences { nodes { id name } }
    orders(first: 5) { nodes { amount currency placedAt } }
  }
}""",
    """query Search {
  searchConsumers(email: "john@example.com") { nodes { id email fullName } }
}""",
    """query Audiences {
  audiences { nodes { id name description consumers { totalCount } } }
}""",
    """query Nodes($ids: [ID!]!) {
  nodes(ids: $ids) {
    __typename id
    ... on Consumer { email }
    ... on Audience { name consumers(first: 5) { totalCount nodes { email } } }
  }
}""",
    """query VipSpenders($audienceId: ID!) {
  consumers(audienceId: $audienceId, sortBy: TOTAL_ORDER_VALUE, sortDir: DESC, first: 10) {
    nodes { fullName totalOrderValue lastOrderAt }
  }
}""",
)
# What the operations with variables need, for the user to fill in.
_VARIABLES = {
    "NextPage": {"after": "endCursor from ListConsumers"},
    "GetConsumer": {"id": "cons_… (an id from ListConsumers)"},
    "Nodes": {"ids": ["cons_… (from ListConsumers)", "aud_… (from Audiences)"]},
    "VipSpenders": {"audienceId": "aud_… (an id from Audiences)"},
}
# The Headers panel's first content: where the key goes (the first `serve` prints one).
HEADERS_HINT = '{\n  "Authorization": "Bearer sk_live_..."\n}'
# A new tab's operation (the walk-through is in the first ones).
NEW_TAB = """# The walk-through is in the first tabs; the key in Headers applies here too.
{
  consumers(first: 5) { totalCount nodes { id email } }
}
"""
# How long the headers must stay unchanged before the schema is fetched with them.
HEADERS_DEBOUNCE_MS = 400


def _tabs() -> list[dict[str, str]]:
    tabs = []
    for query in WALKTHROUGH:
        name = query.split("(")[0].split("{")[0].split()[-1]
        tab = {"query": query}
        if name in _VARIABLES:
            tab["variables"] = json.dumps(_VARIABLES[name], indent=2, ensure_ascii=False)
        tabs.append(tab)
    return tabs


def page(mode: UiAssets) -> str:
    """The page's HTML; its scripts and stylesheet from here (local) or unpkg (cdn, with SRI)."""
    template = (resources.files("consumers_graphql.web") / "graphiql.html").read_text("utf-8")
    urls = graphiql_urls(mode)

    def tag(name: str) -> str:
        url, sri = urls[name]
        extra = f' integrity="{sri}" crossorigin="anonymous"' if sri else ""
        if name.endswith(".css"):
            return f'<link rel="stylesheet" href="{html.escape(url)}"{extra}>'
        return f'<script src="{html.escape(url)}"{extra}></script>'

    config = {"tabs": _tabs(), "headers": HEADERS_HINT, "newTab": NEW_TAB,
              "debounceMs": HEADERS_DEBOUNCE_MS}
    return (template
            .replace("{{ stylesheet }}", tag("graphiql.min.css"))
            .replace("{{ scripts }}", "\n    ".join(tag(name) for name in (
                "react.production.min.js", "react-dom.production.min.js", "graphiql.min.js",
                "graphql-ws.min.js")))
            .replace("{{ config }}", html.escape(json.dumps(config, ensure_ascii=False))))
