"""The tokens, trunk and flow kernels (on AMX tiles or AVX-512 BF16) against the eager float32 model (a tiny model with
the kernels' shapes, random weights)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.utils.cpp_extension

from physis.model import ModelConfig, PhysisModel
from physis.model.physis_model import padded_draft
from physis.model.vocab import BOS, EOS
from physis.runtime import fused
from physis.runtime.backends import TEXT_ROUNDING, CompiledEngine, make_engine, with_action_mask
from physis.runtime.export import BATCH_KEYS, PrefixDraftEncoder, PrefixEncoder, PrefixTokens, example_batch
from physis.runtime.fused import (
    FusedFlow,
    FusedTokens,
    FusedTrunk,
    kernel_isa,
    pack_b,
    supports,
    tokens_supports,
    trunk_supports,
)

A = 7
needs_kernel = pytest.mark.skipif(kernel_isa() is None, reason="the kernels need AMX tiles or AVX-512 BF16")


@pytest.fixture(params=fused.ISAS)
def isa(request) -> str:
    """Each way the kernels' tile products run that this CPU has (a CPU with AMX has AVX-512 BF16 too), and the AMX
    path with its tile instructions emulated: on a CPU without AMX, the one check of that path's tiles."""
    here = kernel_isa()
    if here is None or (request.param == "amx" and here != "amx"):
        pytest.skip(f"this CPU cannot run the kernels on {request.param}")
    ext = fused.kernel()
    ext.set_isa(request.param)
    assert ext.isa() == request.param
    yield request.param
    ext.set_isa(here)


def _tiny(**overrides: object) -> PhysisModel:
    # heads 32 wide and expert widths in whole tiles, as the kernels need; 16 action steps. 8 stem channels: the
    # library's bf16 convolution of tiny's 16 channels with 4x4 patches (stride 4) is wrong on some CPUs (relative
    # error ~1 against float32, torch 2.13), and the engine's bf16 tokens are compared with float32 ones here
    shape = dict(image_size=32, stem_channels=8, action_dim=A, state_dim=5, cameras=2, heads=2, expert_width=64,
                 subtask_vocab=("reach", "the", "goal", "push", "block"))
    return PhysisModel(ModelConfig.preset("tiny", **{**shape, **overrides})).eval()


@pytest.fixture(scope="module")
def model() -> PhysisModel:
    torch.manual_seed(0)
    return _tiny()


def test_pack_b_lays_a_weight_out_in_tiles_of_pairs() -> None:
    w = torch.randn(20, 40)
    packed = pack_b(w).float().view(2, 2, 16, 16, 2)  # N/16 x K/32 tiles, 16 k-pairs x 16 columns x 2
    ref = torch.nn.functional.pad(w, (0, 24, 0, 12)).to(torch.bfloat16).float()
    for n, k in [(0, 0), (3, 5), (17, 33), (19, 39), (31, 63)]:
        assert packed[n // 16, k // 32, (k % 32) // 2, n % 16, k % 2] == ref[n, k]


def _fake_loader(monkeypatch, calls: list) -> None:
    """The loader replaced by one that records what it was asked (an extension that takes the choice of tile
    products), and the kernel built afresh by the next `fused.kernel()`."""
    monkeypatch.setattr(torch.utils.cpp_extension, "load",
                        lambda **kw: calls.append(kw) or SimpleNamespace(asked=kw, set_isa=print))
    fused.kernel.cache_clear()


def test_a_build_lock_left_by_a_killed_build_is_removed_and_a_live_build_waited_for(tmp_path, monkeypatch) -> None:
    import fcntl
    import threading

    monkeypatch.setenv("PHYSIS_KERNEL_CACHE", str(tmp_path))
    calls: list = []
    _fake_loader(monkeypatch, calls)
    build = fused.build_directory()
    build.mkdir(parents=True)
    try:
        (build / "lock").touch()  # torch's lock file, as a build killed midway leaves it
        assert fused.kernel().asked["build_directory"] == str(build) and not (build / "lock").exists()
        # another process building now holds the lock: the loader waits until it lets go
        fused.kernel.cache_clear()
        with open(build / "physis.lock", "w") as other:
            fcntl.flock(other, fcntl.LOCK_EX)
            waiting = threading.Thread(target=fused.kernel)
            waiting.start()
            waiting.join(0.5)
            assert waiting.is_alive() and len(calls) == 1
        waiting.join(10)
        assert not waiting.is_alive() and len(calls) == 2
    finally:
        fused.kernel.cache_clear()  # the real extension for the tests after this one


def test_two_checkouts_of_the_same_sources_share_a_build_and_a_changed_header_gets_its_own(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.setenv("PHYSIS_KERNEL_CACHE", str(tmp_path / "cache"))
    asked = []
    for checkout in ("a", "b", "c"):
        here = tmp_path / checkout
        here.mkdir()
        for path in (*fused.SOURCES, fused.HEADER):
            (here / path.name).write_bytes(path.read_bytes())
        if checkout == "c":
            (here / fused.HEADER.name).write_text(fused.HEADER.read_text() + "\n// changed\n")
        monkeypatch.setattr(fused, "SOURCES", [here / p.name for p in fused.SOURCES])
        monkeypatch.setattr(fused, "HEADER", here / fused.HEADER.name)
        calls: list = []
        _fake_loader(monkeypatch, calls)
        try:
            asked.append(fused.kernel().asked)
        finally:
            fused.kernel.cache_clear()
    a, b, c = asked
    assert a["sources"] == b["sources"] and a["build_directory"] == b["build_directory"]
    assert all(src.startswith(a["build_directory"]) for src in a["sources"])
    assert c["build_directory"] != a["build_directory"]
    assert (Path(c["build_directory"]) / fused.HEADER.name).read_text().endswith("// changed\n")


def test_supports_names_what_the_kernel_cannot_run(model) -> None:
    assert "32 wide" in supports(PhysisModel(ModelConfig.preset("tiny", action_dim=A, state_dim=5)))
    assert "16 steps" in supports(
        PhysisModel(ModelConfig.preset("tiny", action_dim=A, state_dim=5, heads=2, expert_width=64, horizon=8))
    )
    assert supports(model) == (None if kernel_isa() else "the CPU has neither AMX tiles nor AVX-512 BF16")
    assert "32 wide" in trunk_supports(PhysisModel(ModelConfig.preset("tiny", action_dim=A, state_dim=5)))
    assert "multiples of 32" in trunk_supports(
        PhysisModel(ModelConfig.preset("tiny", action_dim=A, state_dim=5, heads=2, mlp_ratio=2.25))
    )
    assert trunk_supports(model) == (None if kernel_isa() else "the CPU has neither AMX tiles nor AVX-512 BF16")
    for shape in (dict(stem_blocks=1), dict(keypoints=4)):
        assert "stem blocks or keypoints" in tokens_supports(_tiny(**shape))
    assert "instruction's width" in tokens_supports(_tiny(text_dim=48))
    assert tokens_supports(model) == trunk_supports(model)


def test_the_kernels_path_can_be_chosen_among_those_the_cpu_has(monkeypatch) -> None:
    monkeypatch.delenv("PHYSIS_KERNEL_ISA", raising=False)
    here, bf16 = kernel_isa(), fused._avx512_bf16_cpu()
    assert here == ("amx" if fused.amx_cpu() else "avx512-bf16" if bf16 else None)  # never the emulation unasked
    monkeypatch.setenv("PHYSIS_KERNEL_ISA", "tpu")
    with pytest.raises(ValueError, match="'tpu' is not one of amx, avx512-bf16, amx-emulated"):
        kernel_isa()
    for isa in fused.ISAS:
        monkeypatch.setenv("PHYSIS_KERNEL_ISA", isa)
        if isa == here or (isa != "amx" and bf16):  # an AMX CPU has both; the emulation needs AVX-512 BF16
            assert kernel_isa() == isa
        else:
            with pytest.raises(ValueError, match="but this CPU has"):
                kernel_isa()


def test_a_flow_split_that_does_not_exist_is_refused(model, monkeypatch) -> None:
    monkeypatch.setenv("PHYSIS_FLOW_SPLIT", "diagonal")
    with pytest.raises(ValueError, match="split 'diagonal' is not one of auto, layers, halves"):
        FusedFlow(model)


def test_the_fused_backend_says_why_it_cannot_run(model, monkeypatch) -> None:
    monkeypatch.setattr(fused, "kernel_isa", lambda: None)  # a CPU with neither
    with pytest.raises(RuntimeError, match="neither AMX tiles nor AVX-512 BF16"):
        make_engine(model, "fused")


def test_the_kernel_samples_what_the_eager_model_samples(model, isa) -> None:
    batch = example_batch(model, seed=3, text_tokens=5)
    batch["action_mask"] = torch.tensor([[True] * (A - 2) + [False] * 2])  # a smaller robot in a padded space
    batch["text_mask"][:, -1] = False  # a masked key
    flow = FusedFlow(model)
    g = torch.Generator().manual_seed(3)
    noise, target = torch.randn(1, 16, A, generator=g), torch.randn(1, 16, A, generator=g)
    weights = torch.zeros(1, 16)
    weights[:, :4], weights[:, 4:6] = 1.0, 0.5
    with torch.inference_mode():
        cache = model.generate_subtask(model.encode_prefix(batch, pooled=False))[1]
        assert not bool(cache.mask.all()) and cache.mask.shape[1] % 32  # masked keys, a partial key block
        for steps in (1, 4):
            for inpaint in (False, True):
                hook = dict(prefix_actions=target, prefix_weights=weights) if inpaint else {}
                ref = model.sample_actions(cache=cache, noise=noise, steps=steps, **hook)
                out = flow(cache, noise, steps, *hook.values())
                # bf16 matmuls against float32: well under 2% of the scale; a misplaced tile is off by far more
                assert out.shape == ref.shape and (out - ref).abs().max() < 0.02 * ref.abs().max()
                assert torch.equal(out[..., A - 2 :], torch.zeros(1, 16, 2))
                if inpaint:  # the committed steps exactly
                    assert torch.equal(out[:, :4, : A - 2], target[:, :4, : A - 2])


@needs_kernel
def test_the_engine_runs_batch_one_on_the_kernel_and_larger_batches_on_the_graph(model, monkeypatch) -> None:
    engine = CompiledEngine(model, torch.bfloat16, unrolled=True, fused=True)
    monkeypatch.setattr(engine, "_compile", lambda module: module)  # the flow graph's module, run eagerly here
    eager = make_engine(model, "eager")
    noise = torch.randn(2, 16, A, generator=torch.Generator().manual_seed(4))
    cache = eager.generate_subtask(eager.encode_prefix(example_batch(model, batch=2, seed=4, text_tokens=5)))[1]
    ref = eager.sample_actions(cache=cache, noise=noise, steps=3)
    out = engine.sample_actions(cache=cache.head(1), noise=noise[:1], steps=3)
    assert (out - ref[:1]).abs().max() < 0.02 * ref.abs().max()
    with pytest.raises(ValueError, match="prefix_weights"):  # the hook's checks hold on the kernel's path too
        engine.sample_actions(
            cache=cache.head(1),
            noise=noise[:1],
            steps=3,
            prefix_actions=noise[:1],
            prefix_weights=torch.full((1, 16), 2.0),
        )
    monkeypatch.setattr(engine, "_fused", lambda *a: pytest.fail("the kernel was given a batch of two"))
    out = engine.sample_actions(cache=cache, noise=noise, steps=3)
    assert (out - ref).abs().max() < 0.02 * ref.abs().max()


def _close(out: torch.Tensor, ref: torch.Tensor) -> bool:
    """Within 2% of the reference's scale: bf16 matmuls against float32; a misplaced tile is off by far more."""
    return out.shape == ref.shape and bool((out.float() - ref.float()).abs().max() < 0.02 * ref.abs().max())


def test_the_trunk_kernel_encodes_and_checks_a_draft_as_the_eager_model_does(model, isa) -> None:
    batch = with_action_mask(example_batch(model, seed=5, text_tokens=5), A)
    batch["image_mask"][0, 1] = False  # a missing camera: its patches' keys masked
    inputs = [batch[k] for k in BATCH_KEYS]
    d, _ = padded_draft(torch.tensor([[BOS, 5, 6, 7, EOS]]), model.config.max_subtask_tokens, "cpu")
    trunk = FusedTrunk(model)
    with torch.inference_mode():
        ref_k, ref_v, _, ref_pred, ref_gap = PrefixDraftEncoder(model)(*inputs, d)
        tokens, mask = PrefixTokens(model, draft=True)(*inputs, d)
        assert not bool(mask.all()) and tokens.shape[1] % 16  # masked keys, a partial tile of tokens
        keys, values, pred, gap = trunk(tokens, mask, d)
        assert _close(keys, ref_k) and _close(values, ref_v)
        assert torch.equal(pred, ref_pred)
        finite = ref_gap.isfinite()  # the draft's PAD after its EOS: never the greedy choice
        assert torch.equal(gap.isfinite(), finite) and _close(gap[finite], ref_gap[finite])
        # without a draft: the prefix's keys and values alone, and nothing to check
        ref_k, ref_v, _ = PrefixEncoder(model)(*inputs)
        keys, values, pred, gap = trunk(tokens[:, : mask.shape[1]], mask)
        assert _close(keys, ref_k) and _close(values, ref_v) and pred.shape == gap.shape == (1, 0)
        with pytest.raises(RuntimeError, match="outside the vocabulary"):  # the kernel reads no logit out of range
            trunk(tokens, mask, torch.full_like(d, 10_000))


@pytest.mark.parametrize(
    "shape",
    [
        {},  # the fixture's model: two cameras, one of them missing
        dict(image_size=48, stem_channels=16, history=2, env_state_dim=3, subtask=False),  # 36 patches: a partial
    ],  # tile; 16 channels padded to 32; two frames; the environment-state query token; no subtask head
)
def test_the_tokens_kernel_makes_the_tokens_the_model_makes(model, shape, isa) -> None:
    if shape:
        torch.manual_seed(2)
        model = _tiny(**shape)
    batch = with_action_mask(example_batch(model, seed=9, text_tokens=5), A)
    batch["image_mask"][0, -1] = False  # a missing camera
    batch["text_mask"][0, -1] = False
    batch["state_mask"][0, 1] = False
    inputs = [batch[k] for k in BATCH_KEYS]
    tokens = FusedTokens(model)
    with torch.inference_mode():
        ref, ref_mask = PrefixTokens(model)(*inputs)
        out, mask = tokens(batch)
        assert _tokens_close(out, ref) and torch.equal(mask, ref_mask) and not bool(mask.all())
        if model.config.subtask:  # a draft's embeddings after the prefix's tokens
            d, _ = padded_draft(torch.tensor([[BOS, 5, 6, EOS]]), model.config.max_subtask_tokens, "cpu")
            ref, _ = PrefixTokens(model, draft=True)(*inputs, d)
            assert _tokens_close(tokens(batch, d)[0], ref)
            with pytest.raises(RuntimeError, match="outside the vocabulary"):
                tokens(batch, torch.full_like(d, 10_000))
        with pytest.raises(RuntimeError, match="outside the table"):
            tokens({**batch, "embodiment": torch.tensor([3])})
        with pytest.raises(RuntimeError, match="images must be"):
            tokens({**batch, "images": batch["images"][..., :16, :16]})


def _tokens_close(out: torch.Tensor, ref: torch.Tensor) -> bool:
    """Within 1% of the scale at worst and 0.2% on average (measured: 0.2% and 0.02%, bf16 products): an embedding
    added to the wrong rows (a camera's, a frame's; ~2% of the scale) moves the average by far more."""
    err, scale = (out - ref).abs(), ref.abs().max()
    return out.shape == ref.shape and bool(err.max() < 0.01 * scale) and bool(err.mean() < 0.002 * scale)


@needs_kernel
@pytest.mark.parametrize("keypoints", [0, 4])  # the tokens from the kernel, or (with keypoints) from a graph
def test_the_engine_encodes_batch_one_on_the_trunk_kernel_and_larger_batches_on_the_graph(
    model, keypoints, monkeypatch
) -> None:
    monkeypatch.setattr(CompiledEngine, "_compile", lambda self, module: module)  # the graphs' modules, eagerly
    if keypoints:
        torch.manual_seed(3)
        model = _tiny(keypoints=keypoints)
    engine = CompiledEngine(model, torch.bfloat16, unrolled=True, fused=True)
    assert (engine._tokens_kernel is None) == bool(keypoints)
    eager = make_engine(model, "eager")
    batch = example_batch(model, batch=2, seed=6, text_tokens=TEXT_ROUNDING)  # as long as the graphs pad it to
    one = {k: v[:1] for k, v in batch.items()}
    ids, ref = eager.reason(one)
    wrong = ids.clone()
    wrong[0, 2] = 4 if int(ids[0, 2]) != 4 else 5
    # a right draft ends in the kernel's pass; a wrong one and none decode on from the kernel's prefix (in bf16)
    for draft in (ids, wrong, None):
        out, cache = engine.reason(one, draft=draft)
        assert torch.equal(out, ids) and torch.equal(cache.mask, ref.mask)
        seen = ref.mask[0]  # the keys attended (a decode that ends early leaves PAD rows that none reads)
        assert all(_close(k[..., seen, :], r[..., seen, :]) for k, r in zip(cache.keys, ref.keys, strict=True))
        assert all(_close(v[..., seen, :], r[..., seen, :]) for v, r in zip(cache.values, ref.values, strict=True))
    assert _close(engine.encode_prefix(one).keys[-1], eager.encode_prefix(one).keys[-1])
    monkeypatch.setattr(engine, "_trunk", lambda *a: pytest.fail("the kernel was given a batch of two"))
    out, cache = engine.reason(batch, draft=torch.cat([ids, ids]))
    assert torch.equal(out[:1], ids) and cache.batch_size == 2


@pytest.mark.parametrize("split", ["layers", "halves"])
def test_the_kernels_give_the_same_numbers_on_one_core_and_on_two(model, isa, split) -> None:
    batch = with_action_mask(example_batch(model, seed=7, text_tokens=5), A)
    inputs = [batch[k] for k in BATCH_KEYS]
    d, _ = padded_draft(torch.tensor([[BOS, 5, EOS]]), model.config.max_subtask_tokens, "cpu")
    noise = torch.randn(1, 16, A, generator=torch.Generator().manual_seed(7))
    flow, trunk, make_tokens = FusedFlow(model, split), FusedTrunk(model), FusedTokens(model)
    before = torch.get_num_threads()
    outs = []
    try:
        with torch.inference_mode():
            tokens, mask = PrefixTokens(model, draft=True)(*inputs, d)
            cache = model.generate_subtask(model.encode_prefix(batch, pooled=False))[1]
            for threads in (1, 2):  # the tokens kernel splits its patches, the trunk its tokens, the flow its
                torch.set_num_threads(threads)  # layers or each layer, between the two
                outs.append((*make_tokens(batch, d), *trunk(tokens, mask, d), flow(cache, noise, 4)))
            ref = model.sample_actions(cache=cache, noise=noise, steps=4)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*outs, strict=True))
    assert _close(outs[0][-1], ref)  # either split samples what the eager model samples


@needs_kernel
def test_the_kernels_run_first_in_a_process_and_when_openmp_gives_fewer_threads_than_asked(tmp_path) -> None:
    # a thread limit hands each kernel a team of one where it asked for two: one thread must then do all the work;
    # and the tokens kernel, the first a chunk calls, must itself ask for AMX's tile state in a fresh process
    script = tmp_path / "one_thread.py"
    script.write_text(
        "import torch\n"
        "from physis.model import ModelConfig, PhysisModel\n"
        "from physis.runtime.export import example_batch\n"
        "from physis.runtime.fused import FusedFlow, FusedTokens\n"
        "torch.manual_seed(0)\n"
        "torch.set_num_threads(2)\n"
        "cfg = ModelConfig.preset('tiny', image_size=32, action_dim=7, state_dim=5, heads=2, expert_width=64)\n"
        "model = PhysisModel(cfg).eval()\n"
        "batch = example_batch(model)\n"
        "with torch.inference_mode():\n"
        "    tokens, _ = FusedTokens(model)(batch)\n"
        "    cache = model.encode_prefix(batch, pooled=False)\n"
        "    out = FusedFlow(model)(cache, torch.randn(1, 16, 7), 3)\n"
        "print('ok', bool(out.isfinite().all() and tokens.isfinite().all()))\n"
    )
    env = {**os.environ, "OMP_THREAD_LIMIT": "1"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "ok True" in done.stdout, done.stderr[-2000:]


@needs_kernel
def test_the_fused_engine_reports_the_kernels_bf16_for_its_flow_floor(model) -> None:
    # without AMX its graphs for larger batches run the flow loop in float32, as compile-bf16's; a batch of one
    # (what `physis bench latency` times against a floor in this dtype) runs on the kernel's bf16 products
    assert make_engine(model, "fused").flow_dtype == torch.bfloat16


@pytest.mark.parametrize(
    "shape",
    [
        dict(heads=3, width=96),  # the heads split 1 and 2 between the cores
        dict(expert_mlp_ratio=1.5),  # an MLP of 96 hidden columns: no whole halves, so the layers split instead
    ],
)
def test_the_flow_kernel_splits_uneven_shapes_and_still_samples_what_the_eager_model_samples(shape, isa) -> None:
    torch.manual_seed(1)
    cfg = ModelConfig.preset("tiny", image_size=32, stem_channels=8, action_dim=A, state_dim=5,
                             **{"heads": 2, "expert_width": 64, **shape})
    model = PhysisModel(cfg).eval()
    noise = torch.randn(1, 16, A, generator=torch.Generator().manual_seed(8))
    flow = FusedFlow(model)
    before, outs = torch.get_num_threads(), []
    try:
        with torch.inference_mode():
            cache = model.encode_prefix(with_action_mask(example_batch(model, seed=8), A), pooled=False)
            ref = model.sample_actions(cache=cache, noise=noise, steps=3)
            for threads in (1, 2):
                torch.set_num_threads(threads)
                outs.append(flow(cache, noise, 3))
    finally:
        torch.set_num_threads(before)
    assert _close(outs[0], ref) and torch.equal(outs[0], outs[1])
