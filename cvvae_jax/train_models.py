"""The models a train config starts from: its start-up checks, the frozen image VAE, and the
autoencoder's config and weights by the resume order after the run's own checkpoints
(`config.init_from`, else inflation from the image VAE, else scratch).
"""

from __future__ import annotations

from pathlib import Path

from flax import nnx

from .image_vae import ImageVAE
from .inflate import config_from_image_vae
from .model_config import CVVAEConfig, CVVAESD3Config, ImageVAEConfig, load_config, frame_count_problem
from .vae import CVVAE

MODEL_CONFIGS = {"cvvae": CVVAEConfig, "cvvae_sd3": CVVAESD3Config, "image_vae": ImageVAEConfig}


class ConfigError(ValueError):
    """A config value that cannot work, named by its config key."""


def model_class(kind: str):
    return ImageVAE if kind == "image_vae" else CVVAE


def _model_config(config):
    kind = config.model.kind
    if kind not in MODEL_CONFIGS:
        raise ConfigError(f"config.model.kind={kind!r}; expected one of {tuple(MODEL_CONFIGS)}")
    return MODEL_CONFIGS[kind].from_dict(dict(config.model.config))


def check_config(config) -> None:
    """Fail at start, naming the key to set, on paths that the run would need later."""
    needs_image_vae = config.loss.regularizer != "none" or (
        config.inflate and not config.init_from and config.model.kind == "cvvae")
    if needs_image_vae and not config.image_vae.path:
        raise ConfigError("set config.image_vae.path to the frozen image VAE (a diffusers "
                          "AutoencoderKL directory, e.g. stabilityai/stable-diffusion-2-1 with "
                          "subfolder 'vae'): the latent regulariser and inflation need it")
    for key, value in (("config.image_vae.path", config.image_vae.path),
                       ("config.init_from", config.init_from),
                       ("config.loss.lpips_vgg_path", config.loss.lpips_vgg_path)):
        if value and not Path(value).exists():
            raise ConfigError(f"{key}={value!r} does not exist")
    for i, src in enumerate(list(config.data.sources)):
        if src.get("kind") in ("video_folder", "image_folder"):
            path = src.get("path")
            if not path or not Path(path).is_dir():
                raise ConfigError(f"config.data.sources[{i}].path ({src.get('name')!r}) is "
                                  f"{path!r}: set it to a folder of "
                                  f"{'videos' if src['kind'] == 'video_folder' else 'images'}")
    if config.total_steps < 1:
        raise ConfigError(f"config.total_steps={config.total_steps} must be >= 1")


def check_data_shapes(config, model_config) -> None:
    """Each data source's clip shape against the model, named by its config key: a size the
    model cannot compress evenly otherwise failed inside the first train step."""
    f = model_config.space_factor
    for group in ("sources", "eval_sources"):
        for i, src in enumerate(list(config.data.get(group, []))):
            key = f"config.data.{group}[{i}] ({src.get('name')!r})"
            frames, size = src.get("frames"), tuple(src.get("size") or ())
            problem = None if frames is None else frame_count_problem(frames, 4)
            if problem:
                raise ConfigError(f"{key}.frames={frames}: {problem}")
            if len(size) != 2 or min(size) < 1 or any(n % f for n in size):
                raise ConfigError(f"{key}.size={size}: (height, width), each a positive multiple of "
                                  f"{f}, the model's spatial compression")


def load_image_vae(config, dtype) -> ImageVAE | None:
    if not config.image_vae.path:
        return None
    return ImageVAE.from_pretrained(config.image_vae.path, config.image_vae.subfolder or None,
                                    dtype=dtype)


# Inference-time CVVAEConfig fields that inflation cannot read off the image VAE.
_INFLATE_OVERRIDES = ("en_de_n_frames_a_time", "tile_spatial_size", "tile_overlap_ratio")


def _inflating(config, image_vae) -> bool:
    return (not config.init_from and config.inflate and config.model.kind == "cvvae"
            and image_vae is not None)


def _inflate_overrides(config) -> dict:
    return {k: v for k, v in dict(config.model.config).items() if k in _INFLATE_OVERRIDES}


def initial_config(config, image_vae: ImageVAE | None):
    """The autoencoder's model config, wherever its weights come from."""
    if config.init_from:
        return load_config(Path(config.init_from) / "config.json")
    if _inflating(config, image_vae):
        return config_from_image_vae(image_vae.config, **_inflate_overrides(config))
    return _model_config(config)


def initial_autoencoder(config, image_vae: ImageVAE | None, dtype):
    """(module, where it came from) by the resume order after the run's own checkpoints."""
    cls = model_class(config.model.kind)
    if config.init_from:
        return cls.from_pretrained(config.init_from, dtype=dtype), f"init_from {config.init_from}"
    if _inflating(config, image_vae):
        vae = CVVAE.from_image_vae(image_vae, seed=config.seed, **_inflate_overrides(config))
        graphdef, _ = nnx.split(CVVAE.abstract(vae.config, dtype=dtype))
        return nnx.merge(graphdef, nnx.state(vae)), f"inflated from {config.image_vae.path}"
    return cls.from_config(_model_config(config), dtype=dtype, seed=config.seed), "scratch"
