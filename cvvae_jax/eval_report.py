"""What eval.py shows people: the Table-1-style markdown table and side-by-side examples."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from . import media

LABELS = {"image_vae": "image VAE (per frame)", "cvvae": "CV-VAE"}
MEDIA = {"videos": "video", "images": "image"}
FORMATS = {"psnr": ("PSNR", "{:.2f}"), "ssim": ("SSIM", "{:.4f}"), "lpips": ("LPIPS", "{:.4f}")}
ABSENT, NOT_APPLICABLE = "n/a", "-"
# Review speed for 4-8x subsampled clips; the source frame rate is not kept by the pipeline.
EXAMPLE_FPS = 8.0


def _cell(metric: str, value: float | None) -> str:
    return ABSENT if value is None else FORMATS[metric][1].format(value)


def markdown_table(results: dict[str, Any]) -> str:
    """Rows: the image VAE baseline (if run), then the CV-VAE; columns: PSNR / SSIM / LPIPS
    per data kind, then the compatibility PSNR / SSIM per data kind. A kind with no clip
    (all skipped) shows n/a."""
    agg = results["aggregate"]
    factor = results["protocol"]["time_factor"]
    header = ["model", "time compression"]
    header += [f"{MEDIA[s]} {FORMATS[m][0]}" for s in agg for m in FORMATS]
    header += [f"compat {MEDIA[s]} {FORMATS[m][0]}" for s in agg for m in ("psnr", "ssim")]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, compression in (("image_vae", 1), ("cvvae", factor)):
        if not any(row in a for a in agg.values()):
            continue
        cells = [LABELS[row], f"{compression}x"]
        cells += [_cell(m, agg[s].get(row, {}).get(m)) for s in agg for m in FORMATS]
        cells += [_cell(m, agg[s].get("compat", {}).get(m)) if row == "cvvae" else NOT_APPLICABLE
                  for s in agg for m in ("psnr", "ssim")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_example(directory: Path, source: str, index: int, name: str,
                  clip: dict[str, np.ndarray], *, time_factor: int) -> None:
    """A PNG grid (and for videos an mp4) of one clip: input | CV-VAE | image VAE per
    frame | the image VAE's decoding of the CV-VAE latents."""
    directory.mkdir(parents=True, exist_ok=True)
    x = clip["input"]
    t = x.shape[0]
    # Latent frame j stands for input frames 4j-3 .. 4j: repeat it to align in time.
    view = clip["compat"][[(i + time_factor - 1) // time_factor for i in range(t)]]
    rows, labels = [x, clip["cvvae"]], ["input", "CV-VAE"]
    if "image_vae" in clip:
        rows.append(clip["image_vae"])
        labels.append("image VAE")
    rows.append(view)
    labels.append("compat")
    stem = directory / f"{source}_{index:03d}_{Path(name).stem}"
    media.frame_grid_png(stem.with_suffix(".png"), rows, labels=labels, n_frames=min(4, t))
    if t > 1:
        media.write_video(stem.with_suffix(".mp4"), media.side_by_side(*rows), fps=EXAMPLE_FPS)
