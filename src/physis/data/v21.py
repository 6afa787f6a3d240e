"""The older LeRobot v2.1 layout, read into the same structure as v3.0 so users' existing data loads.

    meta/info.json  meta/episodes.jsonl  meta/tasks.jsonl  meta/episodes_stats.jsonl
    data/chunk-000/episode_000000.parquet              one file per episode
    videos/chunk-000/<camera key>/episode_000000.mp4   one file per episode and camera
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa

from physis.data import layout
from physis.data.layout import DatasetFormatError
from physis.data.reader import Episode, LoadedDataset, _columns, read_parquet
from physis.data.stats import merge_stats, stats_from_json


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise DatasetFormatError(f"{path}: file is missing")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            raise DatasetFormatError(f"{path}:{n}: not valid JSON ({e})") from e
    return rows


def load_v21(root: Path, info: dict[str, Any]) -> LoadedDataset:
    episodes_meta = sorted(read_jsonl(root / "meta" / "episodes.jsonl"), key=lambda r: r["episode_index"])
    if len(episodes_meta) != info["total_episodes"]:
        raise DatasetFormatError(f"{root}/meta/episodes.jsonl: lists {len(episodes_meta)} episodes, "
                                 f"info.json says {info['total_episodes']}")
    task_rows = read_jsonl(root / "meta" / "tasks.jsonl")
    tasks = [r["task"] for r in sorted(task_rows, key=lambda r: r["task_index"])]
    chunks = int(info["chunks_size"])
    vkeys = layout.video_keys(info["features"])
    tables, episodes, start = [], [], 0
    for r in episodes_meta:
        index, length = int(r["episode_index"]), int(r["length"])
        chunk = index // chunks
        tables.append(read_parquet(root / info["data_path"].format(episode_chunk=chunk, episode_index=index)))
        videos = {k: (root / info["video_path"].format(episode_chunk=chunk, video_key=k, episode_index=index), 0.0)
                  for k in vkeys}
        episodes.append(Episode(index, length, start, list(r.get("tasks", [])), videos))
        start += length
    table = pa.concat_tables(tables, promote_options="permissive") if tables else None
    columns = _columns(table, info["features"], root / "data") if table is not None else {}
    stats_path = root / "meta" / "episodes_stats.jsonl"
    stats: dict[str, dict] = {}
    if stats_path.is_file():
        per_episode = [stats_from_json(r["stats"]) for r in read_jsonl(stats_path)]
        for feature in per_episode[0] if per_episode else []:
            stats[feature] = merge_stats([s[feature] for s in per_episode if feature in s])
    return LoadedDataset(info, columns, episodes, tasks, None, stats)
