"""Tests for physis.embodiment: specs as data, the unified space, and errors that name the field."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import yaml

from physis.embodiment import (
    KNOWN_KINDS,
    DofGroup,
    EmbodimentSpec,
    SpecError,
    UnifiedSpace,
    builtin_names,
    load_embodiment,
)

EXPECTED_DIMS = {  # name -> (action_dim, state_dim)
    "metaworld_sawyer": (4, 4),
    "fetch": (4, 10),
    "shadow_hand": (20, 78),
    "pointmaze": (2, 4),
    "pusht": (2, 2),
    "aloha": (14, 14),
    "adroit_hand": (33, 66),
}


@pytest.fixture(scope="module")
def builtins() -> dict[str, EmbodimentSpec]:
    return {n: load_embodiment(n) for n in builtin_names()}


@pytest.fixture(scope="module")
def space(builtins) -> UnifiedSpace:
    return UnifiedSpace.for_specs(list(builtins.values()))


def _spec_dict(**overrides) -> dict:
    """A small valid spec as a dict; keyword arguments replace top-level fields."""
    d = {
        "name": "toy",
        "fps": 20,
        "cameras": [{"name": "top", "height": 64, "width": 64}],
        "action": [
            {"name": "arm", "kind": "eef_pos", "size": 3, "units": "m", "mode": "delta", "lower": -1, "upper": 1},
            {"name": "grip", "kind": "gripper", "size": 1, "units": "normalized", "lower": 0, "upper": 1},
        ],
        "state": [{"name": "pos", "kind": "eef_pos", "size": 3, "units": "m"}],
    }
    d.update(overrides)
    return d


def _group(**overrides) -> dict:
    g = {"name": "arm", "kind": "joints", "size": 2, "units": "rad"}
    g.update(overrides)
    return g


# ----------------------------------------------------------------------------------------------
# Built-in specs


def test_builtin_names_are_the_shipped_specs():
    assert builtin_names() == sorted(EXPECTED_DIMS)


@pytest.mark.parametrize("name", sorted(EXPECTED_DIMS))
def test_builtin_loads_with_expected_dims(name):
    spec = load_embodiment(name)
    assert spec.name == name
    assert (spec.action_dim, spec.state_dim) == EXPECTED_DIMS[name]
    assert len(spec.action_names) == spec.action_dim
    assert len(spec.state_names) == spec.state_dim
    assert spec.fps > 0


def test_builtin_details():
    sawyer = load_embodiment("metaworld_sawyer")
    assert sawyer.fps == 80.0
    assert sawyer.action_names == ["dx", "dy", "dz", "grip"]
    assert [c.name for c in sawyer.cameras] == ["corner", "gripper"]
    assert sawyer.action[0].mode == "delta" and sawyer.action[1].mode == "absolute"
    hand = load_embodiment("shadow_hand")
    assert hand.state_names[:2] == ["joint_pos.0", "joint_pos.1"]
    assert hand.state_names[-1] == "target_fingertip_pos.14"


# ----------------------------------------------------------------------------------------------
# The unified space


def test_space_for_all_builtins(space):
    assert space.kinds[: len(KNOWN_KINDS)] == tuple(KNOWN_KINDS.items())
    # extra kinds in order of first appearance over the specs in name order (adroit_hand comes first)
    assert space.kinds[len(KNOWN_KINDS):] == (
        ("eef_vel", 3), ("joint_vel", 6), ("hand_joint_vel", 24), ("gripper_vel", 2), ("planar_vel", 2),
        ("fingertip_pos", 15), ("fingertip_goal", 15),
    )
    assert space.dim == 130 == len(space.slot_names())
    assert space.block("eef_pos") == slice(0, 6)
    assert space.block("gripper") == slice(32, 34)
    assert space.slot_names()[32] == "gripper.0"
    with pytest.raises(KeyError, match="tactile"):
        space.block("tactile")


@pytest.mark.parametrize("name", sorted(EXPECTED_DIMS))
@pytest.mark.parametrize("part", ["action", "state"])
def test_round_trip_numpy(space, builtins, name, part):
    spec = builtins[name]
    slot_map = getattr(space, f"{part}_map")(spec)
    n = EXPECTED_DIMS[name][0 if part == "action" else 1]
    assert slot_map.native_dim == n
    assert slot_map.unified_dim == space.dim
    mask = slot_map.mask
    assert mask.shape == (space.dim,) and mask.dtype == bool
    assert int(mask.sum()) == n

    rng = np.random.default_rng(0)
    native = rng.standard_normal((5, 7, n)).astype(np.float32) + 1.0  # never exactly 0
    unified = slot_map.to_unified(native)
    assert unified.shape == (5, 7, space.dim) and unified.dtype == np.float32
    assert np.all(unified[..., ~mask] == 0.0)
    assert np.all(unified[..., mask] != 0.0)
    back = slot_map.from_unified(unified)
    assert back.dtype == np.float32
    np.testing.assert_array_equal(back, native)


@pytest.mark.parametrize("name", sorted(EXPECTED_DIMS))
@pytest.mark.parametrize("part", ["action", "state"])
def test_round_trip_torch(space, builtins, name, part):
    spec = builtins[name]
    slot_map = getattr(space, f"{part}_map")(spec)
    n = slot_map.native_dim
    gen = torch.Generator().manual_seed(0)
    native = torch.rand((5, 7, n), generator=gen) + 1.0
    unified = slot_map.to_unified(native)
    assert isinstance(unified, torch.Tensor)
    assert unified.shape == (5, 7, space.dim) and unified.dtype == torch.float32
    mask = torch.from_numpy(slot_map.mask)
    assert int(mask.sum()) == n
    assert torch.all(unified[..., ~mask] == 0)
    assert torch.equal(slot_map.from_unified(unified), native)


def test_to_unified_fill_and_shape_errors(space, builtins):
    m = space.action_map(builtins["pusht"])
    u = m.to_unified(np.array([3.0, 4.0]), fill=np.nan)
    assert np.isnan(u).sum() == space.dim - 2
    np.testing.assert_array_equal(u[m.mask], [3.0, 4.0])
    with pytest.raises(ValueError, match="size 2"):
        m.to_unified(np.zeros(3))
    with pytest.raises(ValueError, match=f"size {space.dim}"):
        m.from_unified(np.zeros(space.dim - 1))


def test_known_slots_line_up_across_robots(space, builtins):
    eef = space.block("eef_pos").start
    grip = space.block("gripper").start
    for name in ("metaworld_sawyer", "fetch"):
        idx = space.action_map(builtins[name]).index.tolist()
        assert idx == [eef, eef + 1, eef + 2, grip], name
    sawyer_state = space.state_map(builtins["metaworld_sawyer"]).index.tolist()
    fetch_state = space.state_map(builtins["fetch"]).index.tolist()
    assert sawyer_state[:3] == fetch_state[:3] == [eef, eef + 1, eef + 2]
    # pushT and pointmaze share the planar block
    planar = space.block("planar").start
    assert space.action_map(builtins["pusht"]).index.tolist() == [planar, planar + 1]
    assert space.action_map(builtins["pointmaze"]).index.tolist() == [planar, planar + 1]


def test_aloha_right_arm_at_explicit_offset(space, builtins):
    aloha = builtins["aloha"]
    assert [g.offset for g in aloha.action] == [None, None, 7, None]
    joints = space.block("joints").start
    grip = space.block("gripper").start
    idx = space.action_map(aloha).index.tolist()
    assert idx[:6] == list(range(joints, joints + 6))  # left arm: joints slots 0-5
    assert idx[6] == grip  # left gripper
    assert idx[7:13] == list(range(joints + 7, joints + 13))  # right arm: joints slots 7-12
    assert idx[13] == grip + 1  # right gripper packs after the left one
    assert space.state_map(aloha).index.tolist() == idx


def test_extra_kinds_appended_after_known():
    spec = EmbodimentSpec.from_dict(_spec_dict(state=[
        {"name": "pos", "kind": "eef_pos", "size": 3, "units": "m"},
        {"name": "touch", "kind": "tactile", "size": 5, "units": "N"},
        {"name": "temp", "kind": "temperature", "size": 1, "units": "C"},
    ]))
    space = UnifiedSpace.for_specs([spec])
    known_dim = sum(KNOWN_KINDS.values())
    assert space.kinds == (*KNOWN_KINDS.items(), ("tactile", 5), ("temperature", 1))
    assert space.block("tactile") == slice(known_dim, known_dim + 5)
    assert space.block("temperature") == slice(known_dim + 5, known_dim + 6)
    assert space.state_map(spec).index.tolist() == [0, 1, 2, *range(known_dim, known_dim + 6)]


def test_extend_space_keeps_existing_slots(space, builtins):
    new = EmbodimentSpec.from_dict(_spec_dict(name="newbot", state=[
        {"name": "touch", "kind": "tactile", "size": 4, "units": "N"},
        {"name": "vel", "kind": "eef_vel", "size": 3, "units": "m/s"},
        {"name": "j", "kind": "joints", "size": 7, "units": "rad"},
    ]))
    extended = UnifiedSpace.for_specs([new], base=space)
    assert extended.kinds == (*space.kinds, ("tactile", 4))
    assert extended.dim == space.dim + 4
    assert extended.slot_names()[: space.dim] == space.slot_names()
    for name, spec in builtins.items():
        for part in ("action", "state"):
            old = getattr(space, f"{part}_map")(spec)
            now = getattr(extended, f"{part}_map")(spec)
            np.testing.assert_array_equal(now.index, old.index, err_msg=f"{name} {part}")
            np.testing.assert_array_equal(now.mask[: space.dim], old.mask)
            assert not now.mask[space.dim:].any()
    assert extended.state_map(new).index.tolist()[:4] == list(range(space.dim, space.dim + 4))


def test_extend_space_cannot_grow_fixed_kind(space):
    # 'eef_vel' has 3 slots in the base; a spec needing 6 must not silently resize it
    spec = EmbodimentSpec.from_dict(_spec_dict(state=[{"name": "v", "kind": "eef_vel", "size": 6, "units": "m/s"}]))
    with pytest.raises(SpecError, match="eef_vel"):
        UnifiedSpace.for_specs([spec], base=space)


def test_for_specs_accepts_a_generator():
    """An Iterable is documented; the overlap check must not be skipped for a one-shot generator."""
    g1 = DofGroup("a", "joints", 3, "rad", (-math.inf,) * 3, (math.inf,) * 3)
    g2 = DofGroup("b", "joints", 3, "rad", (-math.inf,) * 3, (math.inf,) * 3, offset=1)
    bad = EmbodimentSpec("bad", 10.0, action=(g1, g2), state=(g1,))
    with pytest.raises(SpecError, match="both use slot 1"):
        UnifiedSpace.for_specs([bad])
    with pytest.raises(SpecError, match="both use slot 1"):
        UnifiedSpace.for_specs(s for s in [bad])


# ----------------------------------------------------------------------------------------------
# Serialization


@pytest.mark.parametrize("name", sorted(EXPECTED_DIMS))
def test_spec_dict_round_trip(name):
    spec = load_embodiment(name)
    d = spec.to_dict()
    assert json.loads(json.dumps(d)) == d  # plain JSON-able data (inf written as null)
    assert EmbodimentSpec.from_dict(d) == spec


def test_spec_dict_keeps_offsets_names_and_infinities():
    spec = load_embodiment("aloha")
    d = spec.to_dict()
    assert d["action"][2]["offset"] == 7
    assert "offset" not in d["action"][0]
    assert d["action"][0]["names"][0] == "left_waist"
    assert d["action"][0]["lower"] == [None] * 6
    assert d["action"][1]["upper"] == [1.0]
    assert d["cameras"] == [{"name": "top", "height": 480, "width": 640}]


def test_unified_space_dict_round_trip(space):
    d = space.to_dict()
    assert d["kinds"][0] == ["eef_pos", 6]
    assert d["kinds"][-1] == ["fingertip_goal", 15]
    restored = UnifiedSpace.from_dict(json.loads(json.dumps(d)))
    assert restored == space
    assert restored.dim == 130


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_save_and_load_round_trip(tmp_path, suffix):
    spec = load_embodiment("fetch")
    path = tmp_path / f"fetch_copy{suffix}"
    spec.save(path)
    assert load_embodiment(path) == spec


def test_user_spec_from_yaml(tmp_path):
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(_spec_dict()))
    spec = load_embodiment(path)
    assert spec.name == "toy" and spec.fps == 20.0
    assert (spec.action_dim, spec.state_dim) == (4, 3)
    assert spec.action_names == ["arm.0", "arm.1", "arm.2", "grip.0"]
    lower, upper = spec.action_limits()
    np.testing.assert_array_equal(lower, [-1, -1, -1, 0])
    np.testing.assert_array_equal(upper, [1, 1, 1, 1])


def test_user_spec_from_json(tmp_path):
    path = tmp_path / "toy.json"
    path.write_text(json.dumps(_spec_dict(name="jsonbot", fps=12.5)))
    spec = load_embodiment(str(path))
    assert spec.name == "jsonbot" and spec.fps == 12.5
    assert spec.action[0].mode == "delta"
    assert spec.cameras[0].height == 64


# ----------------------------------------------------------------------------------------------
# Limits


def test_action_limits():
    lower, upper = load_embodiment("metaworld_sawyer").action_limits()
    assert lower.tolist() == [-1.0, -1.0, -1.0, -1.0]
    assert upper.tolist() == [1.0, 1.0, 1.0, 1.0]
    lower, upper = load_embodiment("pusht").action_limits()
    assert lower.tolist() == [0.0, 0.0] and upper.tolist() == [512.0, 512.0]


def test_unbounded_limits_are_infinite():
    lower, upper = load_embodiment("aloha").action_limits()
    assert lower.shape == upper.shape == (14,)
    assert np.all(np.isneginf(lower[:6])) and np.all(np.isposinf(upper[:6]))
    assert lower[6] == 0.0 and upper[6] == 1.0
    s_lower, s_upper = load_embodiment("fetch").state_limits()
    assert np.all(np.isneginf(s_lower)) and np.all(np.isposinf(s_upper))
    # a partially bounded group: null entries are unbounded
    spec = EmbodimentSpec.from_dict(_spec_dict(action=[_group(lower=[None, -2], upper=3)]))
    lower, upper = spec.action_limits()
    assert lower[0] == -math.inf and lower[1] == -2.0
    assert upper.tolist() == [3.0, 3.0]


# ----------------------------------------------------------------------------------------------
# Malformed specs


def _without(d: dict, key: str) -> dict:
    return {k: v for k, v in d.items() if k != key}


BAD_SPECS = {
    "missing_fps": (_without(_spec_dict(), "fps"), ["missing required field 'fps'"]),
    "fps_zero": (_spec_dict(fps=0), ["fps", "positive"]),
    "group_missing_kind": (
        _spec_dict(action=[_without(_group(), "kind")]), ["action[0]", "missing required field 'kind'"],
    ),
    "lower_wrong_count": (
        _spec_dict(action=[_group(lower=[0, 0, 0])]), ["action[0](arm).lower", "expected 2 values", "got 3"],
    ),
    "lower_above_upper": (_spec_dict(action=[_group(lower=[0, 2], upper=1)]), ["action[0](arm)", "lower[1]=2.0"]),
    "bad_mode": (_spec_dict(action=[_group(mode="velocity")]), ["action[0](arm).mode", "'velocity'"]),
    "unknown_top_field": (_spec_dict(colour="red"), ["unknown field(s) ['colour']"]),
    "unknown_group_field": (_spec_dict(state=[_group(colour="red")]), ["state[0]", "'colour'"]),
    "size_zero": (_spec_dict(action=[_group(size=0)]), ["action[0](arm).size", "got 0"]),
    "size_bool": (_spec_dict(action=[_group(size=True)]), ["action[0](arm).size", "boolean"]),
    "lower_not_number": (_spec_dict(action=[_group(lower=[0, "x"])]), ["action[0](arm).lower[1]", "'x'"]),
    "duplicate_group": (
        _spec_dict(state=[_group(), _group(kind="gripper", size=1)]), ["state", "'arm' appears twice"],
    ),
    "gripper_overflow": (
        _spec_dict(action=[_group(name="grip", kind="gripper", size=3)]),
        ["<dict>", "action", "kind 'gripper' needs 3 slots", "has 2"],
    ),
    "offset_overflow": (
        _spec_dict(action=[_group(offset=13)]), ["kind 'joints' needs 15 slots", "has 14"],
    ),
    "overlapping_offsets": (
        _spec_dict(action=[_group(name="a", offset=0, size=3), _group(name="b", offset=2)]),
        ["groups 'a' and 'b' both use slot 2 of kind 'joints'"],
    ),
    "negative_offset": (_spec_dict(action=[_group(offset=-1)]), ["action[0](arm).offset", "-1"]),
    "names_wrong_count": (_spec_dict(action=[_group(names=["x"])]), ["action[0](arm).names", "2 strings"]),
    "empty_action": (_spec_dict(action=[]), ["action", "at least one group"]),
    "camera_zero_height": (
        _spec_dict(cameras=[{"name": "c", "height": 0, "width": 4}]), ["cameras[0]", "0x4"],
    ),
    "top_level_list": ([1, 2], ["top level", "list"]),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_malformed_spec_names_the_field(case):
    data, fragments = BAD_SPECS[case]
    with pytest.raises(SpecError) as info:
        EmbodimentSpec.from_dict(data)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


def test_malformed_file_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(_without(_spec_dict(), "fps")))
    with pytest.raises(SpecError) as info:
        load_embodiment(path)
    assert str(path) in str(info.value) and "'fps'" in str(info.value)


def test_invalid_yaml_text(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("name: toy\naction: [unclosed\n")
    with pytest.raises(SpecError, match="not valid YAML") as info:
        load_embodiment(path)
    assert str(path) in str(info.value)


def test_invalid_json_text(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{"name": "toy",')
    with pytest.raises(SpecError, match="not valid JSON"):
        load_embodiment(path)


def test_missing_file(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(SpecError, match="cannot read embodiment spec") as info:
        load_embodiment(path)
    assert str(path) in str(info.value)


def test_unknown_builtin_lists_builtins():
    with pytest.raises(SpecError) as info:
        load_embodiment("franka_panda")
    message = str(info.value)
    assert "unknown embodiment 'franka_panda'" in message
    for name in EXPECTED_DIMS:
        assert name in message
