"""Convolutions as bf16 matmuls over shifted frame windows (`cvvae_jax.shifted_matmul`): same
numbers as the literal convolution, chosen only for bf16 on CPUs with bf16 dot products, same
gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from conftest import FIXTURES, channels_last, convolutions_and_dots, rel_err
from test_conv_forms import literal, nearest2x, output_shapes, randomise_bias

from cvvae_jax import CVVAE, conv_core, frame_loop, layers, shifted_matmul, upsample
from cvvae_jax.conv_kits import V1Kit


def reference(frames, kernel, padding, strides=(1, 1)):
    """sum_d conv2d(frames[d], kernel[d]) by XLA, in f32 at full precision."""
    lead = frames[0].shape[:-3]
    out = 0
    for f, k in zip(frames, kernel):
        y = lax.conv_general_dilated(f.reshape(-1, *f.shape[-3:]), k, strides, padding,
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     precision=lax.Precision.HIGHEST)
        out = out + y.reshape(*lead, *y.shape[1:])
    return out


@pytest.mark.parametrize("kernel,padding,strides", [
    ((3, 3, 3), ((1, 1), (1, 1)), None),  # 3D: time taps stacked on the contraction axis
    ((1, 3, 3), ((1, 1), (1, 1)), None),  # 2D: row taps stacked
    ((3, 2, 2), ((1, 1), (1, 1)), None),  # an upsampler's phase conv: the output grows by one
    ((1, 3, 3), ((0, 1), (2, 0)), None),  # uneven padding
    ((1, 1, 1), ((0, 0), (0, 0)), None),  # 1x1: one matmul, no stack
    ((2, 1, 3), ((0, 0), (1, 1)), None),
    ((3, 3, 3), ((0, 1), (0, 1)), (2, 2)),  # a downsampler: four stride phases, 2 / 1 row taps each
    ((1, 3, 3), ((1, 1), (1, 1)), (2, 2)),  # odd padded sizes
    ((3, 2, 2), ((0, 0), (1, 1)), (2, 2)),  # one tap per phase
    ((2, 1, 1), ((0, 0), (0, 0)), (2, 2)),  # phases no tap reads
])
@pytest.mark.parametrize("band_rows", [None, 7, 1], ids=["one band", "bands of 7 rows", "rows"])
def test_frame_conv_equals_the_sum_of_2d_convs(kernel, padding, strides, band_rows):
    kt, kh, kw = kernel
    keys = jax.random.split(jax.random.key(0), kt + 1)
    frames = [jax.random.normal(keys[d], (2, 1, 7, 6, 5)) for d in range(kt)]  # leading axes kept
    k = jax.random.normal(keys[-1], (*kernel, 5, 9))
    got = shifted_matmul.frame_conv(frames, k, padding, jnp.float32, lax.Precision.HIGHEST, strides, band_rows)
    want = reference(frames, k, padding, strides or (1, 1))
    assert got.shape == want.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("strides,takes", [(None, True), ((1, 1), True), ((2, 2), True), ([2, 2], True),
                                            ((3, 3), False), ((1, 2), False), ((2, 1), False)])
def test_frame_conv_takes_strides_1_or_2_in_both_axes(strides, takes):
    assert shifted_matmul.takes_strides(strides) is takes
    if not takes:
        frames = [jnp.zeros((1, 8, 8, 4))]
        with pytest.raises(ValueError, match="1 or 2 in H and W"):
            shifted_matmul.frame_conv(frames, jnp.zeros((1, 3, 3, 4, 4)), ((1, 1), (1, 1)), jnp.float32,
                                      strides=strides)


@pytest.mark.parametrize("band_rows", [None, 20], ids=["one band", "bands of 20 rows"])
def test_frame_conv_sums_bf16_products_in_f32(band_rows):
    frames = [jax.random.normal(jax.random.key(d), (1, 12, 12, 64)) for d in range(3)]
    k = jax.random.normal(jax.random.key(9), (3, 3, 3, 64, 32)) / 24
    args = ([f.astype(jnp.bfloat16) for f in frames], k.astype(jnp.bfloat16), ((1, 1), (1, 1)), jnp.bfloat16)
    got = shifted_matmul.frame_conv(*args, band_rows=band_rows)
    rounded = [f.astype(jnp.bfloat16).astype(jnp.float32) for f in frames]
    want = reference(rounded, k.astype(jnp.bfloat16).astype(jnp.float32), ((1, 1), (1, 1)))
    assert got.dtype == jnp.float32
    # bf16 x bf16 products are exact in f32: only the order of the f32 sums differs.
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Rounded once, band by band: the f32 sum to the nearest bf16 (or its neighbour, when the
    # sums' order moved it across a midpoint).
    got = shifted_matmul.frame_conv(*args, band_rows=band_rows, out_dtype=jnp.bfloat16)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(got.astype(jnp.float32), want.astype(jnp.bfloat16).astype(jnp.float32),
                               rtol=2 ** -8, atol=1e-6)


@pytest.mark.parametrize("kernel,pads,strides", [
    ((3, 3), layers.same_pads(2, 1, layers.ZEROS), None),
    ((1, 1, 1), layers.same_pads(3, 0, layers.ZEROS), None),
    ((3, 3, 3), layers.causal_pads(1, layers.ZEROS), None),
    ((3, 3, 3), ((2, 0, layers.EDGE), (0, 1, layers.ZEROS), (0, 1, layers.ZEROS)), (2, 2, 2)),
])
def test_conv_frames_equals_the_literal_conv(kernel, pads, strides):
    conv = layers.Conv(6, 10, kernel, pads, strides=strides, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 5, 9, 7, 6))
    got = frame_loop.conv_frames(x, conv.kernel[...], pads, conv_core.Numerics(jnp.float32, lax.Precision.HIGHEST),
                                 strides)
    np.testing.assert_allclose(got + conv.bias[...], literal(conv, x), rtol=1e-5, atol=1e-5)


def test_bf16_dot_flag_reads_the_cpu_flags(monkeypatch, tmp_path):
    cases = (("fpu avx512_bf16 amx_bf16 amx_tile", "amx_bf16"), ("fpu avx512f avx512_bf16", "avx512_bf16"),
             ("fpu avx2 avx512f avx512_vnni", None))
    for i, (flags, want) in enumerate(cases):
        info = tmp_path / f"cpuinfo_{i}"
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\n")
        monkeypatch.setattr(shifted_matmul, "CPUINFO", str(info))
        shifted_matmul.bf16_dot_flag.cache_clear()
        assert shifted_matmul.bf16_dot_flag() == want
    monkeypatch.setattr(shifted_matmul, "CPUINFO", str(tmp_path / "missing"))
    shifted_matmul.bf16_dot_flag.cache_clear()
    assert shifted_matmul.bf16_dot_flag() is None
    shifted_matmul.bf16_dot_flag.cache_clear()


@pytest.fixture
def bf16_dots(cpu_bf16_dots):
    """This CPU taken for one with AMX, whatever it has: the forms are plain XLA dots and run
    anywhere, only their speed needs bf16 dot products."""
    cpu_bf16_dots("amx_bf16")


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU form")
def test_chosen_for_bf16_on_cpus_with_bf16_dot_products_only(monkeypatch):
    monkeypatch.setattr(shifted_matmul, "bf16_dot_flag", lambda: "avx512_bf16")
    assert conv_core.use_shifted_matmul(jnp.bfloat16)
    assert not conv_core.use_shifted_matmul(jnp.float32)
    monkeypatch.setattr(conv_core, "on_cpu", lambda: False)
    assert not conv_core.use_shifted_matmul(jnp.bfloat16)
    monkeypatch.setattr(conv_core, "on_cpu", lambda: True)
    monkeypatch.setattr(shifted_matmul, "bf16_dot_flag", lambda: None)
    assert not conv_core.use_shifted_matmul(jnp.bfloat16)


BF16 = dict(dtype=jnp.bfloat16, param_dtype=jnp.float32)
CONVS = {
    "3x3x3 causal (time loop)": lambda r: layers.Conv(16, 24, (3, 3, 3), layers.causal_pads(1, layers.ZEROS),
                                                     rngs=r, **BF16),
    "3x3x3 downsampler, stride 2": lambda r: V1Kit(jnp.bfloat16, jnp.float32).down(16, True, r),
    "3x3 2D": lambda r: layers.conv2d(16, 24, 3, rngs=r, **BF16),
    "3x3 2D, edge pads": lambda r: layers.conv2d(16, 24, 3, rngs=r, pad_mode=layers.EDGE, **BF16),
    "1x1x1 shortcut": lambda r: layers.Conv(16, 24, (1, 1, 1), layers.same_pads(3, 0, layers.ZEROS),
                                            rngs=r, **BF16),
}


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU form")
@pytest.mark.parametrize("name", CONVS)
def test_bf16_convs_run_as_f32_accumulated_bf16_matmuls_with_unchanged_gradients(name, monkeypatch):
    conv = randomise_bias(CONVS[name](nnx.Rngs(0)))
    graph, state = nnx.split(conv)
    x = jax.random.normal(jax.random.key(1), (1, 5, 9, 7, 16)).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(2), jax.eval_shape(lambda: conv(x)).shape)

    def run(state, x):
        return nnx.merge(graph, state)(x)

    def grads(state, x):
        return jax.grad(lambda s, x: (run(s, x).astype(jnp.float32) * w).sum(), argnums=(0, 1))(state, x)

    monkeypatch.setattr(shifted_matmul, "bf16_dot_flag", lambda: None)
    plain_y, plain_g = run(state, x), grads(state, x)
    monkeypatch.setattr(shifted_matmul, "bf16_dot_flag", lambda: "amx_bf16")
    ops = convolutions_and_dots(jax.make_jaxpr(run)(state, x).jaxpr)
    assert ops and {op[:3] for op in ops} == {("dot_general", "bfloat16", "float32")}
    y = run(state, x)
    f32 = nnx.merge(*nnx.split(CONVS[name](nnx.Rngs(0))))
    f32.kernel[...], f32.bias[...] = conv.kernel[...], conv.bias[...]
    f32.dtype = jnp.float32
    want = literal(f32, x.astype(jnp.float32))
    assert y.dtype == jnp.bfloat16
    # One bf16 rounding of an f32 sum, against XLA's bf16 conv: no less accurate.
    err = float(jnp.abs(y.astype(jnp.float32) - want).max())
    assert err <= max(float(jnp.abs(plain_y.astype(jnp.float32) - want).max()), 2 ** -8 * float(jnp.abs(want).max()))
    # The backward pass is conv_forms' own, whichever form ran forward.
    for got, ref in zip(jax.tree.leaves(grads(state, x)), jax.tree.leaves(plain_g)):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref, np.float32), rtol=1e-2, atol=1e-2)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU form")
def test_bf16_2d_convs_read_their_edge_pads_frame_by_frame(bf16_dots):
    # No edge-padded copy of the clip: each frame is padded as the loop reads it
    # (`phase_conv._frames_read_pads`); values and gradients: the test above.
    conv = CONVS["3x3 2D, edge pads"](nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 5, 9, 7, 16)).astype(jnp.bfloat16)
    forward = output_shapes(jax.make_jaxpr(conv)(x).jaxpr)
    assert (2, 5, 11, 9, 16) not in forward and (1, 11, 9, 16) in forward


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU form")
@pytest.mark.parametrize("time", [False, True], ids=["space", "time and space"])
def test_bf16_upsamplers_run_as_matmuls(time, bf16_dots):
    conv = randomise_bias(V1Kit(jnp.bfloat16, jnp.float32).up(8, time, nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (1, 3, 6, 5, 8)).astype(jnp.bfloat16)
    ops = convolutions_and_dots(jax.make_jaxpr(lambda x: upsample.nearest2x_conv(conv, x))(x).jaxpr)
    assert {op[:3] for op in ops} == {("dot_general", "bfloat16", "float32")}
    got = upsample.nearest2x_conv(conv, x).astype(jnp.float32)
    conv.dtype = jnp.float32
    want = literal(conv, nearest2x(x.astype(jnp.float32)))
    np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=2 ** -7 * float(jnp.abs(want).max()))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU form")
@pytest.mark.parametrize("model", ["cvvae_v1_tiny", "cvvae_sd3_tiny"])
def test_bf16_model_with_the_matmul_forms_stays_close_to_the_official_float32(model, bf16_dots):
    vae = CVVAE.from_pretrained(FIXTURES / model, dtype=jnp.bfloat16)
    io = np.load(FIXTURES / model / "io.npz")
    z = jnp.asarray(channels_last(io["video_mean"]))
    ops = convolutions_and_dots(jax.make_jaxpr(vae.decode_latents)(z).jaxpr)
    # XLA's convolution is left only to a latent-sized conv_in (v1: its time taps folded on 12 channels).
    assert all(op[3] <= 3 * conv_core.FEW_CHANNELS for op in ops if op[0] == "conv_general_dilated")
    assert sum(op[:3] == ("dot_general", "bfloat16", "float32") for op in ops) > 20
    post = vae.encode(channels_last(io["video_input"]))
    # As test_parity's bf16 bound for XLA's own bf16 convolutions (2.7e-2 measured there).
    assert rel_err(post.mean, channels_last(io["video_mean"])) < 5e-2
    assert rel_err(vae.decode(z).astype(jnp.float32), channels_last(io["video_decoded"])) < 5e-2
