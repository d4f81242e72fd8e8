"""Scoring generated captions and answers: BLEU, CIDEr-D, attribute accuracy, VQA accuracy.

* **BLEU** (Papineni et al. 2002) comes from ``sacrebleu``: :func:`corpus_bleu` is a thin,
  checked wrapper. :func:`clipped_precision` writes out its core, the *clipped n-gram
  precision* p_n, as a teaching step; the tests check its counts against sacrebleu's.
* **CIDEr-D** (Vedantam et al. 2015) is written from its formula in :func:`cider_d`: every
  caption becomes tf-idf weighted n-gram vectors g^n (n = 1..4, idf from the reference
  captions of the whole test set), a candidate c is compared with each reference s_j by
  a cosine whose candidate weights are clipped at the reference's, damped by a Gaussian
  length penalty, averaged over n and over the m references, times 10::

      CIDEr-D_n(c, S) = 10/m sum_j exp(-(l(c) - l(s_j))^2 / (2 sigma^2))
                        * <min(g^n(c), g^n(s_j)), g^n(s_j)> / (||g^n(c)|| ||g^n(s_j)||)
      CIDEr-D(c, S)   = 1/4 sum_{n=1..4} CIDEr-D_n(c, S)

  equal to ``pycocoevalcap.cider.cider_scorer.CiderScorer`` (the coco-caption code) in the
  tests, including one quirk of that code: the length l is the number of *bigrams*.
* **Attribute accuracy** (:func:`attribute_accuracy`) parses colour, shape, size and
  position of each object, and the object count, out of a caption (every synonym of the
  Shapes world) and compares them with the scene: what n-gram overlap cannot see.
* **VQA accuracy** per question type (:func:`vqa_accuracy`).

Captions are compared as pre-tokenised lower-case strings (:func:`normalize`); nothing
here needs Java or the PTB tokenizer.

Taught in notebooks/10_captioning_and_vqa.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

from mmcourse.data.shapes import (
    COLOUR_SYNONYMS,
    POSITION_PHRASES,
    SHAPE_SYNONYMS,
    SIZE_SYNONYMS,
)
from mmcourse.utils import positive_float, positive_int

ATTRIBUTES = ("colour", "shape", "size", "position")  # per-object attributes of a scene
SLOTS = (*ATTRIBUTES, "count")  # what attribute accuracy scores


# --- text ----------------------------------------------------------------------------------


def normalize(text: str) -> str:
    """Lower-case ``text`` and put spaces around punctuation: ``"A red, big disk."`` ->
    ``"a red , big disk ."`` (the tokenisation both BLEU and CIDEr-D see here).

    Taught in notebooks/10_captioning_and_vqa.
    """
    from mmcourse.clip import WordTokenizer

    return " ".join(WordTokenizer.split(text))


def _check_corpus(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]]
) -> list[list[str]]:
    if isinstance(hypotheses, str) or not isinstance(hypotheses, Sequence):
        raise ValueError(f"hypotheses must be a list of strings, got {type(hypotheses).__name__}")
    if len(hypotheses) == 0:
        raise ValueError("expected at least one hypothesis, got an empty list")
    if isinstance(references, str) or len(references) != len(hypotheses):
        n = len(references) if not isinstance(references, str) else "a string"
        raise ValueError(
            f"references must hold one list of reference strings per hypothesis: "
            f"{len(hypotheses)} hypotheses, got {n}"
        )
    refs = []
    for i, (hyp, rs) in enumerate(zip(hypotheses, references, strict=True)):
        if not isinstance(hyp, str):
            raise ValueError(f"hypothesis {i} must be a string, got {type(hyp).__name__}")
        if isinstance(rs, str) or len(rs) == 0 or not all(isinstance(r, str) for r in rs):
            raise ValueError(
                f"references[{i}] must be a non-empty list of strings (several references "
                f"per hypothesis), got {rs!r}"
            )
        refs.append(list(rs))
    return refs


# --- BLEU ----------------------------------------------------------------------------------


def ngrams(tokens: Sequence[str], n: int) -> Counter:
    """The multiset of n-grams of ``tokens``: ``Counter({("a", "red"): 1, ...})``."""
    positive_int(n=n)
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def clipped_precision(
    hypotheses: Sequence[str], references: Sequence[Sequence[str]], n: int
) -> tuple[int, int]:
    """BLEU's clipped n-gram counts over a corpus (the teaching step; sacrebleu does this).

    Each n-gram of a hypothesis counts as matched at most as often as it occurs in the
    reference where it occurs most often: ``min(count_hyp(g), max_j count_ref_j(g))``.

    Args:
        hypotheses: one string per segment, already tokenised by spaces.
        references: for each hypothesis a list of reference strings.
        n: the n-gram order, >= 1.

    Returns:
        ``(matches, total)``: clipped matches and the hypotheses' n-gram count, summed over
        the corpus; p_n = matches / total. Equal to sacrebleu's ``counts[n-1]`` and
        ``totals[n-1]`` with ``tokenize="none"``.

    Taught in notebooks/10_captioning_and_vqa.
    """
    refs = _check_corpus(hypotheses, references)
    matches = total = 0
    for hyp, rs in zip(hypotheses, refs, strict=True):
        h = ngrams(hyp.split(), n)
        max_ref: Counter = Counter()
        for r in rs:
            max_ref |= ngrams(r.split(), n)  # element-wise max of the counts
        matches += sum(min(c, max_ref[g]) for g, c in h.items())
        total += sum(h.values())
    return matches, total


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> Any:
    """Corpus BLEU-4 from ``sacrebleu`` with several references per hypothesis.

    Every string is :func:`normalize` d first and sacrebleu's own tokeniser is switched off
    (``tokenize="none"``), so BLEU, CIDEr-D and the clipped precision see the same tokens.
    Hypotheses may have different numbers of references.

    Args:
        hypotheses: N generated captions.
        references: N lists of reference captions.

    Returns:
        The ``sacrebleu.BLEUScore``: ``.score`` in [0, 100], ``.counts``, ``.totals``,
        ``.precisions``, ``.bp``.

    Taught in notebooks/10_captioning_and_vqa.
    """
    import sacrebleu

    refs = _check_corpus(hypotheses, references)
    width = max(len(r) for r in refs)
    streams = [
        [normalize(r[j]) if j < len(r) else None for r in refs] for j in range(width)
    ]  # sacrebleu wants one stream per reference position; None = no reference there
    hyps = [normalize(h) for h in hypotheses]
    return sacrebleu.corpus_bleu(hyps, streams, tokenize="none")


# --- CIDEr-D -------------------------------------------------------------------------------


def _counts(text: str, n: int) -> dict[tuple[str, ...], int]:
    words = text.split()
    out: Counter = Counter()
    for k in range(1, n + 1):
        out.update(ngrams(words, k))
    return out


def cider_d(
    hypotheses: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    n: int = 4,
    sigma: float = 6.0,
) -> tuple[float, list[float]]:
    """CIDEr-D of a corpus, written from its formula (see the module docstring).

    1) term frequencies: the counts of every 1..n-gram of each caption;
    2) idf(g) = log(|I|) - log(max(1, df(g))), with df(g) the number of test images whose
       references contain g and |I| the number of test images;
    3) g^k(c) = tf * idf for the k-grams of c; the same for each reference s_j;
    4) a clipped cosine per order k, times the Gaussian length penalty;
    5) the mean over k = 1..n and over the m references, times 10.

    Args:
        hypotheses: N candidate captions, tokenised by spaces (pass :func:`normalize` d text).
        references: N lists of reference captions, tokenised the same way.
        n: the largest n-gram order (4 in CIDEr-D).
        sigma: the width of the Gaussian length penalty (6 in CIDEr-D).

    Returns:
        ``(corpus score, per-image scores)``; the corpus score is the mean of the others.

    Taught in notebooks/10_captioning_and_vqa.
    """
    positive_int(n=n)
    positive_float(sigma=sigma)
    refs = _check_corpus(hypotheses, references)
    ref_counts = [[_counts(r, n) for r in rs] for rs in refs]  # 1)
    df: Counter = Counter()
    for rcs in ref_counts:
        df.update({g for rc in rcs for g in rc})  # each image counts once per n-gram
    log_images = math.log(len(refs))  # 2)

    def vectors(counts):  # 3): the tf-idf vector of each order, its norm and the length
        vec: list[dict] = [{} for _ in range(n)]
        for g, tf in counts.items():
            vec[len(g) - 1][g] = tf * (log_images - math.log(max(1.0, df[g])))
        norms = [math.sqrt(sum(w * w for w in v.values())) for v in vec]
        # coco-caption's length is the number of *bigrams* (words - 1): kept, for equality
        length = sum(c for g, c in counts.items() if len(g) == 2)
        return vec, norms, length

    scores = []
    for hyp, rcs in zip(hypotheses, ref_counts, strict=True):
        vec_c, norm_c, len_c = vectors(_counts(hyp, n))
        total = 0.0
        for rc in rcs:
            vec_s, norm_s, len_s = vectors(rc)
            penalty = math.exp(-((len_c - len_s) ** 2) / (2 * sigma**2))
            for k in range(n):  # 4)
                ref = vec_s[k]
                dot = sum(min(w, ref.get(g, 0.0)) * ref.get(g, 0.0) for g, w in vec_c[k].items())
                if norm_c[k] != 0 and norm_s[k] != 0:
                    dot /= norm_c[k] * norm_s[k]
                total += dot * penalty
        scores.append(10.0 * total / n / len(rcs))  # 5)
    return sum(scores) / len(scores), scores


# --- attribute accuracy --------------------------------------------------------------------


def _phrase_table() -> list[tuple[str, str, str]]:
    """(words, attribute, value) for every synonym, longest phrases first."""
    table = []
    for attribute, synonyms in (
        ("colour", COLOUR_SYNONYMS),
        ("shape", SHAPE_SYNONYMS),
        ("size", SIZE_SYNONYMS),
        ("position", POSITION_PHRASES),
    ):
        for value, words in synonyms.items():
            table.extend((w, attribute, value) for w in words)
    return sorted(table, key=lambda row: -len(row[0].split()))


_PHRASES = _phrase_table()


def parse_caption(caption: str) -> list[dict[str, str]]:
    """The objects a caption describes, with the attributes it states.

    The caption is cut into object phrases at ``","`` and ``"and"``; in each phrase every
    synonym of the Shapes world is looked up (longest first, so "plus sign" before "plus"
    and "on the left side" before "on the left"). A phrase that names a shape is an object.

    Args:
        caption: a generated or reference caption.

    Returns:
        One dict per object, e.g. ``{"shape": "circle", "colour": "red", "position": "left"}``;
        an attribute the caption does not state is absent.

    Taught in notebooks/10_captioning_and_vqa.
    """
    if not isinstance(caption, str):
        raise ValueError(f"caption must be a string, got {type(caption).__name__}")
    words = normalize(caption).split()
    phrases, current = [], []
    for w in words:
        if w in (",", "and"):
            phrases.append(current)
            current = []
        else:
            current.append(w)
    phrases.append(current)
    objects = []
    for phrase in phrases:
        found: dict[str, str] = {}
        i = 0
        while i < len(phrase):
            for text, attribute, value in _PHRASES:
                span = text.split()
                if phrase[i : i + len(span)] == span and attribute not in found:
                    found[attribute] = value
                    i += len(span) - 1
                    break
            i += 1
        if "shape" in found:
            objects.append(found)
    return objects


def _scene_slots(parsed: list[dict[str, str]], objects: list[dict[str, Any]]) -> dict[str, list]:
    """Correct/total per slot for one scene, under the best matching of parsed to true objects."""
    best, best_score = None, -1
    k = len(objects)
    padded = parsed + [{}] * max(0, k - len(parsed))
    for perm in itertools.permutations(range(len(padded)), k):
        score = sum(
            padded[p].get(a) == objects[i][a] for i, p in enumerate(perm) for a in ATTRIBUTES
        )
        if score > best_score:
            best, best_score = perm, score
    slots = {a: [0, k] for a in ATTRIBUTES}
    for i, p in enumerate(best):
        for a in ATTRIBUTES:
            slots[a][0] += int(padded[p].get(a) == objects[i][a])
    slots["count"] = [int(len(parsed) == k), 1]
    return slots


def attribute_accuracy(
    captions: Sequence[str], objects: Sequence[list[dict[str, Any]]]
) -> dict[str, float]:
    """How many of a scene's facts a caption states correctly.

    Each true object has four slots (colour, shape, size, position), each scene one more
    (the count: does the caption describe as many objects as there are?). Parsed objects
    are matched to true ones by the assignment that gets most slots right (at most 3! of
    them); a slot is correct when the matched phrase states the true value. A fact left
    unsaid counts as wrong, so a reference caption that omits size or position scores
    below 1 (print the references' own score as the ceiling of a template).

    Args:
        captions: N captions.
        objects: N lists of the scenes' objects (dicts with ``shape``, ``colour``, ``size``,
            ``position``).

    Returns:
        ``{"colour": ..., "shape": ..., "size": ..., "position": ..., "count": ...,
        "overall": ...}``: the fraction of correct slots of each kind, and over all slots.

    Taught in notebooks/10_captioning_and_vqa.
    """
    if isinstance(captions, str) or len(captions) != len(objects) or len(captions) == 0:
        raise ValueError(
            f"expected as many captions as scenes (at least one), got {len(captions)} "
            f"captions and {len(objects)} scenes"
        )
    totals = {s: [0, 0] for s in SLOTS}
    for caption, objs in zip(captions, objects, strict=True):
        if not objs:
            raise ValueError("every scene must hold at least one object")
        for s, (c, t) in _scene_slots(parse_caption(caption), objs).items():
            totals[s][0] += c
            totals[s][1] += t
    out = {s: c / t for s, (c, t) in totals.items()}
    out["overall"] = sum(c for c, _ in totals.values()) / sum(t for _, t in totals.values())
    return out


# --- VQA -----------------------------------------------------------------------------------


def vqa_accuracy(
    predictions: Sequence[str], answers: Sequence[str], types: Sequence[str]
) -> dict[str, float]:
    """Exact-match accuracy overall and per question type.

    Args:
        predictions: N predicted answers (compared after stripping and lower-casing).
        answers: N true answers.
        types: N question types (e.g. ``"colour"``).

    Returns:
        ``{"overall": ..., "colour": ..., ...}``, one entry per type present.

    Taught in notebooks/10_captioning_and_vqa.
    """
    if not len(predictions) == len(answers) == len(types) or len(answers) == 0:
        raise ValueError(
            "predictions, answers and types must have the same non-zero length, got "
            f"{len(predictions)}, {len(answers)} and {len(types)}"
        )
    hits: dict[str, list[int]] = {}
    for p, a, t in zip(predictions, answers, types, strict=True):
        ok = int(str(p).strip().lower() == str(a).strip().lower())
        for key in ("overall", t):
            hits.setdefault(key, []).append(ok)
    return {k: sum(v) / len(v) for k, v in hits.items()}


__all__ = [
    "ATTRIBUTES",
    "SLOTS",
    "normalize",
    "ngrams",
    "clipped_precision",
    "corpus_bleu",
    "cider_d",
    "parse_caption",
    "attribute_accuracy",
    "vqa_accuracy",
]
