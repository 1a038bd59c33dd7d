"""Strawberry's argument conversion, planned once per field instead of worked out per value.

Strawberry turns graphql-core's coerced arguments (dicts keyed by GraphQL names) into Python
values (input dataclasses, lists, UNSET for what was left out) with `convert_arguments`,
which inspects each value's type again for every value: for `consumerBatchCreate` of 500
items that is some 275,000 calls and a fifth of the request (bench/ W5). Here the same
conversion is planned once per field from the field's argument types, for the types this
schema uses: scalars, enums, lists, optionals and input types. Anything else (`Maybe`,
`GlobalID`, inputs with their own `from_input`, recursive inputs) has no plan, and the
field keeps Strawberry's conversion. `tests/test_arguments.py` checks both give equal values
for every argument of the schema.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import MISSING
from typing import Any

from strawberry.relay import GlobalID
from strawberry.scalars import is_scalar
from strawberry.schema.config import StrawberryConfig
from strawberry.types.base import (
    StrawberryList,
    StrawberryMaybe,
    StrawberryOptional,
    has_object_definition,
)
from strawberry.types.enum import StrawberryEnumDefinition, has_enum_definition
from strawberry.types.field import StrawberryField
from strawberry.types.lazy_type import LazyType
from strawberry.types.unset import UNSET

Converter = Callable[[Any], Any]
ArgumentsConverter = Callable[[Mapping[str, Any]], dict[str, Any]]


def _leaf(value: Any) -> Any:
    return value


def _list_of_leaves(value: Any) -> Any:
    # copied, as Strawberry does: graphql-core shares a default value between requests
    return value if value is None or value is UNSET else list(value)


def plan_arguments(
    field: StrawberryField, scalar_registry: Mapping[object, Any], config: StrawberryConfig
) -> ArgumentsConverter | None:
    """`convert_arguments` for this field's arguments, or None where it has no plan."""
    parts = []
    for argument in field.arguments:
        convert = _plan(argument.type, scalar_registry, config, frozenset())
        if convert is None:
            return None
        parts.append((config.name_converter.from_argument(argument), argument.python_name,
                      convert))

    def convert_all(values: Mapping[str, Any]) -> dict[str, Any]:
        return {python_name: convert(values[name])
                for name, python_name, convert in parts if name in values}

    return convert_all


def _plan(type_: Any, registry: Mapping[object, Any], config: StrawberryConfig,
          planning: frozenset[Any]) -> Converter | None:
    # The branches follow strawberry.types.arguments.convert_argument, in its order; null
    # and UNSET come back unchanged at every level, as there.
    if isinstance(type_, StrawberryMaybe):
        return None
    if isinstance(type_, StrawberryOptional):
        return _plan(type_.of_type, registry, config, planning)
    if isinstance(type_, StrawberryList):
        item = _plan(type_.of_type, registry, config, planning)
        if item is None:
            return None
        if item is _leaf:
            return _list_of_leaves

        def each(value: Any) -> Any:
            if value is None or value is UNSET:
                return value
            return [item(v) for v in value]

        return each
    if type_ is GlobalID:
        return None
    if isinstance(type_, LazyType):
        return _plan(type_.resolve_type(), registry, config, planning)
    if (is_scalar(type_, registry) or isinstance(type_, StrawberryEnumDefinition)
            or has_enum_definition(type_)):
        return _leaf
    if has_object_definition(type_):
        return _plan_input(type_, registry, config, planning)
    return None


def _plan_input(cls: Any, registry: Mapping[object, Any], config: StrawberryConfig,
                planning: frozenset[Any]) -> Converter | None:
    definition = cls.__strawberry_definition__
    if not definition.is_input or definition.from_input is not None or cls in planning:
        return None
    # Strawberry's implicit None for fields without a default (graphql-core has already
    # refused a required field left out).
    defaults = {f.python_name: None for f in definition.fields
                if f.default_value is MISSING and f.default_factory is MISSING}
    fields = []
    for f in definition.fields:
        convert = _plan(f.resolve_type(type_definition=definition), registry, config,
                        planning | {cls})
        if convert is None:
            return None
        fields.append((config.name_converter.from_field(f), f.python_name, convert))

    def build(value: Any) -> Any:
        if value is None or value is UNSET:
            return value
        kwargs = dict(defaults)
        for name, python_name, convert in fields:
            if name in value:
                kwargs[python_name] = convert(value[name])
        return cls(**kwargs)

    return build
