"""Training and evaluation seeds come from disjoint ranges, so no evaluation episode was ever a demo.

`collect` draws from TRAIN_SEEDS and `eval` from EVAL_SEEDS; both ranges are written into the
dataset's and the results' metadata so that anyone can check the split.
"""

from __future__ import annotations

TRAIN_SEEDS = range(0, 1_000_000)
EVAL_SEEDS = range(1_000_000, 2_000_000)


def _take(pool: range, name: str, start: int, count: int) -> list[int]:
    if count < 0:
        raise ValueError(f"{name} seed count must be >= 0, got {count}")
    if start < 0 or start + count > len(pool):
        raise ValueError(f"{name} seeds {start}..{start + count - 1} fall outside the {name} range "
                         f"(offsets 0..{len(pool) - 1} of {pool.start}..{pool.stop - 1})")
    return list(pool[start:start + count])


def train_seeds(count: int, start: int = 0) -> list[int]:
    """`count` training seeds beginning at offset `start` of the training range."""
    return _take(TRAIN_SEEDS, "training", start, count)


def eval_seeds(count: int, start: int = 0) -> list[int]:
    """`count` held-out evaluation seeds beginning at offset `start` of the evaluation range."""
    return _take(EVAL_SEEDS, "evaluation", start, count)


def seed_ranges() -> dict[str, list[int]]:
    """Both ranges as [first, last+1], for metadata files."""
    return {"train": [TRAIN_SEEDS.start, TRAIN_SEEDS.stop], "eval": [EVAL_SEEDS.start, EVAL_SEEDS.stop]}
