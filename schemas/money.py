"""Money on the wire: a decimal string in the currency's ISO 4217 exponent, never a float.

`1.5` for JPY (exponent 0) or `0.001` for EUR (exponent 2) is refused rather than rounded:
rounding someone else's money is a decision the sender must make, not us.
"""

from __future__ import annotations

from decimal import Decimal, InvalidOperation

# ISO 4217 minor-unit exponents of the currencies we accept. A currency missing here is refused at
# intake ("unknown currency"), never guessed.
CURRENCY_EXPONENTS: dict[str, int] = {
    "AED": 2, "AUD": 2, "BGN": 2, "BHD": 3, "BRL": 2, "CAD": 2, "CHF": 2, "CLP": 0, "CNY": 2,
    "CZK": 2, "DKK": 2, "EUR": 2, "GBP": 2, "HKD": 2, "HUF": 2, "IDR": 2, "ILS": 2, "INR": 2,
    "IQD": 3, "ISK": 0, "JOD": 3, "JPY": 0, "KRW": 0, "KWD": 3, "LYD": 3, "MXN": 2, "NOK": 2,
    "NZD": 2, "OMR": 3, "PLN": 2, "RON": 2, "SAR": 2, "SEK": 2, "SGD": 2, "THB": 2, "TND": 3,
    "TRY": 2, "UGX": 0, "USD": 2, "VND": 0, "XAF": 0, "XOF": 0, "ZAR": 2,
}  # fmt: skip

# Far beyond any real transfer; bounds the numeric column and refuses absurd input early.
MAX_AMOUNT = Decimal("1000000000000")


class MoneyError(ValueError):
    """An amount or currency that cannot be money. `code` names the kind, for dead letters."""

    code = "invalid_amount"


class UnknownCurrency(MoneyError):
    code = "unknown_currency"


def exponent_of(currency: str) -> int:
    try:
        return CURRENCY_EXPONENTS[currency]
    except KeyError:
        raise UnknownCurrency(
            f"unknown currency {currency!r} (not an ISO 4217 code we accept)"
        ) from None


def parse_amount(text: str, currency: str) -> Decimal:
    """Parse a positive amount written with at most the currency's exponent of decimals.

    Returns the amount quantized to exactly that exponent, so `10.5` EUR becomes `10.50`.
    """
    exponent = exponent_of(currency)
    try:
        amount = Decimal(text)
    except (InvalidOperation, TypeError):
        raise MoneyError(f"amount {text!r} is not a decimal number") from None
    if not amount.is_finite():
        raise MoneyError(f"amount {text!r} is not a finite number")
    if amount <= 0:
        raise MoneyError(f"amount {text!r} must be greater than zero")
    if amount > MAX_AMOUNT:
        raise MoneyError(f"amount {text!r} exceeds the maximum of {MAX_AMOUNT}")
    quantum = Decimal(1).scaleb(-exponent)
    if amount != amount.quantize(quantum):
        raise MoneyError(
            f"amount {text!r} has more decimals than {currency} allows ({exponent})"
        )
    return amount.quantize(quantum)


def format_amount(amount: Decimal, currency: str) -> str:
    return str(amount.quantize(Decimal(1).scaleb(-exponent_of(currency))))
