"""The reference's JSON shapes, as pydantic models: they document the API (OpenAPI) and
type the request bodies. Responses are built by `rest.shapes` and match these exactly.

Request fields are typed `Any` at run time, with their documented JSON schema attached:
every value rule (type, length, format, metadata size) lives once, in `validation`, so a
body with several problems gets all of them back at once, with the same messages as
GraphQL's `userErrors`. Pydantic checks only the structure (an object per item, no unknown
keys, `id` present on batch-update items)."""

from __future__ import annotations

from typing import Annotated, Any, TypeAlias

from email_validator import SPECIAL_USE_DOMAIN_NAMES
from pydantic import BaseModel, ConfigDict, Field, RootModel, WithJsonSchema, model_validator
from pydantic_core import PydanticCustomError

from consumers_graphql.domain.validation import BATCH_MAX, METADATA_MAX_BYTES, PHONE_INPUT_MAX
from consumers_graphql.store.models import EMAIL_MAX, EXTERNAL_ID_MAX, FULL_NAME_MAX

BATCH_TOO_LARGE = "batch_too_large"


class ConsumerOut(BaseModel):
    """interface Consumer of the reference: every key present, null where empty."""

    id: str = Field(examples=["cons_01HXYZ123456789"])
    email: str | None
    phone: str | None = Field(description="E.164, e.g. +14155550100")
    fullName: str | None
    metadata: dict[str, Any] | None
    externalId: str | None
    totalOrders: int
    totalOrderValue: float
    lastOrderAt: str | None = Field(description="RFC 3339, UTC")
    createdAt: str = Field(description="RFC 3339, UTC, e.g. 2024-11-01T10:00:00Z")
    updatedAt: str = Field(description="RFC 3339, UTC")


class AudienceOut(BaseModel):
    id: str
    name: str
    description: str | None
    createdAt: str
    updatedAt: str


class OrderOut(BaseModel):
    id: str
    consumerId: str
    amount: float
    currency: str
    placedAt: str
    externalId: str | None
    createdAt: str


class ConsumerWithRelationsOut(ConsumerOut):
    """A consumer; `audiences` and `orders` are present only when `include` asks for them."""

    audiences: list[AudienceOut] | None = Field(
        default=None, description="With include=audiences: every audience, by name."
    )
    orders: list[OrderOut] | None = Field(
        default=None,
        description="With include=orders: the 100 most recently placed orders, newest first.",
    )


class PageInfoOut(BaseModel):
    startCursor: str | None
    endCursor: str | None


class ConsumersListOut(BaseModel):
    data: list[ConsumerWithRelationsOut]
    pageInfo: PageInfoOut


class ErrorDetail(BaseModel):
    field: str = Field(description="Path of the field at fault: `email`, `3.email` for item 3 "
                       "of a batch, `id`, `first`, or `body` for the body as a whole.")
    message: str


class ErrorOut(BaseModel):
    error: str = Field(examples=["Validation failed"])
    details: list[ErrorDetail]


# What `validation.text` enforces: no control character, and (trimmed fields) at least one
# character that is not a space; ECMAScript patterns, as JSON Schema has them (a range of
# lone surrogates, refused too, is not one that validators accept).
_BANNED = "\\u0000-\\u001f\\u007f-\\u009f"
_PLAIN = f"[^{_BANNED}]"
TRIMMED = f"^{_PLAIN}*[^\\s{_BANNED}]{_PLAIN}*$"
UNTRIMMED = f"^{_PLAIN}+$"


def _any_case(word: str) -> str:
    return "".join(f"[{ch}{ch.upper()}]" for ch in word)


# email-validator refuses the special-use domains (RFC 6761 and its kin) and their subdomains,
# and a domain of one label (`a@localhost`: "it should have a period").
SPECIAL_USE = "|".join(_any_case(name) for name in SPECIAL_USE_DOMAIN_NAMES)
EMAIL = f"^(?!.*[@.](?:{SPECIAL_USE})\\.?\\s*$)(?=.*@[^@]*\\.[^@]*$){TRIMMED[1:]}"
# `+`, a country code (never 0) and 7 to 15 digits in all, with the separators people write;
# whether it is a number in use (phonenumbers' metadata) is checked too.
PHONE = "^\\s*\\+[1-9](?:[ ()./-]*[0-9]){6,14}[ ()./-]*\\s*$"
# Each key of a JSON object takes at least 5 bytes (`"":0,`): an upper bound the size implies.
METADATA_MAX_KEYS = (METADATA_MAX_BYTES - 1) // 5


def _nullable(schema: dict[str, Any], description: str) -> WithJsonSchema:
    return WithJsonSchema({"anyOf": [schema, {"type": "null"}], "description": description})


Email: TypeAlias = Annotated[Any, _nullable(
    {"type": "string", "format": "email", "minLength": 3, "maxLength": EMAIL_MAX,
     "pattern": EMAIL},
    "Unique, case-insensitively. Null: no email.",
)]
Phone: TypeAlias = Annotated[Any, _nullable(
    {"type": "string", "minLength": 8, "maxLength": PHONE_INPUT_MAX, "pattern": PHONE},
    "An international number (E.164 format recommended); spaces, dashes and brackets are "
    "accepted and stored as E.164 (+14155550100).",
)]
FullName: TypeAlias = Annotated[Any, _nullable(
    {"type": "string", "minLength": 1, "maxLength": FULL_NAME_MAX, "pattern": TRIMMED},
    "No control characters; not only spaces.",
)]
Metadata: TypeAlias = Annotated[Any, _nullable(
    {"type": "object", "additionalProperties": True, "maxProperties": METADATA_MAX_KEYS},
    f"A JSON object of at most {METADATA_MAX_BYTES:,} bytes serialised. On update it is "
    "merged shallowly: given keys replace, a key set to null is removed, null clears it.",
)]
ExternalId: TypeAlias = Annotated[Any, _nullable(
    {"type": "string", "minLength": 1, "maxLength": EXTERNAL_ID_MAX, "pattern": UNTRIMMED},
    "Your own id for the consumer, kept exactly as given; unique when set.",
)]


class CreateConsumerRequest(BaseModel):
    """interface CreateConsumerRequest of the reference. Every field is optional."""

    model_config = ConfigDict(extra="forbid")

    email: Email = None
    phone: Phone = None
    fullName: FullName = None
    metadata: Metadata = None
    externalId: ExternalId = None


class UpdateConsumerRequest(CreateConsumerRequest):
    """interface UpdateConsumerRequest of the reference: keys left out stay unchanged, null
    clears; metadata is merged shallowly (a key set to null is removed, metadata: null clears
    it)."""


class BatchUpdateConsumerItem(UpdateConsumerRequest):
    """interface BatchUpdateConsumerItem of the reference."""

    id: Annotated[Any, WithJsonSchema({"type": "string", "description": "The consumer ID"})]


class UpsertConsumerRequest(UpdateConsumerRequest):
    """The body of PUT /api/v1/consumers/external/{externalId}: as UpdateConsumerRequest.
    The externalId is the path's; the body may repeat it (a record sent whole), not change
    it."""

    externalId: Annotated[Any, WithJsonSchema({
        "type": "string", "description": "Optional: the path's externalId, if repeated."})] = None


class BatchUpsertConsumerItem(UpdateConsumerRequest):
    """An item of PUT /api/v1/consumers/batch/upsert: the externalId that finds the consumer
    (or names the new one), and its fields as in UpdateConsumerRequest."""

    externalId: Annotated[Any, WithJsonSchema({
        "type": "string", "minLength": 1, "maxLength": EXTERNAL_ID_MAX, "pattern": UNTRIMMED,
        "description": "The key: your own id for the consumer, kept exactly as given. A "
        "consumer with it is updated, else one is created."})]


def _at_most_batch_max(value: Any) -> Any:
    # Before the items are looked at: a batch too large is refused as a whole.
    if isinstance(value, list) and len(value) > BATCH_MAX:
        raise PydanticCustomError(
            BATCH_TOO_LARGE,
            "A batch takes at most {max} items; {count} were given. Nothing was written.",
            {"max": BATCH_MAX, "count": len(value)},
        )
    return value


class BatchCreateConsumersRequest(RootModel[list[CreateConsumerRequest]]):
    """type BatchCreateConsumersRequest = CreateConsumerRequest[] (at most 500)."""

    root: Annotated[list[CreateConsumerRequest], Field(max_length=BATCH_MAX)]

    _check_size = model_validator(mode="before")(_at_most_batch_max)


class BatchUpdateConsumersRequest(RootModel[list[BatchUpdateConsumerItem]]):
    """type BatchUpdateConsumersRequest = BatchUpdateConsumerItem[] (at most 500)."""

    root: Annotated[list[BatchUpdateConsumerItem], Field(max_length=BATCH_MAX)]

    _check_size = model_validator(mode="before")(_at_most_batch_max)


class BatchUpsertConsumersRequest(RootModel[list[BatchUpsertConsumerItem]]):
    """BatchUpsertConsumerItem[] (at most 500, each externalId once)."""

    root: Annotated[list[BatchUpsertConsumerItem], Field(max_length=BATCH_MAX)]

    _check_size = model_validator(mode="before")(_at_most_batch_max)
