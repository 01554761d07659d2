"""Answer-quality metrics: official SQuAD 2.0 EM/F1, the seed's BLEU-1, and the seed's test subset.

Two families of numbers live here:

* SQuAD 2.0 exact match and token F1, re-implemented from the official ``evaluate-v2.0.py``.
  A prediction of ``""`` means "no answer"; an unanswerable question has no gold texts, and
  its only gold answer becomes ``""``, so abstaining there scores 1 and answering scores 0.
* Corpus BLEU-1 exactly as Hugging Face ``evaluate``'s ``bleu`` metric computes it with
  ``max_order=1``. It is kept only to reproduce the seed notebook's number; ``seed_references``
  rebuilds the seed's buggy references and ``correct_references`` the intended ones.
"""

import collections
import math
import re
import string

import numpy as np
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

from .prompts import NO_ANSWER


SEED_SUBSET_SEED = 1608637542
"""Seed of the numpy generator whose permutation picked the seed's 100 test questions."""

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)
_TOKENIZE_13A = Tokenizer13a()


# --------------------------------------------------------------------------- SQuAD 2.0 EM / F1


def normalize_answer(s: str) -> str:
    """Normalise an answer the way the official script does before comparing.

    Lowercase, delete ASCII punctuation, turn the articles a/an/the into spaces, collapse
    whitespace: ``"The  Denver Broncos!"`` -> ``"denver broncos"``.
    """
    s = "".join(ch for ch in s.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", s).split())


def _usable_golds(golds: list[str]) -> list[str]:
    """Drop golds that normalise to empty; if none are left, the only gold is ``""`` (no answer)."""
    return [g for g in golds if normalize_answer(g)] or [""]


def _token_f1(gold: str, prediction: str) -> float:
    """Bag-of-tokens F1 between two answers; two empty answers agree (1.0), one empty side gives 0.0."""
    gold_tokens = normalize_answer(gold).split()
    pred_tokens = normalize_answer(prediction).split()
    if not gold_tokens or not pred_tokens:
        return float(gold_tokens == pred_tokens)
    overlap = sum((collections.Counter(gold_tokens) & collections.Counter(pred_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(pred_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, golds: list[str]) -> float:
    """1.0 if the normalised prediction equals any usable normalised gold, else 0.0.

    ``golds == []`` (unanswerable) means the only gold is ``""``: only an empty prediction matches.
    """
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(g) for g in _usable_golds(golds)))


def f1(prediction: str, golds: list[str]) -> float:
    """Best token F1 of the prediction against the usable golds (same gold rule as ``exact_match``)."""
    return max(_token_f1(g, prediction) for g in _usable_golds(golds))


def squad_v2_scores(golds: dict[str, list[str]], predictions: dict[str, str]) -> dict[str, float]:
    """Score a predictions dict like the official ``evaluate-v2.0.py`` (no-answer threshold unused).

    ``golds`` maps question id -> gold answer texts (``[]`` = unanswerable); ``predictions`` maps
    question id -> answer (``""`` = no answer). Returns ``exact``, ``f1`` (percentages) and ``total``
    over all questions, and the same three with a ``HasAns_`` / ``NoAns_`` prefix over answerable /
    unanswerable questions; like the official script, a group's keys appear only if it is non-empty.

    Raises ``ValueError`` if any gold id lacks a prediction or any prediction id is not a gold id,
    or if there are no questions.
    """
    missing = [qid for qid in golds if qid not in predictions]
    unknown = [qid for qid in predictions if qid not in golds]
    if missing or unknown:
        raise ValueError(
            f"{len(missing)} question id(s) missing a prediction (first: {missing[:5]}); "
            f"{len(unknown)} unknown prediction id(s) (first: {unknown[:5]})"
        )
    if not golds:
        raise ValueError("no questions to score")

    em = {qid: exact_match(predictions[qid], answers) for qid, answers in golds.items()}
    f1s = {qid: f1(predictions[qid], answers) for qid, answers in golds.items()}
    groups = {
        "": list(golds),
        "HasAns_": [qid for qid, answers in golds.items() if answers],
        "NoAns_": [qid for qid, answers in golds.items() if not answers],
    }
    scores: dict[str, float] = {}
    for prefix, qids in groups.items():
        if qids:
            scores[f"{prefix}exact"] = 100.0 * sum(em[q] for q in qids) / len(qids)
            scores[f"{prefix}f1"] = 100.0 * sum(f1s[q] for q in qids) / len(qids)
            scores[f"{prefix}total"] = len(qids)
    return scores


def best_thresholds(golds: dict[str, list[str]], predictions: dict[str, str],
                    na_probs: dict[str, float]) -> dict[str, float]:
    """``best_exact``, ``best_exact_thresh``, ``best_f1``, ``best_f1_thresh``: what the official
    ``evaluate-v2.0.py`` reports given a no-answer probability for every question (``--na-prob-file``).

    A threshold t makes every question with ``na_prob > t`` abstain. The script sweeps t over the
    na_probs: below all of them every question abstains, which scores one point per unanswerable
    question. Then, in increasing na_prob order (ties in ``na_probs``' order: a stable sort), each
    question in turn keeps its prediction: an answerable one adds its EM (or F1) against the golds (0
    for an empty prediction), an unanswerable one loses its point if the prediction is an answer. The
    best running total (x100 / questions) and the na_prob at which it was first reached (0.0 if
    abstaining everywhere is best) are the result. Inputs as in ``squad_v2_scores``, ids the same.
    """
    if set(na_probs) != set(golds):
        raise ValueError("na_probs must have one probability for every question")
    result = {}
    for name, score in (("exact", exact_match), ("f1", f1)):
        total = best = sum(1 for answers in golds.values() if not answers)
        best_thresh = 0.0
        for qid in sorted(na_probs, key=lambda q: na_probs[q]):
            if golds[qid]:
                total += score(predictions[qid], golds[qid])
            elif predictions[qid]:
                total -= 1
            if total > best:
                best, best_thresh = total, na_probs[qid]
        result[f"best_{name}"] = 100.0 * best / len(golds)
        result[f"best_{name}_thresh"] = best_thresh
    return result


# --------------------------------------------------------------------------- the seed's BLEU-1


def _tokens_13a(text: str) -> list[str]:
    """sacrebleu's 13a tokenisation (case kept), as a list: ``"Denver."`` -> ``["Denver", "."]``.

    sacrebleu returns one space-joined string; HF ``evaluate`` vendors the same tokenizer but
    returns ``line.split()``. Splitting on whitespace here gives the same tokens.
    """
    return _TOKENIZE_13A(text).split()


def bleu1(hypotheses: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus BLEU with max order 1, as HF ``evaluate.load("bleu")`` with ``max_order=1``.

    Over the whole corpus (not an average of sentence scores), after 13a tokenisation:

    * matches: each hypothesis token counts at most as often as it occurs in the one reference
      where it occurs most (clipping);
    * ``precision = matches / translation_length`` (all hypothesis tokens);
    * ``reference_length`` sums the token count of each item's SHORTEST reference;
    * ``brevity_penalty = 1`` if ``translation_length > reference_length``, else
      ``exp(1 - reference_length / translation_length)``; 0 if either length is 0;
    * ``bleu = precision * brevity_penalty``, a fraction in [0, 1].
    """
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    matches = translation_length = reference_length = 0
    for hypothesis, refs in zip(hypotheses, references):
        hyp_counts = collections.Counter(_tokens_13a(hypothesis))
        ref_token_lists = [_tokens_13a(r) for r in refs]
        max_ref_counts = collections.Counter()
        for tokens in ref_token_lists:
            max_ref_counts |= collections.Counter(tokens)  # | keeps the max count per token
        matches += sum((hyp_counts & max_ref_counts).values())  # & keeps the min: clipping
        translation_length += sum(hyp_counts.values())
        reference_length += min(len(tokens) for tokens in ref_token_lists)

    precision = matches / translation_length if translation_length else 0.0
    if translation_length == 0 or reference_length == 0:
        brevity_penalty = 0.0
    elif translation_length > reference_length:
        brevity_penalty = 1.0
    else:
        brevity_penalty = math.exp(1 - reference_length / translation_length)
    return {
        "bleu": precision * brevity_penalty,
        "precision": precision,
        "brevity_penalty": brevity_penalty,
        "translation_length": translation_length,
        "reference_length": reference_length,
    }


# --------------------------------------------------------------------------- the seed's test set


def seed_subset_indices(n_questions: int = 11873, size: int = 100) -> list[int]:
    """Indices (dev-set file order) of the seed's test questions: the first ``size`` of a permutation."""
    return np.random.default_rng(SEED_SUBSET_SEED).permutation(n_questions)[:size].tolist()


def seed_references(golds: list[str]) -> list[str]:
    """The seed's buggy BLEU references for one question.

    The seed passed the SQuAD ``answers`` dict where a list of strings was expected, so an
    answerable question got the dict's keys ``["text", "answer_start"]`` as its references.
    Unanswerable questions (``golds == []``) got ``[NO_ANSWER]``.
    """
    return ["text", "answer_start"] if golds else [NO_ANSWER]


def correct_references(golds: list[str]) -> list[str]:
    """The intended BLEU references: every gold text, or ``[NO_ANSWER]`` for an unanswerable question."""
    return list(golds) if golds else [NO_ANSWER]
