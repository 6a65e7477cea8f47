"""Deprecated: the client SDK is the `paramstore` package (`from paramstore import Client`).

Kept for one release so trainer scripts written against `api.client` keep
working; it re-exports `paramstore` and warns once on import. Delete it in 0.2.
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

from paramstore import (
    AuthError,
    ConflictError,
    InvalidError,
    NotFoundError,
    ParamStoreClient,
    ParamStoreError,
    PreconditionFailedError,
    UnavailableError,
)

__all__ = [
    "AuthError",
    "ConflictError",
    "InvalidError",
    "NotFoundError",
    "ParamStoreClient",
    "ParamStoreError",
    "PreconditionFailedError",
    "UnavailableError",
]

warnings.warn(
    "api.client is deprecated: use `from paramstore import Client` (and `paramstore.torch` for the PyTorch helpers)",
    DeprecationWarning,
    stacklevel=2,
)


def __getattr__(name: str) -> ModuleType:
    # torch_utils was a class of torch helpers; paramstore.torch has the same
    # functions. Resolved on first use so importing this module never imports torch.
    if name == "torch_utils":
        return importlib.import_module("paramstore.torch")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
