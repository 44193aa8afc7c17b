"""Convert model directories between the official layout and ours (Orbax).

    python -m cvvae_jax.convert to-orbax CV-VAE/ out/cvvae_orbax --subfolder vae3d
    python -m cvvae_jax.convert to-pytorch out/cvvae_orbax out/cvvae_pt --dtype float16
    python -m cvvae_jax.convert to-pytorch runs/cvvae out/cvvae_pt --params ema

`to-orbax` reads `config.json` + `diffusion_pytorch_model.safetensors` (or
`.bin`, with torch installed); `to-pytorch` writes that layout back from an
Orbax directory, or from a train.py checkpoint (a workdir, its checkpoints/,
or one step in there; the newest step unless one is named): the autoencoder's
EMA or raw parameters, plus the discriminator in the official key layout
(`discriminator.safetensors`, its constructor arguments in
`discriminator_config.json`). The model class comes from config.json's
`_class_name`, so every CV-VAE variant and the SD image VAE convert the same
way. Failures print one `error: ...` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import functools
import json
import operator
import shutil
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from flax import nnx, traverse_util
from tqdm import tqdm

from . import checkpoint, cli, dtypes, weights
from .discriminator import NLayerDiscriminator3D, official_params
from .image_vae import ImageVAE
from .model_config import load_config
from .pretrained import resolve_dir
from .train_models import initial_config
from .vae import CVVAE

DISC_WEIGHTS_NAME = "discriminator.safetensors"
DISC_CONFIG_NAME = "discriminator_config.json"
# What either layout may have left in DST; --overwrite removes only these, so a stale
# params/ can never shadow a freshly written safetensors (from_pretrained prefers Orbax).
MODEL_FILES = (weights.CONFIG_NAME, weights.WEIGHTS_NAME, weights.BIN_NAME, checkpoint.PARAMS_DIR,
               DISC_WEIGHTS_NAME, DISC_CONFIG_NAME)
# Our NLayerDiscriminator3D arguments -> the official ones (the YAML's discriminator params).
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
                         "to-pytorch reads what to-orbax or train.py writes")
    config = load_config(d / weights.CONFIG_NAME)
    state = nnx.state(model_class(config).from_pretrained(d))
    n = sum(1 for _ in weights.params_of(state))
    state_dict = dict(tqdm(weights.iter_state_dict(state, dtype), total=n, desc="to-pytorch",
                           unit="tensor"))
    clear_dst(dst)
    config.to_json(dst / weights.CONFIG_NAME)
    weights.write_safetensors(dst / weights.WEIGHTS_NAME, state_dict)
    return config, list(state_dict.values())


# -- train.py checkpoints ---------------------------------------------------------------


def checkpoint_step(src: Path) -> Path | None:
    """The step directory that SRC names: itself, or the newest step of SRC/checkpoints/ or
    of SRC; None when SRC is no train.py checkpoint."""
    if (src / "state").is_dir():
        return src
    for manager_dir in (src / "checkpoints", src):
        steps = [p for p in manager_dir.glob("*") if p.name.isdigit() and (p / "state").is_dir()]
        if steps:
            return max(steps, key=lambda p: int(p.name))
    return None


class _ImageVAEConfig:
    """What `train_models.initial_config` reads of the image VAE, its config: read only if the run
    inflated its autoencoder from it."""

    def __init__(self, path: str, subfolder: str | None):
        self._path, self._subfolder = path, subfolder

    @property
    def config(self):
        return load_config(resolve_dir(self._path, self._subfolder) / weights.CONFIG_NAME)


def checkpoint_model_config(train_config: ml_collections.ConfigDict):
    """The autoencoder's model config, derived from the run's config as train.py derived it:
    from `init_from`, the inflated image VAE, or `model.config`."""
    image_vae = train_config.image_vae
    stub = _ImageVAEConfig(image_vae.path, image_vae.subfolder or None) if image_vae.path else None
    try:
        return initial_config(train_config, stub)
    except FileNotFoundError as e:
        raise FileNotFoundError(
            f"{e}; the run's model config came from there: pass --model-config with the "
            "autoencoder's config.json (e.g. the run's export/config.json)") from None


def _check_saved(saved: dict, key: tuple[str, ...], *, abstract: nnx.State, source: str) -> None:
    """Checks a part of the saved state against the model, with the messages of weights.py."""
    tree = functools.reduce(operator.getitem, key, saved)
    # nnx Variables are saved as a node whose only leaf is `value`.
    shapes = {weights.torch_key(path[:-1]): jax.ShapeDtypeStruct(
        weights.torch_shape(str(path[-2]), tuple(v.shape)), np.float32)
        for path, v in traverse_util.flatten_dict(tree).items()}
    weights.check_state_dict(abstract, shapes, source=source)


def _first_line(e: Exception) -> str:
    # TensorStore appends a multi-kilobyte spec dump to its messages.
    lines = str(e).partition(" See full TensorStore")[0].splitlines()
    return lines[0][:300] if lines else type(e).__name__


def restore_checkpoint(step_dir: Path, *, params: str | None, model_config: Path | None):
    """(train config, model config, which params, autoencoder state, discriminator state) of a
    train.py checkpoint step; only those two parts are read (Orbax partial restore)."""
    step_dir = step_dir.absolute()  # Orbax refuses relative paths
    try:
        with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as ckptr:
            train_config = ml_collections.ConfigDict(ckptr.restore(step_dir / "config"))
        with ocp.PyTreeCheckpointer() as ckptr:
            saved = ckptr.metadata(step_dir / "state").item_metadata
    except (ValueError, FileNotFoundError, OSError) as e:
        raise ValueError(f"{step_dir} is not a readable train.py checkpoint step: "
                         f"{_first_line(e)}") from None
    if saved is None:
        raise ValueError(f"could not read the parameters in {step_dir} (corrupt?): "
                         "no readable metadata")
    saved = saved.tree
    which = params or ("ema" if "ema" in saved else "raw")
    key = ("ema",) if which == "ema" else ("gen", "vae")  # TrainState's fields
    if key[0] not in saved:
        raise ValueError(f"{step_dir} holds no {which} parameters (saved: {sorted(saved)})")
    config = (load_config(model_config) if model_config
              else checkpoint_model_config(train_config))
    _, vae = nnx.split(model_class(config).abstract(config))
    _, disc = nnx.split(nnx.eval_shape(
        lambda: NLayerDiscriminator3D(**train_config.disc, rngs=nnx.Rngs(0))))
    _check_saved(saved, key, abstract=vae, source=f"the {which} parameters in {step_dir}")
    _check_saved(saved, ("disc",), abstract=disc,
                 source=f"the discriminator parameters in {step_dir}")
    target = {key[0]: {key[1]: vae} if len(key) == 2 else vae, "disc": disc}
    # Host arrays: a model of any size converts on any machine, whatever mesh it trained on.
    restore_args = jax.tree.map(lambda v: ocp.RestoreArgs(restore_type=np.ndarray, dtype=v.dtype),
                                target)
    try:
        with ocp.PyTreeCheckpointer() as ckptr:
            restored = ckptr.restore(step_dir / "state", args=ocp.args.PyTreeRestore(
                target, restore_args=restore_args, partial_restore=True))
    except Exception as e:  # TensorStore read failures surface as a bare Exception
        raise ValueError(f"could not read the parameters in {step_dir} (corrupt?): "
                         f"{_first_line(e)}") from None
    vae_state = functools.reduce(operator.getitem, key, restored)
    return train_config, config, which, vae_state, restored["disc"]


def checkpoint_to_pytorch(step_dir: Path, dst: Path, *, dtype, params: str | None,
                          model_config: Path | None) -> tuple:
    """The autoencoder (official layout) and discriminator (official keys) of a checkpoint."""
    train_config, config, which, vae_state, disc_state = restore_checkpoint(
        step_dir, params=params, model_config=model_config)
    state_dict = weights.to_state_dict(vae_state, dtype)
    disc_dict = weights.to_state_dict(disc_state, dtype)
    disc_config = official_params(**train_config.disc)
    clear_dst(dst)
    config.to_json(dst / weights.CONFIG_NAME)
    weights.write_safetensors(dst / weights.WEIGHTS_NAME, state_dict)
    weights.write_safetensors(dst / DISC_WEIGHTS_NAME, disc_dict)
    (dst / DISC_CONFIG_NAME).write_text(json.dumps(disc_config, indent=2, sort_keys=True) + "\n")
    origin = f"{which} parameters of checkpoint step {step_dir.name} in {step_dir.parent}"
    return config, list(state_dict.values()), list(disc_dict.values()), origin


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cvvae_jax.convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("to-orbax",
                       help="official layout (safetensors/.bin) -> config.json + params/")
    a.add_argument("--subfolder", help="model folder inside SRC, e.g. vae3d, vae3d_v1-1, vae3d_sd3")
    b = sub.add_parser("to-pytorch", help="config.json + params/, or a train.py checkpoint -> "
                                          "official layout (safetensors)")
    b.add_argument("--dtype", type=dtypes.arg(dtypes.STORAGE), default="float32",
                   help="dtype of the written tensors (default: float32)")
    b.add_argument("--params", choices=("ema", "raw"),
                   help="train.py checkpoints: the EMA or the raw autoencoder parameters "
                        "(default: ema when the checkpoint has them)")
    b.add_argument("--model-config", type=Path,
                   help="train.py checkpoints: the autoencoder's config.json, when the run's "
                        "init_from or image VAE (which gave it) is gone")
    for s in (a, b):
        s.add_argument("src", type=Path, metavar="SRC")
        s.add_argument("dst", type=Path, metavar="DST")
        s.add_argument("--overwrite", action="store_true",
                       help="replace the model files in a non-empty DST")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()

    def summary(arrays) -> str:
        n = sum(int(np.prod(a.shape)) for a in arrays)
        nbytes = sum(a.nbytes for a in arrays)
        return f"{len(arrays)} tensors, {_si(n)} parameters, {_si(nbytes, 'B')}"

    def convert() -> None:
        src = args.src / (getattr(args, "subfolder", None) or "")
        check_dst(args.dst, src, args.overwrite)  # before any slow work
        step = checkpoint_step(args.src) if args.command == "to-pytorch" else None
        if step is None and args.command == "to-pytorch" and (args.params or args.model_config):
            raise ValueError(f"--params and --model-config apply to train.py checkpoints; "
                             f"{args.src} is not one")
        extra = []
        if args.command == "to-orbax":
            config, arrays = to_orbax(args.src, args.dst, subfolder=args.subfolder)
        elif step is None:
            config, arrays = to_pytorch(args.src, args.dst, dtype=dtypes.resolve(args.dtype, dtypes.STORAGE))
        else:
            config, arrays, disc, origin = checkpoint_to_pytorch(
                step, args.dst, dtype=dtypes.resolve(args.dtype, dtypes.STORAGE), params=args.params,
                model_config=args.model_config)
            extra = [f"from the {origin}",
                     f"discriminator: {summary(disc)} -> {args.dst / DISC_WEIGHTS_NAME}"]
        print(f"converted {config.CLASS_NAME}: {summary(arrays)} -> {args.dst} "
              f"({time.perf_counter() - start:.1f} s)")
        for line in extra:
            print(line)

    return cli.run(convert)


if __name__ == "__main__":
    sys.exit(main())
