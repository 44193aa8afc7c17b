"""Each loss term against numbers computed independently with numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cvvae_jax import losses


def rand(shape, seed):
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def frame_valued(t, b=2, hw=4):
    """A clip whose frame i is filled with the value i (so frames identify themselves)."""
    return np.broadcast_to(np.arange(t, dtype=np.float32)[None, :, None, None, None],
                           (b, t, hw, hw, 3)).copy()


def test_pixel_losses():
    x, y = rand((2, 5, 4, 4, 3), 0), rand((2, 5, 4, 4, 3), 1)
    np.testing.assert_allclose(losses.pixel_loss(x, y, "l1"), np.abs(x - y), rtol=1e-6)
    np.testing.assert_allclose(losses.pixel_loss(x, y, "l2"), (x - y) ** 2, rtol=1e-6)
    with pytest.raises(ValueError, match="'l1' or 'l2'"):
        losses.pixel_loss(x, y, "huber")


def test_perceptual_term_is_added_per_frame_to_every_pixel():
    x, y = rand((2, 3, 4, 4, 3), 2), rand((2, 3, 4, 4, 3), 3)
    per_frame = lambda a, b: jnp.sum((a - b) ** 2, axis=(1, 2, 3))  # noqa: E731 (N,H,W,3) -> (N,)
    got = losses.reconstruction_loss(x, y, kind="l1", perceptual_weight=0.5, lpips=per_frame)
    p = ((x - y) ** 2).sum(axis=(2, 3, 4))  # (B, T)
    np.testing.assert_allclose(got, np.abs(x - y) + 0.5 * p[:, :, None, None, None], rtol=1e-5)
    # switched off by a zero weight or a missing network
    np.testing.assert_allclose(losses.reconstruction_loss(x, y, perceptual_weight=0.0, lpips=per_frame),
                               np.abs(x - y), rtol=1e-6)
    np.testing.assert_allclose(losses.reconstruction_loss(x, y, perceptual_weight=0.5, lpips=None),
                               np.abs(x - y), rtol=1e-6)


def test_nll_divides_the_sum_by_the_number_of_frames():
    rec = np.abs(rand((2, 5, 4, 4, 3), 4))
    logvar = np.float32(0.7)
    want = np.sum(rec / np.exp(logvar) + logvar) / (2 * 5)
    np.testing.assert_allclose(losses.nll_loss(rec, logvar), want, rtol=1e-6)
    # images (T = 1) divide by the batch
    np.testing.assert_allclose(losses.nll_loss(rec[:, :1], 0.0), rec[:, :1].sum() / 2, rtol=1e-6)


def test_kl_against_numpy():
    mean, logvar = rand((3, 2, 4, 4, 4), 5), rand((3, 2, 4, 4, 4), 6)
    want = 0.5 * np.sum(mean**2 + np.exp(logvar) - 1 - logvar) / 3
    np.testing.assert_allclose(losses.kl_loss(mean, logvar), want, rtol=1e-5)
    assert float(losses.kl_loss(np.zeros((1, 2)), np.zeros((1, 2)))) == 0.0


def test_discriminator_and_generator_losses():
    real = np.array([[2.0, 0.5, -1.0]], np.float32)
    fake = np.array([[-2.0, 0.25, 1.0]], np.float32)
    hinge = 0.5 * (np.mean(np.maximum(0, 1 - real)) + np.mean(np.maximum(0, 1 + fake)))
    vanilla = 0.5 * (np.mean(np.log1p(np.exp(-real))) + np.mean(np.log1p(np.exp(fake))))
    np.testing.assert_allclose(losses.hinge_d_loss(real, fake), hinge, rtol=1e-6)
    np.testing.assert_allclose(losses.vanilla_d_loss(real, fake), vanilla, rtol=1e-6)
    np.testing.assert_allclose(losses.generator_loss(fake), -np.mean(fake), rtol=1e-6)
    assert abs(hinge - (0.5 * (0.5 + 2.0) / 3 + 0.5 * (1.25 + 2.0) / 3)) < 1e-6


def test_adaptive_weight_ratio_clip_and_no_gradient():
    a, b = rand((3, 3, 8, 3), 7), rand((3, 3, 8, 3), 8)
    want = np.linalg.norm(a) / (np.linalg.norm(b) + 1e-4) * 0.5
    np.testing.assert_allclose(losses.adaptive_weight(a, b, 0.5), want, rtol=1e-5)
    assert float(losses.adaptive_weight(a, np.zeros_like(b), 1.0)) == 1e4  # clipped
    g = jax.grad(lambda s: losses.adaptive_weight(s * a, b, 1.0))(1.0)
    assert float(g) == 0.0


@pytest.mark.parametrize("mapping,want", [
    ("slice", [[0, 4, 8]]),
    ("first", [[0]]),
    ("mean", [[0, 2.5, 6.5]]),  # frame 0, then the mean of frames 1-4 and 5-8
])
def test_deterministic_mappings_pick_the_documented_frames(mapping, want):
    x = frame_valued(9)
    got = losses.map_frames(x, mapping)
    assert got.shape == (2, len(want[0]), 4, 4, 3)
    np.testing.assert_array_equal(got[:, :, 0, 0, 0], np.repeat(want, 2, axis=0))


def test_random_mapping_picks_one_frame_from_each_group_of_four():
    x = frame_valued(17)
    seen = set()
    for seed in range(40):
        got = np.asarray(losses.map_frames(x, "random", jax.random.key(seed)))[0, :, 0, 0, 0]
        assert got.shape == (5,) and got[0] == 0
        for i, frame in enumerate(got[1:]):
            assert 4 * i + 1 <= frame <= 4 * i + 4
        seen.update((i, int(f) - 4 * i) for i, f in enumerate(got[1:]))
        again = losses.map_frames(x, "random", jax.random.key(seed))[0, :, 0, 0, 0]
        np.testing.assert_array_equal(again, got)  # the step's key decides
    assert {offset for _, offset in seen} == {1, 2, 3, 4}  # every offset occurs


@pytest.mark.parametrize("mapping", losses.MAPPINGS)
def test_images_map_to_their_only_frame(mapping):
    x = rand((2, 1, 4, 4, 3), 9)
    got = losses.map_frames(x, mapping, jax.random.key(0))
    np.testing.assert_array_equal(got, x)


def test_mapping_errors():
    with pytest.raises(ValueError, match="T = 1 \\+ 4k"):
        losses.map_frames(frame_valued(8), "slice")
    with pytest.raises(ValueError, match="needs a key"):
        losses.map_frames(frame_valued(5), "random")
    with pytest.raises(ValueError, match="expected one of"):
        losses.map_frames(frame_valued(5), "middle")
