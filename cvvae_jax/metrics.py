"""Reconstruction metrics on [-1, 1] frames: PSNR and SSIM per image, LPIPS per frame.

PSNR and SSIM are computed on the [0, 1] range, the convention of the CV-VAE paper's
Table 1 and of scikit-image with `data_range=1`. SSIM is the Gaussian-window form of
Wang et al. (11 x 11 window, sigma 1.5, K1 0.01, K2 0.03, the population covariance),
averaged over pixels and channels; scikit-image gives the same number with
`gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=1`.
"""

from __future__ import annotations

import dm_pix
import jax
import jax.numpy as jnp
import numpy as np

# Both dm_pix functions accept (H, W, C) or (N, H, W, C) only.
_IMAGE_RANK = 3


def to_unit(x: jax.Array) -> jax.Array:
    """[-1, 1] -> [0, 1], clipped like a saved 8-bit frame would be, in float32."""
    return jnp.clip((x.astype(jnp.float32) + 1.0) / 2.0, 0.0, 1.0)


def _per_image(fn, a: jax.Array, b: jax.Array) -> jax.Array:
    if a.shape != b.shape or a.ndim < _IMAGE_RANK:
        raise ValueError(f"need two (..., H, W, C) arrays of one shape; got {a.shape} and "
                         f"{b.shape}")
    lead, image = a.shape[:-_IMAGE_RANK], a.shape[-_IMAGE_RANK:]
    scores = fn(to_unit(a).reshape(-1, *image), to_unit(b).reshape(-1, *image))
    return scores.reshape(lead)


def psnr(a: jax.Array, b: jax.Array) -> jax.Array:
    """(..., H, W, C) in [-1, 1] -> (...) PSNR in dB of each image, on the [0, 1] range.

    Identical images give +inf.
    """
    return _per_image(dm_pix.psnr, a, b)


def pooled_psnr(a, b) -> float:
    """One PSNR in dB for two whole [-1, 1] arrays: the MSE pooled over every value, in
    float64, without clipping; the trainer's quick eval figure.

    It is not the mean of `psnr` over images: a few bad frames cost it more.
    """
    mse = float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * np.log10(4.0 / mse)  # peak-to-peak 2 in [-1, 1]


def ssim(a: jax.Array, b: jax.Array) -> jax.Array:
    """(..., H, W, C) in [-1, 1] -> (...) mean SSIM of each image, on the [0, 1] range.

    H and W must be at least 11, the window size.
    """
    return _per_image(dm_pix.ssim, a, b)
