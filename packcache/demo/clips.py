"""Synthetic token-grid videos for the demo model, deterministic by seed.

Every clip is a ``[T, 8, 8]`` grid of colour ids (the codebook; visual token id == colour id). Frame 0 is the
conditioning image. The dynamics are built so that every kind of context matters:

* **condition** -- a static two-colour textured background (blocks, stripes or split). Objects cover and
  uncover it; an uncovered cell was hidden in the last two frames, so it comes from the condition or older
  frames;
* **text** -- the prompt names each object's colour, initial direction and speed (1 cell per frame, 2 for 15% of
  the objects), which frame 0 does not show;
* **recent frames** -- one 2x2 object (two in 40% of the clips) bounces off the walls; after a bounce only the
  last frames tell the direction;
* **decorrelating motion** (``turn_prob``, off by default) -- after frame 1 an object may turn at random, so the
  older a frame, the less its motion says about the next one, as in real video; without turns the motion is
  deterministic and every past frame tells the trajectory equally well;
* **older frames** -- in 35% of the clips a static occluder bar (drawn on top) hides objects passing behind it
  for up to three frames; where they reappear depends on frames 3-5 steps back.

The token sequence follows Lumos-1: text, then per frame ``<frame_start>``, 8 rows of 8 visual tokens each
followed by ``<row_sep>``, ``<frame_end>``. :func:`clip_layout` gives its :class:`~packcache.SequenceLayout`
(convention ``"mmrope"``, scales ``(1, 4, 4)``). A :class:`ClipFormat`, stored in a model's config, can add
Lumos-1's ``<video_start>`` after the text and put the frames after the condition frame further away in time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from packcache.layout import SequenceLayout, SpecialTokens

__all__ = ["Vocab", "VOCAB", "ClipFormat", "PLAIN", "Clip", "make_clip", "make_clips", "clip_layout", "clip_token_ids",
           "frame_token_ids", "encode_prompt", "decode_prompt", "reverse_directions", "GRID", "TEXT_TOKENS", "SCALES",
           "PALETTE"]

GRID = 8
OBJ = 2
MAX_OBJECTS = 2
TEXT_TOKENS = 3 * MAX_OBJECTS
SCALES = (1, 4, 4)
COLOUR_NAMES = ("red", "green", "blue", "yellow", "white", "black")
DIRECTIONS = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
SPEEDS = (1, 2)
#: share of clips with one object (else two), of objects moving 2 cells per frame, of clips with an occluder
SINGLE_OBJECT_PROB = 0.6
FAST_PROB = 0.15
OCCLUDER_PROB = 0.35
#: RGB of each colour id, for rendering.
PALETTE = ((220, 50, 47), (60, 170, 70), (38, 110, 210), (240, 200, 40), (235, 235, 235), (30, 30, 30))


@dataclass(frozen=True)
class Vocab:
    """Token ids of the demo vocabulary.

    Colour ids ``0..num_colours-1`` are the visual codebook; then the mask, frame specials, the null-text id
    (unconditional prompt) and the text words (colour names, directions, speeds, ``none``).
    """

    num_colours: int = len(COLOUR_NAMES)
    mask: int = 6
    frame_start: int = 7
    frame_end: int = 8
    row_sep: int = 9
    null_text: int = 10
    colour_words: tuple[int, ...] = (11, 12, 13, 14, 15, 16)
    direction_words: tuple[int, ...] = (17, 18, 19, 20)  # up, down, left, right
    speed_words: tuple[int, ...] = (21, 22)  # 1, 2
    none_word: int = 23
    video_start: int = 24  # only in sequences of a ClipFormat with video_start
    size: int = 25
    #: a ClipFormat with bound_words reads each object's direction and speed words as ids that carry its colour:
    #: ``bound_directions + 4 * colour + direction`` and ``bound_speeds + 2 * colour + speed``
    bound_directions: int = 25
    bound_speeds: int = 49
    bound_size: int = 61

    @property
    def colour_ids(self) -> tuple[int, ...]:
        return tuple(range(self.num_colours))

    def special_tokens(self) -> SpecialTokens:
        """The specials that :meth:`SequenceLayout.from_token_ids` needs to parse a demo sequence."""
        return SpecialTokens(frame_start=self.frame_start, frame_end=self.frame_end, row_separator=self.row_sep,
                             prefix_ids=(self.video_start,))

    def null_prompt(self, length: int = TEXT_TOKENS) -> np.ndarray:
        """The unconditional prompt (classifier-free guidance): ``length`` null-text ids."""
        return np.full(length, self.null_text, dtype=np.int64)


VOCAB = Vocab()


@dataclass(frozen=True)
class ClipFormat:
    """How a demo model lays out a sequence; a checkpoint's config records it (:meth:`of`).

    ``video_start``: a ``<video_start>`` token follows the text, as in Lumos-1's sequences; every later token can
    attend to it, so a head with nothing to read can rest there (an attention sink) instead of on far frames.
    ``condition_gap``: time steps from the condition frame to frame 1 in the 3-D positions
    (:attr:`SequenceLayout.cond_time_gap`; 1 = adjacent); frames 1, 2, ... keep a step of 1 between them.
    ``bound_words``: the model reads each object's direction and speed words as token ids that carry the object's
    colour (:meth:`text_ids`), so a cell of the object finds its motion by one match of content. With separate
    words a small model must first bind each word to the colour word before it; the demo model never learns
    that within its budget, and moves every object of a two-object prompt by a blend of both motions.
    """

    video_start: bool = False
    condition_gap: int = 1
    bound_words: bool = False

    def __post_init__(self) -> None:
        if self.condition_gap < 1:
            raise ValueError(f"condition_gap must be >= 1, got {self.condition_gap}")

    @classmethod
    def of(cls, config: object) -> ClipFormat:
        """The format a demo model's config records (checkpoints from before these options: :data:`PLAIN`)."""
        return cls(video_start=bool(getattr(config, "packcache_video_start", False)),
                   condition_gap=int(getattr(config, "packcache_condition_gap", 1)),
                   bound_words=bool(getattr(config, "packcache_bound_words", False)))

    @property
    def prefix_ids(self) -> np.ndarray:
        """The specials between the text and frame 0."""
        return np.array([VOCAB.video_start] if self.video_start else [], dtype=np.int64)

    @property
    def vocab_size(self) -> int:
        """Token ids a model of this format embeds."""
        if self.bound_words:
            return VOCAB.bound_size
        return VOCAB.size if self.video_start else VOCAB.video_start

    def config_fields(self) -> dict:
        """The fields of :class:`~packcache.demo.DemoVideoConfig` that record this format."""
        return {"packcache_video_start": self.video_start, "packcache_condition_gap": self.condition_gap,
                "packcache_bound_words": self.bound_words}

    def text_ids(self, text: np.ndarray) -> np.ndarray:
        """The token ids a model of this format reads for the prompt ``text`` (word ids, as :func:`encode_prompt`
        gives them): the words themselves, or with ``bound_words`` each object's direction and speed words bound
        to its colour."""
        text = np.asarray(text, dtype=np.int64)
        if not self.bound_words:
            return text
        bound = text.copy()
        for i in range(0, len(text) - 2, 3):
            if int(text[i]) in VOCAB.colour_words:
                colour = VOCAB.colour_words.index(int(text[i]))
                bound[i + 1] = VOCAB.bound_directions + 4 * colour + VOCAB.direction_words.index(int(text[i + 1]))
                bound[i + 2] = VOCAB.bound_speeds + 2 * colour + VOCAB.speed_words.index(int(text[i + 2]))
        return bound


#: the format of the shipped checkpoint: text, then the frames at adjacent times
PLAIN = ClipFormat()
_WORDS = {**{n: VOCAB.colour_words[i] for i, n in enumerate(COLOUR_NAMES)},
          **{n: VOCAB.direction_words[i] for i, n in enumerate(DIRECTIONS)},
          **{str(s): VOCAB.speed_words[i] for i, s in enumerate(SPEEDS)}, "none": VOCAB.none_word}
_NAMES = {v: k for k, v in _WORDS.items()}


def encode_prompt(prompt: str) -> np.ndarray:
    """``"red right 1 blue down 2"`` -> text ids, padded with ``none none none`` to :data:`TEXT_TOKENS`."""
    words = prompt.lower().split()
    unknown = [w for w in words if w not in _WORDS]
    if unknown:
        raise ValueError(f"unknown prompt word {unknown[0]!r}; use colours {COLOUR_NAMES}, directions "
                         f"{tuple(DIRECTIONS)}, speeds 1/2 or 'none'")
    if len(words) % 3 or len(words) > TEXT_TOKENS:
        raise ValueError(f"a prompt is up to {MAX_OBJECTS} triples 'colour direction speed', got {prompt!r}")
    words += ["none"] * (TEXT_TOKENS - len(words))
    return np.array([_WORDS[w] for w in words], dtype=np.int64)


def decode_prompt(ids: Sequence[int]) -> str:
    """Text ids -> the prompt string (``none`` padding and null-text ids dropped)."""
    return " ".join(_NAMES[int(i)] for i in ids if int(i) in _NAMES and int(i) != VOCAB.none_word)


def reverse_directions(text: np.ndarray) -> np.ndarray:
    """The same prompt with every direction word reversed (up <-> down, left <-> right): a control that shows
    whether a model reads the prompt's motion."""
    words = VOCAB.direction_words
    return np.array([words[words.index(int(w)) ^ 1] if int(w) in words else int(w) for w in text], dtype=np.int64)


@dataclass
class Clip:
    """One synthetic video: ``frames [T, H, W]`` colour ids, ``text`` ids, and what generated it."""

    frames: np.ndarray
    text: np.ndarray
    info: dict = field(default_factory=dict)

    @property
    def prompt(self) -> str:
        return decode_prompt(self.text)

    @property
    def object_colours(self) -> list[int]:
        """Colour ids of the objects the prompt names."""
        return [VOCAB.colour_words.index(int(w)) for w in self.text[0::3] if int(w) in VOCAB.colour_words]


def _background(rng: np.random.Generator, a: int, b: int) -> np.ndarray:
    r, c = np.meshgrid(np.arange(GRID), np.arange(GRID), indexing="ij")
    kind = rng.integers(5)
    if kind == 0:
        pattern = (r // 2 + c // 2) % 2
    elif kind == 1:
        pattern = (c // 2) % 2
    elif kind == 2:
        pattern = (r // 2) % 2
    elif kind == 3:
        pattern = (c >= rng.integers(2, GRID - 1)).astype(np.int64)
    else:
        pattern = rng.integers(2, size=(GRID // 2, GRID // 2)).repeat(2, 0).repeat(2, 1)
    return np.where(pattern == 1, b, a).astype(np.int64)


def _bounce(p: int, v: int, hi: int) -> tuple[int, int]:
    p += v
    if p < 0:
        p, v = -p, -v
    elif p > hi:
        p, v = 2 * hi - p, -v
    return p, v


def make_clip(seed: int, num_frames: int = 7, *, turn_prob: float = 0.0) -> Clip:
    """One clip of ``num_frames`` frames, fully determined by ``seed`` (and ``turn_prob``: after frame 1, each
    object turns to one of the other three directions with this probability per frame; 0 draws nothing, so the
    clip is the same as without the option, and frames 0-1 and the prompt never depend on it)."""
    rng = np.random.default_rng(seed)
    colours = rng.permutation(VOCAB.num_colours)
    bg = _background(rng, int(colours[0]), int(colours[1]))
    n_obj = 1 if rng.random() < SINGLE_OBJECT_PROB else 2
    hi = GRID - OBJ
    objects = []
    for i in range(n_obj):
        d = int(rng.integers(4))
        speed = 2 if rng.random() < FAST_PROB else 1
        dy, dx = list(DIRECTIONS.values())[d]
        objects.append({"colour": int(colours[2 + i]), "dir": d, "speed": speed,
                        "pos": [int(rng.integers(hi + 1)), int(rng.integers(hi + 1))],
                        "vel": [dy * speed, dx * speed]})
    occluder = None
    if rng.random() < OCCLUDER_PROB:
        width = int(rng.integers(2, 4))
        occluder = {"colour": int(colours[4]), "axis": int(rng.integers(2)),
                    "start": int(rng.integers(1, GRID - width)), "width": width}
    text = np.full(TEXT_TOKENS, VOCAB.none_word, dtype=np.int64)
    for i, o in enumerate(objects):
        text[3 * i : 3 * i + 3] = (VOCAB.colour_words[o["colour"]], VOCAB.direction_words[o["dir"]],
                                   VOCAB.speed_words[SPEEDS.index(o["speed"])])
    frames = np.empty((num_frames, GRID, GRID), dtype=np.int64)
    turns = 0
    for t in range(num_frames):
        f = bg.copy()
        for o in objects:
            (y, x) = o["pos"]
            f[y : y + OBJ, x : x + OBJ] = o["colour"]
        if occluder is not None:
            s = slice(occluder["start"], occluder["start"] + occluder["width"])
            if occluder["axis"] == 0:
                f[:, s] = occluder["colour"]
            else:
                f[s, :] = occluder["colour"]
        frames[t] = f
        for o in objects:
            if turn_prob and t >= 1 and rng.random() < turn_prob:  # frame 1 moves as the prompt says
                heading = (int(np.sign(o["vel"][0])), int(np.sign(o["vel"][1])))
                others = [v for v in DIRECTIONS.values() if v != heading]
                dy, dx = others[int(rng.integers(len(others)))]
                o["vel"] = [dy * o["speed"], dx * o["speed"]]
                turns += 1
            o["pos"][0], o["vel"][0] = _bounce(o["pos"][0], o["vel"][0], hi)
            o["pos"][1], o["vel"][1] = _bounce(o["pos"][1], o["vel"][1], hi)
    info = {"seed": seed, "objects": n_obj, "occluder": occluder is not None, "turns": turns}
    return Clip(frames=frames, text=text, info=info)


def make_clips(seeds: Sequence[int], num_frames: int = 7, *, turn_prob: float = 0.0) -> list[Clip]:
    """One clip per seed."""
    return [make_clip(int(s), num_frames, turn_prob=turn_prob) for s in seeds]


def clip_layout(num_frames: int, *, text_tokens: int = TEXT_TOKENS, clip_format: ClipFormat = PLAIN
                ) -> SequenceLayout:
    """Layout of a demo sequence: text, ``<video_start>`` if the format has it, then frames ``<frame_start>``,
    8 x (8 cells, ``<row_sep>``), ``<frame_end>``."""
    return SequenceLayout(text_tokens=text_tokens, num_frames=num_frames, height=GRID, width=GRID, cond_frames=1,
                          row_separator=True, frame_prefix=1, frame_suffix=1,
                          prefix_specials=len(clip_format.prefix_ids), convention="mmrope", scales=SCALES,
                          cond_time_gap=clip_format.condition_gap)


def frame_token_ids(grid: np.ndarray, vocab: Vocab = VOCAB) -> np.ndarray:
    """Token ids of one frame (``grid [H, W]`` colour or mask ids), specials included."""
    grid = np.asarray(grid, dtype=np.int64)
    rows = np.concatenate([grid, np.full((grid.shape[0], 1), vocab.row_sep, dtype=np.int64)], axis=1)
    return np.concatenate([[vocab.frame_start], rows.ravel(), [vocab.frame_end]]).astype(np.int64)


def clip_token_ids(text: np.ndarray, frames: np.ndarray, vocab: Vocab = VOCAB, clip_format: ClipFormat = PLAIN
                   ) -> np.ndarray:
    """Token ids of a whole sequence: ``text`` (word ids, read as the format reads them), the format's prefix
    specials, then every frame of ``frames [T, H, W]`` (none: the part before frame 0)."""
    return np.concatenate([clip_format.text_ids(text), clip_format.prefix_ids]
                          + [frame_token_ids(f, vocab) for f in frames])


def visual_index(layout: SequenceLayout) -> np.ndarray:
    """Within-frame offsets of the visual tokens, in raster order (length ``height * width``)."""
    sl = layout.frame_slice(0)
    local = np.arange(sl.start, sl.stop)
    return (local[layout.row[local] >= 0] - sl.start).astype(np.int64)
