"""Tensor wire formats: raw little-endian bytes with headers, .npy, and JSON.

Decoding never unpickles (`.npy` headers are parsed with pickling off and
object dtypes refused) and never copies the bytes of a raw body. Encoding
serves the stored, read-only array buffer without copying it.
"""

from __future__ import annotations

import io
import json
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.lib import format as npf
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from store import content_id, dtypes
from store.buffers import LARGE, Bytes, byte_view, receive_buffer
from store.errors import InvalidRequest, Unprocessable, echo

from . import json_input
from .errors import NotAcceptable, PayloadTooLarge, UnsupportedMediaType

if TYPE_CHECKING:
    from store.datapath import PayloadStream

OCTET = "application/octet-stream"
NPY = "application/x-npy"
JSON = "application/json"
SAFETENSORS = "application/x-safetensors"
TENSOR_TYPES = (OCTET, NPY, JSON)
STREAM_CHUNK = 4 << 20  # response slices: fewer awaits per large GET (64 MB pulls +20% vs 1 MB)


@dataclass
class WireTensor:
    dtype: str
    shape: tuple[int, ...]
    data: Any  # bytes-like, little-endian, C order


class HashedBody(np.ndarray):
    """A large request body (bytes in a numpy buffer: see store/buffers.py)
    with its payload id (store/content_id.py) computed while it arrived: a
    sideloaded payload is named by it (store/staging.py reads `content_id`),
    and its cut-through `stream` to the
    shard's peers, if one was opened (api/tensors.py)."""

    content_id: str | None = None
    stream: PayloadStream | None = None


HASH_WHILE_READING = LARGE  # bodies this large are hashed chunk by chunk as they arrive


async def read_body(request: Request, limit: int) -> HashedBody | bytearray:
    """The request body, refused with 413 as soon as it passes `limit` bytes
    (by Content-Length up front, or while streaming a chunked body)."""
    return await read_stream(request.headers.get("content-length"), request.stream(), limit)


async def read_stream(
    length_header: str | None,
    chunks: AsyncIterator[bytes],
    limit: int,
    forward: Callable[[memoryview], None] | None = None,
) -> HashedBody | bytearray:
    """`read_body` for any source of body chunks (api/fastpath.py reads the
    ASGI messages itself). `forward` (bodies with a Content-Length only) sees
    every piece of the body buffer as soon as it is filled."""
    if length_header is not None:
        try:
            length = int(length_header)
        except ValueError:
            raise InvalidRequest(f"Content-Length {echo(length_header)} is not a number") from None
        if length > limit:
            raise PayloadTooLarge(f"body of {length} bytes exceeds the limit of {limit} bytes", limit=limit)
        hashed: HashedBody | None = None
        if length >= HASH_WHILE_READING:  # receive_buffer's numpy case (from LARGE bytes on)
            hashed = receive_buffer(length).view(HashedBody)  # type: ignore[union-attr]
        buf = bytearray(length) if hashed is None else hashed
        kind = content_id.new_kind()
        hasher = None if hashed is None else content_id.hasher(kind)
        view = byte_view(buf)
        got = 0
        async for chunk in chunks:
            if got + len(chunk) > length:
                raise InvalidRequest("body is longer than its Content-Length")
            view[got : got + len(chunk)] = chunk
            if hasher is not None:
                hasher.update(chunk)
            if forward is not None and chunk:
                forward(view[got : got + len(chunk)])
            got += len(chunk)
        if got != length:
            raise InvalidRequest(f"body ended after {got} of {length} bytes")
        if hashed is not None and hasher is not None:
            hashed.content_id = content_id.name(kind, hasher)
        return buf
    buf = bytearray()
    async for chunk in chunks:
        buf += chunk
        if len(buf) > limit:
            raise PayloadTooLarge(f"body exceeds the limit of {limit} bytes", limit=limit)
    return buf


def media_type(content_type: str | None) -> str:
    return (content_type or "").split(";")[0].strip().lower()


def decode(
    content_type: str | None,
    headers: Mapping[str, str],
    body: Bytes,
    json_max_elements: int,
    default: tuple[str, tuple[int, ...]] | None = None,
) -> WireTensor:
    """Parse a tensor body. `default` (dtype, shape) fills in absent X-Dtype /
    X-Shape headers for raw bodies (gradients of an existing tensor)."""
    kind = media_type(content_type) or OCTET
    if kind == OCTET:
        return _decode_raw(headers, body, default)
    if kind == NPY:
        return _decode_npy(body)
    if kind == JSON:
        return _decode_json(body, json_max_elements)
    raise UnsupportedMediaType(
        f"Content-Type {echo(kind)} is not supported for tensors (use {', '.join(TENSOR_TYPES)})"
    )


def _decode_raw(headers: Mapping[str, str], body: Bytes, default: tuple[str, tuple[int, ...]] | None) -> WireTensor:
    dtype_text = headers.get("x-dtype")
    shape_text = headers.get("x-shape")
    if dtype_text is None or shape_text is None:
        if default is None:
            missing = "X-Dtype" if dtype_text is None else "X-Shape"
            raise InvalidRequest(f"{missing} header is required with {OCTET}")
        dtype_text = dtype_text if dtype_text is not None else default[0]
        shape = dtypes.parse_shape(shape_text) if shape_text is not None else default[1]
    else:
        shape = dtypes.parse_shape(shape_text)
    dtype = dtype_text.strip().lower()
    dtypes.dtype_of(dtype)
    want = dtypes.expected_nbytes(dtype, shape)
    if len(body) != want:
        raise Unprocessable(f"body has {len(body)} bytes but X-Dtype {dtype} and X-Shape {list(shape)} need {want}")
    return WireTensor(dtype, shape, body)


def read_npy_header(view: memoryview, kinds: str) -> tuple[tuple[int, ...], bool, np.dtype[Any], int]:
    """Shape, Fortran order, dtype and data offset of an .npy body, parsed without
    pickling; a dtype whose kind is not in `kinds` (numpy kind letters) is refused."""
    head = io.BytesIO(bytes(view[:65536]))
    try:
        version = npf.read_magic(head)
        if version == (1, 0):
            shape, fortran, dt = npf.read_array_header_1_0(head)
        elif version in ((2, 0), (3, 0)):
            shape, fortran, dt = npf.read_array_header_2_0(head)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except (ValueError, SyntaxError, TypeError, EOFError) as e:
        raise InvalidRequest(f"body is not a valid .npy file: {e}") from None
    if dt.hasobject or dt.kind not in kinds:
        raise Unprocessable(f".npy dtype {dt} is not supported (object arrays are never accepted)")
    return tuple(shape), bool(fortran), dt, head.tell()


def _decode_npy(body: Bytes) -> WireTensor:
    view = byte_view(body)
    raw_shape, fortran, dt, offset = read_npy_header(view, "fi")
    name = dtypes.dtype_name(dt)
    shape = dtypes.check_shape(raw_shape)
    want = dtypes.element_count(shape) * dt.itemsize
    if len(view) - offset != want:
        raise Unprocessable(f".npy data has {len(view) - offset} bytes, dtype {dt} and shape {list(shape)} need {want}")
    data = view[offset:]
    if fortran or dt.byteorder == ">":
        arr = np.frombuffer(data, dtype=dt)
        arr = arr.reshape(shape[::-1]).T if fortran else arr.reshape(shape)
        arr = np.ascontiguousarray(arr, dtype=dtypes.dtype_of(name))
        data = byte_view(arr.reshape(-1)).cast("B")
    return WireTensor(name, shape, data)


def _decode_json(body: Bytes, max_elements: int) -> WireTensor:
    if len(body) > max(1 << 20, max_elements * 32):
        raise PayloadTooLarge(
            f"JSON tensor bodies are limited to {max_elements} elements; use {OCTET} or {NPY} for large tensors"
        )
    doc = json_input.loads(bytes(body), "body")
    if not isinstance(doc, dict) or "data" not in doc:
        raise InvalidRequest('JSON tensor body must be an object {"dtype": ..., "shape": [...], "data": [...]}')
    dtype = str(doc.get("dtype", "float32")).lower()
    np_dtype = dtypes.dtype_of(dtype)
    _check_json_leaves(doc["data"], dtype, np_dtype)
    try:
        # A value outside the dtype's range would become inf (float16) or wrap: refuse it instead.
        with np.errstate(over="raise", invalid="raise"):
            arr = np.asarray(doc["data"], dtype=np_dtype)
    except (ValueError, TypeError, OverflowError, FloatingPointError) as e:
        raise Unprocessable(f"data cannot be read as {dtype}: {e}") from None
    dtypes.check_shape(arr.shape)  # the rank nesting gives, when no shape is sent
    if "shape" in doc:
        shape = dtypes.check_shape(doc["shape"]) if isinstance(doc["shape"], list) else None
        if shape is None:
            raise InvalidRequest("shape must be a list of integers")
        if arr.size != dtypes.element_count(shape):
            raise Unprocessable(
                f"data has {arr.size} elements, shape {list(shape)} needs {dtypes.element_count(shape)}"
            )
        arr = arr.reshape(shape)
    if arr.size > max_elements:
        raise PayloadTooLarge(f"JSON tensor bodies are limited to {max_elements} elements")
    arr = np.asarray(arr, order="C")  # ascontiguousarray would turn a scalar into shape (1,)
    return WireTensor(dtype, tuple(arr.shape), arr.tobytes())


def _check_json_leaves(data: Any, dtype: str, np_dtype: np.dtype) -> None:
    """Numbers only, and integers (2.0 is one) for an integer dtype: numpy
    would take the string "123", true as 1 and truncate 2.5 to 2 without a word."""
    try:
        leaves = np.asarray(data, dtype=object).reshape(-1).tolist()
    except ValueError as e:  # deeper than numpy's dimension limit
        raise Unprocessable(f"data cannot be read as {dtype}: {e}") from None
    kinds = set(map(type, leaves))
    if not kinds <= {int, float}:  # ragged nesting leaves lists here
        found = ", ".join(sorted(k.__name__ for k in kinds - {int, float}))
        raise Unprocessable(f"data must hold only JSON numbers, found {found}")
    if np_dtype.kind == "i" and float in kinds and not all(v.is_integer() for v in leaves if type(v) is float):
        raise Unprocessable(f"data must hold only integers for {dtype}")


def negotiate(accept: str | None, offered: tuple[str, ...] = TENSOR_TYPES) -> str:
    """Pick the best of `offered` for an Accept header; the first is the default."""
    if not accept:
        return offered[0]
    ranges = []
    for i, part in enumerate(accept.split(",")):
        fields = [f.strip() for f in part.split(";")]
        q = 1.0
        for f in fields[1:]:
            if f.startswith("q="):
                try:
                    q = float(f[2:])
                except ValueError:
                    q = 0.0
        ranges.append((-q, i, fields[0].lower()))
    for neg_q, _, mt in sorted(ranges):
        if -neg_q <= 0:
            continue
        if mt in offered:
            return mt
        if mt in ("*/*", "application/*"):
            return offered[0]
    raise NotAcceptable(f"none of {echo(accept)} can be served; available: {', '.join(offered)}")


def raw_view(arr: np.ndarray) -> memoryview:
    return byte_view(np.ascontiguousarray(arr).reshape(-1)).cast("B")


def tensor_headers(dtype: str, shape: tuple[int, ...], version: int, shard: int) -> dict[str, str]:
    return {
        "X-Dtype": dtype,
        "X-Shape": ",".join(str(d) for d in shape),
        "X-Version": str(version),
        "ETag": f'"{version}"',
        "X-Shard": str(shard),
    }


def encode(
    kind: str, name: str, arr: np.ndarray, headers: dict[str, str], json_max: int, head_only: bool = False
) -> Response:
    if kind == JSON:
        if arr.size > json_max:
            raise NotAcceptable(
                f"tensor {name!r} has {arr.size} elements; JSON is offered up to {json_max}; ask for {OCTET} or {NPY}"
            )
        doc = {
            "name": name,
            "dtype": headers["X-Dtype"],
            "shape": list(arr.shape),
            "version": int(headers["X-Version"]),
            "data": arr.tolist(),
        }
        body = json.dumps(doc, allow_nan=True, separators=(",", ":")).encode()
        return Response(b"" if head_only else body, media_type=JSON, headers=headers)
    if kind == NPY:
        header = _npy_header(arr)
        total = len(header) + arr.nbytes
        hdrs = dict(headers, **{"Content-Length": str(total)})
        if head_only:
            return Response(b"", media_type=NPY, headers=hdrs)
        return StreamingResponse(_chunks(header, *_slices(raw_view(arr))), media_type=NPY, headers=hdrs)
    hdrs = dict(headers, **{"Content-Length": str(arr.nbytes)})
    if head_only:
        return Response(b"", media_type=OCTET, headers=hdrs)
    view = raw_view(arr)
    if len(view) <= STREAM_CHUNK:
        return Response(view, media_type=OCTET, headers=hdrs)
    # Large bodies leave in 1 MB slices of the stored buffer: one big write
    # would be copied whole by the server's send path (measured 3 copies).
    return StreamingResponse(_chunks(*_slices(view)), media_type=OCTET, headers=hdrs)


def parts_response(parts: list[Any], media_type: str, headers: dict[str, str]) -> Response:
    """A body made of bytes-like parts: one write up to STREAM_CHUNK, else
    streamed in slices of that size (large memoryviews are not copied)."""
    total = sum(len(p) for p in parts)
    if total <= STREAM_CHUNK:
        return Response(b"".join(parts), media_type=media_type, headers=headers)
    pieces = [s for p in parts for s in (_slices(p) if isinstance(p, memoryview) else [p])]
    return StreamingResponse(_chunks(*pieces), media_type=media_type, headers=headers)


def _slices(view: memoryview) -> list[memoryview]:
    return [view[i : i + STREAM_CHUNK] for i in range(0, len(view), STREAM_CHUNK)]


async def _chunks(*parts: Any) -> AsyncIterator[Any]:
    for p in parts:
        yield p


def _npy_header(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    npf.write_array_header_1_0(buf, npf.header_data_from_array_1_0(arr))
    return buf.getvalue()


def decode_safetensors(body: Bytes) -> dict[str, WireTensor]:
    """Many tensors in one body, parsed by the safetensors library."""
    import safetensors

    try:
        items = safetensors.deserialize(bytes(body))
    except Exception as e:  # SafetensorError and friends: the body is malformed
        raise InvalidRequest(f"body is not a valid safetensors file: {e}") from None
    out: dict[str, WireTensor] = {}
    for name, spec in items:
        dtype = dtypes.from_safetensors(spec["dtype"], f"tensor {echo(name)}")
        out[name] = WireTensor(dtype, dtypes.check_shape(spec["shape"]), spec["data"])
    return out


def encode_safetensors(arrays: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    from safetensors.numpy import save

    return save({k: np.asarray(v, order="C") for k, v in arrays.items()}, metadata=metadata)
