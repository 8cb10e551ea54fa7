"""Shared by the bench tests: a bench's figures are checked as reported, never by value.

Times, rates and their ratios depend on the machine's load; a test asserts only that the
bench measured them (a finite number in its JSON line) and on behaviour (same losses,
the sections and keys it must print, bytes that do not depend on N).
"""

from __future__ import annotations

import math


def measured(x: object) -> bool:
    """A figure the bench reported: a finite number (not None, NaN, a string)."""
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
