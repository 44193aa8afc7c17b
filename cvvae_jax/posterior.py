"""The diagonal Gaussian posterior returned by `encode`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

# diffusers' DiagonalGaussianDistribution clamps the log-variance to this range.
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@struct.dataclass
class DiagonalGaussian:
    """N(mean, exp(logvar)) per latent element, channels-last.

    A pytree, so it crosses `jax.jit` boundaries. Build it with `from_moments`,
    which splits the encoder output and clamps the log-variance as the official
    code does; the statistics below are computed in float32.
    """

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
        """Split (..., 2C) encoder moments into mean (first C) and log-variance."""
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return cls(mean=mean, logvar=jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX))

    @property
    def std(self) -> jax.Array:
        return jnp.exp(0.5 * self.logvar)

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, key: jax.Array) -> jax.Array:
        if key is None or isinstance(key, int):
            raise TypeError(f"sample: expected a PRNG key, e.g. jax.random.key(seed), got {key!r}")
        return self.mean + self.std * jax.random.normal(key, self.mean.shape, self.mean.dtype)

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self, other: "DiagonalGaussian | None" = None) -> jax.Array:
        """KL(q || p) summed over every axis but the batch: shape (B,); p is `other`, or
        N(0, I) when it is None.

        0.5 * sum((mean - mean_p)^2 / var_p + var / var_p - 1 - logvar + logvar_p), which for
        N(0, I) is 0.5 * sum(mean^2 + var - 1 - logvar). (diffusers sums over axes 1-3 only,
        which for a 5D video would leave the width axis unsummed.)
        """
        axes = tuple(range(1, self.mean.ndim))
        if other is None:
            return 0.5 * jnp.sum(self.mean**2 + self.var - 1.0 - self.logvar, axis=axes)
        if not isinstance(other, DiagonalGaussian):
            raise TypeError(f"kl: other must be a DiagonalGaussian (or None for N(0, I)), "
                            f"got {type(other).__name__}")
        return 0.5 * jnp.sum((self.mean - other.mean) ** 2 / other.var + self.var / other.var
                             - 1.0 - self.logvar + other.logvar, axis=axes)

    def nll(self, sample: jax.Array) -> jax.Array:
        """-log q(sample) summed over every axis but the batch: shape (B,)."""
        axes = tuple(range(1, self.mean.ndim))
        return 0.5 * jnp.sum(
            jnp.log(2.0 * jnp.pi) + self.logvar + (sample - self.mean) ** 2 / self.var, axis=axes
        )
