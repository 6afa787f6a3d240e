"""The action expert's flow loop and the trunk over the prefix as hand-written bf16 kernels (`kernels/`).

At batch 1 a `small` flow step is 16 action tokens through four expert layers: about 40 MFLOP, which AMX does in
tens of microseconds, behind ~40 library or generated-kernel calls that each cost microseconds of dispatch,
allocation and thread hand-off (docs/benchmarks/runtime.md). The kernel runs a chunk's K steps in one call on one
core: matmuls as bf16 tile products against weights packed once per engine, activations in float32 (rounded to
bf16 where they enter a matmul), attention over the prefix's cached keys and values, which are packed once per
chunk, with each step's 16 action keys and values written into their own tiles.

With two threads the cores share the flow loop: on AMX each takes half the layers, so that its cache holds its own
layers' weights and context; without AMX each takes half of every layer (`FLOW_SPLITS`). The prefix's trunk
(`FusedTrunk`, `kernels/amx_trunk.cpp`) is the same idea at ~170 tokens: every block in one call, both cores each
taking whole tiles of tokens, with one barrier per block (its keys and values are shared). It checks a subtask draft
in the same pass, as `PrefixDraftEncoder` does. The tokens it reads come from a third kernel (`FusedTokens`,
`kernels/amx_tokens.cpp`): the image stem and patchify convolutions as matmuls over gathered pixels, and the
instruction, state and draft rows, in one call where a graph made some twenty library calls that each cost more
than their arithmetic.

Their tile products run on AMX (Intel Sapphire Rapids and later) or, on CPUs without it, as AVX-512 BF16 dot
products against the same packed tiles (AMD Zen 4 and later; `kernel_isa()`): one build holds both, and the loader
picks. A third setting computes AMX's tile instructions in C++, so that the tests check the AMX path on CPUs without
AMX too. The kernels are compiled on first use with the C++ compiler torch's extensions use (about a minute, then
cached) and run only where the CPU has one of the two and the model has their shapes (`supports()`,
`trunk_supports()` say why not): the `fused` backend refuses elsewhere, and batches of more than one observation
take compile-bf16's graphs (as do the tokens of a tokenizer with stem blocks or keypoints, `tokens_supports()`).
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from physis.model.physis_model import PhysisModel
from physis.model.trunk import PrefixCache
from physis.model.vocab import BOS, PAD

KERNELS = Path(__file__).with_name("kernels")
SOURCES = [KERNELS / "amx_flow.cpp", KERNELS / "amx_trunk.cpp", KERNELS / "amx_tokens.cpp"]
HEADER = KERNELS / "amx.h"
FLAGS = ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-mfma",
         "-fopenmp"]
TOKENS = 16  # the kernel's one tile of rows: action chunks of this many steps
# How two threads share the flow loop (`FusedFlow`'s split): as the CPU's ISA favours, the layers between them, or
# each layer in halves; $PHYSIS_FLOW_SPLIT sets it for a process, to measure one against the other
FLOW_SPLITS = {"auto": 0, "layers": 1, "halves": 2}
# What the tile products run on (`kernel_isa`); the last computes AMX's tile instructions in C++, to check the AMX
# path on a CPU without AMX (slowly: only when asked for)
ISAS = ("amx", "avx512-bf16", "amx-emulated")

log = logging.getLogger(__name__)


def amx_cpu() -> bool:
    """Whether this CPU has AMX bf16 tiles."""
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


def kernel_isa() -> str | None:
    """What the kernels' tile products run on here: "amx" (AMX bf16 tiles, Intel Sapphire Rapids and later),
    "avx512-bf16" (AVX-512 BF16 dot products, e.g. AMD Zen 4 and later), or None where the CPU has neither.
    $PHYSIS_KERNEL_ISA picks one that the CPU has (on an AMX CPU, "avx512-bf16" measures the other path), or
    "amx-emulated" where it has AVX-512 BF16 (the AMX path's every tile instruction computed in C++, for testing);
    read when the kernel loads."""
    bf16 = _avx512_bf16_cpu()
    have = [isa for isa, ok in (("amx", amx_cpu()), ("avx512-bf16", bf16), ("amx-emulated", bf16)) if ok]
    wanted = os.environ.get("PHYSIS_KERNEL_ISA")
    if wanted:
        if wanted not in ISAS:
            raise ValueError(f"PHYSIS_KERNEL_ISA={wanted!r} is not one of {', '.join(ISAS)}")
        if wanted not in have:
            raise ValueError(f"PHYSIS_KERNEL_ISA={wanted!r}, but this CPU has {' and '.join(have) or 'neither'}")
        return wanted
    return have[0] if have else None  # never the emulation unasked


def _avx512_bf16_cpu() -> bool:
    return bool(getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)())


def supports(model: PhysisModel) -> str | None:
    """None when the kernel can run `model`'s flow loop on this machine, else why not."""
    cfg = model.config
    if cfg.action_head != "flow":
        return "the model has the mse action head"
    if cfg.horizon != TOKENS:
        return f"the kernel runs chunks of {TOKENS} steps, the model's horizon is {cfg.horizon}"
    return _tiles_fit(model, "expert", cfg.expert_width, cfg.expert_mlp_ratio)


def trunk_supports(model: PhysisModel) -> str | None:
    """None when the trunk kernel can run `model`'s prefix on this machine, else why not."""
    if model.backbone is not None:
        return "the prefix runs through a pretrained backbone"
    return _tiles_fit(model, "trunk", model.config.width, model.config.mlp_ratio)


def tokens_supports(model: PhysisModel) -> str | None:
    """None when the tokens kernel can make `model`'s prefix tokens on this machine, else why not."""
    why = trunk_supports(model)
    if why is not None:
        return why
    cfg = model.config
    if cfg.stem_blocks or cfg.keypoints:
        return "the image tokenizer has residual stem blocks or keypoints"
    if cfg.text_dim % 32:
        return "the instruction's width is not a multiple of 32"
    return None


def _tiles_fit(model: PhysisModel, part: str, width: int, mlp_ratio: float) -> str | None:
    """What the kernels need: heads 32 wide, a `part` whose widths are whole tiles, and AMX or AVX-512 BF16."""
    cfg = model.config
    if cfg.width // cfg.heads != 32:
        return f"the kernel's heads are 32 wide, the model's {cfg.width // cfg.heads}"
    if width % 32 or int(width * mlp_ratio) % 32:
        return f"the {part}'s widths are not multiples of 32"
    if kernel_isa() is None:
        return "the CPU has neither AMX tiles nor AVX-512 BF16"
    return None


@functools.cache
def kernel() -> Any:
    """The compiled extension: built on first use (about a minute on two cores) into `build_directory()`, then
    loaded from there."""
    import fcntl  # POSIX: the kernels build with GCC on Linux

    from torch.utils.cpp_extension import load

    # torch's loader calls `ninja` from PATH; the pip package puts it beside this interpreter, which a
    # virtual environment that was not activated leaves off PATH
    here = str(Path(sys.executable).parent)
    if here not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")
    build = build_directory()
    build.mkdir(parents=True, exist_ok=True)
    # One build at a time, under a lock that the system releases when its holder dies. torch's loader has its own
    # lock file, which a build killed midway (Ctrl-C on a first `physis serve`) leaves behind, and which the next
    # loader would wait on forever; under this lock no one else is building, so such a file is stale.
    with open(build / "physis.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        if (build / "lock").exists():
            log.warning("removing the build lock that a killed build of the kernels left (%s)", build / "lock")
            (build / "lock").unlink()
        sources = _sources_in(build)
        ext = load(name="physis_amx", sources=[str(s) for s in sources if s.suffix == ".cpp"], extra_cflags=FLAGS,
                   extra_ldflags=["-fopenmp"], build_directory=str(build), verbose=False)
    ext.set_isa(kernel_isa() or "avx512-bf16")  # one build for all: the tile products branch on this (no kernel
    # runs where the CPU has neither)
    return ext


def build_directory() -> Path:
    """Where the kernel is built: $PHYSIS_KERNEL_CACHE, else ~/.cache/physis/kernels, in a directory per torch
    version and per content of the sources, the header and the flags (the loader itself would not rebuild for a
    changed header)."""
    root = Path(os.environ.get("PHYSIS_KERNEL_CACHE", Path.home() / ".cache" / "physis" / "kernels"))
    digest = hashlib.sha256(" ".join(FLAGS).encode())
    for path in (*SOURCES, HEADER):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return root / f"amx-torch{torch.__version__}-{digest.hexdigest()[:12]}"


def _sources_in(build: Path) -> list[Path]:
    """The sources and the header, copied into the build directory where they are not there already: compiled
    from there, the commands are the same from any checkout, so two checkouts of the same sources share one build
    instead of rebuilding over each other (a copy rewritten with the same bytes would look new to ninja)."""
    copies = []
    for path in (*SOURCES, HEADER):
        copy = build / path.name
        if not copy.is_file() or copy.read_bytes() != path.read_bytes():
            tmp = copy.with_suffix(copy.suffix + ".tmp")
            shutil.copyfile(path, tmp)
            tmp.replace(copy)
        copies.append(copy)
    return copies


def pack_b(w: torch.Tensor) -> torch.Tensor:
    """A linear's weight (N, K), y = x w^T, as the kernel's B tiles: [N/16][K/32] blocks of 16 k-pairs x 16
    columns x 2 (AMX's pairs layout), zero-padded to whole tiles, bf16."""
    n, k = w.shape
    w = F.pad(w.float(), (0, -k % 32, 0, -n % 16))
    n, k = w.shape
    return w.view(n // 16, 16, k // 32, 16, 2).permute(0, 2, 3, 1, 4).contiguous().to(torch.bfloat16).flatten()


def blocks_weights(blocks: torch.nn.ModuleList) -> tuple[list[torch.Tensor], list[float]]:
    """Blocks' weights in the kernels' order, 12 per block (matmul weights packed by `pack_b`, the rest float32),
    and their LayerNorms' eps, 2 per block."""
    weights: list[torch.Tensor] = []
    eps: list[float] = []
    with torch.no_grad():
        for block in blocks:
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
    return weights, eps


def _float32(t: torch.Tensor) -> torch.Tensor:
    """t as contiguous float32, without a library call where it already is (most of a chunk's inputs are)."""
    return t if t.dtype == torch.float32 and t.is_contiguous() else t.float().contiguous()


def _bool(t: torch.Tensor) -> torch.Tensor:
    """t as contiguous bool, as the kernels take masks, without a library call where it already is."""
    return t if t.dtype == torch.bool and t.is_contiguous() else t.bool().contiguous()


def _kernel_tensors(weights: list[torch.Tensor]) -> list[torch.Tensor]:
    return [w.detach().float().contiguous() if w.dtype != torch.bfloat16 else w for w in weights]


class FusedFlow:
    """A model's flow loop on the kernel: weights packed once (a snapshot of the model's weights then)."""

    def __init__(self, model: PhysisModel, split: str | None = None) -> None:
        """split: how two threads share the loop, one of FLOW_SPLITS (default $PHYSIS_FLOW_SPLIT, else "auto": on
        AMX the layers between the cores, without it each layer in halves; measured in docs/benchmarks/runtime.md)."""
        split = split or os.environ.get("PHYSIS_FLOW_SPLIT", "auto")
        if split not in FLOW_SPLITS:
            raise ValueError(f"FusedFlow: split {split!r} is not one of {', '.join(FLOW_SPLITS)}")
        why = supports(model)
        if why is not None:
            raise RuntimeError(f"FusedFlow: {why}")
        self.model = model
        cfg = model.config
        self.heads, self.head_dim = cfg.heads, cfg.width // cfg.heads
        weights, eps = blocks_weights(model.expert)
        with torch.no_grad():
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
        # (this builds the kernel on first use)
        self.flow = kernel().Flow(_kernel_tensors(weights), eps, self.heads, self.head_dim, FLOW_SPLITS[split])
        self.out_term = (model.action_time[2].bias + model.action_pos[: cfg.horizon]).detach().float().contiguous()
        self._terms: dict[tuple, torch.Tensor] = {}
        self._free = torch.zeros(cfg.horizon, cfg.action_dim), torch.zeros(cfg.horizon)  # no inpainting target

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
        if prefix_actions is None or prefix_weights is None:  # every step free
            target, weight = self._free
        else:
            target, weight = _float32(prefix_actions[0]), _float32(prefix_weights[0])
        reads = self.model.config.expert_reads
        action_mask = _bool(cache.action_mask[0])
        return self.flow.run(
            _float32(noise[0]), [_float32(cache.keys[i]) for i in reads], [_float32(cache.values[i]) for i in reads],
            _bool(cache.mask[0]), self._step_terms(steps, action_mask), self.out_term, target, weight, action_mask,
            steps, torch.get_num_threads(),
        )[None]  # fmt: skip


class FusedTokens:
    """A model's prefix tokens from a batch-1 observation on the kernel, as `PrefixTokens` makes them (in bf16
    matmuls): the image stem and patchify as matmuls over gathered pixels, and the instruction, state, embodiment,
    query and draft rows, in one call. Weights packed once (a snapshot), as `FusedFlow`'s."""

    def __init__(self, model: PhysisModel) -> None:
        why = tokens_supports(model)
        if why is not None:
            raise RuntimeError(f"FusedTokens: {why}")
        cfg, tok = model.config, model.prefix
        d, cs = cfg.width, cfg.stem_channels
        cp = -(-cs // 32) * 32  # the stem's channels padded, so that a patch's are whole tiles of K
        stem, patchify = tok.patches.stem[0], tok.patches.patchify
        text_norm, text_linear = tok.text_proj
        none = torch.zeros(0, d)
        with torch.no_grad():
            weights = [
                pack_b(F.pad(stem.weight.permute(0, 2, 3, 1).reshape(cs, 27), (0, 0, 0, cp - cs))),  # (dy, dx, colour)
                F.pad(stem.bias, (0, cp - cs)),
                pack_b(F.pad(patchify.weight.permute(0, 2, 3, 1).float(), (0, cp - cs)).reshape(d, -1)),
                patchify.bias + tok.patch_pos + tok.time_emb[:, None] + tok.camera_emb[:, None, None],
                text_norm.weight,
                text_norm.bias,
                pack_b(text_linear.weight),
                text_linear.bias + tok.text_pos,
                pack_b(tok.state_proj.weight),
                tok.state_proj.bias,
                tok.embodiment.weight,
                tok.env_query.reshape(1, d) if cfg.env_state_dim else none,
                model.subtask_emb.weight if cfg.subtask else none,
                model.subtask_pos if cfg.subtask else none,
            ]
        self._no_draft = torch.zeros(0, dtype=torch.long)
        self.tokens = kernel().Tokens(_kernel_tensors(weights), text_norm.eps, cfg.image_size, cfg.patch_size // 2, cp)

    @torch.inference_mode()
    def __call__(self, batch: dict[str, torch.Tensor],
                 draft: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch-1 observation (the engine's keys) -> tokens (1, N (+ n), D) float32, a draft's (1, n) embeddings
        after the prefix's, and the prefix's key mask (1, N), as `PrefixTokens`."""
        if batch["state"].shape[0] != 1:
            raise ValueError("FusedTokens: the kernel runs batch 1")
        ids = self._no_draft if draft is None else draft[0].long().contiguous()
        tokens, mask = self.tokens.run(
            _float32(batch["images"][0]), _bool(batch["image_mask"][0]), _float32(batch["state"][0]),
            _float32(batch["state_mask"][0]), _float32(batch["text"][0]), _bool(batch["text_mask"][0]),
            int(batch["embodiment"][0]), ids, torch.get_num_threads(),
        )  # fmt: skip
        return tokens[None], mask[None]


class FusedTrunk:
    """A model's trunk over a batch-1 prefix (and a subtask draft) on the AMX kernel; weights packed once (a
    snapshot), as `FusedFlow`'s."""

    def __init__(self, model: PhysisModel) -> None:
        why = trunk_supports(model)
        if why is not None:
            raise RuntimeError(f"FusedTrunk: {why}")
        cfg = model.config
        self.model = model
        weights, eps = blocks_weights(model.blocks)
        with torch.no_grad():
            if cfg.subtask:  # the subtask head, its rows padded to whole tiles
                head_w, head_b = model.subtask_out.weight, model.subtask_out.bias
            else:
                head_w, head_b = torch.zeros(1, cfg.width), torch.zeros(1)
            self.vocab = head_w.shape[0]
            pad = -self.vocab % 16
            weights += [model.norm.weight, model.norm.bias, pack_b(F.pad(head_w.float(), (0, 0, 0, pad))),
                        F.pad(head_b.float(), (0, pad))]
            eps.append(model.norm.eps)
        self._no_draft = torch.zeros(0, dtype=torch.long)
        self.trunk = kernel().Trunk(_kernel_tensors(weights), eps, cfg.heads, cfg.width // cfg.heads, cfg.width,
                                    int(cfg.width * cfg.mlp_ratio), self.vocab)

    @torch.inference_mode()
    def __call__(
        self, tokens: torch.Tensor, mask: torch.Tensor, draft: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """tokens (1, p + n, D): the prefix's p tokens (mask (1, p) True where valid), then a draft's n token
        embeddings (draft (1, n) ids BOS w.. EOS PAD.., or None and n = 0) -> keys, values (L, 1, heads, p + n, 32)
        float32 and, as `PrefixDraftEncoder`, pred (1, n - 1) and gap (1, n - 1)."""
        if tokens.shape[0] != 1:
            raise ValueError("FusedTrunk: the kernel runs batch 1")
        ids = self._no_draft if draft is None else draft[0].long().contiguous()
        return tuple(self.trunk.run(_float32(tokens[0]), _bool(mask[0]), ids, PAD, BOS, torch.get_num_threads()))
