"""LPIPS, the learned perceptual distance of Zhang et al. (2018), on the VGG16 trunk.

The numbers are those of the `lpips` package v0.1 with net='vgg' and of its copy in
the official CV-VAE training code (lvdm/modules/autoencoding/lpips): scale the
[-1, 1] inputs, run torchvision's VGG16 `features` up to relu5_3, unit-normalise
each of relu1_2 ... relu5_3 over channels, weight the squared differences with the
five learned 1x1 heads, average over space and sum over the layers.

Two weight files, both in the official key names and torch layout:
- the heads (lpips v0.1 `weights/v0.1/vgg.pth`, 1,472 numbers, BSD-2-Clause) ship
  in assets/lpips/;
- the VGG16 trunk (ImageNet weights, 14.7 M parameters) does not: pass a torchvision
  `vgg16` state dict (.pth, needs torch to read) or a .safetensors/.npz made from it,
  which reading needs no torch:

    python -m cvvae_jax.lpips convert-vgg vgg16-397923af.pth vgg16_features.safetensors
    python -m cvvae_jax.lpips convert-heads lpips/weights/v0.1/vgg.pth vgg_v0.1.safetensors

`convert-heads` is how the bundled heads were made. Failures print one `error: ...`
line and exit with status 2.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from . import weights
from .layers import Dtype, conv2d

HEADS_FILE = Path(__file__).resolve().parent / "assets" / "lpips" / "vgg_v0.1.safetensors"
CONFIG_KEY = "config.loss.lpips_vgg_path"
TORCH_SUFFIXES = (".pth", ".pt", ".bin")
WRITE_SUFFIXES = (".safetensors", ".npz")

# lpips' ScalingLayer: takes [-1, 1] inputs to roughly ImageNet-normalised ones.
SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
SCALE = np.array([0.458, 0.448, 0.450], np.float32)
EPS = 1e-10

# torchvision vgg16().features up to relu5_3, per stage: (width, Sequential indices of its
# 3x3 convs). A ReLU follows every conv, a 2x2 max pool opens every stage but the first,
# and LPIPS reads the last ReLU of each stage.
VGG16_STAGES = ((64, (0, 2)), (128, (5, 7)), (256, (10, 12, 14)), (512, (17, 19, 21)),
                (512, (24, 26, 28)))
# Four pools come before relu5_3; a smaller image leaves it empty and its mean NaN.
MIN_SIZE = 16
# torchvision's vgg16 state dict also holds the classifier, which LPIPS never runs.
IGNORED_PREFIX = "classifier."

_warned_disabled = False


class LinearHead(nnx.Module):
    """lpips' `NetLinLayer`: a 1x1 conv to one channel without bias, run in float32."""

    def __init__(self, channels: int, *, param_dtype: Dtype, rngs: nnx.Rngs):
        # Key "1" because the reference Sequential holds a Dropout (identity in eval) at 0.
        self.model = nnx.Dict({"1": nnx.Conv(channels, 1, (1, 1), use_bias=False,
                                             dtype=jnp.float32, param_dtype=param_dtype,
                                             rngs=rngs)})

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.model["1"](x)


def max_pool2(x: jax.Array) -> jax.Array:
    """torch's MaxPool2d(2, 2) of (N, H, W, C): an odd last row or column is dropped.

    A max over a reshape, not `lax.reduce_window`: autodiff of the window max made XLA:CPU
    build an s32 index array per input axis at the input's size (4 x 570 MB alive together
    for the first pool over 34 frames of 256x256 in the paper-width train step); a reduce
    max's gradient needs only the input and the result. They differ only where a window
    holds equal maxima (the gradient is split between them instead of sent to one)."""
    n, h, w, c = x.shape
    x = x[:, : h - h % 2, : w - w % 2]
    return x.reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))


def unit_normalize(f: jax.Array) -> jax.Array:
    """The CV-VAE copy's `normalize_tensor`. lpips 0.1.4 leaves the eps out of the sqrt,
    which changes values by ~1e-10 but gives NaN gradients at an all-zero feature
    vector, common after ReLU; this form keeps them finite."""
    return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True) + EPS) + EPS)


class LPIPS(nnx.Module):
    """LPIPS(net='vgg', version='0.1') distances between two image batches.

    The parameter paths are the official keys: `features.N.*` (torchvision's VGG16) and
    `linK.model.1.weight` (the lpips heads). The weights are meant to stay frozen: call it
    through `lpips_distance`, which stops their gradients, or treat the state as constant.
    """

    def __init__(self, *, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
                 rngs: nnx.Rngs):
        kw = {"dtype": dtype, "param_dtype": param_dtype, "rngs": rngs}
        convs, cin = {}, 3
        for width, indices in VGG16_STAGES:
            for i in indices:
                convs[str(i)] = conv2d(cin, width, 3, **kw)
                cin = width
        self.features = nnx.Dict(convs)
        self.lin0, self.lin1, self.lin2, self.lin3, self.lin4 = (
            LinearHead(width, param_dtype=param_dtype, rngs=rngs) for width, _ in VGG16_STAGES)
        self.dtype = dtype

    def taps(self, x: jax.Array) -> list[jax.Array]:
        """relu1_2 ... relu5_3 of (N, H, W, 3) images, unit-normalised, in float32."""
        h = (x.astype(jnp.float32) - SHIFT) / SCALE
        h, out = h.astype(self.dtype), []
        for stage, (_, indices) in enumerate(VGG16_STAGES):
            if stage:
                h = max_pool2(h)
            for i in indices:
                h = jax.nn.relu(self.features[str(i)](h))
            out.append(unit_normalize(h.astype(jnp.float32)))
        return out

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        """x, y: (..., H, W, 3) in [-1, 1], H and W >= 16 -> (...) float32 distances,
        e.g. (N, H, W, 3) -> (N,)."""
        if x.shape != y.shape or x.ndim < 3 or x.shape[-1] != 3:
            raise ValueError(f"LPIPS compares two (..., H, W, 3) arrays of one shape; "
                             f"got {x.shape} and {y.shape}")
        if min(x.shape[-3:-1]) < MIN_SIZE:
            raise ValueError(f"LPIPS needs H and W >= {MIN_SIZE} (VGG16 pools 4 times before "
                             f"relu5_3); got {x.shape[-3:-1]}")
        lead, n = x.shape[:-3], int(np.prod(x.shape[:-3]))
        # A VGG pass per side, not one over both batches: in training only y (the
        # reconstruction) takes a gradient, and autodiff of a joint pass keeps both
        # halves' activations for the backward pass (for a 17x256x256 clip, 544 MiB
        # buffers of 34 frames at relu1_2 where the 17 of y need 272 MiB).
        total = jnp.zeros(n, jnp.float32)
        heads = (self.lin0, self.lin1, self.lin2, self.lin3, self.lin4)
        taps = zip(self.taps(x.reshape(n, *x.shape[-3:])), self.taps(y.reshape(n, *y.shape[-3:])))
        for (fx, fy), head in zip(taps, heads):
            total = total + head((fx - fy) ** 2).mean(axis=(1, 2, 3))
        return total.reshape(lead)


def lpips_distance(graphdef: nnx.GraphDef, state: nnx.State, x: jax.Array,
                   y: jax.Array) -> jax.Array:
    """`LPIPS.__call__` of a split model, for jitted steps; gradients reach x and y only.

    Pass `nnx.split(model)` in as arguments: closed over, the 59 MB of VGG weights would
    be baked into the compiled program as constants.
    """
    return nnx.merge(graphdef, jax.lax.stop_gradient(state))(x, y)


def _abstract(dtype: Dtype, param_dtype: Dtype) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, trunk, heads) of a shape-only LPIPS."""
    model = nnx.eval_shape(lambda: LPIPS(dtype=dtype, param_dtype=param_dtype,
                                         rngs=nnx.Rngs(0)))
    return nnx.split(model, lambda path, _: path[0] == "features", ...)


def _read_torch(file: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise weights.WeightsError(
            f"{file} is a PyTorch pickle and reading it needs torch; convert it once where "
            f"torch is installed (python -m cvvae_jax.lpips convert-vgg {file} "
            "vgg16_features.safetensors) and use the result") from None
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad pickles
        raise weights.WeightsError(f"could not read {file}: {e}") from None
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise weights.WeightsError(f"{file} holds a {type(sd).__name__}, not a state dict "
                                   "(a flat mapping of names to tensors)")
    return {k: v.float().numpy() if v.is_floating_point() else v.numpy() for k, v in sd.items()}


def _read_npz(file: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(file) as f:
            return {k: f[k] for k in f.files}
    except (OSError, ValueError) as e:  # BadZipFile is an OSError
        raise weights.WeightsError(f"could not read {file} (corrupt or not an .npz?): {e}") from None


def read_weights(file: str | Path) -> dict[str, np.ndarray]:
    """A state dict from .safetensors or .npz (no torch needed) or .pth/.pt/.bin (torch)."""
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"weights file not found: {file}")
    if file.suffix in TORCH_SUFFIXES:
        return _read_torch(file)
    if file.suffix == ".npz":
        return _read_npz(file)
    if file.suffix == ".safetensors":
        return weights.read_state_dict(file)
    raise weights.WeightsError(f"{file}: unknown weights format {file.suffix!r}; expected one of "
                               f"{', '.join((*TORCH_SUFFIXES, *WRITE_SUFFIXES))}")


def read_vgg16(file: str | Path) -> dict[str, np.ndarray]:
    """The `features.*` tensors of a torchvision vgg16 state dict or of its conversion."""
    return {k: v for k, v in read_weights(file).items() if not k.startswith(IGNORED_PREFIX)}


def _warn_disabled() -> None:
    global _warned_disabled
    if not _warned_disabled:
        _warned_disabled = True
        warnings.warn(f"no VGG16 weights for LPIPS: the perceptual loss term is switched off. "
                      f"Set {CONFIG_KEY} to a torchvision vgg16 state dict (.pth) or to its "
                      "conversion by `python -m cvvae_jax.lpips convert-vgg`", stacklevel=3)


def load_lpips(vgg_path: str | Path | None, *, dtype: Dtype = jnp.float32,
               param_dtype: Dtype = jnp.float32) -> LPIPS | None:
    """LPIPS with the VGG16 trunk from `vgg_path` and the bundled v0.1 heads.

    None (or "") means no trunk: warns once per process that the perceptual term is off
    and returns None. A missing or mismatched file raises (FileNotFoundError, WeightsError).
    """
    if vgg_path is None or vgg_path == "":
        _warn_disabled()
        return None
    graphdef, trunk, heads = _abstract(dtype, param_dtype)
    trunk = weights.fill_state(trunk, read_vgg16(vgg_path), source=f"VGG16 weights {vgg_path}",
                               param_dtype=param_dtype)
    heads = weights.fill_state(heads, weights.read_state_dict(HEADS_FILE), source=str(HEADS_FILE),
                               param_dtype=param_dtype)
    return nnx.merge(graphdef, trunk, heads)


def convert(src: Path, dst: Path, *, part: str) -> dict[str, np.ndarray]:
    """Check the VGG16 trunk (part="vgg") or the lpips heads (part="heads") in `src` and
    write them to `dst` (.safetensors or .npz) with their keys and torch layout."""
    if dst.suffix not in WRITE_SUFFIXES:
        raise ValueError(f"DST must end in {' or '.join(WRITE_SUFFIXES)}; got {dst.name}")
    _, trunk, heads = _abstract(jnp.float32, jnp.float32)
    state_dict = read_vgg16(src) if part == "vgg" else read_weights(src)
    weights.check_state_dict(trunk if part == "vgg" else heads, state_dict, source=str(src))
    if dst.suffix == ".npz":
        np.savez(dst, **state_dict)
    else:
        weights.write_safetensors(dst, state_dict)
    return state_dict


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cvvae_jax.lpips", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("convert-vgg", help="torchvision vgg16 state dict -> features.* only")
    b = sub.add_parser("convert-heads", help="lpips v0.1 vgg.pth -> the bundled heads file")
    for s in (a, b):
        s.add_argument("src", type=Path, metavar="SRC", help=".pth/.pt/.bin, .safetensors or .npz")
        s.add_argument("dst", type=Path, metavar="DST", help=".safetensors or .npz")
        s.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.dst.exists() and not args.overwrite:
            raise FileExistsError(f"{args.dst} exists; pass --overwrite to replace it")
        if args.dst.exists() and args.src.exists() and args.dst.samefile(args.src):
            raise ValueError(f"SRC and DST are the same file ({args.dst})")
        state_dict = convert(args.src, args.dst,
                             part="vgg" if args.command == "convert-vgg" else "heads")
    except Exception as e:  # noqa: BLE001 - a CLI failure is one line, whatever raised it
        message = " ".join(str(e).split()) or type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2
    n = sum(a.size for a in state_dict.values())
    print(f"wrote {len(state_dict)} tensors ({n:,} parameters) -> {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
