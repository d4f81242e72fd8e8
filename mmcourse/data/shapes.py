"""The Shapes world: small rendered scenes of coloured shapes, with captions and questions.

Every scene holds 1-3 objects. An object has a shape (circle, square, triangle, cross), a
colour (six clean hues), a size (small, large) and a position (one of five named regions:
left, right, top, bottom, center). Scenes are drawn with numpy, anti-aliased by 4x4
supersampling, and come with

* a canonical caption, one fixed template without synonyms: ``"a large red circle on the left"``;
* a caption sampled from templates and synonyms: ``"there is a big crimson disk to the left"``;
* one unambiguous question with its answer: ``"what colour is the square?" -> "blue"``.

Some shape-colour compositions (:data:`HELD_OUT_PAIRS`) never appear in the ``train``,
``validation`` and ``test`` splits; the ``heldout`` split is made of scenes that contain
them, to test zero-shot composition. Everything is deterministic given ``ShapesConfig.seed``
and the split; each split draws from its own random stream, so splits never share an image.

Axis letters: N scenes, H x W pixels (H = W = ``image_size``), 3 RGB channels.

Taught in notebooks/00_setup_and_tour.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from mmcourse.utils import fraction, non_negative_int, one_of, positive_int

if TYPE_CHECKING:
    from datasets import DatasetDict

logger = logging.getLogger(__name__)

# --- the vocabulary ----------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = ("red", "green", "blue", "yellow", "purple", "cyan")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
SPLITS = ("train", "validation", "test", "heldout")
TEXT_FIELDS = ("caption", "canonical_caption", "question", "answer")  # one string per scene
MAX_OBJECTS = 3  # one object per region, and the count words below stop at three
NUMBER_WORDS = ("zero", "one", "two", "three")

# Clean RGB values in [0, 1]; each object gets a small uniform jitter around its colour.
COLOUR_RGB = {
    "red": (0.90, 0.15, 0.15),
    "green": (0.15, 0.78, 0.20),
    "blue": (0.20, 0.35, 0.95),
    "yellow": (0.95, 0.88, 0.15),
    "purple": (0.62, 0.22, 0.85),
    "cyan": (0.15, 0.85, 0.90),
}
BACKGROUND_RGB = (0.07, 0.07, 0.09)  # dark grey-blue, plus Gaussian noise

# Synonyms: the first entry of each tuple is the canonical word.
COLOUR_SYNONYMS = {
    "red": ("red", "crimson", "scarlet"),
    "green": ("green", "emerald", "lime"),
    "blue": ("blue", "azure", "cobalt"),
    "yellow": ("yellow", "golden", "lemon"),
    "purple": ("purple", "violet", "plum"),
    "cyan": ("cyan", "turquoise", "aqua"),
}
SHAPE_SYNONYMS = {
    "circle": ("circle", "disk", "round shape"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "wedge", "arrowhead"),
    "cross": ("cross", "plus sign", "plus"),
}
SIZE_SYNONYMS = {
    "small": ("small", "tiny", "little"),
    "large": ("large", "big", "huge"),
}
POSITION_PHRASES = {
    "left": ("on the left", "to the left", "on the left side"),
    "right": ("on the right", "to the right", "on the right side"),
    "top": ("at the top", "near the top", "in the upper part"),
    "bottom": ("at the bottom", "near the bottom", "in the lower part"),
    "center": ("in the center", "in the middle", "at the center"),
}

# Caption templates. An object phrase is built first, then put into a scene template.
CANONICAL_TEMPLATE = "{size} {colour} {shape} {position}"
OBJECT_TEMPLATES = (
    "{colour} {shape}",
    "{size} {colour} {shape}",
    "{colour} {shape} {position}",
    "{size} {colour} {shape} {position}",
)
SCENE_TEMPLATES = (
    "{objects}",
    "there is {objects}",
    "an image of {objects}",
    "a picture of {objects}",
)
QUESTION_TEMPLATES = {
    "colour": "what colour is the {shape}?",  # asked only if that shape is unique in the scene
    "shape": "what shape is the {colour} object?",  # asked only if that colour is unique
    "count": "how many objects are there?",
    "exists": "is there a {colour} {shape}?",  # answered yes or no with equal probability
}

# Class id of a (colour, shape) pair: colour_index * len(SHAPES) + shape_index.
CLASS_NAMES = [f"{colour} {shape}" for colour in COLOURS for shape in SHAPES]

# (shape, colour) compositions kept out of train/validation/test. Each shape is held out
# with one colour and each of four colours with one shape, so every shape is still seen in
# five colours and every colour in at least three shapes.
HELD_OUT_PAIRS = (
    ("circle", "purple"),
    ("square", "yellow"),
    ("triangle", "cyan"),
    ("cross", "red"),
)
TRAIN_PAIRS = tuple((s, c) for c in COLOURS for s in SHAPES if (s, c) not in HELD_OUT_PAIRS)
ALL_PAIRS = tuple((s, c) for c in COLOURS for s in SHAPES)

# --- geometry (fractions of the image side) ----------------------------------------------

SUPERSAMPLE = 4  # anti-aliasing: 4x4 sub-pixel samples per pixel, then average-pooled
SIZE_RADIUS = {"small": 0.10, "large": 0.155}  # half-extent of an object
MAX_POSITION_JITTER = 0.04  # keeps a large object inside the image from any region
REGION_CENTRES = {  # (x, y) of each named region, origin at the top-left corner
    "left": (0.20, 0.50),
    "right": (0.80, 0.50),
    "top": (0.50, 0.20),
    "bottom": (0.50, 0.80),
    "center": (0.50, 0.50),
}


def class_id(*, shape: str, colour: str) -> int:
    """Class id of a pair: ``COLOURS.index(colour) * len(SHAPES) + SHAPES.index(shape)``.

    Args:
        shape: one of :data:`SHAPES`.
        colour: one of :data:`COLOURS`.

    Returns:
        The index of ``f"{colour} {shape}"`` in :data:`CLASS_NAMES`, in [0, 24).

    Taught in notebooks/00_setup_and_tour.
    """
    one_of("shape", shape, SHAPES)
    one_of("colour", colour, COLOURS)
    return COLOURS.index(colour) * len(SHAPES) + SHAPES.index(shape)


@dataclass
class ShapesConfig:
    """How Shapes-world scenes are drawn; every field is checked on construction.

    Taught in notebooks/00_setup_and_tour.
    """

    image_size: int = 32  # side of the square image in pixels, >= 16
    min_objects: int = 1  # fewest objects in a scene, >= 1
    max_objects: int = 3  # most objects in a scene, <= MAX_OBJECTS (3)
    noise: float = 0.03  # std of the Gaussian noise on the background, intensities in [0, 1]
    colour_jitter: float = 0.06  # max per-channel offset of an object's RGB from its clean colour
    position_jitter: float = 0.025  # max shift of a centre from its region's, fraction of side
    seed: int = 0  # base seed; each split derives its own stream from (seed, split)

    def __post_init__(self) -> None:
        positive_int(image_size=self.image_size, min_objects=self.min_objects)
        positive_int(max_objects=self.max_objects)
        non_negative_int(seed=self.seed)
        fraction(noise=self.noise, colour_jitter=self.colour_jitter)
        fraction(position_jitter=self.position_jitter)
        if self.image_size < 16:
            raise ValueError(f"image_size must be >= 16 pixels, got {self.image_size}")
        if self.max_objects > MAX_OBJECTS:
            raise ValueError(f"max_objects must be <= {MAX_OBJECTS}, got {self.max_objects}")
        if self.min_objects > self.max_objects:
            raise ValueError(
                f"min_objects must be <= max_objects, got min_objects={self.min_objects} "
                f"and max_objects={self.max_objects}"
            )
        if self.position_jitter > MAX_POSITION_JITTER:
            raise ValueError(
                f"position_jitter must be <= {MAX_POSITION_JITTER} (or large objects leave "
                f"the image), got {self.position_jitter}"
            )


# --- rendering ---------------------------------------------------------------------------


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Boolean mask of ``shape`` with half-extent ``r`` at offsets ``(dx, dy)`` from its centre."""
    if shape == "circle":
        return dx**2 + dy**2 <= r**2
    if shape == "square":
        half = 0.85 * r  # about the circle's area
        return (np.abs(dx) <= half) & (np.abs(dy) <= half)
    if shape == "triangle":  # pointing up: apex at dy = -1.05 r, base at dy = +0.85 r
        top, bottom, half_base = -1.05 * r, 0.85 * r, 1.05 * r
        inside_rows = (dy >= top) & (dy <= bottom)
        return inside_rows & (np.abs(dx) <= half_base * (dy - top) / (bottom - top))
    if shape == "cross":  # a plus sign with arms 0.8 r thick
        arm = 0.4 * r
        ax, ay = np.abs(dx), np.abs(dy)
        return ((ax <= arm) & (ay <= r)) | ((ay <= arm) & (ax <= r))
    raise ValueError(f"shape must be one of {list(SHAPES)}, got {shape!r}")


def _check_object(obj: dict[str, Any]) -> None:
    """Raise ValueError unless ``obj`` names a known shape, colour, size and position."""
    if not isinstance(obj, dict):
        raise ValueError(f"each object must be a dict, got {type(obj).__name__}")
    one_of("object shape", obj.get("shape"), SHAPES)
    one_of("object colour", obj.get("colour"), COLOURS)
    one_of("object size", obj.get("size"), SIZES)
    one_of("object position", obj.get("position"), POSITIONS)


def render_scene(
    objects: list[dict[str, Any]],
    *,
    image_size: int,
    rng: np.random.Generator,
    noise: float = 0.03,
    colour_jitter: float = 0.06,
) -> np.ndarray:
    """Draw objects over a dark noisy background, anti-aliased by 4x4 supersampling.

    Each object is composited into the image with its coverage (the fraction of its
    ``SUPERSAMPLE**2`` sub-pixel samples inside the shape) as alpha. Only a patch around
    each object is sampled, which keeps rendering cheap.

    Args:
        objects: dicts with keys ``shape``, ``colour``, ``size``, ``position`` and optionally
            ``x``, ``y`` (the centre as fractions of the side; the region centre if absent).
            Later objects are drawn over earlier ones.
        image_size: side S of the square image in pixels, >= 16.
        rng: the numpy Generator that draws the noise and the colour jitter.
        noise: std of the Gaussian background noise (intensities in [0, 1]).
        colour_jitter: max per-channel uniform offset of each object's RGB.

    Returns:
        The image, shape (S, S, 3), dtype uint8.

    Taught in notebooks/00_setup_and_tour.
    """
    positive_int(image_size=image_size)
    if image_size < 16:
        raise ValueError(f"image_size must be >= 16 pixels, got {image_size}")
    fraction(noise=noise, colour_jitter=colour_jitter)
    size = image_size
    background = rng.normal(0.0, noise, (size, size, 3)) + BACKGROUND_RGB
    image = background.astype(np.float32)  # (S, S, 3)
    for obj in objects:
        _check_object(obj)
        default_x, default_y = REGION_CENTRES[obj["position"]]
        cx, cy = obj.get("x", default_x) * size, obj.get("y", default_y) * size  # pixels
        radius = SIZE_RADIUS[obj["size"]] * size
        # 1) the patch of whole pixels that can contain the object
        reach = 1.1 * radius + 1
        x0, x1 = max(0, math.floor(cx - reach)), min(size, math.ceil(cx + reach))
        y0, y1 = max(0, math.floor(cy - reach)), min(size, math.ceil(cy + reach))
        # 2) sub-pixel sample centres inside it, as offsets from the object centre
        sub = (np.arange(SUPERSAMPLE) + 0.5) / SUPERSAMPLE
        dx = (np.arange(x0, x1)[:, None] + sub).reshape(-1) - cx  # (w * 4,)
        dy = (np.arange(y0, y1)[:, None] + sub).reshape(-1) - cy  # (h * 4,)
        mask = _shape_mask(obj["shape"], dx[None, :], dy[:, None], radius)  # (h * 4, w * 4)
        # 3) average-pool the samples to a per-pixel coverage and composite
        h, w = y1 - y0, x1 - x0
        alpha = mask.reshape(h, SUPERSAMPLE, w, SUPERSAMPLE).mean(axis=(1, 3))  # (h, w)
        alpha = alpha[..., None]  # (h, w, 1)
        rgb = np.asarray(COLOUR_RGB[obj["colour"]]) + rng.uniform(-colour_jitter, colour_jitter, 3)
        rgb = np.clip(rgb, 0.0, 1.0)
        patch = image[y0:y1, x0:x1]
        image[y0:y1, x0:x1] = (1 - alpha) * patch + alpha * rgb
    return (np.clip(image, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


# --- scenes, captions and questions ------------------------------------------------------


def _pick(rng: np.random.Generator, options: tuple[Any, ...] | list[Any]) -> Any:
    return options[int(rng.integers(len(options)))]


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(phrases: list[str]) -> str:
    """``["a", "b", "c"] -> "a, b and c"``."""
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _sample_objects(
    rng: np.random.Generator, *, split: str, config: ShapesConfig
) -> list[dict[str, Any]]:
    """Draw 1-3 objects: distinct (shape, colour) pairs in distinct regions.

    Outside ``heldout`` no pair is held out; in ``heldout`` the first object has a held-out pair.
    """
    count = int(rng.integers(config.min_objects, config.max_objects + 1))
    if split == "heldout":
        first = _pick(rng, HELD_OUT_PAIRS)
        others = [p for p in ALL_PAIRS if p != first]
        pairs = [first] + [others[i] for i in rng.choice(len(others), count - 1, replace=False)]
    else:
        pairs = [TRAIN_PAIRS[i] for i in rng.choice(len(TRAIN_PAIRS), count, replace=False)]
    regions = rng.choice(len(POSITIONS), count, replace=False)
    objects = []
    for (shape, colour), region in zip(pairs, regions, strict=True):
        position = POSITIONS[region]
        jitter = rng.uniform(-config.position_jitter, config.position_jitter, 2)
        x, y = np.asarray(REGION_CENTRES[position]) + jitter
        size = _pick(rng, SIZES)
        obj = dict(shape=shape, colour=colour, size=size, position=position, x=float(x), y=float(y))
        objects.append(obj)
    return objects


def canonical_caption(objects: list[dict[str, Any]]) -> str:
    """The fixed-template caption, without synonyms.

    Args:
        objects: dicts with ``shape``, ``colour``, ``size`` and ``position``.

    Returns:
        E.g. ``"a large red circle on the left and a small blue square at the top"``.

    Taught in notebooks/00_setup_and_tour.
    """
    phrases = []
    for o in objects:
        position = POSITION_PHRASES[o["position"]][0]
        phrase = CANONICAL_TEMPLATE.format(
            size=o["size"], colour=o["colour"], shape=o["shape"], position=position
        )
        phrases.append(_article(phrase))
    return _join(phrases)


def _sample_caption(rng: np.random.Generator, objects: list[dict[str, Any]]) -> str:
    phrases = []
    for o in objects:
        phrase = _pick(rng, OBJECT_TEMPLATES).format(
            size=_pick(rng, SIZE_SYNONYMS[o["size"]]),
            colour=_pick(rng, COLOUR_SYNONYMS[o["colour"]]),
            shape=_pick(rng, SHAPE_SYNONYMS[o["shape"]]),
            position=_pick(rng, POSITION_PHRASES[o["position"]]),
        )
        phrases.append(_article(phrase))
    return _pick(rng, SCENE_TEMPLATES).format(objects=_join(phrases))


def _sample_question(
    rng: np.random.Generator, objects: list[dict[str, Any]], *, split: str
) -> tuple[str, str]:
    """One question whose answer is unambiguous given ``objects``; returns (question, answer)."""
    shapes = [o["shape"] for o in objects]
    colours = [o["colour"] for o in objects]
    unique_shapes = [o for o in objects if shapes.count(o["shape"]) == 1]
    unique_colours = [o for o in objects if colours.count(o["colour"]) == 1]
    kinds = ["count", "exists"]
    if unique_shapes:
        kinds.append("colour")
    if unique_colours:
        kinds.append("shape")
    kind = _pick(rng, kinds)
    if kind == "colour":
        o = _pick(rng, unique_shapes)
        return QUESTION_TEMPLATES["colour"].format(shape=o["shape"]), o["colour"]
    if kind == "shape":
        o = _pick(rng, unique_colours)
        return QUESTION_TEMPLATES["shape"].format(colour=o["colour"]), o["shape"]
    if kind == "count":
        return QUESTION_TEMPLATES["count"], NUMBER_WORDS[len(objects)]
    present = [(o["shape"], o["colour"]) for o in objects]
    if rng.random() < 0.5:
        (shape, colour), answer = _pick(rng, present), "yes"
    else:  # an absent pair; outside "heldout" never name a held-out pair, even in a question
        candidates = ALL_PAIRS if split == "heldout" else TRAIN_PAIRS
        (shape, colour), answer = _pick(rng, [p for p in candidates if p not in present]), "no"
    return QUESTION_TEMPLATES["exists"].format(colour=colour, shape=shape), answer


def _split_rng(config: ShapesConfig, split: str) -> np.random.Generator:
    """Each split gets its own stream, derived from (seed, split index) by SeedSequence."""
    return np.random.default_rng([config.seed, SPLITS.index(split)])


def generate_shapes(
    num_samples: int, *, split: str = "train", config: ShapesConfig | None = None
) -> dict[str, Any]:
    """Generate ``num_samples`` scenes of one split as numpy arrays and lists.

    Scenes are drawn one after another from the split's stream, so the first k scenes of
    ``generate_shapes(n)`` equal ``generate_shapes(k)`` for k <= n.

    Args:
        num_samples: N, the number of scenes, > 0.
        split: ``"train"``, ``"validation"`` or ``"test"`` (no object with a pair from
            :data:`HELD_OUT_PAIRS`), or ``"heldout"`` (the first object always has a held-out
            pair, the others any pair).
        config: drawing parameters; ``ShapesConfig()`` if None.

    Returns:
        A dict with ``images`` (N, H, W, 3) uint8; ``objects``, a list of N lists of dicts with
        ``shape``, ``colour``, ``size``, ``position``, ``x``, ``y`` (centre as fractions of the
        side); ``caption``, ``canonical_caption``, ``question``, ``answer``, lists of N strings;
        ``label`` (N,) int64, the :func:`class_id` of the first object; ``num_objects`` (N,) int64.

    Taught in notebooks/00_setup_and_tour.
    """
    positive_int(num_samples=num_samples)
    one_of("split", split, SPLITS)
    config = ShapesConfig() if config is None else config
    if not isinstance(config, ShapesConfig):
        raise ValueError(f"config must be a ShapesConfig or None, got {type(config).__name__}")
    rng = _split_rng(config, split)
    start = time.perf_counter()
    size = config.image_size
    images = np.empty((num_samples, size, size, 3), np.uint8)  # (N, H, W, 3)
    out: dict[str, Any] = {key: [] for key in ("objects", *TEXT_FIELDS)}
    for i in range(num_samples):
        objects = _sample_objects(rng, split=split, config=config)
        images[i] = render_scene(
            objects,
            image_size=size,
            rng=rng,
            noise=config.noise,
            colour_jitter=config.colour_jitter,
        )
        question, answer = _sample_question(rng, objects, split=split)
        out["objects"].append(objects)
        out["caption"].append(_sample_caption(rng, objects))
        out["canonical_caption"].append(canonical_caption(objects))
        out["question"].append(question)
        out["answer"].append(answer)
    out["images"] = images
    out["label"] = np.array(
        [class_id(shape=o[0]["shape"], colour=o[0]["colour"]) for o in out["objects"]], np.int64
    )
    out["num_objects"] = np.array([len(o) for o in out["objects"]], np.int64)
    logger.debug(
        "generated %d %s scenes in %.2f s", num_samples, split, time.perf_counter() - start
    )
    return out


def shapes_dataset(
    num_samples: dict[str, int] | int, *, config: ShapesConfig | None = None
) -> DatasetDict:
    """The Shapes world as a Hugging Face ``datasets.DatasetDict``.

    Args:
        num_samples: scenes per split, e.g. ``{"train": 2000, "heldout": 200}`` (only those
            splits are built), or one int for every split in :data:`SPLITS`.
        config: drawing parameters; ``ShapesConfig()`` if None.

    Returns:
        A ``DatasetDict`` whose rows have ``image`` (an ``Image()`` feature, decoded to PIL),
        ``caption``, ``canonical_caption``, ``question``, ``answer`` (strings), ``label``
        (``ClassLabel`` over :data:`CLASS_NAMES`), ``num_objects`` (int32) and ``objects``
        (a list of ``{shape, colour, size, position, x, y}``).

    Taught in notebooks/00_setup_and_tour.
    """
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, List, Value

    if isinstance(num_samples, dict):
        if not num_samples:
            raise ValueError(
                f"num_samples must name at least one split of {list(SPLITS)}, got {{}}"
            )
        counts = dict(num_samples)
    else:
        positive_int(num_samples=num_samples)
        counts = dict.fromkeys(SPLITS, num_samples)
    for split, count in counts.items():
        one_of("split (a key of num_samples)", split, SPLITS)
        positive_int(**{f"num_samples[{split!r}]": count})
    features = Features(
        {
            "image": Image(),
            "caption": Value("string"),
            "canonical_caption": Value("string"),
            "question": Value("string"),
            "answer": Value("string"),
            "label": ClassLabel(names=CLASS_NAMES),
            "num_objects": Value("int32"),
            "objects": List(
                {
                    "shape": Value("string"),
                    "colour": Value("string"),
                    "size": Value("string"),
                    "position": Value("string"),
                    "x": Value("float32"),
                    "y": Value("float32"),
                }
            ),
        }
    )
    splits = {}
    for split, count in counts.items():
        data = generate_shapes(count, split=split, config=config)
        columns = {key: data[key] for key in ("objects", *TEXT_FIELDS)}
        columns["image"] = list(data["images"])
        columns["label"] = data["label"].tolist()
        columns["num_objects"] = data["num_objects"].tolist()
        splits[split] = Dataset.from_dict(columns, features=features)
    return DatasetDict(splits)


def shapes_tensors(
    num_samples: int, *, split: str = "train", config: ShapesConfig | None = None
) -> dict[str, Any]:
    """The Shapes world as torch tensors, ready for a model.

    Args:
        num_samples: N, the number of scenes, > 0.
        split: one of :data:`SPLITS` (see :func:`generate_shapes`).
        config: drawing parameters; ``ShapesConfig()`` if None.

    Returns:
        A dict with ``images`` float32 (N, 3, H, W) in [0, 1]; ``labels`` int64 (N,), the class
        id of the first object; ``num_objects`` int64 (N,); and the lists ``caption``,
        ``canonical_caption``, ``question``, ``answer`` and ``objects``.

    Taught in notebooks/00_setup_and_tour.
    """
    data = generate_shapes(num_samples, split=split, config=config)
    images = torch.from_numpy(data["images"]).permute(0, 3, 1, 2).float() / 255.0  # (N, 3, H, W)
    return {
        "images": images.contiguous(),
        "labels": torch.from_numpy(data["label"]),
        "num_objects": torch.from_numpy(data["num_objects"]),
        **{key: data[key] for key in ("objects", *TEXT_FIELDS)},
    }


# --- several references and several questions per scene (chapter 10) ----------------------

QUESTION_TYPES = ("colour", "shape", "count", "exists", "where")  # the VQA question types
WHERE_TEMPLATE = "where is the {colour} {shape}?"  # answered by one of POSITIONS
ANSWERS = (*COLOURS, *SHAPES, *NUMBER_WORDS[1:], "yes", "no", *POSITIONS)  # every answer
REFERENCE_STREAM = 10  # third seed word of the reference/question stream (see captioning_data)


def caption_references(
    objects: list[dict[str, Any]], rng: np.random.Generator, k: int = 5
) -> list[str]:
    """``k`` reference captions of one scene, each from the templates and synonyms.

    The captions are drawn like the ``caption`` field of :func:`generate_shapes`; a draw that
    repeats an earlier reference is drawn again (up to 20 tries), so the references differ
    whenever the templates allow it.

    Args:
        objects: the scene's objects (dicts with ``shape``, ``colour``, ``size``, ``position``).
        rng: the numpy Generator to draw from.
        k: the number of references, > 0.

    Returns:
        ``k`` strings, e.g. ``["a red circle", "there is a big crimson disk to the left", ...]``.

    Taught in notebooks/10_captioning_and_vqa.
    """
    positive_int(k=k)
    if not objects:
        raise ValueError("objects must hold at least one object, got an empty list")
    for obj in objects:
        _check_object(obj)
    references: list[str] = []
    for _ in range(k):
        caption = _sample_caption(rng, objects)
        for _retry in range(20):
            if caption not in references:
                break
            caption = _sample_caption(rng, objects)
        references.append(caption)
    return references


def vqa_pairs(
    objects: list[dict[str, Any]], rng: np.random.Generator, *, split: str = "train"
) -> list[dict[str, str]]:
    """One question of every type that has an unambiguous answer in this scene.

    * ``colour``: "what colour is the {shape}?" (a shape that occurs once) -> a colour;
    * ``shape``: "what shape is the {colour} object?" (a colour that occurs once) -> a shape;
    * ``count``: "how many objects are there?" -> "one" | "two" | "three";
    * ``exists``: "is there a {colour} {shape}?" -> "yes" | "no", each with probability 1/2;
      outside ``heldout`` an absent pair is never a held-out one (as in :func:`generate_shapes`);
    * ``where``: "where is the {colour} {shape}?" -> one of :data:`POSITIONS`.

    Args:
        objects: the scene's objects.
        rng: the numpy Generator to draw from.
        split: the scene's split (one of :data:`SPLITS`).

    Returns:
        A list of dicts with ``question``, ``answer`` and ``type`` (one of
        :data:`QUESTION_TYPES`), in the order of :data:`QUESTION_TYPES`; ``count``,
        ``exists`` and ``where`` are always present.

    Taught in notebooks/10_captioning_and_vqa.
    """
    one_of("split", split, SPLITS)
    if not objects:
        raise ValueError("objects must hold at least one object, got an empty list")
    for obj in objects:
        _check_object(obj)
    shapes = [o["shape"] for o in objects]
    colours = [o["colour"] for o in objects]
    pairs: list[dict[str, str]] = []
    unique_shapes = [o for o in objects if shapes.count(o["shape"]) == 1]
    if unique_shapes:
        o = _pick(rng, unique_shapes)
        question = QUESTION_TEMPLATES["colour"].format(shape=o["shape"])
        pairs.append({"question": question, "answer": o["colour"], "type": "colour"})
    unique_colours = [o for o in objects if colours.count(o["colour"]) == 1]
    if unique_colours:
        o = _pick(rng, unique_colours)
        question = QUESTION_TEMPLATES["shape"].format(colour=o["colour"])
        pairs.append({"question": question, "answer": o["shape"], "type": "shape"})
    count = NUMBER_WORDS[len(objects)]
    pairs.append({"question": QUESTION_TEMPLATES["count"], "answer": count, "type": "count"})
    present = [(o["shape"], o["colour"]) for o in objects]
    if rng.random() < 0.5:
        (shape, colour), answer = _pick(rng, present), "yes"
    else:
        candidates = ALL_PAIRS if split == "heldout" else TRAIN_PAIRS
        (shape, colour), answer = _pick(rng, [p for p in candidates if p not in present]), "no"
    question = QUESTION_TEMPLATES["exists"].format(colour=colour, shape=shape)
    pairs.append({"question": question, "answer": answer, "type": "exists"})
    o = _pick(rng, objects)  # (shape, colour) pairs are distinct within a scene
    question = WHERE_TEMPLATE.format(colour=o["colour"], shape=o["shape"])
    pairs.append({"question": question, "answer": o["position"], "type": "where"})
    return pairs


def captioning_data(
    num_samples: int,
    *,
    split: str = "train",
    config: ShapesConfig | None = None,
    num_references: int = 5,
) -> dict[str, Any]:
    """:func:`shapes_tensors` plus several reference captions and questions per scene.

    The scenes, images and single captions are exactly those of :func:`shapes_tensors`
    (same stream); the references and questions come from a separate stream derived from
    ``(seed, split, REFERENCE_STREAM)``, so adding them changes nothing else.

    Args:
        num_samples: N, the number of scenes, > 0.
        split: one of :data:`SPLITS`.
        config: drawing parameters; ``ShapesConfig()`` if None.
        num_references: K, reference captions per scene, > 0.

    Returns:
        The dict of :func:`shapes_tensors` (``images`` (N, 3, H, W) float32 in [0, 1],
        ``objects``, ...) with ``references``, N lists of K strings, and ``qa``, N lists of
        :func:`vqa_pairs` dicts.

    Taught in notebooks/10_captioning_and_vqa.
    """
    positive_int(num_references=num_references)
    config = ShapesConfig() if config is None else config
    data = shapes_tensors(num_samples, split=split, config=config)
    rng = np.random.default_rng([config.seed, SPLITS.index(split), REFERENCE_STREAM])
    data["references"] = [caption_references(o, rng, num_references) for o in data["objects"]]
    data["qa"] = [vqa_pairs(o, rng, split=split) for o in data["objects"]]
    return data
