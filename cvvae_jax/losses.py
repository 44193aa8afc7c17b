"""The loss terms of CV-VAE training, as pure jittable functions.

Every function works in float32 on channels-last video (B, T, H, W, C) and
accepts images as T = 1. Reductions follow the official training code
(`LPIPSWithDiscriminatorAndDomainConstraint`), which flattens time into the
batch before reducing: a "per-batch" sum there is a sum divided by the number
of frames B * T.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Mapping = Literal["slice", "mean", "random", "first"]
MAPPINGS = ("slice", "mean", "random", "first")


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def pixel_loss(x: jax.Array, y: jax.Array, kind: str = "l1") -> jax.Array:
    """Per-pixel distance, same shape as the inputs: |x - y| ("l1") or (x - y)^2 ("l2")."""
    d = _f32(x) - _f32(y)
    if kind == "l1":
        return jnp.abs(d)
    if kind == "l2":
        return d * d
    raise ValueError(f"pixel_loss: kind={kind!r}; expected 'l1' or 'l2'")


def frames(x: jax.Array) -> jax.Array:
    """(B, T, H, W, C) -> (B * T, H, W, C), the per-frame view 2D networks take."""
    return x.reshape((-1,) + x.shape[2:])


def reconstruction_loss(x: jax.Array, x_rec: jax.Array, *, kind: str = "l1",
                        perceptual_weight: float = 0.0, lpips=None) -> jax.Array:
    """rec = pixel_loss(x, x_rec) + perceptual_weight * LPIPS(x_t, x_rec_t), shape (B, T, H, W, C).

    LPIPS is computed per frame and, as in the official code, added to every
    pixel of its frame, so after the NLL's sum it weighs H * W * C times its value.
    `lpips` is a callable (N, H, W, 3) x2 -> (N,), or None to leave the term out.
    """
    rec = pixel_loss(x, x_rec, kind)
    if lpips is not None and perceptual_weight > 0:
        p = _f32(lpips(frames(x), frames(x_rec))).reshape(x.shape[:2])
        rec = rec + perceptual_weight * p[:, :, None, None, None]
    return rec


def nll_loss(rec: jax.Array, logvar: jax.Array) -> jax.Array:
    """sum(rec / exp(logvar) + logvar) / (B * T): the NLL with a learnable scalar log-variance."""
    logvar = _f32(logvar)
    n = rec.shape[0] * rec.shape[1]
    return jnp.sum(_f32(rec) / jnp.exp(logvar) + logvar) / n


def kl_loss(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """sum_b KL(N(mean, exp(logvar)) || N(0, I)) / B, with
    KL = 0.5 * sum(mean^2 + exp(logvar) - 1 - logvar) over every non-batch axis."""
    mean, logvar = _f32(mean), _f32(logvar)
    return 0.5 * jnp.sum(mean**2 + jnp.exp(logvar) - 1.0 - logvar) / mean.shape[0]


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))."""
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - _f32(logits_real)))
                  + jnp.mean(jax.nn.relu(1.0 + _f32(logits_fake))))


def vanilla_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    """0.5 * (mean(softplus(-real)) + mean(softplus(fake)))."""
    return 0.5 * (jnp.mean(jax.nn.softplus(-_f32(logits_real)))
                  + jnp.mean(jax.nn.softplus(_f32(logits_fake))))


D_LOSSES = {"hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def generator_loss(logits_fake: jax.Array) -> jax.Array:
    """-mean(logits_fake)."""
    return -jnp.mean(_f32(logits_fake))


def adaptive_weight(nll_grad: jax.Array, g_grad: jax.Array, disc_weight: float) -> jax.Array:
    """disc_weight * clip(||nll_grad|| / (||g_grad|| + 1e-4), 0, 1e4), without gradient.

    The gradients are those of the NLL and of the generator loss with respect to
    the decoder's last layer (its output conv kernel).
    """
    ratio = jnp.linalg.norm(_f32(nll_grad)) / (jnp.linalg.norm(_f32(g_grad)) + 1e-4)
    return jax.lax.stop_gradient(jnp.clip(ratio, 0.0, 1e4) * disc_weight)


def mapped_indices(t: int, mapping: Mapping, key: jax.Array | None = None,
                   factor: int = 4) -> jax.Array:
    """Frame indices the latent regulariser compares with, for a clip of T = 1 + factor * k.

    - "slice": 0, 4, 8, ... (every `factor`-th frame);
    - "random": 0, then one frame drawn uniformly from each group 4i+1 .. 4i+4;
    - "first": 0 only.
    ("mean" averages groups instead of picking frames: see `map_frames`.)
    """
    if (t - 1) % factor:
        raise ValueError(f"mapped_indices: T={t}; expected T = 1 + {factor}k")
    k = (t - 1) // factor
    if mapping == "slice" or mapping == "mean":
        return jnp.arange(0, t, factor)
    if mapping == "first":
        return jnp.zeros((1,), jnp.int32)
    if mapping == "random":
        if key is None:
            raise ValueError("mapped_indices: mapping='random' needs a key")
        offsets = jax.random.randint(key, (k,), 1, factor + 1)
        return jnp.concatenate([jnp.zeros((1,), jnp.int32), offsets + factor * jnp.arange(k)])
    raise ValueError(f"mapped_indices: mapping={mapping!r}; expected one of {MAPPINGS}")


def map_frames(x: jax.Array, mapping: Mapping, key: jax.Array | None = None,
               factor: int = 4) -> jax.Array:
    """The frames of x (B, 1 + factor * k, ...) that latent frames stand for.

    "mean" gives frame 0, then the mean of each group of `factor` frames after it;
    the other mappings pick frames by `mapped_indices`. All give 1 + k frames
    except "first", which gives one.
    """
    t = x.shape[1]
    if mapping == "mean":
        if (t - 1) % factor:
            raise ValueError(f"map_frames: T={t}; expected T = 1 + {factor}k")
        rest = x[:, 1:].reshape((x.shape[0], (t - 1) // factor, factor) + x.shape[2:])
        return jnp.concatenate([x[:, :1], jnp.mean(rest, axis=2)], axis=1)
    return jnp.take(x, mapped_indices(t, mapping, key, factor), axis=1)
