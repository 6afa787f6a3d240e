"""The `cuda-graph` backend: the prefix encoder and the whole K-step flow loop captured as CUDA graphs.

On a GPU a `small` chunk is bound by kernel launches, not arithmetic: about a thousand small kernels, a few
microseconds each to launch, made a chunk take as long on an H200 as on two CPU cores (docs/benchmarks/
runtime.md). A captured graph launches all of a part's kernels at once. Each part is captured once per input
shape (instruction length, flow steps, with or without subtask tokens) on first use; the subtask, whose
length the model decides as it goes, stays eager.

On a CPU the same engine runs each part eagerly through the same static buffers, so its bookkeeping is tested
where there is no GPU.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from physis.model.physis_model import PhysisModel, inpainting_target
from physis.model.trunk import PrefixCache
from physis.runtime.backends import Batch, Engine, with_action_mask
from physis.runtime.export import BATCH_KEYS, FlowSampler, PrefixEncoder, stacked_cache


class StaticCall:
    """fn over static input buffers: each call copies its inputs in and replays the captured graph (CUDA) or
    runs fn (CPU). The outputs are the same tensors every call, overwritten by the next one."""

    def __init__(self, fn: Callable[..., Sequence[torch.Tensor]], inputs: Sequence[torch.Tensor]) -> None:
        self.fn = fn
        self.inputs = [t.clone() for t in inputs]
        self.graph: torch.cuda.CUDAGraph | None = None
        self.outputs: list[torch.Tensor] | None = None
        if self.inputs[0].device.type == "cuda":
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up off the capture stream, as CUDA graphs require
                for _ in range(2):
                    fn(*self.inputs)
            torch.cuda.current_stream().wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.outputs = list(fn(*self.inputs))

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        for buffer, value in zip(self.inputs, inputs, strict=True):
            buffer.copy_(value)
        if self.graph is not None:
            self.graph.replay()
        elif self.outputs is None:
            self.outputs = list(self.fn(*self.inputs))
        else:  # on a CPU, overwrite the same output buffers, as a replay does
            for buffer, value in zip(self.outputs, self.fn(*self.inputs), strict=True):
                buffer.copy_(value)
        return self.outputs


def _signature(tensors: Sequence[torch.Tensor]) -> tuple:
    return tuple((tuple(t.shape), t.dtype) for t in tensors)


class GraphEngine(Engine):
    """Prefix encoder and flow loop replayed from CUDA graphs; subtask generation eager."""

    backend = "cuda-graph"

    def __init__(self, model: PhysisModel) -> None:
        super().__init__(model)
        self._encoder = PrefixEncoder(self.net)
        self._samplers: dict[int, FlowSampler] = {}
        self._calls: dict[tuple, StaticCall] = {}

    def _call(self, key: tuple, fn: Callable[..., Sequence[torch.Tensor]],
              inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        key = (*key, _signature(inputs))
        if key not in self._calls:
            self._calls[key] = StaticCall(fn, inputs)
        return self._calls[key](inputs)

    @torch.inference_mode()
    def encode_prefix(self, batch: Batch) -> PrefixCache:
        batch = with_action_mask(batch, self.config.action_dim)
        keys, values, mask = self._call(("encoder",), self._encoder, [batch[k] for k in BATCH_KEYS])
        # copies: the next chunk's replay overwrites the graph's outputs while this cache may still be in use
        return stacked_cache(keys.clone(), values.clone(), mask.clone(), batch["action_mask"].bool())

    @torch.inference_mode()
    def sample_actions(self, batch: Batch | None = None, steps: int | None = None, noise: torch.Tensor | None = None,
                       generator: torch.Generator | None = None, cache: PrefixCache | None = None,
                       prefix_actions: torch.Tensor | None = None,
                       prefix_weights: torch.Tensor | None = None) -> torch.Tensor:
        """As `PhysisModel.sample_actions`: an action chunk (B, H, A), float32."""
        cache = self._cache_for(batch, cache)
        cfg = self.config
        if cfg.action_head != "flow":  # one pass, nothing to loop over
            return super().sample_actions(cache=cache, prefix_actions=prefix_actions, prefix_weights=prefix_weights)
        steps = steps or cfg.flow_steps
        shape = (cache.batch_size, cfg.horizon, cfg.action_dim)
        device = cache.mask.device
        x = noise.float() if noise is not None else torch.randn(shape, generator=generator, device=device)
        if inpainting_target(prefix_actions, prefix_weights, shape) is None:  # checks shapes and weights
            # all-zero weights: the sampler's inpainting leaves every step free
            prefix_actions = torch.zeros(shape, device=device)
            prefix_weights = torch.zeros(shape[:2], device=device)
        if steps not in self._samplers:
            self._samplers[steps] = FlowSampler(self.net, steps)
        sampler = self._samplers[steps]
        inputs = [x.to(self.dtype), torch.stack(cache.keys), torch.stack(cache.values), cache.mask,
                  cache.action_mask, prefix_actions.to(self.dtype), prefix_weights.to(self.dtype)]
        (actions,) = self._call(("flow", steps), lambda *a: [sampler(*a)], inputs)
        return actions.to(torch.float32, copy=True)  # the graph's output buffer is reused by the next chunk
