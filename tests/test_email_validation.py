"""Emails are accepted or refused exactly as email-validator itself decides, though the
service remembers the verdict on each domain (validation._domain_forms): the verdicts of a
plain email-validator, in a process of its own, against the API's."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from consumers_graphql.domain import validation
from tests.conftest import GraphQL

BATCH = """mutation Batch($input: [ConsumerCreateInput!]!) {
  consumerBatchCreate(input: $input, errorPolicy: REJECT_FAILED_ROWS) {
    results { consumer { email } userErrors { field message } }
  }
}"""
DOMAINS = [
    "example.com", "Example.COM", "mail.example.org", "bücher.example", "xn--bcher-kva.example",
    "例え.jp", "exa mple.com", "-bad.example.com", "a..b.example.com", "localhost", "example",
    "[192.0.2.1]", "example.com.", "under_score.example.com", "x" * 64 + ".example.com",
    "ex\u200bample.com", "\uff25\uff38\uff21\uff2d\uff30\uff2c\uff25.com",  # fullwidth
]
# {n}: the domain's number, so that no two addresses are the same address
LOCAL_PARTS = ["first{n}", "second.one{n}", "a..b{n}", '"quoted{n}"', ".dot{n}", "ok+tag{n}",
               "ünï{n}", "Postmaster{n}", "l" * 62 + "{n}", "a@b{n}", "Name <x{n}", "sp ace{n}",
               "(note){n}"]


def at_limit(head: str, *labels: int) -> str:
    """A 64-character local part at a domain of ``head``, labels this long, and .example."""
    return "x" * 64 + "@" + ".".join([head, *("c" * n for n in labels), "example"])


# 254 bytes, then 255, in the form of the address that is longest: as given (é decomposed),
# normalised (例 twenty times, 3 bytes each), in IDNA ASCII (bücher); then longer local
# parts (email-validator allows more than 64 characters).
EDGES = [at_limit("e\u0301" * 10, 60, 60, 28), at_limit("e\u0301" * 10, 60, 60, 29),
         at_limit("xn--fsq" + "a" * 19, 60, 59), at_limit("xn--fsq" + "a" * 19, 60, 60),
         at_limit("bücher", 60, 60, 45), at_limit("bücher", 60, 60, 46),
         at_limit("example", 60, 60, 51),
         "y" * 65 + "@example.com", "z" * 242 + "@example.com",
         "r" * 232 + "@bücher.example", "r" * 233 + "@bücher.example"]

REFERENCE = """
import json, sys
from email_validator import EmailNotValidError, validate_email
verdicts = []
for address in json.load(sys.stdin):
    try:
        validate_email(address, check_deliverability=False)
        verdicts.append(None)
    except EmailNotValidError as exc:
        verdicts.append(str(exc))
json.dump(verdicts, sys.stdout)
"""


def reference_verdicts(addresses: list[str]) -> list[str | None]:
    """email-validator's own verdicts, in a process where nothing has touched it."""
    done = subprocess.run([sys.executable, "-c", REFERENCE], input=json.dumps(addresses),
                          capture_output=True, text=True, check=True)
    verdicts: list[str | None] = json.loads(done.stdout)
    return verdicts


async def test_emails_get_the_verdicts_of_email_validator(gql: GraphQL) -> None:
    # every local part with every domain: each domain is checked once, then remembered
    addresses = [f"{local.format(n=n)}@{domain}"
                 for n, domain in enumerate(DOMAINS) for local in LOCAL_PARTS]
    addresses += EDGES
    addresses = [a for a in addresses if len(a) <= 254]  # longer: the API's own limit
    hits = validation._domain_forms.cache_info().hits

    data: Any = await gql.data(BATCH, {"input": [{"email": a} for a in addresses]})

    answers = []
    for result in data["consumerBatchCreate"]["results"]:
        problems = [e["message"] for e in result["userErrors"] if e["field"][-1] == "email"]
        answers.append(problems[0] if problems else None)
    expected = [None if verdict is None else f"email is not a valid address: {verdict}"
                for verdict in reference_verdicts(addresses)]
    assert answers == expected
    # both kinds are there, and the verdicts on domains were remembered
    assert 10 < answers.count(None) < len(answers) - 10
    assert validation._domain_forms.cache_info().hits > hits
