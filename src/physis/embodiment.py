"""Embodiments as data: named DoF groups, and the unified space every robot maps into.

An `EmbodimentSpec` lists a robot's action groups, state groups, cameras and control rate. The
`UnifiedSpace` gives every *kind* of group (end-effector position, gripper, hand joints, ...) a fixed
block of slots, so one model reads and writes every body through one masked vector. A group that is
not of a known kind gets new slots appended after the known ones; existing slots never move.

Specs live in YAML/JSON files (see `src/physis/embodiments/`); a malformed file fails with a message
that names the file and the field.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml

ControlMode = Literal["absolute", "delta"]
CONTROL_MODES: tuple[str, ...] = ("absolute", "delta")

# kind -> number of slots, in unified-vector order. Capacities cover two arms where that is common.
KNOWN_KINDS: dict[str, int] = {
    "eef_pos": 6,  # end-effector position, up to 2 arms x xyz
    "eef_rot": 12,  # end-effector rotation, up to 2 arms x 6-D rotation
    "joints": 14,  # arm joint positions, up to 2 arms x 7
    "gripper": 2,  # gripper opening / effort (one per arm, or one per finger)
    "hand_joints": 24,  # dexterous-hand joints or actuators (wrist + fingers)
    "base": 3,  # mobile base x, y, yaw
    "planar": 2,  # a point in the plane (pusher, point mass)
}


class SpecError(ValueError):
    """A malformed embodiment spec; the message names the file and the field."""


@dataclass(frozen=True)
class DofGroup:
    """A named group of degrees of freedom, e.g. `arm` (eef_pos, 3) or `gripper` (gripper, 1)."""

    name: str
    kind: str
    size: int
    units: str
    lower: tuple[float, ...]
    upper: tuple[float, ...]
    mode: ControlMode = "absolute"
    offset: int | None = None  # first slot inside the kind's block; None packs after earlier groups
    names: tuple[str, ...] = ()  # per-dimension names; defaults to name.0, name.1, ...

    @property
    def dim_names(self) -> tuple[str, ...]:
        return self.names or tuple(f"{self.name}.{i}" for i in range(self.size))


@dataclass(frozen=True)
class Camera:
    name: str
    height: int
    width: int


@dataclass(frozen=True)
class EmbodimentSpec:
    name: str
    fps: float
    action: tuple[DofGroup, ...]
    state: tuple[DofGroup, ...]
    cameras: tuple[Camera, ...] = ()
    description: str = ""

    @property
    def action_dim(self) -> int:
        return sum(g.size for g in self.action)

    @property
    def state_dim(self) -> int:
        return sum(g.size for g in self.state)

    @property
    def action_names(self) -> list[str]:
        return [n for g in self.action for n in g.dim_names]

    @property
    def state_names(self) -> list[str]:
        return [n for g in self.state for n in g.dim_names]

    def action_limits(self) -> tuple[np.ndarray, np.ndarray]:
        """(lower, upper) over the native action vector; +-inf where unbounded."""
        return _limits(self.action)

    def state_limits(self) -> tuple[np.ndarray, np.ndarray]:
        return _limits(self.state)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "fps": self.fps,
            "cameras": [{"name": c.name, "height": c.height, "width": c.width} for c in self.cameras],
            "action": [_group_to_dict(g) for g in self.action],
            "state": [_group_to_dict(g) for g in self.state],
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> EmbodimentSpec:
        return _parse_spec(data, source)

    @classmethod
    def from_file(cls, path: str | Path) -> EmbodimentSpec:
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise SpecError(f"{path}: cannot read embodiment spec: {e}") from e
        try:
            data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (json.JSONDecodeError, yaml.YAMLError) as e:
            raise SpecError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}") from e
        return _parse_spec(data, str(path))

    def save(self, path: str | Path) -> None:
        path = Path(path)
        d = self.to_dict()
        text = json.dumps(d, indent=2) if path.suffix == ".json" else yaml.safe_dump(d, sort_keys=False)
        path.write_text(text)


def _limits(groups: Sequence[DofGroup]) -> tuple[np.ndarray, np.ndarray]:
    lower = np.array([v for g in groups for v in g.lower], dtype=np.float64)
    upper = np.array([v for g in groups for v in g.upper], dtype=np.float64)
    return lower, upper


def _group_to_dict(g: DofGroup) -> dict[str, Any]:
    d: dict[str, Any] = {
        "name": g.name,
        "kind": g.kind,
        "size": g.size,
        "units": g.units,
        "mode": g.mode,
        "lower": [None if math.isinf(v) else v for v in g.lower],
        "upper": [None if math.isinf(v) else v for v in g.upper],
    }
    if g.offset is not None:
        d["offset"] = g.offset
    if g.names:
        d["names"] = list(g.names)
    return d


# ----------------------------------------------------------------------------------------------
# Parsing with errors that name the field


def _field(d: Mapping[str, Any], key: str, where: str, types: type | tuple[type, ...], default: Any = ...):
    if key not in d:
        if default is ...:
            raise SpecError(f"{where}: missing required field '{key}'")
        return default
    value = d[key]
    if isinstance(value, bool) and bool not in (types if isinstance(types, tuple) else (types,)):
        raise SpecError(f"{where}.{key}: expected {_type_names(types)}, got a boolean")
    if not isinstance(value, types):
        raise SpecError(f"{where}.{key}: expected {_type_names(types)}, got {type(value).__name__} {value!r}")
    return value


def _type_names(types: type | tuple[type, ...]) -> str:
    ts = types if isinstance(types, tuple) else (types,)
    return " or ".join({"str": "a string", "int": "an integer", "float": "a number", "list": "a list",
                        "dict": "a mapping", "NoneType": "null"}.get(t.__name__, t.__name__) for t in ts)


def _bound(value: Any, size: int, where: str, default: float) -> tuple[float, ...]:
    """A limit is null (unbounded), one number for every dimension, or a list of `size` numbers."""
    if value is None:
        return (default,) * size
    values = value if isinstance(value, list) else [value] * size
    if len(values) != size:
        raise SpecError(f"{where}: expected {size} values (the group's size), got {len(values)}")
    out = []
    for i, v in enumerate(values):
        if v is None:
            out.append(default)
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v):
            out.append(float(v))
        else:
            raise SpecError(f"{where}[{i}]: expected a number or null, got {v!r}")
    return tuple(out)


def _parse_group(d: Any, where: str) -> DofGroup:
    if not isinstance(d, dict):
        raise SpecError(f"{where}: expected a mapping with name/kind/size/units, got {type(d).__name__}")
    known = {"name", "kind", "size", "units", "mode", "lower", "upper", "offset", "names"}
    unknown = sorted(set(d) - known)
    if unknown:
        raise SpecError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(known)}")
    name = _field(d, "name", where, str)
    where = f"{where}({name})"
    kind = _field(d, "kind", where, str)
    size = _field(d, "size", where, int)
    if size < 1:
        raise SpecError(f"{where}.size: expected a positive integer, got {size}")
    units = _field(d, "units", where, str)
    mode = _field(d, "mode", where, str, "absolute")
    if mode not in CONTROL_MODES:
        raise SpecError(f"{where}.mode: expected one of {list(CONTROL_MODES)}, got {mode!r}")
    lower = _bound(d.get("lower"), size, f"{where}.lower", -math.inf)
    upper = _bound(d.get("upper"), size, f"{where}.upper", math.inf)
    for i, (lo, hi) in enumerate(zip(lower, upper, strict=True)):
        if lo > hi:
            raise SpecError(f"{where}: lower[{i}]={lo} is above upper[{i}]={hi}")
    offset = _field(d, "offset", where, (int, type(None)), None)
    if offset is not None and offset < 0:
        raise SpecError(f"{where}.offset: expected a non-negative integer, got {offset}")
    names = _field(d, "names", where, (list, type(None)), None) or []
    if names and (len(names) != size or not all(isinstance(n, str) for n in names)):
        raise SpecError(f"{where}.names: expected {size} strings, got {names!r}")
    return DofGroup(name, kind, size, units, lower, upper, mode, offset, tuple(names))  # type: ignore[arg-type]


def _parse_spec(data: Any, source: str) -> EmbodimentSpec:
    if not isinstance(data, dict):
        raise SpecError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    known = {"name", "description", "fps", "cameras", "action", "state"}
    unknown = sorted(set(data) - known)
    if unknown:
        raise SpecError(f"{source}: unknown field(s) {unknown}; allowed: {sorted(known)}")
    name = _field(data, "name", source, str)
    where = f"{source}: embodiment '{name}'"
    fps = _field(data, "fps", where, (int, float))
    if not fps > 0:
        raise SpecError(f"{where}.fps: expected a positive number, got {fps}")
    groups: dict[str, tuple[DofGroup, ...]] = {}
    for part in ("action", "state"):
        items = _field(data, part, where, list)
        if not items:
            raise SpecError(f"{where}.{part}: expected at least one group")
        groups[part] = tuple(_parse_group(g, f"{where}.{part}[{i}]") for i, g in enumerate(items))
        seen: set[str] = set()
        for g in groups[part]:
            if g.name in seen:
                raise SpecError(f"{where}.{part}: group name '{g.name}' appears twice")
            seen.add(g.name)
    cameras = []
    for i, c in enumerate(_field(data, "cameras", where, list, [])):
        cw = f"{where}.cameras[{i}]"
        if not isinstance(c, dict):
            raise SpecError(f"{cw}: expected a mapping with name/height/width")
        cam = Camera(_field(c, "name", cw, str), _field(c, "height", cw, int), _field(c, "width", cw, int))
        if cam.height < 1 or cam.width < 1:
            raise SpecError(f"{cw}: height and width must be positive, got {cam.height}x{cam.width}")
        cameras.append(cam)
    spec = EmbodimentSpec(
        name=name,
        fps=float(fps),
        action=groups["action"],
        state=groups["state"],
        cameras=tuple(cameras),
        description=_field(data, "description", where, str, ""),
    )
    try:  # the spec must fit the unified space on its own
        UnifiedSpace.for_specs([spec])
    except SpecError as e:
        raise SpecError(f"{source}: {e}") from None
    return spec


# ----------------------------------------------------------------------------------------------
# The unified space


@dataclass(frozen=True)
class SlotMap:
    """How one robot's native vector sits in the unified vector: a lossless scatter / gather."""

    index: np.ndarray  # (native_dim,) int64: unified slot of each native dimension
    unified_dim: int

    @property
    def native_dim(self) -> int:
        return len(self.index)

    @property
    def mask(self) -> np.ndarray:
        """(unified_dim,) bool: True where this robot has a DoF."""
        m = np.zeros(self.unified_dim, dtype=bool)
        m[self.index] = True
        return m

    def to_unified(self, native: Any, fill: float = 0.0) -> Any:
        """(..., native_dim) -> (..., unified_dim); numpy arrays or torch tensors."""
        if native.shape[-1] != self.native_dim:
            raise ValueError(f"expected a native vector of size {self.native_dim}, got shape {tuple(native.shape)}")
        shape = (*native.shape[:-1], self.unified_dim)
        if isinstance(native, np.ndarray):
            out = np.full(shape, fill, dtype=native.dtype)
            out[..., self.index] = native
            return out
        import torch

        out = torch.full(shape, fill, dtype=native.dtype, device=native.device)
        out[..., torch.as_tensor(self.index, device=native.device)] = native
        return out

    def from_unified(self, unified: Any) -> Any:
        """(..., unified_dim) -> (..., native_dim)."""
        if unified.shape[-1] != self.unified_dim:
            raise ValueError(f"expected a unified vector of size {self.unified_dim}, got shape {tuple(unified.shape)}")
        if isinstance(unified, np.ndarray):
            return unified[..., self.index]
        import torch

        return unified[..., torch.as_tensor(self.index, device=unified.device)]


@dataclass(frozen=True)
class UnifiedSpace:
    """Kinds and their slot counts, in vector order: the known kinds, then extra kinds as they appeared."""

    kinds: tuple[tuple[str, int], ...] = field(default_factory=lambda: tuple(KNOWN_KINDS.items()))

    @property
    def dim(self) -> int:
        return sum(n for _, n in self.kinds)

    def block(self, kind: str) -> slice:
        start = 0
        for k, n in self.kinds:
            if k == kind:
                return slice(start, start + n)
            start += n
        raise KeyError(f"kind '{kind}' is not in this unified space; it has {[k for k, _ in self.kinds]}")

    def slot_names(self) -> list[str]:
        return [f"{k}.{i}" for k, n in self.kinds for i in range(n)]

    @classmethod
    def for_specs(cls, specs: Iterable[EmbodimentSpec], base: UnifiedSpace | None = None) -> UnifiedSpace:
        """The smallest extension of `base` (default: the known kinds) that fits every spec.

        Extra kinds are appended in order of first appearance, so a space extended for a new robot
        keeps every existing slot where it was.
        """
        specs = list(specs)  # iterated twice below; a one-shot iterator would skip the overlap check
        fixed = dict((base or cls()).kinds)  # kinds whose slot counts may not change
        kinds = dict(fixed)
        for spec in specs:
            for part in ("action", "state"):
                for kind, need in _slots_needed(getattr(spec, part)).items():
                    if kind in fixed and need > fixed[kind]:
                        raise SpecError(
                            f"embodiment '{spec.name}' {part}: kind '{kind}' needs {need} slots, "
                            f"the unified space has {fixed[kind]}"
                        )
                    if kind not in fixed:
                        kinds[kind] = max(kinds.get(kind, 0), need)
        space = cls(tuple(kinds.items()))
        for spec in specs:  # overlaps are caught here
            space.action_map(spec)
            space.state_map(spec)
        return space

    def action_map(self, spec: EmbodimentSpec) -> SlotMap:
        return self._map(spec, "action")

    def state_map(self, spec: EmbodimentSpec) -> SlotMap:
        return self._map(spec, "state")

    def _map(self, spec: EmbodimentSpec, part: str) -> SlotMap:
        index: list[int] = []
        taken: dict[int, str] = {}
        for g, start in _placements(getattr(spec, part)):
            block = self.block(g.kind)
            if start + g.size > block.stop - block.start:
                raise SpecError(
                    f"embodiment '{spec.name}' {part} group '{g.name}' (kind '{g.kind}', size {g.size} at "
                    f"offset {start}) overflows the {block.stop - block.start} slots of kind '{g.kind}'"
                )
            for i in range(g.size):
                slot = block.start + start + i
                if slot in taken:
                    raise SpecError(
                        f"embodiment '{spec.name}' {part} groups '{taken[slot]}' and '{g.name}' both use "
                        f"slot {start + i} of kind '{g.kind}'"
                    )
                taken[slot] = g.name
                index.append(slot)
        return SlotMap(np.asarray(index, dtype=np.int64), self.dim)

    def to_dict(self) -> dict[str, Any]:
        return {"kinds": [[k, n] for k, n in self.kinds]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> UnifiedSpace:
        return cls(tuple((str(k), int(n)) for k, n in d["kinds"]))


def _placements(groups: Sequence[DofGroup]) -> list[tuple[DofGroup, int]]:
    """Each group with its first slot inside its kind's block (explicit offset, else packed)."""
    cursor: dict[str, int] = {}
    out = []
    for g in groups:
        start = g.offset if g.offset is not None else cursor.get(g.kind, 0)
        cursor[g.kind] = max(cursor.get(g.kind, 0), start + g.size)
        out.append((g, start))
    return out


def _slots_needed(groups: Sequence[DofGroup]) -> dict[str, int]:
    need: dict[str, int] = {}
    for g, start in _placements(groups):
        need[g.kind] = max(need.get(g.kind, 0), start + g.size)
    return need


# ----------------------------------------------------------------------------------------------
# Built-in embodiments


def builtin_names() -> list[str]:
    files = resources.files("physis.embodiments").iterdir()
    return sorted(f.name.removesuffix(".yaml") for f in files if f.name.endswith(".yaml"))


def load_embodiment(name_or_path: str | Path) -> EmbodimentSpec:
    """A built-in spec by name (`metaworld_sawyer`) or a user's spec from a YAML/JSON file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml", ".json"):
        return EmbodimentSpec.from_file(path)
    name = str(name_or_path)
    if name not in builtin_names():
        raise SpecError(f"unknown embodiment '{name}'; built-in: {builtin_names()}; or pass a .yaml/.json path")
    resource = resources.files("physis.embodiments") / f"{name}.yaml"
    return EmbodimentSpec.from_dict(yaml.safe_load(resource.read_text()), source=f"builtin:{name}")
