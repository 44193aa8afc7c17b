r"""Reconstruction and compatibility metrics of a CV-VAE on a folder of videos and images.

    python eval.py --config=configs/eval.py --config.checkpoint=CV-VAE/vae3d \
        --config.image_vae.path=stable-diffusion-2-1 --config.image_vae.subfolder=vae \
        --config.data=/data/videos_and_images

Prints a markdown table (image VAE baseline and CV-VAE: PSNR / SSIM / LPIPS on videos
and images, compatibility PSNR / SSIM) and writes eval.json and examples/ to
`config.out_dir`. Protocol and output format: docs/eval.md. A failure is one
`error: ...` line on stderr and exit status 2.
"""

import logging
import sys

from absl import app
from absl import logging as absl_logging

from cvvae_jax import cli, evaluation

_CONFIG = cli.define_config("configs/eval.py", "evaluation config file")


def main(argv) -> int:
    del argv
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    absl_logging.set_verbosity(absl_logging.WARNING)  # Orbax logs every read at INFO
    return cli.run(lambda: evaluation.main(_CONFIG.value))


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=cli.parse_flags)
