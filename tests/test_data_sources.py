"""Sources and samples with real decoding: folders, captions, strides, crops, flips."""

import json

import numpy as np
import pytest
from PIL import Image

from cvvae_jax import assets
from cvvae_jax.data import sources, testing
from cvvae_jax.data.decode import VideoReader
from cvvae_jax.data.transforms import SampleSpec, load_sample


def _record(path, media="video", caption=""):
    return {"media": media, "data": str(path), "name": path.name, "caption": caption}


@pytest.fixture(scope="module")
def indexed_video(tmp_path_factory):
    path = tmp_path_factory.mktemp("indexed") / "v40.mp4"
    testing.write_indexed_video(path, 40, size=(32, 48))
    return path


def test_video_folder_is_recursive_sorted_and_reads_captions(tmp_path):
    for rel in ("b.mp4", "sub/a.webm", "sub/deeper/c.MOV", "notes.txt", "d.avi.txt"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
    testing.write_indexed_video(tmp_path / "b.mp4", 5)
    testing.write_indexed_video(tmp_path / "sub/a.webm", 5, codec="libvpx-vp9")
    testing.write_indexed_video(tmp_path / "sub/deeper/c.MOV", 5)
    (tmp_path / "notes.txt").write_text("not a video")
    (tmp_path / "meta.csv").write_text("file,caption\nb.mp4,bee\nsub/a.webm,ay\nc,sea\n")
    src = sources.video_folder(tmp_path, metadata=tmp_path / "meta.csv")
    assert src.files == ["b.mp4", "sub/a.webm", "sub/deeper/c.MOV"]
    # Matched by relative path, by path, and by stem (WebVid-style ids).
    assert [src[i]["caption"] for i in range(len(src))] == ["bee", "ay", "sea"]
    assert src[1] == {"media": "video", "data": str(tmp_path / "sub/a.webm"),
                      "name": "sub/a.webm", "caption": "ay"}

    (tmp_path / "meta.json").write_text(json.dumps([{"path": "b.mp4", "text": "B"}]))
    src = sources.video_folder(tmp_path, metadata=tmp_path / "meta.json",
                               file_key="path", caption_key="text")
    assert [r["caption"] for r in (src[0], src[1])] == ["B", ""]
    (tmp_path / "meta.jsonl").write_text('{"file": "b.mp4", "caption": "jl"}\n')
    assert sources.video_folder(tmp_path, metadata=tmp_path / "meta.jsonl")[0]["caption"] == "jl"
    with pytest.raises(KeyError, match="set file_key"):
        sources.video_folder(tmp_path, metadata=tmp_path / "meta.json")


def test_caption_files_from_spreadsheets_and_their_gaps(tmp_path, caplog):
    for name in ("a.mp4", "b.mp4"):
        testing.write_indexed_video(tmp_path / name, 5)
    # Excel writes UTF-8 CSVs with a byte-order mark; extensions may come without the dot.
    (tmp_path / "bom.csv").write_text("\ufefffile,caption\na.mp4,ay\n", encoding="utf-8")
    with caplog.at_level("WARNING"):
        src = sources.FolderSource(tmp_path, media="video", extensions="mp4",
                                   metadata=tmp_path / "bom.csv")
    assert src.captions == ["ay", ""]
    assert '1 of 2 files have no caption row and get "" (e.g. b.mp4)' in caplog.text
    (tmp_path / "rows.jsonl").write_text('{"file": "a.mp4", "caption": "x"}\n{"file": "b.mp4"}\n')
    with pytest.raises(KeyError, match=r"rows.jsonl row 2: no column/key \['caption'\]"):
        sources.video_folder(tmp_path, metadata=tmp_path / "rows.jsonl")


def test_webm_without_frame_count_uses_its_duration(tmp_path):
    testing.write_indexed_video(tmp_path / "v.webm", 20, codec="libvpx-vp9")
    with VideoReader(tmp_path / "v.webm") as reader:
        assert reader.num_frames == 20
        np.testing.assert_array_equal(testing.frame_ids(reader.read(3, 4, 5)),
                                      [3, 7, 11, 15, 19])


def test_seeking_reads_the_same_frames_as_decoding_from_the_start(tmp_path):
    path = tmp_path / "gop8.mp4"
    testing.write_indexed_video(path, 100, keyframe_interval=8)
    with VideoReader(path) as reader:
        full = reader.read(0, 1, 100)
    np.testing.assert_array_equal(testing.frame_ids(full), np.arange(100))
    with VideoReader(path) as reader:
        part = reader.read(50, 3, 9)  # start >= 32: seeks to the keyframe at 48
    np.testing.assert_array_equal(part, full[50:75:3])
    with VideoReader(path) as reader:  # runs off the end: fewer frames, not an error
        np.testing.assert_array_equal(testing.frame_ids(reader.read(90, 3, 9)),
                                      [90, 93, 96, 99])


def test_train_clips_follow_a_sampled_stride_and_fit_the_video(indexed_video):
    spec = SampleSpec(frames=9, size=(16, 16), stride=(1, 8), train=True)
    strides = set()
    for seed in range(12):
        sample = load_sample(_record(indexed_video), spec, np.random.default_rng(seed))
        video = sample["video"]
        assert video.shape == (9, 16, 16, 3) and video.dtype == np.float32
        assert -1.0 <= video.min() and video.max() <= 1.0
        ids = testing.frame_ids(video)
        steps = set(np.diff(ids))
        assert len(steps) == 1, ids  # one stride per clip
        strides |= steps
        assert ids[0] >= 0 and ids[-1] <= 39
        assert sample["bad"].sum() == 0 and sample["bad_names"] == ""
    # 40 frames fit 9-frame clips at strides 1..4 only.
    assert strides <= {1, 2, 3, 4} and len(strides) >= 3


def test_eval_clips_are_the_first_frames_at_the_fixed_stride(indexed_video):
    spec = SampleSpec(frames=9, size=(16, 16), stride=(3, 3), train=False)
    a = load_sample(_record(indexed_video), spec, None)
    b = load_sample(_record(indexed_video), spec, None)
    np.testing.assert_array_equal(testing.frame_ids(a["video"]), np.arange(0, 27, 3))
    np.testing.assert_array_equal(a["video"], b["video"])


def _half_black_half_white(path):
    pixels = np.zeros((32, 64, 3), np.uint8)
    pixels[:, 32:] = 255
    Image.fromarray(pixels).save(path)
    return pixels


def test_flip_mirrors_whole_samples_half_the_time(tmp_path):
    pixels = _half_black_half_white(tmp_path / "lr.png")
    expected = pixels.astype(np.float32) / 127.5 - 1.0
    record = _record(tmp_path / "lr.png", media="image")
    flipped = []
    for seed in range(16):
        spec = SampleSpec(frames=1, size=(32, 64), stride=(1, 1), train=True, flip=True)
        (frame,) = load_sample(record, spec, np.random.default_rng(seed))["video"]
        if np.array_equal(frame, expected[:, ::-1]):
            flipped.append(True)
        else:
            np.testing.assert_array_equal(frame, expected)
            flipped.append(False)
    assert 3 <= sum(flipped) <= 13
    spec = SampleSpec(frames=1, size=(32, 64), stride=(1, 1), train=True, flip=False)
    for seed in range(8):
        (frame,) = load_sample(record, spec, np.random.default_rng(seed))["video"]
        np.testing.assert_array_equal(frame, expected)  # exactly -1 and 1


def test_crops_are_centred_for_eval_and_vary_for_train(tmp_path):
    pixels = np.zeros((32, 96, 3), np.uint8)
    pixels[..., 0] = np.arange(96, dtype=np.uint8)[None, :] * 2  # a left-right ramp
    Image.fromarray(pixels).save(tmp_path / "ramp.png")
    record = _record(tmp_path / "ramp.png", media="image")
    eval_spec = SampleSpec(frames=1, size=(32, 32), stride=(1, 1), train=False)
    (frame,) = load_sample(record, eval_spec, None)["video"]
    np.testing.assert_array_equal(frame, pixels[:, 32:64] / np.float32(127.5) - 1)
    train_spec = SampleSpec(frames=1, size=(32, 32), stride=(1, 1), train=True)
    firsts = [load_sample(record, train_spec, np.random.default_rng(s))["video"][0, 0, 0, 0]
              for s in range(20)]
    lefts = {round(float(x + 1) * 127.5) // 2 for x in firsts}  # the ramp is 2 x column
    assert len(lefts) > 5 and min(lefts) >= 0 and max(lefts) <= 64


def test_bundled_clips_and_images_make_samples():
    folder = assets.path(assets.CLIPS[0]).parent
    videos, images = sources.video_folder(folder), sources.image_folder(folder)
    assert videos.files == list(assets.CLIPS) and images.files == list(assets.IMAGES)
    spec = SampleSpec(frames=17, size=(64, 64), stride=(1, 4), train=True, flip=True)
    clip = load_sample(videos[1], spec, np.random.default_rng(0))["video"]
    assert clip.shape == (17, 64, 64, 3)
    assert -1.0 <= clip.min() < -0.5 and 0.5 < clip.max() <= 1.0
    assert np.abs(np.diff(clip, axis=0)).mean() > 0.01  # the camera moves in clip_b
    spec = SampleSpec(frames=1, size=(64, 64), stride=(1, 1), train=False)
    still = load_sample(images[0], spec, None)["video"]
    assert still.shape == (1, 64, 64, 3) and still.std() > 0.05


def test_videos_with_a_display_rotation_are_sampled_upright(tmp_path):
    # Stored 32x48 and turned clockwise for the display: 48x32 (H x W) upright.
    path = tmp_path / "phone.mp4"
    testing.write_corner_video(path, 9, size=(32, 48), rotation=-90)
    with VideoReader(str(path)) as reader:
        assert (reader.height, reader.width, reader.upright_size()) == (32, 48, (48, 32))
        frames = reader.read(0, 1, 9, size=(24, 16))
    assert frames.shape == (9, 24, 16, 3) and testing.white_box(frames[0]) == ((0, 12), (3, 15))
    # A tall crop fits inside the upright frame without enlarging it.
    spec = SampleSpec(frames=9, size=(40, 24), stride=(1, 1), train=False)
    sample = load_sample(_record(path), spec, None)
    assert sample["video"].shape == (9, 40, 24, 3) and sample["bad"].sum() == 0
    # Scaled by 5/6 to 40x27, centre-cropped from column 1: the square's columns 24..31 -> 19..25.
    (top, left), (bottom, right) = testing.white_box(sample["video"][0])
    assert (top, right) == (0, 23) and 18 <= left <= 20 and 5 <= bottom <= 7, (left, bottom)
