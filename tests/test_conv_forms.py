"""The fast convolution forms give what the literal convolution gives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax import lax

from conftest import FIXTURES, all_eqns, convolutions_and_dots

from cvvae_jax import CVVAE, conv_core, conv_forms, layers, upsample
from cvvae_jax.pretrained import jitted_part
from cvvae_jax.conv_kits import ImageKit, SD3Kit, V1Kit


def literal(conv: layers.Conv, x: jax.Array) -> jax.Array:
    """The convolution as written: numpy-style padding, then one VALID conv_general_dilated."""
    n = len(conv.kernel_size)
    lead = ((0, 0),) * (x.ndim - n - 1)
    for mode, np_mode in (("zeros", "constant"), ("edge", "edge")):
        x = jnp.pad(x, lead + tuple((lo, hi) if m == mode else (0, 0) for lo, hi, m in conv.pads)
                    + ((0, 0),), mode=np_mode)
    batch = x.shape[: x.ndim - n - 1]
    spatial = "DHW"[-n:]
    strides = (1,) * n if conv_core.unit_strides(conv) else tuple(conv.strides)
    y = lax.conv_general_dilated(
        x.reshape(-1, *x.shape[-n - 1:]), conv.kernel[...], strides, "VALID",
        dimension_numbers=(f"N{spatial}C", f"{spatial}IO", f"N{spatial}C"),
        precision=lax.Precision.HIGHEST)
    return (y + conv.bias[...]).reshape(*batch, *y.shape[1:])


def nearest2x(x):
    return jnp.repeat(jnp.repeat(x, 2, axis=-3), 2, axis=-2)


def unfold_time(x, n):
    """torch `rearrange(x, "b (n c) t h w -> b c (t n) h w")` in channels-last."""
    b, t, h, w, nc = x.shape
    return x.reshape(b, t, h, w, n, nc // n).transpose(0, 1, 4, 2, 3, 5).reshape(b, t * n, h, w, nc // n)


def randomise_bias(conv):
    conv.bias[...] = jax.random.normal(jax.random.key(7), conv.bias.shape)
    return conv


def assert_same_gradients(form, conv, x, reference=literal):
    """`form(conv, x)` and `reference(conv, x)` have the same gradients for the input and the
    parameters (of a random linear function of the output)."""
    graph, state = nnx.split(conv)
    w = jax.random.normal(jax.random.key(2), jax.eval_shape(lambda: reference(conv, x)).shape)

    def grads(f):
        return jax.jit(jax.grad(lambda s, x: (f(nnx.merge(graph, s), x) * w).sum(), argnums=(0, 1)))(state, x)

    for got, want in zip(jax.tree.leaves(grads(form)), jax.tree.leaves(grads(reference))):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


KITS = {
    "v1 time-doubling (edge time, zero space)": lambda r: V1Kit(jnp.float32, jnp.float32).up(5, True, r),
    "v1 space only": lambda r: V1Kit(jnp.float32, jnp.float32).up(5, False, r),
    "sd3 (edge everywhere, causal)": lambda r: SD3Kit(jnp.float32, jnp.float32).up(5, True, r),
    "image vae (2D)": lambda r: ImageKit(jnp.float32, jnp.float32).up(5, False, r),
}


@pytest.mark.parametrize("kit", KITS)
def test_nearest2x_conv_equals_conv_of_the_upsampled_input(kit):
    conv = randomise_bias(KITS[kit](nnx.Rngs(0)))
    shape = (2, 7, 6, 5) if len(conv.kernel_size) == 2 else (2, 3, 7, 6, 5)
    x = jax.random.normal(jax.random.key(1), shape)
    want = literal(conv, nearest2x(x))
    got = upsample.nearest2x_conv(conv, x)
    assert got.shape == want.shape == shape[:-3] + (14, 12, conv.out_features)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Its kernel gradient comes from a zero-padded copy of x (`phase_conv.kernel_grad`).
    assert_same_gradients(upsample.nearest2x_conv, conv, x, lambda c, x: literal(c, nearest2x(x)))


@pytest.mark.parametrize("kit", [k for k in KITS if "time-doubling" in k or "causal" in k])
def test_nearest2x_conv_unfolds_time_and_drops_the_first_frame(kit):
    conv = randomise_bias(KITS[kit](nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (2, 3, 7, 6, 5))
    want = unfold_time(literal(conv, nearest2x(x)), 2)[:, 1:]
    got = upsample.nearest2x_conv(conv, x, up_time=2)
    assert got.shape == want.shape == (2, 5, 14, 12, conv.out_features // 2)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kit", KITS)
@pytest.mark.parametrize("up_time", [1, 2])
def test_frame_by_frame_upsampler_equals_the_whole_clip_one(kit, up_time):
    """The form bf16 convs on CPUs with bf16 dot products take (`upsample._frame_by_frame`), here with f32 XLA
    convs per frame: the same numbers and gradients as the whole-clip form."""
    conv = randomise_bias(KITS[kit](nnx.Rngs(0)))
    if up_time == 2 and not ("time-doubling" in kit or "causal" in kit):
        pytest.skip("this upsampler does not unfold time")
    x = jax.random.normal(jax.random.key(1), (2, 7, 6, 5) if len(conv.kernel_size) == 2 else (2, 3, 7, 6, 5))
    numerics = conv_core.Numerics(jnp.float32, lax.Precision.HIGHEST)
    args = (upsample.phase_kernel(conv.kernel[...]), conv.bias[...])
    rest = (tuple(conv.pads), up_time, numerics)

    def frames(x, k, b):
        return upsample._frame_by_frame(x, k, b, *rest)

    def whole(x, k, b):
        return upsample._whole_clip(x, k, b, *rest)

    np.testing.assert_allclose(frames(x, *args), whole(x, *args), rtol=1e-5, atol=1e-5)
    w = jax.random.normal(jax.random.key(2), jax.eval_shape(whole, x, *args).shape)
    grads = [jax.jit(jax.grad(lambda *a, f=f: (f(*a) * w).sum(), argnums=(0, 1, 2)))(x, *args)
             for f in (frames, whole)]
    for got, want in zip(*grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_nearest2x_conv_refuses_other_convs():
    rngs = nnx.Rngs(0)
    for conv in (layers.conv2d(4, 4, 1, dtype=jnp.float32, param_dtype=jnp.float32, rngs=rngs),
                 layers.conv2d(4, 4, 3, strides=(2, 2), dtype=jnp.float32, param_dtype=jnp.float32,
                               rngs=rngs)):
        with pytest.raises(ValueError, match="stride-1 3x3 conv padded by one"):
            layers.Upsample(conv, 1)


@pytest.mark.parametrize("cin,cout,kernel,pads", [
    (3, 16, (3, 3, 3), layers.causal_pads(1, layers.ZEROS)),   # RGB in, v1 encoder conv_in
    (16, 3, (3, 3, 3), layers.causal_pads(1, layers.EDGE)),    # RGB out, SD3 conv_out
    (3, 16, (3, 3), layers.same_pads(2, 1, layers.ZEROS)),     # 2D, image VAE / LPIPS
    (8, 8, (1, 1, 1), layers.same_pads(3, 0, layers.ZEROS)),   # 1x1x1 moments
])
def test_few_channel_convs_run_as_matmuls_with_the_same_numbers_and_gradients(cin, cout, kernel, pads):
    conv = randomise_bias(layers.Conv(cin, cout, kernel, pads, rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (2, 5, 9, 7, cin)[-len(kernel) - 2:])
    np.testing.assert_allclose(conv(x), literal(conv, x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(conv_forms.matmul_conv(conv, x), literal(conv, x), rtol=1e-5, atol=1e-5)
    assert_same_gradients(conv_forms.matmul_conv, conv, x)  # few outputs: its custom VJP


@pytest.mark.parametrize("pads", [layers.causal_pads(1, layers.ZEROS), layers.same_pads(3, 1, layers.EDGE),
                                  layers.same_pads(3, 1, layers.ZEROS)], ids=["causal", "edge", "zeros"])
def test_time_loop_conv_equals_the_3d_conv(pads):
    conv = randomise_bias(layers.Conv(12, 16, (3, 3, 3), pads, rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (2, 5, 9, 7, 12))
    np.testing.assert_allclose(conv_forms.time_loop_conv(conv, x), literal(conv, x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(conv(x), literal(conv, x), rtol=1e-5, atol=1e-5)
    assert_same_gradients(conv_forms.time_loop_conv, conv, x)  # its custom VJP


STRIDED = {
    "v1 time and space": lambda r: V1Kit(jnp.float32, jnp.float32).down(6, True, r),
    "v1 space only": lambda r: V1Kit(jnp.float32, jnp.float32).down(6, False, r),
    "sd3 (edge, causal)": lambda r: SD3Kit(jnp.float32, jnp.float32).down(6, True, r),
    "image vae (2D)": lambda r: ImageKit(jnp.float32, jnp.float32).down(6, False, r),
    "discriminator conv_in (RGB)": lambda r: layers.Conv(
        3, 8, (3, 3, 3), layers.same_pads(3, 1, layers.ZEROS), strides=(2, 2, 2), rngs=r),
    # Fewer taps than the stride: some phases are read by no tap (zero input gradient).
    "1x1 taps, stride 2": lambda r: layers.Conv(
        6, 8, (1, 1), layers.same_pads(2, 0, layers.ZEROS), strides=(2, 2), rngs=r),
}


@pytest.mark.parametrize("kit", STRIDED)
def test_strided_conv_and_its_gradients_equal_the_strided_conv(kit):
    conv = randomise_bias(STRIDED[kit](nnx.Rngs(0)))
    # Odd and even sizes: the stride phases differ in length.
    x = jax.random.normal(jax.random.key(1), (2, 5, 9, 8, conv.in_features)[-len(conv.kernel_size) - 2:])
    np.testing.assert_allclose(conv_forms.strided_conv(conv, x), literal(conv, x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(conv(x), literal(conv, x), rtol=1e-5, atol=1e-5)
    assert_same_gradients(conv_forms.strided_conv, conv, x)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU form")
@pytest.mark.parametrize("kit", ["v1 time and space", "v1 space only", "sd3 (edge, causal)",
                                 "discriminator conv_in (RGB)"])
def test_strided_3d_convs_run_as_2d_convs_frame_by_frame_on_cpu(kit):
    conv = STRIDED[kit](nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 5, 9, 8, conv.in_features))
    ops = convolutions_and_dots(jax.make_jaxpr(conv)(x).jaxpr)
    # (N, H, W, C) operands: one 2D conv per time tap, for the first output frame and in the
    # loop over the others.
    assert [(op[0], op[4]) for op in ops] == [("conv_general_dilated", 4)] * 3 * 2


def output_shapes(jaxpr) -> list[tuple[int, ...]]:
    """The shape of every value an op makes, nested jaxprs included."""
    return [v.aval.shape for eqn in all_eqns(jaxpr) for v in eqn.outvars if hasattr(v.aval, "shape")]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU form")
@pytest.mark.parametrize("kit", ["v1 time and space", "sd3 (edge, causal)"])
def test_strided_3d_convs_read_their_time_edge_pads_from_the_input_on_cpu(kit):
    # The frames read the replicated first frames from x: no edge-padded copy of the clip,
    # forward or backward (values and gradients: the test above).
    conv = STRIDED[kit](nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 5, 9, 8, conv.in_features))
    (lo, hi, mode), = conv.pads[:1]
    assert mode == layers.EDGE and lo > 0
    padded_in_time = (2, 5 + lo + hi)
    forward = output_shapes(jax.make_jaxpr(conv)(x).jaxpr)
    assert not [s for s in forward if s[:2] == padded_in_time]
    # The backward does pad: its gradient rules are those of the padded clip's conv.
    backward = output_shapes(jax.make_jaxpr(jax.grad(lambda x: conv(x).sum()))(x).jaxpr)
    assert [s for s in backward if s[:2] == padded_in_time]


@pytest.mark.parametrize("pads", [layers.causal_pads(1, layers.ZEROS), layers.same_pads(3, 1, layers.EDGE)])
def test_time_fold_conv_equals_the_3d_conv(pads):
    conv = randomise_bias(layers.Conv(3, 16, (3, 3, 3), pads, rngs=nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (2, 5, 9, 7, 3))
    np.testing.assert_allclose(conv_forms.time_fold_conv(conv, x), literal(conv, x), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the fold is a CPU form")
def test_time_fold_is_chosen_for_3d_convs_from_few_channels_on_cpu():
    def conv(cin, cout, kernel, pads=None, strides=None):
        pads = pads or layers.same_pads(len(kernel), 1, layers.ZEROS)
        return layers.Conv(cin, cout, kernel, pads, strides=strides, rngs=nnx.Rngs(0))

    assert conv_forms.use_time_fold(conv(3, 128, (3, 3, 3)))  # the encoder's conv_in
    assert not conv_forms.use_time_fold(conv(3, 128, (3, 3)))  # 2D: matmul_conv
    assert not conv_forms.use_time_fold(conv(128, 3, (3, 3, 3)))  # few outputs: matmul_conv
    assert not conv_forms.use_time_fold(conv(3, 8, (3, 3, 3)))
    assert not conv_forms.use_time_fold(conv(16, 128, (3, 3, 3)))  # the time loop
    assert not conv_forms.use_time_fold(conv(3, 128, (1, 3, 3), layers.same_pads(3, 0, layers.ZEROS)))
    assert not conv_forms.use_time_fold(conv(3, 128, (3, 3, 3), strides=(1, 2, 2)))


def test_time_loop_is_chosen_for_3d_convs_on_cpu():
    def conv(kernel, pads, strides=None):
        return layers.Conv(16, 128, kernel, pads, strides=strides, rngs=nnx.Rngs(0))

    on_cpu = jax.default_backend() == "cpu"
    assert conv_forms.use_time_loop(conv((3, 3, 3), layers.causal_pads(1, layers.ZEROS))) == on_cpu
    assert not conv_forms.use_time_loop(conv((3, 3), layers.same_pads(2, 1, layers.ZEROS)))
    assert not conv_forms.use_time_loop(conv((1, 3, 3), layers.same_pads(3, 0, layers.ZEROS)))
    assert not conv_forms.use_time_loop(conv((3, 3, 3), layers.causal_pads(1, layers.ZEROS), (1, 2, 2)))


@pytest.mark.parametrize("pads", [
    ((2, 0, "edge"), (1, 1, "zeros"), (1, 1, "zeros")),  # v1 causal
    ((2, 1, "edge"), (1, 2, "edge"), (0, 1, "edge")),  # SD3 replicates on every axis
])
def test_pad_input_and_its_gradient_match_numpy_padding(pads):
    x = jax.random.normal(jax.random.key(0), (2, 4, 5, 6, 3))

    def numpy_style(x):
        for mode, np_mode in (("zeros", "constant"), ("edge", "edge")):
            x = jnp.pad(x, ((0, 0),) + tuple((lo, hi) if m == mode else (0, 0) for lo, hi, m in pads)
                        + ((0, 0),), mode=np_mode)
        return x

    want, want_vjp = jax.vjp(numpy_style, x)
    cot = jax.random.normal(jax.random.key(1), want.shape)
    got, got_vjp = jax.vjp(lambda x: conv_core.pad_input(x, pads), x)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(got_vjp(cot)[0], want_vjp(cot)[0], rtol=1e-6, atol=1e-6)


def test_time_loop_keeps_a_few_frames_alive():
    """The compiled loop's scratch is a few frames (one frame's tap inputs and outputs): no
    padded copy of the input (16 + 2 frames) and no whole-clip tap outputs (16 frames each)."""
    conv = layers.Conv(16, 16, (3, 3, 3), layers.causal_pads(1, layers.ZEROS), rngs=nnx.Rngs(0))
    graph, state = nnx.split(conv)
    x = jax.ShapeDtypeStruct((1, 16, 64, 64, 16), jnp.float32)
    loop = jax.jit(lambda s, x: conv_forms.time_loop_conv(nnx.merge(graph, s), x))
    frame = 64 * 64 * 16 * 4
    assert loop.lower(state, x).compile().memory_analysis().temp_size_in_bytes <= 8 * frame


def library_convolutions(hlo: str) -> list[str]:
    """The fused computations of compiled HLO text that hold a convolution and that a
    library fusion (`__ynn_fusion`, `__xnn_fusion`, ...) runs instead of XLA."""
    library = set()
    for line in hlo.splitlines():
        if '"kind":"__' in line and "calls=" in line:
            library.add(line.split("calls=")[1].split(",")[0].strip("%"))
    blocks = hlo.split("\n\n")
    return [b.split()[0].strip("%") for b in blocks
            if "convolution(" in b and b.split()[0].strip("%") in library]


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU options")
def test_the_package_jits_keep_convolutions_in_xla_on_cpu():
    x = jax.ShapeDtypeStruct((2, 16, 16, 32), jnp.float32)
    k = jax.ShapeDtypeStruct((3, 3, 32, 32), jnp.float32)

    def conv(x, k):
        return lax.conv_general_dilated(x, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))

    hlo = jax.jit(conv, compiler_options=conv_forms.compiler_options()).lower(x, k).compile().as_text()
    assert "convolution(" in hlo and library_convolutions(hlo) == []
    # The models' own jits (encode / decode pieces) pass the same options.
    vae = CVVAE.from_pretrained(FIXTURES / "cvvae_v1_tiny")
    graphdef, state = nnx.split(vae)
    clip = jax.ShapeDtypeStruct((1, 5, 16, 16, 3), jnp.float32)
    hlo = jitted_part(graphdef, "encode_moments").lower(state, clip).compile().as_text()
    assert "convolution(" in hlo and library_convolutions(hlo) == []


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU options")
def test_the_package_jits_leave_groupnorm_sums_to_the_library_on_cpu():
    # XLA:CPU's own reductions read a materialized input: GroupNorm's squared deviations
    # were written out in full, 2.7 GiB more at the peak of a 17x576x576 decode piece.
    norm = layers.GroupNorm(128, 32, 1e-6, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(norm)
    x = jax.ShapeDtypeStruct((1, 4, 64, 64, 128), jnp.float32)

    def entry(options):
        fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x), compiler_options=options)
        return fn.lower(state, x).compile().as_text().split("ENTRY")[1]

    def full_size(hlo):  # the fusions that write an array the size of x
        return [line for line in hlo.splitlines() if " = f32[1,4,64,64,128]" in line and " fusion(" in line]

    without = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
    assert len(full_size(entry(without))) == 2  # the squared deviations, then the output
    package = entry(conv_forms.compiler_options())
    assert '"kind":"__ynn_fusion"' in package
    assert len(full_size(package)) == 1  # the output alone
