"""PhysisModel: one trunk that acts (flow-matching action chunks), predicts (future frame latents),
reasons (the next subtask, in words) and judges (task progress).

Token layout and attention (see docs/architecture.md):
  prefix   = image patches, instruction, state, embodiment     bidirectional          (trunk)
  subtask  = BOS w1 .. wn EOS                                  causal, sees prefix    (trunk)
  action   = H noisy action tokens + flow time                 see prefix + subtask   (action expert)
  future   = noisy frame latents + flow time                   see all of the above   (action expert)
The action expert is a smaller set of weights whose layer l attends to the trunk's layer-l keys/values, so
at inference the prefix is encoded once (`encode_prefix`) and each flow step runs only the expert.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from physis.model.config import ModelConfig
from physis.model.tokenizers import FrameDecoder, PrefixTokenizer
from physis.model.trunk import (
    Block,
    PrefixCache,
    additive_mask,
    expert_attention_mask,
    key_mask,
    subtask_attention_mask,
)
from physis.model.vocab import BOS, EOS, PAD, SPECIALS

Batch = dict[str, torch.Tensor]


def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of flow time t (B,) in [0, 1] -> (B, dim); periods from 4e-3 to 4 (as in π0)."""
    half = dim // 2
    frac = torch.linspace(0.0, 1.0, half, device=t.device, dtype=torch.float32)
    period = 4e-3 * (4.0 / 4e-3) ** frac
    angle = t.float()[:, None] * (2 * math.pi / period)
    emb = torch.cat([angle.sin(), angle.cos()], dim=-1)
    return F.pad(emb, (0, dim - 2 * half))


def sample_flow_time(n: int, device: torch.device) -> torch.Tensor:
    """t ~ Beta(1.5, 1) scaled to (0.001, 1]: more weight on noisy times, never exactly clean."""
    beta = torch.distributions.Beta(torch.tensor(1.5, device=device), torch.tensor(1.0, device=device))
    return beta.sample((n,)) * 0.999 + 0.001


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of values over mask (same shape, bool); 0 with a live graph when nothing is valid."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


@dataclass
class FlowContext:
    """Per-chunk tensors every flow step of `PhysisModel.sample_actions` reuses (see `_flow_context`)."""

    cache: PrefixCache
    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    mask: torch.Tensor
    n_ctx: int
    w_x: torch.Tensor
    step_terms: torch.Tensor
    out_term: torch.Tensor


def padded_draft_rows(rows: list[list[int]], n: int) -> tuple[list[list[int]], list[int]]:
    """Subtask drafts (token id lists) as n ids each, BOS w.. (PAD-filled or cut), and each one's last position to
    check: its EOS, or n - 1 without one."""
    padded = [([BOS] + row[1:n] + [PAD] * n)[:n] for row in rows]
    return padded, [row.index(EOS) if EOS in row else n - 1 for row in padded]


def padded_draft(draft: torch.Tensor, n: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """`padded_draft_rows` of a draft (B, Ls') as tensors (B, n) and (B,). (A dozen ids per row: on lists it is a
    few microseconds, against ~10 library calls.)"""
    rows, last = padded_draft_rows(draft.tolist(), n)
    return torch.tensor(rows, dtype=torch.long, device=device), torch.tensor(last, dtype=torch.long, device=device)


class PhysisModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        cfg = self.config = config
        d, de, hd = cfg.width, cfg.expert_width, cfg.head_dim
        self.prefix = PrefixTokenizer(cfg)
        self.blocks = nn.ModuleList(Block(d, cfg.heads, hd, cfg.mlp_ratio) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(d)
        self.expert = nn.ModuleList(Block(de, cfg.heads, hd, cfg.expert_mlp_ratio) for _ in cfg.expert_reads)
        self.expert_norm = nn.LayerNorm(de)

        a = cfg.action_dim
        self.action_in = nn.Linear(2 * a, de)  # (noisy action, action mask)
        self.action_pos = nn.Parameter(torch.randn(cfg.horizon, de) * 0.02)
        if cfg.action_head == "flow":
            self.action_time = nn.Sequential(nn.Linear(2 * de, de), nn.SiLU(), nn.Linear(de, de))
        self.action_out = nn.Linear(de, a)

        if cfg.subtask:
            self.vocab_size = len(SPECIALS) + len(cfg.subtask_vocab)
            self.subtask_emb = nn.Embedding(self.vocab_size, d)
            self.subtask_pos = nn.Parameter(torch.randn(cfg.max_subtask_tokens, d) * 0.02)
            self.subtask_out = nn.Linear(d, self.vocab_size)
        if cfg.progress:
            self.progress_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 1))
        if cfg.env_state_dim and not cfg.localizer:
            self.env_state_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, cfg.env_state_dim))
        if cfg.world_model:
            n_future = cfg.cameras * cfg.latent_grid**2
            self.future_in = nn.Linear(cfg.latent_dim, de)
            self.future_pos = nn.Parameter(torch.randn(n_future, de) * 0.02)
            self.future_time = nn.Sequential(nn.Linear(2 * de, de), nn.SiLU(), nn.Linear(de, de))
            self.future_out = nn.Linear(de, cfg.latent_dim)
            self.decoder = FrameDecoder(cfg)

        self.apply(_init_weights)
        self.backbone = None
        if cfg.backbone is not None:
            from transformers import AutoModel

            self.backbone = AutoModel.from_pretrained(cfg.backbone.removeprefix("hf:"), local_files_only=True)
            hidden = int(self.backbone.config.hidden_size)
            self.backbone_in = nn.Linear(d, hidden)
            self.backbone_out = nn.Linear(hidden, d)

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)

    # ------------------------------------------------------------------ trunk and expert
    def _trunk_prefix(
        self, tokens: torch.Tensor, mask: torch.Tensor, hidden: bool = True
    ) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor | None]:
        """Prefix tokens (B, N, D) -> per-layer keys, values (B, heads, N, hd) and final hidden (B, N, D).

        With hidden=False the last layer only computes its keys/values (its attention and MLP feed nothing but
        the pooled summary), and the hidden states come back as None.
        """
        keys, values = [], []
        if self.backbone is not None:
            out = self.backbone(
                inputs_embeds=self.backbone_in(tokens), attention_mask=mask.long(), output_hidden_states=True
            )
            states = out.hidden_states  # embeddings + one per backbone layer
            n = len(states) - 1
            for i, block in enumerate(self.blocks):
                k, v = block.kv(self.backbone_out(states[min(n, (i + 1) * n // len(self.blocks))]))
                keys.append(k)
                values.append(v)
            return keys, values, self.norm(self.backbone_out(states[-1]))
        attn = key_mask(mask)  # broadcast over the queries
        x = tokens
        for i, block in enumerate(self.blocks):
            if not hidden and i == len(self.blocks) - 1:
                k, v = block.kv(x)
            else:
                x, k, v = block(x, attn)
            keys.append(k)
            values.append(v)
        return keys, values, self.norm(x) if hidden else None

    def _trunk_extend(
        self, x: torch.Tensor, keys: list[torch.Tensor], values: list[torch.Tensor], ctx_mask: torch.Tensor
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Causal subtask tokens x (B, n, D) after a cached prefix -> (hidden, keys, values incl. prefix)."""
        attn = subtask_attention_mask(ctx_mask, x.shape[1])
        new_k, new_v = [], []
        for block, ck, cv in zip(self.blocks, keys, values, strict=True):
            x, k, v = block(x, attn, ck, cv)
            new_k.append(torch.cat([ck, k], dim=2))
            new_v.append(torch.cat([cv, v], dim=2))
        return self.norm(x), new_k, new_v

    def _expert(self, x: torch.Tensor, cache: PrefixCache, n_action: int) -> torch.Tensor:
        """Expert tokens x (B, n, De): the first n_action are action tokens, the rest future tokens."""
        attn = expert_attention_mask(cache.mask, n_action, x.shape[1] - n_action)
        for block, layer in zip(self.expert, self.config.expert_reads, strict=True):
            x, _, _ = block(x, attn, cache.keys[layer], cache.values[layer])
        return self.expert_norm(x)

    def _action_tokens(self, x: torch.Tensor, t: torch.Tensor | None, action_mask: torch.Tensor) -> torch.Tensor:
        # x (B, H, A) noisy actions (flow) or clean / zero actions; t (B,) flow time or None (mse head)
        m = action_mask.to(x.dtype)[:, None].expand_as(x)
        tok = self.action_in(torch.cat([x, m], dim=-1))
        if self.config.action_head == "flow":
            t = torch.zeros(x.shape[0], device=x.device) if t is None else t
            temb = time_embedding(t, tok.shape[-1]).to(tok.dtype)[:, None].expand_as(tok)
            tok = self.action_time(torch.cat([tok, temb], dim=-1))
        return tok + self.action_pos[: x.shape[1]]

    def _future_tokens(self, z: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        # z (B, C*G, latent_dim) noisy latents, tau (B,)
        tok = self.future_in(z)
        temb = time_embedding(tau, tok.shape[-1]).to(tok.dtype)[:, None].expand_as(tok)
        return self.future_time(torch.cat([tok, temb], dim=-1)) + self.future_pos[: z.shape[1]]

    def predict_velocity(self, cache: PrefixCache, x: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        """Flow velocity (B, H, A) at noisy actions x and time t (B,); with the mse head, the actions.

        The result has x's dtype whatever the weights' (bf16 weights at inference keep float32 samples).
        """
        dtype = self.expert_norm.weight.dtype
        out = self._expert(self._action_tokens(x.to(dtype), t, cache.action_mask), cache, x.shape[1])
        return self.action_out(out).to(x.dtype)

    def _future_velocity(
        self, cache: PrefixCache, actions: torch.Tensor, z: torch.Tensor, tau: torch.Tensor
    ) -> torch.Tensor:
        """Velocity (B, C*G, latent_dim) for noisy future latents z, given clean actions (B, H, A)."""
        tokens = torch.cat([self._action_tokens(actions, None, cache.action_mask), self._future_tokens(z, tau)], 1)
        return self.future_out(self._expert(tokens, cache, actions.shape[1])[:, actions.shape[1] :])

    # ------------------------------------------------------------------ training
    def _encode(self, batch: Batch, pooled: bool = True) -> tuple[PrefixCache, torch.Tensor | None, torch.Tensor]:
        """Prefix cache plus the prefix hidden states and patch features (for the world model).

        pooled=False skips the work only the pooled summary (the progress head) reads; hidden is then None.
        """
        tokens, mask, feats, env_state = self.prefix(batch)
        keys, values, hidden = self._trunk_prefix(tokens, mask, hidden=pooled)
        summary = None
        if hidden is not None:
            summary = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
            if self.config.env_state_dim and env_state is None:  # the query token, last in the prefix
                env_state = self.env_state_head(hidden[:, -1])
        b = tokens.shape[0]
        action_mask = batch.get("action_mask")
        if action_mask is None:
            action_mask = torch.ones(b, self.config.action_dim, dtype=torch.bool, device=tokens.device)
        cache = PrefixCache(
            keys, values, mask, summary, action_mask.bool(), prefix_len=mask.shape[1], cameras=batch["images"].shape[1],
            env_state=env_state,
        )
        return cache, hidden, feats

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Losses per head ("action", "subtask", "progress", "env_state", "world_model", "recon"), weighted "loss".

        A head's loss is present when the head is on and its targets are in the batch.
        """
        cfg = self.config
        cache, _, feats = self._encode(batch)
        losses: dict[str, torch.Tensor] = {}
        weights: dict[str, float] = {}

        if cfg.progress and "progress" in batch:
            pred = self.progress_head(cache.pooled).squeeze(-1)
            target = batch["progress"].to(pred.dtype)
            if cfg.progress_loss == "bce":
                per = F.binary_cross_entropy_with_logits(pred, target, reduction="none")
            else:
                per = F.mse_loss(pred, target, reduction="none")
            valid = batch.get("progress_valid")  # False for episodes whose length is not the task's (openings)
            losses["progress"] = per.mean() if valid is None else masked_mean(per, valid.bool())
            weights["progress"] = cfg.progress_weight

        if cfg.env_state_dim and "env_state" in batch:
            pred = cache.env_state
            mask = batch["env_state_mask"].bool()
            if pred.shape != mask.shape:
                raise ValueError(f"PhysisModel: the batch's environment state has width {mask.shape[-1]}, the "
                                 f"model's head predicts {pred.shape[-1]}")
            losses["env_state"] = masked_mean((pred - batch["env_state"].to(pred.dtype)).square(), mask)
            weights["env_state"] = cfg.env_state_weight

        if cfg.subtask and "subtask_tokens" in batch:
            losses["subtask"], cache = self._subtask_loss(batch, cache)
            weights["subtask"] = cfg.subtask_weight

        if "actions" in batch:
            valid = cache.action_mask[:, None, :] & ~batch["action_is_pad"].bool()[:, :, None]  # (B, H, A)
            actions = batch["actions"] * valid  # masked targets never reach the network's input either
            if cfg.action_head == "flow":
                noise = torch.randn_like(actions)
                t = sample_flow_time(actions.shape[0], actions.device)
                x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * actions
                err = self.predict_velocity(cache, x_t, t) - (noise - actions)
            else:
                err = self.predict_velocity(cache, torch.zeros_like(actions), None) - actions
            losses["action"] = masked_mean(err.square(), valid)
            weights["action"] = cfg.action_weight

            if cfg.world_model and "future_images" in batch:
                losses["world_model"], losses["recon"] = self._world_model_losses(batch, cache, actions, feats)
                weights["world_model"], weights["recon"] = cfg.world_model_weight, cfg.recon_weight

        total = cache.pooled.new_zeros(())
        for name, weight in weights.items():
            total = total + weight * losses[name]
        losses["loss"] = total
        return losses

    def _subtask_loss(self, batch: Batch, cache: PrefixCache) -> tuple[torch.Tensor, PrefixCache]:
        """Teacher-forced next-token cross entropy; returns the cache extended by the subtask tokens."""
        ids = batch["subtask_tokens"].long()  # (B, Ls)
        valid = batch["subtask_valid"].bool()
        x = self.subtask_emb(ids) + self.subtask_pos[: ids.shape[1]]
        hidden, keys, values = self._trunk_extend(x, cache.keys, cache.values, cache.mask)
        logits = self.subtask_out(hidden[:, :-1])
        target = ids[:, 1:]
        ce = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")  # (B, Ls-1)
        loss = masked_mean(ce, (target != PAD) & valid[:, None])
        sub_mask = (ids != PAD) & valid[:, None]  # action tokens read only real, labelled subtasks
        cache = PrefixCache(
            keys, values, torch.cat([cache.mask, sub_mask], 1), cache.pooled, cache.action_mask,
            cache.prefix_len, cache.cameras, ids, cache.env_state,
        )  # fmt: skip
        return loss, cache

    def _world_model_losses(
        self, batch: Batch, cache: PrefixCache, actions: torch.Tensor, feats: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Flow matching on the future frame's latent (stop-gradient target) + reconstruction of current frames,
        on the batch's first `world_model_fraction` rows."""
        images, cam_mask = batch["images"], batch["image_mask"].bool()  # (B, C, T, 3, h, w), (B, C)
        b, c, t = images.shape[:3]
        feats = feats.view(b, c, t, *feats.shape[1:])
        future_images, future_valid = batch["future_images"], batch["future_valid"]
        rows = max(1, math.ceil(self.config.world_model_fraction * b))
        if rows < b:
            images, cam_mask, feats, actions = images[:rows], cam_mask[:rows], feats[:rows], actions[:rows]
            future_images, future_valid, cache = future_images[:rows], future_valid[:rows], cache.head(rows)
            b = rows
        enc = self.prefix.patches
        # reconstruction of the newest current frame teaches the encoder's latent + decoder to keep the image
        current = feats[:, :, -1].flatten(0, 1)
        recon = self.decoder(enc.latent(current)).view(b, c, *images.shape[-3:])
        recon_err = (recon - images[:, :, -1]).square().mean(dim=(2, 3, 4))
        recon_loss = masked_mean(recon_err, cam_mask)

        with torch.no_grad():
            target = enc.latent(enc.features(future_images.flatten(0, 1)))  # (B*C, G, ld)
        target = target.view(b, -1, target.shape[-1])  # (B, C*G, ld)
        noise = torch.randn_like(target)
        tau = sample_flow_time(b, target.device)
        z = tau[:, None, None] * noise + (1 - tau[:, None, None]) * target
        err = (self._future_velocity(cache, actions, z, tau) - (noise - target)).square().mean(-1)  # (B, C*G)
        g = target.shape[1] // c
        valid = (cam_mask & future_valid.bool()[:, None])[:, :, None].expand(b, c, g).reshape(b, -1)
        return masked_mean(err, valid), recon_loss

    # ------------------------------------------------------------------ inference
    @torch.inference_mode()
    def encode_prefix(self, batch: Batch, pooled: bool = True) -> PrefixCache:
        """Per-layer K/V of the observation's prefix tokens, computed once per chunk.

        pooled=False skips the last layer's attention and MLP over the prefix, which only the progress head
        reads (`cache.pooled` is then None): about a quarter of the trunk's work when acting.
        """
        return self._encode(batch, pooled=pooled)[0]

    @torch.inference_mode()
    def generate_subtask(
        self, cache: PrefixCache, draft: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, PrefixCache]:
        """Greedy subtask ids (B, Ls) = BOS w.. EOS PAD.., and the cache extended by them.

        Incremental: each step runs only the newest token through the trunk, reading the earlier tokens'
        keys/values from buffers that become the extended cache (positions never generated stay masked).

        draft (B, Ls'), optional: a guess, usually the previous chunk's subtask, which rarely changes. It is
        checked in one teacher-forced pass (speculative decoding with the guess as the draft): the tokens the
        greedy decode would also have chosen are kept and generation goes on from the first disagreement.
        The result is the greedy decode either way; a right guess costs about one token's step.
        """
        if not self.config.subtask:
            raise RuntimeError("PhysisModel.generate_subtask: this model was built with subtask=False")
        base = cache.prefix_only()
        b, n, p = base.batch_size, self.config.max_subtask_tokens, base.prefix_len
        dev, dtype = base.mask.device, base.keys[0].dtype
        keys = [F.pad(k, (0, 0, 0, n)) for k in base.keys]  # (B, heads, p + n, hd), the subtask part zero
        values = [F.pad(v, (0, 0, 0, n)) for v in base.values]
        # additive key mask of the newest query: valid prefix keys and the subtask tokens up to itself
        seen = additive_mask(F.pad(base.mask, (0, n), value=False), dtype)[:, None, None, :]  # (B, 1, 1, p + n)
        ids = torch.full((b, n), PAD, dtype=torch.long, device=dev)
        ids[:, 0] = BOS
        done = torch.zeros(b, dtype=torch.bool, device=dev)
        start = 0
        if draft is not None:
            start = self._check_draft(draft, ids, done, seen, keys, values, p)
        for i in range(start, n):
            seen[..., p + i] = 0.0
            x = self.subtask_emb(ids[:, i : i + 1]) + self.subtask_pos[i : i + 1]
            for block, kb, vb in zip(self.blocks, keys, values, strict=True):
                x = block.forward_cached(x, seen, kb, vb, p + i)
            if i + 1 == n or bool(done.all()):
                break  # token i's keys/values are in the buffers; nothing is left to generate
            nxt = self._next_token(x[:, -1])
            ids[:, i + 1] = torch.where(done, ids[:, i + 1], nxt)
            done |= nxt == EOS
        extended = PrefixCache(
            keys, values, torch.cat([base.mask, ids != PAD], 1), base.pooled, base.action_mask,
            base.prefix_len, base.cameras, ids, base.env_state,
        )  # fmt: skip
        return ids, extended

    def _next_token(self, hidden: torch.Tensor) -> torch.Tensor:
        """Greedy next ids (...) from final-layer hidden states (..., D); PAD and BOS are never chosen."""
        logits = self.subtask_out(self.norm(hidden))
        logits[..., [PAD, BOS]] = float("-inf")
        return logits.argmax(-1)

    def _check_draft(
        self,
        draft: torch.Tensor,
        ids: torch.Tensor,
        done: torch.Tensor,
        seen: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        p: int,
    ) -> int:
        """Verify a draft for `generate_subtask` in one pass, filling ids/done/seen and the key/value buffers in
        place. Returns the position generation goes on from (n when every row's draft was right)."""
        b, n = ids.shape
        if draft.shape[0] != b:
            raise ValueError(f"PhysisModel.generate_subtask: draft has {draft.shape[0]} rows, the cache {b}")
        d, last = padded_draft(draft, n, ids.device)
        steps = int(last.max()) + 1  # draft positions to run: 0 .. the longest draft's EOS
        causal = torch.ones(steps, steps, dtype=torch.bool, device=ids.device).tril()
        mask = seen.expand(b, 1, steps, p + n).clone()
        mask[..., p : p + steps] = additive_mask(causal, seen.dtype)
        x = self.subtask_emb(d[:, :steps]) + self.subtask_pos[:steps]
        for block, kb, vb in zip(self.blocks, keys, values, strict=True):
            x = block.forward_cached(x, mask, kb, vb, p)
        pred = self._next_token(x[:, : steps - 1])  # pred[:, i]: the greedy token at position i + 1
        agree = (pred == d[:, 1:steps]).int().cumprod(1).sum(1)  # leading draft tokens the decode reproduces
        complete = agree >= last
        if bool(complete.all()):
            ids.copy_(torch.where(torch.arange(n, device=ids.device) <= last[:, None], d, PAD))
            done.fill_(True)
            return n
        m = int(agree[~complete].min())  # positions 0..m hold verified tokens in every row
        ids[:, : m + 1] = d[:, : m + 1]
        ids[:, m + 1] = pred[:, m]
        ids[complete] = torch.where(torch.arange(n, device=ids.device) <= last[complete, None], d[complete], PAD)
        done |= complete | (pred[:, m] == EOS)
        seen[..., p : p + m + 1] = 0.0
        return m + 1

    @torch.inference_mode()
    def extend_subtask(self, cache: PrefixCache, ids: torch.Tensor) -> PrefixCache:
        """The prefix cache extended by given subtask ids (B, Ls) in one teacher-forced pass, as training sees them
        (what `generate_subtask` returns with its ids, without generating)."""
        base = cache.prefix_only()
        x = self.subtask_emb(ids) + self.subtask_pos[: ids.shape[1]]
        _, keys, values = self._trunk_extend(x, base.keys, base.values, base.mask)
        return PrefixCache(
            keys, values, torch.cat([base.mask, ids != PAD], 1), base.pooled, base.action_mask,
            base.prefix_len, base.cameras, ids, base.env_state,
        )  # fmt: skip

    @torch.inference_mode()
    def sample_actions(
        self,
        batch: Batch | None = None,
        steps: int | None = None,
        noise: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        cache: PrefixCache | None = None,
        prefix_actions: torch.Tensor | None = None,
        prefix_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """An action chunk (B, H, A), zero outside the action mask: K Euler steps from t=1 (noise) to t=0.

        Inpainting (real-time chunking): prefix_actions (B, H, A), in the unified normalized space, with
        prefix_weights (B, H) in [0, 1] steer the chunk toward actions already committed. At every step the
        clean-chunk estimate is pulled toward them by the weight and the step is re-aimed at it; weight-1
        steps come out exactly as given (times the action mask), weight-0 steps are free.
        """
        if cache is None:
            if batch is None:
                raise ValueError("PhysisModel.sample_actions: pass a batch or a cache")
            cache = self.encode_prefix(batch, pooled=False)
        b, cfg = cache.batch_size, self.config
        shape = (b, cfg.horizon, cfg.action_dim)
        keep = cache.action_mask[:, None, :].float()
        guide = inpainting_target(prefix_actions, prefix_weights, shape)
        if cfg.action_head == "mse":
            x = self.predict_velocity(cache, torch.zeros(shape, device=keep.device), None)
            if guide is not None:
                x = torch.where(guide[1] == 1, guide[0], torch.lerp(x, guide[0], guide[1]))
            return x * keep
        steps = steps or cfg.flow_steps
        x = noise if noise is not None else torch.randn(shape, generator=generator, device=keep.device)
        dt = 1.0 / steps
        times = [1.0 - i * dt for i in range(steps)]
        flow = self._flow_context(cache, cfg.horizon, times)
        for i, t in enumerate(times):
            v = self._flow_velocity(flow, x, i)
            x = x - dt * v if guide is None else inpainting_step(x, v, t, dt, *guide)
        if guide is not None:
            x = torch.where(guide[1] == 1, guide[0], x)  # exact, whatever the rounding on the way
        return x * keep

    def _flow_context(self, cache: PrefixCache, n: int, times: list[float]) -> FlowContext:
        """What every flow step reuses: each expert layer's key/value buffers [context | n action tokens] with the
        context copied in once, the expert's attention mask as an additive float mask, and the parts of the action
        tokens that do not depend on the noisy actions (the action mask's, each step's time's, the positions)."""
        reads = self.config.expert_reads
        keys = [F.pad(cache.keys[i], (0, 0, 0, n)) for i in reads]
        values = [F.pad(cache.values[i], (0, 0, 0, n)) for i in reads]
        mask = additive_mask(expert_attention_mask(cache.mask, n, 0), keys[0].dtype)
        w_x, step_terms = self._action_token_terms(cache.action_mask, times)
        dtype = self.action_in.weight.dtype
        return FlowContext(
            cache, keys, values, mask, n_ctx=cache.mask.shape[1], w_x=w_x.to(dtype), step_terms=step_terms.to(dtype),
            out_term=self.action_time[2].bias + self.action_pos[:n],
        )  # fmt: skip

    def _action_token_terms(self, action_mask: torch.Tensor, times: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
        """The flow loop's folded action-token weights, float32: w_x (De, A) and each step's term (K, B, 1, De).

        _action_tokens, split: action_in([x, m]) = x Wx' + (m Wm' + b); action_time's first layer on
        [tok, temb] = tok Wt' + (temb Wτ' + b1). Both are linear in x, so one matmul x (Wt Wx)' and a per-step
        term (m Wm' + b) Wt' + temb Wτ' + b1 replace two. The products are taken in float32 whatever the weights'
        dtype. The column slices are made contiguous: inductor's C++ GEMM template (compile-bf16's max-autotune)
        computes a linear with a frozen strided weight wrongly (torch 2.13).
        """
        a, de = self.config.action_dim, self.config.expert_width
        w_in, w_time = self.action_in.weight.float(), self.action_time[0].weight.float()
        w_tok = w_time[:, :de].contiguous()
        t = torch.tensor(times, device=w_in.device)
        mask_term = F.linear(action_mask.float(), w_in[:, a:].contiguous(), self.action_in.bias.float())
        time_terms = F.linear(time_embedding(t, de), w_time[:, de:].contiguous(), self.action_time[0].bias.float())
        return w_tok @ w_in[:, :a].contiguous(), time_terms[:, None, None] + (mask_term @ w_tok.T)[:, None]

    def _flow_velocity(self, flow: FlowContext, x: torch.Tensor, step: int) -> torch.Tensor:
        """`predict_velocity` at the flow context's step `step`: the same numbers up to rounding, without the
        per-step concatenations, time embedding and mask building."""
        dtype = flow.w_x.dtype
        h = F.silu(F.linear(x if x.dtype == dtype else x.to(dtype), flow.w_x) + flow.step_terms[step])
        h = F.linear(h, self.action_time[2].weight) + flow.out_term
        for block, kb, vb in zip(self.expert, flow.keys, flow.values, strict=True):
            h = block.forward_cached(h, flow.mask, kb, vb, flow.n_ctx)
        out = self.action_out(self.expert_norm(h))
        return out if out.dtype == x.dtype else out.to(x.dtype)

    @torch.inference_mode()
    def predict_progress(self, cache: PrefixCache) -> torch.Tensor:
        """Task progress (B,) in [0, 1] from the pooled prefix."""
        if not self.config.progress:
            raise RuntimeError("PhysisModel.predict_progress: this model was built with progress=False")
        if cache.pooled is None:
            raise ValueError("PhysisModel.predict_progress: the cache was encoded with pooled=False")
        out = self.progress_head(cache.pooled).squeeze(-1)
        return torch.sigmoid(out) if self.config.progress_loss == "bce" else out.clamp(0.0, 1.0)

    @torch.inference_mode()
    def predict_env_state(self, cache: PrefixCache) -> torch.Tensor:
        """The auxiliary head's estimate (B, env_state_dim) of the normalized environment state."""
        if not self.config.env_state_dim:
            raise RuntimeError("PhysisModel.predict_env_state: this model was built with env_state_dim=0")
        if cache.env_state is None:
            raise ValueError("PhysisModel.predict_env_state: the cache was encoded with pooled=False")
        return cache.env_state

    @torch.inference_mode()
    def sample_future(
        self,
        cache: PrefixCache,
        actions: torch.Tensor,
        generator: torch.Generator | None = None,
        steps: int | None = None,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Future frame latents (B, C, G, latent_dim) `future_offset` steps after the chunk `actions` (B, H, A)."""
        if not self.config.world_model:
            raise RuntimeError("PhysisModel.sample_future: this model was built with world_model=False")
        cfg = self.config
        b, g = actions.shape[0], cfg.latent_grid**2
        shape = (b, cache.cameras * g, cfg.latent_dim)
        z = noise if noise is not None else torch.randn(shape, generator=generator, device=actions.device)
        actions = actions * cache.action_mask[:, None, :]
        steps = steps or cfg.flow_steps
        dt = 1.0 / steps
        for i in range(steps):
            tau = torch.full((b,), 1.0 - i * dt, device=z.device)
            z = z - dt * self._future_velocity(cache, actions, z, tau)
        return z.view(b, cache.cameras, g, cfg.latent_dim)

    @torch.inference_mode()
    def decode_future(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, G, latent_dim) -> frames (B, C, 3, h, w) in [0, 1], for people to look at."""
        b, c = latents.shape[:2]
        frames = self.decoder(latents.flatten(0, 1))
        return frames.view(b, c, *frames.shape[1:])


def inpainting_target(
    actions: torch.Tensor | None, weights: torch.Tensor | None, shape: tuple[int, int, int]
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Checked (actions (B, H, A), weights (B, H, 1)) for `sample_actions`, or None when not inpainting."""
    if actions is None and weights is None:
        return None
    if actions is None or weights is None:
        raise ValueError("PhysisModel.sample_actions: pass prefix_actions and prefix_weights together")
    if tuple(actions.shape) != shape or tuple(weights.shape) != shape[:2]:
        raise ValueError(
            f"PhysisModel.sample_actions: expected prefix_actions {shape} and prefix_weights {shape[:2]}, found "
            f"{tuple(actions.shape)} and {tuple(weights.shape)}"
        )
    if bool(((weights < 0) | (weights > 1)).any()):
        raise ValueError("PhysisModel.sample_actions: prefix_weights must lie in [0, 1]")
    return actions.float(), weights.float()[..., None]


def inpainting_step(
    x: torch.Tensor, v: torch.Tensor, t: float, dt: float, target: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """One Euler step from time t to t - dt that steers the clean estimate toward `target` by `weight`.

    With x_t = t * noise + (1 - t) * x0 and v = noise - x0, the step splits x into its noise and clean
    estimates, blends the clean one toward the target and recombines them at t - dt; weight 0 gives back
    the plain Euler step x - dt * v.
    """
    clean = x - t * v
    noise = x + (1.0 - t) * v
    clean = torch.lerp(clean, target, weight)
    return (t - dt) * noise + (1.0 - t + dt) * clean


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
