"""Tests for data/metrics.py: SQuAD 2.0 EM/F1, the seed's BLEU-1, and the seed's test subset.

Every expected number is either derived by hand in a comment or computed by an independent
re-implementation written here (the official evaluate-v2.0.py logic, numpy's permutation).
"""

import collections
import json
import math
import re
import string

import numpy as np
import pytest

from conftest import DEV_FILE
from data.metrics import (
    NO_ANSWER,
    SEED_SUBSET_SEED,
    best_thresholds,
    bleu1,
    correct_references,
    exact_match,
    f1,
    normalize_answer,
    seed_references,
    seed_subset_indices,
    squad_v2_scores,
)



# --------------------------------------------------------------------------- normalisation, EM, F1


@pytest.mark.parametrize(
    "raw, normalised",
    [
        ("The  Denver Broncos!", "denver broncos"),  # case, punctuation, article, double space
        ("An apple a day", "apple day"),  # all three articles
        ("theater Anne", "theater anne"),  # articles only as whole words
        ("Denver-Broncos", "denverbroncos"),  # punctuation is deleted, not replaced by a space
        ("  the . ", ""),
    ],
)
def test_normalize_answer(raw, normalised):
    assert normalize_answer(raw) == normalised


def test_articles_case_and_punctuation_do_not_matter():
    assert exact_match("the Denver Broncos", ["Denver Broncos"]) == 1.0
    assert exact_match("DENVER BRONCOS", ["denver broncos"]) == 1.0
    assert exact_match("Denver Broncos!", ["denver, broncos."]) == 1.0
    assert f1("the Denver Broncos", ["Denver Broncos"]) == 1.0
    # "denverbroncos" vs "denver broncos": different strings, no shared token.
    assert exact_match("Denver-Broncos", ["Denver Broncos"]) == 0.0
    assert f1("Denver-Broncos", ["Denver Broncos"]) == 0.0


def test_max_over_several_golds():
    assert exact_match("Broncos", ["Panthers", "the Broncos"]) == 1.0
    # vs "panthers": 0. vs "broncos": pred [denver, broncos], gold [broncos], overlap 1,
    # P = 1/2, R = 1, F1 = 2 * (1/2) / (3/2) = 2/3. Max = 2/3.
    assert exact_match("Denver Broncos", ["Carolina Panthers", "the Broncos"]) == 0.0
    assert f1("Denver Broncos", ["Carolina Panthers", "the Broncos"]) == pytest.approx(2 / 3)


def test_partial_overlap_f1_by_hand():
    # pred -> [denver, broncos, won, super, bowl, 50] (6), gold -> [denver, broncos] (2), overlap 2:
    # P = 2/6, R = 2/2, F1 = 2 * (1/3) * 1 / (1/3 + 1) = 1/2.
    assert f1("the Denver Broncos won Super Bowl 50", ["Denver Broncos"]) == pytest.approx(0.5)
    # Overlap is a multiset: pred [red, red], gold [red, red, blue] share 2 tokens (a set would say 1):
    # P = 2/2, R = 2/3, F1 = 2 * 1 * (2/3) / (5/3) = 4/5.
    assert f1("red red", ["red red blue"]) == pytest.approx(0.8)
    # Repeats in the prediction are clipped by the gold count: [red, red, blue] vs [red, blue, green],
    # overlap red 1 + blue 1 = 2: P = 2/3, R = 2/3, F1 = 2/3.
    assert f1("red red blue", ["red blue green"]) == pytest.approx(2 / 3)


def test_golds_that_normalise_to_empty_are_dropped():
    # "the" and "." normalise to "": dropped, none left, so the only gold is "" (no answer).
    assert exact_match("", ["the", "."]) == 1.0
    assert f1("", ["the", "."]) == 1.0
    assert exact_match("Denver", ["the", "."]) == 0.0
    # With a real gold left, the empty one is gone: abstaining no longer matches anything.
    assert exact_match("", ["the", "Denver"]) == 0.0
    assert f1("", ["the", "Denver"]) == 0.0
    assert exact_match("Denver", ["the", "Denver"]) == 1.0


def test_no_answer_right_and_wrong():
    assert exact_match("", []) == 1.0 and f1("", []) == 1.0  # abstained on an unanswerable question
    assert exact_match("Denver", []) == 0.0 and f1("Denver", []) == 0.0  # answered an unanswerable one
    assert exact_match("", ["Denver"]) == 0.0 and f1("", ["Denver"]) == 0.0  # abstained on an answerable one
    assert exact_match("the", []) == 1.0  # "the" normalises to "", which reads as abstaining


# --------------------------------------------------------------------------- squad_v2_scores


def test_squad_v2_scores_small_by_hand():
    golds = {
        "q1": ["Denver Broncos"],
        "q2": ["Santa Clara", "Levi's Stadium"],
        "q3": [],
        "q4": [],
        "q5": [],
    }
    predictions = {
        "q1": "the Denver Broncos",  # EM 1, F1 1
        "q2": "Santa Clara, California",  # EM 0; [santa, clara, california] vs [santa, clara]: P 2/3, R 1, F1 0.8
        "q3": "",  # EM 1, F1 1
        "q4": "Denver",  # EM 0, F1 0
        "q5": "",  # EM 1, F1 1
    }
    scores = squad_v2_scores(golds, predictions)
    expected = {
        "exact": 100 * 3 / 5,  # 60
        "f1": 100 * (1 + 0.8 + 1 + 0 + 1) / 5,  # 76
        "total": 5,
        "HasAns_exact": 100 * 1 / 2,  # 50
        "HasAns_f1": 100 * (1 + 0.8) / 2,  # 90
        "HasAns_total": 2,
        "NoAns_exact": 100 * 2 / 3,
        "NoAns_f1": 100 * 2 / 3,
        "NoAns_total": 3,
    }
    assert scores.keys() == expected.keys()
    for key, value in expected.items():
        assert scores[key] == pytest.approx(value), key


def test_group_keys_only_for_non_empty_groups():
    only_answerable = squad_v2_scores({"a": ["x"]}, {"a": "x"})
    assert set(only_answerable) == {"exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total"}
    only_unanswerable = squad_v2_scores({"a": []}, {"a": "x"})
    assert set(only_unanswerable) == {"exact", "f1", "total", "NoAns_exact", "NoAns_f1", "NoAns_total"}
    assert only_unanswerable["NoAns_exact"] == 0.0
    # Grouping follows the raw gold list, as officially: golds ["the"] make the question answerable
    # even though its only usable gold is "" (so abstaining scores 100 there).
    empty_gold = squad_v2_scores({"a": ["the"]}, {"a": ""})
    assert (empty_gold["HasAns_total"], empty_gold["HasAns_exact"]) == (1, 100.0)
    assert "NoAns_total" not in empty_gold


def test_missing_and_unknown_ids_raise_with_counts():
    golds = {f"m{i}": ["x"] for i in range(7)} | {"ok": []}
    predictions = {"ok": "", "u0": "x", "u1": "y"}
    with pytest.raises(ValueError) as info:
        squad_v2_scores(golds, predictions)
    message = str(info.value)
    assert re.search(r"\b7\b.*missing", message)
    assert re.search(r"\b2\b.*unknown", message)
    assert sum(f"'m{i}'" in message for i in range(7)) == 5  # at most 5 examples shown
    assert "'u0'" in message and "'u1'" in message
    with pytest.raises(ValueError, match="missing"):
        squad_v2_scores({"a": ["x"], "b": []}, {"a": "x"})
    with pytest.raises(ValueError, match="unknown"):
        squad_v2_scores({"a": ["x"]}, {"a": "x", "b": ""})


# --------------------------------------------------------------------------- official cross-check


def _official_scores(dataset: list[dict], preds: dict[str, str], na_probs: dict[str, float] | None = None
                     ) -> dict[str, float]:
    """Compact transcription of the official evaluate-v2.0.py (get_raw_scores, apply_no_ans_threshold at its
    default --na-prob-thresh 1.0, make_eval_dict and, given na_probs, find_all_best_thresh)."""

    def normalize(s):
        exclude = set(string.punctuation)
        s = "".join(ch for ch in s.lower() if ch not in exclude)
        return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())

    def get_tokens(s):
        return normalize(s).split() if s else []

    def compute_f1(a_gold, a_pred):
        gold_toks, pred_toks = get_tokens(a_gold), get_tokens(a_pred)
        num_same = sum((collections.Counter(gold_toks) & collections.Counter(pred_toks)).values())
        if len(gold_toks) == 0 or len(pred_toks) == 0:
            return int(gold_toks == pred_toks)
        if num_same == 0:
            return 0
        precision, recall = num_same / len(pred_toks), num_same / len(gold_toks)
        return 2 * precision * recall / (precision + recall)

    exact_raw, f1_raw, has_ans = {}, {}, {}
    for article in dataset:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                qid = qa["id"]
                has_ans[qid] = bool(qa["answers"])
                gold_answers = [a["text"] for a in qa["answers"] if normalize(a["text"])] or [""]
                exact_raw[qid] = max(int(normalize(a) == normalize(preds[qid])) for a in gold_answers)
                f1_raw[qid] = max(compute_f1(a, preds[qid]) for a in gold_answers)

    def apply_no_ans_threshold(scores, na_prob_thresh=1.0):
        return {qid: float(not has_ans[qid]) if na_probs[qid] > na_prob_thresh else s for qid, s in scores.items()}

    if na_probs is None:
        exact_thresh, f1_thresh = exact_raw, f1_raw
    else:
        exact_thresh, f1_thresh = apply_no_ans_threshold(exact_raw), apply_no_ans_threshold(f1_raw)

    def make_eval_dict(qids):
        return {
            "exact": 100.0 * sum(exact_thresh[k] for k in qids) / len(qids),
            "f1": 100.0 * sum(f1_thresh[k] for k in qids) / len(qids),
            "total": len(qids),
        }

    def find_best_thresh(scores):
        num_no_ans = sum(1 for k in has_ans if not has_ans[k])
        cur_score = best_score = num_no_ans
        best_thresh = 0.0
        for qid in sorted(na_probs, key=lambda k: na_probs[k]):
            if qid not in scores:
                continue
            if has_ans[qid]:
                diff = scores[qid]
            elif preds[qid]:
                diff = -1
            else:
                diff = 0
            cur_score += diff
            if cur_score > best_score:
                best_score = cur_score
                best_thresh = na_probs[qid]
        return 100.0 * best_score / len(scores), best_thresh

    out = make_eval_dict(list(exact_raw))
    for prefix, wanted in (("HasAns", True), ("NoAns", False)):
        qids = [k for k, v in has_ans.items() if v is wanted]
        if qids:
            out |= {f"{prefix}_{k}": v for k, v in make_eval_dict(qids).items()}
    if na_probs is not None:
        out["best_exact"], out["best_exact_thresh"] = find_best_thresh(exact_raw)
        out["best_f1"], out["best_f1_thresh"] = find_best_thresh(f1_raw)
    return out


def _varied_prediction(i: int, question: str, golds: list[str]) -> str:
    """A deterministic mix of right, partial, reformatted, wrong and empty answers."""
    first_words = " ".join(question.split()[:4])
    kind = i % 6
    if kind == 0:
        return golds[0] if golds else ""
    if kind == 1:
        return golds[-1].upper() + "." if golds else "The"  # "The" normalises to "": abstains
    if kind == 2:
        words = (golds[0] if golds else question).split()
        return " ".join(words[: max(1, len(words) // 2)])
    if kind == 3:
        return ""
    if kind == 4:
        return first_words
    return f"the {golds[-1]} and {first_words}" if golds else NO_ANSWER


def _dev_golds_and_varied_predictions() -> tuple[list[dict], dict[str, list[str]], dict[str, str]]:
    """The dev set as the official script reads it, its gold answers, and a varied prediction for every question."""
    dataset = json.loads(DEV_FILE.read_text(encoding="utf-8"))["data"]
    golds, predictions = {}, {}
    for article in dataset:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                texts = [a["text"] for a in qa["answers"]]
                golds[qa["id"]] = texts
                predictions[qa["id"]] = _varied_prediction(len(predictions), qa["question"], texts)
    return dataset, golds, predictions


def test_squad_v2_scores_match_official_algorithm_on_dev_set():
    dataset, golds, predictions = _dev_golds_and_varied_predictions()
    ours = squad_v2_scores(golds, predictions)
    official = _official_scores(dataset, predictions)
    assert ours.keys() == official.keys()
    for key in official:
        assert ours[key] == pytest.approx(official[key], rel=1e-12), key
    assert (ours["total"], ours["HasAns_total"], ours["NoAns_total"]) == (11873, 5928, 5945)
    assert 0 < ours["exact"] < ours["f1"] < 100  # the mix really exercises partial credit


def _as_dataset(golds: dict[str, list[str]]) -> list[dict]:
    return [{"paragraphs": [{"qas": [{"id": qid, "answers": [{"text": t} for t in texts]}
                                     for qid, texts in golds.items()]}]}]


def test_best_thresholds_small_by_hand():
    golds = {"a": ["x"], "b": [], "c": ["y z"], "d": []}
    predictions = {"a": "x", "b": "w", "c": "y", "d": ""}  # right; made up; half right (F1 2/3); abstained
    na_probs = {"a": 0.1, "b": 0.2, "c": 0.15, "d": 0.4}
    # All abstain: 2 points (b, d). Then by na_prob: a +1 -> 3 (t=0.1); c +0 EM, +2/3 F1 -> 3 or 3.67 (t=0.15);
    # b answers an unanswerable question: -1; d abstains anyway: +0.
    assert best_thresholds(golds, predictions, na_probs) == pytest.approx(
        {"best_exact": 75.0, "best_exact_thresh": 0.1, "best_f1": 100 * (3 + 2 / 3) / 4, "best_f1_thresh": 0.15})
    # Answering only unanswerable questions: abstaining everywhere is best, at the threshold 0.0.
    assert best_thresholds({"a": [], "b": []}, {"a": "x", "b": "y"}, {"a": 0.3, "b": 0.6}) == {
        "best_exact": 100.0, "best_exact_thresh": 0.0, "best_f1": 100.0, "best_f1_thresh": 0.0}
    with pytest.raises(ValueError, match="every question"):
        best_thresholds(golds, predictions, {"a": 0.5})


def test_best_thresholds_match_official_algorithm_on_synthetic_data():
    rng = np.random.default_rng(1)
    words = ["red", "blue", "the", "green", "a"]
    for trial in range(20):
        golds, predictions = {}, {}
        for i in range(30):
            answerable = rng.random() < 0.5
            golds[f"q{i}"] = [" ".join(rng.choice(words, 2))] if answerable else []
            predictions[f"q{i}"] = "" if rng.random() < 0.3 else " ".join(rng.choice(words, rng.integers(1, 3)))
        na_probs = {qid: float(rng.integers(0, 5)) / 4 for qid in golds}  # many ties, and 0 and 1 themselves
        ours = {**squad_v2_scores(golds, predictions), **best_thresholds(golds, predictions, na_probs)}
        official = _official_scores(_as_dataset(golds), predictions, na_probs)
        assert ours.keys() == official.keys()
        for key in official:
            assert ours[key] == pytest.approx(official[key], rel=1e-12), (trial, key)


def test_best_thresholds_match_official_algorithm_on_dev_set_with_random_probabilities():
    dataset, golds, predictions = _dev_golds_and_varied_predictions()
    rng = np.random.default_rng(0)
    na_probs = {}
    for qid, texts in golds.items():
        # Unanswerable questions lean towards high probabilities, as a useful model's would; some ties.
        p = rng.beta(2, 1) if not texts else rng.beta(1, 2)
        na_probs[qid] = round(p, 2) if rng.random() < 0.5 else p
    ours = best_thresholds(golds, predictions, na_probs)
    official = _official_scores(dataset, predictions, na_probs)
    for key in ours:
        assert ours[key] == pytest.approx(official[key], rel=1e-12), key
    assert squad_v2_scores(golds, predictions)["f1"] < ours["best_f1"] < 100  # the threshold really helps
    assert 0 < ours["best_f1_thresh"] < 1


# --------------------------------------------------------------------------- BLEU-1


def test_bleu1_clips_repeated_tokens():
    # hyp [the, the, the], ref [the, cat]: "the" counts at most once -> 1 match of 3.
    # hyp_len 3 > ref_len 2 -> BP 1, so bleu = 1/3.
    result = bleu1(["the the the"], [["the cat"]])
    assert result == pytest.approx(
        {"bleu": 1 / 3, "precision": 1 / 3, "brevity_penalty": 1.0, "translation_length": 3, "reference_length": 2}
    )


def test_bleu1_several_references():
    # Clip counts are the max over single references: the -> 2 (first ref), cat -> 1 (second).
    # hyp [the, the, the, cat]: matches 2 + 1 = 3 of 4. (Summing refs would allow 3 "the": 4 matches;
    # using only the first ref would give 2.) ref_len = shortest ref = 2 < 4 -> BP 1.
    result = bleu1(["the the the cat"], [["the the mat on a rug", "the cat"]])
    assert result["precision"] == pytest.approx(3 / 4)
    assert result["reference_length"] == 2
    assert result["bleu"] == pytest.approx(3 / 4)


def test_bleu1_brevity_penalty_uses_shortest_reference():
    # hyp [a, b, c] all match; refs of 5 and 4 tokens -> ref_len 4 (the shortest), hyp_len 3 <= 4:
    # BP = exp(1 - 4/3) = exp(-1/3) ~ 0.7165 (the longest ref would give exp(-2/3)).
    result = bleu1(["a b c"], [["a b c d e", "a b c d"]])
    assert result["brevity_penalty"] == pytest.approx(math.exp(-1 / 3))
    assert result["bleu"] == pytest.approx(math.exp(-1 / 3))


def test_bleu1_brevity_penalty_both_ways():
    # Longer hyp: 5 tokens, 3 match, ref_len 3 -> BP 1, bleu 3/5.
    longer = bleu1(["a b c x y"], [["a b c"]])
    assert longer["brevity_penalty"] == 1.0
    assert longer["bleu"] == pytest.approx(3 / 5)
    # Shorter hyp: 2 tokens, both match, ref_len 4 -> BP = exp(1 - 4/2) = exp(-1) ~ 0.3679.
    shorter = bleu1(["a b"], [["a b c d"]])
    assert shorter["brevity_penalty"] == pytest.approx(math.exp(-1))
    assert shorter["bleu"] == pytest.approx(math.exp(-1))
    # Equal lengths: not longer, so exp(1 - 2/2) = 1.
    assert bleu1(["a b"], [["a b"]])["brevity_penalty"] == 1.0


def test_bleu1_uses_13a_word_tokens_case_sensitive():
    # 13a splits the final period off: hyp [Denver, .] vs ref [Denver]: 1 match of 2; BP 1 (2 > 1).
    split = bleu1(["Denver."], [["Denver"]])
    assert (split["translation_length"], split["reference_length"]) == (2, 1)  # words, not 7 characters
    assert split["bleu"] == pytest.approx(1 / 2)
    assert bleu1(["Denver."], [["Denver ."]])["bleu"] == pytest.approx(1.0)
    # 13a keeps a decimal number whole and splits the comma: [3.5, million, ,, Denver] = 4 tokens.
    assert bleu1(["3.5 million, Denver"], [["x"]])["translation_length"] == 4
    # Case-sensitive: "denver" does not match "Denver".
    assert bleu1(["denver"], [["Denver"]])["bleu"] == 0.0


def test_bleu1_empty_hypotheses_score_zero():
    result = bleu1(["", "   "], [["a"], ["b c"]])
    assert result == {
        "bleu": 0.0,
        "precision": 0.0,
        "brevity_penalty": 0.0,
        "translation_length": 0,
        "reference_length": 3,
    }


def test_bleu1_is_corpus_level():
    # Counts are pooled: 4 + 0 matches over 4 + 1 hypothesis tokens, ref_len 4 + 1 = 5, BP exp(0) = 1:
    # bleu = 4/5. The mean of sentence scores would be (1 + 0) / 2 = 1/2.
    assert bleu1(["a b c d", "x"], [["a b c d"], ["y"]])["bleu"] == pytest.approx(4 / 5)


def test_bleu1_seed_references_reward_abstaining():
    # Always answering NO_ANSWER = [Cannot, Find, Answer] on one answerable and one unanswerable item.
    # Seed refs: ["text", "answer_start"] (shortest 1 token) and [NO_ANSWER] (3 tokens):
    # matches 0 + 3 of 6, ref_len 1 + 3 = 4 < 6 -> BP 1 -> bleu 1/2.
    refs = [seed_references(["Denver Broncos"]), seed_references([])]
    assert bleu1([NO_ANSWER, NO_ANSWER], refs)["bleu"] == pytest.approx(1 / 2)


def test_bleu1_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        bleu1(["a", "b"], [["a"]])


# --------------------------------------------------------------------------- the seed's test subset


def test_seed_subset_indices_match_numpy_permutation():
    indices = seed_subset_indices()
    expected = np.random.default_rng(1608637542).permutation(11873)[:100]
    assert SEED_SUBSET_SEED == 1608637542
    assert indices == expected.tolist()
    assert len(indices) == 100 and len(set(indices)) == 100
    assert all(isinstance(i, int) and 0 <= i < 11873 for i in indices)


def test_seed_subset_indices_parameters():
    assert sorted(seed_subset_indices(10, 10)) == list(range(10))
    assert seed_subset_indices(50, 5) == np.random.default_rng(SEED_SUBSET_SEED).permutation(50)[:5].tolist()


def test_seed_and_correct_references():
    assert NO_ANSWER == "Cannot Find Answer"
    assert seed_references(["Denver Broncos", "Broncos"]) == ["text", "answer_start"]
    assert seed_references([]) == [NO_ANSWER]
    assert correct_references(["Denver Broncos", "Broncos"]) == ["Denver Broncos", "Broncos"]
    assert correct_references([]) == [NO_ANSWER]
