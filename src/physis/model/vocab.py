"""SubtaskVocab: the word vocabulary of subtask labels ("grasp the block"), for the subtask head."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")


class SubtaskVocab:
    """Lower-case whitespace words; ids 0-3 are PAD, BOS, EOS, UNK, words follow in the given order."""

    PAD, BOS, EOS, UNK = PAD, BOS, EOS, UNK

    def __init__(self, words: Iterable[str]) -> None:
        self.words: list[str] = []
        for word in words:
            word = word.lower()
            if word in SPECIALS:
                raise ValueError(f"SubtaskVocab: word {word!r} collides with a special token")
            if word not in self.words:
                self.words.append(word)
        self._ids = {w: i + len(SPECIALS) for i, w in enumerate(self.words)}

    @classmethod
    def from_labels(cls, labels: Iterable[str]) -> SubtaskVocab:
        """Words of all labels, sorted, so the same label set always gives the same ids."""
        return cls(sorted({w for label in labels for w in label.lower().split()}))

    def __len__(self) -> int:
        return len(SPECIALS) + len(self.words)

    def encode(self, label: str, max_len: int) -> list[int]:
        """BOS w1 .. wn EOS, padded with PAD to max_len; words that do not fit are dropped (EOS is kept)."""
        if max_len < 2:
            raise ValueError(f"SubtaskVocab.encode: max_len must be >= 2, found {max_len}")
        ids = [self._ids.get(w, UNK) for w in label.lower().split()][: max_len - 2]
        ids = [BOS, *ids, EOS]
        return ids + [PAD] * (max_len - len(ids))

    def decode(self, ids: Sequence[int]) -> str:
        """Words up to the first EOS; specials are skipped."""
        words = []
        for i in ids:
            i = int(i)
            if i == EOS:
                break
            if i >= len(SPECIALS):
                words.append(self.words[i - len(SPECIALS)] if i < len(self) else SPECIALS[UNK])
            elif i == UNK:
                words.append(SPECIALS[UNK])
        return " ".join(words)
