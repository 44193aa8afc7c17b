"""Per-block remat: the same numbers, a smaller backward pass, and the config names."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cvvae_jax import remat
from cvvae_jax.conv_kits import V1Kit, resnet
from cvvae_jax.layers import Downsample
from conftest import FAST_COMPILE


class Chain(nnx.Module):
    """Four causal 3D residual blocks and a strided downsampler, as in the v1 encoder."""

    def __init__(self, c: int, rngs):
        kit = V1Kit(jnp.float32, jnp.float32)
        self.blocks = nnx.List([resnet(kit, c, c, shortcut_name="nin_shortcut", groups=8, eps=1e-5,
                                       act=jax.nn.silu, rngs=rngs) for _ in range(4)])
        self.down = Downsample(kit.down(c, True, rngs))

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return self.down(x)


def loss_and_grads(model, x):
    graphdef, params = nnx.split(model)

    def loss(params, x):
        return jnp.mean(nnx.merge(graphdef, params)(x) ** 2)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)), compiler_options=FAST_COMPILE), (params, x)


@pytest.fixture(scope="module")
def chain_and_input():
    model = Chain(16, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (1, 9, 16, 16, 16))
    return model, x


def test_block_remat_gives_the_same_loss_and_gradients(chain_and_input):
    model, x = chain_and_input
    fn, args = loss_and_grads(model, x)
    want_loss, want_grads = fn(*args)
    assert remat.set_block_remat(model) == 5
    try:
        fn, args = loss_and_grads(model, x)
        loss, grads = fn(*args)
    finally:
        remat.set_block_remat(model, False)
    assert float(loss) == pytest.approx(float(want_loss), rel=1e-6)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7)
    assert np.abs(np.asarray(want_grads[1])).max() > 0


def test_block_remat_keeps_only_block_inputs(chain_and_input):
    """XLA's plan for the backward pass: without remat every block keeps its norms,
    activations and conv outputs; with it, its input, and one block's insides at a time."""
    model, x = chain_and_input

    def temp_bytes():
        fn, args = loss_and_grads(model, x)
        return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes

    plain = temp_bytes()
    remat.set_block_remat(model)
    try:
        rematted = temp_bytes()
    finally:
        remat.set_block_remat(model, False)
    clip = x.size * 4
    assert plain > 20 * clip  # six or so clip-sized activations per block
    assert rematted < 0.6 * plain


def test_resolve_names_the_choices():
    assert remat.resolve("blocks") == remat.Remat(True, None)
    assert remat.resolve("none") == remat.Remat(False, None)
    assert remat.resolve("full") == remat.Remat(False, jax.checkpoint_policies.nothing_saveable)
    with pytest.raises(ValueError, match="'blocks'"):
        remat.resolve("block")
