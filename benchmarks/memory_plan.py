"""Memory of chunked/tiled encode or decode from XLA's buffer assignment, without running it.

    python benchmarks/memory_plan.py --shape 61x576x1024 --direction decode [--dtype fp32]

Running a 61x576x1024 decode takes hours on a CPU; how much memory it needs does
not. `vae.encode`/`decode` run one jitted network call per frame chunk and spatial
tile (`tiling.py`), so the peak is set by the largest piece, not by the video's
length. This script lowers and compiles each distinct piece shape (codec.py's plan)
and reads `compiled.memory_analysis()`: argument, output and temporary bytes as XLA
assigned them. The bound it prints for the whole call adds what lives beside the
largest piece: the parameters, the input, and every piece output kept until the
chunks and tiles are stitched (plus the stitched result). It is a plan, not a
measured RSS: allocator overhead, the XLA runtime and Python come on top, which
`codec.py`'s peak RSS column measures when the call is actually run.
"""

from __future__ import annotations

import argparse
from collections import Counter

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import common
from codec import build, model_config, parse_optional_int, parse_shape, piece_shapes
from cvvae_jax import dtypes
from cvvae_jax.pretrained import jitted_part

GIB = 2**30


def out_shape(cfg, shape, encode: bool) -> tuple[int, ...]:
    b, t, h, w, _ = shape
    if encode:
        return (b, 1 + (t - 1) // cfg.time_factor, h // cfg.space_factor, w // cfg.space_factor,
                2 * cfg.latent_channels)
    return (b, 1 + (t - 1) * cfg.time_factor, h * cfg.space_factor, w * cfg.space_factor, 3)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=parse_shape, default=(61, 576, 1024), help="T x H x W (pixels)")
    p.add_argument("--direction", choices=("encode", "decode"), default="decode")
    p.add_argument("--dtype", type=dtypes.arg(), default="float32", help="compute dtype: fp32 or bf16")
    p.add_argument("--config", default="default")
    p.add_argument("--weights", default=None)
    p.add_argument("--subfolder", default=None)
    p.add_argument("--tile", type=parse_optional_int, default=None)
    p.add_argument("--chunk", type=parse_optional_int, default=None)
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args()
    encode = args.direction == "encode"
    cfg = model_config(args)
    t, h, w = args.shape
    if encode:
        full_in = (args.batch, t, h, w, cfg.in_channels)
    else:
        full_in = (args.batch, 1 + (t - 1) // cfg.time_factor, h // cfg.space_factor,
                   w // cfg.space_factor, cfg.latent_channels)
    dtype = jnp.dtype(args.dtype)
    vae = nnx.eval_shape(lambda: build(args, dtype))
    graphdef, state = nnx.split(vae)
    fn = jitted_part(graphdef, "encode_moments" if encode else "decode_latents")
    pieces = piece_shapes(cfg, full_in, encode=encode)
    print(common.machine_line(common.machine()))
    rows, peak_piece = [], 0
    for shape, count in Counter(pieces).items():
        compiled = fn.lower(state, jax.ShapeDtypeStruct(shape, dtype)).compile()
        m = compiled.memory_analysis()
        piece = m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
        peak_piece = max(peak_piece, piece)
        rows.append(["x".join(map(str, shape[1:4])), count,
                     f"{m.argument_size_in_bytes / GIB:.2f}", f"{m.output_size_in_bytes / GIB:.2f}",
                     f"{m.temp_size_in_bytes / GIB:.2f}", f"{piece / GIB:.2f}"])
    itemsize = np.dtype(dtype).itemsize
    outputs = sum(np.prod(out_shape(cfg, s, encode)) for s in pieces) * itemsize
    final = np.prod(out_shape(cfg, full_in, encode)) * itemsize
    inputs = np.prod(full_in) * 4
    bound = peak_piece + outputs + final + inputs
    print(f"{args.direction} {t}x{h}x{w} ({args.dtype}): {len(pieces)} network calls; chunk "
          f"en_de_n_frames_a_time={cfg.en_de_n_frames_a_time}, tile_spatial_size="
          f"{cfg.tile_spatial_size}")
    print(common.table(["piece T x H x W (input)", "calls", "arguments GiB (params + input)",
                        "output GiB", "temporaries GiB", "piece total GiB"], rows))
    print(f"bound for the whole call: largest piece {peak_piece / GIB:.2f} GiB + piece outputs "
          f"kept for stitching {outputs / GIB:.2f} GiB + stitched result {final / GIB:.2f} GiB + "
          f"input {inputs / GIB:.2f} GiB = {bound / GIB:.2f} GiB (XLA buffer assignment; the "
          f"runtime, allocator and Python come on top)")


if __name__ == "__main__":
    main()
