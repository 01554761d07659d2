"""The threshold's answers are never abstentions, in any spelling, even from a model trained only to abstain."""
import json
import subprocess
import sys

import torch

import train
from conftest import DEV_FILE, ROOT
from data.prompts import NO_ANSWER
from finetune.answer import answer, answer_with_threshold, is_abstention, na_prob_note, timing, without_abstention
from finetune.model import load_answerer
from data.squad import load_squad_file


def test_every_spelling_of_the_abstention_is_one_and_is_cut_off_an_answer():
    for text in ("", "the", " .", NO_ANSWER, "cannot find answer.", "\ufffdannot Find Answer", "annot Find Answer",
                 "Find Answer", " CANNOT FIND ANSWER"):
        assert is_abstention(text), text
    for text in ("Cape Town", "Cannot Find Answers", "France", "the Find", "parsannot Find Answer"):
        assert not is_abstention(text), text
    assert without_abstention("parsannot Find Answer") == without_abstention("pars Find Answer") == "pars"
    assert without_abstention("Cape Town") == "Cape Town"


def test_a_model_trained_to_abstain_still_gives_a_best_answer_that_is_not_one(short_dev_file, tmp_path):
    """16 questions, all made unanswerable: the model learns to say "Cannot Find Answer" and little else. Forbidding
    only its first token "C" leaves it writing the rest ("...annot Find Answer"); the threshold's answers must not."""
    squad = json.loads(short_dev_file.read_text())
    for article in squad["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                qa["answers"], qa["is_impossible"] = [], True
    data = tmp_path / "abstain.json"
    data.write_text(json.dumps(squad))
    train.main(["--model", "gpt2-tiny", "--init", "random", "--train-file", str(data), "--eval-file", str(data),
                "--out", str(tmp_path / "run"), "--device", "cpu", "--lr", "1e-2", "--warmup-steps", "0",
                "--max-steps", "30", "--micro-batch-size", "16", "--grad-accum", "1", "--loss-on", "answer",
                "--lora-dropout", "0", "--base-dropout", "0", "--eval-every", "30", "--log-every", "30"])
    model = load_answerer(str(tmp_path / "run"), None, torch.device("cpu"), torch.float32, "none", False)
    questions = load_squad_file(data)
    assert all(text == NO_ANSWER for text in answer(model, questions, 16, 8, progress=False))
    answers = answer_with_threshold(model, questions, [0.0] * 16, 0.5, 16, 8, progress=False)
    assert len(answers) == 16, answers
    assert not any(is_abstention(text) or "find answer" in text.lower() for text in answers), answers


def test_the_answering_time_has_a_rate_only_where_answers_were_decoded():
    assert timing(0, 5952, 0.0, 3.2) == ("answered 0 of 5952 questions in 0.0 s, the threshold abstained on the other "
                                         "5952; the no-answer probabilities took 3.2 s")
    assert "(20.0 per second)" in timing(100, 100, 5.0, 1.0) and "abstained" not in timing(100, 100, 5.0, 1.0)


def split(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "split_squad.py"), *args], capture_output=True,
                          text=True)


def test_split_halves_go_where_named_and_replace_nothing_unasked(tmp_path):
    source = tmp_path / "dev.json"
    source.write_bytes(DEV_FILE.read_bytes())
    a, b = tmp_path / "runs" / "a.json", tmp_path / "runs" / "b.json"
    assert split(str(source), str(a), str(b)).returncode == 0 and a.is_file() and b.is_file()  # runs/ made
    first_half = a.read_bytes()
    refused = split(str(source), str(a), str(b))
    assert refused.returncode != 0 and "--overwrite" in refused.stderr and a.read_bytes() == first_half
    a.write_text('{"data": []}')  # a SQuAD JSON, as the script writes: --overwrite replaces it
    assert split(str(source), str(a), str(b), "--overwrite").returncode == 0 and a.read_bytes() == first_half
    onto_input = split(str(source), str(source), str(b), "--overwrite")
    assert onto_input.returncode != 0 and "which this command reads" in onto_input.stderr
    assert source.read_bytes() == DEV_FILE.read_bytes()


def test_a_near_uniform_models_na_prob_is_explained_in_one_line():
    note = na_prob_note([1e-21, 3e-22])
    assert note.startswith("note: every na_prob is below 1e-06 (largest 1e-21)") and "\n" not in note
    assert na_prob_note([1e-21, 0.9]) is None
