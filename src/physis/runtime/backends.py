"""Inference backends: one PhysisModel run eagerly in float32, with bf16 or int8 weights, compiled, or through
ONNX Runtime, behind the calls a policy makes per chunk.

Every engine offers `encode_prefix(batch)`, `generate_subtask(cache)`, `sample_actions(...)` (with the
inpainting hook of `PhysisModel.sample_actions`) and `chunk(...)`, which does all three. Engines never encode
the pooled prefix summary (only the progress head reads it). Samples stay float32 whatever the weights.

  eager      the model as it is (float32)
  bf16       a bf16 copy of the weights; the Euler state stays float32
  int8       a copy with dynamically quantized int8 Linear layers (convolutions stay float32)
  compile    torch.compile of the prefix encoder and the per-step velocity network; subtask eager
  compile-bf16  inductor with its freezing passes and C++ wrapper: the prefix encoder on a bf16 copy of the
             weights, with the last chunk's subtask checked in the same graph (most chunks need no decoding), and
             the whole K-step flow loop as one graph. On a CPU with AMX every graph is bf16 with the weights
             frozen in and its matmuls on inductor's C++ GEMM template (FROZEN_AMX); elsewhere the flow loop is
             float32 (its ~20 matmuls a step are too small for bf16 library calls to pay for their conversions).
             Each graph compiles on first use (10-70 s per input shape on 2 cores, 40-130 s with FROZEN_AMX)
  fused      the trunk over the prefix (with the draft check) and the flow loop as hand-written bf16 kernels
             (`physis.runtime.fused`: one call each per chunk, weights packed once, both cores), after a
             compile-bf16 graph that only tokenizes the observation; CPUs with AMX tiles or AVX-512 BF16 (Intel
             Sapphire Rapids, AMD Zen 4 and later). Batches of more than one observation take compile-bf16's graphs
  onnx       ONNX Runtime for the encoder, each subtask token (with a KV cache) and each flow step
  onnx-int8  the same graphs with int8 MatMul weights (ONNX Runtime dynamic quantization)
  cuda-graph CUDA graphs of the prefix encoder and the whole flow loop (`physis.runtime.graphs`), for a GPU
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from physis.model.physis_model import PhysisModel, inpainting_step, inpainting_target, padded_draft_rows
from physis.model.text import pad_text_tokens
from physis.model.trunk import PrefixCache
from physis.model.vocab import BOS, EOS, PAD

log = logging.getLogger(__name__)

BACKENDS = ("eager", "bf16", "int8", "compile", "compile-bf16", "fused", "onnx", "onnx-int8", "cuda-graph")
# inductor settings of compile-bf16: at batch 1 a flow step is ~90 small operations, and the C++ wrapper is what
# makes compiling pay there (docs/benchmarks/runtime.md). `freezing` as a compile option runs inductor's freezing
# passes but leaves the weights graph inputs: dynamo reads the global setting when it traces. Weights folded in
# for real (prepacked for MKL) made no measurable difference to a chunk.
FROZEN_CPP = {"freezing": True, "cpp_wrapper": True}
# compile-bf16 where the CPU has AMX: every graph in bf16 with its weights frozen in for real (CompiledEngine's
# `freeze`) and inductor's C++ GEMM template (AMX micro-kernels inlined in the graph) where it beats a library call:
# `small`'s 10 flow steps take 4.1 against 6.1 ms, a chunk 8.1 against 9.6. Without AMX, FROZEN_CPP and the flow loop
# in float32, measured faster there than bf16.
FROZEN_AMX = {"freezing": True, "cpp_wrapper": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
            "max_autotune_report_choices_stats": False}
# A subtask draft's token whose logit falls behind the best by at most this fraction of the best's size (at least 1)
# counts as the greedy choice (compile-bf16's draft check). The frozen graphs round in another order than the eager
# decode, and a near-tie (a random-weight model's margin of 0.5%) that they break the other way would otherwise send
# every chunk to the decode again; keeping the last subtask through a tie is the hysteresis a controller wants anyway.
DRAFT_TIE = 0.01
CONTEXT_ROUNDING = 32  # compile-bf16 pads the flow's context to a multiple of this many keys
TEXT_ROUNDING = 8  # compiled prefix encoders pad the instruction to a multiple of this many tokens
Batch = dict[str, torch.Tensor]


class Engine:
    """A PhysisModel run eagerly; `net` is the copy that does the work (the model itself for float32)."""

    backend = "eager"

    def __init__(self, model: PhysisModel, net: nn.Module | None = None, dtype: torch.dtype = torch.float32) -> None:
        self.model = model.eval()
        self.net = self.model if net is None else net.eval()
        self.dtype = dtype
        self.config = model.config

    @property
    def flow_dtype(self) -> torch.dtype:
        """The dtype the flow loop's weights run in (`dtype` unless the engine says otherwise)."""
        return self.dtype

    def inputs(self, batch: Batch) -> Batch:
        """The batch with its float tensors in the weights' dtype."""
        if self.dtype == torch.float32:
            return batch
        return {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in batch.items()}

    def encode_prefix(self, batch: Batch) -> PrefixCache:
        return self.net.encode_prefix(self.inputs(batch), pooled=False)

    def generate_subtask(self, cache: PrefixCache,
                         draft: torch.Tensor | None = None) -> tuple[torch.Tensor, PrefixCache]:
        """As `PhysisModel.generate_subtask`: a draft (the last chunk's subtask) is verified in one pass."""
        return self.net.generate_subtask(cache, draft=draft)

    def reason(self, batch: Batch, draft: torch.Tensor | None = None) -> tuple[torch.Tensor, PrefixCache]:
        """Encode the prefix and decode the subtask (checking `draft` first): (ids (B, Ls), the extended cache)."""
        return self.generate_subtask(self.encode_prefix(batch), draft=draft)

    def _cache_for(self, batch: Batch | None, cache: PrefixCache | None) -> PrefixCache:
        """The given cache, or the batch's prefix encoded."""
        if cache is not None:
            return cache
        if batch is None:
            raise ValueError(f"{type(self).__name__}.sample_actions: pass a batch or a cache")
        return self.encode_prefix(batch)

    def sample_actions(self, batch: Batch | None = None, steps: int | None = None, noise: torch.Tensor | None = None,
                       generator: torch.Generator | None = None, cache: PrefixCache | None = None,
                       prefix_actions: torch.Tensor | None = None,
                       prefix_weights: torch.Tensor | None = None) -> torch.Tensor:
        """As `PhysisModel.sample_actions`: an action chunk (B, H, A), float32."""
        cache = self._cache_for(batch, cache)
        return self.net.sample_actions(steps=steps, noise=noise, generator=generator, cache=cache,
                                       prefix_actions=prefix_actions, prefix_weights=prefix_weights)

    @torch.inference_mode()
    def chunk(self, batch: Batch, steps: int | None = None, noise: torch.Tensor | None = None,
              generator: torch.Generator | None = None, subtask: bool = True,
              prefix_actions: torch.Tensor | None = None, prefix_weights: torch.Tensor | None = None,
              draft: torch.Tensor | None = None) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(subtask ids (B, Ls) or None, actions (B, H, A)) for one observation batch: encode, reason (checking
        `draft`, the last chunk's subtask, first), act."""
        ids = None
        if subtask and self.config.subtask:
            ids, cache = self.reason(batch, draft=draft)
        else:
            cache = self.encode_prefix(batch)
        actions = self.sample_actions(steps=steps, noise=noise, generator=generator, cache=cache,
                                      prefix_actions=prefix_actions, prefix_weights=prefix_weights)
        return ids, actions


class _LoopEngine(Engine):
    """Engines whose flow is a Python Euler loop around a separate velocity function (compile, onnx)."""

    def _velocity_fn(self, cache: PrefixCache) -> Callable[[torch.Tensor, float], torch.Tensor]:
        raise NotImplementedError

    @torch.inference_mode()
    def sample_actions(self, batch: Batch | None = None, steps: int | None = None, noise: torch.Tensor | None = None,
                       generator: torch.Generator | None = None, cache: PrefixCache | None = None,
                       prefix_actions: torch.Tensor | None = None,
                       prefix_weights: torch.Tensor | None = None) -> torch.Tensor:
        cache = self._cache_for(batch, cache)
        cfg = self.config
        if cfg.action_head != "flow":  # one pass, nothing to loop over: the model does it
            return self.model.sample_actions(cache=cache, prefix_actions=prefix_actions, prefix_weights=prefix_weights)
        shape = (cache.batch_size, cfg.horizon, cfg.action_dim)
        guide = inpainting_target(prefix_actions, prefix_weights, shape)
        x = noise.float() if noise is not None else torch.randn(shape, generator=generator,
                                                                 device=cache.mask.device)
        velocity = self._velocity_fn(cache)
        steps = steps or cfg.flow_steps
        dt = 1.0 / steps
        for i in range(steps):
            t = 1.0 - i * dt
            v = velocity(x, t)
            x = x - dt * v if guide is None else inpainting_step(x, v, t, dt, *guide)
        if guide is not None:
            x = torch.where(guide[1] == 1, guide[0], x)
        return x * cache.action_mask[:, None, :].float()


class CompiledEngine(_LoopEngine):
    """torch.compile (inductor) of the prefix encoder and the velocity network; compiled on first use, once per
    input shape (with and without subtask tokens, the context differs; instructions are padded to a multiple of
    TEXT_ROUNDING tokens, so a few lengths cover them)."""

    backend = "compile"

    def __init__(self, model: PhysisModel, dtype: torch.dtype = torch.float32,
                 options: dict[str, Any] | None = None, unrolled: bool = False,
                 flow_dtype: torch.dtype | None = None, freeze: bool = False, fused: bool = False) -> None:
        """`dtype` bf16 compiles a bf16 copy of the weights; `options` are inductor settings (FROZEN_CPP,
        FROZEN_AMX); `freeze` folds the weights into the graphs (a snapshot: later changes to `model` do not reach
        them); `unrolled` compiles each chunk's whole flow loop as one graph (`FlowSampler`, one per step count), in
        `flow_dtype` (default `dtype`), and checks a subtask draft in the prefix's graph (`PrefixDraftEncoder`);
        `fused` runs batch-1 flow loops and, where the model allows, the trunk over batch-1 prefixes on the bf16
        kernels (`physis.runtime.fused`)."""
        from physis.runtime.export import PrefixDraftEncoder, PrefixEncoder, PrefixTokens, VelocityNet, reads_localizer

        super().__init__(model, None if dtype == torch.float32 else copy.deepcopy(model).to(dtype), dtype)
        self._options, self._freeze = options, freeze
        self._env_state = reads_localizer(model)  # the encoders also return the localizer's estimate
        self._encoder = self._compile(PrefixEncoder(self.net, self._env_state))
        self._velocity = self._compile(VelocityNet(self.net))
        self._samplers: dict[int, Callable[..., torch.Tensor]] | None = {} if unrolled else None
        self._flow_dtype = flow_dtype or dtype
        if self._flow_dtype == dtype:
            self._flow_net = self.net
        else:  # the float32 model itself, or a copy in another dtype
            self._flow_net = self.model if self._flow_dtype == torch.float32 else \
                copy.deepcopy(model).to(self._flow_dtype).eval()
        self._fused = self._trunk = self._tokens_kernel = None
        if fused:
            from physis.runtime.fused import FusedFlow, FusedTokens, FusedTrunk, tokens_supports, trunk_supports

            self._fused = FusedFlow(model)
            if trunk_supports(model) is None:  # the trunk over the prefix's tokens in a kernel
                self._trunk = FusedTrunk(model)
                if tokens_supports(model) is None:  # the tokens too
                    self._tokens_kernel = FusedTokens(model)
                else:  # the tokens from a graph (a tokenizer with stem blocks or keypoints)
                    self._tokens = self._compile(PrefixTokens(self.net, self._env_state))
                    if self.config.subtask:
                        self._draft_tokens = self._compile(PrefixTokens(self.net, self._env_state, draft=True))
        self._reasoner = None
        if unrolled and self.config.subtask:
            self._reasoner = self._compile(PrefixDraftEncoder(self.net, self._env_state))

    def _compile(self, module: nn.Module) -> Callable[..., Any]:
        graph = torch.compile(module, dynamic=False, options=self._options)
        return _Frozen(graph) if self._freeze else graph

    @torch.inference_mode()
    def sample_actions(self, batch: Batch | None = None, steps: int | None = None, noise: torch.Tensor | None = None,
                       generator: torch.Generator | None = None, cache: PrefixCache | None = None,
                       prefix_actions: torch.Tensor | None = None,
                       prefix_weights: torch.Tensor | None = None) -> torch.Tensor:
        if self._samplers is None or self.config.action_head != "flow":
            return super().sample_actions(batch, steps, noise, generator, cache, prefix_actions, prefix_weights)
        from physis.runtime.export import FlowSampler

        cache = self._cache_for(batch, cache)
        steps = steps or self.config.flow_steps
        shape = (cache.batch_size, self.config.horizon, self.config.action_dim)
        device = cache.mask.device
        x = noise.float() if noise is not None else torch.randn(shape, generator=generator, device=device)
        if self._fused is not None and cache.batch_size == 1:
            inpainting_target(prefix_actions, prefix_weights, shape)  # checks shapes and weights
            return self._fused(cache, x, steps, prefix_actions, prefix_weights)
        if prefix_actions is None or prefix_weights is None:  # all-zero weights: every step free
            prefix_actions, prefix_weights = torch.zeros(shape, device=device), torch.zeros(shape[:2], device=device)
        if steps not in self._samplers:
            self._samplers[steps] = self._compile(FlowSampler(self._flow_net, steps))
        # the context (prefix + subtask) varies with the instruction and the subtask; padded with masked keys to a
        # multiple of CONTEXT_ROUNDING, a few graphs serve every length instead of one compile per length
        pad = -cache.mask.shape[1] % CONTEXT_ROUNDING
        keys = F.pad(torch.stack(cache.keys), (0, 0, 0, pad)).to(self._flow_dtype)
        values = F.pad(torch.stack(cache.values), (0, 0, 0, pad)).to(self._flow_dtype)
        return self._samplers[steps](x, keys, values, F.pad(cache.mask, (0, pad), value=False), cache.action_mask,
                                     prefix_actions.float(), prefix_weights.float())

    @property
    def flow_dtype(self) -> torch.dtype:
        if self._fused is not None:  # a batch of one runs on the kernel, whose products are bf16 whatever the graphs'
            return torch.bfloat16
        return self._flow_dtype if self._samplers is not None else self.dtype

    def _graph_inputs(self, batch: Batch) -> Batch:
        batch = with_action_mask(self.inputs(batch), self.config.action_dim)
        # Policy trims the instruction to its length; a few padded lengths keep the compiles to a few graphs
        return pad_text_tokens(batch, TEXT_ROUNDING, self.config.max_text_tokens)

    @torch.inference_mode()
    def encode_prefix(self, batch: Batch) -> PrefixCache:
        from physis.runtime.export import BATCH_KEYS, stacked_cache

        if self._on_trunk_kernel(batch):
            tokens, mask, estimate = self._kernel_tokens(batch)
            keys, values, _, _ = self._trunk(tokens, mask)
        else:
            graph_batch = self._graph_inputs(batch)
            keys, values, mask, *env_state = self._encoder(*(graph_batch[k] for k in BATCH_KEYS))
            estimate = env_state[0] if env_state else None
        cache = stacked_cache(keys, values, mask, self._action_mask(batch))
        cache.env_state = estimate
        return cache

    def _on_trunk_kernel(self, batch: Batch) -> bool:
        """Whether this batch's prefix goes through the trunk kernel: fused, and one observation."""
        return self._trunk is not None and batch["state"].shape[0] == 1

    def _kernel_tokens(self, batch: Batch,
                       draft: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A batch-1 observation's prefix tokens for the trunk kernel (a padded draft's (1, n) after them), the key
        mask and the localizer's estimate (or None): from the tokens kernel where the model allows, else a graph."""
        from physis.runtime.export import BATCH_KEYS

        if self._tokens_kernel is not None:
            return (*self._tokens_kernel(batch, draft), None)
        batch = self._graph_inputs(batch)
        graph = self._tokens if draft is None else self._draft_tokens
        tokens, mask, *env_state = graph(*(batch[k] for k in BATCH_KEYS), *(() if draft is None else (draft,)))
        return tokens, mask, env_state[0] if env_state else None

    def _action_mask(self, batch: Batch) -> torch.Tensor:
        return with_action_mask(batch, self.config.action_dim)["action_mask"].bool()

    def generate_subtask(self, cache: PrefixCache,
                         draft: torch.Tensor | None = None) -> tuple[torch.Tensor, PrefixCache]:
        if cache.keys[0].dtype != self.dtype:  # the trunk kernel's float32 keys, for the decode in the net's dtype
            cache = dataclasses.replace(cache, keys=[k.to(self.dtype) for k in cache.keys],
                                        values=[v.to(self.dtype) for v in cache.values])
        return super().generate_subtask(cache, draft)

    @torch.inference_mode()
    def reason(self, batch: Batch, draft: torch.Tensor | None = None) -> tuple[torch.Tensor, PrefixCache]:
        """With a draft, one graph encodes the prefix and checks it (a subtask changes a few times an episode, so
        most chunks end there); a draft the decode does not reproduce goes on eagerly from the prefix."""
        from physis.runtime.export import BATCH_KEYS, stacked_cache

        if draft is None or self._reasoner is None:
            return super().reason(batch, draft)
        n = self.config.max_subtask_tokens
        # the draft's bookkeeping runs on lists: a dozen ids a row, where each library call would cost ~10 us
        rows, last = padded_draft_rows(draft.tolist(), n)
        d = torch.tensor(rows, dtype=torch.long, device=batch["state"].device)
        if self._on_trunk_kernel(batch):
            tokens, mask, estimate = self._kernel_tokens(batch, d)
            keys, values, pred, gap = self._trunk(tokens, mask, d)
        else:
            graph_batch = self._graph_inputs(batch)
            keys, values, mask, pred, gap, *env_state = self._reasoner(*(graph_batch[k] for k in BATCH_KEYS), d)
            estimate = env_state[0] if env_state else None
        action_mask, p = self._action_mask(batch), mask.shape[1]
        # the draft stands where the decode reproduces it up to its EOS, or nearly: a token within DRAFT_TIE of the
        # best logit counts
        if all(draft_agrees(*row) for row in zip(rows, last, pred.tolist(), gap.tolist(), strict=True)):
            ids = [[t if j <= end else PAD for j, t in enumerate(row)] for row, end in zip(rows, last, strict=True)]
            ids_t = torch.tensor(ids, dtype=torch.long, device=d.device)
            cache = stacked_cache(keys, values, torch.cat([mask, ids_t != PAD], 1), action_mask, prefix_len=p)
            cache.subtask_ids, cache.env_state = ids_t, estimate
            return ids_t, cache
        prefix = stacked_cache(keys[..., :p, :], values[..., :p, :], mask, action_mask)
        prefix.env_state = estimate
        return self.generate_subtask(prefix, draft)

    def _velocity_fn(self, cache: PrefixCache) -> Callable[[torch.Tensor, float], torch.Tensor]:
        keys, values = torch.stack(cache.keys), torch.stack(cache.values)
        b = cache.batch_size
        device = cache.mask.device
        return lambda x, t: self._velocity(x, torch.full((b,), t, device=device), keys, values, cache.mask,
                                           cache.action_mask)


class _Frozen:
    """A torch.compile'd module whose weights are frozen into its graphs for real: dynamo reads inductor's global
    `freezing`, not the compile option, so each input signature's first call (the one that traces) runs under it."""

    def __init__(self, graph: Callable[..., Any]) -> None:
        self.graph = graph
        self.traced: set[tuple] = set()

    def __call__(self, *args: torch.Tensor) -> Any:
        signature = tuple((a.shape, a.dtype) for a in args)
        if signature in self.traced:
            return self.graph(*args)
        with _freezing():
            out = self.graph(*args)
        self.traced.add(signature)
        return out


@contextlib.contextmanager
def _freezing() -> Iterator[None]:
    """Inductor's freezing for the graphs traced inside, without max-autotune's tables of timings on stderr."""
    from torch._inductor import select_algorithm

    quiet = mock.patch.object(select_algorithm, "PRINT_AUTOTUNE", False, create=True)
    with torch._inductor.config.patch(freezing=True), quiet, warnings.catch_warnings():
        warnings.filterwarnings("ignore", "TypedStorage is deprecated")  # inductor's own use of it
        yield


class OnnxEngine(_LoopEngine):
    """ONNX Runtime sessions for the encoder, the subtask step and the velocity network.

    The graphs come from `export_onnx` into `onnx_dir` (a temporary directory by default); a directory that
    already holds graphs of the same weights and config is reused, since exporting takes a while. With
    int8=True the graphs' MatMul weights are quantized to int8 (ONNX Runtime's dynamic quantization) into
    `onnx_dir/int8/` and those run instead.
    """

    backend = "onnx"

    def __init__(self, model: PhysisModel, onnx_dir: str | Path | None = None, threads: int | None = None,
                 int8: bool = False, spin: bool = False) -> None:
        import onnxruntime as ort

        from physis.runtime.export import export_onnx, exported_parts, quantize_onnx

        super().__init__(model)
        if onnx_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="physis-onnx-")
            onnx_dir = self._tmp.name
        self.onnx_dir = Path(onnx_dir)
        parts = ("encoder", "subtask", "velocity") if self.config.subtask else ("encoder", "velocity")
        if not set(parts) <= set(exported_parts(self.model, self.onnx_dir)):
            export_onnx(self.model, self.onnx_dir, parts=parts)
        graphs = {p: self.onnx_dir / f"{p}.onnx" for p in parts}
        if int8:
            for p, path in graphs.items():
                graphs[p] = self.onnx_dir / "int8" / path.name
                if not graphs[p].is_file() or graphs[p].stat().st_mtime_ns < path.stat().st_mtime_ns:
                    quantize_onnx(path, graphs[p])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # Idle worker threads sleep instead of spinning: where another process shares a core (a robot's own
        # stack, a training run) spinning threads made a chunk ~8x slower at 2 threads; spin=True on a quiet box.
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
        self._sessions = {p: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                          for p, path in graphs.items()}
        self._inputs = {p: [i.name for i in s.get_inputs()] for p, s in self._sessions.items()}

    def _run(self, part: str, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return self._sessions[part].run(None, {k: feeds[k] for k in self._inputs[part]})

    @torch.inference_mode()
    def encode_prefix(self, batch: Batch) -> PrefixCache:
        from physis.runtime.export import stacked_cache

        batch = with_action_mask(batch, self.config.action_dim)
        keys, values, mask = self._run("encoder", {k: v.numpy() for k, v in batch.items()})
        return stacked_cache(torch.from_numpy(keys), torch.from_numpy(values), torch.from_numpy(mask),
                             batch["action_mask"].bool())

    @torch.inference_mode()
    def generate_subtask(self, cache: PrefixCache,
                         draft: torch.Tensor | None = None) -> tuple[torch.Tensor, PrefixCache]:
        """Greedy ids as `PhysisModel.generate_subtask`, one graph call per token; the keys/values of earlier
        tokens wait in numpy buffers that become the extended cache. The exported step graph takes one token,
        so a draft is not used here (the ids come out the same without it)."""
        if not self.config.subtask:
            raise RuntimeError("OnnxEngine.generate_subtask: this model was built with subtask=False")
        base = cache.prefix_only()
        b, n, p = base.batch_size, self.config.max_subtask_tokens, base.prefix_len
        keys = torch.stack(base.keys)
        layers, _, heads, _, hd = keys.shape
        kbuf = np.zeros((layers, b, heads, p + n, hd), np.float32)
        vbuf = np.zeros_like(kbuf)
        kbuf[..., :p, :], vbuf[..., :p, :] = keys.numpy(), torch.stack(base.values).numpy()
        mask = np.full((b, 1, 1, p + n), -np.inf, np.float32)
        mask[:, 0, 0, :p][base.mask.numpy()] = 0.0
        ids = np.full((b, n), PAD, np.int64)
        ids[:, 0] = BOS
        done = np.zeros(b, dtype=bool)
        for i in range(n):
            logits, k, v = self._run("subtask", {"token": ids[:, i : i + 1], "position": np.array([i], np.int64),
                                                 "keys": kbuf, "values": vbuf, "mask": mask})
            kbuf[..., p + i, :], vbuf[..., p + i, :] = k[..., 0, :], v[..., 0, :]
            mask[..., p + i] = 0.0
            if i + 1 == n or done.all():
                break
            logits[:, [PAD, BOS]] = -np.inf
            nxt = np.where(done, PAD, logits.argmax(-1))
            ids[:, i + 1] = nxt
            done |= nxt == EOS
        ids_t = torch.from_numpy(ids)
        extended = PrefixCache(list(torch.from_numpy(kbuf).unbind(0)), list(torch.from_numpy(vbuf).unbind(0)),
                               torch.cat([base.mask, ids_t != PAD], 1), base.pooled, base.action_mask,
                               base.prefix_len, base.cameras, ids_t, base.env_state)
        return ids_t, extended

    def _velocity_fn(self, cache: PrefixCache) -> Callable[[torch.Tensor, float], torch.Tensor]:
        b = cache.batch_size
        feeds = {"keys": torch.stack(cache.keys).numpy(), "values": torch.stack(cache.values).numpy(),
                 "ctx_mask": cache.mask.numpy(), "action_mask": cache.action_mask.numpy()}

        def velocity(x: torch.Tensor, t: float) -> torch.Tensor:
            out = self._run("velocity", {**feeds, "x": x.numpy(), "t": np.full((b,), t, np.float32)})[0]
            return torch.from_numpy(out)

        return velocity


def make_engine(model: PhysisModel, backend: str = "eager", **options: Any) -> Engine:
    """An engine for `backend` (one of BACKENDS); options go to the engine (onnx: onnx_dir, threads, spin)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown inference backend {backend!r}; expected one of {BACKENDS}")
    model = model.eval()
    if backend == "eager":
        return Engine(model)
    if backend == "bf16":
        engine = Engine(model, copy.deepcopy(model).to(torch.bfloat16), torch.bfloat16)
    elif backend == "int8":
        with warnings.catch_warnings():  # the eager quantization API warns that it is deprecated; it still works
            warnings.simplefilter("ignore")
            net = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear}, dtype=torch.qint8)
        # the action-token layers stay float: the flow loop folds their weights into per-chunk terms
        net.action_in = copy.deepcopy(model.action_in)
        if hasattr(model, "action_time"):
            net.action_time = copy.deepcopy(model.action_time)
        engine = Engine(model, net)
    elif backend == "compile":
        engine = CompiledEngine(model)
    elif backend == "compile-bf16":
        engine = CompiledEngine(model, torch.bfloat16, unrolled=True, **_bf16_graphs(model))
    elif backend == "fused":
        from physis.runtime.fused import supports

        why = supports(model) if next(model.parameters()).device.type == "cpu" else "the model is not on the CPU"
        if why is not None:
            raise RuntimeError(f"the fused backend cannot run this model here: {why}")
        # its tokens graph and the graphs for batches of more than one, as compile-bf16's
        engine = CompiledEngine(model, torch.bfloat16, unrolled=True, fused=True, **_bf16_graphs(model))
    elif backend == "cuda-graph":
        from physis.runtime.graphs import GraphEngine

        engine = GraphEngine(model)
    else:
        engine = OnnxEngine(model, int8=backend == "onnx-int8", **options)
    engine.backend = backend
    return engine


def _bf16_graphs(model: PhysisModel) -> dict[str, Any]:
    """compile-bf16's settings here: on a CPU with AMX every graph bf16 with its weights frozen in (FROZEN_AMX),
    elsewhere FROZEN_CPP and the flow loop in float32."""
    from physis.runtime.fused import amx_cpu

    if amx_cpu() and next(model.parameters()).device.type == "cpu":
        return dict(options=FROZEN_AMX, freeze=True)
    return dict(options=FROZEN_CPP, flow_dtype=torch.float32)


def draft_agrees(draft: list[int], last: int, pred: list[int], gap: list[float]) -> bool:
    """Whether a decode reproduces a padded draft (BOS w..) through its `last` position: at each position before it
    the greedy next token (pred) is the draft's, or the draft's falls behind it by at most DRAFT_TIE (gap)."""
    return all(p == t or g <= DRAFT_TIE for p, t, g in zip(pred[:last], draft[1 : last + 1], gap[:last], strict=True))


def with_action_mask(batch: Batch, action_dim: int) -> Batch:
    """The batch with an all-true action mask when it has none."""
    if "action_mask" in batch:
        return batch
    b, device = batch["images"].shape[0], batch["images"].device
    return {**batch, "action_mask": torch.ones(b, action_dim, dtype=torch.bool, device=device)}
