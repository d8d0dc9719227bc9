"""Rendering token grids to a PNG strip and an animated GIF."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from packcache.demo import VOCAB, make_clip
from packcache.demo.clips import PALETTE
from packcache.render import MASK_RGB, frames_to_rgb, render_gif, render_sheet, render_strip


def test_rgb_cells_take_their_palette_colour():
    frames = np.array([[[0, 5], [VOCAB.mask, 2]]])
    rgb = frames_to_rgb(frames, cell=3)
    assert rgb.shape == (1, 6, 6, 3)
    assert tuple(rgb[0, 0, 0]) == PALETTE[0] and tuple(rgb[0, 2, 5]) == PALETTE[5]
    assert tuple(rgb[0, 5, 0]) == MASK_RGB and tuple(rgb[0, 5, 5]) == PALETTE[2]
    with pytest.raises(ValueError, match="frames"):
        frames_to_rgb(np.zeros((1, 1, 2, 2)))


def test_strip_and_gif_are_written(tmp_path):
    frames = make_clip(0, 5).frames
    render_strip(frames, tmp_path / "s.png", cell=4, gap=2)
    render_gif(frames, tmp_path / "a" / "s.gif", cell=4)
    png = Image.open(tmp_path / "s.png")
    assert png.size == (5 * 32 + 4 * 2, 32)
    assert tuple(np.asarray(png.convert("RGB"))[0, 0]) == PALETTE[frames[0, 0, 0]]
    gif = Image.open(tmp_path / "a" / "s.gif")
    assert gif.n_frames == 5
    assert not [p for p in tmp_path.rglob(".*")], "temporary file left behind"


def test_sheet_stacks_one_strip_per_video_with_the_given_gaps(tmp_path):
    a, b = make_clip(0, 3).frames, make_clip(1, 3).frames
    render_sheet([a, b, a], tmp_path / "sheet.png", cell=4, gap=2, row_gaps=[1, 6])
    rgb = np.asarray(Image.open(tmp_path / "sheet.png").convert("RGB"))
    assert rgb.shape == (3 * 32 + 1 + 6, 3 * 32 + 2 * 2, 3)
    assert tuple(rgb[32 + 1, 0]) == PALETTE[b[0, 0, 0]]  # second row starts after a 1-pixel gap
    assert tuple(rgb[2 * 32 + 1 + 6, 0]) == PALETTE[a[0, 0, 0]]
    assert (rgb[32 : 32 + 1] == 255).all()
    with pytest.raises(ValueError, match="row_gaps"):
        render_sheet([a, b], tmp_path / "x.png", row_gaps=[1, 2])
    with pytest.raises(ValueError, match="same shape"):
        render_sheet([a, make_clip(0, 4).frames], tmp_path / "x.png")
