"""ONNX export and the inference backends against the eager float32 model (tiny preset, random weights)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from physis.model import ModelConfig, PhysisModel
from physis.runtime.backends import make_engine
from physis.runtime.export import example_batch, export_onnx

pytest.importorskip("onnxruntime")
H, A = 8, 7


@pytest.fixture(scope="module")
def model() -> PhysisModel:
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", image_size=32, action_dim=A, state_dim=5, horizon=H, cameras=2,
                             subtask_vocab=("reach", "the", "goal", "push", "block"))
    return PhysisModel(cfg).eval()


@pytest.fixture(scope="module")
def onnx_dir(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx")
    paths = export_onnx(model, out, parts=("encoder", "subtask", "velocity", "flow"), steps=3)
    assert sorted(paths) == ["encoder", "flow", "subtask", "velocity"]
    assert all(p.stat().st_size > 0 for p in paths.values())
    return out


@pytest.fixture(scope="module")
def compiled(model):
    """One compile-bf16 engine for the module's tests: each graph it builds takes tens of seconds, and tests
    that meet the same input signature share it."""
    return make_engine(model, "compile-bf16")


def batch_of(model: PhysisModel, b: int, seed: int) -> dict[str, torch.Tensor]:
    """Another batch size, instruction length and camera set than the graphs were exported with."""
    batch = example_batch(model, batch=b, seed=seed)
    batch["text"], batch["text_mask"] = batch["text"][:, :24].clone(), batch["text_mask"][:, :24].clone()
    batch["text_mask"][:, 20:] = False
    batch["image_mask"][-1, 1] = False
    return batch


def test_onnx_engine_matches_eager(model, onnx_dir) -> None:
    stamp = (onnx_dir / "encoder.onnx").stat().st_mtime_ns
    engine = make_engine(model, "onnx", onnx_dir=onnx_dir)  # reuses the exported encoder, subtask and velocity
    assert (onnx_dir / "encoder.onnx").stat().st_mtime_ns == stamp
    eager = make_engine(model)
    for b, subtask in ((1, True), (3, True), (2, False)):
        batch = batch_of(model, b, seed=b)
        noise = torch.randn(b, H, A, generator=torch.Generator().manual_seed(b))
        ids, actions = engine.chunk(batch, steps=3, noise=noise, subtask=subtask)
        ref_ids, ref = eager.chunk(batch, steps=3, noise=noise, subtask=subtask)
        assert (ids is None and ref_ids is None) or torch.equal(ids, ref_ids)
        assert torch.allclose(actions, ref, atol=1e-4), (actions - ref).abs().max()
    assert engine.onnx_dir == onnx_dir
    marker = json.loads((onnx_dir / "physis-onnx.json").read_text())
    assert marker["parts"] == ["encoder", "subtask", "velocity", "flow"] and marker["flow_steps"] == 3


@torch.inference_mode()
def test_onnx_flow_graph_inpaints_like_the_model(model, onnx_dir) -> None:
    import onnxruntime as ort

    batch = batch_of(model, 2, seed=7)
    cache = model.generate_subtask(model.encode_prefix(batch, pooled=False))[1]
    g = torch.Generator().manual_seed(7)
    noise, target = torch.randn(2, H, A, generator=g), torch.randn(2, H, A, generator=g)
    weights = torch.zeros(2, H)
    weights[:, :2], weights[:, 2:4] = 1.0, 0.5
    ref = model.sample_actions(cache=cache, noise=noise, steps=3, prefix_actions=target, prefix_weights=weights)
    session = ort.InferenceSession(str(onnx_dir / "flow.onnx"), providers=["CPUExecutionProvider"])
    feeds = {"noise": noise, "keys": torch.stack(cache.keys), "values": torch.stack(cache.values),
             "ctx_mask": cache.mask, "action_mask": cache.action_mask, "prefix_actions": target,
             "prefix_weights": weights}
    out = session.run(None, {k: v.numpy() for k, v in feeds.items()})[0]
    assert np.allclose(out, ref.numpy(), atol=1e-4)
    assert np.array_equal(out[:, :2], target[:, :2].numpy())


@pytest.mark.parametrize("backend", ["bf16", "int8", "compile-bf16"])
def test_reduced_precision_backends_stay_close(model, backend, request) -> None:
    batch = batch_of(model, 2, seed=3)
    noise = torch.randn(2, H, A, generator=torch.Generator().manual_seed(3))
    _, ref = make_engine(model).chunk(batch, steps=3, noise=noise, subtask=False)
    engine = request.getfixturevalue("compiled") if backend == "compile-bf16" else make_engine(model, backend)
    _, out = engine.chunk(batch, steps=3, noise=noise, subtask=False)
    # within a tenth of the actions' scale: bf16 rounding differs between CPUs (AMX, AVX-512 BF16, neither) and
    # lands at 4-6% here; a wrong weight or dtype is off by the scale itself
    assert out.dtype == torch.float32 and (out - ref).abs().max() < 0.1 * ref.abs().max()
    assert next(model.parameters()).dtype == torch.float32  # the engines work on copies


def test_compiled_bf16_flow_inpaints_at_every_context_length(model, compiled) -> None:
    engine = compiled
    g = torch.Generator().manual_seed(5)
    noise, target = torch.randn(2, H, A, generator=g), torch.randn(2, H, A, generator=g)
    weights = torch.zeros(2, H)
    weights[:, :2], weights[:, 2:4] = 1.0, 0.5
    for text in (24, 9):  # two instruction lengths, so two context lengths (padded to a multiple of 32)
        batch = batch_of(model, 2, seed=5)
        batch["text"], batch["text_mask"] = batch["text"][:, :text], batch["text_mask"][:, :text]
        ids, ours = engine.generate_subtask(engine.encode_prefix(batch))
        # the float32 reference acts on the same subtask: where a bf16 greedy decode parts from the float32 one
        # depends on the CPU's bf16 arithmetic
        cache = model.extend_subtask(model.encode_prefix(batch, pooled=False), ids)
        ref = model.sample_actions(cache=cache, noise=noise, steps=3, prefix_actions=target, prefix_weights=weights)
        out = engine.sample_actions(cache=ours, noise=noise, steps=3, prefix_actions=target, prefix_weights=weights)
        assert out.dtype == torch.float32 and (out - ref).abs().max() < 0.1 * ref.abs().max()
        assert torch.equal(out[:, :2], target[:, :2] * cache.action_mask[:, None].float())  # committed: exact


def test_frozen_autotuned_bf16_flow_matches_the_eager_bf16_flow(model) -> None:
    """compile-bf16's flow loop where the CPU has AMX (weights frozen into the graph, inductor's C++ GEMM template),
    built here on any CPU: the same bf16 weights as the eager bf16 engine, so only rounding order may differ."""
    from physis.runtime.backends import FROZEN_AMX, CompiledEngine

    engine = CompiledEngine(model, torch.bfloat16, FROZEN_AMX, unrolled=True, freeze=True)
    eager = make_engine(model, "bf16")
    g = torch.Generator().manual_seed(8)
    noise, target = torch.randn(2, H, A, generator=g), torch.randn(2, H, A, generator=g)
    weights = torch.zeros(2, H)
    weights[:, :2], weights[:, 2:4] = 1.0, 0.5
    cache = eager.generate_subtask(eager.encode_prefix(batch_of(model, 2, seed=8)))[1]
    for steps in (3, 3, 2):  # a traced graph, the same graph again, another step count
        ref = eager.sample_actions(cache=cache, noise=noise, steps=steps, prefix_actions=target, prefix_weights=weights)
        out = engine.sample_actions(cache=cache, noise=noise, steps=steps, prefix_actions=target,
                                    prefix_weights=weights)
        # bf16 rounding in another order: well under 2% of the scale; a wrongly computed weight is off by more
        assert out.dtype == torch.float32 and (out - ref).abs().max() < 0.02 * ref.abs().max()
        assert torch.equal(out[:, :2], target[:, :2] * cache.action_mask[:, None].float())


def test_compiled_reasoning_checks_a_draft_in_the_prefix_graph(model, compiled, monkeypatch) -> None:
    engine = compiled
    batch = batch_of(model, 2, seed=6)
    noise = torch.randn(2, H, A, generator=torch.Generator().manual_seed(6))
    ids, decoded = engine.reason(batch)  # no draft: the prefix graph, then the eager decode
    with monkeypatch.context() as m:  # the right draft: the fused graph alone, no decoding
        m.setattr(engine, "generate_subtask", lambda *a, **k: pytest.fail("a right draft was decoded again"))
        again, fused = engine.reason(batch, draft=ids)
    assert torch.equal(again, ids) and torch.equal(fused.mask, decoded.mask) and fused.prefix_len == decoded.prefix_len
    valid = decoded.mask[:, None, :, None]
    for ours, ref in zip(fused.keys + fused.values, decoded.keys + decoded.values, strict=True):
        assert ((ours - ref).abs() * valid).max() < 0.05  # one bf16 trunk, two graphs
    out = engine.sample_actions(cache=fused, noise=noise, steps=3)
    ref = engine.sample_actions(cache=decoded, noise=noise, steps=3)
    assert (out - ref).abs().max() < 0.05
    wrong = ids.clone()
    wrong[:, 1] = torch.where(ids[:, 1] == 4, 5, 4)  # another word: the decode goes on from the disagreement
    fixed, cache = engine.reason(batch, draft=wrong)
    assert torch.equal(fixed, ids) and torch.equal(cache.mask, decoded.mask)
    with monkeypatch.context() as m:  # a token within the tie margin of the best counts as the greedy choice
        m.setattr("physis.runtime.backends.DRAFT_TIE", float("inf"))
        m.setattr(engine, "generate_subtask", lambda *a, **k: pytest.fail("a draft within the margin was decoded"))
        kept, _ = engine.reason(batch, draft=wrong)
    assert torch.equal(kept, wrong)


@torch.inference_mode()
def test_the_draft_graph_scores_each_draft_token_against_the_best(model) -> None:
    from physis.model.physis_model import padded_draft
    from physis.runtime.backends import with_action_mask
    from physis.runtime.export import BATCH_KEYS, PrefixDraftEncoder

    batch = with_action_mask(batch_of(model, 2, seed=4), A)
    ids, _ = model.generate_subtask(model.encode_prefix(batch, pooled=False))
    d, last = padded_draft(ids, model.config.max_subtask_tokens, "cpu")
    graph = PrefixDraftEncoder(model)
    *_, pred, gap = graph(*(batch[k] for k in BATCH_KEYS), d)
    for row in range(2):  # the greedy decode's own tokens: predicted, zero gap
        n = int(last[row])
        assert torch.equal(pred[row, :n], d[row, 1 : n + 1]) and gap[row, :n].eq(0).all()
    wrong = d.clone()
    wrong[:, 1] = torch.where(d[:, 1] == 4, 5, 4)
    *_, pred, gap = graph(*(batch[k] for k in BATCH_KEYS), wrong)
    assert (pred[:, 0] != wrong[:, 1]).all() and (gap[:, 0] > 0).all()


def test_compiled_prefix_serves_nearby_instruction_lengths_with_one_graph(model, compiled) -> None:
    from torch._dynamo.utils import counters

    engine = compiled
    batch = batch_of(model, 1, seed=9)
    caches = []
    for n in (9, 12, 12):  # both lengths pad to 16 tokens
        text = {"text": batch["text"][:, :n], "text_mask": batch["text_mask"][:, :n]}
        caches.append(engine.encode_prefix({**batch, **text}))
        if n == 9:
            graphs = counters["stats"]["unique_graphs"]
    assert counters["stats"]["unique_graphs"] == graphs
    assert all(c.mask.shape[1] == caches[0].mask.shape[1] for c in caches)
    assert int(caches[0].mask.sum()) + 3 == int(caches[1].mask.sum())  # the padding stays masked


def test_unknown_backend_and_part_are_reported(model, tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown inference backend 'tensorrt'"):
        make_engine(model, "tensorrt")
    with pytest.raises(ValueError, match="unknown parts"):
        export_onnx(model, tmp_path, parts=("decoder",))


def test_onnx_int8_graphs_stay_close(model, onnx_dir) -> None:
    engine = make_engine(model, "onnx-int8", onnx_dir=onnx_dir)
    assert (onnx_dir / "int8" / "velocity.onnx").is_file()
    batch = batch_of(model, 2, seed=4)
    noise = torch.randn(2, H, A, generator=torch.Generator().manual_seed(4))
    _, ref = make_engine(model).chunk(batch, steps=3, noise=noise, subtask=False)
    _, out = engine.chunk(batch, steps=3, noise=noise, subtask=False)
    assert out.dtype == torch.float32 and 0 < (out - ref).abs().max() < 0.1


def test_example_batch_takes_an_instruction_length(model) -> None:
    batch = example_batch(model, text_tokens=5)
    assert batch["text"].shape == (1, 5, 384) and batch["text_mask"].all()
    assert example_batch(model)["text"].shape[1] == model.config.max_text_tokens
    for bad in (-1, model.config.max_text_tokens + 1):
        with pytest.raises(ValueError, match="text_tokens"):
            example_batch(model, text_tokens=bad)


def test_compiled_engines_return_the_localizer_estimate() -> None:
    """A model whose prefix estimates the environment state itself: compile-bf16 hands the estimate on from its
    prefix graph and from its draft-checking graph, close to the eager engine's."""
    torch.manual_seed(1)
    cfg = ModelConfig.preset("tiny", image_size=32, action_dim=A, state_dim=5, horizon=H, cameras=2,
                             subtask_vocab=("reach", "the", "goal"), keypoints=4, env_state_dim=3, localizer=True)
    model = PhysisModel(cfg).eval()
    batch = batch_of(model, 1, seed=7)
    ref = make_engine(model).encode_prefix(batch).env_state
    engine = make_engine(model, "compile-bf16")
    ids, cache = engine.reason(batch)  # the prefix graph, then the decode
    _, fused = engine.reason(batch, draft=ids)  # the draft-checking graph
    for estimate in (cache.env_state, fused.env_state):
        assert estimate is not None and estimate.shape == ref.shape
        assert (estimate.float() - ref).abs().max() < 0.1 * ref.abs().max() + 1e-3
    plain = PhysisModel(ModelConfig.preset("tiny", image_size=32)).eval()  # no localizer: no estimate
    assert make_engine(plain, "compile-bf16").encode_prefix(example_batch(plain, seed=0)).env_state is None
