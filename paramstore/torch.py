"""PyTorch helpers: a module's parameters as stored tensors.

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

__all__ = ["create_module", "load_module", "push_module_grads"]


def create_module(
    client: Client, module: torch.nn.Module, optimizer: Mapping[str, object] | None = None, prefix: str = ""
) -> dict[str, int]:
    """Create one tensor per parameter from the module's current values (exist_ok)."""
    return {
        prefix + n: client.create(prefix + n, p.detach().cpu().contiguous().numpy(), optimizer=optimizer, exist_ok=True)
        for n, p in module.named_parameters()
    }


def load_module(client: Client, module: torch.nn.Module, prefix: str = "") -> dict[str, int]:
    """Copy the stored values into the module's parameters; returns
    {tensor name: version}, the base versions for `push_module_grads`."""
    versions = {}
    with torch.no_grad():
        for n, p in module.named_parameters():
            arr, version = client.pull(prefix + n)
            p.copy_(torch.from_numpy(np.array(arr)).reshape(p.shape))  # copy: pulled arrays are read-only
            versions[prefix + n] = version
    return versions


def push_module_grads(
    client: Client, module: torch.nn.Module, prefix: str = "", base_versions: Mapping[str, int] | None = None
) -> dict[str, int]:
    """Push every parameter's `.grad` in one request (parameters without one are skipped)."""
    grads = {
        prefix + n: p.grad.detach().cpu().contiguous().numpy()
        for n, p in module.named_parameters()
        if p.grad is not None
    }
    return client.push_grads(grads, base_versions)
