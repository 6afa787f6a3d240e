"""The cuda-graph engine's bookkeeping on a CPU (static buffers, one call per shape) against the eager model.

Capturing and replaying real CUDA graphs needs a GPU; docs/benchmarks/runtime.md records that run."""

from __future__ import annotations

import torch

from physis.model import ModelConfig, PhysisModel
from physis.runtime.backends import make_engine
from physis.runtime.export import example_batch
from physis.runtime.graphs import GraphEngine, StaticCall

H, A = 8, 7


def tiny_model(**overrides) -> PhysisModel:
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", image_size=32, action_dim=A, state_dim=5, horizon=H, cameras=2,
                             subtask_vocab=("reach", "the", "goal"), **overrides)
    return PhysisModel(cfg).eval()


def test_static_call_copies_inputs_and_reuses_its_buffers() -> None:
    call = StaticCall(lambda a, b: [a * 2 + b], [torch.zeros(3), torch.zeros(3)])
    first = call([torch.ones(3), torch.arange(3.0)])[0].clone()
    second = call([torch.full((3,), 2.0), torch.zeros(3)])[0]
    assert torch.equal(first, torch.tensor([2.0, 3.0, 4.0])) and torch.equal(second, torch.full((3,), 4.0))


def test_graph_engine_matches_eager_chunk_after_chunk() -> None:
    model = tiny_model(keypoints=4)
    engine, eager = make_engine(model, "cuda-graph"), make_engine(model)
    assert isinstance(engine, GraphEngine) and engine.backend == "cuda-graph"
    draft = None
    outputs = []
    for seed, text_tokens in ((0, 12), (1, 12), (2, 7)):
        batch = example_batch(model, seed=seed, text_tokens=text_tokens)
        noise = torch.randn(1, H, A, generator=torch.Generator().manual_seed(seed))
        ids, actions = engine.chunk(batch, steps=3, noise=noise, draft=draft)
        ref_ids, ref = eager.chunk(batch, steps=3, noise=noise, draft=draft)
        assert torch.equal(ids, ref_ids)
        assert torch.allclose(actions, ref, atol=1e-5), (actions - ref).abs().max()
        outputs.append(actions)
        draft = ids
    # a later chunk does not overwrite an earlier one's actions; two instruction lengths: two encoder entries
    assert not torch.equal(outputs[0], outputs[1])
    assert sum(key[0] == "encoder" for key in engine._calls) == 2


@torch.inference_mode()
def test_graph_engine_inpaints_and_serves_the_mse_head() -> None:
    model = tiny_model()
    engine, eager = make_engine(model, "cuda-graph"), make_engine(model)
    batch = example_batch(model, batch=2, seed=3)
    noise = torch.randn(2, H, A, generator=torch.Generator().manual_seed(3))
    prefix = torch.randn(2, H, A, generator=torch.Generator().manual_seed(4))
    weights = torch.zeros(2, H)
    weights[:, :3] = 1.0
    weights[:, 3:5] = 0.5
    cache = engine.encode_prefix(batch)
    out = engine.sample_actions(cache=cache, steps=4, noise=noise, prefix_actions=prefix, prefix_weights=weights)
    ref = eager.sample_actions(cache=eager.encode_prefix(batch), steps=4, noise=noise, prefix_actions=prefix,
                               prefix_weights=weights)
    assert torch.equal(out[:, :3], prefix[:, :3]) and torch.allclose(out, ref, atol=1e-5)

    mse = tiny_model(action_head="mse")
    batch = example_batch(mse, seed=5)
    _, actions = make_engine(mse, "cuda-graph").chunk(batch, subtask=False)
    _, ref = make_engine(mse).chunk(batch, subtask=False)
    assert torch.allclose(actions, ref, atol=1e-6)
