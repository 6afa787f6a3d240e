"""The image tokenizer's options: residual stem blocks and spatial-softmax keypoint tokens."""

from __future__ import annotations

import pytest
import torch

from physis.model import ModelConfig, PhysisModel
from physis.model.tokenizers import SpatialSoftmax
from tests.model.test_physis_model import B, make_batch, make_config


def test_spatial_softmax_finds_a_bright_spot() -> None:
    kp = SpatialSoftmax(channels=1, keypoints=1)
    with torch.no_grad():
        kp.maps.weight.fill_(1.0)
        kp.maps.bias.zero_()
        kp.log_temperature.fill_(-4.0)  # sharp: the expectation sits on the maximum
    maps = torch.zeros(2, 1, 9, 13)
    maps[0, 0, 2, 10] = 1.0  # row 2 of 9, column 10 of 13
    maps[1, 0, 8, 0] = 1.0  # bottom-left corner
    points = kp(maps)
    assert points.shape == (2, 1, 2)
    expected = torch.tensor([[10 / 12 * 2 - 1, 2 / 8 * 2 - 1], [-1.0, 1.0]])
    assert torch.allclose(points[:, 0], expected, atol=1e-3)


def test_keypoints_add_one_prefix_token_per_camera_and_frame() -> None:
    torch.manual_seed(0)
    plain, with_kp = make_config(history=2), make_config(history=2, keypoints=8, stem_blocks=1)
    batch = make_batch(plain)
    tokens, mask, _, _ = PhysisModel(plain).prefix(batch)
    tokens_kp, mask_kp, feats, located = PhysisModel(with_kp).prefix(batch)
    assert located is None  # no localizer asked for
    c, t = plain.cameras, plain.history
    assert tokens_kp.shape[1] == tokens.shape[1] + c * t
    n_img = c * t * plain.patch_grid**2
    # the keypoint tokens follow the patches and share their camera's mask (batch 2 has no second camera)
    kp_mask = mask_kp[:, n_img : n_img + c * t].view(B, c, t)
    assert torch.equal(kp_mask, batch["image_mask"][:, :, None].expand(B, c, t))
    assert feats.shape == (B * c * t, with_kp.width, plain.patch_grid, plain.patch_grid)


def test_keypoints_see_where_things_are() -> None:
    """Moving an object in the image changes the keypoint token, not only a patch's content."""
    torch.manual_seed(0)
    cfg = make_config(keypoints=4)
    model = PhysisModel(cfg).eval()
    enc = model.prefix.patches
    a = torch.zeros(1, 3, cfg.image_size, cfg.image_size)
    b = a.clone()
    a[..., 4:8, 4:8] = 1.0
    b[..., 20:24, 20:24] = 1.0
    with torch.no_grad():
        pa, pb = enc.features_and_keypoints(a)[1], enc.features_and_keypoints(b)[1]
    assert pa.shape == (1, 4, 2) and not torch.allclose(pa, pb, atol=1e-3)


@pytest.mark.parametrize("overrides", [dict(stem_blocks=2), dict(keypoints=8), dict(stem_blocks=1, keypoints=8)])
def test_encoder_options_train_and_keep_the_cache_exact(overrides) -> None:
    torch.manual_seed(0)
    cfg = make_config(**overrides)
    model = PhysisModel(cfg)
    batch = make_batch(cfg)
    losses = model(batch)
    losses["loss"].backward()
    enc = model.prefix.patches
    if cfg.stem_blocks:
        assert len(enc.stem) == 2 + cfg.stem_blocks and enc.stem[-1].body[0].weight.grad.abs().sum() > 0
    if cfg.keypoints:
        assert enc.keypoints.maps.weight.grad.abs().sum() > 0
        assert model.prefix.keypoint_proj.weight.grad.abs().sum() > 0
    model.eval()
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(B, cfg.horizon, cfg.action_dim, generator=g)
    cached = model.sample_actions(cache=model.encode_prefix(batch), noise=noise, steps=3)
    assert torch.allclose(cached, model.sample_actions(batch, noise=noise, steps=3))


def test_the_localizer_estimates_the_environment_state_from_keypoints_and_feeds_it_to_the_trunk() -> None:
    torch.manual_seed(0)
    cfg = make_config(keypoints=4, env_state_dim=3, localizer=True)
    model = PhysisModel(cfg)
    assert not hasattr(model, "env_state_head")  # the localizer is the estimate
    batch = {**make_batch(cfg), "env_state": torch.randn(B, 3), "env_state_mask": torch.ones(B, 3, dtype=torch.bool)}
    losses = model(batch)
    losses["env_state"].backward()
    # the target reaches the keypoint maps through the localizer alone, not through the trunk
    assert model.prefix.patches.keypoints.maps.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.blocks.parameters())
    model.eval()
    cache = model.encode_prefix(batch)
    tokens, _, _, located = model.prefix(batch)
    assert torch.equal(model.predict_env_state(cache), located)
    # the query token carries the estimate: another estimate gives another token
    with torch.no_grad():
        model.prefix.localizer_in.bias.add_(1.0)
    assert not torch.allclose(model.prefix(batch)[0][:, -1], tokens[:, -1])
    # the runtime's encoding (pooled=False) keeps the estimate too
    assert torch.equal(model.encode_prefix(batch, pooled=False).env_state, located)


def test_the_localizer_state_option_projects_the_estimate_with_the_state_but_estimates_without_it() -> None:
    torch.manual_seed(0)
    cfg = make_config(keypoints=4, env_state_dim=3, localizer=True, localizer_state=True)
    model = PhysisModel(cfg).eval()
    assert model.prefix.localizer_in.in_features == 3 + 2 * cfg.state_dim
    batch = make_batch(cfg)
    moved = {**batch, "state": batch["state"] + 1.0}
    tokens, _, _, located = model.prefix(batch)
    tokens_moved, _, _, located_moved = model.prefix(moved)
    assert torch.equal(located, located_moved)  # the estimate never reads the hand
    assert not torch.allclose(tokens[:, -1], tokens_moved[:, -1])  # its token does
    with pytest.raises(ValueError, match="localizer_state projects"):
        make_config(keypoints=4, env_state_dim=3, localizer_state=True)


def test_the_localizer_teacher_feeds_the_truth_to_a_fraction_of_training_rows_only() -> None:
    torch.manual_seed(0)
    cfg = make_config(keypoints=4, env_state_dim=3, localizer=True, localizer_teacher=0.5)
    model = PhysisModel(cfg)
    n = 64
    batch = {k: v[:1].expand(n, *v.shape[1:]).clone() for k, v in make_batch(cfg).items()}  # n equal rows
    truth, valid = torch.randn(n, 3), torch.ones(n, 3, dtype=torch.bool)
    valid[:, 2] = False  # a value the batch does not know keeps the estimate
    batch.update(env_state=truth, env_state_mask=valid)
    located = model.prefix._locate
    fed: list[torch.Tensor] = []
    model.prefix.localizer_in.register_forward_hook(lambda m, args, out: fed.append(args[0]))
    model.train()
    model.prefix(batch)
    estimate = located(*_locator_inputs(model, batch))
    took_truth = (fed[0][:, :2] == truth[:, :2]).all(1)
    assert torch.equal(fed[0][took_truth, 2], estimate[took_truth, 2])
    assert torch.allclose(fed[0][~took_truth], estimate[~took_truth])
    assert 16 < int(took_truth.sum()) < 48  # about half of 64
    model.eval()  # inference never sees the truth, even when a batch carries it
    model.prefix(batch)
    assert torch.allclose(fed[1], estimate)
    losses = PhysisModel(make_config(keypoints=4, env_state_dim=3, localizer=True, localizer_teacher=1.0))(batch)
    assert torch.isfinite(losses["env_state"])  # the estimate is still what the loss trains
    with pytest.raises(ValueError, match="localizer_teacher replaces"):
        make_config(keypoints=4, env_state_dim=3, localizer_teacher=0.5)
    with pytest.raises(ValueError, match="fraction in"):
        make_config(keypoints=4, env_state_dim=3, localizer=True, localizer_teacher=1.5)


def test_the_teacher_feeds_the_displaced_copy_where_the_batch_has_one_and_the_loss_keeps_the_truth() -> None:
    torch.manual_seed(0)
    cfg = make_config(keypoints=4, env_state_dim=3, localizer=True, localizer_teacher=1.0)
    model = PhysisModel(cfg).train()
    batch = make_batch(cfg)
    n = batch["state"].shape[0]
    truth, moved = torch.randn(n, 3), torch.randn(n, 3)
    batch.update(env_state=truth, env_state_mask=torch.ones(n, 3, dtype=torch.bool), env_state_teacher=moved)
    fed: list[torch.Tensor] = []
    model.prefix.localizer_in.register_forward_hook(lambda m, args, out: fed.append(args[0]))
    losses = model(batch)
    assert torch.equal(fed[0], moved)  # every row takes the teacher's value, here the displaced one
    plain = {k: v for k, v in batch.items() if k != "env_state_teacher"}
    assert torch.equal(model(plain)["env_state"], losses["env_state"])  # the localizer's target is the truth


def test_values_a_policy_gives_replace_the_estimate_where_their_mask_is_set() -> None:
    torch.manual_seed(0)
    model = PhysisModel(make_config(keypoints=4, env_state_dim=3, localizer=True)).eval()
    batch = make_batch(model.config)
    fed: list[torch.Tensor] = []
    model.prefix.localizer_in.register_forward_hook(lambda m, args, out: fed.append(args[0]))
    _, _, _, estimate = model.prefix(batch)
    given, mask = torch.randn(B, 3), torch.zeros(B, 3, dtype=torch.bool)
    mask[0, 1:] = True  # the first row holds two values; the second row holds none
    _, _, _, located = model.prefix({**batch, "env_state_given": given, "env_state_given_mask": mask})
    assert torch.equal(located, estimate)  # the estimate returned is still the localizer's own
    assert torch.equal(fed[1][0, 1:], given[0, 1:]) and torch.equal(fed[1][0, 0], estimate[0, 0])
    assert torch.equal(fed[1][1], estimate[1])


def _locator_inputs(model: PhysisModel, batch: dict[str, torch.Tensor]) -> tuple:
    images = batch["images"]
    _, points = model.prefix.patches.features_and_keypoints(images.flatten(0, 2))
    return points, batch["text"], batch["text_mask"], images.shape[1]


def test_the_localizer_needs_keypoints_and_an_environment_state() -> None:
    with pytest.raises(ValueError, match="localizer needs keypoints"):
        make_config(env_state_dim=3, localizer=True)
    with pytest.raises(ValueError, match="localizer needs keypoints"):
        make_config(keypoints=4, localizer=True)


def test_negative_encoder_sizes_are_refused() -> None:
    with pytest.raises(ValueError, match="stem_blocks and keypoints"):
        ModelConfig.preset("tiny", keypoints=-1)


def test_keypoint_only_cameras_reach_the_trunk_by_their_keypoint_token_alone() -> None:
    torch.manual_seed(0)
    full, slim = make_config(keypoints=4), make_config(keypoints=4, keypoint_only_cameras=[1])
    batch = make_batch(full)
    model = PhysisModel(slim)
    tokens_full, _, _, _ = PhysisModel(full).prefix(batch)
    tokens, mask, feats, _ = model.prefix(batch)
    grid = full.patch_grid**2
    assert tokens.shape[1] == tokens_full.shape[1] - grid  # camera 1's patch grid is gone
    # the keypoint tokens of both cameras stay, with their cameras' masks (batch row 2 lacks camera 1)
    assert torch.equal(mask[:, grid : grid + 2], batch["image_mask"].bool())
    assert feats.shape[0] == B * 2  # the world model still gets every camera's features
    # camera 1 still changes what the model does, through its keypoints
    model.eval()
    moved = {**batch, "images": batch["images"].clone()}
    moved["images"][:, 1] = moved["images"][:, 1].flip(-1)
    noise = torch.randn(B, slim.horizon, slim.action_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a, b = model.sample_actions(batch, noise=noise, steps=2), model.sample_actions(moved, noise=noise, steps=2)
        assert not torch.allclose(a[:2], b[:2])
        cached = model.sample_actions(cache=model.encode_prefix(batch), noise=noise, steps=2)
    assert torch.allclose(cached, a)
    model.train()
    model(batch)["loss"].backward()
    assert model.prefix.patches.keypoints.maps.weight.grad.abs().sum() > 0


def test_keypoint_only_cameras_must_be_distinct_slots_with_keypoints() -> None:
    with pytest.raises(ValueError, match="needs keypoints"):
        make_config(keypoint_only_cameras=[1])
    with pytest.raises(ValueError, match="not distinct slots"):
        make_config(keypoints=4, keypoint_only_cameras=[2])
    with pytest.raises(ValueError, match="not distinct slots"):
        make_config(keypoints=4, keypoint_only_cameras=[1, 1])
    with pytest.raises(ValueError, match="at least one camera"):
        make_config(keypoints=4, keypoint_only_cameras=[0, 1])
    cfg = make_config(keypoints=4, keypoint_only_cameras=[1])
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg  # a checkpoint's config round trip
