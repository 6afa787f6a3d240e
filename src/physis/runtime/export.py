"""ONNX export of what PhysisModel runs per chunk, for ONNX Runtime (`physis.runtime.backends.OnnxEngine`).

Each graph is a small functional wrapper around the model (no weight is copied or changed):
  encoder   observation tensors -> per-layer prefix keys/values (L, B, heads, N, head_dim), key mask (B, N)
  subtask   one greedy subtask token: the token, its position and the keys/values so far -> logits and the
            token's own keys/values (the caller writes them into its buffers: a KV cache across calls)
  velocity  one flow step: noisy actions, t and the context keys/values -> velocity (B, H, A)
  flow      a whole chunk with K Euler steps unrolled, inpainting included (for runtimes without Python)
Batch size and context length are dynamic. Export traces the model once per graph: it takes seconds for
`tiny` and minutes for `base`, so engines keep exported files and reuse them (see `OnnxEngine`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from physis.model.physis_model import PhysisModel, inpainting_step
from physis.model.trunk import PrefixCache, attention, key_mask, subtask_attention_mask
from physis.model.vocab import BOS, PAD

log = logging.getLogger(__name__)

BATCH_KEYS = ("images", "image_mask", "state", "state_mask", "text", "text_mask", "embodiment", "action_mask")
PARTS = ("encoder", "subtask", "velocity", "flow")
OPSET = 18
MARKER = "physis-onnx.json"


def stacked_cache(keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, action_mask: torch.Tensor,
                  prefix_len: int | None = None) -> PrefixCache:
    """A PrefixCache over stacked keys/values (L, B, heads, N, head_dim), as the graphs take and give them."""
    n = mask.shape[1] if prefix_len is None else prefix_len
    return PrefixCache(list(keys.unbind(0)), list(values.unbind(0)), mask, None, action_mask, n)


def reads_localizer(model: PhysisModel) -> bool:
    """Whether the model's prefix estimates the environment state itself (the keypoint localizer), so that an
    encoder graph can return the estimate beside the keys and values."""
    return bool(model.config.localizer and model.config.env_state_dim)


class PrefixEncoder(nn.Module):
    """Observation tensors -> keys, values (L, B, heads, N, head_dim) and key mask (B, N) of the prefix; with
    `env_state`, also the localizer's estimate (B, env_state_dim)."""

    def __init__(self, model: PhysisModel, env_state: bool = False) -> None:
        super().__init__()
        if env_state and not reads_localizer(model):
            raise ValueError("PrefixEncoder: env_state=True needs a model with the keypoint localizer")
        self.model, self.env_state = model, env_state

    def forward(self, images: torch.Tensor, image_mask: torch.Tensor, state: torch.Tensor, state_mask: torch.Tensor,
                text: torch.Tensor, text_mask: torch.Tensor, embodiment: torch.Tensor,
                action_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        batch = {"images": images, "image_mask": image_mask, "state": state, "state_mask": state_mask, "text": text,
                 "text_mask": text_mask, "embodiment": embodiment, "action_mask": action_mask}
        cache = self.model._encode(batch, pooled=False)[0]
        out = torch.stack(cache.keys), torch.stack(cache.values), cache.mask
        return (*out, cache.env_state) if self.env_state else out


class PrefixTokens(nn.Module):
    """The observation's prefix tokens, as the trunk reads them, for a trunk that runs elsewhere (the `fused`
    backend's kernel).

    Inputs: the observation tensors of `PrefixEncoder`, then with `draft` a subtask draft (B, n) int64 as
    `PrefixDraftEncoder` takes it. Outputs: tokens (B, N (+ n), width) float32, the draft's embeddings after the
    prefix's; the prefix key mask (B, N); with `env_state`, the localizer's estimate (B, env_state_dim).
    """

    def __init__(self, model: PhysisModel, env_state: bool = False, draft: bool = False) -> None:
        super().__init__()
        if draft and not model.config.subtask:
            raise ValueError("PrefixTokens: the model was built with subtask=False")
        if env_state and not reads_localizer(model):
            raise ValueError("PrefixTokens: env_state=True needs a model with the keypoint localizer")
        self.model, self.env_state, self.draft = model, env_state, draft

    def forward(self, images: torch.Tensor, image_mask: torch.Tensor, state: torch.Tensor, state_mask: torch.Tensor,
                text: torch.Tensor, text_mask: torch.Tensor, embodiment: torch.Tensor, action_mask: torch.Tensor,
                draft: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        m = self.model
        batch = {"images": images, "image_mask": image_mask, "state": state, "state_mask": state_mask, "text": text,
                 "text_mask": text_mask, "embodiment": embodiment, "action_mask": action_mask}
        tokens, mask, _, env_state = m.prefix(batch)
        if self.draft:
            if draft is None:
                raise ValueError("PrefixTokens: built with draft=True, called without a draft")
            tokens = torch.cat([tokens, m.subtask_emb(draft) + m.subtask_pos[: draft.shape[1]]], 1)
        out = tokens.float(), mask
        return (*out, env_state) if self.env_state else out


class PrefixDraftEncoder(nn.Module):
    """The prefix and a subtask draft in one pass: what a chunk whose subtask is unchanged needs from the trunk.

    Inputs: the observation tensors of `PrefixEncoder`, then draft (B, n) int64 (BOS w.. EOS PAD.., n =
    max_subtask_tokens). Outputs: keys, values (L, B, heads, N + n, head_dim) of the prefix and the draft, the
    prefix key mask (B, N), pred (B, n - 1) int64: the greedy token after each draft position, which checks the
    draft as `PhysisModel.generate_subtask` does (the draft's own keys after its EOS are never attended), and gap
    (B, n - 1) float32: the best logit there less the draft token's, over the best's magnitude (at least 1; 0 where
    they agree); with `env_state`, also the localizer's estimate (B, env_state_dim).
    """

    def __init__(self, model: PhysisModel, env_state: bool = False) -> None:
        super().__init__()
        if not model.config.subtask:
            raise ValueError("PrefixDraftEncoder: the model was built with subtask=False")
        if env_state and not reads_localizer(model):
            raise ValueError("PrefixDraftEncoder: env_state=True needs a model with the keypoint localizer")
        self.model, self.env_state = model, env_state

    def forward(self, images: torch.Tensor, image_mask: torch.Tensor, state: torch.Tensor, state_mask: torch.Tensor,
                text: torch.Tensor, text_mask: torch.Tensor, embodiment: torch.Tensor, action_mask: torch.Tensor,
                draft: torch.Tensor) -> tuple[torch.Tensor, ...]:
        m = self.model
        batch = {"images": images, "image_mask": image_mask, "state": state, "state_mask": state_mask, "text": text,
                 "text_mask": text_mask, "embodiment": embodiment, "action_mask": action_mask}
        n = draft.shape[1]
        sub = m.subtask_emb(draft) + m.subtask_pos[:n]
        if m.backbone is not None:  # the backbone encodes the prefix; the draft follows through physis's blocks
            cache = m._encode(batch, pooled=False)[0]
            hidden, keys, values = m._trunk_extend(sub, cache.keys, cache.values, cache.mask)
            mask, env_state = cache.mask, cache.env_state
        else:  # prefix and draft through each block together: a few larger matmuls instead of twice as many
            tokens, mask, _, env_state = m.prefix(batch)
            p = tokens.shape[1]
            prefix_rows = torch.cat([key_mask(mask, p), torch.zeros_like(mask[:, None, None, :1]).expand(-1, 1, p, n)],
                                    dim=-1)  # the prefix never reads the draft
            attn = torch.cat([prefix_rows, subtask_attention_mask(mask, n)], dim=2)
            x, keys, values = torch.cat([tokens, sub], 1), [], []
            for block in m.blocks[:-1]:
                x, k, v = block(x, attn)
                keys.append(k)
                values.append(v)
            last = m.blocks[-1]  # only the draft's queries go on: the prefix's last hidden states feed nothing
            q, k, v = last._split(x)
            hidden = m.norm(last._finish(x[:, p:], attention(q[:, :, p:], k, v, attn[:, :, p:])))
            keys.append(k)
            values.append(v)
        logits = m.subtask_out(hidden[:, :-1]).float()  # hidden is normed
        logits[..., [PAD, BOS]] = float("-inf")
        best, pred = logits.max(-1)
        # how far the draft's token falls behind the best, relative to the best logit's size (at least 1)
        gap = (best - logits.gather(-1, draft[:, 1:, None]).squeeze(-1)) / best.abs().clamp(min=1.0)
        out = torch.stack(keys), torch.stack(values), mask, pred, gap
        return (*out, env_state) if self.env_state else out


class SubtaskStep(nn.Module):
    """One subtask token through the trunk.

    Inputs: token (B, 1) int64, position (1,) int64, keys/values (L, B, heads, N, head_dim) holding the prefix and
    the earlier tokens, mask (B, 1, 1, N) additive (0 = may attend, -inf = not; the token itself is appended).
    Outputs: next-token logits (B, V), the token's keys and values (L, B, heads, 1, head_dim).
    """

    def __init__(self, model: PhysisModel) -> None:
        super().__init__()
        if not model.config.subtask:
            raise ValueError("SubtaskStep: the model was built with subtask=False")
        self.model = model

    def forward(self, token: torch.Tensor, position: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m = self.model
        x = m.subtask_emb(token) + m.subtask_pos[position]
        mask = torch.cat([mask, torch.zeros_like(mask[..., :1])], dim=-1)
        own_k, own_v = [], []
        for i, block in enumerate(m.blocks):
            x, k, v = block(x, mask, keys[i], values[i])
            own_k.append(k)
            own_v.append(v)
        return m.subtask_out(m.norm(x[:, -1])), torch.stack(own_k), torch.stack(own_v)


class VelocityNet(nn.Module):
    """One flow step: (x (B, H, A), t (B,), keys, values, ctx_mask (B, N), action_mask (B, A)) -> velocity."""

    def __init__(self, model: PhysisModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, t: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                ctx_mask: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
        return self.model.predict_velocity(stacked_cache(keys, values, ctx_mask, action_mask), x, t)


class FlowSampler(nn.Module):
    """A whole chunk, as `PhysisModel.sample_actions` with the inpainting hook, `steps` Euler steps unrolled.

    Inputs: noise (B, H, A), keys, values, ctx_mask, action_mask, prefix_actions (B, H, A), prefix_weights (B, H);
    all-zero weights sample freely. Output: actions (B, H, A), zero outside the action mask.
    """

    def __init__(self, model: PhysisModel, steps: int) -> None:
        super().__init__()
        if model.config.action_head != "flow":
            raise ValueError("FlowSampler: the model has the mse action head; there is no flow to unroll")
        self.model, self.steps = model, steps

    def forward(self, noise: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, ctx_mask: torch.Tensor,
                action_mask: torch.Tensor, prefix_actions: torch.Tensor, prefix_weights: torch.Tensor) -> torch.Tensor:
        w = prefix_weights[..., None]
        x, dt = noise, 1.0 / self.steps
        times = [1.0 - i * dt for i in range(self.steps)]
        # the eager loop's per-chunk context: the x-independent parts of the action tokens per step, one matmul
        # fewer a step, and key/value buffers the action tokens are written into instead of concatenated
        flow = self.model._flow_context(stacked_cache(keys, values, ctx_mask, action_mask), noise.shape[1], times)
        for i, t in enumerate(times):
            v = self.model._flow_velocity(flow, x, i)
            x = inpainting_step(x, v, t, dt, prefix_actions, w)
        x = torch.where(w == 1, prefix_actions, x)
        return x * action_mask[:, None, :].to(x.dtype)


def example_batch(model: PhysisModel, batch: int = 1, seed: int = 0,
                  text_tokens: int | None = None) -> dict[str, torch.Tensor]:
    """Observation tensors shaped as the model's config says (every camera; an instruction of `text_tokens`
    tokens, default the longest the model takes), for export, warm-up and benchmarks."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    s, n_text = cfg.image_size, text_tokens or cfg.max_text_tokens
    if not 1 <= n_text <= cfg.max_text_tokens:
        raise ValueError(f"example_batch: text_tokens must be 1..{cfg.max_text_tokens}, got {n_text}")
    return {
        "images": torch.rand(batch, cfg.cameras, cfg.history, 3, s, s, generator=g),
        "image_mask": torch.ones(batch, cfg.cameras, dtype=torch.bool),
        "state": torch.randn(batch, cfg.state_dim, generator=g),
        "state_mask": torch.ones(batch, cfg.state_dim, dtype=torch.bool),
        "text": torch.randn(batch, n_text, cfg.text_dim, generator=g),
        "text_mask": torch.ones(batch, n_text, dtype=torch.bool),
        "embodiment": torch.zeros(batch, dtype=torch.long),
        "action_mask": torch.ones(batch, cfg.action_dim, dtype=torch.bool),
    }


def export_onnx(model: PhysisModel, out_dir: str | Path, parts: tuple[str, ...] = ("encoder", "subtask", "velocity"),
                steps: int | None = None) -> dict[str, Path]:
    """Write `<part>.onnx` for each of `parts` (see the module docstring) into out_dir; returns {part: path}.

    `steps` fixes the flow graph's Euler steps (default: the config's). The subtask part is skipped for a
    model without that head, the flow part for the mse action head. `MARKER` (JSON) records what was
    exported from which weights, so that `exported_parts` can tell later whether the graphs still fit.
    """
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        raise ValueError(f"export_onnx: unknown parts {unknown}; expected some of {PARTS}")
    if model.config.backbone is not None:
        raise ValueError("export_onnx: models with a Hugging Face backbone are not exported")
    cfg = model.config
    parts = tuple(p for p in parts if not (p == "subtask" and not cfg.subtask)
                  and not (p == "flow" and cfg.action_head != "flow"))
    model = model.eval()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    batch = example_batch(model)
    with torch.inference_mode():
        cache = model.encode_prefix(batch, pooled=False)
        if cfg.subtask:
            cache = model.generate_subtask(cache)[1]
    keys, values = torch.stack(cache.keys).clone(), torch.stack(cache.values).clone()  # normal tensors, not inference
    ctx = (keys, values, cache.mask.clone(), cache.action_mask.clone())
    x = torch.randn(1, cfg.horizon, cfg.action_dim)
    b, n = torch.export.Dim("batch"), torch.export.Dim("context")
    ctx_dims = {"keys": {1: b, 3: n}, "values": {1: b, 3: n}, "ctx_mask": {0: b, 1: n}, "action_mask": {0: b}}
    paths: dict[str, Path] = {}
    for part in parts:
        if part == "encoder":
            module, args = PrefixEncoder(model), tuple(batch[k] for k in BATCH_KEYS)
            names, outputs = list(BATCH_KEYS), ["keys", "values", "ctx_mask"]
            dims = {k: {0: b} for k in BATCH_KEYS}
            text = torch.export.Dim("text")  # instructions may come padded to another length
            dims["text"], dims["text_mask"] = {0: b, 1: text}, {0: b, 1: text}
        elif part == "subtask":
            module = SubtaskStep(model)
            mask = torch.zeros(1, 1, 1, keys.shape[3])
            args = (torch.ones(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long), keys, values, mask)
            names, outputs = ["token", "position", "keys", "values", "mask"], ["logits", "token_keys", "token_values"]
            dims = {"token": {0: b}, "keys": {1: b, 3: n}, "values": {1: b, 3: n}, "mask": {0: b, 3: n}}
        elif part == "velocity":
            module, args = VelocityNet(model), (x, torch.ones(1), *ctx)
            names, outputs = ["x", "t", "keys", "values", "ctx_mask", "action_mask"], ["velocity"]
            dims = {"x": {0: b}, "t": {0: b}, **ctx_dims}
        else:
            module = FlowSampler(model, steps or cfg.flow_steps)
            args = (x, *ctx, torch.zeros_like(x), torch.zeros(1, cfg.horizon))
            names = ["noise", "keys", "values", "ctx_mask", "action_mask", "prefix_actions", "prefix_weights"]
            outputs = ["actions"]
            dims = {"noise": {0: b}, **ctx_dims, "prefix_actions": {0: b}, "prefix_weights": {0: b}}
        paths[part] = out / f"{part}.onnx"
        _export(module, args, names, outputs, dims, paths[part])
    stamp = _stamp(model)
    stamp.update(parts=list(paths), flow_steps=steps or cfg.flow_steps if "flow" in paths else None)
    (out / MARKER).write_text(json.dumps(stamp))
    return paths


def exported_parts(model: PhysisModel, out_dir: str | Path) -> list[str]:
    """The parts exported into out_dir from exactly this model (same weights, config and torch), else []."""
    marker = Path(out_dir) / MARKER
    if not marker.is_file():
        return []
    stamp = json.loads(marker.read_text())
    # compared as JSON, as written: a config's tuples read back as lists
    if {k: stamp.get(k) for k in ("weights", "config", "torch")} != json.loads(json.dumps(_stamp(model))):
        return []
    return [p for p in stamp.get("parts", []) if (Path(out_dir) / f"{p}.onnx").is_file()]


def quantize_onnx(src: str | Path, dst: str | Path) -> Path:
    """An exported graph with int8 weights for its MatMuls (activations quantized on the fly) at dst."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    quiet = logging.getLogger()
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the quantizer logs advice on the root logger for every graph
    try:
        quantize_dynamic(Path(src), dst, weight_type=QuantType.QInt8)
    finally:
        quiet.setLevel(level)
    return dst


def weights_fingerprint(model: nn.Module) -> str:
    """A short hash of every parameter and buffer, to tell whether exported graphs still fit a model."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().float().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _stamp(model: PhysisModel) -> dict:
    return {"weights": weights_fingerprint(model), "config": model.config.to_dict(), "torch": torch.__version__}


def _export(module: nn.Module, args: tuple, names: list[str], outputs: list[str], dims: dict, path: Path) -> None:
    # The TorchScript exporter: for these graphs it is about ten times faster than the dynamo exporter
    # (seconds, not minutes) and gives the same graphs to within float rounding.
    axes = {name: {i: f"{name}_{i}" for i in d} for name, d in dims.items()}
    for name, d in dims.items():  # dimensions that share a Dim share a name
        for i, dim in d.items():
            axes[name][i] = dim.__name__
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracer warnings about shapes turned into constants: checked by tests
        torch.onnx.export(module, args, str(path), input_names=names, output_names=outputs, dynamic_axes=axes,
                          opset_version=OPSET, dynamo=False)
    log.info("exported %s", path)
