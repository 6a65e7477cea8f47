"""JSON from the network (bodies, headers, metadata): every way it can be
malformed is an InvalidRequest (400), never a 500."""

from __future__ import annotations

import json
from typing import Any

from store.errors import InvalidRequest


def loads(data: str | bytes | bytearray, what: str) -> Any:
    """`json.loads`, where nesting deeper than the interpreter's recursion
    limit (RecursionError, not a ValueError) is bad input like any other."""
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise InvalidRequest(f"{what}: not valid JSON ({e})") from None
    except RecursionError:
        raise InvalidRequest(f"{what}: JSON nested too deeply") from None
