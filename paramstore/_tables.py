"""The embedding-table methods of `Client` (docs/api.md, "Embedding tables")."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from ._codecs import NARROW_FLOATS, narrow
from ._compress import ST_CODE, decode_rows, wire_dtype_of
from ._errors import ParamStoreError
from ._transport import Transport
from ._wire import (
    SAFETENSORS,
    ST_NAMES,
    le_contiguous,
    safetensors_array,
    safetensors_body,
    safetensors_file,
    safetensors_metadata,
)


def min_version_param(v: Any) -> str:
    """The `min_version` query value: shard:version pairs, or a cursor (all parts in order)."""
    if isinstance(v, str):
        return v
    if isinstance(v, Mapping):
        parts = v.get("shards", v)
        return ",".join(
            f"{int(s)}:{int(p['version'] if isinstance(p, Mapping) else p)}" for s, p in sorted(parts.items())
        )
    return ",".join(str(int(x)) for x in v)


class TableMethods:
    """Mixed into `Client`: tables of rows keyed by 64-bit IDs."""

    _transport: Transport

    def create_table(
        self,
        name: str,
        dim: int,
        dtype: str = "float32",
        id_dtype: str = "int64",
        initializer: Mapping[str, Any] | None = None,
        optimizer: Mapping[str, Any] | None = None,
        admission: Mapping[str, Any] | None = None,
        eviction: Mapping[str, Any] | None = None,
        exist_ok: bool = False,
        **config: Any,
    ) -> dict[str, Any]:
        """Create a table of `dim`-wide rows keyed by 64-bit IDs; returns its
        description. `config` takes the other table fields (max_staleness, ...)."""
        body: dict[str, Any] = {"dim": dim, "dtype": dtype, "id_dtype": id_dtype, **config}
        for key, value in (
            ("initializer", initializer),
            ("optimizer", optimizer),
            ("admission", admission),
            ("eviction", eviction),
        ):
            if value is not None:
                body[key] = dict(value)
        try:
            self._transport.request(
                "PUT",
                f"/v1/tables/{name}",
                headers={"Content-Type": "application/json"},
                content=json.dumps(body).encode(),
                write=True,
            )
        except ParamStoreError as e:
            if not (exist_ok and e.code == "already_exists"):
                raise
        return self.table_info(name)

    def lookup(
        self,
        name: str,
        ids: Any,
        consistency: str = "local",
        wire_dtype: str | None = None,
        min_version: Any = None,
        timeout: float | None = None,
    ) -> np.ndarray:
        """Rows for `ids` (int64 or uint64), in order: float32 (float16 tables:
        float16). IDs never pushed read their initial value; nothing is created.
        `wire_dtype` ("float16", "bfloat16", "int8"): sent narrowed, returned as float32.
        `min_version`: wait (up to `timeout` s) until the replica has applied
        each shard part's version: a `push_rows` answer, {shard: version}, or
        one version per part in shard order."""
        return self.lookup_versions(name, ids, consistency, wire_dtype, min_version, timeout)[0]

    def lookup_versions(
        self,
        name: str,
        ids: Any,
        consistency: str = "local",
        wire_dtype: str | None = None,
        min_version: Any = None,
        timeout: float | None = None,
    ) -> tuple[np.ndarray, dict[int, int]]:
        """`lookup`, and the version each shard's part of the table was read at
        ({shard: version}, the shards the IDs live on)."""
        body = safetensors_body({"ids": np.asarray(ids)})
        headers = {"Content-Type": SAFETENSORS, "Accept": SAFETENSORS}
        if wire_dtype_of(wire_dtype) is not None:
            headers["X-Wire-Dtype"] = str(wire_dtype)
        params: dict[str, Any] = {"consistency": consistency}
        if min_version is not None:
            params["min_version"] = min_version_param(min_version)
        if timeout is not None:
            params["timeout"] = timeout
        r = self._transport.request("POST", f"/v1/tables/{name}:lookup", params=params, headers=headers, content=body)
        versions = json.loads(safetensors_metadata(r.content).get("versions", "{}"))
        rows = decode_rows(r.content) if wire_dtype is not None else safetensors_array(r.content, "rows")
        return rows, {int(s): int(v) for s, v in versions.items()}

    def push_rows(
        self,
        name: str,
        ids: Any,
        grads: Any,
        base_version: int | None = None,
        request_id: str | None = None,
        wire_dtype: str | None = None,
    ) -> dict[str, Any]:
        """Row gradients (n x dim) for `ids`; duplicates are summed. The store
        applies one atomic command per shard the IDs live on; returns each
        shard's outcome (its new version) under "shards". Retrying a failed
        call with the same `request_id` applies it at most once. `wire_dtype`
        ("float16" or "bfloat16"): the gradients are sent narrowed."""
        if wire_dtype is not None and wire_dtype not in NARROW_FLOATS:
            raise ValueError(f"row gradients are sent as float16 or bfloat16, not {wire_dtype!r}")
        g = np.asarray(grads, dtype=np.float32)
        grads_entry = ("F32", g) if wire_dtype is None else (ST_CODE[wire_dtype], narrow(g, wire_dtype))
        ids_arr = le_contiguous(np.asarray(ids))
        body = safetensors_file({"ids": (ST_NAMES[ids_arr.dtype.str], ids_arr), "grads": grads_entry})
        headers = {"Content-Type": SAFETENSORS}
        if base_version is not None:
            headers["X-Base-Version"] = str(int(base_version))
        result: dict[str, Any] = self._transport.request(
            "POST", f"/v1/tables/{name}:push", headers=headers, content=body, write=True, request_id=request_id
        ).json()
        return result

    def table_info(self, name: str) -> dict[str, Any]:
        """Rows, bytes in memory and on disk, version (summed over shards), config."""
        info: dict[str, Any] = self._transport.request("GET", f"/v1/tables/{name}").json()
        return info

    def list_tables(self) -> list[dict[str, Any]]:
        tables: list[dict[str, Any]] = self._transport.request("GET", "/v1/tables").json()
        return tables

    def delete_table(self, name: str, if_version: int | None = None) -> None:
        headers = {"If-Match": f'"{int(if_version)}"'} if if_version is not None else {}
        self._transport.request("DELETE", f"/v1/tables/{name}", headers=headers, write=True)
