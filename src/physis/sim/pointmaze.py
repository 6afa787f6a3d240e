"""PointMaze bimodal: a point mass in gymnasium-robotics PointMaze Medium where every start/goal pair has two
equally short routes around a wall, and the expert takes either one at random.

This is the suite on which a deterministic regressor must fail and a distribution must not: from the same
start the demonstrations go two different ways, so a policy trained on the mean action drives into the wall
between them.

The pairs come from the maze map itself (`bimodal_pairs`). A breadth-first search that counts shortest
paths over the free cells (4-connected moves between cell centres) lists every shortest route from a start
cell to a goal cell. Two routes are *genuinely different* when the closed loop made of one route and the
other one walked backwards winds around a wall cell (non-zero winding number about that cell's centre),
i.e. they pass the wall on different sides and cannot be bent into each other without crossing it. Routes
that only differ by a staircase of zigzags through an open room enclose no wall, so they count as one. A
pair is kept when its shortest routes fall into at least two such classes *and* the classes already differ
in their first move (no first move is shared by two classes): the choice shows in the very first action.
In PointMaze Medium the only wall not joined to the outer wall is the diagonal block at cells (4, 3) and
(5, 2), which gives 26 ordered start/goal pairs.

Each reset draws one pair with the episode seed; the start and the goal are the pair's cell centres plus
gymnasium-robotics's own uniform noise of +-0.25 cell, drawn from a seed derived from the episode seed (so
the noise says nothing about which route the expert will take). The policy sees the ball's position and
velocity and a top-down image ("top") of the whole maze, where the goal is the red marker; success is the
environment's own criterion (ball within 0.45 m of the goal).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

import numpy as np

from physis.sim.base import EnvConfig, MujocoCameras, Observation, SimEnv

ENV_ID = "PointMaze_Medium-v3"
INSTRUCTIONS = (
    "go to the red goal",
    "move the ball to the red goal",
    "roll the ball to the red marker",
    "reach the red target",
    "find your way through the maze to the red goal",
)
GOAL_LABEL = "go to the goal"

Cell = tuple[int, int]  # (row, column) in the maze map, row 0 at the top
_MOVES: tuple[Cell, ...] = ((-1, 0), (1, 0), (0, -1), (0, 1))
# Compass names of the side a route passes the wall on, counter-clockwise from the right (screen up is up).
_SIDES = ("right", "upper right", "upper", "upper left", "left", "lower left", "lower", "lower right")
# Top-down view of the whole 8 x 8 m maze (walls included), orthographic so wall tops do not hide the floor.
_TOP = {"lookat": (0.0, 0.0, 0.0), "distance": 10.0, "azimuth": 90.0, "elevation": -90.0}
_TOP_EXTENT = 8.2  # metres of maze shown top to bottom


@dataclass(frozen=True)
class Route:
    """One shortest route as cell centres from the start cell to the goal cell, named by its side of the wall."""

    cells: tuple[Cell, ...]
    side: str  # e.g. "upper", "lower left"

    @property
    def label(self) -> str:
        return f"take the {self.side} route"


@dataclass(frozen=True)
class BimodalPair:
    """A start and goal cell joined by >= 2 equally short routes that pass a wall on different sides."""

    start: Cell
    goal: Cell
    routes: tuple[Route, ...]
    merge: int  # index (into every route's cells) where all routes run together again to the goal


# --- maze analysis -------------------------------------------------------------------------------------
def free_cells(maze_map: Sequence[Sequence[Any]]) -> set[Cell]:
    return {(i, j) for i, row in enumerate(maze_map) for j, v in enumerate(row) if v != 1}


def bfs(free: set[Cell], source: Cell) -> tuple[dict[Cell, int], dict[Cell, int]]:
    """Distance (in moves) and number of shortest paths from `source` to every reachable free cell."""
    dist, count = {source: 0}, {source: 1}
    queue = deque([source])
    while queue:
        c = queue.popleft()
        for di, dj in _MOVES:
            n = (c[0] + di, c[1] + dj)
            if n not in free:
                continue
            if n not in dist:
                dist[n], count[n] = dist[c] + 1, 0
                queue.append(n)
            if dist[n] == dist[c] + 1:
                count[n] += count[c]
    return dist, count


def shortest_routes(free: set[Cell], start: Cell, goal: Cell, limit: int = 10_000) -> list[tuple[Cell, ...]]:
    """Every shortest route from `start` to `goal` (walks only cells on some shortest path)."""
    from_start, count = bfs(free, start)
    if goal not in from_start:
        return []
    if count[goal] > limit:
        raise ValueError(f"{count[goal]} shortest routes from {start} to {goal}; too many to list")
    from_goal, _ = bfs(free, goal)
    length = from_start[goal]
    routes: list[tuple[Cell, ...]] = []

    def extend(path: list[Cell]) -> None:
        c = path[-1]
        if c == goal:
            routes.append(tuple(path))
            return
        for di, dj in _MOVES:
            n = (c[0] + di, c[1] + dj)
            if n in free and from_start[n] == from_start[c] + 1 and from_start[n] + from_goal.get(n, -length) == length:
                extend(path + [n])

    extend([start])
    return routes


def winding_number(loop: Sequence[Cell], point: Cell) -> int:
    """How many times the closed polygon through the cell centres of `loop` turns around `point`."""
    total = 0.0
    for a, b in pairwise([*loop, loop[0]]):
        # Angles measured in (x right, y up) = (column, -row); each edge subtends less than half a turn.
        ta = math.atan2(point[0] - a[0], a[1] - point[1])
        tb = math.atan2(point[0] - b[0], b[1] - point[1])
        total += (tb - ta + math.pi) % (2 * math.pi) - math.pi
    return round(total / (2 * math.pi))


def walls_between(a: Sequence[Cell], b: Sequence[Cell], walls: set[Cell]) -> list[Cell]:
    """The wall cells enclosed by route `a` followed by route `b` backwards (empty: the routes are the same way)."""
    loop = [*a, *reversed(b[1:-1])]
    return sorted(w for w in walls if winding_number(loop, w) != 0)


def _turns(route: Sequence[Cell]) -> int:
    steps = [(b[0] - a[0], b[1] - a[1]) for a, b in pairwise(route)]
    return sum(s != t for s, t in pairwise(steps))


def _side(route: Sequence[Cell], others: Sequence[Sequence[Cell]], walls: set[Cell]) -> str:
    """The side on which the route passes the walls it goes around differently from the others: the compass
    direction from those walls' centre to the centre of the route's own cells (those not shared)."""
    enclosed = {w for o in others for w in walls_between(route, o, walls)}
    shared = set.intersection(*(set(o) for o in others))
    own = [c for c in route if c not in shared]
    dx = np.mean([c[1] for c in own]) - np.mean([w[1] for w in enclosed])
    dy = np.mean([w[0] for w in enclosed]) - np.mean([c[0] for c in own])  # rows grow downwards
    return _SIDES[round(math.atan2(dy, dx) / (math.pi / 4)) % 8]


def route_classes(free: set[Cell], walls: set[Cell], start: Cell, goal: Cell) -> list[list[tuple[Cell, ...]]]:
    """Shortest routes grouped into classes that go around the walls the same way."""
    classes: list[list[tuple[Cell, ...]]] = []
    for route in shortest_routes(free, start, goal):
        for cls in classes:
            if not walls_between(cls[0], route, walls):
                cls.append(route)
                break
        else:
            classes.append([route])
    return classes


def bimodal_pair(maze_map: Sequence[Sequence[Any]], start: Cell, goal: Cell) -> BimodalPair | None:
    """The pair's routes (one per class, the one with fewest turns), or None if it is not bimodal at once."""
    free = free_cells(maze_map)
    walls = {(i, j) for i, row in enumerate(maze_map) for j, _ in enumerate(row)} - free
    classes = route_classes(free, walls, start, goal)
    if len(classes) < 2:
        return None
    first_moves = [{r[1] for r in cls} for cls in classes]
    if sum(len(m) for m in first_moves) != len(set().union(*first_moves)):
        return None  # two classes share a first move: the choice would not show in the first action
    best = [min(cls, key=lambda r: (_turns(r), r)) for cls in classes]
    sides = [_side(r, [o for o in best if o is not r], walls) for r in best]
    if len(set(sides)) < len(sides):
        return None  # routes a person could not tell apart by name
    merge = len(best[0]) - 1
    while merge > 0 and all(r[merge - 1] == best[0][merge - 1] for r in best):
        merge -= 1
    return BimodalPair(start, goal, tuple(Route(r, s) for r, s in zip(best, sides, strict=True)), merge)


def bimodal_pairs(maze_map: Sequence[Sequence[Any]]) -> list[BimodalPair]:
    """Every ordered (start, goal) pair of free cells whose shortest routes split at once around a wall."""
    cells = sorted(free_cells(maze_map))
    pairs = (bimodal_pair(maze_map, s, g) for s in cells for g in cells if s != g)
    return [p for p in pairs if p is not None]


# --- environment ---------------------------------------------------------------------------------------
class PointMazeBimodalEnv(SimEnv):
    """PointMaze Medium restricted to start/goal pairs with two equally short routes."""

    suite = "pointmaze/bimodal"
    default_max_steps = 450  # the expert needs about 210 on average, at most about 320

    def __init__(self, task: str = "bimodal", config: EnvConfig | None = None,
                 pairs: Sequence[BimodalPair] | None = None) -> None:
        import gymnasium as gym
        import gymnasium_robotics

        super().__init__(task, "pointmaze", INSTRUCTIONS, config)
        for cam in self.camera_names:
            if cam != "top":
                raise ValueError(f"unknown PointMaze camera {cam!r}; valid: top")
        gym.register_envs(gymnasium_robotics)
        # The raw environment, so that physis (not a TimeLimit wrapper) counts the steps.
        self._env = gym.make(ENV_ID, continuing_task=False).unwrapped
        self.maze_map: list[list[Any]] = self._env.maze.maze_map
        self.pairs = tuple(pairs) if pairs is not None else tuple(bimodal_pairs(self.maze_map))
        if not self.pairs:
            raise ValueError(f"{ENV_ID} has no start/goal pair with two shortest routes")
        self.pair = self.pairs[0]
        self.episode = 0  # lets the expert notice a new episode
        self._cameras: MujocoCameras | None = None
        if self.config.render:
            model = self._env.point_env.model
            model.vis.global_.orthographic = 1
            model.vis.global_.fovy = _TOP_EXTENT  # orthographic: the view's height in metres
            # Markers only (sites do not collide): an opaque red goal a little larger than the bright green
            # ball, and the ball drawn above the goal so that it stays visible on top of it.
            model.site_rgba[self._env.target_site_id] = (1.0, 0.0, 0.0, 1.0)
            model.site_size[self._env.target_site_id, 0] = 0.3
            ball = model.site("particle_site").id
            model.site_rgba[ball] = (0.2, 1.0, 0.2, 1.0)
            model.site_pos[ball, 2] = 0.6
            self._cameras = MujocoCameras(model, *self.config.hw)
            self._cameras.add_free_camera("top", **_TOP)

    @property
    def ball_pos(self) -> np.ndarray:
        return self._env.point_env.data.qpos[:2].copy()

    @property
    def ball_vel(self) -> np.ndarray:
        return self._env.point_env.data.qvel[:2].copy()

    @property
    def goal_pos(self) -> np.ndarray:
        """Where the goal is (privileged: for experts and tests, never for policies)."""
        return np.asarray(self._env.goal, dtype=np.float64).copy()

    def cell_xy(self, cell: Cell) -> np.ndarray:
        return np.asarray(self._env.maze.cell_rowcol_to_xy(np.asarray(cell)), dtype=np.float64)

    def xy_cell(self, xy: np.ndarray) -> Cell:
        i, j = self._env.maze.cell_xy_to_rowcol(np.asarray(xy))
        return int(i), int(j)

    def _sim_reset(self, seed: int) -> None:
        self.pair = self.pairs[int(self.np_random.integers(len(self.pairs)))]
        # A derived seed for the start/goal noise: the same seed would replay our own stream, tying the
        # noise to the pair and to the expert's route choice.
        noise_seed = int(self.np_random.integers(2**31))
        self._env.reset(seed=noise_seed, options={"reset_cell": np.array(self.pair.start),
                                                  "goal_cell": np.array(self.pair.goal)})
        self.episode += 1

    def _sim_step(self, action: np.ndarray) -> tuple[float, bool, dict[str, Any]]:
        obs, reward, _, _, info = self._env.step(action.astype(np.float64))
        distance = float(np.linalg.norm(obs["achieved_goal"] - obs["desired_goal"]))
        return float(reward), bool(info["success"]), {"goal_distance": distance}

    def _sim_state(self) -> dict[str, np.ndarray]:
        return {"pos": self.ball_pos, "vel": self.ball_vel}

    def environment_state(self) -> np.ndarray:
        return self.goal_pos.astype(np.float32)

    def _sim_render(self, camera: str) -> np.ndarray:
        if self._cameras is None:
            raise RuntimeError("this environment was built with render=False")
        return self._cameras.render(self._env.point_env.data, camera)

    def expert(self) -> PointMazeExpert:
        return PointMazeExpert(self)

    def _sim_close(self) -> None:
        self._env.close()


class PointMazeExpert:
    """Takes one of the pair's routes, chosen uniformly with `env.np_random` at reset, and follows it smoothly.

    The route is a polyline from the ball through the centres of the route's cells to the goal. The expert
    aims at a carrot a little way ahead along it (which rounds the corners well inside the corridors) with a
    proportional-derivative force: it pushes the velocity towards the carrot at a planned speed (which drops
    before each corner and near the goal) and damps the velocity it has. Labels: "take the <side> route"
    ("upper", "lower left", ...: the side of the wall the route passes, as seen in the top image) until the
    routes join again (or the goal is one cell away), then "go to the goal".
    """

    lookahead = 0.45  # m along the path
    cruise_speed = 4.0  # m/s (the environment clips at 5)
    corner_speed = 2.5  # m/s
    brake = 12.0  # m/s^2 planned deceleration (full force gives about 24)
    settle = 4.0  # 1/s: speed per metre left near the goal, so the ball comes to rest there
    gain = 0.6  # force per m/s of velocity error

    def __init__(self, env: PointMazeBimodalEnv) -> None:
        self.env = env
        self.route: Route = env.pair.routes[0]
        self._episode = -1
        self._points = np.zeros((2, 2))
        self._corner = np.zeros(2, dtype=bool)
        self._cum = np.zeros(2)
        self._switch = 0
        self._seg = 0

    def reset(self) -> None:
        env = self.env
        self._episode = env.episode
        self.route = env.pair.routes[int(env.np_random.integers(len(env.pair.routes)))]
        cells = self.route.cells
        self._points = np.array([env.ball_pos, *(env.cell_xy(c) for c in cells[1:-1]), env.goal_pos])
        steps = np.diff(np.array(cells), axis=0)
        self._corner = np.zeros(len(self._points), dtype=bool)
        self._corner[1:-1] = np.any(steps[1:] != steps[:-1], axis=1)  # where the route turns
        self._cum = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(self._points, axis=0), axis=1))])
        self._switch = min(env.pair.merge, len(cells) - 2)  # first segment labelled "go to the goal"
        self._seg = 0

    def act(self, obs: Observation) -> tuple[np.ndarray, str]:
        if self._episode != self.env.episode:
            self.reset()
        p, v = self.env.ball_pos, self.env.ball_vel
        pts = self._points
        # Move on to the next segment once the ball is past this one's end or nearer to the next.
        while self._seg < len(pts) - 2 and (self._progress(p, self._seg) >= 1.0
                                           or self._dist(p, self._seg + 1) < self._dist(p, self._seg)):
            self._seg += 1
        carrot, to_corner, to_goal = self._carrot(p)
        to_goal = max(to_goal, float(np.linalg.norm(pts[-1] - p)))  # also when past the goal
        # Slow down before the carrot reaches the next corner (that is where the turn begins) and at the goal.
        to_turn = max(to_corner - self.lookahead, 0.0)
        speed = min(self.cruise_speed, self.corner_speed + math.sqrt(2 * self.brake * to_turn),
                    math.sqrt(2 * self.brake * to_goal), self.settle * to_goal)
        heading = carrot - p
        norm = np.linalg.norm(heading)
        v_des = heading / norm * speed if norm > 1e-6 else np.zeros(2)
        action = np.clip(self.gain * (v_des - v), -1.0, 1.0)
        label = GOAL_LABEL if self._seg >= self._switch else self.route.label
        return action, label

    def _progress(self, p: np.ndarray, seg: int) -> float:
        a, b = self._points[seg], self._points[seg + 1]
        d = b - a
        return float(np.dot(p - a, d) / max(np.dot(d, d), 1e-9))

    def _dist(self, p: np.ndarray, seg: int) -> float:
        a, b = self._points[seg], self._points[seg + 1]
        t = np.clip(self._progress(p, seg), 0.0, 1.0)
        return float(np.linalg.norm(p - (a + t * (b - a))))

    def _carrot(self, p: np.ndarray) -> tuple[np.ndarray, float, float]:
        """The point `lookahead` ahead along the path, and the path distance to the next corner and the goal."""
        pts, seg, cum = self._points, self._seg, self._cum
        s = cum[seg] + np.clip(self._progress(p, seg), 0.0, 1.0) * (cum[seg + 1] - cum[seg])
        corners = [cum[k] for k in range(seg + 1, len(pts) - 1) if self._corner[k]]
        target = min(s + self.lookahead, cum[-1])
        k = min(int(np.searchsorted(cum, target, side="right")) - 1, len(pts) - 2)
        t = (target - cum[k]) / max(cum[k + 1] - cum[k], 1e-9)
        carrot = pts[k] + t * (pts[k + 1] - pts[k])
        return carrot, (corners[0] - s) if corners else math.inf, cum[-1] - s


def make(task: str, config: EnvConfig) -> PointMazeBimodalEnv:
    if task != "bimodal":
        raise ValueError(f"unknown PointMaze task {task!r}; valid: bimodal")
    return PointMazeBimodalEnv(task, config)
