"""The device mesh and how parameters, optimizer states and batches are laid out on it.

FSDP, as big_vision and MaxText do it: each large parameter (and its optimizer
moments, which have the same shape) is split along one dimension over the `fsdp`
axis and replicated over `data`; activations are split over both axes by the
batch dimension, so every device is data parallel and XLA gathers a layer's
parameters just before it runs. Layers never see the mesh: these rules are
applied to whole pytrees here and handed to `jax.jit` by the trainer.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

PyTree = Any
Rules = Callable[[Mesh, PyTree], PyTree]

BATCH_AXES = ("data", "fsdp")


def make_mesh(axes: Mapping[str, int] | Sequence[tuple[str, int]], *,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with the named axes and sizes of `axes`; one size may be -1 (the rest).

    `devices` defaults to all devices of all processes.
    """
    items = list(axes.items()) if isinstance(axes, Mapping) else list(axes)
    names = tuple(name for name, _ in items)
    sizes = [int(size) for _, size in items]
    devices = jax.devices() if devices is None else list(devices)
    wanted = dict(zip(names, sizes, strict=True))
    if any(size == 0 or size < -1 for size in sizes) or sizes.count(-1) > 1:
        raise ValueError(f"mesh axes {wanted}: sizes must be positive, with at most one -1")
    known = math.prod(size for size in sizes if size != -1)
    if -1 in sizes:
        if len(devices) % known:
            fixed = [size for size in sizes if size != -1]
            product = " x ".join(map(str, fixed)) + (f" = {known}" if len(fixed) > 1 else "")
            raise ValueError(f"mesh axes {wanted} do not fit the {len(devices)} devices: "
                             f"{product} does not divide {len(devices)}")
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ValueError(f"mesh axes {wanted} do not fit the {len(devices)} devices: the "
                         f"product of the sizes must equal the device count")
    # jax.make_mesh defaults to Explicit axes, under which an ordinary jitted step
    # with in/out shardings fails to type-check; Auto lets GSPMD propagate.
    return jax.make_mesh(sizes, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names),
                         devices=devices)


def param_sharding(mesh: Mesh, abstract_tree: PyTree, *, fsdp_axis: str = "fsdp",
                   min_size: int = 2**16) -> PyTree:
    """A NamedSharding per leaf of `abstract_tree` (arrays or ShapeDtypeStructs).

    A leaf with at least `min_size` elements is split over `fsdp_axis` along its
    largest dimension divisible by that axis' size (ties go to the later dimension,
    a kernel's output features); others, scalars included, are replicated. The
    rule looks only at shapes, so an optimizer state gets the same layout as the
    parameters it mirrors. Without `fsdp_axis` in the mesh, all is replicated.
    """
    n = dict(mesh.shape).get(fsdp_axis, 1)

    def sharding(leaf) -> NamedSharding:
        shape = tuple(getattr(leaf, "shape", ()))
        divisible = [(size, i) for i, size in enumerate(shape) if size % n == 0]
        if n == 1 or math.prod(shape) < min_size or not divisible:
            return NamedSharding(mesh, P())
        _, dim = max(divisible)
        return NamedSharding(mesh, P(*(fsdp_axis if i == dim else None for i in range(len(shape)))))

    return jax.tree.map(sharding, abstract_tree)


def batch_sharding(mesh: Mesh, ndim: int, *,
                   batch_axes: Sequence[str] = BATCH_AXES) -> NamedSharding:
    """The leading (batch) dimension split over those of `batch_axes` the mesh has."""
    if ndim < 1:
        raise ValueError("a batch array needs a leading batch dimension")
    axes = tuple(axis for axis in batch_axes if axis in mesh.axis_names)
    return NamedSharding(mesh, P(axes or None, *(None,) * (ndim - 1)))


def global_batch(local: np.ndarray | PyTree, mesh: Mesh, *,
                 batch_axes: Sequence[str] = BATCH_AXES) -> jax.Array | PyTree:
    """Global arrays from this process' part of the batch (an array or a pytree of them).

    Each process passes its own rows; the global batch concatenates them in
    process order, so its size is the local one times the process count.
    """
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(
            batch_sharding(mesh, np.ndim(x), batch_axes=batch_axes), x),
        local)


def create_sharded(init_fn: Callable[[], PyTree], mesh: Mesh, *,
                   rules: Rules = param_sharding) -> tuple[PyTree, PyTree]:
    """Runs `init_fn` with its outputs born sharded by `rules(mesh, abstract_state)`.

    The state is never whole on one device, which is what lets a model larger than
    one device's memory start. Returns the state and its shardings (for the step's
    in/out_shardings and for restoring checkpoints).
    """
    shardings = rules(mesh, jax.eval_shape(init_fn))
    return jax.jit(init_fn, out_shardings=shardings)(), shardings


_REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_nothing": jax.checkpoint_policies.nothing_saveable,
    # Saves matmul and convolution outputs; recomputes only the cheap ops between them.
    "dots": jax.checkpoint_policies.dots_saveable,
    # Saves only matmuls without batch dimensions: convolutions are recomputed.
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_policy(name: str) -> Callable[..., bool] | None:
    """The `jax.checkpoint` policy a config names; None for "none" (do not remat)."""
    if name not in _REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {name!r}; valid: {', '.join(_REMAT_POLICIES)}")
    return _REMAT_POLICIES[name]


_LAUNCH_VARIABLES = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def initialize_distributed(*, cluster_auto_detect: bool = False, **kwargs) -> bool:
    """Joins a multi-process run when launched as one; returns whether it did.

    `kwargs` go to `jax.distributed.initialize`. Without them, JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID describe the run (JAX itself reads only the
    first); `cluster_auto_detect` lets JAX find everything on a managed cluster (Cloud
    TPU pods, SLURM, Open MPI, Kubernetes), since probing for one from here would
    mean a network call on every laptop run. A single process does nothing.
    """
    from_env = not kwargs and "JAX_COORDINATOR_ADDRESS" in os.environ
    if from_env:
        kwargs = {
            "coordinator_address": os.environ["JAX_COORDINATOR_ADDRESS"],
            "num_processes": _env_int("JAX_NUM_PROCESSES"),
            "process_id": _env_int("JAX_PROCESS_ID"),
        }
    if not kwargs and not cluster_auto_detect:
        return False
    unset = [name for name in _LAUNCH_VARIABLES if name not in os.environ]
    try:
        jax.distributed.initialize(**kwargs)
    except ValueError as e:  # no cluster that JAX knows filled in what the launch left out
        if from_env and unset:
            hint = (f"JAX_COORDINATOR_ADDRESS is set but {' and '.join(unset)} "
                    f"{'is' if len(unset) == 1 else 'are'} not, and no cluster that JAX knows "
                    "supplies them: set all three on every process")
        elif not kwargs:
            hint = ("--cluster_auto_detect found no cluster that JAX knows (Cloud TPU pod, "
                    f"SLURM, Open MPI, Kubernetes): elsewhere set {', '.join(_LAUNCH_VARIABLES)} "
                    "on every process")
        else:
            raise
        raise ValueError(f"cannot join a multi-process run: {hint} (JAX: {e})") from e
    return True


def _env_int(name: str) -> int | None:
    # None lets jax.distributed.initialize fill the value in from the cluster.
    value = os.environ.get(name)
    try:
        return None if value is None else int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r}: not an integer") from None
