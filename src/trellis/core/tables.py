"""The one number format and markdown table of every report, card and benchmark Trellis writes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def number(value: Any, digits: int = 4) -> str:
    """A metric for a table: `digits` significant digits, tiny values in scientific notation, '-' for none."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        return "-"
    return f"{value:.{digits}g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.2e}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], numeric: Sequence[int] = ()) -> str:
    """A markdown table; the columns at the indices in `numeric` are right-aligned."""
    rule = ["---:" if index in numeric else "---" for index in range(len(header))]
    return "\n".join("| " + " | ".join(map(str, line)) + " |" for line in (header, rule, *rows))
