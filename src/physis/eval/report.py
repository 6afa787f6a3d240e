"""results.json (the schema in docs/architecture.md) and a bar chart of success per task."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from physis.data.layout import write_json_atomic
from physis.eval.localizer import pooled
from physis.eval.stats import wilson_interval

RESULTS = "results.json"
PLOT = "success.png"


@dataclass
class TaskResult:
    successes: int
    episodes: int
    mean_length: float
    seeds: list[int]
    errors: list[dict[str, Any]] = field(default_factory=list)  # {"seed", "error"} per failed-by-error episode
    videos: list[str] = field(default_factory=list)
    seconds: float = 0.0
    outcomes: list[bool] = field(default_factory=list)  # success per episode, in seed order
    lengths: list[int] = field(default_factory=list)  # steps per episode, in seed order
    goal_distances: list[float | None] = field(default_factory=list)  # after the last step, in seed order
    # the localizer against the simulator's truth (physis.eval.localizer), pooled over successful and failed episodes
    localizer: dict[str, Any] = field(default_factory=dict)

    @property
    def success_rate(self) -> float:
        return self.successes / self.episodes if self.episodes else 0.0

    @classmethod
    def from_episodes(cls, episodes: list[Any]) -> TaskResult:
        n = len(episodes)
        return cls(
            successes=sum(bool(e.success) for e in episodes),
            episodes=n,
            mean_length=sum(e.length for e in episodes) / n if n else 0.0,
            seeds=[e.seed for e in episodes],
            errors=[{"seed": e.seed, "error": e.error} for e in episodes if e.error],
            videos=[e.video for e in episodes if e.video],
            seconds=sum(e.seconds for e in episodes),
            outcomes=[bool(e.success) for e in episodes],
            lengths=[int(e.length) for e in episodes],
            goal_distances=[getattr(e, "goal_distance", None) for e in episodes],
            localizer=_localizer_by_outcome(episodes),
        )

    def to_json(self, out: Path) -> dict[str, Any]:
        lo, hi = wilson_interval(self.successes, self.episodes)
        return {
            "success_rate": self.success_rate,
            "successes": self.successes,
            "episodes": self.episodes,
            "ci95": [round(lo, 4), round(hi, 4)],
            "mean_length": round(self.mean_length, 2),
            "errors": len(self.errors),
            "error_examples": self.errors[:3],
            "videos": [str(Path(v).relative_to(out)) if Path(v).is_relative_to(out) else v for v in self.videos],
            "seeds": self.seeds,
            "episode_success": self.outcomes,
            "episode_length": self.lengths,
            **({"episode_goal_distance": self.goal_distances} if any(d is not None for d in self.goal_distances)
               else {}),
            **({"localizer": self.localizer} if self.localizer else {}),
        }


def _localizer_by_outcome(episodes: list[Any]) -> dict[str, Any]:
    """{"success": pooled, "failure": pooled} over the episodes that logged the localizer (either may be absent)."""
    out = {}
    for key, outcome in (("success", True), ("failure", False)):
        summary = pooled([getattr(e, "localizer", None) for e in episodes if bool(e.success) == outcome])
        if summary:
            out[key] = summary
    return out


def write_report(out: Path, meta: dict[str, Any], tasks: dict[str, TaskResult]) -> dict[str, Any]:
    successes = sum(t.successes for t in tasks.values())
    episodes = sum(t.episodes for t in tasks.values())
    lo, hi = wilson_interval(successes, episodes)
    results = {
        **meta,
        "tasks": {name: t.to_json(out) for name, t in tasks.items()},
        # Mean over tasks (each task weighs the same), as Meta-World reports; the interval pools episodes.
        "mean_success": sum(t.success_rate for t in tasks.values()) / max(1, len(tasks)),
        "mean_success_ci95": [round(lo, 4), round(hi, 4)],
        "total_episodes": episodes,
    }
    write_json_atomic(out / RESULTS, results)
    plot_success(results, out / PLOT)
    return results


def plot_success(results: dict[str, Any], path: Path) -> None:
    """Horizontal bars of success per task with their 95% intervals."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["tasks"])
    rates = [results["tasks"][n]["success_rate"] for n in names]
    lows = [r - results["tasks"][n]["ci95"][0] for n, r in zip(names, rates, strict=True)]
    highs = [results["tasks"][n]["ci95"][1] - r for n, r in zip(names, rates, strict=True)]
    fig, ax = plt.subplots(figsize=(7, 0.8 + 0.32 * len(names)))
    ax.barh(names, rates, xerr=[lows, highs], color="#3b7dd8", ecolor="#333333", capsize=3)
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("success rate (bars: Wilson 95% interval)")
    n = results["episodes_per_task"]
    ax.set_title(f"{results['suite']} - {results['policy']} - mean {results['mean_success']:.1%} "
                 f"({n} episodes per task)", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
