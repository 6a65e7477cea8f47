"""The pieces of the served OpenAPI document that FastAPI cannot infer.

Routes read their bodies and headers themselves (no pydantic models: bodies
are raw tensors), so each route declares here what it accepts (the `*_extra`
functions: bodies per content type, header parameters) and what it answers
(`answers`, `written`, `tensor_value`, ...). `install` then makes
every error response use the one JSON error body of api/errors.py instead of
FastAPI's HTTPValidationError: a failed query validation is answered 400 by
errors.py, never 422 with FastAPI's schema.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from paramstore._codecs import NARROW_FLOATS, WIRE_DTYPES
from store.dtypes import DTYPES, MAX_RANK
from store.optimizers import SPECS

from .auth import OPEN_PATHS
from .headers import NAME_RE, REQUEST_ID_RE

ERROR_REF = {"$ref": "#/components/schemas/Error"}
JSON = "application/json"
OCTET = "application/octet-stream"
NPY = "application/x-npy"
SAFETENSORS = "application/x-safetensors"
BINARY = {"type": "string", "format": "binary"}

# Query patterns: what headers.py and the routes parse, and nothing else.
NAME_PATTERN = NAME_RE.pattern
_NAME = NAME_PATTERN.strip("^$")
NAMES_PATTERN = f"^,*{_NAME}(,+{_NAME})*,*$"  # empty items are skipped; at most 10000 (batch.py)
ROWS_PATTERN = r"^ *[0-9]{1,18} *(, *[0-9]{1,18} *)*$"
SHARDS_PATTERN = r"^ *[0-9]{1,9} *(, *[0-9]{1,9} *)*$"

MAX_VERSION = 2**63 - 1
TENSOR_LIST: dict[str, Any] = {
    "type": "array",
    "items": {
        "type": "object",
        "required": ["name", "dtype", "shape", "version", "shard"],
        "properties": {
            "name": {"type": "string"},
            "dtype": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "version": {"type": "integer"},
            "shard": {"type": "integer"},
            "optimizer": {"type": "object"},
            "nbytes": {"type": "integer"},
            "sync": {"type": "object", "description": "synchronous rounds (X-Sync), when set"},
        },
    },
}
OBJECT: dict[str, Any] = {"type": "object"}

ERROR_SCHEMA: dict[str, Any] = {
    "title": "Error",
    "type": "object",
    "description": "Every error answer (api/errors.py). Some carry more fields: "
    "`current_version` (409, 412), `round` (409 from a tensor with synchronous rounds: "
    "the open round's version, received and needed), `limit` (413), `supported` (406: the wire "
    "dtypes served), `versions` (a batch push that committed on some shards), a checkpoint restore's report.",
    "required": ["error", "detail"],
    "properties": {
        "error": {"type": "string", "description": "stable machine-readable code"},
        "detail": {"type": "string"},
        "current_version": {"type": ["integer", "null"]},
    },
    "additionalProperties": True,
}

WHY: dict[int, str] = {
    304: "Not modified (If-None-Match), or no newer version within the wait (wait_version_gt)",
    307: "The tensor's shard is not hosted on this replica: the Location is one that hosts it",
    400: "Malformed header, query or body framing; bad tensor name",
    401: "No or unknown bearer token",
    403: "A read token tried to write",
    404: "Unknown tensor",
    406: "Accept names nothing this route serves; JSON for a large tensor",
    408: "A wait the request asked for (min_version, X-Min-Versions, a barrier within `timeout`) "
    "ran out: the request may succeed later or on another replica",
    409: "Conflict with the stored state (e.g. a push staler than max_staleness; a member id in use)",
    410: "No longer kept: a delta since a version older than the table's change log; carries oldest_version",
    412: "If-Match / If-None-Match did not hold; carries current_version",
    413: "Body over limits.max_body_bytes",
    415: "Content-Type not accepted by this route",
    422: "Well-formed but not applicable: dtype, shape or size mismatch, non-finite values, "
    "bad optimizer fields, rows out of range",
    503: "No leader or not caught up within the server's deadline; a write's outcome may be unknown "
    "(retry with the same X-Request-Id)",
}

_HEADER_DOCS = {
    401: {"WWW-Authenticate": 'Bearer realm="paramstore"'},
    503: {"Retry-After": "seconds"},
}


def _header(description: str, schema: dict[str, Any] | None = None, required: bool = True) -> dict[str, Any]:
    return {"description": description, "required": required, "schema": schema or {"type": "string"}}


def answers(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: the JSON error body for each listed error status."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"description": WHY[status]}
        if status == 307:
            entry["headers"] = {"Location": _header("a replica that hosts the shard")}
        elif status != 304:
            entry["content"] = {JSON: {"schema": ERROR_REF}}
        if status in _HEADER_DOCS:
            entry["headers"] = {k: _header(v) for k, v in _HEADER_DOCS[status].items()}
        out[status] = entry
    return out


TENSOR_HEADERS = {
    "X-Dtype": _header("element type", {"type": "string", "enum": sorted(DTYPES)}),
    "X-Shape": _header("dimensions, comma-separated (empty for a scalar)"),
    "X-Version": _header("the tensor's version", {"type": "string", "pattern": "^[0-9]+$"}),
    "ETag": _header("the version as an entity tag"),
    "X-Shard": _header("the tensor's shard", {"type": "string", "pattern": "^[0-9]+$"}),
}
WIRE_DTYPE_ANSWER = _header(
    "the wire dtype the body is in (present only when X-Wire-Dtype was asked)",
    {"type": "string", "enum": list(WIRE_DTYPES)},
    required=False,
)
WRITTEN_HEADERS = {"ETag": TENSOR_HEADERS["ETag"], "X-Version": TENSOR_HEADERS["X-Version"]}

WRITTEN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["name", "version", "shard"],
    "properties": {
        "name": {"type": "string"},
        "version": {"type": "integer", "minimum": 0},
        "shard": {"type": "integer", "minimum": 0},
        "deleted": {"type": "boolean"},
        "duplicate": {"type": "boolean"},
        "round": {
            "type": "object",
            "description": "a push to a tensor with synchronous rounds: the round it joined "
            "(`closed`: this push completed it, the optimizer applied and `version` is the new one)",
            "properties": {
                "version": {"type": "integer"},
                "received": {"type": "integer"},
                "needed": {"type": "integer"},
                "closed": {"type": "boolean"},
                "by": {"type": "string", "enum": ["workers", "timeout"]},
            },
        },
    },
}


def written(status: int = 200, description: str = "Applied; the new version") -> dict[int | str, Any]:
    return {
        status: {"description": description, "headers": WRITTEN_HEADERS, "content": {JSON: {"schema": WRITTEN_SCHEMA}}}
    }


# Any JSON: what numpy can read as `dtype` is known only when reading it (422 otherwise).
_NESTED_NUMBERS: dict[str, Any] = {"description": "a number, or (nested) lists of numbers"}
JSON_TENSOR: dict[str, Any] = {
    "type": "object",
    "required": ["data"],
    "description": "a tensor as JSON (up to limits.json_max_elements elements)",
    "properties": {
        "dtype": {"type": "string", "enum": sorted(DTYPES), "default": "float32"},
        "shape": {"type": "array", "maxItems": MAX_RANK, "items": {"type": "integer", "minimum": 0}},
        "data": _NESTED_NUMBERS,
    },
}


def tensor_value(description: str) -> dict[int | str, Any]:
    """A 200 that serves a tensor in the negotiated format."""
    json_doc = {
        "type": "object",
        "required": ["name", "dtype", "shape", "version", "data"],
        "properties": {
            "name": {"type": "string"},
            "dtype": {"type": "string"},
            "shape": {"type": "array", "items": {"type": "integer"}},
            "version": {"type": "integer"},
            "data": _NESTED_NUMBERS,
        },
    }
    return {
        200: {
            "description": description + "; with X-Wire-Dtype, narrowed (int8: a safetensors file)",
            "headers": {**TENSOR_HEADERS, "X-Wire-Dtype": WIRE_DTYPE_ANSWER},
            "content": {
                OCTET: {"schema": BINARY},
                NPY: {"schema": BINARY},
                JSON: {"schema": json_doc},
                SAFETENSORS: {"schema": BINARY},
            },
        },
        304: {"description": WHY[304], "headers": TENSOR_HEADERS},
    }


def safetensors_file(description: str) -> dict[int | str, Any]:
    return {200: {"description": description, "content": {SAFETENSORS: {"schema": BINARY}}}}


def json_ok(schema: dict[str, Any], description: str = "OK") -> dict[int | str, Any]:
    return {200: {"description": description, "content": {JSON: {"schema": schema}}}}


SYNC_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["workers"],
    "additionalProperties": False,
    "properties": {
        "workers": {"type": "integer", "minimum": 1, "maximum": 1_000_000},
        "backup_workers": {"type": "integer", "minimum": 0, "default": 0, "description": "< workers"},
        "round_timeout": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 86400, "default": None},
        "reduce": {"type": "string", "enum": ["mean", "sum"], "default": "mean"},
    },
}


def _optimizer_schema() -> dict[str, Any]:
    number = {"type": "number", "minimum": 0}
    variants = []
    for kind, defaults in SPECS.items():
        props: dict[str, Any] = {"type": {"const": kind}}
        for key, default in defaults.items():
            if isinstance(default, bool):
                props[key] = {"type": "boolean"}
            elif isinstance(default, tuple):
                props[key] = {
                    "type": "array",
                    "minItems": 2,
                    "maxItems": 2,
                    "items": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
                }
            else:
                props[key] = number
        variants.append({"type": "object", "required": ["type"], "properties": props, "additionalProperties": False})
    return {"oneOf": variants}


def _param(name: str, schema: dict[str, Any], description: str, required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "header", "required": required, "description": description, "schema": schema}


ONE_TAG = r'(W/)?("[0-9]{1,18}"|[0-9]{1,18})'  # quoted, or not: never half quoted
VERSION_TAG = "^" + ONE_TAG + "$"
REQUEST_ID = _param(
    "X-Request-Id",
    {"type": "string", "pattern": REQUEST_ID_RE.pattern},
    "idempotency key: a write whose id was already applied returns that first outcome, "
    "status included (so every write route may answer 404, 409, 412 or 422)",
)
IF_MATCH = _param("If-Match", {"type": "string", "pattern": VERSION_TAG}, "apply only if the tensor is at this version")
BASE_VERSION = _param(
    "X-Base-Version",
    {"type": "integer", "minimum": 0, "maximum": 10**18},
    "the version the gradient was computed on (max_staleness, staleness policy)",
)
DTYPE = _param("X-Dtype", {"type": "string", "enum": sorted(DTYPES)}, f"element type of an {OCTET} body")
WIRE_DTYPE = _param(
    "X-Wire-Dtype",
    {"type": "string", "enum": list(WIRE_DTYPES)},
    "serve float values narrowed (docs/api.md, Wire dtypes): float16 or bfloat16 raw bytes, int8 with one "
    "float32 scale per row in a safetensors file; 406 for another value, 422 for a tensor that is not float",
)
SHAPE = _param(
    "X-Shape",
    {"type": "string", "pattern": r"^([0-9]{1,9}(,[0-9]{1,9}){0," + str(MAX_RANK - 1) + "})?$"},
    f"dimensions of an {OCTET} body, comma-separated (empty for a scalar)",
)


def _body(types: dict[str, dict[str, Any]], description: str) -> dict[str, Any]:
    return {"required": True, "description": description, "content": {t: {"schema": s} for t, s in types.items()}}


def put_tensor_extra() -> dict[str, Any]:
    return {
        "requestBody": _body(
            {OCTET: BINARY, NPY: BINARY, JSON: JSON_TENSOR},
            f"the value: raw little-endian C-order bytes ({OCTET} with X-Dtype and X-Shape), a .npy file, or JSON",
        ),
        "parameters": [
            {**DTYPE, "required": True, "description": DTYPE["description"] + " (required with it)"},
            {**SHAPE, "required": True, "description": SHAPE["description"] + " (required with it)"},
            _param("If-None-Match", {"type": "string", "enum": ["*"]}, "create only"),
            _param(
                "If-Match",
                {"type": "string", "pattern": "^(\\*|" + ONE_TAG + ")$"},
                "compare-and-set: replace only at this version ('*': only if it exists)",
            ),
            {
                "name": "X-Optimizer",
                "in": "header",
                "required": False,
                "description": "the optimizer applied to gradient pushes (default assign)",
                "content": {JSON: {"schema": _optimizer_schema()}},
            },
            _param(
                "X-Allow-Nonfinite",
                {"type": "string", "enum": ["true", "false", "1", "0", "yes", "no"]},
                "accept NaN and Inf values",
            ),
            _param(
                "X-Max-Staleness",
                {"type": "integer", "minimum": 0, "maximum": 10**18},
                "refuse (or scale) gradients computed this many versions ago",
            ),
            _param(
                "X-Staleness-Policy", {"type": "string", "enum": ["reject", "scale"]}, "what a too-stale gradient gets"
            ),
            _param(
                "X-Partitions",
                {"type": "integer", "minimum": 1, "maximum": 10**6},
                "create only: cut the tensor into this many row ranges, each in its own shard "
                "(1 <= K <= min(rows, limits.max_partitions); 1: whole)",
            ),
            {
                "name": "X-Sync",
                "in": "header",
                "required": False,
                "description": "synchronous rounds: gradients for version V are averaged and applied once "
                "when workers - backup_workers have arrived (docs/api.md)",
                "content": {JSON: {"schema": SYNC_SCHEMA}},
            },
            REQUEST_ID,
        ],
    }


def grad_extra() -> dict[str, Any]:
    grad_dtype = {
        **DTYPE,
        "schema": {"type": "string", "enum": sorted(DTYPES) + [d for d in NARROW_FLOATS if d not in DTYPES]},
        "description": DTYPE["description"] + "; float16 or bfloat16 for a float32/float64 tensor is widened",
    }
    return {
        "requestBody": _body(
            {OCTET: BINARY, NPY: BINARY, JSON: JSON_TENSOR, SAFETENSORS: BINARY},
            "the gradient, same dtype and shape as the tensor (a raw body may omit X-Dtype and X-Shape), or "
            "narrower: raw float16/bfloat16, or safetensors with int8 `values` and float32 `scales` (one per row), "
            "or sparse flat `indices` (int64) and `values`",
        ),
        "parameters": [grad_dtype, SHAPE, IF_MATCH, BASE_VERSION, REQUEST_ID],
    }


def grad_rows_extra() -> dict[str, Any]:
    return {
        "requestBody": _body(
            {SAFETENSORS: BINARY}, "a safetensors file holding `indices` (int64, k) and `values` (k x row shape)"
        ),
        "parameters": [IF_MATCH, BASE_VERSION, REQUEST_ID],
    }


def delete_extra() -> dict[str, Any]:
    return {"parameters": [IF_MATCH, REQUEST_ID]}


def get_tensor_extra() -> dict[str, Any]:
    return {
        "parameters": [
            _param(
                "If-None-Match",
                {"type": "string", "pattern": "^(\\*|" + ONE_TAG + "(, *" + ONE_TAG + ")*)$"},
                "304 if the tensor is at one of these versions",
            ),
            WIRE_DTYPE,
        ]
    }


VERSIONS_MAP = {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}}


def pull_batch_extra() -> dict[str, Any]:
    return {
        "parameters": [
            {
                "name": "X-Min-Versions",
                "in": "header",
                "required": False,
                "description": "wait until this replica has applied these versions (read-your-writes)",
                "content": {JSON: {"schema": {**VERSIONS_MAP, "propertyNames": {"pattern": NAME_PATTERN}}}},
            },
            WIRE_DTYPE,
        ]
    }


def push_batch_extra() -> dict[str, Any]:
    return {
        "requestBody": _body({SAFETENSORS: BINARY}, "a safetensors file {tensor name: gradient}"),
        "parameters": [
            {
                "name": "X-Base-Versions",
                "in": "header",
                "required": False,
                "description": "{tensor name: base version}",
                "content": {JSON: {"schema": VERSIONS_MAP}},
            },
            REQUEST_ID,
        ],
    }


def load_checkpoint_extra() -> dict[str, Any]:
    return {
        "requestBody": _body({SAFETENSORS: BINARY}, "a checkpoint (or any safetensors file, e.g. a torch state_dict)")
    }


_PORT = r"0*(6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[1-9][0-9]{0,3})"
_ADDRESS = {"type": "string", "pattern": rf"^\[?[^\[\]]+\]?:{_PORT}$", "description": "host:port, port 1-65535"}
MEMBER_BODY: dict[str, Any] = {
    "type": "object",
    "required": ["id", "http", "raft", "data"],
    "properties": {
        "id": {"type": "string", "pattern": r"^[A-Za-z0-9._-]{1,64}$"},
        "http": _ADDRESS,
        "raft": _ADDRESS,
        "data": _ADDRESS,
        "shards": {"type": ["array", "null"], "minItems": 1, "items": {"type": "integer", "minimum": 0}},
    },  # not hosted here: 307
}


def add_member_extra() -> dict[str, Any]:
    return {"requestBody": _body({JSON: MEMBER_BODY}, "the new member's addresses")}


def _custom_openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema:
        return app.openapi_schema
    doc = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    schemas["Error"] = ERROR_SCHEMA
    secured = getattr(app.state, "token_policy", None) is not None
    if secured:
        doc["components"]["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
    for url, path in doc.get("paths", {}).items():
        for method, operation in path.items():
            responses = operation.get("responses", {})
            fastapi_422 = responses.get("422", {}).get("content", {}).get(JSON, {}).get("schema", {})
            if fastapi_422.get("$ref", "").endswith("/HTTPValidationError"):
                del responses["422"]
            if any(p.get("in") == "query" for p in operation.get("parameters", [])) and "400" not in responses:
                responses["400"] = answers(400)[400]
            if secured and url not in OPEN_PATHS:
                operation["security"] = [{"bearer": []}]
                responses.setdefault("401", answers(401)[401])
                if method not in ("get", "head"):
                    responses.setdefault("403", answers(403)[403])
    app.openapi_schema = doc
    return doc


def install(app: FastAPI) -> None:
    """Serve the document above at /openapi.json."""
    # Assigning app.openapi is FastAPI's documented way to extend the schema (mypy: method-assign).
    app.openapi = lambda: _custom_openapi(app)  # type: ignore[method-assign]
