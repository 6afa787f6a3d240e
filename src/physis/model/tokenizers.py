"""Tokenizers that turn a batch into prefix tokens, and the frame latent / decoder of the world model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from physis.model.config import ModelConfig


class ResidualConv(nn.Module):
    """Two 3x3 convolutions with GroupNorm, added to the input: local features sharper than one stem layer."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        groups = 8 if channels % 8 == 0 else 1
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(groups, channels), nn.GELU(),
            nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(groups, channels),
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(x + self.body(x))


class SpatialSoftmax(nn.Module):
    """Feature maps (n, C, h, w) -> K keypoints (n, K, 2): the expected (x, y) in [-1, 1] under a softmax
    over each of K learned maps (Levine et al. 2016). A position becomes a number the policy can map
    linearly to a target, which a grid of patch tokens does not give it.
    """

    def __init__(self, channels: int, keypoints: int) -> None:
        super().__init__()
        self.maps = nn.Conv2d(channels, keypoints, 1)
        self.log_temperature = nn.Parameter(torch.zeros(()))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h, w = features.shape[-2:]
        # the temperature divides the 1x1 maps' weights, not the (n, K, h*w) logits: the same logits, without
        # two passes over the largest activation of the step (forward and backward)
        inv_t = (-self.log_temperature).exp()
        logits = F.conv2d(features, self.maps.weight * inv_t, self.maps.bias * inv_t).flatten(2).float()
        ys = torch.linspace(-1.0, 1.0, h, device=features.device)
        xs = torch.linspace(-1.0, 1.0, w, device=features.device)
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1).reshape(h * w, 2)  # (h*w, 2) as (x, y)
        return (logits.softmax(dim=-1) @ grid).to(features.dtype)


class PatchEncoder(nn.Module):
    """Conv stem (stride 2, then `stem_blocks` residual blocks) + patchify conv: an image becomes a grid of
    `width` features; with `keypoints` > 0 also K spatial-softmax keypoints of the stem's feature maps.

    The same features, pooled to `latent_grid` x `latent_grid` and projected, are the frame latent the
    world model predicts; the latent is layer-normalized (no affine) so flow matching sees unit scale.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        half = cfg.patch_size // 2
        blocks = [ResidualConv(cfg.stem_channels) for _ in range(cfg.stem_blocks)]
        self.stem = nn.Sequential(nn.Conv2d(3, cfg.stem_channels, 3, stride=2, padding=1), nn.GELU(), *blocks)
        self.patchify = nn.Conv2d(cfg.stem_channels, cfg.width, half, stride=half)
        if cfg.keypoints:
            self.keypoints = SpatialSoftmax(cfg.stem_channels, cfg.keypoints)
        if cfg.world_model:
            self.to_latent = nn.Linear(cfg.width, cfg.latent_dim)
        self.latent_grid = cfg.latent_grid
        self.image_size = cfg.image_size

    def _check(self, images: torch.Tensor) -> None:
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"PatchEncoder: expected {self.image_size}x{self.image_size} images, found {tuple(images.shape[-2:])}"
            )

    def features(self, images: torch.Tensor) -> torch.Tensor:
        # (n, 3, h, w) in [0, 1] -> (n, width, g, g)
        self._check(images)
        return self.patchify(self.stem(images * 2.0 - 1.0))

    def features_and_keypoints(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(n, 3, h, w) in [0, 1] -> patch features (n, width, g, g) and keypoints (n, K, 2), or None."""
        self._check(images)
        stem = self.stem(images * 2.0 - 1.0)
        points = self.keypoints(stem) if hasattr(self, "keypoints") else None
        return self.patchify(stem), points

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

    Token order: image patches (camera-major, then history frame, then patch; none for the slots in
    `keypoint_only_cameras`), one keypoint token per camera and history frame (when `keypoints` > 0), text,
    state, embodiment, and last, when `env_state_dim` > 0, a learned query token whose output the
    environment-state head reads (the action expert attends to it too).
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d = cfg.width
        self.cfg = cfg
        self.patches = PatchEncoder(cfg)
        self.patch_pos = nn.Parameter(torch.zeros(cfg.patch_grid**2, d))
        if cfg.keypoints:
            self.keypoint_proj = nn.Linear(2 * cfg.keypoints, d)
        self.camera_emb = nn.Parameter(torch.zeros(cfg.cameras, d))
        self.time_emb = nn.Parameter(torch.zeros(cfg.history, d))
        self.text_proj = nn.Sequential(nn.LayerNorm(cfg.text_dim), nn.Linear(cfg.text_dim, d))
        self.text_pos = nn.Parameter(torch.zeros(cfg.max_text_tokens, d))
        self.state_proj = nn.Linear(2 * cfg.state_dim, d)
        self.embodiment = nn.Embedding(cfg.num_embodiments, d)
        if cfg.env_state_dim:
            self.env_query = nn.Parameter(torch.zeros(1, 1, d))
            nn.init.normal_(self.env_query, std=0.02)
        if cfg.localizer:
            inputs = cfg.cameras * cfg.history * 2 * cfg.keypoints + cfg.text_dim
            self.localizer = nn.Sequential(nn.Linear(inputs, 2 * d), nn.GELU(), nn.Linear(2 * d, cfg.env_state_dim))
            self.localizer_in = nn.Linear(cfg.env_state_dim + (2 * cfg.state_dim if cfg.localizer_state else 0), d)
        for p in (self.patch_pos, self.camera_emb, self.time_emb, self.text_pos):
            nn.init.normal_(p, std=0.02)
        # diagnostics only (`physis eval-heads`): every row's token gets the batch's true environment state, to
        # measure what a perfect localizer would change in the actions. Never set by a policy
        self.feed_truth = False

    def forward(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Returns tokens (B, N, D), key mask (B, N), patch features (B*C*T, D, g, g) for latents, and the
        localizer's environment-state estimate (B, env_state_dim), or None without a localizer.

        An optional env_state_given (B, env_state_dim) with env_state_given_mask replaces the estimate where the
        mask is set in what the query token carries (not in the estimate returned): values a policy holds fixed."""
        images = batch["images"]  # (B, C, T, 3, h, w)
        b, c, t = images.shape[:3]
        if c > self.cfg.cameras or t != self.cfg.history:
            raise ValueError(
                f"PrefixTokenizer: images (B, C, T)={tuple(images.shape[:3])}, config allows C<={self.cfg.cameras}, "
                f"T={self.cfg.history}"
            )
        feats, points = self.patches.features_and_keypoints(images.flatten(0, 2))  # (B*C*T, D, g, g), (.., K, 2)
        p = feats.shape[-1] * feats.shape[-2]
        tok = feats.flatten(2).transpose(1, 2).reshape(b, c, t, p, -1)
        tok = tok + self.patch_pos + self.time_emb[:t, None] + self.camera_emb[:c, None, None]
        cam_mask = batch["image_mask"].bool()[:, :, None]  # (B, C, 1)
        patched = [i for i in range(c) if i not in self.cfg.keypoint_only_cameras]
        if len(patched) < c:  # keypoint-only cameras reach the trunk through their keypoint token alone
            tok, patch_mask = tok[:, patched], cam_mask[:, patched]
        else:
            patch_mask = cam_mask
        tok = tok.reshape(b, -1, tok.shape[-1])
        img_mask = patch_mask.expand(b, len(patched), t * p).reshape(b, -1)
        if points is not None:  # one token per camera and frame: its K keypoints' coordinates
            kp_tok = self.keypoint_proj(points.reshape(b, c, t, -1)) + self.time_emb[:t] + self.camera_emb[:c, None]
            tok = torch.cat([tok, kp_tok.reshape(b, c * t, -1)], dim=1)
            img_mask = torch.cat([img_mask, cam_mask.expand(b, c, t).reshape(b, -1)], dim=1)

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

        last = [state_tok, emb_tok]
        located = None
        if self.cfg.env_state_dim:
            query = self.env_query.expand(b, 1, -1).to(emb_tok.dtype)
            if self.cfg.localizer:
                located = self._locate(points, text, batch["text_mask"], c)
                if self.feed_truth:
                    fed = self._teacher(located, batch, 1.0)
                elif self.training and self.cfg.localizer_teacher:
                    fed = self._teacher(located, batch, self.cfg.localizer_teacher, noisy=True)
                elif "env_state_given" in batch:  # values the policy holds (a latched goal) stand in for the estimate
                    given = batch["env_state_given_mask"].bool()
                    fed = torch.where(given, batch["env_state_given"].to(located.dtype), located)
                else:
                    fed = located
                projected = torch.cat([fed, state.to(fed.dtype)], -1) if self.cfg.localizer_state else fed
                query = query + self.localizer_in(projected)[:, None]
            last.append(query)
        tokens = torch.cat([tok, text_tok, *last], dim=1)
        ones = torch.ones(b, len(last), dtype=torch.bool, device=tokens.device)
        mask = torch.cat([img_mask, batch["text_mask"].bool(), ones], dim=1)
        return tokens, mask, feats, located

    def _teacher(self, located: torch.Tensor, batch: dict[str, torch.Tensor], fraction: float,
                 noisy: bool = False) -> torch.Tensor:
        """The estimate, with the true environment state in a random `fraction` of the rows (the values the batch
        marks valid; the others keep the estimate). Batches without the target pass as is. noisy: feed the
        batch's displaced copy of the truth where it has one (physis.train.teacher_noise)."""
        if "env_state" not in batch:
            return located
        rows = torch.rand(located.shape[0], 1, device=located.device) < fraction  # [0, 1): all rows at 1
        use = rows & batch["env_state_mask"].bool()
        truth = batch["env_state_teacher"] if noisy and "env_state_teacher" in batch else batch["env_state"]
        return torch.where(use, truth.to(located.dtype), located)

    def _locate(self, points: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor, cameras: int) -> torch.Tensor:
        """The localizer's estimate (B, env_state_dim) from the keypoints and the mean instruction token. Not from
        the state: along a demonstration the hand's position gives the goal away, a shortcut closed loop lacks."""
        b = text.shape[0]
        points = points.reshape(b, cameras, -1)
        if cameras < self.cfg.cameras:  # absent camera slots read as zeros
            points = F.pad(points, (0, 0, 0, self.cfg.cameras - cameras))
        weights = text_mask.to(text.dtype)[..., None]
        pooled = (text * weights).sum(1) / weights.sum(1).clamp(min=1)
        inputs = torch.cat([points.flatten(1), pooled.to(points.dtype)], dim=-1)
        return self.localizer(inputs)
