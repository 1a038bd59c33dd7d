"""Mutation inputs and payloads. An input field left out is ``UNSET`` (unchanged on update),
an explicit null is ``None`` (cleared); both are handed to the services as they are."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from enum import Enum
from typing import Any, cast

import strawberry
from strawberry.scalars import JSON

from consumers_graphql.api.types import Audience, Consumer, Order
from consumers_graphql.domain import common, validation
from consumers_graphql.domain.audiences import AudienceFields
from consumers_graphql.domain.common import OMITTED, BatchResult
from consumers_graphql.domain.consumers import ConsumerChange, ConsumerFields, ConsumerUpsert
from consumers_graphql.domain.orders import OrderFields
from consumers_graphql.errors import DomainError, ErrorCode
from consumers_graphql.store.models import (
    AUDIENCE_NAME_MAX,
    DESCRIPTION_MAX,
    EMAIL_MAX,
    EXTERNAL_ID_MAX,
    FULL_NAME_MAX,
)

_METADATA_KIB = validation.METADATA_MAX_BYTES // 1024
_NO_CONTROL = "Control characters are refused."


# The domain's codes, less BAD_USER_INPUT (a malformed read, a GraphQL error): a code added
# to the domain appears here by itself.
_WRITE_CODES = [(c.name, c.value) for c in ErrorCode if c is not ErrorCode.BAD_USER_INPUT]
UserErrorCode = strawberry.enum(
    cast("type[Enum]", Enum("UserErrorCode", _WRITE_CODES)),  # functional API: an Enum class
    description="Why a mutation refused (part of) its input. Stable: match on it.",
)


ErrorPolicy = strawberry.enum(
    common.ErrorPolicy,
    name="ErrorPolicy",
    description="What a batch does when some of its items are refused.",
)


@strawberry.type(description="A problem with the input of a mutation (HTTP 200: the request "
                 "itself was well-formed).")
class UserError:
    field: list[str] | None = strawberry.field(description=(
        "Path to the input field at fault, from the argument name, list indices as strings: "
        '`["input", "email"]`, `["input", "3", "email"]` for item 3 of a batch, `["id"]`. '
        "Null when no single field is at fault."
    ))
    message: str = strawberry.field(description="For people; may change. Match on `code`.")
    code: UserErrorCode  # type: ignore[valid-type]  # an Enum class made at run time

    @classmethod
    def from_domain(cls, error: DomainError) -> UserError:
        assert error.code is not ErrorCode.BAD_USER_INPUT, "not a write problem"
        return cls(
            field=list(error.field) if error.field is not None else None,
            message=error.message,
            code=UserErrorCode[error.code.name],
        )


def user_errors(errors: Sequence[DomainError]) -> list[UserError]:
    return [UserError.from_domain(error) for error in errors]


def given(value: Any) -> Any:
    """The services' marker for a field the client left out."""
    return OMITTED if value is strawberry.UNSET else value


def _consumer_fields(
    input: ConsumerCreateInput | ConsumerUpdateInput | ConsumerBatchUpdateInput,
) -> ConsumerFields:
    return ConsumerFields(
        email=given(input.email),
        phone=given(input.phone),
        full_name=given(input.full_name),
        metadata=given(input.metadata),
        external_id=given(input.external_id),
    )


def _upsert_fields(input: ConsumerUpsertInput) -> ConsumerFields:
    return ConsumerFields(
        email=given(input.email),
        phone=given(input.phone),
        full_name=given(input.full_name),
        metadata=given(input.metadata),
    )


_EMAIL_DOC = (f"At most {EMAIL_MAX} characters; surrounding spaces are trimmed. Unique "
              "case-insensitively (`EMAIL_TAKEN`).")
_PHONE_DOC = ("An international number with its country code (at most 64 characters as "
              "typed), stored as E.164: `+1 (415) 555-0100` becomes `+14155550100`.")
_FULL_NAME_DOC = f"At most {FULL_NAME_MAX} characters, trimmed. {_NO_CONTROL}"
_METADATA_CREATE_DOC = f"A JSON object, at most {_METADATA_KIB} KiB serialised."
_METADATA_UPDATE_DOC = (
    f"Merged shallowly into the current metadata: given keys replace, a key set to null is "
    f"removed; `metadata: null` clears it all. The result is at most {_METADATA_KIB} KiB."
)
_EXTERNAL_ID_DOC = (f"Your own id for the consumer, at most {EXTERNAL_ID_MAX} characters, "
                    f"kept exactly as given; unique when set (`EXTERNAL_ID_TAKEN`). {_NO_CONTROL}")
_UPDATE_NOTE = " Leave the field out to keep the current value; null clears it."


@strawberry.input(description="A new consumer. Every field is optional; text fields, when "
                  "given, must not be empty.")
class ConsumerCreateInput:
    email: str | None = strawberry.field(default=strawberry.UNSET, description=_EMAIL_DOC)
    phone: str | None = strawberry.field(default=strawberry.UNSET, description=_PHONE_DOC)
    full_name: str | None = strawberry.field(
        default=strawberry.UNSET, description=_FULL_NAME_DOC
    )
    metadata: JSON | None = strawberry.field(
        default=strawberry.UNSET, description=_METADATA_CREATE_DOC
    )
    external_id: str | None = strawberry.field(
        default=strawberry.UNSET, description=_EXTERNAL_ID_DOC
    )

    def to_fields(self) -> ConsumerFields:
        return _consumer_fields(self)


@strawberry.input(description="Changes to a consumer: only the fields given change."
                  + _UPDATE_NOTE)
class ConsumerUpdateInput:
    email: str | None = strawberry.field(
        default=strawberry.UNSET, description=_EMAIL_DOC + _UPDATE_NOTE
    )
    phone: str | None = strawberry.field(
        default=strawberry.UNSET, description=_PHONE_DOC + _UPDATE_NOTE
    )
    full_name: str | None = strawberry.field(
        default=strawberry.UNSET, description=_FULL_NAME_DOC + _UPDATE_NOTE
    )
    metadata: JSON | None = strawberry.field(
        default=strawberry.UNSET, description=_METADATA_UPDATE_DOC
    )
    external_id: str | None = strawberry.field(
        default=strawberry.UNSET, description=_EXTERNAL_ID_DOC + _UPDATE_NOTE
    )

    def to_fields(self) -> ConsumerFields:
        return _consumer_fields(self)


@strawberry.input(description="One item of `consumerBatchUpdate`: the consumer's id and the "
                  "changes, as in `ConsumerUpdateInput`.")
class ConsumerBatchUpdateInput:
    id: strawberry.ID = strawberry.field(description="The consumer to change (`NOT_FOUND` "
                                         "when none has it); at most once per batch.")
    email: str | None = strawberry.field(
        default=strawberry.UNSET, description=_EMAIL_DOC + _UPDATE_NOTE
    )
    phone: str | None = strawberry.field(
        default=strawberry.UNSET, description=_PHONE_DOC + _UPDATE_NOTE
    )
    full_name: str | None = strawberry.field(
        default=strawberry.UNSET, description=_FULL_NAME_DOC + _UPDATE_NOTE
    )
    metadata: JSON | None = strawberry.field(
        default=strawberry.UNSET, description=_METADATA_UPDATE_DOC
    )
    external_id: str | None = strawberry.field(
        default=strawberry.UNSET, description=_EXTERNAL_ID_DOC + _UPDATE_NOTE
    )

    def to_change(self) -> ConsumerChange:
        return ConsumerChange(id=self.id, fields=_consumer_fields(self))


@strawberry.input(description=(
    "A consumer to create or change, found by its `externalId`. When a consumer has this "
    "externalId, the fields given change it as `ConsumerUpdateInput` does (left out: kept; "
    "null: cleared; `metadata` merged). Otherwise a consumer is created with them, as "
    "`ConsumerCreateInput` does (a metadata key set to null is left out)."
))
class ConsumerUpsertInput:
    external_id: str = strawberry.field(description=(
        f"The key: your own id for the consumer, at most {EXTERNAL_ID_MAX} characters, kept "
        f"exactly as given. Never changed by an upsert. {_NO_CONTROL}"
    ))
    email: str | None = strawberry.field(
        default=strawberry.UNSET, description=_EMAIL_DOC + _UPDATE_NOTE
    )
    phone: str | None = strawberry.field(
        default=strawberry.UNSET, description=_PHONE_DOC + _UPDATE_NOTE
    )
    full_name: str | None = strawberry.field(
        default=strawberry.UNSET, description=_FULL_NAME_DOC + _UPDATE_NOTE
    )
    metadata: JSON | None = strawberry.field(
        default=strawberry.UNSET, description=_METADATA_UPDATE_DOC
    )

    def to_upsert(self) -> ConsumerUpsert:
        return ConsumerUpsert(external_id=self.external_id, fields=_upsert_fields(self))


@strawberry.input(description="A new audience.")
class AudienceCreateInput:
    name: str = strawberry.field(description=(
        f"At most {AUDIENCE_NAME_MAX} characters, trimmed; unique, case-sensitively "
        f"(`NAME_TAKEN`). {_NO_CONTROL}"
    ))
    description: str | None = strawberry.field(default=strawberry.UNSET, description=(
        f"At most {DESCRIPTION_MAX} characters, trimmed; may span lines (tabs and line "
        "breaks are the only control characters allowed)."
    ))

    def to_fields(self) -> AudienceFields:
        return AudienceFields(name=self.name, description=given(self.description))


@strawberry.input(description="Changes to an audience: only the fields given change.")
class AudienceUpdateInput:
    name: str | None = strawberry.field(default=strawberry.UNSET, description=(
        f"At most {AUDIENCE_NAME_MAX} characters, trimmed; unique (`NAME_TAKEN`). Cannot be "
        "null."
    ))
    description: str | None = strawberry.field(default=strawberry.UNSET, description=(
        f"At most {DESCRIPTION_MAX} characters, trimmed." + _UPDATE_NOTE
    ))

    def to_fields(self) -> AudienceFields:
        return AudienceFields(name=given(self.name), description=given(self.description))


@strawberry.input(description="An order a consumer placed.")
class OrderRecordInput:
    consumer_id: strawberry.ID = strawberry.field(description="Who placed it (`NOT_FOUND` "
                                                  "when no consumer has this id).")
    amount: float = strawberry.field(description=(
        "The amount, 0 or more and less than 100,000,000,000, with no more decimal places "
        "than the currency has (2 for USD, 0 for JPY, 3 for KWD). Read as the decimal it is "
        "written as (`19.99` is stored as exactly 19.99). Refunds are not negative orders: "
        "delete the order instead."
    ))
    currency: str = strawberry.field(description="ISO 4217 code, e.g. `EUR` (either case; "
                                     "stored upper-case).")
    placed_at: datetime | None = strawberry.field(
        default=strawberry.UNSET, description="When the order was placed; now by default."
    )
    external_id: str | None = strawberry.field(default=strawberry.UNSET, description=(
        f"Your own id for the order, at most {EXTERNAL_ID_MAX} characters; unique when set "
        f"(`EXTERNAL_ID_TAKEN`). {_NO_CONTROL}"
    ))

    def to_fields(self) -> OrderFields:
        return OrderFields(
            consumer_id=self.consumer_id,
            amount=self.amount,
            currency=self.currency,
            placed_at=given(self.placed_at),
            external_id=given(self.external_id),
        )


@strawberry.type(description="The result of a consumer mutation: the consumer, or why not.")
class ConsumerPayload:
    consumer: Consumer | None = strawberry.field(description=(
        "The consumer as written (for `consumerDelete`, as it was before deletion); null when "
        "`userErrors` is not empty."
    ))
    user_errors: list[UserError]


@strawberry.type(description="The outcome of one batch item, at the same index as the item.")
class ConsumerBatchResult:
    consumer: Consumer | None = strawberry.field(description="The consumer as written; null "
                                                 "when this item (or, under "
                                                 "REJECT_EVERYTHING, any item) was refused.")
    user_errors: list[UserError] = strawberry.field(description="This item's problems.")


@strawberry.type(description="The result of a batch: one result per input item, in input "
                 "order.")
class ConsumerBatchPayload:
    count: int = strawberry.field(description=(
        "How many items were written (an update item that changed nothing counts: it was "
        "accepted). 0 when the batch was refused as a whole."
    ))
    results: list[ConsumerBatchResult] = strawberry.field(description=(
        "One per input item, in input order (also when the whole batch is refused)."
    ))
    user_errors: list[UserError] = strawberry.field(description=(
        "Every item's problems with their paths, plus the batch's own (`BATCH_TOO_LARGE`)."
    ))

    @classmethod
    def from_result(cls, result: BatchResult) -> ConsumerBatchPayload:
        rows = [item.row for item in result.results if item.row is not None]
        # Rows of one statement become nodes together (their columns looked up once).
        if rows and all(row._fields == rows[0]._fields for row in rows):
            written = iter(Consumer.from_rows(rows))
        else:
            written = iter([Consumer.from_row(row) for row in rows])
        return cls(
            count=result.count,
            results=[
                ConsumerBatchResult(
                    consumer=next(written) if item.row is not None else None,
                    user_errors=user_errors(item.errors),
                )
                for item in result.results
            ],
            user_errors=user_errors(result.errors),
        )


_CREATED_DOC = ("True when the consumer was created, false when one had the externalId "
                "already (it was updated, or left as it was) or when refused.")


@strawberry.type(description="The result of `consumerUpsert`: the consumer, whether it was "
                 "created, or why not.")
class ConsumerUpsertPayload:
    consumer: Consumer | None = strawberry.field(description=(
        "The consumer as written; null when `userErrors` is not empty."
    ))
    created: bool = strawberry.field(description=_CREATED_DOC)
    user_errors: list[UserError]


@strawberry.type(description="The outcome of one upsert item, at the same index as the item.")
class ConsumerBatchUpsertResult:
    consumer: Consumer | None = strawberry.field(description="The consumer as written; null "
                                                 "when this item (or, under "
                                                 "REJECT_EVERYTHING, any item) was refused.")
    created: bool = strawberry.field(description=_CREATED_DOC)
    user_errors: list[UserError] = strawberry.field(description="This item's problems.")


@strawberry.type(description="The result of `consumerBatchUpsert`: one result per input "
                 "item, in input order.")
class ConsumerBatchUpsertPayload:
    count: int = strawberry.field(description=(
        "How many items were written, created or updated (an item that changed nothing "
        "counts: it was accepted). 0 when the batch was refused as a whole."
    ))
    results: list[ConsumerBatchUpsertResult] = strawberry.field(description=(
        "One per input item, in input order (also when the whole batch is refused)."
    ))
    user_errors: list[UserError] = strawberry.field(description=(
        "Every item's problems with their paths, plus the batch's own (`BATCH_TOO_LARGE`)."
    ))

    @classmethod
    def from_result(cls, result: BatchResult) -> ConsumerBatchUpsertPayload:
        written = ConsumerBatchPayload.from_result(result)
        return cls(
            count=written.count,
            results=[
                ConsumerBatchUpsertResult(consumer=item.consumer, created=outcome.created,
                                          user_errors=item.user_errors)
                for item, outcome in zip(written.results, result.results, strict=True)
            ],
            user_errors=written.user_errors,
        )


@strawberry.type(description="The result of an audience mutation: the audience, or why not.")
class AudiencePayload:
    audience: Audience | None = strawberry.field(description=(
        "The audience as written (for `audienceDelete`, as it was before deletion); null "
        "when `userErrors` is not empty."
    ))
    user_errors: list[UserError]


@strawberry.type(description="The result of an order mutation: the order, or why not.")
class OrderPayload:
    order: Order | None = strawberry.field(description=(
        "The order as written (for `orderDelete`, as it was before deletion); null when "
        "`userErrors` is not empty."
    ))
    user_errors: list[UserError]
