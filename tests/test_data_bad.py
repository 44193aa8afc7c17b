"""Bad data never stops a run: each kind of bad file is skipped or repaired, and counted."""

import logging
import pickle

import numpy as np
import pytest
from PIL import Image

from cvvae_jax.data import (
    REASONS,
    bad_data,
    config,
    make_eval_pipeline,
    make_train_pipeline,
    sources,
    testing,
)

GOOD = {"good.mp4", "short.mp4"}


def _counts(**nonzero):
    return {r: nonzero.get(r, 0) for r in REASONS}


@pytest.fixture(scope="module")
def bad_videos(tmp_path_factory):
    """One good video, one too short, and the broken kinds."""
    d = tmp_path_factory.mktemp("bad_videos")
    testing.write_indexed_video(d / "good.mp4", 20)
    testing.write_indexed_video(d / "short.mp4", 5)
    rng = np.random.default_rng(0)
    (d / "corrupt.mp4").write_bytes(rng.integers(0, 256, 4000, np.uint8).tobytes())
    (d / "empty.mp4").write_bytes(b"")
    # mp4 keeps its index (moov) at the end: half a file has none and does not open.
    testing.write_indexed_video(d / "whole.mp4", 30)
    data = (d / "whole.mp4").read_bytes()
    (d / "whole.mp4").unlink()
    (d / "truncated.mp4").write_bytes(data[:len(data) // 2])
    # With the index in front ("faststart") half a file opens and fails mid-decode.
    testing.write_indexed_video(d / "whole.mp4", 30, container_options={"movflags": "faststart"})
    data = (d / "whole.mp4").read_bytes()
    (d / "whole.mp4").unlink()
    (d / "truncated_faststart.mp4").write_bytes(data[:len(data) // 2])
    return d


def _config(path, *, short_clip="pad", kind="video_folder", frames=9, stride=2):
    c = config.default_config()
    entry = {"name": "src", "kind": kind, "path": str(path), "frames": frames, "size": (16, 16)}
    c.sources = [{**entry, "stride": (stride, stride), "batch_size": 1}]
    c.eval_sources = [{**entry, "stride": stride, "batch_size": 2}]
    c.short_clip = short_clip
    return c


def test_eval_pass_masks_and_counts_every_bad_file_once(bad_videos):
    pipeline = make_eval_pipeline(_config(bad_videos), process_index=0, process_count=1)
    masks = {}
    for _, batch in pipeline:
        masks.update(zip(batch["name"], batch["mask"]))
        assert np.all(batch["video"][~batch["mask"]] == 0)
    assert masks == {"corrupt.mp4": False, "empty.mp4": False, "good.mp4": True,
                     "short.mp4": True, "truncated.mp4": False,
                     "truncated_faststart.mp4": False}
    assert pipeline.skip_counts() == {"src": _counts(
        empty_file=1, unreadable=2, decode_error=1, short_clip_padded=1)}
    assert pipeline.metrics()["eval_data/src/unreadable"] == 2


def test_short_clips_are_padded_with_their_last_frame(bad_videos):
    pipeline = make_eval_pipeline(_config(bad_videos), process_index=0, process_count=1)
    clips = {n: v for _, b in pipeline for n, v in zip(b["name"], b["video"])}
    # 5 frames at stride 2: frames 0, 2, 4, then frame 4 repeated to 9 frames.
    np.testing.assert_array_equal(testing.frame_ids(clips["short.mp4"]),
                                  [0, 2, 4, 4, 4, 4, 4, 4, 4])
    np.testing.assert_array_equal(clips["short.mp4"][3:], np.repeat(clips["short.mp4"][2:3], 6, 0))
    np.testing.assert_array_equal(testing.frame_ids(clips["good.mp4"]), np.arange(0, 18, 2))


def test_skip_policy_drops_short_clips(bad_videos):
    c = _config(bad_videos, short_clip="skip")
    pipeline = make_eval_pipeline(c, process_index=0, process_count=1)
    masks = {n: m for _, b in pipeline for n, m in zip(b["name"], b["mask"])}
    assert masks["short.mp4"] == np.False_ and masks["good.mp4"] == np.True_
    assert pipeline.skip_counts()["src"]["short_clip_skipped"] == 1
    train = make_train_pipeline(c, process_index=0, process_count=1)
    names = {str(next(train)[1]["name"][0]) for _ in range(4)}
    assert names == {"good.mp4"}


def test_train_stream_skips_bad_files_counts_each_time_logs_each_once(bad_videos, caplog):
    pipeline = make_train_pipeline(_config(bad_videos), process_index=0, process_count=1)
    epochs = 3
    with caplog.at_level(logging.WARNING, logger="cvvae_jax.data.bad_data"):
        names = [str(next(pipeline)[1]["name"][0]) for _ in range(epochs * len(GOOD))]
    assert set(names) == GOOD
    counts = pipeline.skip_counts()["src"]
    # Every record of the first epochs-1 epochs was read; the last epoch may be partial.
    for reason, per_epoch in [("unreadable", 2), ("empty_file", 1), ("decode_error", 1)]:
        assert (epochs - 1) * per_epoch <= counts[reason] <= epochs * per_epoch, counts
    assert counts["short_clip_padded"] == epochs
    logged = sorted(r.getMessage().split(": ")[-1].split(" (")[0] for r in caplog.records)
    assert logged == ["corrupt.mp4", "empty.mp4", "short.mp4", "truncated.mp4",
                      "truncated_faststart.mp4"]
    assert pipeline.metrics()["data/src/short_clip_padded"] == epochs


def to_u8(x):
    return np.rint((x + 1) * 127.5).astype(np.uint8)


def test_grayscale_and_alpha_images_are_repaired_to_rgb(tmp_path):
    Image.fromarray(np.full((16, 16), 100, np.uint8), "L").save(tmp_path / "gray.png")
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 0] = 255  # red where opaque
    rgba[:, :8, 3] = 255  # left half opaque, right half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(np.full((16, 16, 3), 7, np.uint8)).save(tmp_path / "rgb.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    pipeline = make_eval_pipeline(_config(tmp_path, kind="image_folder", frames=1, stride=1),
                                  process_index=0, process_count=1)
    out = {n: (v, m) for _, b in pipeline for n, v, m in zip(b["name"], b["video"], b["mask"])}
    gray, mask = out["gray.png"]
    assert mask and np.all(to_u8(gray) == 100)
    repaired, mask = out["rgba.png"]
    assert mask
    red = np.broadcast_to(np.array([255, 0, 0], np.uint8), (16, 8, 3))
    np.testing.assert_array_equal(to_u8(repaired[0, :, :8]), red)
    np.testing.assert_array_equal(to_u8(repaired[0, :, 8:]), np.full((16, 8, 3), 255))
    assert not out["empty.png"][1] and not out["corrupt.jpg"][1] and out["rgb.png"][1]
    assert pipeline.skip_counts()["src"] == _counts(
        empty_file=1, unreadable=1, grayscale_repaired=1, alpha_repaired=1)


def test_media_smaller_than_the_sample_are_counted_as_upscaled(tmp_path, caplog):
    for name, shape in (("small.png", (8, 8)), ("narrow.png", (32, 14)), ("big.png", (20, 40))):
        Image.fromarray(np.full(shape + (3,), 50, np.uint8)).save(tmp_path / name)
    testing.write_indexed_video(tmp_path / "small.mp4", 3, size=(12, 12))
    testing.write_indexed_video(tmp_path / "big.mp4", 3, size=(16, 24))
    counts, used = {}, set()
    with caplog.at_level(logging.WARNING, logger="cvvae_jax.data.bad_data"):
        for kind in ("image_folder", "video_folder"):
            pipeline = make_eval_pipeline(_config(tmp_path, kind=kind, frames=1, stride=1),
                                          process_index=0, process_count=1)
            used |= {n for _, b in pipeline for n, m in zip(b["name"], b["mask"]) if m}
            counts[kind] = pipeline.skip_counts()["src"]
    assert used == {"small.png", "narrow.png", "big.png", "small.mp4", "big.mp4"}
    assert counts == {"image_folder": _counts(upscaled=2), "video_folder": _counts(upscaled=1)}
    logged = sorted(r.getMessage() for r in caplog.records)
    assert logged == [f"data source 'src': upscaled: {n} (logged once, counted each time)"
                      for n in ("narrow.png", "small.mp4", "small.png")]


def test_media_errors_survive_pickling_for_worker_processes():
    error = pickle.loads(pickle.dumps(bad_data.MediaError("decode_error", "x.mp4: broken")))
    assert (error.reason, str(error)) == ("decode_error", "x.mp4: broken")


def test_a_source_failing_on_every_record_stops_with_a_clear_error(bad_videos, tmp_path,
                                                                  monkeypatch):
    # Its header opens (so the start-up probe passes) but every decode fails.
    (tmp_path / "x.mp4").write_bytes((bad_videos / "truncated_faststart.mp4").read_bytes())
    monkeypatch.setattr(bad_data, "MAX_CONSECUTIVE_BAD", 20)
    pipeline = make_train_pipeline(_config(tmp_path), process_index=0, process_count=1)
    with pytest.raises(RuntimeError, match="(?s)20 records in a row.*decode_error: x.mp4"):
        next(pipeline)


def test_a_source_with_no_readable_file_fails_at_start(tmp_path, bad_videos):
    (tmp_path / "corrupt.mp4").write_bytes((bad_videos / "corrupt.mp4").read_bytes())
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "truncated.mp4").write_bytes((bad_videos / "truncated.mp4").read_bytes())
    with pytest.raises(ValueError, match="none of the 3 record\\(s\\) is readable") as e:
        make_train_pipeline(_config(tmp_path), process_index=0, process_count=1)
    assert "empty_file" in str(e.value) and "unreadable" in str(e.value)
    (tmp_path / "bad.png").write_bytes(b"PNG? no")
    with pytest.raises(ValueError, match="none of the 1 record"):
        sources.image_folder(tmp_path)
    (tmp_path / "no_media").mkdir()
    with pytest.raises(FileNotFoundError, match="no image files"):
        sources.image_folder(tmp_path / "no_media")
