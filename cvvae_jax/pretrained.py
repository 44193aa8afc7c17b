"""Loading and saving shared by `CVVAE` and `ImageVAE`.

A model directory is either the official layout (`config.json` +
`diffusion_pytorch_model.safetensors`, as the official code and diffusers write
it) or ours (`config.json` + an Orbax `params/`). Loading builds the model
abstractly (`nnx.eval_shape`, no random init) and fills it from the file.
"""

from __future__ import annotations

import functools
import json
import weakref
from pathlib import Path
from typing import ClassVar, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import checkpoint, conv_forms, dtypes, weights
from .model_config import load_config
from .posterior import DiagonalGaussian


def _class_name(config_path: Path) -> str | None:
    try:
        return json.loads(config_path.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def resolve_dir(path: str | Path, subfolder: str | None, classes: Sequence[str] = ()) -> Path:
    """The model directory `path[/subfolder]`; where it has no config.json the error
    names the subfolders that hold a model, of one of `classes` if given."""
    d = Path(path) / subfolder if subfolder else Path(path)
    if (d / weights.CONFIG_NAME).is_file():
        return d
    if not Path(path).exists():
        hint = ""
        if "/" in str(path) and not str(path).startswith(("/", ".")):
            hint = (f"; it looks like a Hugging Face repo id, and nothing is downloaded at run time: "
                    f"fetch it first (huggingface-cli download {path} --local-dir DIR) and pass DIR")
        raise FileNotFoundError(f"no such directory: {path}{hint}")
    if Path(path).is_file():
        raise FileNotFoundError(f"{path} is a file; pass the model directory that holds "
                                f"{weights.CONFIG_NAME}: {Path(path).parent}")
    if subfolder and (Path(path) / weights.CONFIG_NAME).is_file():
        raise FileNotFoundError(f"no {weights.CONFIG_NAME} in {d}, but {path} holds a model itself: "
                                "leave the subfolder out")
    subs = {p.parent.name: _class_name(p) for p in sorted(Path(path).glob(f"*/{weights.CONFIG_NAME}"))}
    fitting = [name for name, cls in subs.items() if not classes or cls in classes]
    if fitting:
        hint = f"; set the subfolder to one of {fitting}"
    elif subs:
        hint = (f"; its subfolders hold other models ({', '.join(f'{n}: {c}' for n, c in subs.items())}), "
                f"not a {' or '.join(classes)}")
    else:
        hint = ""
    raise FileNotFoundError(f"no {weights.CONFIG_NAME} in {d}{hint}")


@functools.lru_cache(maxsize=None)
def jitted_part(graphdef: nnx.GraphDef, method: str, nested: bool = False):
    """`model.<method>(x)` as a pure jitted function of (state, x), one per model structure.

    jax caches one compilation per input shape, which is what makes every
    distinct chunk/tile shape compile once. `nested`: for a call under a transformation
    (jax.grad of the model's parameters), where a jit may not carry compiler options.
    """

    def run(state, x):
        return getattr(nnx.merge(graphdef, state), method)(x)

    return jax.jit(run, compiler_options=None if nested else conv_forms.compiler_options())


# model -> (its nnx.split, {method: bound jitted part}); entries go with their models.
_BOUND: "weakref.WeakKeyDictionary[nnx.Module, tuple]" = weakref.WeakKeyDictionary()


def _check_concrete(state: nnx.State) -> None:
    if any(isinstance(v, jax.ShapeDtypeStruct) for v in jax.tree.leaves(state)):
        raise TypeError("an abstract model (`abstract()`: shapes, no parameter values); load one "
                        "with from_pretrained or build one with from_config")


def bound_part(model: nnx.Module, method: str):
    """`model.<method>` as a jitted function of x alone, over a split of `model` made once.

    `nnx.split` walks the whole module graph, 9-13 ms for the full-size CV-VAE, and hashing
    its graphdef for `jitted_part` takes 2 ms more: on a GPU that was a third of a 17x256x256
    decode. The cached state holds the model's own Variables, so later changes of their
    values (`nnx.update`, loaded weights, new shardings) reach the calls; a model whose
    structure changes after its first call (a submodule or Variable replaced) needs a new one.
    """

    def call(x):
        # Inside the caller's own jit the network is traced into it: a nested jit may not
        # carry compiler options, which XLA:CPU's conv choice needs, and a split of a
        # model made of tracers is not worth keeping.
        if isinstance(x, jax.core.Tracer):
            return getattr(model, method)(x)
        if model not in _BOUND:
            graphdef, state = nnx.split(model)
            _check_concrete(state)
            if any(isinstance(v, jax.core.Tracer) for v in jax.tree.leaves(state)):
                # Parameters traced by a transformation outside any jit (jax.grad of them):
                # a fresh model each call, so nothing to keep.
                return jitted_part(graphdef, method, nested=True)(state, x)
            _BOUND[model] = ((graphdef, state), {})
        (graphdef, state), parts = _BOUND[model]
        if method not in parts:
            parts[method] = functools.partial(jitted_part(graphdef, method), state)
        return parts[method](x)

    return call


class Pretrained(nnx.Module):
    """Base of the public models: config-driven construction, load, save."""

    CONFIG_CLASSES: ClassVar[tuple[type, ...]] = ()

    def __init__(self, config, *, dtype, param_dtype, rngs: nnx.Rngs):
        raise NotImplementedError

    @classmethod
    def _check_config(cls, config, where: str):
        if not isinstance(config, cls.CONFIG_CLASSES):
            names = [c.__name__ for c in cls.CONFIG_CLASSES]
            if not hasattr(config, "CLASS_NAME"):
                raise TypeError(f"{where} is a {type(config).__name__}; {cls.__name__} takes one of "
                                f"{names} (from a dict: {names[0]}.from_dict(d))")
            raise ValueError(f"{where} holds a {config.CLASS_NAME}; {cls.__name__} loads "
                             f"{[c.CLASS_NAME for c in cls.CONFIG_CLASSES]}")

    @staticmethod
    def _dtypes(dtype, param_dtype):
        """Checked here so that a bad name fails at construction, not inside the first call."""
        return (dtypes.resolve(dtype, dtypes.COMPUTE, what="dtype"),
                dtypes.resolve(param_dtype, dtypes.STORAGE, what="param_dtype"))

    @classmethod
    def from_config(cls, config, *, dtype=jnp.float32, param_dtype=jnp.float32, seed: int = 0):
        """A randomly initialised model.

        The init key is an RBG key: XLA compiles threefry sampling ~8x slower on
        CPU, which dominated the start-up of small models.
        """
        cls._check_config(config, "the config")
        dtype, param_dtype = cls._dtypes(dtype, param_dtype)
        key = jax.random.key(seed, impl="rbg")
        return cls(config, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(key))

    @classmethod
    def abstract(cls, config, *, dtype=jnp.float32, param_dtype=jnp.float32):
        """The model with shape-only parameters: no memory, no init cost."""
        cls._check_config(config, "the config")
        dtype, param_dtype = cls._dtypes(dtype, param_dtype)
        return nnx.eval_shape(lambda: cls(config, dtype=dtype, param_dtype=param_dtype,
                                          rngs=nnx.Rngs(0)))

    @classmethod
    def from_pretrained(cls, path: str | Path, subfolder: str | None = None, *,
                        dtype=jnp.float32, param_dtype=jnp.float32):
        """Load an official-layout or Orbax model directory (see the module docstring)."""
        d = resolve_dir(path, subfolder, [c.CLASS_NAME for c in cls.CONFIG_CLASSES])
        config = load_config(d / weights.CONFIG_NAME)
        cls._check_config(config, str(d / weights.CONFIG_NAME))
        dtype, param_dtype = cls._dtypes(dtype, param_dtype)
        graphdef, abstract = nnx.split(cls.abstract(config, dtype=dtype, param_dtype=param_dtype))
        if checkpoint.is_orbax_dir(d):
            state = checkpoint.restore(d, abstract)
        else:
            file = weights.find_weights(d)
            state = weights.fill_state(abstract, weights.read_state_dict(file), source=str(file),
                                       param_dtype=param_dtype)
        return nnx.merge(graphdef, state)

    def state_dict(self, dtype=np.float32) -> dict[str, np.ndarray]:
        """The official PyTorch state dict (numpy arrays, torch layout) in `dtype`, one of
        dtypes.STORAGE (short names too)."""
        dtype = dtypes.resolve(dtype, dtypes.STORAGE, what="dtype")
        state = nnx.state(self)
        _check_concrete(state)
        return weights.to_state_dict(state, dtype)

    def save_pretrained(self, path: str | Path, *, dtype=np.float32) -> Path:
        """Write config.json + diffusion_pytorch_model.safetensors, the official layout.

        An Orbax checkpoint already in the directory is removed: `from_pretrained` would
        load it rather than these weights.
        """
        d = Path(path)
        state_dict = self.state_dict(dtype)  # a bad dtype fails before anything is written
        d.mkdir(parents=True, exist_ok=True)
        self.config.to_json(d / weights.CONFIG_NAME)
        weights.write_safetensors(d / weights.WEIGHTS_NAME, state_dict)
        checkpoint.remove(d)
        return d

    def save_orbax(self, path: str | Path) -> Path:
        """Write config.json + an Orbax checkpoint of the parameters; a safetensors file of
        the official layout already in the directory is removed, so that the directory
        holds one model whatever reads it."""
        d = Path(path)
        d.mkdir(parents=True, exist_ok=True)
        self.config.to_json(d / weights.CONFIG_NAME)
        checkpoint.save(d, nnx.state(self, nnx.Param))
        (d / weights.WEIGHTS_NAME).unlink(missing_ok=True)
        return d

    def num_params(self) -> int:
        return sum(int(np.prod(v.shape)) for _, v in weights.params_of(nnx.state(self)))


# Pixels are in [-1, 1]; the slack lets decoded frames, which overshoot a little, be encoded
# again, while frames in [0, 255] (any value above 1.5) are caught.
PIXEL_MAX_ABS = 1.5


@jax.jit
def _finite_and_peak(x):
    # One pass and one host sync for both checks (XLA:CPU's max drops NaNs, so it cannot
    # answer the first).
    return jnp.isfinite(x).all(), jnp.max(jnp.abs(x))


def check_pixels(x, *, name: str, rank: int, channels: int, layout: str,
                 max_abs: float | None = None) -> jax.Array:
    """Common checks on a float array in channels-last `layout`; returns a jax array.
    `max_abs` bounds |x| (PIXEL_MAX_ABS for pixels)."""
    if isinstance(x, DiagonalGaussian):
        raise TypeError(f"{name}: got the posterior (a DiagonalGaussian); pass its latents: "
                        "post.mode() or post.sample(key)")
    shape = tuple(np.shape(x))
    if len(shape) != rank:
        hint = ""
        if rank == 5 and len(shape) == 4:
            hint = "; for one video add a batch axis: x[None]; for a batch of images a time axis: x[:, None]"
        raise ValueError(f"{name}: expected a {rank}D array {layout}, got shape {shape}{hint}")
    if shape[-1] != channels:
        hint = ""
        if shape[1] == channels:
            hint = "; it looks channels-first, this API is channels-last (move axis 1 to the end)"
        raise ValueError(f"{name}: expected {channels} channels in the last axis of {layout}, "
                         f"got shape {shape}{hint}")
    if 0 in shape:
        raise ValueError(f"{name}: got an empty array, shape {shape} {layout}")
    dtype = np.asarray(x).dtype if not isinstance(x, jax.Array) else x.dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        if max_abs is None:
            raise ValueError(f"{name}: expected floating point values, got {dtype}")
        raise ValueError(f"{name}: expected floating point values in [-1, 1], got {dtype}; "
                         "for uint8 frames use x.astype(np.float32) / 127.5 - 1")
    x = jnp.asarray(x)
    if isinstance(x, jax.core.Tracer):
        return x
    checks = _finite_and_peak(x)
    if isinstance(checks[0], jax.core.Tracer):  # a constant inside a transformation: no values yet
        return x
    finite, peak = jax.device_get(checks)
    if not finite:
        raise ValueError(f"{name}: contains NaN or Inf values")
    if max_abs is not None and peak > max_abs:
        raise ValueError(f"{name}: expected pixels in [-1, 1], got values up to {peak:g} in magnitude; "
                         "for frames in [0, 255] use x / 127.5 - 1")
    return x
