"""Building blocks against torch: GroupNorm with its fused activation, values and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cvvae_jax import conv_core, conv_forms, layers


@pytest.mark.parametrize("act", [None, jax.nn.silu], ids=["norm", "norm+silu"])
def test_group_norm_and_its_gradients_match_torch(act):
    torch = pytest.importorskip("torch")
    norm = layers.GroupNorm(16, 4, 1e-5, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    norm.scale[...] = jax.random.normal(jax.random.key(1), (16,))
    norm.bias[...] = jax.random.normal(jax.random.key(2), (16,))
    # A large mean: where a one-pass variance loses what torch keeps.
    x = np.asarray(jax.random.normal(jax.random.key(3), (2, 3, 5, 4, 16)) * 0.1 + 50.0)
    w = np.asarray(jax.random.normal(jax.random.key(4), x.shape))

    graph, state = nnx.split(norm)

    def loss(state, x):
        return (nnx.merge(graph, state)(x, act) * w).sum()

    got = norm(jnp.asarray(x), act)
    g_state, g_x = jax.grad(loss, argnums=(0, 1))(state, jnp.asarray(x))

    tx = torch.tensor(np.moveaxis(x, -1, 1), dtype=torch.float64, requires_grad=True)
    tnorm = torch.nn.GroupNorm(4, 16, eps=1e-5).double()
    with torch.no_grad():
        tnorm.weight.copy_(torch.tensor(np.asarray(norm.scale[...])))
        tnorm.bias.copy_(torch.tensor(np.asarray(norm.bias[...])))
    ty = tnorm(tx)
    ty = torch.nn.functional.silu(ty) if act is not None else ty
    (ty * torch.tensor(np.moveaxis(w, -1, 1))).sum().backward()

    want = np.moveaxis(ty.detach().numpy(), 1, -1)
    # x itself carries f32 rounding of ~4e-6 on a 0.1 spread (4e-5 relative); a one-pass
    # variance would be off by ~1e-2 here.
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=5e-4)
    np.testing.assert_allclose(g_x, np.moveaxis(tx.grad.numpy(), 1, -1), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(g_state["scale"][...], tnorm.weight.grad.numpy(), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(g_state["bias"][...], tnorm.bias.grad.numpy(), rtol=1e-4, atol=1e-3)


def test_group_norm_keeps_a_bf16_input_bf16():
    norm = layers.GroupNorm(16, 4, 1e-5, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(3), (1, 2, 6, 6, 16))
    got = norm(x.astype(jnp.bfloat16), jax.nn.silu)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), norm(x, jax.nn.silu), rtol=2 ** -7, atol=2 ** -7)


def _top_level_f32_copies(x):
    """Full-size f32 arrays that the compiled bf16 GroupNorm + SiLU of x writes out."""
    norm = layers.GroupNorm(16, 4, 1e-5, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    graph, state = nnx.split(norm)
    fn = jax.jit(lambda state, x: nnx.merge(graph, state)(x, jax.nn.silu),
                 compiler_options=conv_forms.compiler_options())
    hlo = fn.lower(state, x).compile().as_text()
    entry = hlo[hlo.index("\nENTRY"):]
    full = "f32[" + ",".join(map(str, x.shape)) + "]"
    return [line for line in entry.splitlines() if f"= {full}" in line]


def test_bf16_group_norm_on_cpu_reads_its_input_without_an_f32_copy(monkeypatch):
    # Its three passes read the bf16 input; one f32 copy of it shared between them cost
    # ~0.1 s per full-resolution GroupNorm in a 17x256x256 encode (`layers._apart`).
    if not conv_core.on_cpu():
        pytest.skip("the copy is XLA:CPU's")
    x = jax.random.normal(jax.random.key(3), (1, 3, 16, 16, 16)).astype(jnp.bfloat16)
    assert _top_level_f32_copies(x) == []
    monkeypatch.setattr(layers, "_apart", lambda x: (x, x, x))
    assert _top_level_f32_copies(x), "without _apart XLA shares one f32 copy (the case this test guards)"
