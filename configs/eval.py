r"""Evaluation configs for eval.py: reconstruction and compatibility metrics.

    python eval.py --config=configs/eval.py --config.checkpoint=CV-VAE/vae3d \
        --config.image_vae.path=stable-diffusion-2-1 --config.image_vae.subfolder=vae \
        --config.lpips_vgg_path=vgg16.safetensors --config.data=/data/webvid_val
    python eval.py --config=configs/eval.py:tiny   # after the README's tiny pipeline

Variants (`configs/eval.py:<variant>`):
- "" (default): the paper's protocol: 256x256 centre crops, videos as 33 frames at
  stride 3 from the first frame, images as T = 1, the `slice` mapping for the
  compatibility score, float32.
- "tiny": the models of the README's tiny pipeline (runs/*_tiny/export) on the bundled
  media at their training size (32 px, 17 frames at stride 2).
"""

import ml_collections

from cvvae_jax import assets
from cvvae_jax.evaluation import TINY_RUNS


def base() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.checkpoint = ""  # CV-VAE model directory (official or Orbax layout) or training workdir
    c.subfolder = ""  # e.g. "vae3d" in the official Hugging Face repo
    c.ema = True  # a training workdir: its export_ema/ (else export/)
    c.image_vae = ml_collections.ConfigDict({"path": "", "subfolder": ""})
    c.lpips_vgg_path = ""  # VGG16 for LPIPS (python -m cvvae_jax.lpips convert-vgg); "" = no LPIPS
    c.data = ""  # a folder (searched recursively) of videos and/or images
    c.size = 256  # square centre crop, after scaling the short side to it
    c.frames = 33  # per video clip, 1 + 4k
    c.stride = 3
    c.short_clip = "pad"  # a video shorter than 1 + (frames - 1) x stride: "pad" (repeat) or "skip"
    c.mapping = "slice"  # which input frames the latents stand for: slice, mean, random, first
    c.baseline = True  # also score the image VAE applied frame by frame
    c.dtype = "float32"  # compute dtype: float32 or bfloat16
    c.batch_size = 1  # clips per model call
    c.max_clips = 0  # per data kind; 0 = all
    c.skip_bad = False  # False: an unusable file is an error; True: skipped and counted
    c.examples = 4  # side-by-side PNG/mp4 files per data kind
    c.out_dir = ""  # default runs/eval_<checkpoint directory name>[_<subfolder>]
    c.read_threads = 2  # threads decoding videos in the input pipeline
    c.seed = 0  # for mapping="random"
    return c


def tiny(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    c.checkpoint = TINY_RUNS["checkpoint"]  # runs/cvvae_tiny
    c.image_vae.path = TINY_RUNS["image_vae.path"]  # runs/image_vae_tiny/export
    c.data = str(assets.path(assets.CLIPS[0]).parent)
    c.update(size=32, frames=17, stride=2)
    return c


VARIANTS = {"": lambda c: c, "tiny": tiny}


def get_config(arg: str = "") -> ml_collections.ConfigDict:
    if arg not in VARIANTS:
        raise ValueError(f"configs/eval.py:{arg}: unknown variant; choose from {sorted(VARIANTS)}")
    return VARIANTS[arg](base())
