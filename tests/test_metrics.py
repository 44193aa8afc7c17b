"""PSNR and SSIM against scikit-image and NumPy on real frames with real degradations,
and the evaluation's per-frame scorer."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image, ImageFilter
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from cvvae_jax import assets, media, metrics
from cvvae_jax.evaluation import Scorer

# float32 (dm_pix) vs float64 (scikit-image): measured differences are <= 2e-6 dB and
# <= 2e-6 in SSIM on these frames.
PSNR_TOL_DB = 1e-4
SSIM_TOL = 1e-5


def _blur(u: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(u).filter(ImageFilter.GaussianBlur(2)))


def _jpeg(u: np.ndarray) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(u).save(buf, "JPEG", quality=10)
    return np.asarray(Image.open(buf))


def _noise(u: np.ndarray) -> np.ndarray:
    rng = np.random.default_rng(0)
    return np.clip(u + rng.normal(0, 12, u.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def references() -> list[np.ndarray]:
    """Two frames of a bundled clip (144 x 256) and a bundled still (256 x 456), uint8."""
    frames, _ = media.read_video(assets.path("clip_a.mp4"), max_frames=2, stride=40)
    still = np.asarray(Image.open(assets.path("image_0.jpg")).convert("RGB"))
    return [frames[0], frames[1], still]


def _skimage(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """scikit-image's PSNR and Gaussian SSIM of two (H, W, 3) images in [0, 1]."""
    psnr = peak_signal_noise_ratio(a, b, data_range=1)
    ssim = structural_similarity(a, b, data_range=1, gaussian_weights=True, sigma=1.5,
                                 use_sample_covariance=False, channel_axis=-1)
    return psnr, ssim


@pytest.mark.parametrize("degrade", [_blur, _jpeg, _noise], ids=["blur", "jpeg", "noise"])
def test_psnr_and_ssim_match_scikit_image_on_real_frames(references, degrade):
    for ref in references:
        deg = degrade(ref)
        want_psnr, want_ssim = _skimage(ref / 255.0, deg / 255.0)
        a, b = media.to_float(ref), media.to_float(deg)
        assert abs(float(metrics.psnr(a, b)) - want_psnr) < PSNR_TOL_DB
        assert abs(float(metrics.ssim(a, b)) - want_ssim) < SSIM_TOL
        # A sanity floor: these degradations are visible but mild.
        assert 20 < want_psnr < 30 and 0.5 < want_ssim < 0.9


def test_psnr_is_the_numpy_formula_on_the_unit_range(references):
    ref = references[2]
    deg = _jpeg(ref)
    mse = np.mean((ref / 255.0 - deg / 255.0) ** 2)
    want = 10 * np.log10(1.0 / mse)
    got = float(metrics.psnr(media.to_float(ref), media.to_float(deg)))
    assert abs(got - want) < PSNR_TOL_DB


def test_pooled_psnr_pools_the_error_of_every_frame(references):
    ref = media.to_float(np.stack([references[0], references[1]]))
    deg = ref.copy()
    deg[1] += 0.1  # one frame off by 0.1, one exact: MSE 0.005 on the [-1, 1] range
    assert metrics.pooled_psnr(deg, ref) == pytest.approx(10 * np.log10(4 / 0.005), abs=1e-6)
    assert metrics.pooled_psnr(ref, ref) == np.inf


def test_leading_axes_give_one_score_per_image(references):
    clip = np.stack([references[0], references[1]])  # (T, H, W, 3)
    ref = media.to_float(np.stack([clip, clip[::-1]]))  # (B=2, T=2, H, W, 3)
    deg = media.to_float(np.stack([np.stack([_blur(f) for f in c]) for c in
                                   (clip, clip[::-1])]))
    psnr, ssim = metrics.psnr(ref, deg), metrics.ssim(ref, deg)
    assert psnr.shape == ssim.shape == (2, 2)
    for b in range(2):
        for t in range(2):
            want_psnr, want_ssim = _skimage((ref[b, t] + 1) / 2, (deg[b, t] + 1) / 2)
            assert abs(float(psnr[b, t]) - want_psnr) < PSNR_TOL_DB
            assert abs(float(ssim[b, t]) - want_ssim) < SSIM_TOL


def test_identical_images_and_out_of_range_values(references):
    x = media.to_float(references[0])
    assert float(metrics.psnr(x, x)) == np.inf
    assert abs(float(metrics.ssim(x, x)) - 1.0) < 1e-6
    # Model outputs beyond [-1, 1] are clipped, as they would be in a saved frame.
    assert float(metrics.psnr(x, np.clip(x * 3, -1, 1))) == float(metrics.psnr(x, x * 3))
    with pytest.raises(ValueError, match="one shape"):
        metrics.psnr(x, x[:-1])


class _MeanAbs(nnx.Module):
    """A stand-in for LPIPS with the same call: (..., H, W, 3) x2 -> (...)."""

    def __call__(self, a, b):
        return jnp.abs(a - b).mean(axis=(-3, -2, -1))


def test_scorer_scores_every_row_per_frame_against_the_mapped_frames():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 9, 16, 16, 3)).astype(np.float32)
    recon = np.clip(x + 0.1 * rng.normal(size=x.shape), -1, 1).astype(np.float32)
    view = np.clip(x[:, ::4] + 0.2 * rng.normal(size=(2, 3, 16, 16, 3)), -1, 1).astype(np.float32)
    baseline = np.clip(x + 0.3 * rng.normal(size=x.shape), -1, 1).astype(np.float32)
    out = Scorer(_MeanAbs(), mapping="slice", time_factor=4)(x, recon, view, baseline,
                                                             jax.random.key(0))
    assert set(out) == {"cvvae", "compat", "image_vae"}
    for row, got, target in (("cvvae", recon, x), ("compat", view, x[:, ::4]),
                             ("image_vae", baseline, x)):
        assert set(out[row]) == {"psnr", "ssim", "lpips"}
        unit_mse = np.mean(((target - got) / 2.0) ** 2, axis=(2, 3, 4))
        np.testing.assert_allclose(out[row]["psnr"], -10 * np.log10(unit_mse), atol=PSNR_TOL_DB)
        want_ssim = [[_skimage((a + 1) / 2, (b + 1) / 2)[1] for a, b in zip(*c)]
                     for c in zip(target, got)]
        np.testing.assert_allclose(out[row]["ssim"], want_ssim, atol=SSIM_TOL)
        np.testing.assert_allclose(out[row]["lpips"], np.abs(target - got).mean(axis=(2, 3, 4)),
                                   rtol=1e-5)
    # Noise 0.1 < 0.2 < 0.3: the rows rank as their noise says.
    assert (out["cvvae"]["psnr"].mean() > out["compat"]["psnr"].mean()
            > out["image_vae"]["psnr"].mean())
    no_lpips = Scorer(None, mapping="first", time_factor=4)(x, recon, view[:, :1], None,
                                                           jax.random.key(0))
    assert set(no_lpips) == {"cvvae", "compat"} and "lpips" not in no_lpips["cvvae"]
    assert no_lpips["compat"]["psnr"].shape == (2, 1)
