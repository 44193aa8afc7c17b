"""The input side: Grain pipelines over video/image folders and TFDS (docs/data.md).

    pipeline = make_train_pipeline(config.data, per_process_batch_scale=jax.local_device_count())
    name, batch = next(pipeline)  # batch["video"]: (B, T, H, W, 3) float32 in [-1, 1]

The TFDS builder for a folder of videos lives in `cvvae_jax.data.tfds_videos`
(`python -m cvvae_jax.data.tfds_videos prepare SRC_DIR OUT_DIR`).
"""

from .bad_data import REASONS, MediaError
from .config import SourceConfig, default_config, parse_source
from .mixing import Schedule
from .pipeline import (
    EvalPipeline,
    TrainPipeline,
    build_source_from_config,
    make_eval_pipeline,
    make_train_pipeline,
)
from .sources import FolderSource, TfdsSource, image_folder, load_captions, video_folder
from .transforms import SampleSpec, load_sample

__all__ = [
    "REASONS",
    "EvalPipeline",
    "FolderSource",
    "MediaError",
    "SampleSpec",
    "Schedule",
    "SourceConfig",
    "TfdsSource",
    "TrainPipeline",
    "build_source_from_config",
    "default_config",
    "image_folder",
    "load_captions",
    "load_sample",
    "make_eval_pipeline",
    "make_train_pipeline",
    "parse_source",
    "video_folder",
]
