"""Wire codec: frozen dataclasses <-> ZeroMQ frames `[type byte, msgpack payload, *raw array buffers]`."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Callable

import msgpack
import numpy as np

# A message class is a frozen dataclass registered with `@message(type_byte)`. Its payload is a msgpack map
# of field name -> value. A numpy array field travels as its own raw frame and the map holds
# {"buf": frame index after the payload, "dtype": numpy dtype string such as "<f4", "shape": [dims]}.
# Decoding validates every field against the annotation and the declared Range/OneOf/MaxLen, and raises
# exactly one error type, DecodeError, whose `code` is one of:
BAD_FRAMES = "bad_frames"  # too few frames, a type frame that is not one byte, unused or wrong-sized buffers
UNKNOWN_TYPE = "unknown_type"  # no message class is registered for the type byte
UNEXPECTED_TYPE = "unexpected_type"  # a valid message, but not one the receiver expects here
BAD_PAYLOAD = "bad_payload"  # the payload is not msgpack, or not a map
BAD_FIELD = "bad_field"  # a missing, unknown, wrong-typed or out-of-range field

_ARRAY_DTYPE = re.compile(r"^[<>|=][biuf][1248]$")  # plain numeric dtypes only: never object arrays


class DecodeError(ValueError):
    """A frame list that is not a valid message; `code` says which rule it broke."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Range:
    """Inclusive numeric bounds of a field: `Annotated[int, Range(1)]`; NaN never passes."""

    lo: float | None = None
    hi: float | None = None

    def check(self, value: Any, path: str) -> None:
        if (self.lo is not None and not value >= self.lo) or (self.hi is not None and not value <= self.hi):
            raise DecodeError(BAD_FIELD, f"{path} is {value!r}; allowed range is [{self.lo}, {self.hi}]")


@dataclass(frozen=True)
class OneOf:
    """The allowed values of a string field."""

    values: tuple[str, ...]

    def check(self, value: Any, path: str) -> None:
        if value not in self.values:
            raise DecodeError(BAD_FIELD, f"{path} is {value!r}; use one of {', '.join(map(repr, self.values))}")


@dataclass(frozen=True)
class MaxLen:
    """The largest length of a string, bytes or list field."""

    n: int

    def check(self, value: Any, path: str) -> None:
        if len(value) > self.n:
            raise DecodeError(BAD_FIELD, f"{path} has length {len(value)}; at most {self.n} allowed")


# A compiled field: encode(value, buffers) -> msgpack-able value (appending array buffers), and
# decode(value, buffers, path) -> validated value.
Enc = Callable[[Any, list], Any]
Dec = Callable[[Any, list, str], Any]
_CHECKS = (Range, OneOf, MaxLen)
_SCALARS = (int, float, str, bool, bytes, type(None))


def _ident(value: Any, bufs: list) -> Any:
    return value


def _kind(value: Any) -> str:
    return type(value).__name__


def _scalar_dec(hint: type) -> Dec:
    if hint is float:

        def dec(v: Any, bufs: list, path: str) -> Any:
            if type(v) is float:
                return v
            if type(v) is int:
                return float(v)
            raise DecodeError(BAD_FIELD, f"{path}: expected a number, got {_kind(v)}")

        return dec

    def dec(v: Any, bufs: list, path: str) -> Any:
        if type(v) is not hint:  # exact: a bool is not an int on this wire
            raise DecodeError(BAD_FIELD, f"{path}: expected {hint.__name__}, got {_kind(v)}")
        return v

    return dec


def _array_enc(value: Any, bufs: list) -> Any:
    arr = np.ascontiguousarray(value)
    bufs.append(memoryview(arr.reshape(-1).view(np.uint8)))
    return {"buf": len(bufs) - 1, "dtype": arr.dtype.str, "shape": list(arr.shape)}


def _array_dec(v: Any, bufs: list, path: str) -> Any:
    if type(v) is not dict or set(v) != {"buf", "dtype", "shape"}:
        raise DecodeError(BAD_FIELD, f"{path}: expected an array reference {{buf, dtype, shape}}")
    idx, dtype, shape = v["buf"], v["dtype"], v["shape"]
    if type(idx) is not int or not 0 <= idx < len(bufs):
        raise DecodeError(BAD_FRAMES, f"{path}: buffer index {idx!r} names no frame")
    if type(dtype) is not str or not _ARRAY_DTYPE.match(dtype):
        raise DecodeError(BAD_FIELD, f"{path}: dtype {dtype!r} is not a plain numeric dtype")
    if type(shape) is not list or not all(type(d) is int and d >= 0 for d in shape):
        raise DecodeError(BAD_FIELD, f"{path}: shape {shape!r} is not a list of sizes")
    buf = bufs[idx]
    dt = np.dtype(dtype)
    if math.prod(shape) * dt.itemsize != buf.nbytes:
        raise DecodeError(BAD_FRAMES, f"{path}: frame has {buf.nbytes} bytes, shape {shape} {dtype} needs more or less")
    bufs.used.add(idx)
    return np.frombuffer(buf, dtype=dt).reshape(shape)  # zero-copy, read-only view of the frame


def _union(args: tuple[Any, ...]) -> tuple[Enc | None, Dec]:
    optional = type(None) in args
    alts = [a for a in args if a is not type(None)]
    compiled = [_compile(a) for a in alts]
    encs = [e for e, _ in compiled if e is not None]
    if len(encs) > 1:
        raise TypeError(f"a union may hold at most one non-scalar type: {args}")
    inner_enc = encs[0] if encs else None
    names = " or ".join(getattr(a, "__name__", str(a)) for a in alts)

    def dec(v: Any, bufs: list, path: str) -> Any:
        if v is None:
            if optional:
                return None
            raise DecodeError(BAD_FIELD, f"{path}: expected {names}, got None")
        errors = []
        for _, d in compiled:
            try:
                return d(v, bufs, path)
            except DecodeError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else DecodeError(BAD_FIELD, f"{path}: expected {names}, got {_kind(v)}")

    if inner_enc is None:
        return None, dec

    def enc(v: Any, bufs: list) -> Any:
        return v if isinstance(v, _SCALARS) else inner_enc(v, bufs)

    return enc, dec


def _list(elem: Any, as_tuple: bool) -> tuple[Enc | None, Dec]:
    elem_enc, elem_dec = _compile(elem)
    exact = elem if elem in (int, str, bool) else None

    def dec(v: Any, bufs: list, path: str) -> Any:
        if type(v) is not list:
            raise DecodeError(BAD_FIELD, f"{path}: expected a list, got {_kind(v)}")
        if exact is not None and all(type(x) is exact for x in v):
            out = v  # fast path for token id lists
        else:
            out = [elem_dec(x, bufs, f"{path}[{i}]") for i, x in enumerate(v)]
        return tuple(out) if as_tuple else out

    if elem_enc is None:
        return None, dec
    return (lambda v, bufs: [elem_enc(x, bufs) for x in v]), dec


def _fixed_tuple(args: tuple[Any, ...]) -> tuple[Enc | None, Dec]:
    compiled = [_compile(a) for a in args]

    def dec(v: Any, bufs: list, path: str) -> Any:
        if type(v) is not list or len(v) != len(compiled):
            raise DecodeError(BAD_FIELD, f"{path}: expected a list of {len(compiled)} items")
        return tuple(d(x, bufs, f"{path}[{i}]") for i, ((_, d), x) in enumerate(zip(compiled, v)))

    if all(e is None for e, _ in compiled):
        return None, dec
    return (lambda v, bufs: [(e or _ident)(x, bufs) for (e, _), x in zip(compiled, v)]), dec


def _dict(key: Any, value: Any) -> tuple[Enc | None, Dec]:
    if key is not str:
        raise TypeError("dict fields must have str keys")
    val_enc, val_dec = _compile(value)

    def dec(v: Any, bufs: list, path: str) -> Any:
        if type(v) is not dict:
            raise DecodeError(BAD_FIELD, f"{path}: expected a map, got {_kind(v)}")
        out = {}
        for k, x in v.items():
            if type(k) is not str:
                raise DecodeError(BAD_FIELD, f"{path}: map keys must be strings, got {_kind(k)}")
            out[k] = val_dec(x, bufs, f"{path}[{k!r}]")
        return out

    if val_enc is None:
        return None, dec
    return (lambda v, bufs: {k: val_enc(x, bufs) for k, x in v.items()}), dec


def _checked(base: Any, meta: tuple[Any, ...]) -> tuple[Enc | None, Dec]:
    enc, inner = _compile(base)
    checks = [m for m in meta if isinstance(m, _CHECKS)]

    def dec(v: Any, bufs: list, path: str) -> Any:
        v = inner(v, bufs, path)
        for c in checks:
            c.check(v, path)
        return v

    return enc, dec


def _compile(hint: Any) -> tuple[Enc | None, Dec]:
    """Encoder (None when the value packs as it is) and validating decoder for one annotation."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        return _checked(args[0], args[1:])
    if hint in (int, float, str, bool, bytes):
        return None, _scalar_dec(hint)
    if hint is np.ndarray:
        return _array_enc, _array_dec
    if origin in (types.UnionType, typing.Union):
        return _union(args)
    if origin is list:
        return _list(args[0], as_tuple=False)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return _list(args[0], as_tuple=True)
        return _fixed_tuple(args)
    if origin is dict:
        return _dict(*args)
    if dataclasses.is_dataclass(hint):
        spec = _struct(hint)
        return spec.encode_map, spec.decode_map
    raise TypeError(f"unsupported wire field type {hint!r}")


def _pred(hint: Any, x: str, consts: dict[str, Any], depth: int = 0) -> str | None:
    """Python source of a fast test that `x` is already a valid value of `hint` (None: no fast test)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        base = _pred(args[0], x, consts, depth)
        if base is None:
            return None
        parts = [base]
        for m in args[1:]:
            if isinstance(m, Range):
                parts += [f"{x} >= {m.lo!r}"] if m.lo is not None else []
                parts += [f"{x} <= {m.hi!r}"] if m.hi is not None else []
            elif isinstance(m, OneOf):
                name = f"_c{len(consts)}"
                consts[name] = frozenset(m.values)
                parts.append(f"{x} in {name}")
            elif isinstance(m, MaxLen):
                parts.append(f"len({x}) <= {m.n}")
        return " and ".join(parts)
    if hint in (int, float, str, bool, bytes):
        return f"type({x}) is {hint.__name__}"
    if origin in (types.UnionType, typing.Union) and len(args) == 2 and type(None) in args:
        inner = _pred(next(a for a in args if a is not type(None)), x, consts, depth)
        return None if inner is None else f"({x} is None or ({inner}))"
    if origin is list and depth < 3:
        e = f"_e{depth}"
        inner = _pred(args[0], e, consts, depth + 1)
        return None if inner is None else f"type({x}) is list and all({inner} for {e} in {x})"
    if origin is dict and args[0] is str and depth < 3:
        k, e = f"_k{depth}", f"_e{depth}"
        inner = _pred(args[1], e, consts, depth + 1)
        return None if inner is None else f"type({x}) is dict and all(type({k}) is str and {inner} for {k}, {e} in {x}.items())"
    return None


class _Struct:
    """One frozen dataclass compiled to generated encode/decode functions (the wire's hot path).

    Each field gets an inline fast test of the common valid case; only a value that fails it goes
    through the generic validating decoder, which converts it (int -> float) or raises with a path.
    """

    def __init__(self, cls: type) -> None:
        if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:
            raise TypeError(f"{cls.__name__} must be a frozen dataclass")
        hints = typing.get_type_hints(cls, include_extras=True)
        self.cls = cls
        self.fields = dataclasses.fields(cls)
        self.names = frozenset(f.name for f in self.fields)
        self.required = frozenset(
            f.name for f in self.fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        )
        ns: dict[str, Any] = {"_cls": cls, "_new": object.__new__, "_keys": self._check_keys, "_p": _join,
                              "_not_map": self._not_map, "_post": self._post_init}
        enc_items, dec_lines, values = [], [], []
        for i, f in enumerate(self.fields):
            enc, dec = _compile(hints[f.name])
            ns[f"_enc{i}"], ns[f"_dec{i}"] = enc, dec
            enc_items.append(f"{f.name!r}: m.{f.name}" if enc is None else f"{f.name!r}: _enc{i}(m.{f.name}, bufs)")
            dec_lines.append(self._field_source(i, f, hints[f.name], ns))
            values.append(f"{f.name!r}: x{i}")
        make = "    o = _cls(**d)" if hasattr(cls, "__slots__") else "    o = _new(_cls)\n    o.__dict__.update(d)"
        post = "    _post(o)" if hasattr(cls, "__post_init__") else ""
        source = "\n".join([
            "def encode_map(m, bufs):",
            f"    return {{{', '.join(enc_items)}}}",
            "def decode_map(v, bufs, path):",
            "    if type(v) is not dict:",
            "        _not_map(v, path)",
            f"    if len(v) != {len(self.fields)} or v.keys() != _names:",
            "        _keys(v)",
            *dec_lines,
            f"    d = {{{', '.join(values)}}}",
            make,
            post,
            "    return o",
        ])
        ns["_names"] = self.names
        exec(compile(source, f"<codec {cls.__name__}>", "exec"), ns)  # generated from annotations only
        self.encode_map, self.decode_map = ns["encode_map"], ns["decode_map"]

    @staticmethod
    def _field_source(i: int, f: dataclasses.Field, hint: Any, ns: dict[str, Any]) -> str:
        name = f.name
        if f.default is not dataclasses.MISSING:
            ns[f"_default{i}"] = f.default
            get = f"    x{i} = v[{name!r}] if {name!r} in v else _default{i}"
        elif f.default_factory is not dataclasses.MISSING:
            ns[f"_factory{i}"] = f.default_factory
            get = f"    x{i} = v[{name!r}] if {name!r} in v else _factory{i}()"
        else:
            get = f"    x{i} = v[{name!r}]"
        check = _pred(hint, f"x{i}", ns)
        slow = f"x{i} = _dec{i}(x{i}, bufs, _p(path, {name!r}))"
        if check is None:
            return f"{get}\n    {slow}"
        return f"{get}\n    if not ({check}):\n        {slow}"

    def _check_keys(self, v: dict) -> None:
        unknown = v.keys() - self.names
        if unknown:
            raise DecodeError(BAD_FIELD, f"{self.cls.__name__}: unknown field(s) {', '.join(sorted(map(str, unknown)))}")
        missing = self.required - v.keys()
        if missing:
            raise DecodeError(BAD_FIELD, f"{self.cls.__name__}: missing field(s) {', '.join(sorted(missing))}")

    def _not_map(self, v: Any, path: str) -> None:
        raise DecodeError(BAD_FIELD, f"{path or self.cls.__name__}: expected a map, got {_kind(v)}")

    def _post_init(self, obj: Any) -> None:
        try:
            obj.__post_init__()
        except (TypeError, ValueError) as e:  # a check the class itself declares
            raise DecodeError(BAD_FIELD, f"{self.cls.__name__}: {e}") from None


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


_STRUCTS: dict[type, _Struct] = {}
_CLASS_BY_TYPE: dict[int, type] = {}


def _struct(cls: type) -> _Struct:
    spec = _STRUCTS.get(cls)
    if spec is None:  # compiled on first use so that annotations may name classes defined later
        spec = _STRUCTS[cls] = _Struct(cls)
    return spec


def message(msg_type: int) -> Callable[[type], type]:
    """Class decorator registering a frozen dataclass as the wire message with this type byte."""
    code = int(msg_type)
    if not 0 <= code <= 255:
        raise ValueError(f"type byte {code} does not fit in one byte")

    def register(cls: type) -> type:
        if not dataclasses.is_dataclass(cls) or not cls.__dataclass_params__.frozen:
            raise TypeError(f"{cls.__name__} must be a frozen dataclass")
        if code in _CLASS_BY_TYPE:
            raise ValueError(f"type byte {code} is taken by {_CLASS_BY_TYPE[code].__name__}")
        _CLASS_BY_TYPE[code] = cls
        cls.MSG_TYPE = msg_type  # class attribute, not a field: it is the frame's first byte
        return cls

    return register


def registered() -> dict[int, type]:
    """Type byte -> message class, for tests and docs."""
    return dict(_CLASS_BY_TYPE)


def _pack_default(value: Any) -> Any:
    if isinstance(value, np.integer):  # numpy scalars from the model path
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    raise TypeError(f"cannot put {_kind(value)} on the wire")


def encode(msg: Any) -> list[bytes | memoryview]:
    """Frames of one message: [type byte, msgpack map, *array buffers (zero-copy views)]."""
    cls = type(msg)
    code = getattr(cls, "MSG_TYPE", None)
    if code is None or _CLASS_BY_TYPE.get(int(code)) is not cls:
        raise TypeError(f"{cls.__name__} is not a registered wire message")
    bufs: list = []
    payload = _struct(cls).encode_map(msg, bufs)
    return [bytes((int(code),)), msgpack.packb(payload, default=_pack_default), *bufs]


class _Buffers(list):
    """Raw frames after the payload, remembering which ones an array field claimed."""

    used: set[int]


def _as_buffer(frame: Any) -> memoryview:
    return memoryview(getattr(frame, "buffer", frame))  # zmq.Frame exposes .buffer; bytes are buffers


def _unpack(frame: Any) -> Any:
    try:
        return msgpack.unpackb(_as_buffer(frame), raw=False, strict_map_key=True, use_list=True)
    except (ValueError, TypeError) as e:  # msgpack's own errors all derive from ValueError
        raise DecodeError(BAD_PAYLOAD, f"payload is not valid msgpack ({type(e).__name__})") from None


def decode(frames: list[Any] | tuple[Any, ...], expected: type | tuple[type, ...] | None = None) -> Any:
    """The validated message in `frames`; raises DecodeError for anything malformed or not `expected`."""
    if not isinstance(frames, (list, tuple)) or len(frames) < 2:
        raise DecodeError(BAD_FRAMES, "a message needs at least a type frame and a payload frame")
    head = _as_buffer(frames[0])
    if head.nbytes != 1:
        raise DecodeError(BAD_FRAMES, f"the type frame must be one byte, got {head.nbytes}")
    code = head[0] if head.format == "B" else head.cast("B")[0]
    cls = _CLASS_BY_TYPE.get(code)
    if cls is None:
        raise DecodeError(UNKNOWN_TYPE, f"no message has type byte {code}")
    if expected is not None and not issubclass(cls, expected):
        names = expected.__name__ if isinstance(expected, type) else "/".join(c.__name__ for c in expected)
        raise DecodeError(UNEXPECTED_TYPE, f"got {cls.__name__}, expected {names}")
    bufs = _Buffers(_as_buffer(f) for f in frames[2:])
    bufs.used = set()
    msg = _struct(cls).decode_map(_unpack(frames[1]), bufs, "")
    if len(bufs.used) != len(bufs):
        raise DecodeError(BAD_FRAMES, f"{len(bufs)} raw frame(s) sent, {len(bufs.used)} named by array fields")
    return msg


def peek(frames: list[Any] | tuple[Any, ...], name: str) -> Any:
    """Best-effort read of one payload field of a message that may not decode (to name it in an error)."""
    if not isinstance(frames, (list, tuple)) or len(frames) < 2:
        return None
    try:
        payload = _unpack(frames[1])
    except DecodeError:
        return None
    return payload.get(name) if type(payload) is dict else None
