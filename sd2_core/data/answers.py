"""The final number of a math answer, to check a distilled GSM8K answer against its reference.

GSM8K references end with "#### <number>"; a model's answer usually ends with the number, "The answer is N"
or "= $1,234.50." A marked answer wins: the first number after the first "####", else the first number after
the last "answer is" (so "The answer is 72. Hope these 2 steps help." is 72); otherwise the last number in the
text. Numbers may carry thousands commas, a sign (ASCII or Unicode minus, before or after a "$"), a decimal
part, a currency sign or a trailing period. A minus followed by a space is subtraction ("9 - 5" ends in 5),
and a number glued to a word or to a preceding digit run ("x2", "3-4") is not signed.
"""

from __future__ import annotations

import re
from decimal import Decimal

_MINUS = "-\u2212"
_NUMBER = re.compile(
    rf"(?<![\w.])(?P<sign>[{_MINUS}])?(?:\$\s?)?(?P<sign2>[{_MINUS}])?"
    r"(?P<digits>\d{1,3}(?:,\d{3})+|\d+)(?P<fraction>\.\d+)?"
)
_HASHES = re.compile(r"####")
_ANSWER_IS = re.compile(r"\banswer is\b", re.IGNORECASE)


def _number_after(marker: re.Match[str] | None, text: str) -> re.Match[str] | None:
    return _NUMBER.search(text, marker.end()) if marker else None


def final_number(text: str) -> Decimal | None:
    """The answer's final number as an exact decimal (so 72, 72.0 and 72.00 are equal), or None if it has none."""
    said = list(_ANSWER_IS.finditer(text))
    every = list(_NUMBER.finditer(text))
    found = (
        _number_after(_HASHES.search(text), text)
        or _number_after(said[-1] if said else None, text)
        or (every[-1] if every else None)
    )
    if found is None:
        return None
    value = Decimal(found["digits"].replace(",", "") + (found["fraction"] or ""))
    return -value if found["sign"] or found["sign2"] else value


def same_final_number(answer: str, reference: str) -> bool:
    """True when both texts end in the same number; False when they differ or the answer has none."""
    expected = final_number(reference)
    got = final_number(answer)
    return expected is not None and got is not None and got == expected
