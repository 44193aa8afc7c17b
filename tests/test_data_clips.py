"""Clip windows, resize arithmetic, the mixing schedule and config checks: no decoding."""

import collections

import numpy as np
import pytest

from cvvae_jax.data import clips, config, mixing, transforms


def test_clip_lengths_are_one_plus_multiples_of_four():
    for frames in (1, 5, 9, 17, 33):
        clips.check_frames(frames)
    for frames, nearest in ((0, "1 or 5"), (2, "1 or 5"), (8, "5 or 9"), (16, "13 or 17")):
        with pytest.raises(ValueError, match=rf"frames={frames}: .* 1 \+ 4k frames \(nearest valid: {nearest}\)"):
            clips.check_frames(frames)


def test_train_window_draws_fitting_strides_uniformly_and_valid_starts():
    rng = np.random.default_rng(0)
    draws = [clips.train_window(40, 9, (1, 8), rng) for _ in range(800)]
    strides = collections.Counter(s for _, s in draws)
    # span(9, 4) = 33 <= 40 < 41 = span(9, 5): strides 1..4 fit, each ~200 times.
    assert set(strides) == {1, 2, 3, 4}
    assert all(150 < n < 250 for n in strides.values()), strides
    assert all(0 <= start and start + 8 * s <= 39 for start, s in draws)
    starts_at_stride_1 = {start for start, s in draws if s == 1}
    assert min(starts_at_stride_1) == 0 and max(starts_at_stride_1) == 31


def test_too_short_video_starts_at_zero_with_the_smallest_stride():
    assert clips.train_window(5, 9, (2, 8), np.random.default_rng(0)) == (0, 2)


def test_pad_repeats_the_last_frame():
    frames = np.arange(3)[:, None] * np.ones((3, 2))
    padded = clips.pad_frames(frames, 5)
    np.testing.assert_array_equal(padded[:, 0], [0, 1, 2, 2, 2])
    assert clips.pad_frames(frames, 3) is frames


def test_cover_size_scales_the_shorter_side():
    assert transforms.cover_size(144, 256, (256, 256)) == (256, 455)
    assert transforms.cover_size(720, 1280, (256, 256)) == (256, 455)
    assert transforms.cover_size(300, 200, (256, 256)) == (384, 256)
    # A wide target on a square frame: the width decides.
    assert transforms.cover_size(100, 100, (64, 128)) == (128, 128)


def test_schedule_alternates_equal_weights_and_spreads_unequal_ones():
    s = mixing.Schedule({"videos": 0.5, "images": 0.5})
    assert [s(i) for i in range(6)] == ["videos", "images"] * 3
    s = mixing.Schedule({"a": 3, "b": 1})
    assert s.cycle == ("a", "a", "b", "a")
    s = mixing.Schedule({"a": 0.7, "b": 0.3})
    assert s.period == 10 and s.counts == {"a": 7, "b": 3}
    steps = [s(i) for i in range(1000)]
    assert steps.count("a") == 700
    b_steps = [i for i, n in enumerate(steps) if n == "b"]
    assert max(np.diff(b_steps)) <= 4  # smooth: no long runs without "b"


def test_schedule_is_a_pure_function_of_the_step():
    weights = {"v17": 0.25, "v9": 0.25, "img": 0.5}
    a, b = mixing.Schedule(weights), mixing.Schedule(dict(weights))
    assert [a(i) for i in range(50)] == [b(i) for i in range(50)]
    assert a(123_457) == a(123_457 % a.period)
    with pytest.raises(ValueError, match="step"):
        a(-1)


def test_schedule_rejects_non_positive_weights_and_rounds_odd_ones():
    with pytest.raises(ValueError, match="> 0"):
        mixing.Schedule({"a": 1.0, "b": 0.0})
    counts = mixing.integer_weights({"a": 1.0, "b": np.pi}, max_period=100)
    assert sum(counts.values()) == 100 and counts == {"a": 24, "b": 76}


def test_sample_spec_checks():
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        transforms.SampleSpec(frames=8, size=(64, 64), stride=(1, 1), train=True)
    with pytest.raises(ValueError, match="stride"):
        transforms.SampleSpec(frames=9, size=(64, 64), stride=(3, 2), train=True)
    with pytest.raises(ValueError, match="short_clip"):
        transforms.SampleSpec(frames=9, size=(64, 64), stride=(1, 1), train=True,
                              short_clip="loop")
    with pytest.raises(ValueError, match="eval samples are never flipped"):
        transforms.SampleSpec(frames=9, size=(64, 64), stride=(1, 1), train=False, flip=True)


def test_default_config_parses_and_entries_are_checked():
    c = config.default_config()
    train = config.parse_sources(c.sources)
    assert [(s.name, s.media, s.frames, s.size, s.batch_size) for s in train] == [
        ("videos", "video", 17, (256, 256), 1), ("images", "image", 1, (320, 320), 8)]
    assert train[0].stride == (1, 8)
    (ev,) = config.parse_sources(c.eval_sources)
    assert (ev.frames, ev.stride, ev.size) == (33, (3, 3), (256, 256))

    base = {"name": "v", "kind": "video_folder", "path": "/x", "frames": 9, "size": (64, 64),
            "batch_size": 1}
    with pytest.raises(ValueError, match="unknown field.*'strides'"):
        config.parse_source({**base, "strides": (1, 2)})
    with pytest.raises(ValueError, match="missing field.*'size'"):
        config.parse_source({k: v for k, v in base.items() if k != "size"})
    with pytest.raises(ValueError, match="frames must be 1"):
        config.parse_source({**base, "kind": "image_folder"})
    with pytest.raises(ValueError, match="needs `tfds_name`"):
        config.parse_source({**base, "kind": "tfds"})
    with pytest.raises(ValueError, match="unique"):
        config.parse_sources([base, base])
    # Types are checked at start, naming the source (they failed inside the first batch).
    for change, message in (({"frames": 9.0}, "frames must be an integer, got 9.0"),
                            ({"size": (64.0, 64)}, r"size must be two integers, got \(64.0, 64\)"),
                            ({"batch_size": 1.5}, "batch_size must be an integer"),
                            ({"stride": 2.0}, "stride must be two integers"),
                            ({"kind": "tfds", "tfds_name": "t", "video_key": "v", "image_key": "i"},
                             "set one of video_key / image_key")):
        with pytest.raises(ValueError, match=f"source 'v': {message}"):
            config.parse_source({**base, **change})
