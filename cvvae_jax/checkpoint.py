"""Model parameters as an Orbax checkpoint beside the official config.json.

Layout of a directory written by `save`: `config.json` (the official config)
and `params/` (an Orbax PyTree checkpoint of the parameters). `from_pretrained`
recognises it, so either format loads through the same call.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

PARAMS_DIR = "params"


def is_orbax_dir(directory: Path) -> bool:
    return (Path(directory) / PARAMS_DIR).is_dir()


def save(directory: Path, state: nnx.State) -> None:
    """Write the parameters of `state` under directory/params (overwriting)."""
    params = nnx.to_pure_dict(nnx.state(state, nnx.Param) if not isinstance(state, dict) else state)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(Path(directory).absolute() / PARAMS_DIR, params, force=True)


def restore(directory: Path, abstract: nnx.State) -> nnx.State:
    """Parameters restored into the structure, dtypes and shardings of `abstract`."""
    target = nnx.to_pure_dict(abstract)
    target = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=getattr(v, "sharding", None)),
                          target)
    with ocp.StandardCheckpointer() as ckptr:
        try:
            restored = ckptr.restore(Path(directory).absolute() / PARAMS_DIR, target)
        except (ValueError, KeyError, FileNotFoundError) as e:
            raise ValueError(f"could not restore the Orbax parameters in {directory}: {e}") from None
    state = nnx.State(abstract) if not isinstance(abstract, nnx.State) else abstract
    nnx.replace_by_pure_dict(state, restored)
    return state
