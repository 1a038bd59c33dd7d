"""The Mutation root: a thin face over the use-cases of ``consumers_graphql.domain``. Refusals
come back as ``userErrors`` in the payload (HTTP 200); GraphQL ``errors`` are left to
malformed requests, authentication and limits."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Annotated, Any, TypeVar

import strawberry
from sqlalchemy.engine import Row

from consumers_graphql.api import decorators
from consumers_graphql.api.context import Info
from consumers_graphql.api.inputs import (
    AudienceCreateInput,
    AudiencePayload,
    AudienceUpdateInput,
    ConsumerBatchPayload,
    ConsumerBatchUpdateInput,
    ConsumerBatchUpsertPayload,
    ConsumerCreateInput,
    ConsumerPayload,
    ConsumerUpdateInput,
    ConsumerUpsertInput,
    ConsumerUpsertPayload,
    ErrorPolicy,
    OrderPayload,
    OrderRecordInput,
    user_errors,
)
from consumers_graphql.api.types import Audience, Consumer, Order
from consumers_graphql.domain import common
from consumers_graphql.domain.audiences import AudienceService
from consumers_graphql.domain.consumers import ConsumerService
from consumers_graphql.domain.orders import OrderService
from consumers_graphql.domain.validation import BATCH_MAX
from consumers_graphql.errors import DomainErrors

_BATCH_DOC = (
    f"At most {BATCH_MAX} items (`BATCH_TOO_LARGE` otherwise, and nothing is written). The "
    "insert or update is sent as one statement. Under `REJECT_EVERYTHING` (the default) the "
    "batch is atomic: one refused item and nothing is written. Under `REJECT_FAILED_ROWS` "
    "the accepted items are written. Either way every refused item is reported, with paths "
    '`["input", "<index>", "<field>"]`; an item repeating an earlier item\'s email, '
    "externalId or id is `DUPLICATE_IN_BATCH`."
)

BatchPolicy = Annotated[
    ErrorPolicy | None,  # type: ignore[valid-type]  # an enum class returned by strawberry.enum()
    strawberry.argument(description="`REJECT_EVERYTHING` (atomic, the default) or "
                        "`REJECT_FAILED_ROWS` (write the accepted items)."),
]
ConsumerIds = Annotated[
    list[strawberry.ID],
    strawberry.argument(description=f"At most {BATCH_MAX} consumer ids, each once."),
]


S = TypeVar("S", ConsumerService, AudienceService, OrderService)


def _service(info: Info, kind: type[S]) -> S:
    # A write makes every read this request has cached stale: this payload, and those of
    # later mutation fields of the same operation, must read afresh, and from the primary
    # (a replica may not have the write yet).
    info.context.loaders.clear()
    info.context.repository.use_primary()
    return kind(info.context.database)


async def _consumer_payload(write: Awaitable[Row[Any]]) -> ConsumerPayload:
    try:
        row = await write
    except DomainErrors as refused:
        return ConsumerPayload(consumer=None, user_errors=user_errors(refused.errors))
    return ConsumerPayload(consumer=Consumer.from_row(row), user_errors=[])


async def _audience_payload(write: Awaitable[Row[Any]]) -> AudiencePayload:
    try:
        row = await write
    except DomainErrors as refused:
        return AudiencePayload(audience=None, user_errors=user_errors(refused.errors))
    return AudiencePayload(audience=Audience.from_row(row), user_errors=[])


async def _order_payload(write: Awaitable[Row[Any]]) -> OrderPayload:
    try:
        row = await write
    except DomainErrors as refused:
        return OrderPayload(order=None, user_errors=user_errors(refused.errors))
    return OrderPayload(order=Order.from_row(row), user_errors=[])


def _policy(value: common.ErrorPolicy | None) -> common.ErrorPolicy:
    return value if value is not None else common.ErrorPolicy.REJECT_EVERYTHING


@strawberry.type
class Mutation:
    @decorators.mutation(description="Create a consumer.")
    async def consumer_create(self, info: Info, input: ConsumerCreateInput) -> ConsumerPayload:
        service = _service(info, ConsumerService)
        return await _consumer_payload(service.create_consumer(input.to_fields()))

    @decorators.mutation(description=(
        "Change a consumer: fields left out stay, null clears, `metadata` merges shallowly. "
        "`updatedAt` moves forward when a value actually changes, and only then."
    ))
    async def consumer_update(
        self, info: Info, id: strawberry.ID, input: ConsumerUpdateInput
    ) -> ConsumerPayload:
        service = _service(info, ConsumerService)
        return await _consumer_payload(service.update_consumer(id, input.to_fields()))

    @decorators.mutation(description="Delete a consumer with its orders and audience "
                         "memberships; the payload holds the consumer as it was.")
    async def consumer_delete(self, info: Info, id: strawberry.ID) -> ConsumerPayload:
        return await _consumer_payload(_service(info, ConsumerService).delete_consumer(id))

    @decorators.mutation(description="Create many consumers. " + _BATCH_DOC)
    async def consumer_batch_create(
        self,
        info: Info,
        input: list[ConsumerCreateInput],
        error_policy: BatchPolicy = common.ErrorPolicy.REJECT_EVERYTHING,
    ) -> ConsumerBatchPayload:
        result = await _service(info, ConsumerService).create_consumers(
            [item.to_fields() for item in input], _policy(error_policy)
        )
        return ConsumerBatchPayload.from_result(result)

    @decorators.mutation(description="Change many consumers, each as `consumerUpdate` does. "
                         + _BATCH_DOC)
    async def consumer_batch_update(
        self,
        info: Info,
        input: list[ConsumerBatchUpdateInput],
        error_policy: BatchPolicy = common.ErrorPolicy.REJECT_EVERYTHING,
    ) -> ConsumerBatchPayload:
        result = await _service(info, ConsumerService).update_consumers(
            [item.to_change() for item in input], _policy(error_policy)
        )
        return ConsumerBatchPayload.from_result(result)

    @decorators.mutation(description=(
        "Create or change the consumer with this `externalId`: with one, its fields change as "
        "`consumerUpdate` changes them (`updatedAt` only when a value does); without, it is "
        "created. `created` says which. Racing upserts of one externalId end in one "
        "consumer, never in an error."
    ))
    async def consumer_upsert(
        self, info: Info, input: ConsumerUpsertInput
    ) -> ConsumerUpsertPayload:
        item = input.to_upsert()
        write = _service(info, ConsumerService).upsert_consumer(item.external_id, item.fields)
        try:
            row, created = await write
        except DomainErrors as refused:
            return ConsumerUpsertPayload(consumer=None, created=False,
                                         user_errors=user_errors(refused.errors))
        return ConsumerUpsertPayload(consumer=Consumer.from_row(row), created=created,
                                     user_errors=[])

    @decorators.mutation(description="Create or change many consumers by externalId, each as "
                         "`consumerUpsert` does; an externalId at most once. " + _BATCH_DOC)
    async def consumer_batch_upsert(
        self,
        info: Info,
        input: list[ConsumerUpsertInput],
        error_policy: BatchPolicy = common.ErrorPolicy.REJECT_EVERYTHING,
    ) -> ConsumerBatchUpsertPayload:
        result = await _service(info, ConsumerService).upsert_consumers(
            [item.to_upsert() for item in input], _policy(error_policy)
        )
        return ConsumerBatchUpsertPayload.from_result(result)

    @decorators.mutation(description="Create an audience.")
    async def audience_create(self, info: Info, input: AudienceCreateInput) -> AudiencePayload:
        service = _service(info, AudienceService)
        return await _audience_payload(service.create_audience(input.to_fields()))

    @decorators.mutation(description="Change an audience: fields left out stay; `updatedAt` "
                         "moves forward when a value actually changes.")
    async def audience_update(
        self, info: Info, id: strawberry.ID, input: AudienceUpdateInput
    ) -> AudiencePayload:
        service = _service(info, AudienceService)
        return await _audience_payload(service.update_audience(id, input.to_fields()))

    @decorators.mutation(description="Delete an audience and its memberships (the consumers "
                         "stay); the payload holds the audience as it was.")
    async def audience_delete(self, info: Info, id: strawberry.ID) -> AudiencePayload:
        return await _audience_payload(_service(info, AudienceService).delete_audience(id))

    @decorators.mutation(description=(
        "Add consumers to an audience; those already members stay members. All or nothing: "
        "an unknown id (`NOT_FOUND`, path `[\"consumerIds\", \"<index>\"]`) or a repeated "
        "one (`DUPLICATE_IN_BATCH`) and no membership changes."
    ))
    async def audience_add_consumers(
        self, info: Info, audience_id: strawberry.ID, consumer_ids: ConsumerIds
    ) -> AudiencePayload:
        write = _service(info, AudienceService).add_audience_consumers(audience_id, consumer_ids)
        return await _audience_payload(write)

    @decorators.mutation(description=(
        "Remove consumers from an audience; consumers that are not members are ignored. All "
        "or nothing, with the same checks as `audienceAddConsumers`."
    ))
    async def audience_remove_consumers(
        self, info: Info, audience_id: strawberry.ID, consumer_ids: ConsumerIds
    ) -> AudiencePayload:
        write = _service(info, AudienceService).remove_audience_consumers(audience_id, consumer_ids)
        return await _audience_payload(write)

    @decorators.mutation(description=(
        "Record an order. The consumer's `totalOrders`, `totalOrderValue` (exact) and "
        "`lastOrderAt` are brought up to date in the same transaction. `totalOrderValue` is "
        "at most 100,000,000,000 (`VALIDATION_FAILED` on `amount` past it)."
    ))
    async def order_record(self, info: Info, input: OrderRecordInput) -> OrderPayload:
        return await _order_payload(_service(info, OrderService).record_order(input.to_fields()))

    @decorators.mutation(description="Delete an order and take it out of the consumer's "
                         "totals; the payload holds the order as it was.")
    async def order_delete(self, info: Info, id: strawberry.ID) -> OrderPayload:
        return await _order_payload(_service(info, OrderService).delete_order(id))
