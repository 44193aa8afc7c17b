r"""CV-VAE training configs.

    python train.py --config=configs/cvvae.py --workdir=runs/cvvae \
        --config.image_vae.path=/path/to/stable-diffusion-2-1 --config.image_vae.subfolder=vae \
        --config.loss.lpips_vgg_path=/path/to/vgg16.safetensors \
        --config.data.sources[0].path=/data/videos --config.data.sources[1].path=/data/images

Variants (`configs/cvvae.py:<variant>`):
- "" (default): the paper's SD2.1-compatible CV-VAE, inflated from the SD 2.1 VAE,
  17x256x256 clips and 256 px images (half the steps each), decoder regulariser
  with the `random` mapping, the official optimiser recipe.
- "sd3": the official SD3 recipe (configs/cvvae_sd3_constraint_training.yaml):
  CVVAESD3Model, 16 latent channels, 320 px images at batch 8. Its frozen
  regulariser is the SD3 VAE decoder (`config.image_vae.path`).
- "tiny": tiny widths and 32 px clips from the bundled media, on a laptop CPU; its
  image VAE is the output of `train.py --config=configs/image_vae.py:tiny`.
"""

import ml_collections
from ml_collections import config_dict

from cvvae_jax import assets, data


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.total_steps = 60000
    c.model = ml_collections.ConfigDict()
    c.model.kind = "cvvae"  # "cvvae" (v1), "cvvae_sd3" or "image_vae"
    c.model.config = {}  # model config.json fields (scratch runs; inflation derives its own)
    c.model.dtype = "float32"  # compute dtype; parameters stay float32
    c.init_from = ""  # an Orbax or official PyTorch model directory
    c.inflate = True  # with no checkpoint and no init_from: inflate from the image VAE
    c.image_vae = ml_collections.ConfigDict({"path": "", "subfolder": ""})
    c.loss = ml_collections.ConfigDict(dict(
        rec_loss="l1", perceptual_weight=0.5, kl_weight=1.0, disc_weight=0.5, disc_factor=1.0,
        disc_start=0, disc_loss="hinge", adaptive_disc_weight=True, rec2d_weight=1.0,
        mapping="random", regularizer="decoder", logvar_init=0.0, lpips_vgg_path=""))
    c.disc = ml_collections.ConfigDict(dict(in_channels=3, ndf=64, n_layers=4, half_3d=False,
                                            causal=False))
    # AdamW (0.9, 0.98), eps 1e-4, wd 0.01; generator at lr * lr_g_factor with 1000 warmup
    # steps then cosine to 0.5% of its peak; discriminator constant at lr.
    c.optim = ml_collections.ConfigDict(dict(
        lr=2e-5, lr_g_factor=2.0, warmup_steps=1000, min_lr_ratio=0.005, b1=0.9, b2=0.98,
        eps=1e-4, weight_decay=0.01, grad_clip=1.0, ema_decay=0.999))
    c.mesh = {"data": -1, "fsdp": 1}
    c.fsdp_min_size = 2**16  # smaller parameters (and their optimizer moments) are replicated
    c.remat = "none"  # "blocks": recompute per block, ~1/3 the temporaries (cvvae_jax.remat)
    c.data = data.default_config()
    src = c.data.sources
    src[0].update(path="", frames=17, size=(256, 256), batch_size=1, weight=0.5)
    src[1].update(path="", frames=1, size=(256, 256), batch_size=8, weight=0.5)
    c.data.sources = src
    c.checkpoint = ml_collections.ConfigDict(dict(every=2000, keep_last=3, keep_every=10000,
                                                  async_save=True))
    c.log_every = 50
    c.sample_every = 1000
    c.tensorboard = True
    c.xla_cache = True  # train.py caches compiled steps in <workdir>/xla_cache: a resumed run loads them
    c.max_nonfinite_in_row = 10
    # MFU's denominator. None: the device's dense bf16 peak where cvvae_jax.flops.peak_tflops
    # knows it (H100, H200, A100, TPU v4-v6e), else no MFU; 0 turns it off.
    c.peak_tflops_per_device = config_dict.placeholder(float)
    return c


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    c.total_steps = 150
    c.image_vae.path = "runs/image_vae_tiny/export"
    c.model.config = {"ch": 32, "ch_mult": (1, 1, 1, 1), "num_res_blocks": 1}
    c.disc.update(ndf=32, n_layers=0)  # one 32-channel width: cheap on a CPU
    c.loss.perceptual_weight = 0.0  # no VGG16 weights are bundled
    c.optim.update(lr=5e-4, lr_g_factor=2.0, warmup_steps=10, ema_decay=0.99)
    bundled = str(assets.path(assets.CLIPS[0]).parent)
    c.data.sources = [
        {"name": "videos", "kind": "video_folder", "path": bundled, "weight": 0.5,
         "frames": 9, "size": (32, 32), "stride": (1, 2), "batch_size": 2},
        {"name": "images", "kind": "image_folder", "path": bundled, "weight": 0.5,
         "frames": 1, "size": (32, 32), "batch_size": 8},
    ]
    c.data.eval_sources = [
        {"name": "videos", "kind": "video_folder", "path": bundled,
         "frames": 17, "size": (32, 32), "stride": 2, "batch_size": 2},
    ]
    c.checkpoint.update(every=50, keep_last=2, keep_every=0, async_save=True)
    c.log_every = 10
    c.sample_every = 50
    return c


def sd3(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    c.model.kind = "cvvae_sd3"
    c.model.config = {}
    c.inflate = False
    c.optim.update(lr=2e-5, lr_g_factor=2.0)
    c.loss.disc_start = 1
    c.data.sources[1].update(size=(320, 320), batch_size=8)
    return c


VARIANTS = {"": lambda c: c, "tiny": tiny, "sd3": sd3}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"configs/cvvae.py:{arg}: unknown variant; choose from {sorted(VARIANTS)}")
    return VARIANTS[arg](base())
