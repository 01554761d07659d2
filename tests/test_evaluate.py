"""evaluate.py: batched answers, the seed's answer rules, and scoring checkpoints and prediction files."""
import json

import pytest
import torch

import evaluate
import train
from finetune.answer import answer, clean_answer, official_answer
from finetune.model import load_answerer
from conftest import DEV_FILE
from data.metrics import best_thresholds, seed_subset_indices
from data.squad import SquadExample, load_squad_file
from gpt2 import GPT, UserError, preset

DEV = load_squad_file(DEV_FILE)


def test_batched_answers_equal_one_by_one():
    torch.manual_seed(0)
    model = GPT(preset("gpt2-tiny")).eval()
    questions = DEV[:7]
    batched = answer(model, questions, batch_size=4, max_new_tokens=6, progress=False)
    assert batched == [answer(model, [q], 1, 6, progress=False)[0] for q in questions]
    assert any(batched)


def test_answer_rules():
    assert clean_answer(" Paris\n\nANSWER:\nLondon") == "Paris"
    assert clean_answer("Cannot Find Answer") == "Cannot Find Answer"
    assert official_answer("Cannot Find Answer") == "" and official_answer("Paris") == "Paris"


def write(path, predictions):
    path.write_text(json.dumps(predictions))
    return str(path)


def score_file(tmp_path, predictions, *extra):
    evaluate.main(["--predictions", write(tmp_path / "p.json", predictions), "--eval-file", str(DEV_FILE),
                   "--out", str(tmp_path / "m.json"), *extra])
    return json.loads((tmp_path / "m.json").read_text())


def test_perfect_predictions_score_100(tmp_path):
    metrics = score_file(tmp_path, {ex.id: ex.answers[0] if ex.answers else "" for ex in DEV})
    assert (metrics["exact"], metrics["f1"], metrics["total"]) == (100.0, 100.0, 11873)
    assert metrics["bleu1"]["bleu"] == pytest.approx(1.0, abs=0.02)
    for key in ("exact", "f1", "total", "HasAns_exact", "HasAns_f1", "HasAns_total", "NoAns_exact", "NoAns_f1",
                "NoAns_total"):
        assert key in metrics
    for entry in ("bleu1", "bleu1_seed"):
        assert set(metrics[entry]) >= {"bleu", "brevity_penalty", "translation_length", "reference_length"}


def test_always_abstaining_is_what_the_seeds_protocol_rewards(tmp_path):
    metrics = score_file(tmp_path, {ex.id: "Cannot Find Answer" for ex in DEV})
    assert (metrics["NoAns_exact"], metrics["HasAns_exact"]) == (100.0, 0.0)
    # Each abstention matches "Cannot Find Answer" (3 tokens) on an unanswerable question, nothing otherwise; the
    # 300 hypothesis tokens outnumber the shortest references (3 or "text"), so no brevity penalty.
    unanswerable = sum(not DEV[i].answers for i in seed_subset_indices())
    assert metrics["bleu1_seed"]["bleu"] == pytest.approx(unanswerable / 100)
    assert metrics["bleu1_seed"]["translation_length"] == 300
    subset = score_file(tmp_path, {DEV[i].id: "" for i in seed_subset_indices()}, "--subset", "seed", "--overwrite")
    assert subset["total"] == 100 and subset["bleu1_seed"] == metrics["bleu1_seed"]
    # The whole dev set's predictions with --subset: only the selected 100 are scored, the rest ignored.
    whole = score_file(tmp_path, {ex.id: "Cannot Find Answer" for ex in DEV}, "--subset", "seed", "--overwrite")
    assert whole["total"] == 100 and whole["bleu1_seed"] == metrics["bleu1_seed"]


def test_missing_or_unknown_ids_are_a_clear_error(tmp_path):
    predictions = {ex.id: "" for ex in DEV[1:]}
    predictions["made-up"] = "x"
    with pytest.raises(UserError, match="1 question id.*missing.*1 unknown"):
        score_file(tmp_path, predictions)
    with pytest.raises(UserError, match="cannot read predictions"):
        evaluate.main(["--predictions", str(tmp_path / "none.json"), "--eval-file", str(DEV_FILE)])


def test_checkpoint_from_train_py_is_scored(tmp_path, capsys):
    run = tmp_path / "RUN"
    train.main(["--model", "gpt2-tiny", "--init", "random", "--train-file", str(DEV_FILE), "--eval-file",
                str(DEV_FILE), "--max-steps", "4", "--out", str(run), "--micro-batch-size", "2", "--grad-accum", "2"])
    evaluate.main(["--checkpoint", str(run), "--eval-file", str(DEV_FILE), "--limit", "24", "--max-new-tokens", "16",
                   "--out", str(run / "metrics.m.json")])  # a run holds metrics*.json
    metrics = json.loads((run / "metrics.m.json").read_text())
    assert metrics["total"] == 24 and "bleu1_seed" not in metrics
    predictions = json.loads((run / "metrics.m.predictions.json").read_text())
    na_probs = json.loads((run / "metrics.m.na_prob.json").read_text())  # the official --na-prob-file format
    assert list(na_probs) == list(predictions) == [ex.id for ex in DEV[:24]]
    assert all(0 < p <= 1 for p in na_probs.values())
    # The reported best_* are those of the two files written (test_metrics checks them against the official script).
    golds = {ex.id: ex.answers for ex in DEV[:24]}
    assert {k: metrics[k] for k in ("best_exact", "best_exact_thresh", "best_f1", "best_f1_thresh")} == \
        best_thresholds(golds, predictions, na_probs)
    assert "Winograd" in capsys.readouterr().out
    evaluate.main(["--checkpoint", str(run / "checkpoint.pt"), "--context", "Paris is in France.", "--question",
                   "Where is Paris?", "--max-new-tokens", "5"])
    model = load_answerer(str(run / "checkpoint.pt"), None, torch.device("cpu"), torch.float32)
    expected = answer(model, [SquadExample("q", "Paris is in France.", "Where is Paris?", [])], 1, 5, False)
    assert capsys.readouterr().out == expected[0] + "\n"


def test_a_run_is_scored_on_its_own_eval_file_offline_one_file_per_subset(short_dev_file, tmp_path, capsys,
                                                                             monkeypatch):
    def no_network(split):
        raise AssertionError("evaluate.py went to the Hub for the questions")
    monkeypatch.setattr("data.squad.load_squad_hub", no_network)
    eval_file = tmp_path / "short16.json"
    eval_file.write_bytes(short_dev_file.read_bytes())
    run = tmp_path / "RUN"
    train.main(["--model", "gpt2-tiny", "--init", "random", "--train-file", str(short_dev_file), "--eval-file",
                str(eval_file), "--max-steps", "1", "--out", str(run), "--micro-batch-size", "2", "--grad-accum", "1"])
    capsys.readouterr()

    evaluate.main(["--checkpoint", str(run), "--max-new-tokens", "4"])
    everything = json.loads((run / "metrics.short16.json").read_text())
    assert everything["total"] == 16 and "replacing" not in capsys.readouterr().err
    evaluate.main(["--checkpoint", str(run), "--max-new-tokens", "4", "--limit", "5"])
    assert json.loads((run / "metrics.short16.first5.json").read_text())["total"] == 5
    assert json.loads((run / "metrics.short16.json").read_text()) == everything  # the first one is kept
    assert len(json.loads((run / "metrics.short16.first5.predictions.json").read_text())) == 5
    with pytest.raises(UserError, match="already exist.*--overwrite"):  # the same questions again: never silent
        evaluate.main(["--checkpoint", str(run), "--max-new-tokens", "4", "--limit", "5"])
    evaluate.main(["--checkpoint", str(run), "--max-new-tokens", "4", "--limit", "5", "--overwrite"])
    assert "replacing" in capsys.readouterr().err

    eval_file.unlink()
    with pytest.raises(UserError, match="short16.json, which is not there.*--eval-file"):
        evaluate.main(["--checkpoint", str(run)])


def test_contexts_cut_to_fit_are_counted_in_evaluation_and_in_ask_mode(tiny_hub_dir, capsys):
    torch.manual_seed(0)
    model = GPT(preset("gpt2-tiny")).eval()
    short = [SquadExample("s", "Paris is in France.", "Where is Paris?", [])]
    long = SquadExample("l", " ".join(f"word{i}" for i in range(1500)), "Which word comes first?", [])
    answer(model, short * 3, batch_size=4, max_new_tokens=4, progress=False)
    assert "cut" not in capsys.readouterr().err
    answer(model, short * 3 + [long] * 2, batch_size=4, max_new_tokens=4, progress=False)
    assert "note: 2 of 5 context(s) cut at the end to fit 1020 prompt tokens" in capsys.readouterr().err
    evaluate.main(["--model", str(tiny_hub_dir), "--context", long.context, "--question", long.question,
                   "--max-new-tokens", "4"])
    assert "1 of 1 context(s) cut" in capsys.readouterr().err
