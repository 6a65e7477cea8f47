"""paramstore's Python client: pull tensors from and push gradients to a cluster.

    from paramstore import Client

    with Client(["http://127.0.0.1:8700", "http://127.0.0.1:8701"]) as ps:
        ps.create("w", np.zeros((784, 10), np.float32), optimizer={"type": "sgd", "lr": 0.1},
                  exist_ok=True)
        w, version = ps.pull("w")
        ps.push_grad("w", grad, base_version=version)

PyTorch helpers are in `paramstore.torch` (`pip install 'paramstore[torch]'`);
importing `paramstore` alone never imports torch. This package needs only
httpx, numpy and safetensors: the server (`api`, `store`) is a separate install
extra, `paramstore[server]`, and nothing here imports it.
"""

from ._client import Client
from ._errors import (
    AuthError,
    ConflictError,
    InvalidError,
    NotFoundError,
    ParamStoreError,
    PreconditionFailedError,
    UnavailableError,
)
from ._serving import ServingTable

__version__ = "0.1.0"

ParamStoreClient = Client  # the name the SDK had as api.client.ParamStoreClient

__all__ = [
    "AuthError",
    "Client",
    "ConflictError",
    "InvalidError",
    "NotFoundError",
    "ParamStoreClient",
    "ParamStoreError",
    "PreconditionFailedError",
    "ServingTable",
    "UnavailableError",
]
