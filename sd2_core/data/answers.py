"""The final number of a math answer, to check a distilled GSM8K answer against its reference.

GSM8K references end with "#### <number>"; a model's answer usually ends with the number, "The answer is N"
or "= $1,234.50." The last number in the text is the answer in all of these; after "####" the number there
wins. Numbers may carry thousands commas, a sign, a decimal part, a currency sign or a trailing period.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

_NUMBER = re.compile(r"(?<![\w.])-?\$?\s?-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_MARKED = re.compile(r"####\s*(.+)")


def final_number(text: str) -> Decimal | None:
    """The answer's final number as an exact decimal (so 72, 72.0 and 72.00 are equal), or None if it has none."""
    marked = _MARKED.search(text)
    scope = marked.group(1) if marked else text
    found = _NUMBER.findall(scope)
    if not found:
        return None
    raw = found[-1].replace("$", "").replace(",", "").replace(" ", "")
    negative = raw.count("-") % 2 == 1
    try:
        value = Decimal(raw.replace("-", ""))
    except InvalidOperation:
        return None
    return -value if negative else value


def same_final_number(answer: str, reference: str) -> bool:
    """True when both texts end in the same number; False when they differ or the answer has none."""
    expected = final_number(reference)
    got = final_number(answer)
    return expected is not None and got is not None and got == expected
