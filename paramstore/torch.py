"""PyTorch helpers: a module's parameters as stored tensors, and
`StoreEmbeddingBag`, an embedding bag whose rows live in a table.

Tensor names are `prefix + parameter name` (e.g. "net.fc1.weight").
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

try:
    import torch
except ImportError as e:  # the base install has no torch: say which extra brings it
    raise ImportError("paramstore.torch needs PyTorch: pip install 'paramstore[torch]'") from e

from ._client import Client
from ._embedding_bag import PrefetchingLoader, StoreEmbeddingBag
from ._pushes import FailedPush, PushFailed

__all__ = [
    "FailedPush",
    "PrefetchingLoader",
    "PushFailed",
    "StoreEmbeddingBag",
    "create_module",
    "load_module",
    "push_module_grads",
    "sync_module_step",
]


def create_module(
    client: Client,
    module: torch.nn.Module,
    optimizer: Mapping[str, object] | None = None,
    prefix: str = "",
    sync: Mapping[str, object] | None = None,
) -> dict[str, int]:
    """Create one tensor per parameter from the module's current values
    (exist_ok); `sync`: synchronous rounds (`Client.create`)."""
    return {
        prefix + n: client.create(
            prefix + n, p.detach().cpu().contiguous().numpy(), optimizer=optimizer, exist_ok=True, sync=sync
        )
        for n, p in module.named_parameters()
    }


def load_module(
    client: Client, module: torch.nn.Module, prefix: str = "", wire_dtype: str | None = None
) -> dict[str, int]:
    """Copy the stored values into the module's parameters; returns
    {tensor name: version}, the base versions for `push_module_grads`.
    `wire_dtype`: pull them narrowed (Client.pull)."""
    versions = {}
    with torch.no_grad():
        for n, p in module.named_parameters():
            arr, version = client.pull(prefix + n, wire_dtype=wire_dtype)
            p.copy_(torch.from_numpy(np.array(arr)).reshape(p.shape))  # copy: pulled arrays are read-only
            versions[prefix + n] = version
    return versions


def push_module_grads(
    client: Client,
    module: torch.nn.Module,
    prefix: str = "",
    base_versions: Mapping[str, int] | None = None,
    wire_dtype: str | None = None,
    compress: str | None = None,
) -> dict[str, int]:
    """Push every parameter's `.grad` in one request (parameters without one
    are skipped), narrowed with `wire_dtype`; with `compress` ("topk:F", see
    Client.push_grad) one request per parameter, each keeping its residual."""
    grads = {
        prefix + n: p.grad.detach().cpu().contiguous().numpy()
        for n, p in module.named_parameters()
        if p.grad is not None
    }
    if compress is None:
        return client.push_grads(grads, base_versions, wire_dtype=wire_dtype)
    bases = base_versions or {}
    return {
        name: client.push_grad(name, g, base_version=bases.get(name), wire_dtype=wire_dtype, compress=compress)
        for name, g in grads.items()
    }


def sync_module_step(
    client: Client, module: torch.nn.Module, base_versions: Mapping[str, int], prefix: str = "", timeout: float = 300.0
) -> dict[str, int]:
    """One synchronous step (`Client.sync_step`): push every parameter's
    `.grad` into the rounds of `base_versions` (from `load_module` or the
    previous step), wait for them to close, and copy the new values into the
    module; returns the new versions."""
    params = dict(module.named_parameters())
    grads = {prefix + n: p.grad.detach().cpu().contiguous().numpy() for n, p in params.items() if p.grad is not None}
    new = client.sync_step(grads, {name: base_versions[name] for name in grads}, timeout)
    with torch.no_grad():
        for name, (arr, _) in new.items():
            p = params[name[len(prefix) :]]
            p.copy_(torch.from_numpy(np.array(arr)).reshape(p.shape))
    return {name: version for name, (_, version) in new.items()}
