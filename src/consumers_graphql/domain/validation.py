"""Field rules for writes, shared by the GraphQL and REST faces.

Each rule takes a raw input value and the path of the field it came from, and returns the
value to store or raises a ``DomainError`` naming that path. No I/O: uniqueness is checked by
the services against the database.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any

import phonenumbers
from email_validator import EmailNotValidError, validate_email

from consumers_graphql.errors import DomainError, ErrorCode
from consumers_graphql.store.models import (
    AUDIENCE_NAME_MAX,
    DESCRIPTION_MAX,
    EMAIL_MAX,
    EXTERNAL_ID_MAX,
    FULL_NAME_MAX,
)
from consumers_graphql.store.normalize import forbidden_character

Path = Sequence[str]

METADATA_MAX_BYTES = 16 * 1024
PHONE_INPUT_MAX = 64
BATCH_MAX = 500
# Limits that keep every amount and total exact in the money column (NUMERIC(19, 4); a
# 64-bit count of 1/10,000 units on SQLite) and on the wire, a double: 11 digits before the
# point and 4 after are 15, which a double's shortest form always gives back.
AMOUNT_MAX = Decimal(10) ** 11
TOTAL_ORDER_VALUE_MAX = Decimal(10) ** 11

# ISO 4217 codes and their minor units (digits after the decimal point): the current list,
# without the fund, metal and testing codes (XAU, XDR, XTS, …) that no order is paid in,
# plus the codes withdrawn since 2021 (CUC, HRK, SLL, ZWL) so that past orders can be
# recorded.
_MINOR_UNITS_OTHER = {
    "BIF": 0, "CLP": 0, "DJF": 0, "GNF": 0, "ISK": 0, "JPY": 0, "KMF": 0, "KRW": 0,
    "PYG": 0, "RWF": 0, "UGX": 0, "UYI": 0, "VND": 0, "VUV": 0, "XAF": 0, "XOF": 0,
    "XPF": 0,
    "BHD": 3, "IQD": 3, "JOD": 3, "KWD": 3, "LYD": 3, "OMR": 3, "TND": 3,
    "CLF": 4, "UYW": 4,
}
_TWO_DIGIT_CODES = (
    "AED", "AFN", "ALL", "AMD", "ANG", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT",
    "BGN", "BMD", "BND", "BOB", "BOV", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD", "CAD", "CDF",
    "CHE", "CHF", "CHW", "CNY", "COP", "COU", "CRC", "CUC", "CUP", "CVE", "CZK", "DKK", "DOP",
    "DZD", "EGP", "ERN", "ETB", "EUR", "FJD", "FKP", "GBP", "GEL", "GHS", "GIP", "GMD", "GTQ",
    "GYD", "HKD", "HNL", "HRK", "HTG", "HUF", "IDR", "ILS", "INR", "IRR", "JMD", "KES", "KGS",
    "KHR", "KPW", "KYD", "KZT", "LAK", "LBP", "LKR", "LRD", "LSL", "MAD", "MDL", "MGA", "MKD",
    "MMK", "MNT", "MOP", "MRU", "MUR", "MVR", "MWK", "MXN", "MXV", "MYR", "MZN", "NAD", "NGN",
    "NIO", "NOK", "NPR", "NZD", "PAB", "PEN", "PGK", "PHP", "PKR", "PLN", "QAR", "RON", "RSD",
    "RUB", "SAR", "SBD", "SCR", "SDG", "SEK", "SGD", "SHP", "SLE", "SLL", "SOS", "SRD", "SSP",
    "STN", "SVC", "SYP", "SZL", "THB", "TJS", "TMT", "TOP", "TRY", "TTD", "TWD", "TZS", "UAH",
    "USD", "USN", "UYU", "UZS", "VED", "VES", "WST", "XCD", "XCG", "YER", "ZAR", "ZMW", "ZWG",
    "ZWL",
)
CURRENCY_MINOR_UNITS: Mapping[str, int] = {
    **{code: 2 for code in _TWO_DIGIT_CODES},
    **_MINOR_UNITS_OTHER,
}


def invalid(path: Path, message: str) -> DomainError:
    return DomainError(message, field=path, code=ErrorCode.VALIDATION_FAILED)


def text(
    value: Any,
    path: Path,
    *,
    label: str,
    max_length: int,
    trim: bool = True,
    multiline: bool = False,
) -> str:
    """A non-empty string without control characters, at most ``max_length`` characters."""
    if not isinstance(value, str):
        raise invalid(path, f"{label} must be a string.")
    string = value.strip() if trim else value
    if not string:
        raise invalid(path, f"{label} must not be empty (null means no value).")
    if len(string) > max_length:
        raise invalid(path, f"{label} must be at most {max_length} characters long "
                      f"({len(string)} were given).")
    bad = forbidden_character(string, multiline=multiline)
    if bad is not None:
        raise invalid(path, f"{label} must not contain control characters ({bad}).")
    return string


# An unquoted ASCII local part (RFC 5322's dot-atom, as email-validator reads it): valid
# whatever the domain, and checked before it.
_ATEXT = r"a-zA-Z0-9_!#$%&'*+\-/=?^`{|}~"
_PLAIN_LOCAL_PART = re.compile(rf"[{_ATEXT}]+(?:\.[{_ATEXT}]+)*")
_LOCAL_PART_MAX = 64  # longer ones go to email-validator (refused only in its strict mode)
_EMAIL_MAX_BYTES = 254


@lru_cache(maxsize=1024)
def _domain_forms(domain: str) -> tuple[str, str] | None:
    """The domain's normalised and IDNA ASCII forms if email-validator accepts it after a
    plain local part, else None: its domain check (three quarters of its time) depends on
    the domain alone, and addresses share few domains."""
    try:
        checked = validate_email(f"a@{domain}", check_deliverability=False)
    except EmailNotValidError:
        return None
    return checked.domain, checked.ascii_domain


def email(value: Any, path: Path) -> str:
    """Trimmed, syntax-checked (no DNS look-up); its case is kept, uniqueness ignores it.

    The verdict is email-validator's: an address whose local part is plain (checked alone
    by email-validator, before the domain) and whose domain it accepted before is accepted
    when each of its forms is within the length limit; any other goes to email-validator.
    """
    address = text(value, path, label="email", max_length=EMAIL_MAX)
    local, at, domain = address.partition("@")
    forms = _domain_forms(domain) if at and _PLAIN_LOCAL_PART.fullmatch(local) else None
    if forms is not None and len(local) <= _LOCAL_PART_MAX and all(
        len(local) + 1 + len(form.encode()) <= _EMAIL_MAX_BYTES for form in (domain, *forms)
    ):
        return address
    try:
        validate_email(address, check_deliverability=False)
    except EmailNotValidError as exc:
        raise invalid(path, f"email is not a valid address: {exc}") from None
    return address


def phone(value: Any, path: Path) -> str:
    """An international number, returned in E.164 (``+1 (415) 555-0100`` -> ``+14155550100``)."""
    raw = text(value, path, label="phone", max_length=PHONE_INPUT_MAX)
    problem = "phone must be a valid international number starting with + and the country code"
    try:
        parsed = phonenumbers.parse(raw, None)
    except phonenumbers.NumberParseException:
        raise invalid(path, f"{problem}, e.g. +14155550100.") from None
    if not phonenumbers.is_valid_number(parsed):
        raise invalid(path, f"{problem}; {raw!r} is not a number in use.")
    return phonenumbers.format_number(parsed, phonenumbers.PhoneNumberFormat.E164)


def full_name(value: Any, path: Path) -> str:
    return text(value, path, label="fullName", max_length=FULL_NAME_MAX)


def external_id(value: Any, path: Path) -> str:
    """Opaque: kept exactly as given (no trimming), so it matches the caller's own id."""
    return text(value, path, label="externalId", max_length=EXTERNAL_ID_MAX, trim=False)


def audience_name(value: Any, path: Path) -> str:
    return text(value, path, label="name", max_length=AUDIENCE_NAME_MAX)


def description(value: Any, path: Path) -> str:
    return text(value, path, label="description", max_length=DESCRIPTION_MAX, multiline=True)


def metadata(value: Any, path: Path) -> dict[str, Any]:
    """A JSON object of at most 16 KiB once serialised (compact UTF-8)."""
    if not isinstance(value, dict):
        raise invalid(path, "metadata must be a JSON object.")
    check_metadata_size(value, path)
    return value


def check_metadata_size(value: Mapping[str, Any], path: Path) -> None:
    try:
        encoded = json.dumps(
            value, separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode("utf-8")
    except (TypeError, ValueError) as exc:  # NaN, Infinity, lone surrogates
        raise invalid(path, f"metadata is not valid JSON: {exc}.") from None
    if b"\\u0000" in encoded:  # PostgreSQL cannot store NUL in text or JSON
        raise invalid(path, "metadata must not contain NUL characters.")
    if len(encoded) > METADATA_MAX_BYTES:
        raise invalid(path, f"metadata must be at most {METADATA_MAX_BYTES} bytes once "
                      f"serialised ({len(encoded)} were given).")


def merge_metadata(
    current: Mapping[str, Any] | None, changes: Mapping[str, Any]
) -> dict[str, Any]:
    """Shallow merge: given keys replace, a key set to null is removed."""
    merged = dict(current or {})
    for key, value in changes.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


def currency(value: Any, path: Path) -> str:
    """An ISO 4217 code, in either case; stored upper-case."""
    if not isinstance(value, str) or value.upper() not in CURRENCY_MINOR_UNITS:
        raise invalid(path, "currency must be an ISO 4217 code such as USD or EUR.")
    return value.upper()


def amount(value: Any, path: Path, currency_code: str | None) -> Decimal:
    """An exact, non-negative amount with no more decimals than the currency has.

    A float is read through its shortest decimal form (``19.99`` is exactly 19.99, not the
    binary approximation), so what the client wrote is what is stored.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | Decimal | str):
        raise invalid(path, "amount must be a number.")
    if isinstance(value, float) and not math.isfinite(value):
        raise invalid(path, "amount must be a finite number.")
    try:
        number = Decimal(str(value))
    except InvalidOperation:
        raise invalid(path, "amount must be a number.") from None
    if not number.is_finite():
        raise invalid(path, "amount must be a finite number.")
    if number < 0:
        raise invalid(path, "amount must not be negative; delete the order to undo it.")
    if number >= AMOUNT_MAX:
        raise invalid(path, f"amount must be less than {AMOUNT_MAX:,}.")
    number = number.normalize() if number else Decimal(0)
    decimals = max(0, -int(number.as_tuple().exponent))
    if currency_code is not None:
        allowed = CURRENCY_MINOR_UNITS[currency_code]
        if decimals > allowed:
            raise invalid(path, f"amount has {decimals} decimal places; {currency_code} "
                          f"allows {allowed}.")
    return number
