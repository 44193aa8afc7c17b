"""Numbers against the official PyTorch code: fixtures, and diffusers at full size."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.extend import core

import cvvae_jax
from conftest import FIXTURES, channels_last, rel_err
from cvvae_jax import conv_core
from cvvae_jax.posterior import DiagonalGaussian

TOL = 1e-4  # max |diff| <= TOL * max |reference|

CASES = [
    ("cvvae_v1_tiny", "video"),
    ("cvvae_v1_tiny", "image"),
    ("cvvae_v1_tiny_tiled", "video"),
    ("cvvae_sd3_tiny", "video"),
    # Non-default config options, also made with the official code.
    ("cvvae_v1_options", "video"),
    ("cvvae_v1_2d", "video"),
    ("cvvae_sd3_options", "video"),
]


@pytest.mark.parametrize("name,case", CASES)
def test_cvvae_matches_official(name, case, tiled_fixture_dir):
    d = tiled_fixture_dir if name.endswith("tiled") else FIXTURES / name
    io = np.load(FIXTURES / name / "io.npz")
    vae = cvvae_jax.CVVAE.from_pretrained(d)
    post = vae.encode(channels_last(io[f"{case}_input"]))
    assert rel_err(post.mean, channels_last(io[f"{case}_mean"])) < TOL
    assert rel_err(post.logvar, channels_last(io[f"{case}_logvar"])) < TOL
    decoded = vae.decode(channels_last(io[f"{case}_mean"]))
    assert rel_err(decoded, channels_last(io[f"{case}_decoded"])) < TOL


def equations(jaxpr):
    """Every equation of a jaxpr, those of the jaxprs inside it included."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, (core.Jaxpr, core.ClosedJaxpr)):
                    yield from equations(getattr(sub, "jaxpr", sub))


@pytest.mark.parametrize("name", ["cvvae_v1_tiny", "cvvae_sd3_tiny", "cvvae_v1_options"])
def test_accelerator_forms_match_official(name, monkeypatch):
    """GPUs and TPUs skip the CPU forms (time loops, strided-conv backward, split phase
    convs) for XLA's own 3D and strided convs; run here on the CPU, they give the same numbers."""
    monkeypatch.setattr(conv_core, "on_cpu", lambda: False)
    io = np.load(FIXTURES / name / "io.npz")
    graph, state = nnx.split(cvvae_jax.CVVAE.from_pretrained(FIXTURES / name))

    def run(method, x):
        traced = jax.jit(lambda s, x: getattr(nnx.merge(graph, s), method)(x)).trace(state, x)
        eqns = list(equations(traced.jaxpr.jaxpr))
        assert not any(e.primitive.name in ("scan", "while") for e in eqns), "a CPU time loop was traced"
        assert any(e.primitive.name == "conv_general_dilated" and e.invars[1].aval.ndim == 5
                   for e in eqns)
        return traced.lower().compile()(state, x)

    post = DiagonalGaussian.from_moments(run("encode_moments", channels_last(io["video_input"])))
    assert rel_err(post.mean, channels_last(io["video_mean"])) < TOL
    assert rel_err(post.logvar, channels_last(io["video_logvar"])) < TOL
    decoded = run("decode_latents", channels_last(io["video_mean"]))
    assert rel_err(decoded, channels_last(io["video_decoded"])) < TOL


def test_tiled_fixture_really_chunks_and_tiles(tiled_fixture_dir):
    """The tiled case is only a test of tiling if tiling changes the result."""
    io = np.load(FIXTURES / "cvvae_v1_tiny_tiled" / "io.npz")
    whole = cvvae_jax.CVVAE.from_pretrained(FIXTURES / "cvvae_v1_tiny")
    mean = whole.encode(channels_last(io["video_input"])).mean
    assert rel_err(mean, channels_last(io["video_mean"])) > 1e-2


def test_image_vae_matches_diffusers_fixture():
    d = FIXTURES / "sd_vae_tiny"
    io = np.load(d / "io.npz")
    vae = cvvae_jax.ImageVAE.from_pretrained(d)
    post = vae.encode(channels_last(io["image_input"]))
    assert rel_err(post.mean, channels_last(io["image_mean"])) < TOL
    assert rel_err(post.logvar, channels_last(io["image_logvar"])) < TOL
    decoded = vae.decode(channels_last(io["image_mean"]))
    assert rel_err(decoded, channels_last(io["image_decoded"])) < TOL


def test_full_size_sd21_vae_matches_diffusers(tmp_path):
    """A full-size SD 2.1 AutoencoderKL with random weights, saved by diffusers."""
    torch = pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        sample_size=768,
    ).eval()
    ref.save_pretrained(tmp_path)
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        decoded = ref.decode(dist.mean).sample

    vae = cvvae_jax.ImageVAE.from_pretrained(tmp_path)
    assert vae.num_params() == sum(p.numel() for p in ref.parameters())
    post = vae.encode(channels_last(x.numpy()))
    assert rel_err(post.mean, channels_last(dist.mean.numpy())) < TOL
    assert rel_err(post.logvar, channels_last(dist.logvar.numpy())) < TOL
    out = vae.decode(channels_last(dist.mean.numpy()))
    assert rel_err(out, channels_last(decoded.numpy())) < TOL


def test_bfloat16_compute_stays_close_to_the_official_float32(cpu_bf16_dots):
    import jax.numpy as jnp

    # XLA's own bf16 convolutions, on any CPU: the matmul forms that CPUs with bf16 dot
    # products take are held to the same bounds in test_shifted_matmul.py.
    cpu_bf16_dots(None)
    io = np.load(FIXTURES / "cvvae_v1_tiny" / "io.npz")
    vae = cvvae_jax.CVVAE.from_pretrained(FIXTURES / "cvvae_v1_tiny", dtype=jnp.bfloat16)
    post = vae.encode(channels_last(io["video_input"]))
    assert post.mean.dtype == jnp.float32  # posterior statistics stay float32
    err = rel_err(post.mean, channels_last(io["video_mean"]))
    assert 1e-4 < err < 5e-2  # really computed in bf16, and still close (measured 2.7e-2; 3.3e-2 on an AVX512_BF16 CPU)
    decoded = vae.decode(channels_last(io["video_mean"]))
    assert decoded.dtype == jnp.bfloat16
    assert rel_err(decoded.astype(jnp.float32), channels_last(io["video_decoded"])) < 5e-2


@pytest.mark.parametrize("param_dtype", ["float16", "bfloat16"])
def test_half_precision_storage_with_float32_compute_matches_the_float32_weights(param_dtype):
    # The fixtures' weights are float16: stored so, they keep their values exactly, and a
    # float32 decode must match the official one as well as float32 storage does.
    io = np.load(FIXTURES / "cvvae_v1_tiny" / "io.npz")
    vae = cvvae_jax.CVVAE.from_pretrained(FIXTURES / "cvvae_v1_tiny", param_dtype=param_dtype)
    decoded = vae.decode(channels_last(io["video_mean"]))
    want = channels_last(io["video_decoded"])
    if param_dtype == "float16":
        assert rel_err(decoded, want) < TOL  # 1.2e-3 with the upsamplers' kernels summed in fp16
    else:  # bfloat16 rounds the weights themselves (measured 1.6e-2 here, 3.2e-2 below)
        assert rel_err(decoded, want) < 5e-2
    image = cvvae_jax.ImageVAE.from_pretrained(FIXTURES / "sd_vae_tiny", param_dtype=param_dtype)
    io = np.load(FIXTURES / "sd_vae_tiny" / "io.npz")
    err = rel_err(image.decode(channels_last(io["image_mean"])), channels_last(io["image_decoded"]))
    assert err < (TOL if param_dtype == "float16" else 5e-2), err
