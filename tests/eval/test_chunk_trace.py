"""`physis eval --traces N`: the first N episodes of each task, chunk by chunk, beside the simulator's truth."""

from __future__ import annotations

import json

import pytest

from physis.eval.runner import EvalConfig, evaluate


@pytest.mark.parametrize("execution", ["open_loop", "rtc"])
def test_traces_log_every_planned_chunk_of_the_first_episodes(localizer_run, tmp_path, execution) -> None:
    cfg = EvalConfig(suite="metaworld/mt10", tasks=("reach-v3",), episodes=2, out=tmp_path, checkpoint=localizer_run,
                     workers=1, image_size=32, max_steps=12, videos=0, traces=1, replan_every=4,
                     execution=execution, progress=False)
    results = evaluate(cfg)
    assert results["traces"] == 1
    files = sorted((tmp_path / "traces").iterdir())
    assert [f.name for f in files] == ["reach-v3_seed1000000.jsonl"]  # the first episode only
    rows = [json.loads(line) for line in files[0].read_text().splitlines()]
    chunks, last = rows[:-1], rows[-1]["episode"]
    assert last["seed"] == 1_000_000 and last["length"] == 12 and last["error"] is None
    assert [r["step"] for r in chunks] == [0, 4, 8]  # a chunk planned every 4 of the 12 steps
    first = chunks[0]
    assert len(first["state"]) == 4 and len(first["action"]) == 4  # eef_pos + gripper; the Sawyer's 4 actions
    assert set(first["environment_state"]) >= {"object_x", "goal_z"}  # the simulator's truth
    assert set(first["estimate"]) == {"object_x", "object_y", "object_z", "goal_x", "goal_y", "goal_z",
                                      *(f"{n}-robot" for n in ("object_x", "object_y", "object_z", "goal_x",
                                                               "goal_y", "goal_z"))}


def test_a_negative_trace_count_is_refused(tiny_checkpoint, tmp_path) -> None:
    with pytest.raises(ValueError, match="--traces must be >= 0"):
        evaluate(EvalConfig(suite="metaworld/mt10", tasks=("reach-v3",), episodes=1, out=tmp_path,
                            checkpoint=tiny_checkpoint, traces=-1, progress=False))


def test_an_episode_plays_the_same_whichever_episodes_its_worker_ran_before(tiny_checkpoint, tmp_path) -> None:
    def actions_of_seed_1_000_001(first: int, episodes: int, out) -> list:
        cfg = EvalConfig(suite="metaworld/mt10", tasks=("reach-v3",), episodes=episodes, seed=first, out=out,
                         checkpoint=tiny_checkpoint, workers=1, image_size=32, max_steps=10, videos=0,
                         traces=episodes, replan_every=4, progress=False)
        evaluate(cfg)
        rows = (out / "traces" / "reach-v3_seed1000001.jsonl").read_text().splitlines()
        return [json.loads(line)["action"] for line in rows[:-1]]

    after_another = actions_of_seed_1_000_001(0, 2, tmp_path / "a")  # seed 1,000,000 ran first in this process
    alone = actions_of_seed_1_000_001(1, 1, tmp_path / "b")
    assert after_another == alone
