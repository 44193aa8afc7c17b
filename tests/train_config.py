r"""The trainer tests' config: `configs/cvvae.py:tiny` shrunk so that a run takes seconds.

    python train.py --config=tests/train_config.py --workdir=/tmp/run \
        --config.image_vae.path=/path/to/a/two-level/image_vae

A two-level CV-VAE from scratch (time and space compressed 2x, no attention) with
the decoder regulariser on a two-level image VAE: the smallest model that keeps
every part of the step, which compiles in ~20 s on a CPU where the inflated
four-level `tiny` model takes minutes. One video source (5 frames of 8x8 from the
bundled clips) so the step compiles once; a global batch of 8 so that 8 fake
devices each take one clip; every step logged; checkpoints every 3 steps; no
samples between the first and the last; no TensorBoard.
"""

from configs import cvvae


def get_config(arg: str = ""):
    del arg
    c = cvvae.get_config("tiny")
    c.total_steps = 6
    c.inflate = False
    c.image_vae.path = ""  # the tests' two-level image VAE, set on the command line
    c.model.config = {"ch": 32, "ch_mult": (1, 1), "num_res_blocks": 1,
                      "time_n_compress": 2, "spatial_n_compress": 2,
                      "encoder_attn_type": "none", "decoder_attn_type": "none"}
    c.disc.update(ndf=32, n_layers=0)
    clip = {"frames": 5, "size": (8, 8), "stride": 1}
    c.data.sources = [dict(c.data.sources[0], **clip, batch_size=8)]
    c.data.eval_sources = [dict(c.data.eval_sources[0], **clip, batch_size=1)]
    c.data.read_threads = 1
    c.checkpoint.update(every=3, keep_last=2, keep_every=0, async_save=True)
    c.log_every = 1
    c.sample_every = 0
    c.tensorboard = False
    return c
