"""`physis eval-heads`: every head of a checkpoint against held-out demonstrations.

- actions: error of sampled chunks against the demonstrated ones (normalized units, masked);
- world model: error of the predicted future-frame latent against the real one, beside the baseline
  that predicts no change (the current frame's latent), plus a PNG strip: now | real future |
  predicted future;
- subtask: exact-match accuracy of the generated subtask against the expert's label;
- progress: Pearson correlation and mean absolute error against true progress (frame / length);
- environment state (the auxiliary head, where the checkpoint has one and the data records it): mean absolute
  error per coordinate in the data's units (metres; the near-field values `NAME-robot-near` are tanh of a
  displacement, unitless), beside the baseline that always answers the mean; the
  same over every episode's first `first_frames` frames alone, where a policy cannot yet read the goal from
  how far the hand has come along a demonstrated path and has to find it in the pixels, and (`near_object`)
  over the frames where the hand is within a few centimetres of the object, where a grasp is decided. With a
  localizer, also the action error there with its estimate and with the true state in its token: does the
  expert follow it?

Use demonstrations the checkpoint did not train on, e.g. `physis collect ... --seed 500000`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from physis.data.layout import write_json_atomic
from physis.progress import progress_bar


@dataclass
class HeadsConfig:
    checkpoint: Path
    data: Path  # held-out demonstrations (LeRobot v3.0)
    out: Path
    samples: int = 256
    batch_size: int = 32
    seed: int = 0
    strip: int = 6  # examples in the world-model PNG strip
    first_frames: int = 1  # environment-state error also over each episode's first N frames alone (0: off)
    # environment-state error also over the frames where the hand is within this many metres of the object (0: off;
    # needs a checkpoint trained with --env-state-relative)
    near_object: float = 0.0
    progress: bool = True


def _check_cameras(trained: dict[str, list[str]], found: dict[str, list[str]], root: Path) -> None:
    """Refuse held-out data whose cameras are not the ones the checkpoint was trained on, slot by slot."""
    for robot, cams in found.items():
        if robot in trained and list(trained[robot]) != list(cams):
            raise ValueError(f"{root}: cameras {list(cams)} of robot {robot!r}, but the checkpoint was trained on "
                             f"{list(trained[robot])} (collect with --cameras {' '.join(trained[robot])})")


def _check_near_object(near_object: float, names: list[str]) -> None:
    """Refuse a --near-object radius that is not a distance, or a checkpoint that does not estimate the object
    minus the hand (the frames are picked by those values)."""
    from physis.data.relative import RELATIVE_SUFFIX

    if not (near_object >= 0 and np.isfinite(near_object)):
        raise ValueError(f"--near-object must be a distance in metres >= 0 (0: off), got {near_object}")
    if near_object > 0 and not any(n.endswith(RELATIVE_SUFFIX) for n in names):
        raise ValueError("--near-object selects frames by the object minus the hand, which this checkpoint does not "
                         "estimate: it was trained without --env-state-relative")


def evaluate_heads(cfg: HeadsConfig) -> dict[str, Any]:
    from physis.embodiment import UnifiedSpace
    from physis.model.config import ModelConfig
    from physis.model.physis_model import PhysisModel
    from physis.model.vocab import SubtaskVocab
    from physis.train.checkpoint import load_checkpoint
    from physis.train.data import DataConfig, TrainingData

    ckpt = load_checkpoint(cfg.checkpoint, training_state=False)
    model_cfg = ModelConfig.from_dict(ckpt.config["model"])
    model = PhysisModel(model_cfg)
    model.load_state_dict(ckpt.ema_state or ckpt.model_state)
    model.eval()
    data = TrainingData([cfg.data], DataConfig(**ckpt.config["data"]),
                        space=UnifiedSpace.from_dict(ckpt.config["unified_space"]),
                        vocab=SubtaskVocab(model_cfg.subtask_vocab), stats=ckpt.stats)
    _check_cameras(ckpt.config.get("cameras", {}), data.meta()["cameras"], cfg.data)
    _check_near_object(cfg.near_object, data.env_state_names)
    vocab = data.vocab
    steps = max(1, cfg.samples // cfg.batch_size)
    gen = torch.Generator().manual_seed(cfg.seed)
    acc: dict[str, list[Any]] = {k: [] for k in ("action_mse", "wm_mse", "copy_mse", "prog_pred", "prog_true",
                                                  "env_err", "env_base")}
    hits = total = 0
    strip: list[np.ndarray] = []
    bar = progress_bar("eval-heads", "subtask", cfg.progress)
    with torch.no_grad(), bar:
        task = bar.add_task(str(cfg.data), total=steps, subtask="-")
        for batch in data.batches(cfg.batch_size, seed=cfg.seed, steps=steps):
            cache = model.encode_prefix(batch)
            if model_cfg.subtask:
                ids, cache = model.generate_subtask(cache)
                for i in range(len(ids)):
                    if batch["subtask_valid"][i]:
                        total += 1
                        hits += vocab.decode(ids[i].tolist()) == vocab.decode(batch["subtask_tokens"][i].tolist())
            actions = model.sample_actions(batch, generator=gen, cache=cache)
            err = ((actions - batch["actions"]).square() * batch["action_mask"][:, None].float()
                   * (~batch["action_is_pad"])[..., None].float())
            acc["action_mse"].append(float(err.sum() / (batch["action_mask"].sum() * batch["actions"].shape[1])))
            if model_cfg.progress:
                known = batch["progress_valid"].bool()  # openings (`collect --max-frames`) have no true progress
                acc["prog_pred"] += model.predict_progress(cache)[known].tolist()
                acc["prog_true"] += batch["progress"][known].tolist()
            if model_cfg.env_state_dim and "env_state" in batch:
                err, base = _env_state_residuals(model, batch, cache)
                acc["env_err"].append(np.abs(err))
                acc["env_base"].append(base)
            if model_cfg.world_model:
                _world_model(model, batch, cache, gen, acc, strip, cfg.strip)
            bar.update(task, advance=1, subtask=f"{hits}/{total}")
    results: dict[str, Any] = {"checkpoint": str(cfg.checkpoint), "data": str(cfg.data),
                               "samples": steps * cfg.batch_size, "seed": cfg.seed,
                               "action_mse": float(np.mean(acc["action_mse"]))}
    if total:
        results["subtask_accuracy"] = hits / total
        results["subtask_samples"] = total
    if acc["prog_true"]:
        p, t = np.asarray(acc["prog_pred"]), np.asarray(acc["prog_true"])
        results["progress_pearson"] = float(np.corrcoef(p, t)[0, 1]) if p.std() > 0 else 0.0
        results["progress_mae"] = float(np.abs(p - t).mean())
    if acc["env_err"]:
        results.update(_env_state_errors(np.concatenate(acc["env_err"]), np.concatenate(acc["env_base"]), data))
        if cfg.first_frames > 0:
            results.update(_first_frames_env_state(model, data, cfg))
        if cfg.near_object > 0:
            results.update(_near_object_env_state(model, data, cfg))
    if acc["wm_mse"]:
        results["world_model_latent_mse"] = float(np.mean(acc["wm_mse"]))
        results["copy_baseline_latent_mse"] = float(np.mean(acc["copy_mse"]))
        _save_strip(strip, cfg.out / "world_model.png")
        results["world_model_png"] = "world_model.png"
    cfg.out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(cfg.out / "heads.json", results)
    return results


def _env_state_errors(err: np.ndarray, base: np.ndarray, data: Any) -> dict[str, Any]:
    """Per-coordinate mean absolute errors (N, E) in normalized units -> the data's units, by feature name."""
    names, std = _env_state_scale(data)
    n = len(names)
    return {"env_state_mae": {k: float(v) for k, v in zip(names, err[:, :n].mean(0) * std[:n], strict=True)},
            "env_state_mean_baseline_mae": {k: float(v) for k, v in
                                            zip(names, base[:, :n].mean(0) * std[:n], strict=True)}}


def _env_state_stat(data: Any, which: str) -> np.ndarray:
    """The environment state's normalization statistic `which` ("mean", "std"), of the first robot's."""
    from physis.data.mixture import ENV_STATE
    from physis.data.stats import stats_from_json

    own = next(iter(data.stats.values()))["stats"]
    return np.asarray(stats_from_json(own)[ENV_STATE][which], dtype=np.float64)


def _env_state_scale(data: Any) -> tuple[list[str], np.ndarray]:
    """The environment state's coordinate names and the std that turns normalized units back into the data's."""
    return data.env_state_names, np.maximum(_env_state_stat(data, "std"), 1e-8)


def _env_state_mean(data: Any) -> np.ndarray:
    """The environment state's normalization mean: with the std, normalized values back into the data's units."""
    return _env_state_stat(data, "mean")


def _env_state_residuals(model: Any, batch: dict[str, torch.Tensor], cache: Any) -> tuple[np.ndarray, np.ndarray]:
    """head - target (signed) and |mean - target| (the target is normalized, so the mean is 0), masked, in
    normalized units."""
    valid = batch["env_state_mask"].float()
    return (((model.predict_env_state(cache) - batch["env_state"]) * valid).numpy(),
            (batch["env_state"].abs() * valid).numpy())


def hand_pull(signed: np.ndarray, target: np.ndarray, names: list[str], mean: np.ndarray,
              std: np.ndarray) -> dict[str, float] | None:
    """How far the object estimate leans toward the hand: per world-frame axis of the object, the least-squares k
    in (estimate - object) = k * (hand - object), over rows of signed errors and targets (N, E) in normalized
    units. 0: the estimate ignores where the hand is; 1: it answers the hand's position. None without the
    object-minus-hand values (`--env-state-relative`) or with the hand on the object in every row."""
    from physis.data.relative import RELATIVE_SUFFIX

    out: dict[str, float] = {}
    for axis in "xyz":
        name = f"object_{axis}"
        relative = name + RELATIVE_SUFFIX
        if name not in names or relative not in names:
            continue
        i, j = names.index(name), names.index(relative)
        error = signed[:, i] * std[i]
        hand_minus_object = -(target[:, j] * std[j] + mean[j])
        spread = float(np.square(hand_minus_object).sum())
        if spread > 0:
            out[name] = float((error * hand_minus_object).sum() / spread)
    return out or None


def _first_frames_env_state(model: Any, data: Any, cfg: HeadsConfig) -> dict[str, Any]:
    """The environment-state errors over every episode's first `cfg.first_frames` frames (all of them, in order),
    overall and, for datasets `physis collect` made, per task."""
    frame_index = np.asarray(data.mixture.datasets[0].columns["frame_index"])
    rows = np.flatnonzero(frame_index < cfg.first_frames).tolist()
    return {"env_state_first_frames": cfg.first_frames,
            **_env_state_on_rows(model, data, cfg, rows, "first_frames")}


def _near_object_env_state(model: Any, data: Any, cfg: HeadsConfig) -> dict[str, Any]:
    """The environment-state errors over the frames where the hand is within `cfg.near_object` of the object (the
    environment state's first position, by the data's own object-minus-hand values): where a grasp is decided."""
    from physis.data.mixture import ENV_STATE
    from physis.data.relative import RELATIVE_SUFFIX, robot_position

    relative = [i for i, n in enumerate(data.env_state_names) if n.endswith(RELATIVE_SUFFIX)]
    position = robot_position(data.embodiments[0])
    first = relative[: position.stop - position.start]  # the first position's robot-relative values
    env = np.asarray(data.mixture.datasets[0].columns[ENV_STATE], dtype=np.float64)
    rows = np.flatnonzero(np.linalg.norm(env[:, first], axis=-1) < cfg.near_object).tolist()
    if not rows:
        return {"env_state_near_object": cfg.near_object, "env_state_near_object_samples": 0}
    return {"env_state_near_object": cfg.near_object,
            **_env_state_on_rows(model, data, cfg, rows, "near_object")}


def _env_state_on_rows(model: Any, data: Any, cfg: HeadsConfig, rows: list[int], label: str) -> dict[str, Any]:
    """The environment-state errors over the dataset rows `rows` (all of them, in order), beside the mean
    baseline, overall and, for datasets `physis collect` made, per task; with a localizer, also the first chunk's
    action error with its estimate and with the true state in its token. Keys: env_state_LABEL_*, LABEL_action_mse."""
    key = f"env_state_{label}"
    ds = data.mixture.datasets[0]
    batches = [rows[i : i + cfg.batch_size] for i in range(0, len(rows), cfg.batch_size)]
    err, base, target = [], [], []
    with torch.no_grad():
        for raw in torch.utils.data.DataLoader(data.mixture, batch_sampler=batches):
            batch = data.to_model_batch(raw)
            e, b = _env_state_residuals(model, batch, model.encode_prefix(batch))
            err.append(e)
            base.append(b)
            target.append((batch["env_state"] * batch["env_state_mask"].float()).numpy())
    signed, targets = np.concatenate(err), np.concatenate(target)
    errors = np.abs(signed)
    found = _env_state_errors(errors, np.concatenate(base), data)
    names, std = _env_state_scale(data)
    mean = _env_state_mean(data)
    results = {f"{key}_samples": len(rows), f"{key}_mae": found["env_state_mae"],
               f"{key}_mean_baseline_mae": found["env_state_mean_baseline_mae"],
               f"{key}_hand_pull": hand_pull(signed, targets, names, mean, std)}
    followed = _actions_with_true_state(model, data, batches, cfg.seed) if model.config.localizer else None
    if followed is not None:
        results[f"{label}_action_mse"] = {k: float(v.mean()) for k, v in followed.items()}
    tasks = _episode_tasks(ds.root)
    if tasks is not None:
        episode = np.asarray(ds.columns["episode_index"])[rows]
        task_of_row = np.array([tasks.get(int(e), "?") for e in episode])
        by_task = env_state_by_task(errors, targets, task_of_row, episode, names, std)
        for task, entry in by_task.items():
            mine = task_of_row == task
            entry["hand_pull"] = hand_pull(signed[mine], targets[mine], names, mean, std)
        for task, entry in by_task.items() if followed is not None else ():
            entry["action_mse"] = {k: float(v[task_of_row == task].mean()) for k, v in followed.items()}
        results[f"{key}_by_task"] = by_task
    return results


def _actions_with_true_state(model: Any, data: Any, batches: list[list[int]], seed: int) -> dict[str, np.ndarray]:
    """Per row, the error of a sampled chunk against the demonstrated one (normalized units) with the localizer's
    estimate in its token ("estimate") and with the true environment state there ("true_env_state"), on the same
    noise. Their gap is what a perfect localizer would change; none means the action expert ignores the token."""
    out: dict[str, list[np.ndarray]] = {"estimate": [], "true_env_state": []}
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for raw in torch.utils.data.DataLoader(data.mixture, batch_sampler=batches):
            batch = data.to_model_batch(raw)
            noise = torch.randn(batch["actions"].shape[0], model.config.horizon, model.config.action_dim,
                                generator=gen)
            for key, truth in (("estimate", False), ("true_env_state", True)):
                model.prefix.feed_truth = truth
                try:
                    cache = model.encode_prefix(batch)
                    if model.config.subtask:
                        _, cache = model.generate_subtask(cache)
                    actions = model.sample_actions(noise=noise, cache=cache)
                finally:
                    model.prefix.feed_truth = False
                valid = batch["action_mask"][:, None].float() * (~batch["action_is_pad"])[..., None].float()
                per_row = ((actions - batch["actions"]).square() * valid).sum((1, 2)) / valid.sum((1, 2)).clamp(min=1)
                out[key].append(per_row.numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def _episode_tasks(root: Path) -> dict[int, str] | None:
    """Episode index -> task name, from `collection.json`; None for datasets `physis collect` did not make. The log
    also lists episodes the expert failed, which were not written (their index is null): they are skipped."""
    from physis.data.layout import read_collection_meta

    meta = read_collection_meta(root)
    if meta is None:
        return None
    return {int(e["episode_index"]): str(e["task"]) for e in meta.get("episodes", [])
            if e.get("episode_index") is not None}


def env_state_by_task(err: np.ndarray, target: np.ndarray, tasks: np.ndarray, episodes: np.ndarray,
                      names: list[str], std: np.ndarray) -> dict[str, Any]:
    """Per task: the mean absolute error (N, E) of the estimate and of a baseline that knows the task but not the
    scene, the mean target of the task's *other* episodes (leave one episode out; None with a single episode).
    Normalized inputs, results in the data's units by coordinate name."""
    n = len(names)

    def named(values: np.ndarray) -> dict[str, float]:
        return {k: float(v) for k, v in zip(names, values[:n] * std[:n], strict=True)}

    out: dict[str, Any] = {}
    for task in sorted(set(tasks.tolist())):
        rows = tasks == task
        eps = episodes[rows]
        entry: dict[str, Any] = {"episodes": len(set(eps.tolist())), "frames": int(rows.sum()),
                                 "mae": named(err[rows].mean(0)), "task_baseline_mae": None}
        if entry["episodes"] > 1:
            t = target[rows]
            others = np.stack([t[eps != e].mean(0) for e in eps])
            entry["task_baseline_mae"] = named(np.abs(t - others).mean(0))
        out[task] = entry
    return out


def _world_model(model: Any, batch: dict[str, torch.Tensor], cache: Any, gen: torch.Generator,
                 acc: dict[str, list[float]], strip: list[np.ndarray], keep: int) -> None:
    """Latent error of the predicted future vs the real one, and of 'nothing changes' vs the real one."""
    enc = model.prefix.patches
    images, cams = batch["images"], batch["image_mask"].bool()
    b, c = images.shape[:2]
    real = enc.latent(enc.features(batch["future_images"].flatten(0, 1))).view(b, c, -1, model.config.latent_dim)
    now = enc.latent(enc.features(images[:, :, -1].flatten(0, 1))).view_as(real)
    pred = model.sample_future(cache, batch["actions"], generator=gen)
    valid = (cams & batch["future_valid"].bool()[:, None]).float()
    n = valid.sum().clamp(min=1)
    acc["wm_mse"].append(float(((pred - real).square().mean((2, 3)) * valid).sum() / n))
    acc["copy_mse"].append(float(((now - real).square().mean((2, 3)) * valid).sum() / n))
    if len(strip) < keep:
        decoded = model.decode_future(pred)
        for i in range(min(b, keep - len(strip))):
            if valid[i, 0]:
                row = [images[i, 0, -1], batch["future_images"][i, 0], decoded[i, 0]]
                strip.append(np.concatenate([(x.permute(1, 2, 0).clamp(0, 1).numpy() * 255).astype(np.uint8)
                                             for x in row], axis=1))


def _save_strip(rows: list[np.ndarray], path: Path) -> None:
    if not rows:
        return
    from PIL import Image, ImageDraw

    grid = np.concatenate(rows, axis=0)
    scale = max(1, 256 // rows[0].shape[0])
    img = Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale), Image.NEAREST)
    header = Image.new("RGB", (img.width, 18), "white")
    draw = ImageDraw.Draw(header)
    third = img.width // 3
    for k, text in enumerate(("now", "real future", "predicted future")):
        draw.text((k * third + 4, 3), text, fill="black")
    out = Image.new("RGB", (img.width, img.height + 18), "white")
    out.paste(header, (0, 0))
    out.paste(img, (0, 18))
    path.parent.mkdir(parents=True, exist_ok=True)
    out.save(path)
