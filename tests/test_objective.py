"""The full objective on tiny models: adaptive weight, frozen image VAE, dtypes, overfitting."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import cvvae_jax
from cvvae_jax import assets, media
from cvvae_jax.discriminator import NLayerDiscriminator3D
from cvvae_jax.lpips import LPIPS
from cvvae_jax.model_config import CVVAEConfig, ImageVAEConfig
from cvvae_jax.objective import LogVars, Objective
from cvvae_jax.posterior import DiagonalGaussian
from conftest import FAST_COMPILE

IMAGE_VAE = ImageVAEConfig(block_out_channels=(32, 32, 32, 32), layers_per_block=1,
                           down_block_types=("DownEncoderBlock2D",) * 4,
                           up_block_types=("UpDecoderBlock2D",) * 4)
VIDEO_VAE = CVVAEConfig(ch=32, ch_mult=(1, 1, 1, 1), num_res_blocks=1, attn_resolutions=())
fast_jit = functools.partial(jax.jit, compiler_options=FAST_COMPILE)


def clip(t: int = 5) -> jax.Array:
    """(1, t, 32, 32, 3): a real clip, downscaled 4x and cropped."""
    frames = media.to_float(media.read_video(assets.path("clip_a.mp4"), max_frames=t)[0])
    return jnp.asarray(frames)[None, :, ::4, ::4][:, :, 2:34, 16:48]


def models(dtype=jnp.float32):
    vae = cvvae_jax.CVVAE.from_config(VIDEO_VAE, dtype=dtype, seed=1)
    disc = NLayerDiscriminator3D(ndf=32, n_layers=1, dtype=dtype, rngs=nnx.Rngs(2))
    image_vae = cvvae_jax.ImageVAE.from_config(IMAGE_VAE, seed=3)
    return vae, disc, image_vae


def split(*modules):
    return zip(*(nnx.split(m) for m in modules))


@pytest.fixture(scope="module")
def tiny():
    return models()


def test_adaptive_weight_equals_the_ratio_of_separate_gradients(tiny):
    vae, disc, image_vae = tiny
    (vdef, ddef, idef), (vstate, dstate, istate) = split(vae, disc, image_vae)
    obj = Objective(perceptual_weight=0.0, disc_weight=0.5, disc_start=1)
    lv = LogVars(jnp.float32(0.3), jnp.float32(-0.2))
    key = jax.random.key(4)

    @fast_jit
    def run(vstate, istate, x, step):
        """Gradients of three terms: one forward and one backward batched over the terms."""
        def terms(vs, ist):
            _, aux = obj.generator_loss(nnx.merge(vdef, vs), lv, nnx.merge(ddef, dstate),
                                        nnx.merge(idef, ist), None, x, key=key, step=step)
            m = aux.metrics
            return jnp.stack([m["loss/nll"], m["loss/g"], m["loss/total"]]), m
        return jax.jacrev(terms, argnums=(0, 1), has_aux=True)(vstate, istate)

    x = clip()
    (g_video, g_image), m = run(vstate, istate, x, 1)
    w_nll, w_g, _ = g_video["decoder"]["conv_out"]["kernel"][...]
    want = 0.5 * np.linalg.norm(w_nll) / (np.linalg.norm(w_g) + 1e-4)
    assert want > 1e-3
    np.testing.assert_allclose(m["scalars/d_weight"], want, rtol=1e-4)
    # the frozen image VAE gets exactly nothing, the video VAE a real gradient
    assert all(not np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(g_image))
    assert np.abs(np.asarray(g_video["encoder"]["conv_in"]["kernel"][...][2])).max() > 0
    # before disc_start the GAN term is off
    _, before = run(vstate, istate, x, 0)
    assert float(before["scalars/d_weight"]) == 0.0 and float(before["loss/g"]) == 0.0
    assert float(before["loss/total"]) == pytest.approx(
        float(before["loss/nll"] + before["loss/nll2d"] + before["loss/kl"]), rel=1e-5)
    assert run._cache_size() == 1


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["fp32", "bf16"])
def test_full_objective_jits_once_and_is_finite(dtype):
    """Generator (with LPIPS) and discriminator losses and gradients, fp32 params."""
    vae, disc, image_vae = models(dtype)
    lpips = LPIPS(dtype=dtype, rngs=nnx.Rngs(5))
    (vdef, ddef, idef, ldef), (vstate, dstate, istate, lstate) = split(vae, disc, image_vae, lpips)
    obj = Objective(perceptual_weight=0.5, mapping="random", regularizer="decoder")

    @fast_jit
    def losses_and_grads(vstate, lv, dstate, x, key, step):
        def g_loss(vs, lv):
            return obj.generator_loss(nnx.merge(vdef, vs), lv, nnx.merge(ddef, dstate),
                                      nnx.merge(idef, istate), nnx.merge(ldef, lstate), x,
                                      key=key, step=step)
        (total, aux), g_grads = jax.value_and_grad(g_loss, argnums=(0, 1), has_aux=True)(vstate, lv)

        def d_loss(ds):
            return obj.discriminator_loss(nnx.merge(ddef, ds), aux.target, aux.x_rec, step=step)
        (d, d_metrics), d_grads = jax.value_and_grad(d_loss, has_aux=True)(dstate)
        return {**aux.metrics, **d_metrics}, g_grads, d_grads

    for seed in (0, 1):
        x = clip(5) if seed == 0 else clip(5)[:, ::-1]
        metrics, g_grads, d_grads = losses_and_grads(vstate, LogVars.init(), dstate, x,
                                                     jax.random.key(seed), 10)
        for name, value in metrics.items():
            assert np.isfinite(float(value)), name
        for leaf in jax.tree.leaves((g_grads, d_grads)):
            assert leaf.dtype == jnp.float32 and np.all(np.isfinite(np.asarray(leaf)))
        assert float(metrics["loss/disc"]) > 0 and float(metrics["scalars/d_weight"]) > 0
        assert np.abs(np.asarray(g_grads[1].video)) > 0  # the log-variance learns
    assert losses_and_grads._cache_size() == 1


@pytest.mark.parametrize("regularizer", ["encoder", "both"])
def test_encoder_regularizer_decodes_image_latents_with_the_video_decoder(tiny, regularizer):
    vae, disc, image_vae = tiny
    obj = Objective(perceptual_weight=0.0, mapping="slice", regularizer=regularizer)
    (vdef, ddef, idef), states = split(vae, disc, image_vae)
    x = clip()

    @fast_jit
    def loss_and_posteriors(vstate, dstate, istate):
        vae, image_vae = nnx.merge(vdef, vstate), nnx.merge(idef, istate)
        loss, aux = obj.generator_loss(vae, LogVars.init(), nnx.merge(ddef, dstate), image_vae,
                                       None, x, key=jax.random.key(6), step=0)
        return loss, aux, vae.encode_moments(x), image_vae.encode_moments(x[0, ::4])

    loss, aux, video_moments, image_moments = loss_and_posteriors(*states)
    assert aux.x_rec.shape == (2,) + x.shape[1:]  # the clip, then its image-latent twin
    np.testing.assert_array_equal(aux.target, jnp.concatenate([x, x]))
    # KL over both halves / 2B, as the official code regularises the concatenated batch
    post = DiagonalGaussian.from_moments(video_moments)
    sd = DiagonalGaussian.from_moments(image_moments)
    want = 0.5 * (np.sum(post.mean**2 + post.var - 1 - post.logvar)
                  + np.sum(sd.mean**2 + sd.var - 1 - sd.logvar)) / 2
    np.testing.assert_allclose(aux.metrics["loss/kl"], want, rtol=1e-4)
    assert ("loss/rec2d" in aux.metrics) == (regularizer == "both")
    assert np.isfinite(float(loss))


def test_images_are_one_frame_clips(tiny):
    vae, disc, image_vae = tiny
    x = clip(3).reshape(3, 1, 32, 32, 3)
    obj = Objective(perceptual_weight=0.0, mapping="random")
    (vdef, ddef, idef), states = split(vae, disc, image_vae)

    @fast_jit
    def both(vstate, dstate, istate, x):
        disc = nnx.merge(ddef, dstate)
        loss, aux = obj.generator_loss(nnx.merge(vdef, vstate), LogVars.init(), disc,
                                       nnx.merge(idef, istate), None, x,
                                       key=jax.random.key(7), step=0)
        return loss, aux, obj.discriminator_loss(disc, aux.target, aux.x_rec, step=0)[0]

    loss, aux, d = both(*states, x)
    assert aux.x_rec.shape == x.shape and aux.x_2d.shape == x.shape
    assert np.isfinite(float(loss)) and np.isfinite(float(d))


def crops_16() -> jax.Array:
    """(32, 16, 16, 3): varied patches of both bundled clips, so the decoder must use its latent."""
    out = []
    for name in ("clip_a.mp4", "clip_b.mp4"):
        frame = media.to_float(media.read_video(assets.path(name), max_frames=1)[0])[0, ::4, ::4]
        out += [frame[i:i + 16, j:j + 16] for i in (0, 10, 20, 20) for j in (0, 16, 32, 48)]
    return jnp.asarray(np.stack(out))


def train_image_vae(images, steps):
    """Plain L1 training on a few patches: a stand-in for the pretrained SD VAE."""
    image_vae = cvvae_jax.ImageVAE.from_config(IMAGE_VAE, seed=3)
    graphdef, state = nnx.split(image_vae)
    tx = optax.adam(2e-3)
    opt = tx.init(state)

    @jax.jit
    def step(state, opt, key):
        def loss(state):
            m = nnx.merge(graphdef, state)
            post = DiagonalGaussian.from_moments(m.encode_moments(images))
            return jnp.mean(jnp.abs(m.decode_latents(post.sample(key)) - images))
        grads = jax.grad(loss)(state)
        updates, opt = tx.update(grads, opt, state)
        return optax.apply_updates(state, updates), opt

    for i in range(steps):
        state, opt = step(state, opt, jax.random.key(i))
    return nnx.merge(graphdef, state)


def test_overfitting_one_clip_lowers_reconstruction_and_regulariser_errors():
    x = clip(5)[:, :, 8:24, 8:24]  # 16 x 16: 50 steps of the full objective in ~20 s
    image_vae = train_image_vae(jnp.concatenate([crops_16(), x[0]]), 100)
    vae, disc, _ = models()
    (vdef, ddef, idef), (vstate, dstate, istate) = split(vae, disc, image_vae)
    obj = Objective(perceptual_weight=0.0, mapping="random")
    g_tx, d_tx = optax.adam(1e-3), optax.adam(1e-3)
    params = (vstate, LogVars.init())
    g_opt, d_opt = g_tx.init(params), d_tx.init(dstate)

    # 50 steps: compiling at FAST_COMPILE saves more than the slower steps cost.
    @fast_jit
    def step(params, g_opt, dstate, d_opt, key, i):
        def g_loss(p):
            return obj.generator_loss(nnx.merge(vdef, p[0]), p[1], nnx.merge(ddef, dstate),
                                      nnx.merge(idef, istate), None, x, key=key, step=i)
        (_, aux), grads = jax.value_and_grad(g_loss, has_aux=True)(params)
        updates, g_opt = g_tx.update(grads, g_opt, params)
        params = optax.apply_updates(params, updates)
        d_grads = jax.grad(lambda d: obj.discriminator_loss(nnx.merge(ddef, d), aux.target,
                                                            aux.x_rec, step=i)[0])(dstate)
        updates, d_opt = d_tx.update(d_grads, d_opt, dstate)
        return params, g_opt, optax.apply_updates(dstate, updates), d_opt, aux.metrics

    @fast_jit
    def errors(vstate):
        """Deterministic before/after numbers: posterior mode, "slice" targets."""
        vae = nnx.merge(vdef, vstate)
        z = DiagonalGaussian.from_moments(vae.encode_moments(x)).mode()
        view = nnx.merge(idef, istate).decode_latents(z[0])
        return (jnp.mean(jnp.abs(vae.decode_latents(z) - x)),
                jnp.mean(jnp.abs(view - x[0, ::4])))

    rec0, rec2d0 = errors(vstate)
    for i in range(50):
        params, g_opt, dstate, d_opt, _ = step(params, g_opt, dstate, d_opt,
                                               jax.random.fold_in(jax.random.key(8), i), i)
    rec1, rec2d1 = errors(params[0])
    print(f"L1 reconstruction {rec0:.4f} -> {rec1:.4f}, image-decoder view {rec2d0:.4f} -> {rec2d1:.4f}")
    assert rec1 < rec0 / 2
    # Trajectories of tiny Adam steps move with float rounding (the stand-in image VAE's
    # too, so the start moves): conv_forms.py's forms have taken this ratio from 0.37 to 0.67,
    # 0.23 and 0.80 (the last with the phase-split gradients of strided convs). With
    # rec2d_weight=0 the same run printed 0.5164 -> 0.4950 (0.96).
    assert rec2d1 < 0.9 * rec2d0
