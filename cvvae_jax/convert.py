"""Convert model directories between the official layout and ours (Orbax).

    python -m cvvae_jax.convert to-orbax CV-VAE/ out/cvvae_orbax --subfolder vae3d
    python -m cvvae_jax.convert to-pytorch out/cvvae_orbax out/cvvae_pt --dtype float16

`to-orbax` reads `config.json` + `diffusion_pytorch_model.safetensors` (or
`.bin`, with torch installed); `to-pytorch` writes that layout back from an
Orbax directory. The model class comes from config.json's `_class_name`, so
every CV-VAE variant and the SD image VAE convert the same way. Failures print
one `error: ...` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from . import checkpoint, cli, weights
from .image_vae import ImageVAE
from .model_config import load_config
from .pretrained import resolve_dir
from .vae import CVVAE

DTYPES = {"float32": np.float32, "float16": np.float16, "bfloat16": jnp.bfloat16}
# What either layout may have left in DST; --overwrite removes only these, so a stale
# params/ can never shadow a freshly written safetensors (from_pretrained prefers Orbax).
MODEL_FILES = (weights.CONFIG_NAME, weights.WEIGHTS_NAME, weights.BIN_NAME, checkpoint.PARAMS_DIR)


def model_class(config) -> type:
    return next(cls for cls in (CVVAE, ImageVAE) if isinstance(config, cls.CONFIG_CLASSES))


def _si(x: float, unit: str = "") -> str:
    sep = " " if unit else ""
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if x >= scale:
            return f"{x / scale:.1f}{sep}{prefix}{unit}"
    return f"{x:g}{sep}{unit}"


def check_dst(dst: Path, src: Path, overwrite: bool) -> None:
    if dst.resolve() == src.resolve():
        raise ValueError(f"SRC and DST are the same directory ({dst}); write to a new one")
    if dst.exists() and not dst.is_dir():
        raise FileExistsError(f"{dst} exists and is not a directory")
    if not overwrite and dst.is_dir() and any(dst.iterdir()):
        raise FileExistsError(f"{dst} is not empty; pass --overwrite to replace the model in it")


def clear_dst(dst: Path) -> None:
    for name in MODEL_FILES:
        p = dst / name
        shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
    dst.mkdir(parents=True, exist_ok=True)


def to_orbax(src: Path, dst: Path, *, subfolder: str | None) -> tuple:
    d = resolve_dir(src, subfolder)
    config = load_config(d / weights.CONFIG_NAME)
    graphdef, abstract = nnx.split(model_class(config).abstract(config))
    file = weights.find_weights(d)
    state_dict = weights.read_state_dict(file)
    weights.check_state_dict(abstract, state_dict, source=str(file))
    flat = list(tqdm(weights.iter_filled(abstract, state_dict, param_dtype=jnp.float32),
                     total=len(state_dict), desc="to-orbax", unit="tensor"))
    model = nnx.merge(graphdef, nnx.from_flat_state(flat))
    clear_dst(dst)
    model.save_orbax(dst)
    arrays = [v.get_value() for _, v in weights.params_of(nnx.state(model))]
    return config, arrays


def to_pytorch(src: Path, dst: Path, *, dtype) -> tuple:
    d = resolve_dir(src, None)
    if not checkpoint.is_orbax_dir(d):
        raise ValueError(f"{d} has no {checkpoint.PARAMS_DIR}/ (not an Orbax model directory); "
                         "to-pytorch reads what to-orbax writes")
    config = load_config(d / weights.CONFIG_NAME)
    state = nnx.state(model_class(config).from_pretrained(d))
    n = sum(1 for _ in weights.params_of(state))
    state_dict = dict(tqdm(weights.iter_state_dict(state, dtype), total=n, desc="to-pytorch",
                           unit="tensor"))
    clear_dst(dst)
    config.to_json(dst / weights.CONFIG_NAME)
    weights.write_safetensors(dst / weights.WEIGHTS_NAME, state_dict)
    return config, list(state_dict.values())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cvvae_jax.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("to-orbax",
                       help="official layout (safetensors/.bin) -> config.json + params/")
    a.add_argument("--subfolder", help="model folder inside SRC, e.g. vae3d, vae3d_v1-1, vae3d_sd3")
    b = sub.add_parser("to-pytorch", help="config.json + params/ -> official layout (safetensors)")
    b.add_argument("--dtype", choices=sorted(DTYPES), default="float32",
                   help="dtype of the written tensors (default: float32)")
    for s in (a, b):
        s.add_argument("src", type=Path, metavar="SRC")
        s.add_argument("dst", type=Path, metavar="DST")
        s.add_argument("--overwrite", action="store_true",
                       help="replace the model files in a non-empty DST")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()

    def convert() -> None:
        src = args.src / (getattr(args, "subfolder", None) or "")
        check_dst(args.dst, src, args.overwrite)  # before any slow work
        if args.command == "to-orbax":
            config, arrays = to_orbax(args.src, args.dst, subfolder=args.subfolder)
        else:
            config, arrays = to_pytorch(args.src, args.dst, dtype=DTYPES[args.dtype])
        n = sum(int(np.prod(a.shape)) for a in arrays)
        nbytes = sum(a.nbytes for a in arrays)
        print(f"converted {config.CLASS_NAME}: {len(arrays)} tensors, {_si(n)} parameters, "
              f"{_si(nbytes, 'B')} -> {args.dst} ({time.perf_counter() - start:.1f} s)")

    return cli.run(convert)


if __name__ == "__main__":
    sys.exit(main())
