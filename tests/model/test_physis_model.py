"""PhysisModel on the tiny preset: losses, masks, switches, the prefix cache and the inference API."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from physis.model import ModelConfig, PhysisModel
from physis.model.physis_model import padded_draft, padded_draft_rows
from physis.model.trunk import PrefixCache
from physis.model.vocab import BOS, EOS, PAD

A, S, H, B = 7, 5, 8, 3
WORDS = ["grasp", "the", "block", "move", "above", "carry", "it"]


def make_config(**overrides) -> ModelConfig:
    base = dict(image_size=32, action_dim=A, state_dim=S, horizon=H, cameras=2, num_embodiments=2, subtask_vocab=WORDS)
    return ModelConfig.preset("tiny", **{**base, **overrides})


def make_batch(cfg: ModelConfig, b: int = B, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    c, s, n_text = cfg.cameras, cfg.image_size, 6
    action_mask = torch.ones(b, A, dtype=torch.bool)
    action_mask[:, -2:] = False  # a body without the last two slots
    is_pad = torch.zeros(b, cfg.horizon, dtype=torch.bool)
    is_pad[0, -3:] = True  # the end of an episode
    text_mask = torch.ones(b, n_text, dtype=torch.bool)
    text_mask[1:, 4:] = False
    image_mask = torch.ones(b, c, dtype=torch.bool)
    image_mask[2, 1] = False  # a robot with one camera
    sub = torch.tensor([[BOS, 4, 5, 6, EOS, PAD], [BOS, 7, 8, EOS, PAD, PAD], [BOS, 9, 10, 5, 6, EOS]])
    return {
        "images": torch.rand(b, c, cfg.history, 3, s, s, generator=g),
        "image_mask": image_mask,
        "state": torch.randn(b, S, generator=g),
        "state_mask": torch.ones(b, S, dtype=torch.bool),
        "text": torch.randn(b, n_text, 384, generator=g) * text_mask[..., None],
        "text_mask": text_mask,
        "embodiment": torch.arange(b) % 2,
        "actions": torch.randn(b, cfg.horizon, A, generator=g) * action_mask[:, None],
        "action_mask": action_mask,
        "action_is_pad": is_pad,
        "subtask_tokens": sub[:b],
        "subtask_valid": torch.ones(b, dtype=torch.bool),
        "future_images": torch.rand(b, c, 3, s, s, generator=g),
        "future_valid": torch.tensor([True, True, False])[:b],
        "progress": torch.linspace(0.1, 0.9, b),
    }


def model_and_batch(**overrides) -> tuple[PhysisModel, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    cfg = make_config(**overrides)
    return PhysisModel(cfg), make_batch(cfg)


def test_tiny_forward_backward_all_heads() -> None:
    model, batch = model_and_batch()
    assert model.num_parameters() < 1_000_000
    losses = model(batch)
    assert set(losses) == {"action", "subtask", "progress", "world_model", "recon", "loss"}
    cfg = model.config
    expected = (
        cfg.action_weight * losses["action"]
        + cfg.subtask_weight * losses["subtask"]
        + cfg.progress_weight * losses["progress"]
        + cfg.world_model_weight * losses["world_model"]
        + cfg.recon_weight * losses["recon"]
    )
    assert torch.allclose(losses["loss"], expected)
    assert all(torch.isfinite(v) for v in losses.values())
    losses["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []  # every parameter is used (DDP without find_unused_parameters)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # these tensors are tiny: a second thread only adds synchronisation cost
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _chunk_error(model: PhysisModel, batch) -> float:
    """Squared error of a sampled chunk (fixed noise) against the batch's actions, on valid entries."""
    valid = batch["action_mask"][:, None] & ~batch["action_is_pad"][:, :, None]
    chunk = model.sample_actions(batch, generator=torch.Generator().manual_seed(0))
    return (chunk - batch["actions"])[valid].square().mean().item()


@pytest.mark.parametrize(("head", "lr", "steps", "factor"), [("mse", 3e-3, 100, 10.0), ("flow", 1e-3, 200, 3.0)])
def test_tiny_overfits_one_batch(head: str, lr: float, steps: int, factor: float) -> None:
    # the flow head must learn a whole velocity field, so it fits one batch more slowly than regression
    model, batch = model_and_batch(action_head=head, world_model=head == "mse")
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    before = _chunk_error(model, batch)
    for _ in range(steps):
        opt.zero_grad()
        model(batch)["loss"].backward()
        opt.step()
    after = _chunk_error(model, batch)
    assert after < before / factor, (before, after)
    cache = model.encode_prefix(batch)
    ids, _ = model.generate_subtask(cache)
    assert torch.equal(ids[:, : batch["subtask_tokens"].shape[1]], batch["subtask_tokens"])
    assert torch.allclose(model.predict_progress(cache), batch["progress"], atol=0.1)


def test_masked_action_dims_and_padded_steps_get_no_loss() -> None:
    model, batch = model_and_batch()
    actions = batch["actions"].clone().requires_grad_(True)
    torch.manual_seed(1)
    loss = model({**batch, "actions": actions})["action"]
    (grad,) = torch.autograd.grad(loss, actions)
    valid = batch["action_mask"][:, None] & ~batch["action_is_pad"][:, :, None]
    assert grad[~valid].abs().max() == 0
    assert grad[valid].abs().max() > 0

    changed = batch["actions"].clone()
    changed[~valid] = 100.0
    torch.manual_seed(1)
    assert model({**batch, "actions": changed})["action"].item() == pytest.approx(loss.item(), abs=1e-6)


def test_invalid_futures_and_subtasks_get_no_loss() -> None:
    model, batch = model_and_batch()
    torch.manual_seed(2)
    ref = model(batch)
    future = batch["future_images"].clone()
    future[2] = 0.0  # future_valid[2] is False
    future[:, 1][~batch["image_mask"][:, 1]] = 0.0  # a missing camera
    torch.manual_seed(2)
    out = model({**batch, "future_images": future})
    assert out["world_model"].item() == pytest.approx(ref["world_model"].item(), abs=1e-6)

    sub = batch["subtask_tokens"].clone()
    sub[1, 1] = 9
    valid = torch.tensor([True, False, True])
    torch.manual_seed(2)
    dropped = model({**batch, "subtask_valid": valid})
    assert dropped["subtask"].item() != pytest.approx(ref["subtask"].item(), abs=1e-6)  # row 1 left the loss
    torch.manual_seed(2)
    changed = model({**batch, "subtask_tokens": sub, "subtask_valid": valid})
    assert changed["subtask"].item() == pytest.approx(dropped["subtask"].item(), abs=1e-6)
    assert changed["action"].item() == pytest.approx(dropped["action"].item(), abs=1e-6)  # actions ignore it too


def test_world_model_fraction_computes_its_losses_on_the_first_rows() -> None:
    model, batch = model_and_batch(world_model_fraction=0.34)  # 2 of the 3 rows
    full = PhysisModel(make_config())
    full.load_state_dict(model.state_dict())
    first = {k: v[:2] for k, v in batch.items()}
    torch.manual_seed(2)
    thin = model(batch)
    torch.manual_seed(2)
    ref = full(first)
    assert thin["recon"].item() == pytest.approx(ref["recon"].item(), rel=1e-5)
    future = batch["future_images"].clone()
    future[2] = 1.0 - future[2]  # the third row's future (valid only for the full model's rows) is not read
    future_valid = torch.ones(B, dtype=torch.bool)
    torch.manual_seed(2)
    a = model({**batch, "future_valid": future_valid})
    torch.manual_seed(2)
    b = model({**batch, "future_valid": future_valid, "future_images": future})
    assert a["world_model"].item() == pytest.approx(b["world_model"].item(), abs=1e-6)
    assert a["action"].item() == pytest.approx(b["action"].item(), abs=1e-6)
    torch.manual_seed(2)
    c = full({**batch, "future_valid": future_valid, "future_images": future})
    torch.manual_seed(2)
    d = full({**batch, "future_valid": future_valid})
    assert c["world_model"].item() != pytest.approx(d["world_model"].item(), abs=1e-6)  # the full model reads it
    with pytest.raises(ValueError, match="world_model_fraction"):
        make_config(world_model_fraction=0.0)


def joint_velocity(model: PhysisModel, batch, x, t, subtask_ids=None) -> torch.Tensor:
    """Reference: prefix, subtask and action tokens in one sequence under the full block mask, no cache."""
    tokens, mask, _, _ = model.prefix(batch)
    n_sub = 0 if subtask_ids is None else subtask_ids.shape[1]
    if subtask_ids is not None:
        tokens = torch.cat([tokens, model.subtask_emb(subtask_ids) + model.subtask_pos[:n_sub]], 1)
    n_pre, n_tr = mask.shape[1], tokens.shape[1]
    act = model._action_tokens(x, t, batch["action_mask"])
    n = n_tr + act.shape[1]
    allowed = torch.zeros(x.shape[0], n, n, dtype=torch.bool)
    allowed[:, :, :n_pre] = mask[:, None, :]  # everyone sees valid prefix keys
    allowed[:, n_pre:n_tr, n_pre:n_tr] = torch.ones(n_sub, n_sub, dtype=torch.bool).tril()
    if subtask_ids is not None:
        allowed[:, n_tr:, n_pre:n_tr] = (subtask_ids != PAD)[:, None, :]
    allowed[:, n_tr:, n_tr:] = True
    h_tr, h_act = tokens, act
    experts = dict(zip(model.config.expert_reads, model.expert, strict=True))  # trunk layer -> its expert layer
    for i, blk in enumerate(model.blocks):
        if i not in experts:  # no expert layer runs beside this trunk layer
            q, k, v = blk._split(h_tr)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None, :n_tr, :n_tr])
            h_tr = h_tr + blk.proj(out.transpose(1, 2).flatten(2))
            h_tr = h_tr + blk.mlp(blk.norm2(h_tr))
            continue
        eblk = experts[i]
        (q1, k1, v1), (q2, k2, v2) = blk._split(h_tr), eblk._split(h_act)
        out = F.scaled_dot_product_attention(
            torch.cat([q1, q2], 2), torch.cat([k1, k2], 2), torch.cat([v1, v2], 2), attn_mask=allowed[:, None]
        )
        out = out.transpose(1, 2).flatten(2)
        h_tr = h_tr + blk.proj(out[:, :n_tr])
        h_tr = h_tr + blk.mlp(blk.norm2(h_tr))
        h_act = h_act + eblk.proj(out[:, n_tr:])
        h_act = h_act + eblk.mlp(eblk.norm2(h_act))
    return model.action_out(model.expert_norm(h_act))


@torch.no_grad()
def test_cached_prefix_matches_the_joint_sequence() -> None:
    model, batch = model_and_batch()
    model.eval()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(B, H, A, generator=g)
    t = torch.rand(B, generator=g)
    cache = model.encode_prefix(batch)
    assert torch.allclose(model.predict_velocity(cache, x, t), joint_velocity(model, batch, x, t), atol=1e-5)

    ids, with_sub = model.generate_subtask(cache)
    assert ids.shape == (B, model.config.max_subtask_tokens) and (ids[:, 0] == BOS).all()
    ref = joint_velocity(model, batch, x, t, subtask_ids=ids)
    assert torch.allclose(model.predict_velocity(with_sub, x, t), ref, atol=1e-5)

    # sampling: uncached == cached == Euler steps over the reference
    noise = torch.randn(B, H, A, generator=g)
    uncached = model.sample_actions(batch, noise=noise, steps=4)
    cached = model.sample_actions(cache=cache, noise=noise, steps=4)
    xr = noise.clone()
    for i in range(4):
        xr = xr - 0.25 * joint_velocity(model, batch, xr, torch.full((B,), 1 - i * 0.25))
    assert torch.allclose(uncached, cached) and torch.allclose(cached, xr * batch["action_mask"][:, None], atol=1e-5)
    assert (cached[:, :, ~batch["action_mask"][0]] == 0).all()
    # a generator gives reproducible noise
    a1 = model.sample_actions(cache=cache, generator=torch.Generator().manual_seed(9))
    a2 = model.sample_actions(cache=cache, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a1, a2)


def test_expert_reads_evenly_spaced_trunk_layers() -> None:
    assert ModelConfig.preset("small").expert_reads == (0, 1, 2, 3)
    assert ModelConfig.preset("small", expert_depth=2).expert_reads == (1, 3)
    assert ModelConfig.preset("small", expert_depth=1).expert_reads == (3,)
    assert ModelConfig.preset("base", expert_depth=5).expert_reads == (1, 3, 6, 8, 11)
    for bad in (0, 5):
        with pytest.raises(ValueError, match="expert_depth"):
            ModelConfig.preset("small", expert_depth=bad)


@torch.no_grad()
def test_a_shallower_expert_matches_the_joint_sequence() -> None:
    full, _ = model_and_batch()
    model, batch = model_and_batch(expert_depth=1)  # tiny: 2 trunk layers, the expert reads only the last
    model.eval()
    assert len(model.expert) == 1 and model.num_parameters() < full.num_parameters()
    g = torch.Generator().manual_seed(6)
    x, t, noise = torch.randn(B, H, A, generator=g), torch.rand(B, generator=g), torch.randn(B, H, A, generator=g)
    cache = model.encode_prefix(batch)
    assert torch.allclose(model.predict_velocity(cache, x, t), joint_velocity(model, batch, x, t), atol=1e-5)
    ids, with_sub = model.generate_subtask(cache)
    ref = joint_velocity(model, batch, x, t, subtask_ids=ids)
    assert torch.allclose(model.predict_velocity(with_sub, x, t), ref, atol=1e-5)
    fast = model.sample_actions(cache=with_sub, noise=noise, steps=3)
    xr = noise.clone()
    for i in range(3):
        xr = xr - joint_velocity(model, batch, xr, torch.full((B,), 1 - i / 3), subtask_ids=ids) / 3
    assert torch.allclose(fast, xr * batch["action_mask"][:, None], atol=1e-5)
    # the first trunk layer's keys reach the actions only through the last layer's
    changed = PrefixCache([k + 1.0 if i == 0 else k for i, k in enumerate(cache.keys)], cache.values, cache.mask,
                          cache.pooled, cache.action_mask, cache.prefix_len, cache.cameras)
    assert torch.equal(model.predict_velocity(changed, x, t), model.predict_velocity(cache, x, t))


@torch.no_grad()
def test_cache_repeat_and_prefix_only() -> None:
    model, batch = model_and_batch()
    cache = model.encode_prefix(batch)
    rep = cache.repeat(4)
    assert rep.batch_size == 4 * B and torch.equal(rep.keys[0][4:8], cache.keys[0][1:2].expand(4, -1, -1, -1))
    _, with_sub = model.generate_subtask(cache)
    assert with_sub.mask.shape[1] == cache.mask.shape[1] + model.config.max_subtask_tokens
    assert with_sub.prefix_only().mask.shape == cache.mask.shape
    noise = torch.randn(4 * B, H, A)
    out = model.sample_actions(cache=rep, noise=noise, steps=2)
    single = model.sample_actions(cache=cache, noise=noise[0::4], steps=2)
    assert torch.allclose(out[0::4], single, atol=1e-5)


@pytest.mark.parametrize("switch", ["world_model", "subtask", "progress"])
def test_each_head_switches_off(switch: str) -> None:
    model, batch = model_and_batch(**{switch: False})
    on, _ = model_and_batch()
    losses = model(batch)
    assert switch not in losses and "action" in losses
    if switch == "world_model":
        assert "recon" not in losses and not hasattr(model, "decoder")
    prefix = {"world_model": ("future_", "decoder"), "subtask": ("subtask_",), "progress": ("progress_",)}[switch]
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.startswith(prefix) for n in names)
    assert model.num_parameters() < on.num_parameters()
    losses["loss"].backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


def test_mse_head_is_deterministic_and_timeless() -> None:
    model, batch = model_and_batch(action_head="mse")
    assert not hasattr(model, "action_time")
    cache = model.encode_prefix(batch)
    a1 = model.sample_actions(cache=cache, noise=torch.randn(B, H, A))
    a2 = model.sample_actions(cache=cache, noise=torch.randn(B, H, A))
    assert torch.equal(a1, a2) and a1.shape == (B, H, A)
    assert set(model(batch)) >= {"action", "world_model"}


@torch.no_grad()
def test_world_model_sampling_and_decoding() -> None:
    model, batch = model_and_batch()
    cfg = model.config
    cache = model.encode_prefix(batch)
    actions = model.sample_actions(cache=cache)
    lat1 = model.sample_future(cache, actions, generator=torch.Generator().manual_seed(3))
    lat2 = model.sample_future(cache, actions, generator=torch.Generator().manual_seed(4))
    assert lat1.shape == (B, cfg.cameras, cfg.latent_grid**2, cfg.latent_dim)
    assert not torch.allclose(lat1, lat2)  # stochastic: different noise, different futures
    frames = model.decode_future(lat1)
    assert frames.shape == (B, cfg.cameras, 3, cfg.image_size, cfg.image_size)
    assert frames.min() >= 0 and frames.max() <= 1
    # the future depends on the plan
    lat3 = model.sample_future(cache, actions + 1.0, generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(lat1, lat3)


def test_wrong_image_size_is_reported() -> None:
    model, batch = model_and_batch()
    batch["images"] = batch["images"][..., :16, :16]
    with pytest.raises(ValueError, match="32x32"):
        model(batch)


def test_inference_without_targets_or_action_mask() -> None:
    model, batch = model_and_batch()
    obs = {k: batch[k] for k in ("images", "image_mask", "state", "state_mask", "text", "text_mask", "embodiment")}
    losses = model(obs)
    assert list(losses) == ["loss"] and losses["loss"].item() == 0.0
    assert model.sample_actions(obs, steps=2).shape == (B, H, A)
    assert isinstance(model.encode_prefix(obs), PrefixCache)


def test_env_state_head_regresses_only_the_valid_slots() -> None:
    model, batch = model_and_batch(env_state_dim=4)
    batch["env_state"] = torch.randn(B, 4)
    batch["env_state_mask"] = torch.tensor([[True, True, True, False]] * B)
    losses = model(batch)
    assert "env_state" in losses and losses["env_state"] > 0
    changed = {**batch, "env_state": batch["env_state"].clone()}
    changed["env_state"][:, 3] += 100.0  # a masked slot: no loss, whatever its value
    with torch.no_grad():
        assert float(model(changed)["env_state"]) == pytest.approx(float(model(batch)["env_state"]))
    losses["env_state"].backward()
    assert model.prefix.parameters().__next__().grad is not None  # the target reaches the image encoder
    cache = model.encode_prefix(batch)
    assert model.predict_env_state(cache).shape == (B, 4)
    _, extended = model.generate_subtask(cache)  # the estimate stays with the cache as it grows
    assert torch.equal(model.predict_env_state(extended), model.predict_env_state(cache))
    plain, _ = model_and_batch()
    # The head reads a query token at the end of the prefix, which the action expert can attend to as well.
    assert cache.prefix_len == plain.encode_prefix(batch).prefix_len + 1
    assert "env_state" not in plain(batch) and not hasattr(plain, "env_state_head")
    with pytest.raises(RuntimeError, match="env_state_dim=0"):
        plain.predict_env_state(plain.encode_prefix(batch))


def test_progress_has_no_loss_where_an_episode_s_true_progress_is_unknown() -> None:
    model, batch = model_and_batch()
    model.eval()  # no dropout: the same numbers twice
    with torch.no_grad():
        pred = torch.sigmoid(model.progress_head(model.encode_prefix(batch).pooled).squeeze(-1))
        unknown = {**batch, "progress_valid": torch.tensor([True, False, True])}
        wrong = {**unknown, "progress": torch.tensor([0.1, 0.99, 0.9])}  # the unknown one's target is garbage
        assert torch.allclose(model(unknown)["progress"], model(wrong)["progress"])
        assert not torch.allclose(model(batch)["progress"], model({**batch, "progress": wrong["progress"]})["progress"])
    assert pred.shape == (3,)


def test_padded_draft_rows_cut_pad_and_find_the_eos() -> None:
    rows, last = padded_draft_rows([[BOS, 5, 6, EOS], [EOS, 5, 6, 7, 8, 9], [], [7, EOS, 5]], n=5)
    assert rows == [[BOS, 5, 6, EOS, PAD], [BOS, 5, 6, 7, 8], [BOS, PAD, PAD, PAD, PAD], [BOS, EOS, 5, PAD, PAD]]
    assert last == [3, 4, 4, 1]  # the EOS, or n - 1 without one (a leading EOS is BOS's place)
    d, t = padded_draft(torch.tensor([[BOS, 5, 6, EOS], [BOS, 5, 6, 7]]), 6, "cpu")
    assert d.dtype == t.dtype == torch.long
    assert d.tolist() == [[BOS, 5, 6, EOS, PAD, PAD], [BOS, 5, 6, 7, PAD, PAD]] and t.tolist() == [3, 5]
