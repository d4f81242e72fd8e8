"""Chapter 10's additions to the Shapes world: several references, five question types."""

from __future__ import annotations

import numpy as np
import pytest

from mmcourse.caption_metrics import parse_caption
from mmcourse.data.shapes import (
    ANSWERS,
    HELD_OUT_PAIRS,
    NUMBER_WORDS,
    QUESTION_TYPES,
    ShapesConfig,
    caption_references,
    captioning_data,
    generate_shapes,
    shapes_tensors,
    vqa_pairs,
)


@pytest.fixture(scope="module")
def data() -> dict:
    return captioning_data(200, split="train", config=ShapesConfig(seed=3))


def test_existing_outputs_unchanged(data):
    plain = shapes_tensors(200, split="train", config=ShapesConfig(seed=3))
    assert np.array_equal(plain["images"].numpy(), data["images"].numpy())
    for key in ("caption", "canonical_caption", "question", "answer", "objects"):
        assert plain[key] == data[key]


def test_references_describe_the_scene(data):
    for refs, objects in zip(data["references"], data["objects"], strict=True):
        assert len(refs) == 5 and len(set(refs)) >= 2
        for ref in refs:
            parsed = parse_caption(ref)
            assert len(parsed) == len(objects)
            truth = sorted((o["shape"], o["colour"]) for o in objects)
            assert sorted((p["shape"], p["colour"]) for p in parsed) == truth
            for p in parsed:  # size and position, where stated, are the object's own
                o = next(
                    o for o in objects if (o["shape"], o["colour"]) == (p["shape"], p["colour"])
                )
                assert all(p[a] == o[a] for a in ("size", "position") if a in p)


def test_questions_have_correct_answers_of_every_type(data):
    seen = set()
    for qa, objects in zip(data["qa"], data["objects"], strict=True):
        types = [q["type"] for q in qa]
        assert {"count", "exists", "where"} <= set(types)
        assert types == [t for t in QUESTION_TYPES if t in types]
        for q in qa:
            assert q["answer"] in ANSWERS
            seen.add(q["type"])
            if q["type"] == "count":
                assert q["answer"] == NUMBER_WORDS[len(objects)]
            if q["type"] == "where":
                colour, shape = q["question"].removeprefix("where is the ").rstrip("?").split()
                o = next(o for o in objects if (o["shape"], o["colour"]) == (shape, colour))
                assert q["answer"] == o["position"]
            if q["type"] == "exists":
                colour, shape = q["question"].removeprefix("is there a ").rstrip("?").split()
                present = (shape, colour) in {(o["shape"], o["colour"]) for o in objects}
                assert q["answer"] == ("yes" if present else "no")
                assert (shape, colour) not in HELD_OUT_PAIRS
    assert seen == set(QUESTION_TYPES)
    answers = [q["answer"] for qa in data["qa"] for q in qa if q["type"] == "exists"]
    assert 0.35 < answers.count("yes") / len(answers) < 0.65


def test_deterministic_and_split_specific():
    a = captioning_data(20, split="test")
    b = captioning_data(20, split="test")
    c = captioning_data(20, split="validation")
    assert a["references"] == b["references"] and a["qa"] == b["qa"]
    assert a["references"] != c["references"]


def test_heldout_scenes_are_referenced():
    d = captioning_data(30, split="heldout")
    for refs, objects in zip(d["references"], d["objects"], strict=True):
        first = (objects[0]["shape"], objects[0]["colour"])
        assert first in HELD_OUT_PAIRS
        assert all(first in {(p["shape"], p["colour"]) for p in parse_caption(r)} for r in refs)


def test_bad_arguments():
    objects = generate_shapes(1)["objects"][0]
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="k must be a positive integer"):
        caption_references(objects, rng, 0)
    with pytest.raises(ValueError, match="at least one object"):
        caption_references([], rng)
    with pytest.raises(ValueError, match="split must be one of"):
        vqa_pairs(objects, rng, split="dev")
    with pytest.raises(ValueError, match="object colour"):
        vqa_pairs([{**objects[0], "colour": "pink"}], rng)
    with pytest.raises(ValueError, match="num_references"):
        captioning_data(2, num_references=0)
