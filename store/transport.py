"""The pysyncobj transport class named by `raft.transport` ("module:Class").

Unset (the default) is pysyncobj's TCPTransport counting bytes per peer
(CountingTransport). The fault tests set it to a
subclass that drops messages on links they cut, where network namespaces
are not allowed (tests/faults/droptransport.py).
"""

from __future__ import annotations

import importlib

from .errors import ConfigError
from .pysyncobj_adapter import CountingTransport, Transport


def transport_class(spec: str | None) -> type[Transport]:
    if not spec:
        return CountingTransport
    module, _, name = spec.partition(":")
    try:
        cls = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"raft.transport: cannot load {spec!r}: {e}") from None
    if not (isinstance(cls, type) and issubclass(cls, Transport)):
        raise ConfigError(f"raft.transport: {spec!r} is not a pysyncobj Transport subclass")
    return cls
