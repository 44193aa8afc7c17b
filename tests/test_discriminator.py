"""NLayerDiscriminator3D against the official PyTorch discriminator (tests/fixtures/disc3d_tiny)."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import FIXTURES, channels_last, rel_err
from flax import nnx

from cvvae_jax import weights
from cvvae_jax.discriminator import (
    NLayerDiscriminator3D,
    discriminator_state_dict,
    kwargs_from_official,
    load_discriminator_state,
    save_discriminator,
)
from cvvae_jax.pretrained import jitted_part

FIX = FIXTURES / "disc3d_tiny"
VARIANTS = json.loads((FIX / "config.json").read_text())
SHAPES = json.loads((FIX / "state_dict.json").read_text())
TOL = 1e-5  # max |diff| <= TOL * max |reference|


def fixture_state_dict(shapes: dict[str, list[int]], seed: int) -> dict[str, np.ndarray]:
    """The weights the official outputs were computed with, rebuilt here.

    A state dict with pooling blocks is >= 6M parameters (GroupNorm's 32 groups force
    8 * 32 channels), too big to ship; so it is a fixed function of PCG64's raw bits,
    which numpy keeps stable across versions (its distributions it does not promise).
    """
    bits = np.random.PCG64(seed)
    out = {}
    for key, shape in shapes.items():
        u = (bits.random_raw(math.prod(shape)) >> np.uint64(11)) * 2.0**-52 - 1.0  # U[-1, 1)
        u = u.reshape(shape)
        if len(shape) > 1:  # conv and linear weights, torch layout (O, I, ...)
            u = u * math.sqrt(3 / math.prod(shape[1:]))
        elif key.endswith(".weight"):  # GroupNorm scales
            u = 1 + 0.25 * u
        else:
            u = 0.25 * u
        out[key] = u.astype(np.float32)
    return out


def build(variant: str, dtype=jnp.float32) -> NLayerDiscriminator3D:
    """Shape-only: every test fills it from a state dict."""
    kwargs = kwargs_from_official(VARIANTS[variant]["kwargs"])
    return nnx.eval_shape(lambda: NLayerDiscriminator3D(**kwargs, dtype=dtype, rngs=nnx.Rngs(0)))


def loaded(variant: str, dtype=jnp.float32) -> NLayerDiscriminator3D:
    sd = fixture_state_dict(SHAPES[variant], VARIANTS[variant]["weights_seed"])
    return load_discriminator_state(build(variant, dtype), sd)


def run(model: NLayerDiscriminator3D, x) -> np.ndarray:
    graphdef, state = nnx.split(model)
    return np.asarray(jitted_part(graphdef, "__call__")(state, x))


@pytest.fixture(scope="module")
def io():
    return dict(np.load(FIX / "io.npz"))


@pytest.fixture(scope="module")
def models():
    return {v: loaded(v) for v in VARIANTS}


@pytest.mark.parametrize("case", ["video", "image"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_matches_official(variant, case, models, io):
    got = run(models[variant], channels_last(io[f"{case}_input"]))
    assert rel_err(got, channels_last(io[f"{variant}_{case}_logits"])) <= TOL


def test_state_dict_round_trip(tmp_path, models, io):
    model = models["default"]
    file = save_discriminator(model, tmp_path / weights.WEIGHTS_NAME)
    saved = weights.read_state_dict(file)
    assert {k: list(v.shape) for k, v in saved.items()} == SHAPES["default"]
    expected = fixture_state_dict(SHAPES["default"], VARIANTS["default"]["weights_seed"])
    assert all(np.array_equal(saved[k], expected[k]) for k in expected)

    fresh = load_discriminator_state(build("default"), tmp_path)
    x = channels_last(io["image_input"])
    np.testing.assert_array_equal(run(fresh, x), run(model, x))


def test_load_rejects_missing_unexpected_and_misshapen_keys(models):
    model = models["default"]
    good = discriminator_state_dict(model)
    missing = {k: v for k, v in good.items() if k != "main.5.conv2.weight"}
    with pytest.raises(weights.WeightsError, match=r"missing keys \(1\): main\.5\.conv2\.weight"):
        load_discriminator_state(model, missing)
    with pytest.raises(weights.WeightsError, match=r"unexpected keys \(1\): main\.4\.weight"):
        load_discriminator_state(model, {**good, "main.4.weight": good["main.3.weight"]})
    wrong = {**good, "main.2.conv1.weight": good["main.2.conv1.weight"][:, :, :1]}
    with pytest.raises(weights.WeightsError, match=r"main\.2\.conv1\.weight has shape \(64, 32, 1, 3, 3\)"):
        load_discriminator_state(model, wrong)


def test_default_width_shapes_and_size():
    """Numbers from the official class on the meta device: `NLayerDiscriminator3D(input_nc=3,
    ndf=64, n_layers=4, use_actnorm=False, half_3d=False, causal=False)`."""
    model = nnx.eval_shape(lambda: NLayerDiscriminator3D(rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    shapes = weights.expected_torch_shapes(state)
    assert sum(math.prod(s) for s in shapes.values()) == 29_015_041
    assert len(shapes) == 58
    assert shapes["main.11.conv2.weight"] == (512, 512, 3, 3, 3)
    assert shapes["main.14.weight"] == (1, 512, 3, 3, 3)

    def out_shape(t):
        x = jax.ShapeDtypeStruct((2, t, 256, 256, 3), jnp.float32)
        return jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, x).shape

    assert out_shape(17) == (2, 3, 32, 32, 1)
    assert out_shape(1) == (2, 1, 32, 32, 1)


def test_init_follows_official_weights_init():
    """`weights_init`: conv kernels N(0, 0.02); conv and linear biases and the unused
    temb_proj keep torch's default U(+-1/sqrt(fan_in)); GroupNorm is 1 and 0."""
    # A small width: init statistics do not depend on it, and 29M draws are slow on CPU.
    model = NLayerDiscriminator3D(ndf=32, n_layers=1, rngs=nnx.Rngs(jax.random.key(0, impl="rbg")))
    sd = discriminator_state_dict(model)
    for key, a in sd.items():
        w = sd[key.rsplit(".", 1)[0] + ".weight"]
        if w.ndim == 1:
            assert np.array_equal(a, np.ones_like(a) if key.endswith(".weight") else np.zeros_like(a)), key
        elif w.ndim > 2 and key.endswith(".weight"):
            assert abs(a.std() / 0.02 - 1) < 0.1 and abs(a.mean()) < 0.002, key
        else:
            bound = math.prod(w.shape[1:]) ** -0.5
            assert np.abs(a).max() <= bound and (a.size < 32 or a.std() > 0.4 * bound), key


def test_bf16_compute_with_fp32_params(models, io):
    model = loaded("default", dtype=jnp.bfloat16)
    assert {v.dtype for _, v in weights.params_of(nnx.state(model))} == {jnp.dtype(jnp.float32)}
    x = channels_last(io["video_input"])
    got = run(model, x)
    assert got.dtype == jnp.bfloat16 and np.isfinite(got.astype(np.float32)).all()
    assert rel_err(got, run(models["default"], x)) < 3e-2


def test_official_params_mapping_and_input_checks(models):
    assert kwargs_from_official({"ndf": 32}) == {
        "in_channels": 3, "ndf": 32, "n_layers": 4, "half_3d": True, "causal": False}
    with pytest.raises(NotImplementedError, match="use_actnorm"):
        kwargs_from_official({"use_actnorm": True})
    with pytest.raises(ValueError, match="unknown NLayerDiscriminator3D params"):
        kwargs_from_official({"ndf": 64, "norm": "batch"})
    with pytest.raises(ValueError, match="multiple of 32"):
        NLayerDiscriminator3D(ndf=48, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="channels-first"):
        models["default"](np.zeros((1, 3, 1, 32, 32), np.float32))
