"""Parse checkable answers out of free-form model text."""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_LETTER_STATED = re.compile(r"answer(?: is)?[:\s]*\(?([A-D])\b", re.IGNORECASE)
_LETTER = re.compile(r"(?<![A-Za-z])\(?([A-D])(?:\)|\.|:|\b)(?![a-z])")


def parse_number(text: str) -> str | None:
    """The last number in the text, normalised ('1,200' -> '1200', '4.0' -> '4')."""
    found = _NUMBER.findall(text)
    if not found:
        return None
    value = found[-1].replace(",", "")
    if "." in value:
        f = float(value)
        value = str(int(f)) if f.is_integer() else str(f)
    return value


def parse_choice(text: str) -> str | None:
    """'The answer is C' -> 'C'; else the last standalone A-D (upper case) in the text."""
    stated = _LETTER_STATED.findall(text)
    if stated:
        return stated[-1].upper()
    letters = _LETTER.findall(text)
    return letters[-1] if letters else None


PARSERS = {"number": parse_number, "choice": parse_choice}
