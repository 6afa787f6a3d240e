"""eval-heads refuses held-out data it cannot read the way the checkpoint was trained."""

from __future__ import annotations

from pathlib import Path

import pytest

from physis.eval.heads import _check_cameras


def test_held_out_data_with_other_cameras_is_refused() -> None:
    trained = {"metaworld_sawyer": ["front", "gripper"]}
    _check_cameras(trained, {"metaworld_sawyer": ["front", "gripper"]}, Path("demos"))
    with pytest.raises(ValueError, match=r"cameras \['corner', 'gripper'\].*trained on \['front', 'gripper'\]"):
        _check_cameras(trained, {"metaworld_sawyer": ["corner", "gripper"]}, Path("demos"))
