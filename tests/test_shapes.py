"""Tests for the Shapes world (mmcourse/data/shapes.py)."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from mmcourse.data.shapes import (
    CLASS_NAMES,
    COLOUR_RGB,
    COLOUR_SYNONYMS,
    COLOURS,
    HELD_OUT_PAIRS,
    POSITION_PHRASES,
    POSITIONS,
    SHAPE_SYNONYMS,
    SHAPES,
    SIZE_SYNONYMS,
    SIZES,
    SPLITS,
    ShapesConfig,
    class_id,
    generate_shapes,
    render_scene,
    shapes_dataset,
    shapes_tensors,
)

NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}


@pytest.fixture(scope="module")
def train() -> dict:
    return generate_shapes(600, split="train")


@pytest.fixture(scope="module")
def heldout() -> dict:
    return generate_shapes(300, split="heldout")


# --- vocabulary ----------------------------------------------------------------------


def test_vocabulary_and_class_ids():
    assert len(SHAPES) == 4 and len(COLOURS) == 6 and len(SIZES) == 2 and len(POSITIONS) == 5
    assert len(CLASS_NAMES) == 24 == len(set(CLASS_NAMES))
    for colour in COLOURS:
        for shape in SHAPES:
            assert CLASS_NAMES[class_id(shape=shape, colour=colour)] == f"{colour} {shape}"
    for table, keys in (
        (COLOUR_SYNONYMS, COLOURS),
        (SHAPE_SYNONYMS, SHAPES),
        (SIZE_SYNONYMS, SIZES),
        (POSITION_PHRASES, POSITIONS),
    ):
        assert set(table) == set(keys)
        assert all(table[k][0].split()[-1] == k for k in keys)  # canonical first
    # held-out pairs: valid, distinct, and every shape and colour still seen in training
    assert len(set(HELD_OUT_PAIRS)) == len(HELD_OUT_PAIRS) == 4
    train_pairs = {(s, c) for s in SHAPES for c in COLOURS} - set(HELD_OUT_PAIRS)
    assert {s for s, _ in train_pairs} == set(SHAPES)
    assert {c for _, c in train_pairs} == set(COLOURS)


# --- determinism, shapes and dtypes -----------------------------------------------------


def test_same_seed_same_data_different_seed_different_data():
    a = generate_shapes(20, config=ShapesConfig(seed=3))
    b = generate_shapes(20, config=ShapesConfig(seed=3))
    c = generate_shapes(20, config=ShapesConfig(seed=4))
    np.testing.assert_array_equal(a["images"], b["images"])
    assert a["caption"] == b["caption"] and a["question"] == b["question"]
    assert a["objects"] == b["objects"]
    assert not np.array_equal(a["images"], c["images"])
    assert a["caption"] != c["caption"]
    # scenes are drawn one after another: a shorter run is a prefix of a longer one
    np.testing.assert_array_equal(
        generate_shapes(5, config=ShapesConfig(seed=3))["images"], a["images"][:5]
    )


def test_global_rng_is_not_used():
    np.random.seed(0)
    a = generate_shapes(4)
    np.random.seed(1)
    b = generate_shapes(4)
    np.testing.assert_array_equal(a["images"], b["images"])


@pytest.mark.parametrize("image_size", [16, 32, 48])
def test_shapes_and_dtypes(image_size):
    n = 7
    d = generate_shapes(n, config=ShapesConfig(image_size=image_size))
    assert d["images"].shape == (n, image_size, image_size, 3) and d["images"].dtype == np.uint8
    assert d["label"].shape == (n,) and d["label"].dtype == np.int64
    assert d["num_objects"].shape == (n,) and d["num_objects"].dtype == np.int64
    for key in ("caption", "canonical_caption", "question", "answer", "objects"):
        assert len(d[key]) == n
    assert [len(o) for o in d["objects"]] == d["num_objects"].tolist()
    for objects, label in zip(d["objects"], d["label"], strict=True):
        assert label == class_id(shape=objects[0]["shape"], colour=objects[0]["colour"])


def test_object_counts_follow_config(train):
    assert set(train["num_objects"].tolist()) == {1, 2, 3}
    d = generate_shapes(50, config=ShapesConfig(min_objects=2, max_objects=2))
    assert set(d["num_objects"].tolist()) == {2}
    for objects in train["objects"]:  # distinct regions and distinct compositions
        assert len({o["position"] for o in objects}) == len(objects)
        assert len({(o["shape"], o["colour"]) for o in objects}) == len(objects)


# --- splits and held-out compositions -------------------------------------------------


def test_splits_disjoint_in_compositions(train, heldout):
    held = set(HELD_OUT_PAIRS)
    for split in ("validation", "test"):
        d = generate_shapes(300, split=split)
        for objects in d["objects"]:
            assert not {(o["shape"], o["colour"]) for o in objects} & held
    for objects in train["objects"]:
        assert not {(o["shape"], o["colour"]) for o in objects} & held
    for objects, label in zip(heldout["objects"], heldout["label"], strict=True):
        assert (objects[0]["shape"], objects[0]["colour"]) in held
        assert CLASS_NAMES[label] in {f"{c} {s}" for s, c in HELD_OUT_PAIRS}
    assert {(o[0]["shape"], o[0]["colour"]) for o in heldout["objects"]} == held


def test_train_questions_never_name_a_held_out_pair(train):
    for question in train["question"]:
        for shape, colour in HELD_OUT_PAIRS:
            assert f"{colour} {shape}" not in question


def test_splits_never_share_images():
    seen = set()
    for split in SPLITS:
        images = generate_shapes(100, split=split)["images"]
        hashes = {image.tobytes() for image in images}
        assert not hashes & seen, split
        seen |= hashes


# --- captions --------------------------------------------------------------------------


def _words(table: dict[str, tuple[str, ...]], key: str) -> list[str]:
    return list(table[key])


def _found(phrase: str, words: list[str]) -> bool:
    return any(re.search(rf"\b{re.escape(w)}\b", phrase) for w in words)


def test_canonical_caption_names_every_object(train, heldout):
    for data in (train, heldout):
        for caption, objects in zip(data["canonical_caption"], data["objects"], strict=True):
            for o in objects:
                position = POSITION_PHRASES[o["position"]][0]
                assert f"a {o['size']} {o['colour']} {o['shape']} {position}" in caption
            assert caption.count(" and ") == (len(objects) > 1)


def test_synonym_caption_uses_true_attributes(train):
    used = set()
    for caption, objects in zip(train["caption"], train["objects"], strict=True):
        body = re.sub(r"^(there is|an image of|a picture of) ", "", caption)
        phrases = re.split(r", | and ", body)
        assert len(phrases) == len(objects), caption
        for phrase, o in zip(phrases, objects, strict=True):
            # the true colour and shape are always named, by some synonym
            assert _found(phrase, _words(COLOUR_SYNONYMS, o["colour"])), (phrase, o)
            assert _found(phrase, _words(SHAPE_SYNONYMS, o["shape"])), (phrase, o)
            # and no word of another colour, shape, size or position appears
            for table, key in (
                (COLOUR_SYNONYMS, o["colour"]),
                (SHAPE_SYNONYMS, o["shape"]),
                (SIZE_SYNONYMS, o["size"]),
                (POSITION_PHRASES, o["position"]),
            ):
                for other in set(table) - {key}:
                    assert not _found(phrase, _words(table, other)), (phrase, o)
            used |= {
                w
                for table in (COLOUR_SYNONYMS, SHAPE_SYNONYMS)
                for ws in table.values()
                for w in ws
                if _found(phrase, [w])
            }
    every_word = {
        w for table in (COLOUR_SYNONYMS, SHAPE_SYNONYMS) for ws in table.values() for w in ws
    }
    assert used == every_word  # every synonym is actually sampled
    assert len(set(train["caption"])) > 0.8 * len(train["caption"])


# --- questions and answers ----------------------------------------------------------------


def _answer(question: str, objects: list[dict]) -> str:
    """An independent answerer working from the metadata."""
    if question == "how many objects are there?":
        return NUMBER_WORDS[len(objects)]
    if m := re.fullmatch(r"what colour is the (\w+)\?", question):
        matches = [o for o in objects if o["shape"] == m[1]]
        assert len(matches) == 1, f"ambiguous: {question} {objects}"
        return matches[0]["colour"]
    if m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        matches = [o for o in objects if o["colour"] == m[1]]
        assert len(matches) == 1, f"ambiguous: {question} {objects}"
        return matches[0]["shape"]
    if m := re.fullmatch(r"is there an? (\w+) (\w+)\?", question):
        assert m[1] in COLOURS and m[2] in SHAPES
        return "yes" if any(o["colour"] == m[1] and o["shape"] == m[2] for o in objects) else "no"
    raise AssertionError(f"unknown question {question!r}")


def test_answers_are_correct_and_balanced(train, heldout):
    for data in (train, heldout):
        for q, a, objects in zip(data["question"], data["answer"], data["objects"], strict=True):
            assert _answer(q, objects) == a, (q, a, objects)
    kinds = {q.split()[0] + " " + q.split()[1] for q in train["question"]}
    assert kinds == {"how many", "what colour", "what shape", "is there"}
    yes_no = [a for a in train["answer"] if a in ("yes", "no")]
    assert len(yes_no) > 80
    assert 0.4 < yes_no.count("yes") / len(yes_no) < 0.6


# --- pixels -------------------------------------------------------------------------------


def _nearest_colour(rgb: np.ndarray) -> str:
    names = list(COLOUR_RGB)
    distances = [np.linalg.norm(rgb - np.asarray(COLOUR_RGB[n]) * 255) for n in names]
    return names[int(np.argmin(distances))]


def test_object_colour_dominates_at_its_centre(train):
    size = train["images"].shape[1]
    checked = 0
    for image, objects in zip(train["images"], train["objects"], strict=True):
        for o in objects:
            x, y = int(o["x"] * size), int(o["y"] * size)
            window = image[y - 1 : y + 2, x - 1 : x + 2].reshape(-1, 3).astype(float)  # 3x3 pixels
            brightest = window[np.argsort(window.sum(1))[-5:]].mean(0)
            assert _nearest_colour(brightest) == o["colour"], (o, brightest)
            checked += 1
    assert checked > 1000


def test_size_and_position_are_visible():
    d = generate_shapes(300, config=ShapesConfig(max_objects=1, noise=0.0))
    size = d["images"].shape[1]
    area = {"small": [], "large": []}
    for image, (o,) in zip(d["images"], d["objects"], strict=True):
        foreground = image.astype(int).max(axis=2) > 60  # background is ~20/255
        area[o["size"]].append(foreground.sum())
        ys, xs = np.nonzero(foreground)
        cx, cy = xs.mean() / size, ys.mean() / size
        expected = {"left": cx < 0.35, "right": cx > 0.65, "top": cy < 0.35, "bottom": cy > 0.65}
        assert expected.get(o["position"], 0.35 < cx < 0.65 and 0.35 < cy < 0.65), (o, cx, cy)
    assert min(area["large"]) > max(area["small"])


def test_pixels_carry_the_class_signal():
    """A linear classifier on raw pixels of one-object scenes learns the 20 seen classes."""
    from sklearn.linear_model import RidgeClassifier

    config = ShapesConfig(max_objects=1)
    fit = generate_shapes(1500, config=config)
    held = generate_shapes(400, split="test", config=config)
    x_fit = fit["images"].reshape(len(fit["label"]), -1) / 255.0  # (N, H * W * 3)
    x_held = held["images"].reshape(len(held["label"]), -1) / 255.0
    predicted = RidgeClassifier(alpha=10.0).fit(x_fit, fit["label"]).predict(x_held)
    n_shapes = len(SHAPES)
    # chance is 1/20 for the class, 1/4 for the shape, 1/6 for the colour
    assert (predicted == held["label"]).mean() > 0.5  # measured 0.67
    assert (predicted % n_shapes == held["label"] % n_shapes).mean() > 0.75  # measured 0.88
    assert (predicted // n_shapes == held["label"] // n_shapes).mean() > 0.7  # measured 0.79
    # control: the same classifier fitted to shuffled labels is at chance
    shuffled = np.random.default_rng(0).permutation(fit["label"])
    control = RidgeClassifier(alpha=10.0).fit(x_fit, shuffled).predict(x_held)
    assert (control == held["label"]).mean() < 0.15


def _centred_crops(data: dict, half: int = 7) -> np.ndarray:
    """Brightness of a (2 half, 2 half) window around each single object's centre."""
    size = data["images"].shape[1]
    padded = np.pad(data["images"], ((0, 0), (half, half), (half, half), (0, 0)))
    crops = []
    for image, (o,) in zip(padded, data["objects"], strict=True):
        x, y = round(o["x"] * size) + half, round(o["y"] * size) + half
        crops.append(image[y - half : y + half, x - half : x + half].max(axis=-1).reshape(-1))
    return np.stack(crops) / 255.0  # (N, 4 half^2)


def test_every_shape_is_drawn_distinctly():
    """Centred on the object, a linear classifier tells the four shapes apart almost perfectly."""
    from sklearn.linear_model import RidgeClassifier

    config = ShapesConfig(max_objects=1)
    fit = generate_shapes(1000, config=config)
    held = generate_shapes(400, split="test", config=config)
    shape_fit, shape_held = fit["label"] % len(SHAPES), held["label"] % len(SHAPES)
    model = RidgeClassifier(alpha=1.0).fit(_centred_crops(fit), shape_fit)
    accuracy = (model.predict(_centred_crops(held)) == shape_held).mean()
    assert accuracy > 0.95, accuracy  # measured 1.0; drawing squares as circles gives 0.76


# --- render_scene -------------------------------------------------------------------------


def test_render_scene_direct():
    objects = [{"shape": "cross", "colour": "yellow", "size": "large", "position": "center"}]
    a = render_scene(objects, image_size=64, rng=np.random.default_rng(0))
    b = render_scene(objects, image_size=64, rng=np.random.default_rng(0))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    np.testing.assert_array_equal(a, b)
    assert _nearest_colour(a[32, 32].astype(float)) == "yellow"
    assert a[2, 2].max() < 60  # dark background in the corner
    empty = render_scene([], image_size=16, rng=np.random.default_rng(0), noise=0.0)
    assert len(np.unique(empty.reshape(-1, 3), axis=0)) == 1


# --- datasets and torch views ---------------------------------------------------------


def test_datasets_features_and_decoding():
    from datasets import ClassLabel, Image

    ds = shapes_dataset({"train": 6, "heldout": 4})
    assert (
        set(ds) == {"train", "heldout"}
        and ds["train"].num_rows == 6
        and ds["heldout"].num_rows == 4
    )
    features = ds["train"].features
    assert isinstance(features["image"], Image)
    assert isinstance(features["label"], ClassLabel) and features["label"].names == CLASS_NAMES
    row = ds["train"][0]
    assert row["image"].size == (32, 32) and row["image"].mode == "RGB"
    reference = generate_shapes(6)
    np.testing.assert_array_equal(np.asarray(row["image"]), reference["images"][0])  # lossless PNG
    assert row["caption"] == reference["caption"][0] and row["answer"] == reference["answer"][0]
    assert (
        row["label"] == reference["label"][0] and row["num_objects"] == reference["num_objects"][0]
    )
    assert [o["shape"] for o in row["objects"]] == [o["shape"] for o in reference["objects"][0]]
    assert set(row["objects"][0]) == {"shape", "colour", "size", "position", "x", "y"}
    assert set(shapes_dataset(2, config=ShapesConfig(image_size=16))) == set(SPLITS)


def test_shapes_tensors():
    t = shapes_tensors(5, split="validation")
    assert t["images"].shape == (5, 3, 32, 32) and t["images"].dtype == torch.float32
    assert 0.0 <= t["images"].min() and t["images"].max() <= 1.0
    assert t["labels"].shape == (5,) and t["labels"].dtype == torch.long
    reference = generate_shapes(5, split="validation")
    np.testing.assert_allclose(
        t["images"].permute(0, 2, 3, 1).numpy() * 255, reference["images"], atol=1e-3
    )
    assert t["caption"] == reference["caption"] and t["question"] == reference["question"]


# --- bad arguments ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: generate_shapes(0), "num_samples"),
        (lambda: generate_shapes(-3), "num_samples"),
        (lambda: generate_shapes(2.5), "num_samples"),
        (lambda: generate_shapes(4, split="dev"), "split"),
        (lambda: generate_shapes(4, config={"image_size": 32}), "config"),
        (lambda: ShapesConfig(image_size=8), "image_size"),
        (lambda: ShapesConfig(image_size=0), "image_size"),
        (lambda: ShapesConfig(min_objects=0), "min_objects"),
        (lambda: ShapesConfig(max_objects=4), "max_objects"),
        (lambda: ShapesConfig(min_objects=3, max_objects=2), "min_objects"),
        (lambda: ShapesConfig(noise=-0.1), "noise"),
        (lambda: ShapesConfig(colour_jitter=1.5), "colour_jitter"),
        (lambda: ShapesConfig(position_jitter=0.3), "position_jitter"),
        (lambda: ShapesConfig(seed=-1), "seed"),
        (lambda: shapes_dataset(0), "num_samples"),
        (lambda: shapes_dataset({}), "num_samples"),
        (lambda: shapes_dataset({"train": 0}), "num_samples"),
        (lambda: shapes_dataset({"dev": 3}), "split"),
        (lambda: shapes_tensors(0), "num_samples"),
        (lambda: shapes_tensors(3, split="tests"), "split"),
        (lambda: class_id(shape="hexagon", colour="red"), "shape"),
        (lambda: class_id(shape="circle", colour="pink"), "colour"),
        (
            lambda: render_scene(
                [{"shape": "star", "colour": "red", "size": "small", "position": "left"}],
                image_size=32,
                rng=np.random.default_rng(0),
            ),
            "shape",
        ),
        (
            lambda: render_scene(
                [{"shape": "circle", "colour": "red", "size": "medium", "position": "left"}],
                image_size=32,
                rng=np.random.default_rng(0),
            ),
            "size",
        ),
        (lambda: render_scene([], image_size=12, rng=np.random.default_rng(0)), "image_size"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_parameter(call, name):
    with pytest.raises(ValueError, match=name):
        call()
