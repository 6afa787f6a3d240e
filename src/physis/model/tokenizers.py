"""Tokenizers that turn a batch into prefix tokens, and the frame latent / decoder of the world model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from physis.model.config import ModelConfig


class PatchEncoder(nn.Module):
    """Conv stem (stride 2) + patchify conv: an image becomes a grid of `width` features.

    The same features, pooled to `latent_grid` x `latent_grid` and projected, are the frame latent the
    world model predicts; the latent is layer-normalized (no affine) so flow matching sees unit scale.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        half = cfg.patch_size // 2
        self.stem = nn.Sequential(nn.Conv2d(3, cfg.stem_channels, 3, stride=2, padding=1), nn.GELU())
        self.patchify = nn.Conv2d(cfg.stem_channels, cfg.width, half, stride=half)
        if cfg.world_model:
            self.to_latent = nn.Linear(cfg.width, cfg.latent_dim)
        self.latent_grid = cfg.latent_grid
        self.image_size = cfg.image_size

    def features(self, images: torch.Tensor) -> torch.Tensor:
        # (n, 3, h, w) in [0, 1] -> (n, width, g, g)
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"PatchEncoder: expected {self.image_size}x{self.image_size} images, found {tuple(images.shape[-2:])}"
            )
        return self.patchify(self.stem(images * 2.0 - 1.0))

    def latent(self, features: torch.Tensor) -> torch.Tensor:
        # (n, width, g, g) -> (n, latent_grid**2, latent_dim)
        pooled = F.adaptive_avg_pool2d(features, self.latent_grid).flatten(2).transpose(1, 2)
        z = self.to_latent(pooled)
        return F.layer_norm(z, z.shape[-1:])


class FrameDecoder(nn.Module):
    """Frame latents (n, latent_grid**2, latent_dim) -> frames (n, 3, image_size, image_size) in [0, 1]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        ch = cfg.decoder_channels
        self.grid = cfg.latent_grid
        self.start = cfg.image_size // 8
        self.inp = nn.Conv2d(cfg.latent_dim, ch, 1)
        ups = []
        for i in range(3):
            c_in, c_out = max(ch >> i, 8), max(ch >> (i + 1), 8)
            ups += [nn.ConvTranspose2d(c_in, c_out, 4, stride=2, padding=1), nn.GELU()]
        self.up = nn.Sequential(*ups)
        self.out = nn.Conv2d(max(ch >> 3, 8), 3, 3, padding=1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        n = latents.shape[0]
        x = latents.transpose(1, 2).reshape(n, -1, self.grid, self.grid)
        x = F.interpolate(self.inp(x), size=(self.start, self.start), mode="bilinear", align_corners=False)
        return torch.sigmoid(self.out(self.up(x)))


class PrefixTokenizer(nn.Module):
    """images + text + state + embodiment -> prefix tokens (B, N, width) and their key mask (B, N).

    Token order: image patches (camera-major, then history frame, then patch), text, state, embodiment.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.width
        self.cfg = cfg
        self.patches = PatchEncoder(cfg)
        self.patch_pos = nn.Parameter(torch.zeros(cfg.patch_grid**2, d))
        self.camera_emb = nn.Parameter(torch.zeros(cfg.cameras, d))
        self.time_emb = nn.Parameter(torch.zeros(cfg.history, d))
        self.text_proj = nn.Sequential(nn.LayerNorm(cfg.text_dim), nn.Linear(cfg.text_dim, d))
        self.text_pos = nn.Parameter(torch.zeros(cfg.max_text_tokens, d))
        self.state_proj = nn.Linear(2 * cfg.state_dim, d)
        self.embodiment = nn.Embedding(cfg.num_embodiments, d)
        for p in (self.patch_pos, self.camera_emb, self.time_emb, self.text_pos):
            nn.init.normal_(p, std=0.02)

    def forward(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns tokens (B, N, D), key mask (B, N) and patch features (B*C*T, D, g, g) for latents."""
        images = batch["images"]  # (B, C, T, 3, h, w)
        b, c, t = images.shape[:3]
        if c > self.cfg.cameras or t != self.cfg.history:
            raise ValueError(
                f"PrefixTokenizer: images (B, C, T)={tuple(images.shape[:3])}, config allows C<={self.cfg.cameras}, "
                f"T={self.cfg.history}"
            )
        feats = self.patches.features(images.flatten(0, 2))  # (B*C*T, D, g, g)
        p = feats.shape[-1] * feats.shape[-2]
        tok = feats.flatten(2).transpose(1, 2).reshape(b, c, t, p, -1)
        tok = tok + self.patch_pos + self.time_emb[:t, None] + self.camera_emb[:c, None, None]
        img_mask = batch["image_mask"].bool()[:, :, None].expand(b, c, t * p).reshape(b, -1)

        text = batch["text"]  # (B, L, 384)
        n_text = text.shape[1]
        if n_text > self.cfg.max_text_tokens:
            raise ValueError(
                f"PrefixTokenizer: {n_text} text tokens, config max_text_tokens={self.cfg.max_text_tokens}"
            )
        text_tok = self.text_proj(text) + self.text_pos[:n_text]

        state = torch.cat([batch["state"], batch["state_mask"].to(batch["state"].dtype)], dim=-1)
        state_tok = self.state_proj(state)[:, None]
        emb_tok = self.embodiment(batch["embodiment"].long())[:, None]

        tokens = torch.cat([tok.reshape(b, c * t * p, -1), text_tok, state_tok, emb_tok], dim=1)
        ones = torch.ones(b, 2, dtype=torch.bool, device=tokens.device)
        mask = torch.cat([img_mask, batch["text_mask"].bool(), ones], dim=1)
        return tokens, mask, feats
