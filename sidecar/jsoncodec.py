"""JSON to and from bytes: orjson when it is installed (the `speed` extra), else the json
module, writing the same compact UTF-8.

orjson refuses integers past 64 bits, which the json module takes; callers that may meet
one (the input as given, read back from a log) fall back to `json` on its TypeError or
ValueError.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

__all__ = ["dumpb", "loads"]

try:
    import orjson

    dumpb: Callable[[Any], bytes] = orjson.dumps
    loads: Callable[[bytes], Any] = orjson.loads
except ImportError:  # orjson is optional

    def dumpb(data: Any) -> bytes:
        return json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode()

    loads = json.loads
