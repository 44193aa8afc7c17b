"""The pure train step in-process: the non-finite guard, remat, EMA and the step counter."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import cvvae_jax
from cvvae_jax import sharding, train_step
from cvvae_jax.discriminator import NLayerDiscriminator3D
from cvvae_jax.model_config import ImageVAEConfig
from cvvae_jax.objective import Objective
from conftest import FAST_COMPILE

IMAGE_VAE = ImageVAEConfig(block_out_channels=(32, 32), layers_per_block=1,
                           down_block_types=("DownEncoderBlock2D",) * 2,
                           up_block_types=("UpDecoderBlock2D",) * 2)


def test_a_non_finite_batch_changes_nothing_and_is_counted():
    vae = cvvae_jax.ImageVAE.from_config(IMAGE_VAE, seed=0)
    disc = NLayerDiscriminator3D(ndf=32, n_layers=0, rngs=nnx.Rngs(1))
    (vdef, vstate), (ddef, dstate) = nnx.split(vae), nnx.split(disc)
    g_sched, d_sched = train_step.schedules(lr=1e-3, lr_g_factor=2.0, warmup_steps=2,
                                            total_steps=10, min_lr_ratio=0.1)
    g_tx, d_tx = train_step.optimizers(g_schedule=g_sched, d_schedule=d_sched, b1=0.9, b2=0.98,
                                       eps=1e-4, weight_decay=0.01, grad_clip=1.0)
    state = train_step.init_state(vstate, dstate, g_tx=g_tx, d_tx=d_tx)
    step = jax.jit(train_step.make_train_step(
        objective=Objective(perceptual_weight=0.0, regularizer="none"),
        graphdefs=train_step.GraphDefs(vdef, ddef, None, None), g_tx=g_tx, d_tx=d_tx,
        g_schedule=g_sched, ema_decay=0.5,
        remat_policy=sharding.remat_policy("full")), compiler_options=FAST_COMPILE)
    frozen, key = {"image_vae": None, "lpips": None}, jax.random.key(0)
    x = jax.random.uniform(jax.random.key(1), (2, 1, 16, 16, 3), minval=-1, maxval=1)
    before = jax.tree.map(np.asarray, state)

    bad = x.at[0, 0, 3, 3, 0].set(jnp.nan)
    state, metrics = step(state, frozen, bad, key)
    assert float(metrics["skipped"]) == 1.0 and int(state.nonfinite_run) == 1
    assert int(state.step) == 1  # the step advances: the next batch gets fresh randomness
    for a, b in zip(jax.tree.leaves((before.gen, before.disc, before.g_opt, before.d_opt,
                                     before.ema)),
                    jax.tree.leaves((state.gen, state.disc, state.g_opt, state.d_opt, state.ema))):
        np.testing.assert_array_equal(a, b)
    state, metrics = step(state, frozen, bad, key)
    assert int(state.nonfinite_run) == 2

    # the first real update is the schedule's step 0 (skipped steps do not advance it):
    # lr 0 at the start of the warmup, so nothing moves yet
    state, metrics = step(state, frozen, x, key)
    assert float(metrics["skipped"]) == 0.0 and int(state.nonfinite_run) == 0
    assert float(metrics["lr/generator"]) == 0.0
    state, metrics = step(state, frozen, x, key)
    assert float(metrics["lr/generator"]) == np.float32(1e-3)  # halfway up to lr * lr_g_factor
    kernel = lambda s: np.asarray(s["decoder"]["conv_out"]["kernel"][...])  # noqa: E731
    moved = kernel(state.gen["vae"]) - kernel(before.gen["vae"])
    assert np.abs(moved).max() > 0
    # EMA with decay 0.5: the lr-0 update left it at the start, this one moves it halfway
    np.testing.assert_allclose(kernel(state.ema), kernel(before.gen["vae"]) + 0.5 * moved,
                               rtol=1e-5, atol=1e-7)
