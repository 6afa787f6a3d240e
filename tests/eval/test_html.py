"""report.html pieces that read results.json: the rollout captions."""

from physis.eval.html import _videos


def _results(distances):
    task = {"videos": ["videos/reach-v3_seed1000000.mp4", "videos/reach-v3_seed1000001.mp4"],
            "seeds": [1000000, 1000001], "episode_success": [False, True], "episode_length": [500, 41]}
    if distances is not None:
        task["episode_goal_distance"] = distances
    return {"tasks": {"reach-v3": task}}


def _write_videos(root):
    (root / "videos").mkdir()
    for seed in (1000000, 1000001):
        (root / "videos" / f"reach-v3_seed{seed}.mp4").write_bytes(b"not a real video")  # no poster, still shown


def test_a_failed_rollout_says_how_far_from_the_goal_it_ended(tmp_path):
    _write_videos(tmp_path)
    html = _videos(_results([0.1817, 0.03]), tmp_path)
    assert "failed (500 steps, 0.18 m from the goal)" in html
    assert "success in 41 steps" in html


def test_suites_without_a_goal_distance_give_the_steps_alone(tmp_path):
    _write_videos(tmp_path)
    html = _videos(_results(None), tmp_path)
    assert "failed (500 steps)" in html and "from the goal" not in html
