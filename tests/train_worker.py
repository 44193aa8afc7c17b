"""train.py with test hooks, for tests/test_train.py; same flags as train.py.

Each hook is off unless its environment variable is set:

CVVAE_TEST_DUMP=PATH         at the end of the run, writes the final train state's leaves
                             (by key path) to PATH.npz and their shardings to PATH.json
CVVAE_TEST_KILL_AT=N         SIGKILLs itself as soon as checkpoint step N is complete on
                             disk: an interruption between two checkpoints, at a known step
CVVAE_TEST_BATCH_DELAY_S=S   sleeps S seconds before each batch after the first, so that a
                             signal sent after step 1 arrives while the run is mid-flight
"""

import json
import os
import signal
import sys
import time

import jax
import numpy as np
from absl import app

import train
from cvvae_jax.data.pipeline import TrainPipeline
from cvvae_jax.run_checkpoint import RunCheckpointer
from cvvae_jax.trainer import Trainer


def _dump_state(path: str):
    export = Trainer.export

    def dumping_export(self, state):
        leaves, _ = jax.tree_util.tree_flatten_with_path(state)
        arrays, layout = {}, {}
        for key_path, x in leaves:
            name = jax.tree_util.keystr(key_path)
            arrays[name] = np.asarray(x)
            layout[name] = {"shape": list(x.shape), "spec": [str(a) for a in x.sharding.spec],
                            "shard_shape": list(x.addressable_shards[0].data.shape),
                            "devices": len(x.sharding.device_set)}
        np.savez(path + ".npz", **arrays)
        with open(path + ".json", "w") as f:
            json.dump(layout, f)
        export(self, state)

    Trainer.export = dumping_export


def _kill_after_save(kill_at: int):
    maybe_save = RunCheckpointer.maybe_save

    def killing_save(self, step, *args, **kwargs):
        saved = maybe_save(self, step, *args, **kwargs)
        if saved and step == kill_at:
            self.wait()  # the step is finalized: renamed from its tmp directory
            os.kill(os.getpid(), signal.SIGKILL)
        return saved

    RunCheckpointer.maybe_save = killing_save


def _delay_batches(seconds: float):
    next_batch = TrainPipeline.__next__

    def slow_next(self):
        if self.step >= 1:
            time.sleep(seconds)
        return next_batch(self)

    TrainPipeline.__next__ = slow_next


if __name__ == "__main__":
    if os.environ.get("CVVAE_TEST_DUMP"):
        _dump_state(os.environ["CVVAE_TEST_DUMP"])
    if os.environ.get("CVVAE_TEST_KILL_AT"):
        _kill_after_save(int(os.environ["CVVAE_TEST_KILL_AT"]))
    if os.environ.get("CVVAE_TEST_BATCH_DELAY_S"):
        _delay_batches(float(os.environ["CVVAE_TEST_BATCH_DELAY_S"]))
    app.run(lambda argv: sys.exit(train.main(argv)))
