import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from cvvae_jax import conv_core, conv_forms, flops, layers


def test_a_conv_counts_two_flops_per_multiply_add_and_agrees_with_xla():
    conv = layers.Conv(16, 32, (3, 3, 3), layers.causal_pads(1, layers.ZEROS), rngs=nnx.Rngs(0))
    graph, state = nnx.split(conv)
    x = jax.ShapeDtypeStruct((2, 5, 12, 10, 16), jnp.float32)

    def literal(s, x):
        c = nnx.merge(graph, s)
        return super(layers.Conv, c).__call__(conv_core.pad_input(x, c.pads, (conv_core.EDGE,)))

    expected = 2 * (2 * 5 * 12 * 10 * 32) * 16 * 27
    assert flops.flops(literal, state, x) == expected

    # XLA counts only the taps that land inside the input, so compare on an unpadded conv.
    def valid(x, k):
        return lax.conv_general_dilated(x, k, (1, 1, 1), "VALID",
                                        dimension_numbers=("NDHWC", "DHWIO", "NDHWC"))

    k = jax.ShapeDtypeStruct((3, 3, 3, 16, 32), jnp.float32)
    xla = jax.jit(valid).lower(x, k).compile().cost_analysis()
    xla = xla[0] if isinstance(xla, (list, tuple)) else xla
    assert flops.flops(valid, x, k) == xla["flops"] == 2 * (2 * 3 * 10 * 8 * 32) * 16 * 27
    # The time loop runs the same multiply-adds, one frame per trip; its gradients two
    # convs' worth more (the input's and the kernel's), with no forward traced twice.
    def loop(s, x):
        return conv_forms.time_loop_conv(nnx.merge(graph, s), x)

    assert flops.flops(loop, state, x) == expected
    assert flops.flops(jax.grad(lambda s, x: loop(s, x).sum(), argnums=(0, 1)), state, x) == 3 * expected


def test_loops_count_every_trip_conds_their_costliest_branch_and_grads_the_backward():
    a = jax.ShapeDtypeStruct((8, 16), jnp.float32)
    b = jax.ShapeDtypeStruct((16, 4), jnp.float32)
    matmul = 2 * 8 * 16 * 4

    def loop(a, b):
        return lax.fori_loop(0, 7, lambda i, acc: acc + a @ b, jnp.zeros((8, 4)))

    def branches(a, b, p):
        return lax.cond(p, lambda: (a @ b) @ b.T @ b, lambda: a @ b)

    assert flops.flops(loop, a, b) == 7 * matmul
    assert flops.flops(jax.jit(loop), a, b) == 7 * matmul
    assert flops.flops(branches, a, b, True) == matmul + 2 * 8 * 4 * 16 + matmul
    # d/da and d/db of sum(a @ b): the forward matmul and two for the cotangents.
    assert flops.flops(jax.grad(lambda a, b: (a @ b).sum(), argnums=(0, 1)), a, b) == 3 * matmul


def test_peak_tflops_by_device_kind():
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert flops.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert flops.peak_tflops("NVIDIA A100-SXM4-40GB") == 312.0
    assert flops.peak_tflops("TPU v5 lite") == 197.0
    assert flops.peak_tflops("TPU v5") == 459.0
    # A TPU kind must match whole: v4 lite is not v4.
    assert flops.peak_tflops("TPU v4 lite") is None
    assert flops.peak_tflops("cpu") is None
