"""Input pipeline throughput on the bundled clips: 17x256x256 train clips, 0/1/2 workers.

    python benchmarks/input_pipeline.py [--workers 0 1 2] [--batches 12] [--runs 3]

For each worker count: build the train pipeline over the bundled clips (random
stride 1..8 among those that fit, random crop and flip, float32 in [-1, 1]),
take --warmup batches (worker start-up, first decodes), then time --runs runs
of --batches batches each and report the median. "frames/s" counts the clip
frames delivered (decoded, scaled, cropped): batches x batch size x 17.
The numbers depend on free CPU cores: each worker is a process, and with 0
workers the decoding threads share the trainer's process.
"""

from __future__ import annotations

import argparse
import statistics
import time

import common

from cvvae_jax import assets
from cvvae_jax.data import default_config, make_train_pipeline

FRAMES, SIZE = 17, (256, 256)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batches", type=int, default=12, help="batches per timed run")
    p.add_argument("--runs", type=int, default=3, help="timed runs (median reported)")
    p.add_argument("--warmup", type=int, default=4, help="batches before timing")
    p.add_argument("--batch_size", type=int, default=1)
    p.add_argument("--read_threads", type=int, default=default_config().read_threads)
    return p.parse_args(argv)


def measure(num_workers: int, args: argparse.Namespace) -> tuple[float, list[float]]:
    """(median seconds per run, all run times) for one worker count."""
    config = default_config()
    config.sources = [{"name": "clips", "kind": "video_folder",
                       "path": str(assets.path(assets.CLIPS[0]).parent),
                       "frames": FRAMES, "size": SIZE, "stride": (1, 8),
                       "batch_size": args.batch_size}]
    config.num_workers = num_workers
    config.read_threads = args.read_threads
    pipeline = make_train_pipeline(config, process_index=0, process_count=1)
    try:
        for _ in range(args.warmup):
            next(pipeline)
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            for _ in range(args.batches):
                _, batch = next(pipeline)
            times.append(time.perf_counter() - start)
        assert batch["video"].shape == (args.batch_size, FRAMES, *SIZE, 3)
    finally:
        pipeline.close()
    return statistics.median(times), times


def main(argv=None) -> None:
    args = parse_args(argv)
    print(common.machine_line(common.machine()))
    print(f"bundled clips {', '.join(assets.CLIPS)} (81 frames, 256x144) -> "
          f"{FRAMES}x{SIZE[0]}x{SIZE[1]}, batch {args.batch_size}, "
          f"{args.read_threads} read thread(s) per process, "
          f"median of {args.runs} runs x {args.batches} batches after {args.warmup} warm-up")
    print("| workers | frames/s | batches/s | run times (s) |")
    print("|---|---|---|---|")
    for workers in args.workers:
        median, times = measure(workers, args)
        batches_per_s = args.batches / median
        frames_per_s = batches_per_s * args.batch_size * FRAMES
        print(f"| {workers} | {frames_per_s:.0f} | {batches_per_s:.2f} | "
              f"{', '.join(f'{t:.2f}' for t in times)} |", flush=True)


if __name__ == "__main__":
    main()
