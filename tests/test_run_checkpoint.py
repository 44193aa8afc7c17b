"""The run checkpointer: which steps it saves and keeps, exact resumes, damaged steps."""

import functools
import gc
import logging
import os
import shutil
import signal
import sys
import time
import types
import warnings

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from cvvae_jax import cli
from cvvae_jax.run_checkpoint import PreemptionGuard, RunCheckpointer


def _state(seed: int = 0) -> dict:
    params = nnx.state(nnx.Linear(8, 4, rngs=nnx.Rngs(seed)))
    return {"params": params, "opt": optax.adam(1e-3).init(params),
            "step": jnp.int32(seed), "key": jax.random.key(seed)}


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)


def _data_iter():
    return iter(grain.MapDataset.range(100).shuffle(seed=0).batch(4).to_iter_dataset())


def _assert_same_state(got, want):
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        if jnp.issubdtype(w.dtype, jax.dtypes.prng_key):
            g, w = jax.random.key_data(g), jax.random.key_data(w)
        assert g.dtype == w.dtype
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_saves_every_n_and_keeps_last_plus_every_m(tmp_path):
    state = _state()
    with RunCheckpointer(tmp_path, save_every=2, keep_last=2, keep_every=4) as ckpt:
        saved = [s for s in range(1, 14) if ckpt.maybe_save(s, state, {"pos": s})]
        assert saved == [2, 4, 6, 8, 10, 12]
        assert ckpt.maybe_save(13, state, {"pos": 13}, force=True)  # end of the run
        assert not ckpt.maybe_save(13, state, {"pos": 13}, force=True)  # already saved
        ckpt.wait()
        # the last two (12, 13) and the multiples of 4
        assert ckpt.all_steps() == [4, 8, 12, 13]
    assert sorted(int(p.name) for p in tmp_path.iterdir()) == [4, 8, 12, 13]


def test_restore_gives_the_same_arrays_and_next_batch(tmp_path):
    state, config = _state(seed=3), {"model": "tiny", "lr": 1e-3}
    it = _data_iter()
    for _ in range(3):
        next(it)
    saved_position = it.get_state()
    with RunCheckpointer(tmp_path, save_every=5, keep_last=3, config=config) as ckpt:
        assert ckpt.maybe_save(5, state, it)
        expected_next = next(it)  # the iterator moves on while the save is in flight
        next(it)

    fresh_it = _data_iter()
    with RunCheckpointer(tmp_path, save_every=5, keep_last=3) as ckpt:
        step, restored, data = ckpt.restore_latest(_abstract(_state(seed=0)), fresh_it)
        assert step == 5 and data is fresh_it
        _assert_same_state(restored, state)
        np.testing.assert_array_equal(next(fresh_it), expected_next)
        # Without an iterator to restore into, the same position comes back as a dict.
        assert ckpt.restore_latest(_abstract(state))[2] == saved_position

    saved_config = ocp.CheckpointManager(tmp_path).restore(
        5, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    assert saved_config == config


def test_dict_data_state_round_trips(tmp_path):
    data_state = {"epoch": 2, "offset": 17, "files": ["a", "b"]}
    with RunCheckpointer(tmp_path, save_every=1, keep_last=1, async_save=False) as ckpt:
        ckpt.maybe_save(1, _state(), data_state)
    with RunCheckpointer(tmp_path, save_every=1, keep_last=1) as ckpt:
        assert ckpt.restore_latest(_abstract(_state()))[2] == data_state


# When one TensorStore read fails, Orbax closes its event loop while the other reads
# are still in flight; their callbacks then hit the closed loop, harmlessly.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncate_arrays", "delete_arrays", "delete_data_file"])
def test_damaged_latest_step_falls_back(tmp_path, caplog, damage):
    with RunCheckpointer(tmp_path, save_every=1, keep_last=3) as ckpt:
        for step in (1, 2):
            ckpt.maybe_save(step, _state(seed=step), {"pos": step})
    if damage == "delete_data_file":
        (tmp_path / "2" / "data" / "process_0-of-1.json").unlink()
    else:
        array_files = [p for p in (tmp_path / "2" / "state").rglob("d/*") if p.is_file()]
        assert array_files
        for p in array_files:
            if damage == "truncate_arrays":
                os.truncate(p, p.stat().st_size // 2)
            else:
                p.unlink()

    with caplog.at_level(logging.WARNING), \
            RunCheckpointer(tmp_path, save_every=1, keep_last=3) as ckpt:
        step, restored, data = ckpt.restore_latest(_abstract(_state()))
        assert (step, data) == (1, {"pos": 1})
        _assert_same_state(restored, _state(seed=1))
        assert "checkpoint step 2" in caplog.text and "could not be restored" in caplog.text
        # Resumed from step 1, the run saves step 2 again over the damaged one.
        assert ckpt.maybe_save(2, _state(seed=5), {"pos": 2})
        ckpt.wait()
        step, restored, _ = ckpt.restore_latest(_abstract(_state()))
        assert step == 2
        _assert_same_state(restored, _state(seed=5))


def test_nothing_restorable_gives_none(tmp_path, caplog):
    with RunCheckpointer(tmp_path, save_every=1, keep_last=2) as ckpt:
        assert ckpt.restore_latest(_abstract(_state())) is None  # an empty directory
        ckpt.maybe_save(1, _state(), {"pos": 1})
    shutil.rmtree(tmp_path / "1" / "state")
    with caplog.at_level(logging.WARNING), \
            RunCheckpointer(tmp_path, save_every=1, keep_last=2) as ckpt:
        assert ckpt.restore_latest(_abstract(_state())) is None
    assert "none of the checkpoint steps [1]" in caplog.text


def test_partial_save_directory_is_ignored(tmp_path, caplog):
    with RunCheckpointer(tmp_path, save_every=1, keep_last=2) as ckpt:
        ckpt.maybe_save(1, _state(seed=1), {"pos": 1})
    # What a process killed while writing step 2 leaves behind.
    partial = tmp_path / "2.orbax-checkpoint-tmp-1732200000"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "_METADATA").write_text("{")
    with caplog.at_level(logging.WARNING), \
            RunCheckpointer(tmp_path, save_every=1, keep_last=2) as ckpt:
        assert ckpt.all_steps() == [1]
        step, restored, _ = ckpt.restore_latest(_abstract(_state()))
    assert step == 1
    _assert_same_state(restored, _state(seed=1))
    assert "could not be restored" not in caplog.text


def test_sigterm_sets_the_preemption_flag():
    before = signal.getsignal(signal.SIGTERM)
    with PreemptionGuard() as guard:
        assert not guard.preempted(0)
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not guard.preempted(1) and time.monotonic() < deadline:
            time.sleep(0.01)  # Python runs the handler between bytecodes of this thread
        assert guard.preempted(1)
    assert signal.getsignal(signal.SIGTERM) == before


def test_ctrl_c_stops_after_the_step_and_twice_at_once():
    before = signal.getsignal(signal.SIGINT)
    with PreemptionGuard() as guard:
        os.kill(os.getpid(), signal.SIGINT)
        deadline = time.monotonic() + 5
        while not guard.preempted(1) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert guard.preempted(1) and guard.reason == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            while time.monotonic() < deadline + 5:
                time.sleep(0.01)
    assert signal.getsignal(signal.SIGINT) == before


def test_saved_process_count_reads_the_data_files(tmp_path):
    with RunCheckpointer(tmp_path, save_every=1, keep_last=2) as ckpt:
        ckpt.maybe_save(1, _state(), {"pos": 1})
        ckpt.wait()
        assert ckpt.saved_process_count(1) == 1
        # What two processes leave: one data file each.
        data = tmp_path / "1" / "data"
        (data / "process_0-of-1.json").rename(data / "process_0-of-2.json")
        (data / "process_1-of-2.json").write_text("{}")
        assert ckpt.saved_process_count(1) == 2
        assert ckpt.saved_process_count(7) is None


class _Pending:
    def __await__(self):
        yield


async def _read_array_index_and_device_put():
    """Orbax's read coroutine as it fails when closed unfinished (serialization.py)."""
    try:
        await _Pending()
    except BaseException as e:
        raise Exception("Encountered error while reading array index: (slice(0, 32, 1),). "
                        "See full TensorStore details: {...}") from e


def test_quiet_libraries_drops_abandoned_orbax_reads(monkeypatch, capsys, request):
    """After a failed restore Orbax's other reads are closed unfinished; each reports an
    unraisable exception with the array's whole TensorStore spec. quiet_libraries drops
    those, and the closed event loop's, and keeps every other unraisable exception."""
    for name in ("absl", "asyncio"):
        logger = logging.getLogger(name)
        request.addfinalizer(functools.partial(logger.setLevel, logger.level))
    monkeypatch.setattr(sys, "unraisablehook", sys.unraisablehook)
    monkeypatch.setattr(warnings, "formatwarning", warnings.formatwarning)
    cli.quiet_libraries()

    async def other_coroutine():
        try:
            await _Pending()
        finally:
            raise ValueError("not Orbax's")

    for make in (_read_array_index_and_device_put, other_coroutine):
        coroutine = make()
        coroutine.send(None)  # suspended at its await, then dropped: Python closes it
        del coroutine
        gc.collect()
    sys.unraisablehook(types.SimpleNamespace(exc_type=RuntimeError, exc_value=RuntimeError(
        "Event loop is closed"), exc_traceback=None, err_msg=None, object=None))
    err = capsys.readouterr().err
    assert "not Orbax's" in err
    assert "Encountered error" not in err and "Event loop" not in err
