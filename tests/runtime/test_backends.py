from __future__ import annotations

import pytest

from physis.model.vocab import BOS, EOS, PAD
from physis.runtime.backends import DRAFT_TIE, draft_agrees

DRAFT = [BOS, 5, 6, EOS, PAD]  # padded, its EOS at 3: positions 0..2 predict 5, 6, EOS


def test_a_draft_agrees_where_each_greedy_token_is_its_next() -> None:
    assert draft_agrees(DRAFT, 3, [5, 6, EOS, 9], [0.0, 0.0, 0.0, 0.0])
    assert draft_agrees(DRAFT, 3, [5, 6, EOS, 9], [0.0, 0.0, 0.0, 5.0])  # past its EOS nothing is checked


@pytest.mark.parametrize("position", [0, 1, 2])
def test_a_draft_fails_where_the_decode_leaves_it(position: int) -> None:
    pred, gap = [5, 6, EOS, 9], [0.0, 0.0, 0.0, 0.0]
    pred[position], gap[position] = 11, 2 * DRAFT_TIE
    assert not draft_agrees(DRAFT, 3, pred, gap)
    gap[position] = DRAFT_TIE  # a near-tie keeps the draft
    assert draft_agrees(DRAFT, 3, pred, gap)


def test_a_draft_of_bos_alone_checks_nothing() -> None:
    assert draft_agrees([BOS, EOS, PAD], 1, [EOS, 4], [0.0, 0.0])
    assert draft_agrees([BOS, PAD, PAD], 0, [7, 7], [1.0, 1.0])
