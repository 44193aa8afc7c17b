"""Per-block rematerialisation: a residual block keeps only its input for the backward pass.

`config.remat = "blocks"` turns it on for the trained autoencoder and the frozen image
VAE of the regulariser (every `Block`: residual blocks, down- and upsamplers); the other
names are `jax.checkpoint` policies for the whole generator loss
(`cvvae_jax.sharding.remat_policy`).

Why not `jax.checkpoint` (or `nnx.remat`) per block: on XLA:CPU it does nothing. The CPU
compiler expands the optimisation barriers that keep the recomputation apart, and CSE
merges it back into the forward pass. XLA's plan for the paper-width step on 17x128x128
clips (fp32): 17.02 GiB without remat, 17.05 GiB with `nnx.remat` on every residual
block, 17.05 GiB with a custom VJP that recomputes behind a barrier; 7.81 GiB with
this one on the residual blocks.

`checkpointed` ties the recomputation to the incoming cotangent instead: the block's
saved input is replaced by `x + 0 * g[0]` (one element of the cotangent). XLA does not
fold `0 * g` for floats (g may be inf or NaN), so the recomputed activations are new
values that CSE cannot merge, and they can only be computed once the gradient of the
block's output exists, which is when they are needed. A non-finite g[0] makes the
block's gradient non-finite, which the train step's guard skips anyway.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
from flax import nnx

from . import sharding

BLOCKS = "blocks"


class Remat(NamedTuple):
    """What a `config.remat` name asks of the train step."""

    blocks: bool  # per-block remat (`set_block_remat`)
    policy: Callable[..., bool] | None  # a whole-loss `jax.checkpoint` policy, or None


def resolve(name: str) -> Remat:
    """`config.remat` -> what to do; a ValueError naming the valid choices otherwise."""
    if name == BLOCKS:
        return Remat(True, None)
    try:
        return Remat(False, sharding.remat_policy(name))
    except ValueError as e:
        raise ValueError(f"{e}, or {BLOCKS!r} (per-block, cvvae_jax.remat)") from None


def tie(x: jax.Array, ct: jax.Array) -> jax.Array:
    """x, made to depend on one element of the cotangent `ct`: a recomputation from it can
    neither be merged into the forward pass by CSE nor be scheduled before `ct` exists."""
    return x + (ct.reshape(-1)[0] * 0).astype(x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _recompute(run: Callable, params, x: jax.Array) -> jax.Array:
    return run(params, x)


def _fwd(run, params, x):
    return run(params, x), (params, x)


def _bwd(run, residuals, ct):
    params, x = residuals
    _, vjp = jax.vjp(run, params, tie(x, ct))
    return vjp(ct)


_recompute.defvjp(_fwd, _bwd)


def checkpointed(method: Callable[[nnx.Module, jax.Array], jax.Array], module: nnx.Module,
                 x: jax.Array) -> jax.Array:
    """`method(module, x)`, with its activations recomputed in the backward pass.

    The module must be stateless apart from its parameters (no batch statistics or RNG
    counters), which holds for the residual blocks this is used on.
    """
    graphdef, params = nnx.split(module)
    return _recompute(lambda p, v: method(nnx.merge(graphdef, p), v), params, x)


class Block(nnx.Module):
    """A module whose `forward(x)` (subclasses define it) is recomputed in the backward pass
    once `set_block_remat` has turned its `remat` on (off by default: inference never needs it)."""

    remat = False

    def __call__(self, x: jax.Array) -> jax.Array:
        if self.remat:
            return checkpointed(type(self).forward, self, x)
        return self.forward(x)


def set_block_remat(model: nnx.Module, on: bool = True) -> int:
    """Sets `remat` on every `Block` in `model`; returns how many there are."""
    blocks = [node for _, node in nnx.iter_graph(model) if isinstance(node, Block)]
    for block in blocks:
        block.remat = on
    return len(blocks)
