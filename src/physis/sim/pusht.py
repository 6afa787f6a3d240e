"""PushT suite: gym-pusht's T-pushing task behind physis's observation format.

A circular pusher moves in a 512 x 512 plane toward an absolute target position and must push a
T-shaped block onto a fixed target pose, drawn in green. gym-pusht simulates it with pymunk: the
contacts are frictionless and the plane's damping stops the block as soon as nothing pushes it, so
every push is quasi-static. Success is gym-pusht's own criterion: the block covers more than 95% of
the target's area. The policy sees the top view and the pusher's position; the block's pose is
privileged.

The scripted expert plans one push at a time. It tries pushes along the inward normal from points
all around the block's outline (and into the two pockets under the T's bar, where it can push
sideways without turning the block) in a scratch copy of the physics. It keeps the push whose best
stopping point most lowers the pose error (distance of the block's centre of gravity from the
target's plus a weighted angle error; near the target, the uncovered fraction of the target itself),
counting a small cost per step walked and pushed. It then walks around the block to the push's start
without touching it, pushes for the planned number of steps, and plans again from where the block
really is.
"""

from __future__ import annotations

import heapq
import os
from typing import Any

import numpy as np
import pymunk
import shapely.geometry as sg
from shapely import affinity, ops

from physis.sim.base import EnvConfig, Observation, SimEnv

INSTRUCTIONS = (
    "push the T onto the target",
    "push the T-shaped block onto the green target",
    "slide the T into the target outline",
    "move the T block so that it covers the target",
    "align the T with the target by pushing it",
)

LABEL_MOVE = "move around the block"
LABEL_PUSH = "push the block toward the target"
LABEL_ROTATE = "rotate the block"
LABEL_FINE = "fine-align the block"


def _pusht_env_class() -> Any:
    # gym-pusht imports pygame: no window (it draws on off-screen surfaces) and no greeting on stdout.
    os.environ.setdefault("SDL_VIDEODRIVER", "dummy")
    os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")
    from gym_pusht.envs.pusht import PushTEnv

    return PushTEnv


def make(task: str, config: EnvConfig) -> PushTSimEnv:
    if task != "pusht":
        raise ValueError(f"the pusht suite has one task, 'pusht'; got {task!r}")
    return PushTSimEnv(task, config)


def _rotation(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s], [s, c]])


class PushTSimEnv(SimEnv):
    """gym-pusht's PushT; the action is the pusher's absolute target position in pixels."""

    suite = "pusht"
    default_max_steps = 300  # gym-pusht's own episode limit

    def __init__(self, task: str, config: EnvConfig | None = None) -> None:
        super().__init__(task, "pusht", INSTRUCTIONS, config)
        unknown = (set(self.camera_names) - {"top"}) if self.config.render else set()
        if unknown:
            raise ValueError(f"pusht has one camera, 'top'; unknown: {sorted(unknown)}")
        h, w = self.config.hw
        # The raw env, without gymnasium's TimeLimit: SimEnv counts the steps. The state observation
        # type is the cheapest; images come from the env's own renderer at the configured size.
        self.sim: Any = _pusht_env_class()(obs_type="state", render_mode="rgb_array", observation_width=w,
                                           observation_height=h)

    # --- privileged state, for the expert and for tests --------------------------------------------
    def block_pose(self) -> np.ndarray:
        """(x, y, angle) of the block's body frame."""
        b = self.sim.block
        return np.array([b.position.x, b.position.y, b.angle])

    def goal_pose(self) -> np.ndarray:
        return np.asarray(self.sim.goal_pose, dtype=np.float64).copy()

    def agent_pos(self) -> np.ndarray:
        return np.array(self.sim.agent.position, dtype=np.float64)

    def coverage(self) -> float:
        """Fraction of the target's area the block covers (success above 0.95)."""
        return float(self.sim._get_coverage())

    # --- SimEnv hooks ------------------------------------------------------------------------------
    def _sim_reset(self, seed: int) -> None:
        self.sim.reset(seed=seed)

    def _sim_step(self, action: np.ndarray) -> tuple[float, bool, dict[str, Any]]:
        _, reward, _, _, info = self.sim.step(action.astype(np.float64))
        return float(reward), bool(info["is_success"]), {"coverage": float(info["coverage"])}

    def _sim_state(self) -> dict[str, np.ndarray]:
        return {"agent_pos": self.agent_pos()}

    def _sim_render(self, camera: str) -> np.ndarray:
        if camera != "top":
            raise ValueError(f"pusht has one camera, 'top'; got {camera!r}")
        # gym-pusht draws the 512 x 512 plane (image rows follow +y) and resizes it to the observation size.
        return np.ascontiguousarray(self.sim._render(visualize=False))

    def expert(self) -> PushTExpert:
        return PushTExpert(self)

    def _sim_close(self) -> None:
        self.sim.close()


class PushTGeometry:
    """The block's outline, corners and candidate pushes in its body frame, and the pose error."""

    def __init__(self, env: PushTSimEnv, spacing: float = 8.0, gap: float = 4.0) -> None:
        shapes = env.sim._block_shapes
        self.corners = np.array([tuple(v) for s in shapes for v in s.get_vertices()])  # (8, 2)
        self.outline = sg.polygon.orient(ops.unary_union([sg.Polygon([tuple(v) for v in s.get_vertices()])
                                                          for s in shapes]))
        self.radius = float(next(iter(env.sim.agent.shapes)).radius)
        # Candidate pushes: a start for the pusher, a direction to push in and the direction it comes
        # in from. Along each edge the pusher stands off radius + gap and pushes along the inward
        # normal, wherever its way in along the normal is clear; in each concave corner (the pockets
        # under the T's bar) it touches both edges and pushes into either, or into both.
        starts, dirs, aways = [], [], []
        standoff = self.radius + gap
        coords = np.array(self.outline.exterior.coords)[:-1]
        normals = []
        for a, b in zip(coords, np.roll(coords, -1, axis=0), strict=True):
            edge = b - a
            length = float(np.linalg.norm(edge))
            n = np.array([edge[1], -edge[0]]) / length  # outward for a counter-clockwise outline
            normals.append(n)
            k = max(1, int(np.ceil((length - 4.0) / spacing)))
            for t in np.linspace(2.0, length - 2.0, k + 1):
                c = a + edge / length * t
                ray = (standoff, 2 * self.radius, 3 * self.radius)
                if all(self.outline.distance(sg.Point(c + n * s)) > s - 0.5 for s in ray):
                    starts.append(c + n * standoff)
                    dirs.append(-n)
                    aways.append(n)
        for i, v in enumerate(coords):
            n_in, n_out = normals[i - 1], normals[i]
            e_in, e_out = v - coords[i - 1], coords[(i + 1) % len(coords)] - v
            if e_in[0] * e_out[1] - e_in[1] * e_out[0] < 0:  # a right turn: concave
                diag = (n_in + n_out) / np.linalg.norm(n_in + n_out)
                for d in (-n_in, -n_out, -diag):
                    starts.append(v + (n_in + n_out) * standoff)
                    dirs.append(d)
                    aways.append(diag)
        self.starts, self.dirs, self.aways = np.array(starts), np.array(dirs), np.array(aways)
        self.gap = gap
        self.cog = np.array(tuple(env.sim.block.center_of_gravity))

    def corners_at(self, pose: np.ndarray) -> np.ndarray:
        return pose[:2] + self.corners @ _rotation(pose[2]).T

    def cog_at(self, pose: np.ndarray) -> np.ndarray:
        return pose[:2] + _rotation(pose[2]) @ self.cog

    def corner_error(self, pose: np.ndarray, goal: np.ndarray) -> float:
        """Mean distance (px) between the block's corners and the target's: zero when they coincide."""
        return float(np.linalg.norm(self.corners_at(pose) - self.corners_at(goal), axis=1).mean())

    def error(self, pose: np.ndarray, goal: np.ndarray, turn_weight: float) -> float:
        """Distance (px) of the block's centre of gravity from the target's plus the angle error times
        `turn_weight` (px per radian)."""
        shift = self.cog_at(pose) - self.cog_at(goal)
        turn = abs((pose[2] - goal[2] + np.pi) % (2 * np.pi) - np.pi)
        return float(np.linalg.norm(shift) + turn_weight * turn)

    def coverage(self, pose: np.ndarray, goal: np.ndarray) -> float:
        """gym-pusht's success measure: the fraction of the target's area the block covers."""
        return float(self.outline_at(pose).intersection(self.outline_at(goal)).area / self.outline.area)

    def outline_at(self, pose: np.ndarray) -> sg.Polygon:
        c, s = np.cos(pose[2]), np.sin(pose[2])
        return affinity.affine_transform(self.outline, [c, -s, s, c, pose[0], pose[1]])


class PushScratch:
    """A fresh pymunk world with the env's block, pusher, walls and controller, to try pushes in."""

    def __init__(self, env: PushTSimEnv) -> None:
        sim = env.sim
        self.cls = type(sim)
        self.kp, self.kv, self.dt = float(sim.k_p), float(sim.k_v), float(sim.dt)
        self.substeps = int(1 / (sim.dt * sim.control_hz))
        self.damping = float(sim.space.damping)
        self.block_cog = sim.block_cog
        self.radius = float(next(iter(sim.agent.shapes)).radius)
        self.walls = [(tuple(w.a), tuple(w.b), w.radius) for w in sim.space.shapes if isinstance(w, pymunk.Segment)]

    def push(self, pose: np.ndarray, start: np.ndarray, direction: np.ndarray, speed: float,
             steps: int) -> np.ndarray:
        """Block poses (steps, 3) after each step of moving the pusher's target from `start` along
        `direction` at `speed` px per step, the pusher starting at rest at `start`."""
        space = pymunk.Space()
        space.gravity = 0, 0
        space.damping = self.damping
        space.add(*[self.cls.add_segment(space, a, b, r) for a, b, r in self.walls])
        agent = self.cls.add_circle(space, (float(start[0]), float(start[1])), self.radius)
        block, _ = self.cls.add_tee(space, (float(pose[0]), float(pose[1])), float(pose[2]))
        if self.block_cog is not None:
            block.center_of_gravity = self.block_cog
        out = np.empty((steps, 3))
        vx = vy = 0.0
        for k in range(steps):
            tx, ty = start[0] + direction[0] * speed * (k + 1), start[1] + direction[1] * speed * (k + 1)
            for _ in range(self.substeps):  # gym-pusht's PD loop
                px, py = agent.position
                vx += (self.kp * (tx - px) - self.kv * vx) * self.dt
                vy += (self.kp * (ty - py) - self.kv * vy) * self.dt
                agent.velocity = vx, vy
                space.step(self.dt)
            out[k] = block.position.x, block.position.y, block.angle
        return out


class PushTExpert:
    """Plans a push in a scratch world, walks around the block to its start, pushes, and plans again.

    Phases and labels: walking to the next push's start is "move around the block"; a push is "rotate
    the block" when it mostly turns the block, "push the block toward the target" when it mostly moves
    it, and "fine-align the block" once the block is close to the target.
    """

    step_cost = 0.4  # px of pose error one step is worth: favours short walks and short pushes
    max_push_steps = 12
    fine_error = 12.0  # px: below this mean corner error pushes are slow and labelled fine-align
    rotate_radius = 50.0  # px: a turn counts as much as the motion of a point this far from the centre
    turn_weight = 120.0  # px per radian in the pose error the pushes reduce
    margin = 4.0  # px of clearance the pusher keeps from the block while walking
    drift = 1.0  # px: the block moved this much while walking means the plan is stale

    def __init__(self, env: PushTSimEnv) -> None:
        self.env = env
        self.geom = PushTGeometry(env)
        self.scratch = PushScratch(env)
        self.reset()

    def reset(self) -> None:
        self.plan: dict[str, Any] | None = None
        self.waypoints: list[np.ndarray] = []
        self.push_step = 0
        self.walk_steps = 0

    def act(self, obs: Observation) -> tuple[np.ndarray, str]:
        env = self.env
        pose, agent = env.block_pose(), np.asarray(obs["state"]["agent_pos"], dtype=np.float64)
        if self.plan is not None and self.push_step == 0:  # still walking: is the plan still good?
            moved = np.linalg.norm(self.geom.corners_at(pose) - self.geom.corners_at(self.plan["pose"]), axis=1)
            if moved.max() > self.drift or self.walk_steps > 40:
                self.plan = None
        if self.plan is None:
            self.plan = self._plan(pose, agent)
            self.push_step, self.walk_steps = 0, 0
            if self.plan is None:  # no push helps (or the block is in place): stay put
                return np.clip(agent, 0, 512), LABEL_FINE
            self.waypoints = self.plan["waypoints"]
        plan = self.plan
        if self.push_step == 0:
            while len(self.waypoints) > 1 and np.linalg.norm(agent - self.waypoints[0]) < 12.0:
                self.waypoints.pop(0)
            arrived = len(self.waypoints) == 1 and np.linalg.norm(agent - self.waypoints[0]) < 2.5
            if not arrived:
                self.walk_steps += 1
                return np.clip(self.waypoints[0], 0, 512), LABEL_MOVE
        self.push_step += 1
        target = plan["start"] + plan["direction"] * plan["speed"] * self.push_step
        label = plan["label"]
        if self.push_step >= plan["steps"]:
            self.plan = None
        return np.clip(target, 0, 512), label

    # --- planning ----------------------------------------------------------------------------------
    def _plan(self, pose: np.ndarray, agent: np.ndarray) -> dict[str, Any] | None:
        geom, goal = self.geom, self.env.goal_pose()
        corner_error = geom.corner_error(pose, goal)
        fine = corner_error < self.fine_error

        def pose_error(poses: np.ndarray) -> np.ndarray:
            return np.array([geom.error(p, goal, self.turn_weight) for p in poses])

        def uncovered(poses: np.ndarray) -> np.ndarray:
            # Near the target the pose error and the success criterion part ways: aim at coverage
            # itself (a 1% shortfall is worth about half a pixel), a little past the threshold.
            return np.array([50.0 * (1.0 - min(geom.coverage(p, goal), 0.97)) for p in poses])

        speed = float(np.clip(corner_error / 5.0, 2.0, 10.0))
        tries = [(uncovered, speed), (pose_error, speed), (uncovered, 1.0)] if fine else [(pose_error, speed)]
        outline = geom.outline_at(pose)
        for objective, speed in tries:
            for _, steps, start, d, away, end in self._candidates(pose, agent, objective, speed)[:5]:
                waypoints = self._walk(agent, start, away, outline)
                if waypoints is None:
                    continue
                if fine:
                    label = LABEL_FINE
                else:
                    turn = abs(end[2] - pose[2]) * self.rotate_radius
                    shift = np.linalg.norm(geom.cog_at(end) - geom.cog_at(pose))
                    label = LABEL_ROTATE if turn > shift else LABEL_PUSH
                return {"pose": pose, "start": start, "direction": d, "speed": speed, "steps": steps,
                        "waypoints": waypoints, "label": label}
        return None

    def _candidates(self, pose: np.ndarray, agent: np.ndarray, objective: Any, speed: float) -> list[tuple]:
        """Pushes that lower `objective` (px), best first: (cost, steps, start, direction, away, end pose).

        Each push is tried in the scratch world for `max_push_steps` and stopped where the objective
        plus the cost of the steps spent (walking there and pushing) is lowest."""
        geom = self.geom
        rot = _rotation(pose[2])
        before = float(objective(pose[None])[0])
        lo, hi = geom.radius, 512 - geom.radius
        out = []
        for start, d, away in zip(pose[:2] + geom.starts @ rot.T, geom.dirs @ rot.T, geom.aways @ rot.T,
                                  strict=True):
            if not (np.all(start >= lo) and np.all(start <= hi)):
                continue
            poses = self.scratch.push(pose, start, d, speed, self.max_push_steps)
            values = objective(poses)
            walk = 3.0 + np.linalg.norm(start - agent) / 40.0  # rough steps to get there
            costs = values + self.step_cost * (np.arange(1, len(values) + 1) + walk)
            k = int(np.argmin(costs))
            if values[k] < before - 0.05:
                out.append((costs[k], k + 1, start, d, away, poses[k]))
        return sorted(out, key=lambda c: c[0])

    def _walk(self, agent: np.ndarray, start: np.ndarray, away: np.ndarray,
              outline: sg.Polygon) -> list[np.ndarray] | None:
        """Waypoints from the pusher to a push's start that keep clear of the block: out of contact,
        around the block's (inflated) outline, then straight in to the start from the `away` side."""
        clear = self.geom.radius + self.margin
        obstacle = outline.buffer(clear)
        approach = start + away * (clear + 6.0)
        first = agent
        if obstacle.contains(sg.Point(agent)):  # just pushed (or started overlapping): step out of the way
            first = self._step_out(agent, outline, clear + 2.0)
            if first is None:
                return None
        # Corners of the inflated hull (to go around) and of the inflated outline (to leave or enter the
        # pockets under the T's bar).
        rings = [outline.convex_hull.buffer(clear + 6.0, join_style="mitre"),
                 outline.buffer(clear + 3.0, join_style="mitre")]
        corners = [np.clip(c, 0, 512) for r in rings for c in r.exterior.coords[:-1]]
        nodes = [first, *corners, approach]
        if not np.all((approach >= 0) & (approach <= 512)):
            return None

        def free(a: np.ndarray, b: np.ndarray) -> bool:
            return not obstacle.intersects(sg.LineString([a, b]))

        # Dijkstra over the visibility graph of those corners.
        n = len(nodes)
        dist, prev = [np.inf] * n, [-1] * n
        dist[0] = 0.0
        heap = [(0.0, 0)]
        while heap:
            d, i = heapq.heappop(heap)
            if d > dist[i] or i == n - 1:
                continue
            for j in range(1, n):
                if j == i or not free(nodes[i], nodes[j]):
                    continue
                nd = d + float(np.linalg.norm(nodes[j] - nodes[i]))
                if nd < dist[j]:
                    dist[j], prev[j] = nd, i
                    heapq.heappush(heap, (nd, j))
        if not np.isfinite(dist[-1]):
            return None
        path, i = [], n - 1
        while i > 0:
            path.append(nodes[i])
            i = prev[i]
        if first is not agent:
            path.append(first)
        return [*path[::-1], start]

    def _step_out(self, agent: np.ndarray, outline: sg.Polygon, clear: float) -> np.ndarray | None:
        """The nearest point at least `clear` from the block that the pusher reaches in a straight line
        without pushing into it (further than it already does, if it overlaps the block)."""
        reach = min(outline.distance(sg.Point(agent)), self.geom.radius) - 1.0
        body = outline.buffer(reach) if reach > 0.5 else sg.Polygon()
        angles = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        for dist in (10.0, 20.0, 30.0, 45.0, 60.0):
            for a in angles:
                p = np.clip(agent + dist * np.array([np.cos(a), np.sin(a)]), 0, 512)
                if outline.distance(sg.Point(p)) >= clear and not body.intersects(sg.LineString([agent, p])):
                    return p
        return None
