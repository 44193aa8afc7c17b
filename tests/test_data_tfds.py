"""TFDS, offline and without TensorFlow: prepare ArrayRecord shards, stream them through Grain."""

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from cvvae_jax.data import config, make_train_pipeline, sources, testing, tfds_videos
from cvvae_jax.data.decode import VideoReader

FILES = ["a.mp4", "b.mp4", "sub/c.mp4"]


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tfds_src")
    (d / "sub").mkdir()
    for name, n in zip(FILES, (16, 20, 24)):
        testing.write_indexed_video(d / name, n, size=(48, 64))
    (d / "broken.mp4").write_bytes(b"\x00" * 100)
    (d / "captions.csv").write_text("file,caption\na.mp4,first\nsub/c.mp4,third\n")
    return d


def test_prepared_videos_stream_as_train_batches(video_dir, tmp_path):
    builder = tfds_videos.prepare(video_dir, tmp_path, short_side=32, max_frames=14,
                                  metadata=video_dir / "captions.csv")
    assert dict(builder.skipped) == {"unreadable": ["broken.mp4"]}
    records = tfds.data_source(tfds_videos.NAME, split="train", data_dir=tmp_path)
    assert len(records) == 3
    by_name = {records[i]["filename"].decode(): records[i] for i in range(3)}
    assert sorted(by_name) == FILES
    for record in by_name.values():  # re-encoded: shorter side 32, at most 14 frames
        assert (record["height"], record["width"], record["fps"]) == (32, 42, 30.0)
    assert [by_name[f]["num_frames"] for f in FILES] == [14, 14, 14]
    assert by_name["a.mp4"]["video"].dtype == np.uint8

    c = config.default_config()
    c.sources = [{"name": "tfds_videos", "kind": "tfds", "tfds_name": tfds_videos.NAME,
                  "data_dir": str(tmp_path), "split": "train", "video_key": "video",
                  "caption_key": "caption", "name_key": "filename",
                  "frames": 9, "size": (32, 32), "stride": (1, 2), "batch_size": 2}]
    pipeline = make_train_pipeline(c, process_index=0, process_count=1)
    captions = {}
    for _ in range(3):
        name, batch = next(pipeline)
        assert name == "tfds_videos"
        assert batch["video"].shape == (2, 9, 32, 32, 3)
        assert -1.0 <= batch["video"].min() and batch["video"].max() <= 1.0
        for clip in batch["video"]:
            steps = set(np.diff(testing.frame_ids(clip)))
            assert steps <= {1, 2} and len(steps) == 1
        captions.update(zip(batch["name"], batch["caption"]))
    assert captions == {"a.mp4": "first", "b.mp4": "", "sub/c.mp4": "third"}

    # Prepared again from the same files, it is read back; from others, refused (TFDS kept
    # the old version and its counts were printed as the new dataset's).
    again = tfds_videos.prepare(video_dir, tmp_path, short_side=32, max_frames=14,
                                metadata=video_dir / "captions.csv")
    assert again.info.splits["train"].num_examples == 3
    with pytest.raises(ValueError, match="already holds cvvae_videos, prepared from"):
        tfds_videos.prepare(tmp_path / "elsewhere", tmp_path, short_side=32, max_frames=14)
    with pytest.raises(ValueError, match=r"'cvvae_vidoes' is not prepared under .* "
                                         r"\(prepared there: \['cvvae_videos'\]\)"):
        sources.TfdsSource("cvvae_vidoes", data_dir=str(tmp_path), video_key="video")


def test_cli_stores_files_as_they_are_with_a_validation_split(video_dir, tmp_path, capsys):
    assert tfds_videos.main(["prepare", str(video_dir), str(tmp_path),
                             "--val_fraction", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "skipped (unreadable): 1: broken.mp4" in out
    stored = {}
    for split in ("train", "validation"):
        records = tfds.data_source(tfds_videos.NAME, split=split, data_dir=tmp_path)
        stored.update({records[i]["filename"].decode(): records[i] for i in range(len(records))})
    assert sorted(stored) == FILES
    for name, record in stored.items():
        assert record["video"].tobytes() == (video_dir / name).read_bytes()


class Stills(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Someone else's image dataset: decoded pixels under its own field names."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "pixels": tfds.features.Image(shape=(None, None, 1)),
            "id": tfds.features.Text(),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(3):  # TFDS encodes PIL images without TensorFlow
            yield i, {"pixels": Image.fromarray(np.full((20, 30), 40 * i, np.uint8)),
                      "id": f"still{i}"}


def test_any_tfds_image_dataset_through_a_field_mapping(tmp_path):
    Stills(data_dir=str(tmp_path)).download_and_prepare(file_format="array_record")
    c = config.default_config()
    c.sources = [{"name": "stills", "kind": "tfds", "tfds_name": Stills.name,
                  "data_dir": str(tmp_path), "image_key": "pixels", "name_key": "id",
                  "frames": 1, "size": (16, 16), "batch_size": 3}]
    pipeline = make_train_pipeline(c, process_index=0, process_count=1)
    _, batch = next(pipeline)
    assert batch["video"].shape == (3, 1, 16, 16, 3)
    values = {str(n): round(float(v.mean() + 1) * 127.5)
              for n, v in zip(batch["name"], batch["video"])}
    assert values == {"still0": 0, "still1": 40, "still2": 80}
    # One-channel pixels are repaired to RGB and counted.
    assert pipeline.skip_counts()["stills"]["grayscale_repaired"] == 3


def test_prepared_videos_keep_their_display_rotation(tmp_path):
    testing.write_corner_video(tmp_path / "phone.mp4", 3, size=(32, 48), rotation=-90)
    record = tfds_videos.encode_example(tmp_path / "phone.mp4", short_side=16)  # re-encoded
    assert (record["height"], record["width"], record["num_frames"]) == (24, 16, 3)
    with VideoReader(record["video"]) as reader:
        frames = reader.read(0, 1, 3)
    assert frames.shape == (3, 24, 16, 3)
    (top, left), (bottom, right) = testing.white_box(frames[0])
    assert (top, right) == (0, 15) and 11 <= left <= 13 and 2 <= bottom <= 4, (left, bottom)  # halved
