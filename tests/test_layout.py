"""SequenceLayout: per-token groups and positions, both 3-D conventions, parsing from token ids."""

from __future__ import annotations

import numpy as np
import pytest

from packcache import LayoutError, SequenceLayout, SpecialTokens, TokenGroup

LUMOS = dict(text_tokens=3, num_frames=3, height=2, width=3, row_separator=True, frame_prefix=3, frame_suffix=1,
             prefix_specials=3, suffix_specials=1)
SPECIAL = SpecialTokens(frame_start=90, frame_end=91, row_separator=92, grid_tokens=2, prefix_ids=(93, 94, 95),
                        suffix_ids=(96,))


def lumos_ids(layout: SequenceLayout) -> list[int]:
    ids = [1, 2, 3, 93, 94, 95]
    for _ in range(layout.num_frames):
        ids += [90, 80, 81]
        for _ in range(layout.height):
            ids += [10] * layout.width + [92]
        ids += [91]
    return ids + [96]


def test_groups_frames_and_mmrope_positions():
    layout = SequenceLayout(**LUMOS)
    assert layout.tokens_per_frame == 3 + 2 * 4 + 1 and layout.num_tokens == 6 + 3 * 12 + 1
    g = layout.group
    assert (g[:3] == TokenGroup.TEXT).all() and (g[3:6] == TokenGroup.SPECIAL).all()
    assert (g[layout.frame_slice(0)] != TokenGroup.FRAME).all()
    assert int((g == TokenGroup.COND).sum()) == 6 and int((g == TokenGroup.FRAME).sum()) == 12
    # Lumos-1 MM-RoPE: visual token (frame f, row r, col c) at offset + (4f, 8r, 8c); text is 1-D
    offset = 6
    for i in np.flatnonzero(g == TokenGroup.FRAME):
        f, r, c = layout.frame[i], layout.row[i], layout.col[i]
        assert layout.pos3d[i].tolist() == [offset + 4 * f, offset + 8 * r, offset + 8 * c]
    assert layout.pos3d[:6].tolist() == [[i, i, i] for i in range(6)]
    assert layout.pos3d[-1].tolist() == [layout.pos3d[:-1].max() + 1] * 3
    assert layout.pos1d.tolist() == list(range(layout.num_tokens))
    assert layout.anchor[: layout.frame_slice(0).stop].all() and not layout.anchor[layout.frame_slice(1)].any()
    pos = layout.position_ids(layout.frame_slice(2))
    assert pos.shape == (3, 1, 12) and pos[0, 0].unique().tolist() == [offset + 8]


def test_mrope_convention_per_frame_blocks_and_video_block():
    # frames separated by specials: each frame a T=1 block starting one past the previous maximum (Qwen3-VL style)
    layout = SequenceLayout(text_tokens=2, num_frames=2, height=2, width=3, frame_prefix=1, frame_suffix=1,
                            convention="mrope")
    p = layout.pos3d
    assert p[:3].tolist() == [[0, 0, 0], [1, 1, 1], [2, 2, 2]]  # text + <vision_start>
    assert p[3:9].tolist() == [[3, 3, 3], [3, 3, 4], [3, 3, 5], [3, 4, 3], [3, 4, 4], [3, 4, 5]]
    assert p[9].tolist() == [6, 6, 6]  # <vision_end> at block start + max(H, W)
    assert p[10].tolist() == [7, 7, 7] and p[11].tolist() == [8, 8, 8]
    assert layout.frame_time(1) == 8
    # contiguous frames: one video block whose time advances by one per frame (Qwen2-VL video)
    video = SequenceLayout(text_tokens=2, num_frames=3, height=2, width=2, convention="mrope", suffix_specials=1)
    assert video.pos3d[2:6].tolist() == [[2, 2, 2], [2, 2, 3], [2, 3, 2], [2, 3, 3]]
    # text after the block continues from its start + max(H, W), as transformers 5 get_rope_index does
    assert video.pos3d[6].tolist() == [3, 2, 2] and video.pos3d[-1].tolist() == [4, 4, 4]


def test_cond_time_gap_puts_the_frames_after_the_condition_further_away_in_time():
    layout = SequenceLayout(**LUMOS, cond_time_gap=10)
    plain = SequenceLayout(**LUMOS)
    offset, st = layout.first_frame_token, layout.scales[0]
    assert layout.frame_time(np.arange(3)).tolist() == [offset, offset + st * 10, offset + st * 11]
    shift = np.where(layout.frame >= 1, st * 9, 0)
    np.testing.assert_array_equal(layout.pos3d[: -1, 0], plain.pos3d[: -1, 0] + shift[:-1])
    np.testing.assert_array_equal(layout.pos3d[:, 1:][: -1], plain.pos3d[:, 1:][: -1])  # (h, w) are unchanged
    assert layout.pos3d[-1].tolist() == [layout.pos3d[:-1].max() + 1] * 3  # the suffix still follows the maximum
    assert layout.summary()["cond_time_gap"] == 10 and plain.summary()["cond_time_gap"] == 1
    parsed = SequenceLayout.from_token_ids(lumos_ids(layout), SPECIAL, cond_time_gap=10)
    assert parsed == layout and np.array_equal(parsed.pos3d, layout.pos3d)
    with pytest.raises(LayoutError, match="cond_time_gap must be >= 1"):
        SequenceLayout(**LUMOS, cond_time_gap=0)
    with pytest.raises(LayoutError, match="'mmrope' convention with a conditioning frame"):
        SequenceLayout(**{**LUMOS, "row_separator": False}, convention="mrope", cond_time_gap=2)
    with pytest.raises(LayoutError, match="'mmrope' convention with a conditioning frame"):
        SequenceLayout(**LUMOS, cond_frames=0, cond_time_gap=2)


def test_parse_token_ids_round_trip():
    layout = SequenceLayout(**LUMOS)
    parsed = SequenceLayout.from_token_ids(lumos_ids(layout), SPECIAL)
    assert parsed == layout
    assert np.array_equal(parsed.pos3d, layout.pos3d)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda ids: ids[:-2] + ids[-1:], "last row has no row separator|no frame_end"),
        (lambda ids: [t for t in ids if t != 90], "no frame_start"),
        (lambda ids: ids[:10] + ids[11:], "rows have unequal lengths"),
        (lambda ids: ids[:12] + ids[13:], "frames have different grids"),
        (lambda ids: ids + [5], "unexpected token 5"),
        (lambda ids: ids[:-1][: ids.index(91) + 1] + [7] + ids[ids.index(91) + 1 :], "frame 1 starts at token"),
    ],
)
def test_parse_rejects_sequences_that_do_not_match(edit, message):
    ids = edit(lumos_ids(SequenceLayout(**LUMOS)))
    with pytest.raises(LayoutError, match=message):
        SequenceLayout.from_token_ids(ids, SPECIAL)


def test_invalid_counts():
    with pytest.raises(LayoutError, match="cond_frames"):
        SequenceLayout(text_tokens=1, num_frames=2, height=2, width=2, cond_frames=3)
    with pytest.raises(LayoutError, match="convention"):
        SequenceLayout(text_tokens=1, num_frames=2, height=2, width=2, convention="rope4d")
    with pytest.raises(LayoutError, match="row separators"):
        SequenceLayout(text_tokens=1, num_frames=2, height=2, width=2, convention="mrope", row_separator=True)
