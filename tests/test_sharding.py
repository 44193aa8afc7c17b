"""Mesh, sharding rules and a sharded train step on 8 fake CPU devices.

The number of CPU devices is fixed when JAX starts its backend, which another
test may already have done with one device; the 8-device checks therefore run
in one subprocess that executes this file (see `__main__` at the bottom).
"""

import functools
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from cvvae_jax import sharding

REPO = Path(__file__).resolve().parents[1]
MIN_SIZE = 64  # small enough that the test model's kernels are sharded


def test_eight_device_checks():
    pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": pythonpath}
    proc = subprocess.run([sys.executable, __file__], check=False, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "all 8-device checks passed" in proc.stdout


def test_make_mesh_on_one_device():
    mesh = sharding.make_mesh({"data": -1, "fsdp": 1})
    assert dict(mesh.shape) == {"data": len(jax.devices()), "fsdp": 1}
    assert set(mesh.axis_types) == {jax.sharding.AxisType.Auto}
    with pytest.raises(ValueError, match="do not fit"):
        sharding.make_mesh([("data", len(jax.devices()) + 1)])
    with pytest.raises(ValueError, match="at most one -1"):
        sharding.make_mesh({"data": -1, "fsdp": -1})
    n = len(jax.devices())
    with pytest.raises(ValueError) as e:
        sharding.make_mesh({"data": -1, "fsdp": n + 1})
    assert str(e.value) == (f"mesh axes {{'data': -1, 'fsdp': {n + 1}}} do not fit the {n} "
                            f"devices: {n + 1} does not divide {n}")
    with pytest.raises(ValueError, match=rf"2 x {n + 1} = {2 * n + 2} does not divide {n}$"):
        sharding.make_mesh([("a", 2), ("data", -1), ("fsdp", n + 1)])


def test_remat_policy_names():
    assert sharding.remat_policy("none") is None
    assert sharding.remat_policy("full") is jax.checkpoint_policies.nothing_saveable
    assert sharding.remat_policy("dots") is jax.checkpoint_policies.dots_saveable
    assert (sharding.remat_policy("dots_no_batch")
            is jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    with pytest.raises(ValueError, match="valid: none, full"):
        sharding.remat_policy("minimal")


def test_initialize_distributed_only_when_launched_so(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    assert sharding.initialize_distributed() is False
    assert calls == []

    assert sharding.initialize_distributed(cluster_auto_detect=True) is True
    assert calls == [{}]

    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
    monkeypatch.setenv("JAX_PROCESS_ID", "2")
    assert sharding.initialize_distributed() is True
    assert calls[-1] == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                         "process_id": 2}
    sharding.initialize_distributed(coordinator_address="h:1", num_processes=2, process_id=0)
    assert calls[-1] == {"coordinator_address": "h:1", "num_processes": 2, "process_id": 0}


def test_initialize_distributed_names_what_a_launch_lacks(monkeypatch):
    def initialize(coordinator_address=None, num_processes=None, process_id=None):
        # What jax.distributed.initialize raises where no cluster fills in the gaps.
        if coordinator_address is None:
            raise ValueError("coordinator_address should be defined.")
        if num_processes is None:
            raise ValueError("Number of processes must be defined.")

    monkeypatch.setattr(jax.distributed, "initialize", initialize)
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ValueError) as e:
        sharding.initialize_distributed(cluster_auto_detect=True)
    assert str(e.value) == (
        "cannot join a multi-process run: --cluster_auto_detect found no cluster that JAX knows "
        "(Cloud TPU pod, SLURM, Open MPI, Kubernetes): elsewhere set JAX_COORDINATOR_ADDRESS, "
        "JAX_NUM_PROCESSES, JAX_PROCESS_ID on every process (JAX: coordinator_address should "
        "be defined.)")

    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.1:1234")
    with pytest.raises(ValueError) as e:
        sharding.initialize_distributed()
    assert str(e.value) == (
        "cannot join a multi-process run: JAX_COORDINATOR_ADDRESS is set but JAX_NUM_PROCESSES "
        "and JAX_PROCESS_ID are not, and no cluster that JAX knows supplies them: set all three "
        "on every process (JAX: Number of processes must be defined.)")

    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="^JAX_NUM_PROCESSES='two': not an integer$"):
        sharding.initialize_distributed()


# The checks below run in the 8-device subprocess.

class Net(nnx.Module):
    def __init__(self, *, rngs: nnx.Rngs):
        self.wide = nnx.Conv(3, 16, kernel_size=(3, 3), rngs=rngs)  # kernel (3, 3, 3, 16)
        self.odd = nnx.Conv(3, 5, kernel_size=(3, 3), rngs=rngs)  # (3, 3, 3, 5): no even dim
        self.head = nnx.Linear(21, 32, rngs=rngs)  # (21, 32)
        self.out = nnx.Linear(32, 4, rngs=rngs)  # (32, 4): 128 elements, 2 x 64

    def __call__(self, x):
        h = jnp.concatenate([nnx.relu(self.wide(x)), nnx.relu(self.odd(x))], axis=-1)
        return self.out(nnx.relu(self.head(h.mean(axis=(1, 2)))))


TX = optax.adamw(1e-2, weight_decay=0.1)


def _init():
    graphdef, params = nnx.split(Net(rngs=nnx.Rngs(0)))
    return graphdef, {"params": params, "opt": TX.init(params), "step": jnp.int32(0)}


def _make_train_step(graphdef):
    def train_step(state, batch):
        def loss_fn(params):
            pred = nnx.merge(graphdef, params)(batch["x"])
            return jnp.mean((pred - batch["y"]) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt = TX.update(grads, state["opt"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt": opt,
                "step": state["step"] + 1}, loss

    return train_step


def _batches(n):
    rng = np.random.default_rng(0)
    return [{"x": rng.normal(size=(16, 8, 8, 3)).astype(np.float32),
             "y": rng.normal(size=(16, 4)).astype(np.float32)} for _ in range(n)]


def _check_mesh():
    mesh = sharding.make_mesh({"data": -1, "fsdp": 2})
    assert dict(mesh.shape) == {"data": 4, "fsdp": 2}
    assert sharding.make_mesh([("data", 4), ("fsdp", 2)]).devices.shape == (4, 2)
    try:
        sharding.make_mesh({"data": 4, "fsdp": 4})
    except ValueError as e:
        assert "do not fit the 8 devices" in str(e)
    else:
        raise AssertionError("a 4x4 mesh on 8 devices was accepted")
    return mesh


def _check_param_sharding(mesh):
    rules = functools.partial(sharding.param_sharding, min_size=MIN_SIZE)
    state, shardings = sharding.create_sharded(lambda: _init()[1], mesh, rules=rules)
    expected = {
        ("wide", "kernel"): (P(None, None, None, "fsdp"), (3, 3, 3, 8)),
        ("wide", "bias"): (P(), (16,)),  # under MIN_SIZE
        ("odd", "kernel"): (P(), (3, 3, 3, 5)),  # no dimension divisible by 2
        ("head", "kernel"): (P(None, "fsdp"), (21, 16)),
        ("out", "kernel"): (P("fsdp", None), (16, 4)),  # the larger dim wins, not the last
    }
    params = nnx.to_flat_state(state["params"])
    moments = nnx.to_flat_state(state["opt"][0].mu)  # adamw: (ScaleByAdamState, ...)
    for path, (spec, shard_shape) in expected.items():
        for tree in (params, moments):
            array = dict(tree)[path].get_value()
            assert array.sharding.spec == spec, (path, array.sharding.spec)
            assert {s.data.shape for s in array.addressable_shards} == {shard_shape}, path
            assert len(array.addressable_shards) == 8
    assert state["opt"][0].count.sharding.spec == P()
    assert state["step"].sharding.spec == P()
    # The returned shardings are the state's own, ready for jit's in/out_shardings.
    assert jax.tree.map(lambda s: s.spec, shardings) == jax.tree.map(lambda a: a.sharding.spec,
                                                                     state)
    return state, shardings


def _check_global_batch(mesh):
    local = _batches(1)[0]
    batch = sharding.global_batch(local, mesh)
    for name, array in batch.items():
        assert array.shape == local[name].shape
        assert array.sharding.spec[0] == ("data", "fsdp")
        assert {s.data.shape[0] for s in array.addressable_shards} == {2}
        np.testing.assert_array_equal(np.asarray(array), local[name])


def _check_train_step_matches_one_device(mesh, state, shardings):
    batches = _batches(3)
    ref_state = jax.device_get(state)  # a host copy: the sharded steps donate `state`
    train_step = _make_train_step(nnx.graphdef(Net(rngs=nnx.Rngs(0))))
    ref_step = jax.jit(train_step)
    for b in batches:
        ref_state, ref_loss = ref_step(ref_state, b)

    batch_shardings = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in batches[0].items()}
    replicated = jax.sharding.NamedSharding(mesh, P())
    step = jax.jit(train_step, in_shardings=(shardings, batch_shardings),
                   out_shardings=(shardings, replicated), donate_argnums=(0,))
    for b in batches:
        state, loss = step(state, sharding.global_batch(b, mesh))

    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert int(state["step"]) == 3
    for got, ref in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
    assert state["params"]["head"]["kernel"].get_value().sharding.spec == P(None, "fsdp")


def _eight_device_checks():
    assert jax.device_count() == 8, jax.devices()
    mesh = _check_mesh()
    state, shardings = _check_param_sharding(mesh)
    _check_global_batch(mesh)
    _check_train_step_matches_one_device(mesh, state, shardings)
    print("all 8-device checks passed")


if __name__ == "__main__":
    jax.config.update("jax_num_cpu_devices", 8)
    # Threefry initialisation takes ~10 s to compile for 8 devices on a busy CPU, RBG
    # a few; the values need not match any other run (the reference starts from a copy).
    jax.config.update("jax_default_prng_impl", "rbg")
    _eight_device_checks()
