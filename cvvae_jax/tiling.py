"""The official frame chunking and spatial tiling, above the network.

`CVVAEModel.tiled_encode/decode` split a video into overlapping frame chunks
and each chunk into overlapping square tiles, run the network per piece, blend
tile overlaps linearly and crop. This module reproduces the same boundaries and
the same blending order (the official blend writes into tiles in place, so a
tile's overlap is blended with neighbours that were themselves already
blended). The per-piece function is a jitted network, so each distinct piece
shape compiles once; blending stays on device, with no host round trips.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp

Fn = Callable[[jax.Array], jax.Array]


def chunk_bounds(n_frames: int, per_chunk: int | None) -> list[tuple[int, int]]:
    """Frame ranges of the official chunks: [n*s, (n+1)*s + 1), ceil((T-1)/s) of them.

    Consecutive chunks share one frame: each chunk's first frame gives the causal
    context and its output frame is dropped (but for the first chunk).
    """
    if per_chunk is None:
        return [(0, n_frames)]
    rounds = max(1, math.ceil((n_frames - 1) / per_chunk))
    return [(n * per_chunk, min(n_frames, (n + 1) * per_chunk + 1)) for n in range(rounds)]


def tile_starts(size: int, stride: int, tile: int) -> list[int]:
    """Start offsets of tiles along one axis: every `stride`, until a tile reaches the end."""
    starts = []
    for i in range(0, size, stride):
        starts.append(i)
        if i + tile >= size:
            break
    return starts


@dataclasses.dataclass(frozen=True)
class TilePlan:
    """Tile geometry of one direction, in the input and output spaces of the network."""

    tile_in: int
    stride_in: int
    overlap_out: int
    stride_out: int

    @classmethod
    def for_encode(cls, pixel_tile: int, factor: int, ratio: float) -> "TilePlan":
        latent_tile = pixel_tile // factor
        overlap = round(latent_tile * ratio)
        return cls(pixel_tile, round(pixel_tile * (1 - ratio)), overlap, latent_tile - overlap)

    def count(self, height: int, width: int) -> int:
        """How many tiles `tiled` runs on an input of height x width."""
        if max(height, width) <= self.tile_in:
            return 1
        return (len(tile_starts(height, self.stride_in, self.tile_in))
                * len(tile_starts(width, self.stride_in, self.tile_in)))

    @classmethod
    def for_decode(cls, pixel_tile: int, factor: int, ratio: float) -> "TilePlan":
        overlap = round(pixel_tile * ratio)
        return cls(pixel_tile // factor, round(pixel_tile // factor * (1 - ratio)), overlap,
                   pixel_tile - overlap)


def _blend(a: jax.Array, b: jax.Array, n: int, axis: int) -> jax.Array:
    """b with its first n entries along `axis` replaced by a ramp from a's last n to b's."""
    if n == 0:
        return b
    shape = [1] * b.ndim
    shape[axis] = n
    w = (jnp.arange(n, dtype=jnp.float32) / n).reshape(shape)
    head_a = jax.lax.slice_in_dim(a, a.shape[axis] - n, a.shape[axis], axis=axis)
    head_b = jax.lax.slice_in_dim(b, 0, n, axis=axis)
    mixed = ((1 - w) * head_a + w * head_b).astype(b.dtype)
    return jnp.concatenate([mixed, jax.lax.slice_in_dim(b, n, b.shape[axis], axis=axis)], axis)


def tiled(fn: Fn, x: jax.Array, plan: TilePlan | None,
          on_tile: Callable[[], None] | None = None) -> jax.Array:
    """Apply `fn` to overlapping (H, W) tiles of a (B, T, H, W, C) array and stitch.

    `on_tile()` runs after each tile has finished computing (for progress bars); each
    tile is waited for only once the next one is dispatched, so that the host's work
    still overlaps the device's.
    """
    outs = []

    def run(piece: jax.Array) -> jax.Array:
        y = fn(piece)
        if on_tile is not None and outs:
            jax.block_until_ready(outs[-1])
            on_tile()
        outs.append(y)
        return y

    def last_done() -> None:
        if on_tile is not None:
            jax.block_until_ready(outs[-1])
            on_tile()

    h_axis, w_axis = 2, 3
    if plan is None or max(x.shape[h_axis], x.shape[w_axis]) <= plan.tile_in:
        y = run(x)
        last_done()
        return y
    rows = [
        [run(x[:, :, i:i + plan.tile_in, j:j + plan.tile_in])
         for j in tile_starts(x.shape[w_axis], plan.stride_in, plan.tile_in)]
        for i in tile_starts(x.shape[h_axis], plan.stride_in, plan.tile_in)
    ]
    last_done()
    for i, row in enumerate(rows):
        for j, tile in enumerate(row):
            if i > 0:
                tile = _blend(rows[i - 1][j], tile, plan.overlap_out, h_axis)
            if j > 0:
                tile = _blend(row[j - 1], tile, plan.overlap_out, w_axis)
            row[j] = tile
    out_rows = []
    for i, row in enumerate(rows):
        cropped = [t if j == len(row) - 1 else t[:, :, :, :plan.stride_out]
                   for j, t in enumerate(row)]
        r = jnp.concatenate(cropped, axis=w_axis)
        out_rows.append(r if i == len(rows) - 1 else r[:, :, :plan.stride_out])
    return jnp.concatenate(out_rows, axis=h_axis)


def chunked(fn: Fn, x: jax.Array, per_chunk: int | None) -> jax.Array:
    """Apply `fn` to the official frame chunks of x (axis 1) and join them."""
    bounds = chunk_bounds(x.shape[1], per_chunk)
    outs = []
    for n, (a, b) in enumerate(bounds):
        # One chunk takes x itself: on an accelerator each eager slice is a dispatch and a copy.
        y = fn(x if len(bounds) == 1 else x[:, a:b])
        outs.append(y if n == 0 else y[:, 1:])
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=1)
