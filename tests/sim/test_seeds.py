import pytest

from physis.sim.seeds import EVAL_SEEDS, TRAIN_SEEDS, eval_seeds, seed_ranges, train_seeds


def test_ranges_are_disjoint():
    assert set(TRAIN_SEEDS).isdisjoint(EVAL_SEEDS)
    assert TRAIN_SEEDS.stop <= EVAL_SEEDS.start


def test_takes_from_its_own_range():
    assert train_seeds(3) == [0, 1, 2]
    assert train_seeds(2, start=10) == [10, 11]
    assert eval_seeds(2) == [EVAL_SEEDS.start, EVAL_SEEDS.start + 1]
    assert set(train_seeds(1000, start=999_000)).isdisjoint(eval_seeds(1000))


def test_refuses_to_cross_into_the_other_range():
    with pytest.raises(ValueError, match="outside the training range"):
        train_seeds(2, start=len(TRAIN_SEEDS) - 1)
    with pytest.raises(ValueError, match="outside the evaluation range"):
        eval_seeds(1, start=-1)
    with pytest.raises(ValueError, match=">= 0"):
        train_seeds(-1)


def test_seed_ranges_for_metadata():
    ranges = seed_ranges()
    assert ranges == {"train": [TRAIN_SEEDS.start, TRAIN_SEEDS.stop], "eval": [EVAL_SEEDS.start, EVAL_SEEDS.stop]}
