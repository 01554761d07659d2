"""No-answer probabilities, the best non-abstaining answer, the breakdown and its report, and the plots."""
import json
import math
import subprocess
import sys

import pytest
import torch

import evaluate
import plot
from conftest import DEV_FILE, ROOT
from data.breakdown import answer_length, question_word
from data.prompts import NO_ANSWER, answer_tokens, prompt_tokens
from data.squad import load_squad_file
from finetune.answer import answer, answer_with_threshold, no_answer_probability
from gpt2 import EOS_ID, GPT, UserError, generate, preset

DEV = load_squad_file(DEV_FILE)
C = answer_tokens(NO_ANSWER, add_eos=False)[0]  # the abstention's first token


def tiny_model(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(preset("gpt2-tiny")).eval()


@pytest.mark.parametrize("add_eos", [True, False])
def test_na_prob_is_the_product_of_the_abstentions_token_probabilities(add_eos):
    model, questions = tiny_model(), DEV[:7]  # prompts of different lengths, batched 3 by 3
    na_probs = no_answer_probability(model, questions, batch_size=3, max_new_tokens=8, add_eos=add_eos,
                                     progress=False)
    abstention = answer_tokens(NO_ANSWER, add_eos)
    assert len(abstention) == 4 + add_eos  # C|annot| Find| Answer, then EOS
    for prompt, na_prob in zip(prompt_tokens(questions, 1024 - 8)[0], na_probs):
        # The plain forward pass over prompt + abstention, no cache, no padding: position i predicts token i + 1.
        log_probs = model(torch.tensor([prompt + abstention]))[0].log_softmax(dim=-1)
        expected = sum(log_probs[len(prompt) - 1 + i, token].item() for i, token in enumerate(abstention))
        assert math.log(na_prob) == pytest.approx(expected, rel=1e-5)


def test_forbidden_first_token_answer_never_starts_with_the_abstention():
    model = tiny_model()
    with torch.no_grad():  # make "C" every prompt's greedy first token, by a clear margin
        model.transformer.ln_f.bias.add_(100 * model.transformer.wte.weight[C])
    prompts, _ = prompt_tokens(DEV[:6], 1024 - 4)
    assert all(tokens[0] == C for tokens in generate(model, prompts, 4))
    forbidden = generate(model, prompts, 4, forbid_first=[[C, EOS_ID]] * len(prompts))
    for prompt, tokens in zip(prompts, forbidden):
        logits = model(torch.tensor([prompt]))[0, -1]
        logits[[C, EOS_ID]] = float("-inf")
        assert tokens[0] == logits.argmax().item() != C  # the runner-up, from the batched path
        assert tokens[1] == C  # only the first step is constrained
    texts = answer(model, DEV[:6], batch_size=4, max_new_tokens=4, progress=False, forbid_abstention=True)
    assert texts == answer(model, DEV[:6], batch_size=1, max_new_tokens=4, progress=False, forbid_abstention=True)


def test_threshold_abstains_above_it_and_answers_below_it():
    model, questions = tiny_model(), DEV[:5]
    na_probs = [0.9, 0.1, 0.5, 0.51, 0.0]
    answers = answer_with_threshold(model, questions, na_probs, 0.5, batch_size=2, max_new_tokens=4, progress=False)
    best = answer(model, questions, batch_size=2, max_new_tokens=4, progress=False, forbid_abstention=True)
    assert answers == [NO_ANSWER, best[1], best[2], NO_ANSWER, best[4]]


def test_question_words_and_answer_lengths():
    assert question_word("In what year did it end?") == "what"
    assert question_word("Whose army won?") == "who" and question_word("How many were there?") == "how"
    assert question_word("Name the river.") == "other" and question_word("Somewhere else?") == "other"
    assert answer_length([]) == "no answer"
    assert answer_length(["the Denver Broncos", "Broncos"]) == "1 word"  # the shortest gold, in F1's tokens
    assert answer_length(["one two three four"]) == "4-5 words" and answer_length(["w " * 12]) == "11+ words"


def test_report_counts_add_up_and_its_scores_are_the_official_ones(tmp_path):
    # Right answers for every third question, abstentions for every third, a wrong answer for the rest.
    predictions = {ex.id: [ex.answers[0] if ex.answers else "", "", "Paris"][i % 3] for i, ex in enumerate(DEV)}
    (tmp_path / "p.json").write_text(json.dumps(predictions))
    report = tmp_path / "report.md"
    evaluate.main(["--predictions", str(tmp_path / "p.json"), "--eval-file", str(DEV_FILE), "--out",
                   str(tmp_path / "m.json"), "--report", str(report)])
    metrics = json.loads((tmp_path / "m.json").read_text())
    tables = metrics["breakdown"]
    t = tables["abstention"]
    assert t["answerable"]["answered"] + t["answerable"]["abstained"] == metrics["HasAns_total"] == 5928
    assert t["unanswerable"]["answered"] + t["unanswerable"]["abstained"] == metrics["NoAns_total"] == 5945
    assert t["unanswerable"]["answered"] == sum(not ex.answers and predictions[ex.id] != "" for ex in DEV)
    for key in ("by_question_word", "by_answer_length"):
        groups = tables[key].values()
        assert sum(g["count"] for g in groups) == 11873
        # Each group's mean weighted by its size is the overall score: every question counted once, rightly.
        assert sum(g["count"] * g["f1"] for g in groups) / 11873 == pytest.approx(metrics["f1"])
        assert sum(g["count"] * g["exact"] for g in groups) / 11873 == pytest.approx(metrics["exact"])
    assert tables["by_answer_length"]["no answer"]["count"] == 5945
    worst = tables["worst"]
    assert [len(found) for found in worst.values()] == [5, 5, 5]
    assert all(row["f1"] < 100 and row["gold"] and row["prediction"] for row in worst["wrong answer"])
    assert all(row["gold"] and not row["prediction"] for row in worst["missed answer"])
    assert all(not row["gold"] and row["prediction"] for row in worst["made-up answer"])
    text = report.read_text()
    assert f"| answerable | {t['answerable']['answered']} | {t['answerable']['abstained']} |" in text
    assert f"| f1 | {metrics['f1']:.2f} |" in text and "### made-up answer" in text


def test_plots_are_written_and_need_only_matplotlib(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    log = [{"step": 10, "loss": 3.0}, {"step": 10, "eval_loss": 2.9, "exact": 10.0, "f1": 12.0, "NoAns_f1": 20.0,
                                       "abstained": 0.4}, {"step": 20, "loss": 2.5}, {"step": 20, "eval_loss": 2.6}]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    plot.main([str(run)])
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    metrics = {"breakdown": {"questions": 3, "abstention": {"answerable": {"answered": 1, "abstained": 1},
                                                           "unanswerable": {"answered": 0, "abstained": 1}},
                             "by_question_word": {"what": {"count": 3, "exact": 50.0, "f1": 60.0}},
                             "by_answer_length": {"1 word": {"count": 3, "exact": 50.0, "f1": 60.0}}}}
    (run / "metrics.json").write_text(json.dumps(metrics))
    plot.main([str(run / "metrics.json")])
    assert (run / "metrics.breakdown.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(UserError, match="pip install matplotlib"):
        plot.main([str(run), "--overwrite"])


def test_na_threshold_is_a_probability_used_while_answering():
    for wrong in (["--checkpoint", "run", "--na-threshold", "1.5"],
                  ["--predictions", "p.json", "--na-threshold", "0.5"]):
        with pytest.raises(SystemExit):
            evaluate.parse_args(wrong)


def test_split_halves_share_no_article_and_keep_every_question(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "split_squad.py"), str(DEV_FILE),
                           str(tmp_path / "a.json"), str(tmp_path / "b.json")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    a, b = load_squad_file(tmp_path / "a.json"), load_squad_file(tmp_path / "b.json")
    assert sorted(ex.id for ex in a + b) == sorted(ex.id for ex in DEV)
    assert not {ex.context for ex in a} & {ex.context for ex in b}
    assert abs(len(a) - len(b)) < 100


def test_forbidding_the_abstentions_first_token_rules_out_few_gold_answers():
    """What finetune/answer.py's docstring says it costs: 29 of the dev set's 5,928 first gold answers."""
    starts = [answer_tokens(ex.answers[0], add_eos=False)[0] for ex in DEV if ex.answers]
    assert (starts.count(C), len(starts)) == (29, 5928)
