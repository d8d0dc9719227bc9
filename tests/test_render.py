"""Rendering token grids to a PNG strip and an animated GIF."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from packcache.demo import VOCAB, make_clip
from packcache.demo.clips import PALETTE
from packcache.render import MASK_RGB, frames_to_rgb, render_gif, render_strip


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
