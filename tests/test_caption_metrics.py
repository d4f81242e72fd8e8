"""BLEU equals sacrebleu, CIDEr-D equals pycocoevalcap, the attribute parser reads synonyms."""

from __future__ import annotations

import math

import pytest
import sacrebleu
from pycocoevalcap.cider.cider_scorer import CiderScorer

from mmcourse import caption_metrics as cm
from mmcourse.data.shapes import captioning_data


@pytest.fixture(scope="module")
def corpus():
    d = captioning_data(60, split="test")
    refs = [[cm.normalize(r) for r in rs[1:]] for rs in d["references"]]
    hyps = [cm.normalize(rs[0]) for rs in d["references"]]
    hyps[3] = "a"  # a one-word hypothesis: no bigrams at all
    hyps[4] = "red red red red red red"  # clipping matters
    return hyps, refs


def test_clipped_precision_equals_sacrebleu_counts(corpus):
    hyps, refs = corpus
    bleu = sacrebleu.corpus_bleu(hyps, [list(r) for r in zip(*refs, strict=True)], tokenize="none")
    for n in range(1, 5):
        assert cm.clipped_precision(hyps, refs, n) == (bleu.counts[n - 1], bleu.totals[n - 1])
    assert cm.clipped_precision(["red red red"], [["red circle"]], 1) == (1, 3)


def test_corpus_bleu_is_sacrebleu_with_ragged_references(corpus):
    hyps, refs = corpus
    ragged = [r[: 1 + i % 4] for i, r in enumerate(refs)]
    ours = cm.corpus_bleu(hyps, ragged)
    streams = [[r[j] if j < len(r) else None for r in ragged] for j in range(4)]
    theirs = sacrebleu.corpus_bleu(hyps, streams, tokenize="none")
    assert math.isclose(ours.score, theirs.score) and ours.counts == theirs.counts
    assert cm.corpus_bleu(["A red, big disk."], [["a red , big disk ."]]).score == pytest.approx(
        100
    )


@pytest.mark.parametrize("sigma", [6.0, 3.0, 20.0])
def test_cider_d_equals_pycocoevalcap(corpus, sigma):
    # pycocoevalcap cooks the n-grams with n=4 whatever n it is given: compare at n=4 only
    hyps, refs = corpus
    n = 4
    scorer = CiderScorer(n=n, sigma=sigma)
    for h, r in zip(hyps, refs, strict=True):
        scorer += (h, r)
    theirs, per_image = scorer.compute_score()
    ours, ours_per_image = cm.cider_d(hyps, refs, n=n, sigma=sigma)
    assert ours == pytest.approx(theirs, abs=1e-9)
    assert ours_per_image == pytest.approx(list(per_image), abs=1e-9)


def test_cider_d_rewards_consensus_and_punishes_length():
    refs = [["a red circle", "a red circle on the left"], ["a blue square", "a big blue box"]]
    good, _ = cm.cider_d(["a red circle", "a blue square"], refs)
    wrong, _ = cm.cider_d(["a blue square", "a red circle"], refs)
    long, _ = cm.cider_d(["a red circle " * 4, "a blue square " * 4], refs)
    assert good > long > wrong >= 0


@pytest.mark.parametrize(
    "caption, expected",
    [
        ("a red circle", [{"colour": "red", "shape": "circle"}]),
        (
            "there is a big crimson plus sign on the left side",
            [{"size": "large", "colour": "red", "shape": "cross", "position": "left"}],
        ),
        (
            "an image of a tiny aqua round shape in the upper part, a box and a lemon wedge",
            [
                {"size": "small", "colour": "cyan", "shape": "circle", "position": "top"},
                {"shape": "square"},
                {"colour": "yellow", "shape": "triangle"},
            ],
        ),
        (
            "a picture of a plum plus near the bottom",
            [{"colour": "purple", "shape": "cross", "position": "bottom"}],
        ),
        (
            "a huge violet block in the middle",
            [{"size": "large", "colour": "purple", "shape": "square", "position": "center"}],
        ),
        ("a red and a blue", []),  # no shape named: no object
    ],
)
def test_parse_caption_reads_synonyms(caption, expected):
    assert cm.parse_caption(caption) == expected


def test_attribute_accuracy_hand_cases():
    scene = [
        {"shape": "circle", "colour": "red", "size": "large", "position": "left"},
        {"shape": "square", "colour": "blue", "size": "small", "position": "top"},
    ]
    perfect = "a small blue square at the top and a large red circle on the left"  # order free
    acc = cm.attribute_accuracy([perfect], [scene])
    assert acc["overall"] == 1.0
    half = cm.attribute_accuracy(["a red circle and a blue square"], [scene])
    assert half["colour"] == half["shape"] == half["count"] == 1.0
    assert half["size"] == half["position"] == 0.0  # unsaid counts as wrong
    wrong = cm.attribute_accuracy(["a green triangle"], [scene])
    assert wrong["count"] == 0.0 and wrong["overall"] == 0.0
    extra = cm.attribute_accuracy(["a red circle, a blue square and a red circle"], [scene])
    assert extra["count"] == 0.0 and extra["colour"] == 1.0


def test_vqa_accuracy_per_type():
    acc = cm.vqa_accuracy(
        ["red", "Yes ", "two"], ["red", "yes", "three"], ["colour", "exists", "count"]
    )
    assert acc == {"overall": pytest.approx(2 / 3), "colour": 1.0, "exists": 1.0, "count": 0.0}


def test_bad_inputs():
    with pytest.raises(ValueError, match="at least one hypothesis"):
        cm.corpus_bleu([], [])
    with pytest.raises(ValueError, match="one list of reference strings per hypothesis"):
        cm.cider_d(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="non-empty list of strings"):
        cm.cider_d(["a"], ["a red circle"])
    with pytest.raises(ValueError, match="n must be a positive integer"):
        cm.clipped_precision(["a"], [["a"]], 0)
    with pytest.raises(ValueError, match="as many captions as scenes"):
        cm.attribute_accuracy(["a"], [])
    with pytest.raises(ValueError, match="same non-zero length"):
        cm.vqa_accuracy(["a"], [], [])
    with pytest.raises(ValueError, match="caption must be a string"):
        cm.parse_caption(None)
