"""The wire format: round trips, byte compatibility with openpi-client's msgpack_numpy, and refusals."""

import msgpack
import numpy as np
import pytest
from openpi_client import msgpack_numpy

from physis.runtime.wire import MAX_DEPTH, WireError, decode, encode

ARRAYS = {
    "bool": np.array([True, False, True]),
    "uint8": np.arange(24, dtype=np.uint8).reshape(2, 4, 3),
    "int16": np.array([-3, 7], dtype=np.int16),
    "int64": np.array([[-(2**40)], [5]], dtype=np.int64),
    "uint64": np.array([2**64 - 1], dtype=np.uint64),
    "float16": np.array([0.5, -2.0], dtype=np.float16),
    "float32": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4),
    "float64": np.array([np.pi, -np.inf, np.nan]),
    "big_endian": np.array([1.5, 2.5], dtype=">f4"),
    "str": np.array(["ab", "c"]),
    "bytes": np.array([b"xy", b"z"]),
    "empty": np.zeros((0, 3), dtype=np.float32),
    "zero_d": np.array(7, dtype=np.int32),
    "fortran": np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
    "strided": np.arange(10, dtype=np.int32)[::3],
}
SCALARS = {"i8": np.int8(-5), "u16": np.uint16(60000), "f32": np.float32(1.25), "b": np.bool_(True),
           "i64": np.int64(2**62)}
PLAIN = {"none": None, "text": "open the drawer", "raw": b"\x00\x01", "list": [1, 2.5, [3, "x"]], "flag": False}


def message():
    return {"arrays": dict(ARRAYS), "scalars": dict(SCALARS), "plain": dict(PLAIN), "f64": np.float64(2.0)}


def assert_same(a, b):
    if isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    elif isinstance(a, np.generic) and not isinstance(a, float):
        assert type(a) is type(b) and a == b
    else:  # np.float64 subclasses float: it travels as a plain float, as openpi's packer sends it
        assert type(b) is (float if isinstance(a, float) else type(a)) and a == b


def test_round_trip_keeps_values_dtypes_and_shapes():
    out = decode(encode(message()))
    assert_same(message(), out)
    assert isinstance(out["f64"], float)  # a float64 scalar is a Python float on the wire, as openpi's packer makes it


def test_bytes_are_identical_to_openpi_and_each_side_reads_the_other():
    ours = encode(message())
    assert ours == msgpack_numpy.packb(message())
    assert_same(message(), msgpack_numpy.unpackb(ours))
    assert_same(message(), decode(msgpack_numpy.packb(message())))


def test_decoded_arrays_are_writable_copies():
    data = encode({"a": np.zeros(4, dtype=np.float32)})
    a = decode(data)["a"]
    a[0] = 1.0  # writable, and owns its memory (the message buffer is untouched)
    assert decode(data)["a"][0] == 0.0


@pytest.mark.parametrize("value, match", [
    (np.array([object()], dtype=object), "dtype object is not allowed"),
    (np.zeros(2, dtype=[("a", "<f4"), ("b", "<i4")]), "is not allowed"),
    (np.zeros(2, dtype="V4"), "dtype |V4 is not allowed"),
    (np.array([1 + 2j]), "complex128 is not allowed"),
    (np.array(["2024-01-01"], dtype="datetime64[D]"), "is not allowed"),
    (np.complex64(1j), "scalar of dtype complex64"),
    ({1, 2}, "cannot encode a set"),
    (object(), "cannot encode a object"),
])
def test_encode_refuses_what_the_wire_cannot_carry(value, match):
    with pytest.raises(WireError, match=match):
        encode({"x": value})


def raw_array(dtype="<f4", shape=(2,), data=b"\x00" * 8):
    return msgpack.packb({"obs": {b"__ndarray__": True, b"data": data, b"dtype": dtype, b"shape": shape}})


def nested(depth):
    x = []
    for _ in range(depth):
        x = [x]
    return msgpack.packb(x)


@pytest.mark.parametrize("data, match", [
    (b"\xc1", "malformed bytes"),
    (encode({"a": np.zeros(8)})[:-5], "truncated"),
    (encode({"a": 1}) + b"junk", "extra bytes"),
    (msgpack.packb({1: "int key"}), "not allowed for map key"),
    (raw_array(dtype="|O", data=b"\x00" * 16), "dtype '|O' is not allowed"),
    (raw_array(dtype="|V8"), "dtype '|V8' is not allowed"),
    (raw_array(dtype="[('a', '<f4')]"), "is not allowed"),
    (raw_array(dtype="<c8", shape=(1,)), "'<c8' is not allowed"),
    (raw_array(dtype="<M8", shape=(1,)), "is not allowed"),
    (raw_array(shape=(3,)), "obs: an array of shape \\(3,\\) and dtype float32 needs 12 bytes, the message carries 8"),
    (raw_array(shape=(2**40, 2**40)), "needs .* bytes, the message carries 8"),
    (raw_array(shape=(-1,)), "non-negative integers"),
    (raw_array(shape="2"), "non-negative integers"),
    (raw_array(data="text"), "data must be bytes"),
    (msgpack.packb({"s": {b"__npgeneric__": True, b"data": 300, b"dtype": "|i1"}}), "does not fit dtype int8"),
    (msgpack.packb({"s": {b"__npgeneric__": True, b"data": "x", b"dtype": "<f4"}}), "cannot hold 'x'"),
    (msgpack.packb({"e": msgpack.ExtType(3, b"x")}), "e: unsupported msgpack value ExtType"),
    (nested(MAX_DEPTH + 1), f"nested more than {MAX_DEPTH} levels"),
    (b"\x91" * 5000 + b"\x90", "nested"),  # deeper than msgpack's own stack
    ("not bytes", "expected bytes"),
])
def test_decode_refuses_bad_messages_clearly(data, match):
    with pytest.raises(WireError, match=match):
        decode(data)


def test_nesting_within_the_bound_is_fine():
    assert decode(nested(MAX_DEPTH - 1)) is not None
