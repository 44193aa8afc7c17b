"""cvvae-jax: CV-VAE, the compatible video VAE, in JAX/Flax (channels-last)."""

from .conv_forms import compiler_options
from .image_vae import ImageVAE
from .model_config import CVVAEConfig, CVVAESD3Config, ImageVAEConfig, load_config
from .posterior import DiagonalGaussian
from .vae import CVVAE

__all__ = [
    "CVVAE",
    "CVVAEConfig",
    "CVVAESD3Config",
    "DiagonalGaussian",
    "ImageVAE",
    "ImageVAEConfig",
    "compiler_options",
    "load_config",
]
