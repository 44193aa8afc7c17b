"""The CV-VAE training objective: VAE-GAN on the video plus the latent regulariser.

`Objective` holds the loss hyperparameters (static, hashable) and computes the
generator and discriminator losses from NNX modules inside your jitted step:

    loss, aux = objective.generator_loss(vae, logvars, disc, image_vae, lpips, x, key=k, step=s)
    d_loss, d_metrics = objective.discriminator_loss(disc, aux.target, aux.x_rec, step=s)

The terms follow the official `LPIPSWithDiscriminatorAndDomainConstraint` (and
its encoder/all-constraint siblings):

    total = nll + rec2d_weight * nll_2d + d_weight * disc_factor * g + kl_weight * kl

- nll = sum(rec / e^logvar + logvar) / (B T), rec = |x - x_rec| + perceptual_weight * LPIPS;
- nll_2d: the same with its own log-variance on |map(x) - D_sd(z)|, the frozen image
  VAE decoding each latent frame of the sampled 3D latent z ("decoder" regulariser);
- the "encoder" regulariser (paper Table 6) makes the 3D decoder also reconstruct the
  clip from the frozen image VAE's latents of the mapped frames: as in the official
  code those reconstructions join the batch (rec, KL and GAN terms see 2B clips);
- d_weight = disc_weight * ||dnll/dW|| / (||dg/dW|| + 1e-4), W the decoder's output
  conv kernel, zero before `disc_start`.

Design choice: the discriminator step reuses this step's reconstruction (no
second VAE forward), where the official Lightning loop re-runs the VAE.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from . import losses
from .posterior import DiagonalGaussian

REGULARIZERS = ("decoder", "encoder", "both", "none")


class LogVars(NamedTuple):
    """The learnable scalar log-variances of the two NLL terms (trained with the generator)."""

    video: jax.Array
    image: jax.Array

    @classmethod
    def init(cls, value: float = 0.0) -> "LogVars":
        return cls(jnp.full((), value, jnp.float32), jnp.full((), value, jnp.float32))


class GeneratorAux(NamedTuple):
    metrics: dict[str, jax.Array]
    x_rec: jax.Array   # what the discriminator sees as fake (B or 2B clips)
    target: jax.Array  # ... and as real
    x_2d: jax.Array | None  # the image decoder's view of the 3D latent (None: no regulariser)


def frozen(module: nnx.Module | None) -> nnx.Module | None:
    """A copy of `module` whose parameters pass no gradient."""
    if module is None:
        return None
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(jax.lax.stop_gradient, state))


def per_frame(net, x: jax.Array) -> jax.Array:
    """Run a 2D network over every frame of (B, T, ...) at once."""
    y = net(losses.frames(x))
    return y.reshape(x.shape[:2] + y.shape[1:])


def _with_kernel(conv: nnx.Module, h: jax.Array, kernel: jax.Array) -> jax.Array:
    graphdef, state = nnx.split(conv)
    replaced = nnx.merge(graphdef, state, copy=True)
    replaced.kernel[...] = kernel
    return replaced(h)


@dataclasses.dataclass(frozen=True)
class Objective:
    rec_loss: str = "l1"
    perceptual_weight: float = 0.5
    kl_weight: float = 1.0
    disc_weight: float = 0.5
    disc_factor: float = 1.0
    disc_start: int = 0
    disc_loss: str = "hinge"
    adaptive_disc_weight: bool = True
    rec2d_weight: float = 1.0
    mapping: losses.Mapping = "random"
    regularizer: str = "decoder"

    def __post_init__(self):
        if self.regularizer not in REGULARIZERS:
            raise ValueError(f"Objective: regularizer={self.regularizer!r}; expected one of {REGULARIZERS}")
        if self.mapping not in losses.MAPPINGS:
            raise ValueError(f"Objective: mapping={self.mapping!r}; expected one of {losses.MAPPINGS}")
        if self.disc_loss not in losses.D_LOSSES:
            raise ValueError(f"Objective: disc_loss={self.disc_loss!r}; expected one of "
                             f"{tuple(losses.D_LOSSES)}")
        if self.rec_loss not in ("l1", "l2"):
            raise ValueError(f"Objective: rec_loss={self.rec_loss!r}; expected 'l1' or 'l2'")

    @property
    def decoder_regularizer(self) -> bool:
        return self.regularizer in ("decoder", "both")

    @property
    def encoder_regularizer(self) -> bool:
        return self.regularizer in ("encoder", "both")

    def _disc_on(self, step) -> jax.Array:
        return (jnp.asarray(step) >= self.disc_start).astype(jnp.float32)

    def generator_loss(self, vae, logvars: LogVars, disc, image_vae, lpips, x: jax.Array, *,
                       key: jax.Array, step) -> tuple[jax.Array, GeneratorAux]:
        """The generator's total loss for clips x (B, 1 + 4k, H, W, 3) in [-1, 1].

        `vae`: a `CVVAE`; `disc`: the discriminator; `image_vae`: the frozen `ImageVAE`
        (may be None when regularizer="none"); `lpips`: a callable (N, H, W, 3) x2 -> (N,)
        or None. Only `vae` and `logvars` receive gradients.
        """
        image_vae, lpips = frozen(image_vae), frozen(lpips)
        key_z, key_map, key_sd = jax.random.split(key, 3)
        x = jnp.asarray(x, jnp.float32)
        post = DiagonalGaussian.from_moments(vae.encode_moments(x))
        z = post.sample(key_z)
        mapped = None
        if self.regularizer != "none":
            mapped = losses.map_frames(x, self.mapping, key_map, vae.config.time_factor)
        mean, logvar, target = post.mean, post.logvar, x
        if self.encoder_regularizer:
            sd_post = DiagonalGaussian.from_moments(per_frame(image_vae.encode_moments, mapped))
            if sd_post.mean.shape != z.shape:
                raise ValueError(f"generator_loss: the encoder regulariser needs one mapped frame "
                                 f"per latent frame; got {sd_post.mean.shape} for latents {z.shape} "
                                 f"(mapping={self.mapping!r})")
            z = jnp.concatenate([z, sd_post.sample(key_sd)])
            mean = jnp.concatenate([mean, sd_post.mean])
            logvar = jnp.concatenate([logvar, sd_post.logvar])
            target = jnp.concatenate([x, x])

        conv_out = vae.decoder.conv_out
        h = vae.decoder.features(z.astype(vae.dtype))
        x_rec = conv_out(h)

        def nll_of(x_rec):
            rec = losses.reconstruction_loss(target, x_rec, kind=self.rec_loss,
                                             perceptual_weight=self.perceptual_weight, lpips=lpips)
            return losses.nll_loss(rec, logvars.video), rec

        nll, rec = nll_of(x_rec)
        kl = losses.kl_loss(mean, logvar)
        metrics = {"loss/rec": jnp.mean(rec), "loss/nll": nll, "loss/kl": kl,
                   "scalars/logvar": logvars.video}

        nll_2d, x_2d = jnp.zeros((), jnp.float32), None
        if self.decoder_regularizer:
            z_img = z[: x.shape[0]]
            if self.mapping == "first":
                z_img = z_img[:, :1]
            x_2d = per_frame(image_vae.decode_latents, z_img)
            rec_2d = losses.pixel_loss(mapped, x_2d, self.rec_loss)
            nll_2d = losses.nll_loss(rec_2d, logvars.image)
            metrics.update({"loss/rec2d": jnp.mean(rec_2d), "loss/nll2d": nll_2d,
                            "scalars/logvar_2d": logvars.image})

        logits_fake = disc(x_rec)
        g = losses.generator_loss(logits_fake)
        on = self._disc_on(step)
        if self.adaptive_disc_weight:
            kernel, h_const = jax.lax.stop_gradient((conv_out.kernel[...], h))
            nll_grad = jax.grad(lambda w: nll_of(_with_kernel(conv_out, h_const, w))[0])(kernel)
            g_grad = jax.grad(lambda w: losses.generator_loss(
                disc(_with_kernel(conv_out, h_const, w))))(kernel)
            d_weight = losses.adaptive_weight(nll_grad, g_grad, self.disc_weight)
        else:
            d_weight = jnp.asarray(self.disc_weight, jnp.float32)
        d_weight = d_weight * on

        total = (nll + self.rec2d_weight * nll_2d + d_weight * self.disc_factor * g
                 + self.kl_weight * kl)
        metrics.update({"loss/total": total, "loss/g": g * on, "scalars/d_weight": d_weight})
        return total, GeneratorAux(metrics, x_rec, target, x_2d)

    def discriminator_loss(self, disc, target: jax.Array, x_rec: jax.Array, *,
                           step) -> tuple[jax.Array, dict[str, jax.Array]]:
        """disc_factor * D_loss(D(target), D(x_rec)), zero before `disc_start`."""
        logits_real = disc(jax.lax.stop_gradient(target))
        logits_fake = disc(jax.lax.stop_gradient(x_rec))
        d = self._disc_on(step) * self.disc_factor * losses.D_LOSSES[self.disc_loss](
            logits_real, logits_fake)
        return d, {"loss/disc": d, "logits/real": jnp.mean(logits_real.astype(jnp.float32)),
                   "logits/fake": jnp.mean(logits_fake.astype(jnp.float32))}
