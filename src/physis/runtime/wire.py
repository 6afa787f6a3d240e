"""The policy server's wire format: msgpack with numpy arrays, as openpi's clients speak it.

A numpy array travels as a msgpack map `{b"__ndarray__": True, b"data": raw bytes, b"dtype": dtype.str,
b"shape": [...]}` and a numpy scalar as `{b"__npgeneric__": True, b"data": value, b"dtype": dtype.str}`:
the same markers openpi-client's `msgpack_numpy` writes and reads, so either side may be theirs.

Decoding is strict because the bytes come from the network: only plain msgpack types and arrays of
booleans, integers, floats and fixed-width strings are accepted (never objects, records or pickles),
an array's declared shape and dtype must account for its bytes exactly, and nesting is bounded.
Every refusal is a `WireError` that says what was found and where.
"""

from __future__ import annotations

import math
import re
from typing import Any

import msgpack
import numpy as np

ARRAY_MARKER = b"__ndarray__"
SCALAR_MARKER = b"__npgeneric__"
MAX_DEPTH = 32  # maps/lists inside each other; an observation needs 3
MAX_NDIM = 32
ALLOWED_KINDS = "biufSU"  # bool, int, uint, float, bytes, str: plain values, nothing that executes or points
# A dtype string as numpy's `dtype.str` writes it ("<f4", "|u1", "<U12"); nothing else is parsed.
_DTYPE = re.compile(r"^[<>|=]?[biufSU]\d{1,3}$")
_PLAIN = (type(None), bool, int, float, str, bytes)


class WireError(ValueError):
    """A message that cannot be encoded or decoded; the message says what and where."""


# ------------------------------------------------------------------ encoding
def encode(obj: Any) -> bytes:
    """Nested dicts/lists of plain values and numpy arrays/scalars -> msgpack bytes."""
    try:
        return msgpack.packb(obj, default=_encode_numpy, use_bin_type=True)
    except WireError:
        raise
    except (TypeError, ValueError, OverflowError) as e:
        raise WireError(f"cannot encode the message: {e}") from None


def _encode_numpy(obj: Any) -> dict[bytes, Any]:
    if isinstance(obj, np.ndarray):
        _check_kind(obj.dtype, "array")
        return {ARRAY_MARKER: True, b"data": obj.tobytes(), b"dtype": obj.dtype.str, b"shape": obj.shape}
    if isinstance(obj, np.generic):
        _check_kind(obj.dtype, "scalar")
        return {SCALAR_MARKER: True, b"data": obj.item(), b"dtype": obj.dtype.str}
    raise WireError(f"cannot encode a {type(obj).__name__}: the wire carries dicts, lists, str, bytes, numbers, "
                    "None and numpy arrays")


def _check_kind(dtype: np.dtype, what: str, where: str = "") -> None:
    if dtype.kind not in ALLOWED_KINDS or dtype.fields is not None or dtype.subdtype is not None:
        prefix = f"{where}: " if where else ""
        raise WireError(f"{prefix}numpy {what} of dtype {dtype} is not allowed on the wire (only bool, integer, "
                        "float and fixed-width string dtypes)")


# ------------------------------------------------------------------ decoding
def decode(data: bytes | bytearray | memoryview) -> Any:
    """msgpack bytes -> nested dicts/lists with numpy arrays; refuses anything but plain values and arrays."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise WireError(f"expected bytes, got {type(data).__name__}")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except msgpack.ExtraData:
        raise WireError("not one msgpack message: extra bytes follow it") from None
    except msgpack.StackError:
        raise WireError(f"not a valid message: nested more than {MAX_DEPTH} levels deep") from None
    except msgpack.FormatError:
        raise WireError("not a valid msgpack message: malformed bytes") from None
    except (ValueError, TypeError) as e:
        reason = "it ends early (truncated)" if "incomplete" in str(e) else str(e) or "malformed bytes"
        raise WireError(f"not a valid msgpack message: {reason}") from None
    return _restore(obj, "", 0)


def _restore(obj: Any, where: str, depth: int) -> Any:
    if isinstance(obj, _PLAIN):
        return obj
    if depth >= MAX_DEPTH:
        raise WireError(f"{where or 'message'}: nested more than {MAX_DEPTH} levels deep")
    if isinstance(obj, list):
        return [_restore(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(obj)]
    if isinstance(obj, dict):
        if ARRAY_MARKER in obj:
            return _array(obj, where)
        if SCALAR_MARKER in obj:
            return _scalar(obj, where)
        return {k: _restore(v, _join(where, k), depth + 1) for k, v in obj.items()}
    raise WireError(f"{where or 'message'}: unsupported msgpack value {type(obj).__name__} (extension types "
                    "are not accepted)")


def _join(where: str, key: str | bytes) -> str:
    name = key if isinstance(key, str) else key.decode("utf-8", "replace")
    return f"{where}/{name}" if where else name


def _dtype(d: dict, where: str, what: str) -> np.dtype:
    text = d.get(b"dtype")
    if isinstance(text, bytes):
        text = text.decode("ascii", "replace")
    if not isinstance(text, str) or not _DTYPE.match(text):
        raise WireError(f"{where or 'message'}: numpy {what} with dtype {text!r} is not allowed on the wire "
                        "(only bool, integer, float and fixed-width string dtypes such as '<f4', '|u1')")
    try:
        dtype = np.dtype(text)
    except TypeError as e:
        raise WireError(f"{where or 'message'}: unknown dtype {text!r} ({e})") from None
    _check_kind(dtype, what, where or "message")
    return dtype


def _array(d: dict, where: str) -> np.ndarray:
    dtype = _dtype(d, where, "array")
    data, shape = d.get(b"data"), d.get(b"shape")
    if not isinstance(data, bytes):
        raise WireError(f"{where or 'message'}: array data must be bytes, got {type(data).__name__}")
    ok = isinstance(shape, list) and len(shape) <= MAX_NDIM
    if not ok or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
        raise WireError(f"{where or 'message'}: array shape must be a list of at most {MAX_NDIM} non-negative "
                        f"integers, got {shape!r}")
    expected = math.prod(shape) * dtype.itemsize
    if expected != len(data):
        raise WireError(f"{where or 'message'}: an array of shape {tuple(shape)} and dtype {dtype} needs "
                        f"{expected} bytes, the message carries {len(data)}")
    # A copy: the result is writable and owns aligned memory, independent of the message buffer.
    return np.ndarray(tuple(shape), dtype=dtype, buffer=data).copy() if expected else np.zeros(shape, dtype)


_SCALAR_TYPES = {"b": (bool,), "i": (int,), "u": (int,), "f": (float, int), "S": (bytes,), "U": (str,)}


def _scalar(d: dict, where: str) -> np.generic:
    dtype = _dtype(d, where, "scalar")
    value = d.get(b"data")
    types = _SCALAR_TYPES[dtype.kind]
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        raise WireError(f"{where or 'message'}: a numpy scalar of dtype {dtype} cannot hold {value!r}")
    try:
        return dtype.type(value)
    except (OverflowError, ValueError) as e:
        raise WireError(f"{where or 'message'}: {value!r} does not fit dtype {dtype} ({e})") from None
