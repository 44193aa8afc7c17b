"""The train state and the pure, jitted train step (generator and discriminator).

One state pytree holds both networks, both optimizer states, the EMA of the
autoencoder and the step. `make_train_step` returns a pure function

    step(state, frozen, x, base_key) -> (state, metrics)

that the trainer jits with explicit shardings and donates `state` to. `frozen`
holds the parameters of the networks that never train (the image VAE of the
regulariser, LPIPS). The RNG of a step is `fold_in(base_key, state.step)`, so a
resumed run draws what the uninterrupted one would have.

Design: one fused step per iteration. The generator update comes first; the
discriminator then learns on this step's reconstruction (computed before the
generator update, so no second VAE forward). A step whose losses or gradients
are not finite leaves networks, optimizers and EMA untouched and increments
`nonfinite_run`, which the trainer watches.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from .objective import LogVars, Objective


class TrainState(NamedTuple):
    step: jax.Array
    gen: dict[str, Any]  # {"vae": nnx.State, "logvars": LogVars}
    disc: nnx.State
    g_opt: optax.OptState
    d_opt: optax.OptState
    ema: nnx.State
    nonfinite_run: jax.Array  # consecutive skipped updates


class GraphDefs(NamedTuple):
    """The static halves of the networks (`nnx.split`); None for an absent network."""

    vae: nnx.GraphDef
    disc: nnx.GraphDef
    image_vae: nnx.GraphDef | None
    lpips: nnx.GraphDef | None


def init_state(vae_state: nnx.State, disc_state: nnx.State, *, g_tx: optax.GradientTransformation,
               d_tx: optax.GradientTransformation, logvar_init: float = 0.0) -> TrainState:
    gen = {"vae": vae_state, "logvars": LogVars.init(logvar_init)}
    return TrainState(step=jnp.zeros((), jnp.int32), gen=gen, disc=disc_state,
                      g_opt=g_tx.init(gen), d_opt=d_tx.init(disc_state),
                      ema=jax.tree.map(jnp.copy, vae_state),
                      nonfinite_run=jnp.zeros((), jnp.int32))


def schedules(*, lr: float, lr_g_factor: float, warmup_steps: int, total_steps: int,
              min_lr_ratio: float):
    """(generator, discriminator) learning rates, as in the official recipe: the generator
    at lr * lr_g_factor with linear warmup then cosine decay to min_lr_ratio of its peak;
    the discriminator constant at lr."""
    peak = lr * lr_g_factor
    g = optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=peak, warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1), end_value=peak * min_lr_ratio)
    return g, optax.constant_schedule(lr)


def optimizers(*, g_schedule, d_schedule, b1: float, b2: float, eps: float,
               weight_decay: float, grad_clip: float | None):
    """AdamW for each network, after global-norm clipping (None: no clipping)."""
    def make(schedule):
        adamw = optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay)
        return adamw if grad_clip is None else optax.chain(optax.clip_by_global_norm(grad_clip), adamw)
    return make(g_schedule), make(d_schedule)


def _schedule_count(opt_state) -> jax.Array:
    """The update count the optimizer's schedule is at: skipped steps do not advance it."""
    (_, count), *_ = optax.tree_utils.tree_get_all_with_path(opt_state, "count")
    return count


def make_train_step(*, objective: Objective, graphdefs: GraphDefs,
                    g_tx: optax.GradientTransformation, d_tx: optax.GradientTransformation,
                    g_schedule, ema_decay: float, remat_policy=None):
    """The pure step; a `remat_policy` wraps the generator loss in `jax.checkpoint`."""
    gd = graphdefs

    def merge(graphdef, state):
        return None if graphdef is None else nnx.merge(graphdef, state)

    def step(state: TrainState, frozen: dict[str, Any], x: jax.Array, base_key: jax.Array):
        key = jax.random.fold_in(base_key, state.step)
        disc = nnx.merge(gd.disc, state.disc)

        def g_loss(gen):
            return objective.generator_loss(
                nnx.merge(gd.vae, gen["vae"]), gen["logvars"], disc,
                merge(gd.image_vae, frozen["image_vae"]), merge(gd.lpips, frozen["lpips"]), x,
                key=key, step=state.step)

        if remat_policy is not None:
            g_loss = jax.checkpoint(g_loss, policy=remat_policy)
        with jax.named_scope("generator"):
            (g_total, aux), g_grads = jax.value_and_grad(g_loss, has_aux=True)(state.gen)

        def d_loss(d):
            return objective.discriminator_loss(nnx.merge(gd.disc, d), aux.target, aux.x_rec,
                                                step=state.step)

        with jax.named_scope("discriminator"):
            (d_total, d_metrics), d_grads = jax.value_and_grad(d_loss, has_aux=True)(state.disc)

        # One scalar decides: a NaN/Inf anywhere reaches the global norms. (A per-leaf
        # isfinite reduction and a where per leaf made XLA's CPU compile 5x slower.)
        g_norm, d_norm = optax.tree.norm(g_grads), optax.tree.norm(d_grads)
        finite = jnp.isfinite(g_total + d_total + g_norm + d_norm)

        def update(_):
            g_updates, g_opt = g_tx.update(g_grads, state.g_opt, state.gen)
            gen = optax.apply_updates(state.gen, g_updates)
            d_updates, d_opt = d_tx.update(d_grads, state.d_opt, state.disc)
            disc_params = optax.apply_updates(state.disc, d_updates)
            ema = jax.tree.map(lambda e, p: ema_decay * e + (1.0 - ema_decay) * p, state.ema,
                               gen["vae"])
            return gen, disc_params, g_opt, d_opt, ema

        unchanged = (state.gen, state.disc, state.g_opt, state.d_opt, state.ema)
        gen, disc_params, g_opt, d_opt, ema = jax.lax.cond(finite, update, lambda _: unchanged, None)
        new = TrainState(step=state.step + 1, gen=gen, disc=disc_params, g_opt=g_opt, d_opt=d_opt,
                         ema=ema, nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1))
        metrics = {**aux.metrics, **d_metrics,
                   "grad_norm/generator": g_norm, "grad_norm/discriminator": d_norm,
                   "lr/generator": jnp.asarray(g_schedule(_schedule_count(state.g_opt)),
                                               jnp.float32),
                   "skipped": 1.0 - finite.astype(jnp.float32),
                   "nonfinite_run": new.nonfinite_run}
        return new, metrics

    return step
