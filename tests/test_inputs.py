"""Bad input gets a clear error, never a silent truncation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import cvvae_jax
from conftest import FIXTURES


@pytest.fixture(scope="module")
def vae():
    return cvvae_jax.CVVAE.from_pretrained(FIXTURES / "cvvae_v1_tiny")


@pytest.fixture(scope="module")
def image_vae():
    return cvvae_jax.ImageVAE.from_pretrained(FIXTURES / "sd_vae_tiny")


def video(t=5, h=16, w=24, c=3, dtype=np.float32):
    return np.zeros((1, t, h, w, c), dtype)


@pytest.mark.parametrize("x,message", [
    (np.zeros((5, 16, 24, 3), np.float32),
     r"expected a 5D array .* for one video add a batch axis: x\[None\]; .* images a time axis"),
    (np.zeros((1, 3, 5, 16, 24), np.float32), "looks channels-first"),
    (video(c=4), "expected 3 channels"),
    (video(t=6), r"T=6 frames; .* needs 1 \+ 4k frames \(nearest valid: 5 or 9\)"),
    (video(t=3), r"nearest valid: 1 or 5"),
    (video(h=20), r"20 x 24; both must be multiples of 8 \(e.g. 16 x 24\)"),
    (video(dtype=np.uint8), r"floating point .* x.astype\(np.float32\) / 127.5 - 1"),
    (video() + 255.0, r"pixels in \[-1, 1\], got values up to 255 .* x / 127.5 - 1"),
    (video(h=0), r"empty array, shape \(1, 5, 0, 24, 3\)"),
])
def test_encode_rejects(vae, x, message):
    with pytest.raises(ValueError, match=message):
        vae.encode(x)


def test_encode_rejects_non_finite(vae):
    x = video()
    x[0, 2, 3, 4, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        vae.encode(x)
    x[0, 2, 3, 4, 1] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        vae.encode(jnp.asarray(x))


def test_encode_takes_decoded_frames_that_overshoot_a_little(vae):
    assert vae.encode(video() + 1.2).mean.shape == (1, 2, 2, 3, 4)


def test_decode_rejects(vae):
    post = vae.encode(video())
    with pytest.raises(TypeError, match=r"got the posterior .* post.mode\(\) or post.sample\(key\)"):
        vae.decode(post)
    with pytest.raises(TypeError, match=r"expected a PRNG key, e.g. jax.random.key\(seed\), got 0"):
        post.sample(0)
    with pytest.raises(ValueError, match="expected 4 channels"):
        vae.decode(np.zeros((1, 2, 2, 3, 16), np.float32))
    with pytest.raises(ValueError, match="expected a 5D array"):
        vae.decode(np.zeros((1, 2, 3, 4), np.float32))
    with pytest.raises(ValueError, match=r"^decode: expected floating point values, got int32$"):
        vae.decode(np.zeros((1, 2, 2, 2, 4), np.int32))  # latents get no advice about pixels


def test_image_vae_rejects(image_vae):
    with pytest.raises(ValueError, match=r"expected a 4D array \(B, H, W, C\)"):
        image_vae.encode(video())
    with pytest.raises(ValueError, match="multiples of 8"):
        image_vae.encode(np.zeros((1, 12, 16, 3), np.float32))
    with pytest.raises(ValueError, match=r"pixels in \[-1, 1\]"):
        image_vae.encode(np.full((1, 16, 16, 3), 200.0, np.float32))


def test_encode_and_decode_trace_into_the_callers_jit(vae):
    x = np.random.default_rng(0).uniform(-1, 1, (1, 5, 16, 24, 3)).astype(np.float32)
    graphdef, state = nnx.split(vae)

    def round_trip(state, x):
        model = nnx.merge(graphdef, state)
        return model.decode(model.encode(x).mode())

    ours = jax.jit(round_trip, compiler_options=cvvae_jax.compiler_options())(state, x)
    np.testing.assert_allclose(ours, vae.decode(vae.encode(x).mode()), atol=1e-5)


def test_gradients_of_the_parameters_outside_any_jit(vae):
    # jax.grad over the parameters, eagerly, with the latents a constant: the same
    # gradients as under jit (a nested jit may carry no compiler options, and the
    # input checks have no values to look at there).
    z = np.random.default_rng(0).normal(size=(1, 2, 4, 4, 4)).astype(np.float32)
    graphdef, state = nnx.split(vae)

    def loss(state):
        return jnp.mean(nnx.merge(graphdef, state).decode(z) ** 2)

    eager, jitted = jax.grad(loss)(state), jax.jit(jax.grad(loss))(state)
    for a, b in zip(jax.tree.leaves(eager), jax.tree.leaves(jitted)):
        np.testing.assert_allclose(a, b, atol=1e-6)
    grads = nnx.grad(lambda model: jnp.mean(model.decode(z) ** 2))(vae)
    assert len(jax.tree.leaves(grads)) == len(jax.tree.leaves(state))


def test_abstract_models_and_wrong_sources_say_what_they_are(vae, tmp_path):
    abstract = cvvae_jax.CVVAE.abstract(vae.config)
    for call in (lambda: abstract.encode(video()), lambda: abstract.save_pretrained(tmp_path / "m")):
        with pytest.raises(TypeError, match=r"an abstract model .* from_pretrained or .* from_config"):
            call()
    assert not (tmp_path / "m").exists()
    with pytest.raises(TypeError, match="inflation takes an ImageVAE .*, got a CVVAE"):
        cvvae_jax.CVVAE.from_image_vae(vae)


def test_valid_shapes_give_the_documented_latent_shapes(vae):
    post = vae.encode(video(t=9, h=32, w=40))
    assert post.mean.shape == post.logvar.shape == (1, 3, 4, 5, 4)
    assert vae.decode(post.mode()).shape == (1, 9, 32, 40, 3)
    assert vae.encode(video(t=1, h=8, w=8)).mean.shape == (1, 1, 1, 1, 4)
