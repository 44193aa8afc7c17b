"""Model parameters as an Orbax checkpoint beside the official config.json.

A directory written by `Pretrained.save_orbax` holds `config.json` (the
official config) and `params/` (an Orbax PyTree checkpoint of the parameters);
`from_pretrained` recognises it, so either format loads through the same call.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx, traverse_util

from . import weights

PARAMS_DIR = "params"


def _params_path(directory: Path) -> Path:
    # Orbax refuses relative paths.
    return Path(directory).absolute() / PARAMS_DIR


def is_orbax_dir(directory: Path) -> bool:
    return _params_path(directory).is_dir()


def remove(directory: Path) -> None:
    """Deletes the Orbax checkpoint in a model directory, if there is one."""
    if is_orbax_dir(directory):
        shutil.rmtree(_params_path(directory))


def save(directory: Path, params: nnx.State) -> None:
    """Write `params` under directory/params, replacing an earlier checkpoint there."""
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(_params_path(directory), nnx.to_pure_dict(params), force=True)


def _as_torch_shapes(saved_tree: dict) -> dict[str, jax.ShapeDtypeStruct]:
    """Saved parameter shapes keyed and laid out like a torch state dict, so the
    checks (and messages) of `weights.check_state_dict` apply to Orbax too."""
    return {
        weights.torch_key(path): jax.ShapeDtypeStruct(
            weights.torch_shape(str(path[-1]), tuple(v.shape)), np.float32)
        for path, v in traverse_util.flatten_dict(saved_tree).items()
    }


def _restore_args(v) -> ocp.RestoreArgs:
    sharding = getattr(v, "sharding", None)
    if sharding is None:
        # A host array, placed by jax like the safetensors path does: uncommitted, so it
        # follows a jit's shardings instead of staying pinned to the device it was saved from.
        return ocp.RestoreArgs(restore_type=np.ndarray, dtype=v.dtype)
    return ocp.ArrayRestoreArgs(sharding=sharding, dtype=v.dtype)


def restore(directory: Path, abstract: nnx.State) -> nnx.State:
    """The saved parameters in the structure, dtypes and shardings of `abstract`.

    `abstract` is a state of `jax.ShapeDtypeStruct`s (`nnx.eval_shape`) or of
    arrays; each leaf is cast to its dtype and placed with its sharding, if it
    has one. The caller's `abstract` is left unchanged.
    """
    target = nnx.to_pure_dict(abstract)
    path = _params_path(directory)
    with ocp.PyTreeCheckpointer() as ckptr:
        try:
            saved = ckptr.metadata(path).item_metadata
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"{path} is not a readable Orbax checkpoint: {e}") from None
        if saved is None:
            raise ValueError(f"{path} is not a complete Orbax checkpoint (no metadata)")
        weights.check_state_dict(abstract, _as_torch_shapes(saved.tree),
                                 source=f"the Orbax parameters in {directory}")
        args = ocp.args.PyTreeRestore(target, restore_args=jax.tree.map(_restore_args, target))
        try:
            restored = ckptr.restore(path, args=args)
        except Exception as e:  # TensorStore read failures surface as a bare Exception
            # Keep the first sentence; the rest is a dump of the TensorStore spec.
            reason = str(e).partition(" See full TensorStore")[0].splitlines()[0][:300]
            raise ValueError(f"could not read the Orbax parameters in {path} (corrupt?): "
                             f"{reason}") from None
    state = jax.tree.map(lambda v: v, abstract)  # new Variables: `abstract` stays abstract
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, restored))
    return state
