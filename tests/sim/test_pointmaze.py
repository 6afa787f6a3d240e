"""PointMaze bimodal: the start/goal pairs really have two shortest routes, and the expert really takes both."""

from __future__ import annotations

import collections
import os

import numpy as np
import pytest

os.environ.setdefault("MUJOCO_GL", "egl")
pytest.importorskip("gymnasium_robotics")

from gymnasium_robotics.envs.maze.maps import MEDIUM_MAZE  # noqa: E402

from physis.sim.base import EnvConfig  # noqa: E402
from physis.sim.pointmaze import GOAL_LABEL, PointMazeBimodalEnv, bimodal_pair, bimodal_pairs  # noqa: E402
from physis.sim.seeds import eval_seeds, train_seeds  # noqa: E402
from physis.sim.suites import make_env  # noqa: E402

Cell = tuple[int, int]


# --- an independent brute force: plain depth-first enumeration, and enclosure by flood fill ------------
def _free(maze: list[list[int]]) -> set[Cell]:
    return {(i, j) for i, row in enumerate(maze) for j, v in enumerate(row) if v != 1}


def _all_shortest_paths(free: set[Cell], start: Cell, goal: Cell) -> list[tuple[Cell, ...]]:
    """Every simple path from start to goal, keeping those of the smallest length."""
    best: list[tuple[Cell, ...]] = []

    def walk(path: list[Cell]) -> None:
        nonlocal best
        if best and len(path) > len(best[0]):
            return
        c = path[-1]
        if c == goal:
            best = [tuple(path)] if not best or len(path) < len(best[0]) else [*best, tuple(path)]
            return
        for n in ((c[0] + 1, c[1]), (c[0] - 1, c[1]), (c[0], c[1] + 1), (c[0], c[1] - 1)):
            if n in free and n not in path:
                walk([*path, n])

    walk([start])
    return best


def _encloses_wall(maze: list[list[int]], a: tuple[Cell, ...], b: tuple[Cell, ...]) -> bool:
    """Flood the grid (8-connected, from outside it) around the cells of both paths: a wall left dry is
    surrounded by them, so the two paths pass it on different sides."""
    h, w = len(maze), len(maze[0])
    barrier = set(a) | set(b)
    seen: set[Cell] = set()
    stack = [(i, j) for i in range(-1, h + 1) for j in (-1, w)] + [(i, j) for j in range(w) for i in (-1, h)]
    while stack:
        c = stack.pop()
        if c in seen or c in barrier or not (-1 <= c[0] <= h and -1 <= c[1] <= w):
            continue
        seen.add(c)
        stack += [(c[0] + di, c[1] + dj) for di in (-1, 0, 1) for dj in (-1, 0, 1)]
    return any(maze[i][j] == 1 and (i, j) not in seen for i in range(h) for j in range(w))


def test_listed_pairs_have_two_shortest_routes_around_a_wall() -> None:
    free = _free(MEDIUM_MAZE)
    pairs = bimodal_pairs(MEDIUM_MAZE)
    assert len(pairs) >= 10
    for pair in pairs:
        shortest = _all_shortest_paths(free, pair.start, pair.goal)
        assert len(shortest) >= 2, (pair.start, pair.goal)
        assert len(pair.routes) >= 2
        for route in pair.routes:
            assert route.cells in shortest  # a real, shortest route
        a, b = pair.routes[0].cells, pair.routes[1].cells
        assert a[1] != b[1], "the routes must split at the start"
        assert _encloses_wall(MEDIUM_MAZE, a, b), "the routes must pass a wall on different sides"
        assert len({r.side for r in pair.routes}) == len(pair.routes)


def test_pairs_match_the_brute_force_definition() -> None:
    """A pair is listed iff some two shortest routes go around a wall differently, and every two that do
    already differ in their first move."""
    free = _free(MEDIUM_MAZE)
    expected = set()
    for s in sorted(free):
        for g in sorted(free - {s}):
            paths = _all_shortest_paths(free, s, g)
            apart = [(p, q) for i, p in enumerate(paths) for q in paths[i + 1:] if _encloses_wall(MEDIUM_MAZE, p, q)]
            if apart and all(p[1] != q[1] for p, q in apart):
                expected.add((s, g))
    assert {(p.start, p.goal) for p in bimodal_pairs(MEDIUM_MAZE)} == expected


def test_staircases_in_an_open_room_are_not_bimodal() -> None:
    free = _free(MEDIUM_MAZE)
    assert len(_all_shortest_paths(free, (1, 1), (2, 2))) == 2  # two zigzags through the open 2x2 room
    assert bimodal_pair(MEDIUM_MAZE, (1, 1), (2, 2)) is None


def test_routes_are_named_by_their_side_of_the_wall() -> None:
    pair = bimodal_pair(MEDIUM_MAZE, (4, 4), (5, 1))
    assert pair is not None
    assert {r.side: r.cells[1] for r in pair.routes} == {"upper": (3, 4), "lower": (5, 4)}
    assert {r.label for r in pair.routes} == {"take the upper route", "take the lower route"}


def _red_and_green(img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    r, g, b = (img[..., k].astype(int) for k in range(3))
    return (r > 180) & (g < 90) & (b < 90), (g > 180) & (r < 150) & (b < 150)


def test_env_constructs_resets_steps_and_renders() -> None:
    env = make_env("pointmaze/bimodal", config=EnvConfig(image_size=32, max_steps=5))
    try:
        assert isinstance(env, PointMazeBimodalEnv) and env.suite == "pointmaze/bimodal"
        obs, info = env.reset(seed=train_seeds(1)[0])
        img = obs["images"]["top"]
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        assert set(obs["state"]) == {"pos", "vel"} and all(v.shape == (2,) for v in obs["state"].values())
        assert obs["instruction"] == "go to the red goal" and not info["success"]
        assert env.xy_cell(obs["state"]["pos"]) == env.pair.start
        # The goal is drawn where it is (top of the image = top row of the maze), and the ball is drawn too.
        red, green = _red_and_green(img)
        assert red.any() and green.any()
        rows, cols = np.nonzero(red)
        extent = 8.2  # metres shown top to bottom
        xy = np.array([(cols.mean() + 0.5) / 32 - 0.5, 0.5 - (rows.mean() + 0.5) / 32]) * extent
        assert env.xy_cell(xy) == env.pair.goal
        for t in range(5):
            obs, _, terminated, truncated, _ = env.step(np.array([1.0, 0.0]))
            assert not terminated and truncated == (t == 4)
        assert obs["state"]["vel"][0] > 0.5
    finally:
        env.close()


def test_reset_is_deterministic_per_seed() -> None:
    env = PointMazeBimodalEnv(config=EnvConfig(render=False))
    expert = env.expert()
    runs = []
    for _ in range(2):
        obs, _ = env.reset(seed=123)
        expert.reset()
        runs.append((env.pair, obs["state"]["pos"].tolist(), env.goal_pos.tolist(), expert.route))
    assert runs[0] == runs[1]
    env.close()


def _rollout(env: PointMazeBimodalEnv, seed: int) -> tuple[bool, list[str], set[Cell], str]:
    expert = env.expert()
    obs, _ = env.reset(seed=seed)
    expert.reset()
    labels, visited = [], {env.xy_cell(env.ball_pos)}
    for _ in range(env.max_steps):
        action, label = expert.act(obs)
        labels.append(label)
        obs, _, terminated, truncated, info = env.step(action)
        visited.add(env.xy_cell(env.ball_pos))
        if terminated or truncated:
            break
    return bool(info["success"]), labels, visited, expert.route.side


def test_expert_solves_eval_seeds() -> None:
    env = PointMazeBimodalEnv(config=EnvConfig(render=False))
    for seed in eval_seeds(3):
        success, labels, visited, _ = _rollout(env, seed)
        assert success, seed
        route_labels = {r.label for r in env.pair.routes}
        assert labels[0] in route_labels and labels[-1] == GOAL_LABEL
        assert set(labels) <= route_labels | {GOAL_LABEL}
        assert set(visited) <= _free(MEDIUM_MAZE)
    env.close()


def test_expert_takes_both_routes_from_the_same_start() -> None:
    pair = bimodal_pair(MEDIUM_MAZE, (4, 2), (5, 3))
    assert pair is not None
    env = PointMazeBimodalEnv(config=EnvConfig(render=False), pairs=[pair])
    taken: collections.Counter[str] = collections.Counter()
    for seed in train_seeds(20):
        success, _, visited, side = _rollout(env, seed)
        assert success, seed
        # The ball physically went the way the expert chose: through that route's cells (success may come
        # just before the goal cell), and through none of the other route's own cells.
        mine = next(r for r in pair.routes if r.side == side)
        other = next(r for r in pair.routes if r.side != side)
        assert set(mine.cells[:-1]) <= visited and not (set(other.cells) - set(mine.cells)) & visited
        taken[side] += 1
    env.close()
    assert set(taken) == {r.side for r in pair.routes}, taken
    assert min(taken.values()) >= 4, taken  # near uniform, not a rare exception


def test_environment_state_is_the_goal_position() -> None:
    env = PointMazeBimodalEnv(config=EnvConfig(render=False))
    try:
        env.reset(seed=train_seeds(1)[0])
        state = env.environment_state()
        assert state.dtype == np.float32 and state.shape == (2,)
        np.testing.assert_allclose(state, env.goal_pos, atol=1e-6)
        assert env.xy_cell(state) == env.pair.goal
    finally:
        env.close()
