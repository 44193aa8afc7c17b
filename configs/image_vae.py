r"""Image VAE (SD-style AutoencoderKL) training with the same trainer.

    python train.py --config=configs/image_vae.py:tiny --workdir=runs/image_vae_tiny

Variants: "" fine-tunes an SD VAE (`config.init_from`, a diffusers AutoencoderKL
directory) on images; "tiny" trains a tiny one from scratch on the bundled media
(step 1 of the tiny paper pipeline in the README: its `export/` directory is the
frozen image VAE of `configs/cvvae.py:tiny`).
"""

import ml_collections

from configs import cvvae
from cvvae_jax import assets


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    c = cvvae.base()
    c.model.kind = "image_vae"
    c.inflate = False
    c.loss.regularizer = "none"
    c.loss.kl_weight = 1e-6  # the SD VAE's
    c.data.sources = [c.data.sources[1]]
    c.data.sources[0].update(weight=1.0)
    c.data.eval_sources = [dict(c.data.eval_sources[0], frames=1)]
    if arg == "":
        return c
    if arg != "tiny":
        raise ValueError(f"configs/image_vae.py:{arg}: unknown variant; choose from ['', 'tiny']")
    c.total_steps = 300
    c.model.config = {"block_out_channels": (32, 32, 32, 32), "layers_per_block": 1,
                      "down_block_types": ("DownEncoderBlock2D",) * 4,
                      "up_block_types": ("UpDecoderBlock2D",) * 4}
    c.disc.update(ndf=32, n_layers=0)
    c.loss.disc_start = 150  # the SD VAE recipe, scaled: the GAN joins half-way
    c.loss.perceptual_weight = 0.0
    c.optim.update(lr=1e-3, lr_g_factor=1.0, warmup_steps=10, ema_decay=0.99)
    bundled = str(assets.path(assets.CLIPS[0]).parent)
    # Frames of the clips and the stills, as 32 px images.
    c.data.sources = [
        {"name": "frames", "kind": "video_folder", "path": bundled, "weight": 0.5,
         "frames": 1, "size": (32, 32), "batch_size": 16},
        {"name": "images", "kind": "image_folder", "path": bundled, "weight": 0.5,
         "frames": 1, "size": (32, 32), "batch_size": 16},
    ]
    c.data.eval_sources = [
        {"name": "frames", "kind": "video_folder", "path": bundled,
         "frames": 1, "size": (32, 32), "stride": 1, "batch_size": 2},
    ]
    c.checkpoint.update(every=100, keep_last=2, keep_every=0)
    c.log_every = 20
    c.sample_every = 100
    return c
