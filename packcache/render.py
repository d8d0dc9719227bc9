"""Token grids -> images: a PNG strip of all frames and an animated GIF (Pillow), written atomically."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from packcache.budget import atomic_write_text
from packcache.demo.clips import PALETTE

__all__ = ["frames_to_rgb", "render_strip", "render_sheet", "render_gif", "MASK_RGB"]

#: Colour of any id outside the palette (e.g. the mask token).
MASK_RGB = (128, 128, 128)


def frames_to_rgb(frames: np.ndarray, palette: Sequence[tuple[int, int, int]] = PALETTE, cell: int = 16
                  ) -> np.ndarray:
    """``frames [T, H, W]`` token ids -> ``uint8 [T, H*cell, W*cell, 3]``; ids outside the palette are grey."""
    frames = np.asarray(frames, dtype=np.int64)
    if frames.ndim == 2:
        frames = frames[None]
    if frames.ndim != 3:
        raise ValueError(f"frames must be [T, H, W] (or one [H, W] grid), got shape {frames.shape}")
    lut = np.array(list(palette) + [MASK_RGB], dtype=np.uint8)
    ids = np.where((frames >= 0) & (frames < len(palette)), frames, len(palette))
    rgb = lut[ids]
    return rgb.repeat(cell, axis=1).repeat(cell, axis=2)


def _save(image: Image.Image, path: str | os.PathLike, **kwargs) -> None:
    buf = io.BytesIO()
    image.save(buf, **kwargs)
    atomic_write_text(path, buf.getvalue())


def render_strip(frames: np.ndarray, path: str | os.PathLike, *, cell: int = 16, gap: int = 4,
                 palette: Sequence[tuple[int, int, int]] = PALETTE) -> None:
    """All frames side by side, separated by ``gap`` white pixels, as a PNG."""
    render_sheet([frames], path, cell=cell, gap=gap, palette=palette)


def render_sheet(videos: Sequence[np.ndarray], path: str | os.PathLike, *, cell: int = 16, gap: int = 4,
                 row_gaps: Sequence[int] | None = None, palette: Sequence[tuple[int, int, int]] = PALETTE) -> None:
    """One strip per video (``[T, H, W]`` each, same shape), stacked top to bottom, as a PNG. ``row_gaps[i]`` is the
    white space above row ``i + 1`` (default ``gap``), e.g. wider between pairs of generated / ground-truth rows."""
    rgbs = [frames_to_rgb(v, palette, cell) for v in videos]
    if not rgbs or any(r.shape != rgbs[0].shape for r in rgbs):
        raise ValueError("render_sheet needs one or more videos of the same shape")
    t, h, w, _ = rgbs[0].shape
    gaps = list(row_gaps) if row_gaps is not None else [gap] * (len(rgbs) - 1)
    if len(gaps) != len(rgbs) - 1:
        raise ValueError(f"row_gaps needs {len(rgbs) - 1} entries, got {len(gaps)}")
    tops = np.concatenate([[0], np.cumsum([h + g for g in gaps])]).astype(int)
    sheet = np.full((tops[-1] + h, t * w + (t - 1) * gap, 3), 255, dtype=np.uint8)
    for top, rgb in zip(tops, rgbs):
        for i in range(t):
            sheet[top : top + h, i * (w + gap) : i * (w + gap) + w] = rgb[i]
    _save(Image.fromarray(sheet), path, format="PNG")


def render_gif(frames: np.ndarray, path: str | os.PathLike, *, cell: int = 16, duration_ms: int = 300,
               palette: Sequence[tuple[int, int, int]] = PALETTE) -> None:
    """The frames as a looping animated GIF."""
    images = [Image.fromarray(f) for f in frames_to_rgb(frames, palette, cell)]
    _save(images[0], path, format="GIF", save_all=True, append_images=images[1:], duration=duration_ms, loop=0)


def main(argv: list[str] | None = None) -> None:
    """``python -m packcache.render [--model DIR] [--out DIR] [--clips N]``: generate held-out demo videos with a full
    cache and write ``<name>.png`` (for each clip, the generated strip above the ground truth), ``<name>.gif`` and
    ``<name>.json`` (the :class:`VideoResult`) of the first clip."""
    import argparse
    from pathlib import Path

    import torch

    from packcache.demo import load_demo_model, make_clip
    from packcache.demo.train import heldout_seeds
    from packcache.policies import FullCache
    from packcache.runtime import generate_video

    p = argparse.ArgumentParser(description="Render full-cache demo videos beside the ground truth (PNG + GIF).")
    p.add_argument("--model", default=None, help="demo checkpoint (default: the shipped one)")
    p.add_argument("--out", default="data/samples")
    p.add_argument("--name", default="demo-full-cache")
    p.add_argument("--clip", type=int, default=0, help="index of the first held-out clip")
    p.add_argument("--clips", type=int, default=4, help="number of consecutive held-out clips (default 4)")
    p.add_argument("--frames", type=int, default=13)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--cfg-scale", type=float, default=1.0)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model = load_demo_model(args.model)
    out = Path(args.out)
    rows, results = [], []
    for i in range(args.clips):
        clip = make_clip(heldout_seeds(1, start=args.clip + i)[0], args.frames)
        result = generate_video(model, clip.text, clip.frames[0], args.frames, FullCache(), steps=args.steps,
                                cfg_scale=args.cfg_scale)
        result.meta["prompt_text"] = clip.prompt
        rows += [result.frames, clip.frames]
        results.append(result)
        print(f"clip {args.clip + i}: prompt {clip.prompt!r}", flush=True)
    render_sheet(rows, out / f"{args.name}.png", row_gaps=[2 if r % 2 == 0 else 16 for r in range(len(rows) - 1)])
    render_gif(results[0].frames, out / f"{args.name}.gif")
    results[0].save(out / f"{args.name}.json")
    print(f"wrote {out}/{args.name}.png (generated above ground truth), .gif and .json", flush=True)


if __name__ == "__main__":
    main()
