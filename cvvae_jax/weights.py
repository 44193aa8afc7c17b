"""PyTorch state dicts <-> NNX state, with no torch needed for safetensors.

Our modules mirror the official attribute names, so the torch key of a
parameter is its NNX path joined with dots, with `kernel`/`scale` read as
`weight`. Layouts differ only by a transpose: torch kernels are
(O, I, *spatial), ours (*spatial, I, O).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import jax
import numpy as np
from flax import nnx

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
BIN_NAME = "diffusion_pytorch_model.bin"
CONFIG_NAME = "config.json"

_TORCH_LEAF = {"kernel": "weight", "scale": "weight", "bias": "bias"}


class WeightsError(ValueError):
    """A weights file that does not fit the model (missing/unexpected keys, shapes)."""


def torch_key(path: tuple) -> str:
    *head, leaf = (str(p) for p in path)
    return ".".join([*head, _TORCH_LEAF[leaf]])


def to_torch_layout(kind: str, a: np.ndarray) -> np.ndarray:
    """(*spatial, I, O) kernels and (I, O) linears -> torch's (O, I, *spatial)."""
    if kind != "kernel":
        return a
    r = a.ndim
    return np.ascontiguousarray(a.transpose(r - 1, r - 2, *range(r - 2)))


def from_torch_layout(kind: str, a: np.ndarray) -> np.ndarray:
    if kind != "kernel":
        return a
    r = a.ndim
    return np.ascontiguousarray(a.transpose(*range(2, r), 1, 0))


def torch_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if kind != "kernel":
        return tuple(shape)
    return (shape[-1], shape[-2], *shape[:-2])


def params_of(state: nnx.State) -> Iterator[tuple[tuple, nnx.Variable]]:
    """(path, variable) for every parameter, in a stable order."""
    for path, var in sorted(nnx.to_flat_state(state), key=lambda kv: tuple(map(str, kv[0]))):
        if isinstance(var, nnx.Param):
            yield path, var


def expected_torch_shapes(state: nnx.State) -> dict[str, tuple[int, ...]]:
    """The official state-dict keys and shapes of a (possibly abstract) model state."""
    return {torch_key(p): torch_shape(str(p[-1]), tuple(v.shape)) for p, v in params_of(state)}


def find_weights(directory: Path) -> Path:
    for name in (WEIGHTS_NAME, BIN_NAME):
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(
        f"no {WEIGHTS_NAME} (or {BIN_NAME}) in {directory}; found: "
        f"{sorted(p.name for p in directory.iterdir()) if directory.is_dir() else 'no such directory'}"
    )


def read_state_dict(file: Path) -> dict[str, np.ndarray]:
    """Read a safetensors (any float dtype) or, if torch is installed, a .bin state dict."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"weights file not found: {file}")
    if file.suffix == ".bin":
        return _read_bin(file)
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"could not read {file} (corrupt or truncated safetensors?): {e}") from None


def _read_bin(file: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise WeightsError(
            f"{file} is a PyTorch pickle; reading it needs torch (pip install torch==2.13.0), "
            "or convert it to diffusion_pytorch_model.safetensors first"
        ) from None
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for bad pickles
        raise WeightsError(f"could not read {file}: {e}") from None
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in sd.items()}


def _listing(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_state_dict(abstract: nnx.State, state_dict: dict[str, np.ndarray], *,
                     source: str) -> None:
    """Every parameter must be present with the right shape and nothing extra may
    remain: a partial load is an error naming the keys."""
    expected = expected_torch_shapes(abstract)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}): {_listing(missing)}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
        raise WeightsError(f"{source} does not match the model config: " + "; ".join(parts))
    for key, shape in expected.items():
        if tuple(state_dict[key].shape) != shape:
            raise WeightsError(f"{source}: {key} has shape {tuple(state_dict[key].shape)}, "
                               f"the model expects {shape}")


def iter_filled(abstract: nnx.State, state_dict: dict[str, np.ndarray], *,
                param_dtype) -> Iterator[tuple[tuple, nnx.Variable]]:
    """(path, concrete variable) of a checked state dict, one tensor at a time."""
    for path, var in nnx.to_flat_state(abstract):
        if isinstance(var, nnx.Param):
            a = from_torch_layout(str(path[-1]), np.asarray(state_dict[torch_key(path)]))
            var = var.replace(jax.numpy.asarray(a.astype(param_dtype)))
        yield path, var


def fill_state(abstract: nnx.State, state_dict: dict[str, np.ndarray], *, source: str,
               param_dtype) -> nnx.State:
    """Concrete state from an abstract one (`nnx.eval_shape`) and a torch state dict."""
    check_state_dict(abstract, state_dict, source=source)
    return nnx.from_flat_state(list(iter_filled(abstract, state_dict, param_dtype=param_dtype)))


def iter_state_dict(state: nnx.State, dtype=np.float32) -> Iterator[tuple[str, np.ndarray]]:
    """(torch key, tensor in torch layout) for every parameter, one at a time."""
    for p, v in params_of(state):
        a = np.asarray(jax.device_get(v.get_value()))
        yield torch_key(p), to_torch_layout(str(p[-1]), a).astype(dtype)


def to_state_dict(state: nnx.State, dtype=np.float32) -> dict[str, np.ndarray]:
    """The official state dict (torch layout, numpy) of a model state."""
    return dict(iter_state_dict(state, dtype))


def write_safetensors(file: Path, state_dict: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in state_dict.items()}, str(file),
              metadata={"format": "pt"} if metadata is None else metadata)
    # safetensors creates its files 0600; give them the mode open() would, so that a shared
    # model directory stays readable by the others who use it.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(file, 0o666 & ~umask)
