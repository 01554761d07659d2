"""What a resumed run says about what changed: its learning-rate schedule, and evaluations of an older adapter;
and the end-of-run hint that fits the device."""
from pathlib import Path

from finetune.report import run_summary
from finetune.run import Run
from finetune.resume import schedule_change, stale_metrics

SMOKE = {"lr": 1e-2, "warmup_steps": 2, "max_steps": 20, "epochs": None}


def test_a_stretched_schedule_names_the_old_and_new_learning_rate_at_the_resume_step():
    note = schedule_change(SMOKE, {**SMOKE, "max_steps": 40}, 742, 20, 40)
    # the smoke run had decayed to 0 at step 20; stretched to 40 steps, step 20 is at 1e-2 * 20 / 38
    assert note == ("note: the learning-rate schedule changed: at step 20 it was 0 (decaying to 0 at step 20) and is "
                    "now 0.0053 (decaying to 0 at step 40)")
    assert schedule_change(SMOKE, {**SMOKE, "eval_every": 5}, 742, 10, 20) is None  # same schedule: no word
    assert "it was 0.0056" in schedule_change(SMOKE, {**SMOKE, "lr": 1e-3}, 742, 10, 20)
    by_epochs = schedule_change({**SMOKE, "epochs": 0.5}, SMOKE, 40, 10, 20)  # 0.5 x 40 = the same 20 steps
    assert by_epochs is None


def test_evaluations_already_in_the_run_are_named_as_older(tmp_path):
    assert stale_metrics(tmp_path, 20) is None
    for name in ("metrics.dev.first50.json", "metrics.dev.first50.predictions.json", "metrics.dev.first50.na_prob.json",
                 "config.json"):
        (tmp_path / name).write_text("{}")
    assert stale_metrics(tmp_path, 20) == ("note: metrics.dev.first50.json scored the adapter of step 20 or earlier; "
                                           "evaluate again after this run (evaluate.py --overwrite replaces them)")


def test_the_end_of_run_hint_scores_a_few_questions_on_a_cpu(tmp_path):
    on_cpu = run_summary(Run(tmp_path), (0, 20), 10.0, 1000, on_cpu=True).splitlines()[-1]
    assert on_cpu.startswith(f"score it   python evaluate.py --checkpoint {tmp_path} --limit 50 --max-new-tokens 8")
    assert run_summary(Run(tmp_path), (0, 20), 10.0, 1000).splitlines()[-1] == \
        f"score it   python evaluate.py --checkpoint {tmp_path}"
