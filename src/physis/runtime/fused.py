"""The action expert's flow loop as one hand-written AMX kernel (`kernels/amx_flow.cpp`).

At batch 1 a `small` flow step is 16 action tokens through four expert layers: about 40 MFLOP, which AMX does in
tens of microseconds, behind ~40 library or generated-kernel calls that each cost microseconds of dispatch,
allocation and thread hand-off (docs/benchmarks/runtime.md). The kernel runs a chunk's K steps in one call on one
core: matmuls as bf16 tile products against weights packed once per engine, activations in float32 (rounded to
bf16 where they enter a matmul), attention over the prefix's cached keys and values, which are packed once per
chunk, with each step's 16 action keys and values written into their own tiles.

The kernel is compiled on first use with the C++ compiler torch's extensions use (about 25 s, then cached) and runs
only where the CPU has AMX and the model has its shapes (`supports()` says why not): the `fused` backend refuses
elsewhere, and batches of more than one observation take compile-bf16's flow graph.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from physis.model.physis_model import PhysisModel
from physis.model.trunk import PrefixCache

SOURCE = Path(__file__).with_name("kernels") / "amx_flow.cpp"
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-mfma"]
TOKENS = 16  # the kernel's one tile of rows: action chunks of this many steps
STALE_LOCK_S = 300.0  # a build takes well under a minute: a lock older than this was left by a killed build

log = logging.getLogger(__name__)


def amx_cpu() -> bool:
    """Whether this CPU has AMX bf16 tiles (what the kernel needs)."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def supports(model: PhysisModel) -> str | None:
    """None when the kernel can run `model`'s flow loop on this machine, else why not."""
    cfg = model.config
    if cfg.action_head != "flow":
        return "the model has the mse action head"
    if cfg.horizon != TOKENS:
        return f"the kernel runs chunks of {TOKENS} steps, the model's horizon is {cfg.horizon}"
    if cfg.width // cfg.heads != 32:
        return f"the kernel's heads are 32 wide, the model's {cfg.width // cfg.heads}"
    if cfg.expert_width % 32 or int(cfg.expert_width * cfg.expert_mlp_ratio) % 32:
        return "the expert's widths are not multiples of 32"
    if not amx_cpu():
        return "the CPU has no AMX tiles"
    return None


@functools.cache
def kernel() -> Any:
    """The compiled extension: built on first use (about 25 s) into `build_directory()`, then loaded from there."""
    from torch.utils.cpp_extension import load

    # torch's loader calls `ninja` from PATH; the pip package puts it beside this interpreter, which a
    # virtual environment that was not activated leaves off PATH
    here = str(Path(sys.executable).parent)
    if here not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")
    build = build_directory()
    build.mkdir(parents=True, exist_ok=True)
    # a build killed midway leaves its lock behind, and the loader would wait for it forever
    lock = build / "lock"
    if lock.exists() and time.time() - lock.stat().st_mtime > STALE_LOCK_S:
        log.warning("removing a stale build lock of the AMX kernel (%s)", lock)
        lock.unlink(missing_ok=True)
    return load(name="physis_amx_flow", sources=[str(SOURCE)], extra_cflags=FLAGS, build_directory=str(build),
                verbose=False)


def build_directory() -> Path:
    """Where the kernel is built: $PHYSIS_KERNEL_CACHE, else ~/.cache/physis/kernels, per torch version."""
    root = Path(os.environ.get("PHYSIS_KERNEL_CACHE", Path.home() / ".cache" / "physis" / "kernels"))
    return root / f"amx_flow-torch{torch.__version__}"


def pack_b(w: torch.Tensor) -> torch.Tensor:
    """A linear's weight (N, K), y = x w^T, as the kernel's B tiles: [N/16][K/32] blocks of 16 k-pairs x 16
    columns x 2 (AMX's pairs layout), zero-padded to whole tiles, bf16."""
    n, k = w.shape
    w = F.pad(w.float(), (0, -k % 32, 0, -n % 16))
    n, k = w.shape
    return w.view(n // 16, 16, k // 32, 16, 2).permute(0, 2, 3, 1, 4).contiguous().to(torch.bfloat16).flatten()


class FusedFlow:
    """A model's flow loop on the AMX kernel: weights packed once (a snapshot of the model's weights then)."""

    def __init__(self, model: PhysisModel) -> None:
        why = supports(model)
        if why is not None:
            raise RuntimeError(f"FusedFlow: {why}")
        self.model = model
        cfg = model.config
        self.heads, self.head_dim = cfg.heads, cfg.width // cfg.heads
        weights: list[torch.Tensor] = []
        eps: list[float] = []
        with torch.no_grad():
            for block in model.expert:
                mlp = block.mlp
                weights += [
                    block.norm1.weight,
                    block.norm1.bias,
                    pack_b(block.qkv.weight),
                    block.qkv.bias,
                    pack_b(block.proj.weight),
                    block.proj.bias,
                    block.norm2.weight,
                    block.norm2.bias,
                    pack_b(mlp[0].weight),
                    mlp[0].bias,
                    pack_b(mlp[2].weight),
                    mlp[2].bias,
                ]
                eps += [block.norm1.eps, block.norm2.eps]
            w_x = model._action_token_terms(torch.ones(1, cfg.action_dim), [1.0])[0]  # as the flow loop folds it
            weights += [
                pack_b(w_x),
                pack_b(model.action_time[2].weight),
                model.expert_norm.weight,
                model.expert_norm.bias,
                pack_b(model.action_out.weight),
                model.action_out.bias,
            ]
            eps.append(model.expert_norm.eps)
        self.weights = [w.detach().float().contiguous() if w.dtype != torch.bfloat16 else w for w in weights]
        self.eps = eps
        self.out_term = (model.action_time[2].bias + model.action_pos[: cfg.horizon]).detach().float().contiguous()
        self._terms: dict[tuple, torch.Tensor] = {}
        kernel()  # build now, not inside the first chunk

    def _step_terms(self, steps: int, action_mask: torch.Tensor) -> torch.Tensor:
        """Each step's x-independent part of the action tokens (steps, De), cached per step count and action mask."""
        key = (steps, tuple(action_mask.tolist()))
        if key not in self._terms:
            times = [1.0 - i / steps for i in range(steps)]
            with torch.no_grad():
                terms = self.model._action_token_terms(action_mask[None], times)[1]
            self._terms[key] = terms[:, 0, 0].contiguous()
        return self._terms[key]

    @torch.inference_mode()
    def __call__(
        self,
        cache: PrefixCache,
        noise: torch.Tensor,
        steps: int,
        prefix_actions: torch.Tensor | None = None,
        prefix_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Actions (1, H, A) from noise (1, H, A) over a prefix cache (batch 1), as `PhysisModel.sample_actions`
        with its inpainting hook (no target: every step free)."""
        if noise.shape[0] != 1 or cache.batch_size != 1:
            raise ValueError("FusedFlow: the kernel runs batch 1")
        h, a = self.model.config.horizon, self.model.config.action_dim
        if prefix_actions is None or prefix_weights is None:
            prefix_actions, prefix_weights = torch.zeros(1, h, a), torch.zeros(1, h)
        reads = self.model.config.expert_reads
        action_mask = cache.action_mask[0].float()
        return kernel().amx_flow(
            noise[0].float().contiguous(), self.weights, self.eps,
            [cache.keys[i][0].float().contiguous() for i in reads],
            [cache.values[i][0].float().contiguous() for i in reads], cache.mask[0].float(),
            self._step_terms(steps, action_mask), self.out_term, prefix_actions[0].float().contiguous(),
            prefix_weights[0].float().contiguous(), action_mask, self.heads, self.head_dim, steps,
        )[None]  # fmt: skip
