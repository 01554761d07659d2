"""bench.py runs on a CPU and prints each phase's JSON line as it is measured (speed itself is never asserted)."""
import json

import pytest

import bench
from conftest import DEV_FILE

TINY = ["--model", "gpt2-tiny", "--device", "cpu", "--max-new-tokens", "4"]


def phases(out: str) -> dict[str, dict]:
    return {r["phase"]: r for r in map(json.loads, (line for line in out.splitlines() if line.startswith("{")))}


def test_bench_runs_on_cpu_and_prints_a_json_line_per_phase(capsys):
    bench.main([*TINY, "--batch-size", "2", "--seq-len", "64", "--answers", "4", "--profile"])
    result = phases(capsys.readouterr().out)
    assert list(result) == ["training", "profile", "answering"]
    training, profile, answering = result.values()
    assert training["tokens_per_s"] > 0 and training["seq_len"] == 64 and training["padding"] == 0.0
    assert answering["answers_per_s"] > 0 and answering["answers"] == 4
    assert 0 < sum(profile["top_self_time"].values()) <= 1 and "aten::mm" in profile["top_self_time"]


def test_bench_on_real_squad_sequences_and_their_padding(capsys):
    bench.main([*TINY, "--data", str(DEV_FILE), "--batch-size", "2", "--grad-accum", "2", "--answers", "3",
                "--count-padding", "20"])
    result = phases(capsys.readouterr().out)
    assert result["training"]["data"] == "squad" and result["answering"]["answers"] == 3
    assert 0 <= result["training"]["padding"] < 1
    bench.main([*TINY, "--data", str(DEV_FILE), "--batch-size", "4", "--answers", "0", "--count-padding", "20",
                "--micro-batch-split", "2"])
    split = phases(capsys.readouterr().out)["padding"]
    whole = result["padding"]  # the same 20 steps of 4 sequences, as 2 x 2 length-sorted micro-batches
    assert split["real_tokens"] == whole["real_tokens"] and split["padded_tokens"] <= whole["padded_tokens"]


def test_a_failing_phase_keeps_the_others_figures(capsys, monkeypatch):
    def out_of_memory(*args):
        raise RuntimeError("CUDA out of memory (a stand-in)")
    monkeypatch.setattr(bench, "bench_training", out_of_memory)
    with pytest.raises(SystemExit, match="training, profile phase"):
        bench.main([*TINY, "--batch-size", "2", "--seq-len", "32", "--answers", "2", "--profile"])
    result = phases(capsys.readouterr().out)
    assert result["training"]["error"] == "RuntimeError: CUDA out of memory (a stand-in)"
    assert "training phase failed" in result["profile"]["error"]
    assert result["answering"]["answers_per_s"] > 0


@pytest.mark.parametrize("argv, cause", [
    (["--batch-size", "0"], "--batch-size: 0 is below 1"),
    (["--steps", "nan"], "not an integer"),
    (["--seq-len", "2048"], "cannot exceed"),
    (["--max-new-tokens", "900"], "give at most 774"),
    (["--data", "no-such.json"], "no file at --data"),
    (["--data", str(DEV_FILE), "--seq-len", "64"], "drop one"),
    (["--micro-batch-split", "2"], "needs --data"),
])
def test_bench_refuses_bad_flags_before_any_work(argv, cause, capsys):
    with pytest.raises(SystemExit) as exit:
        bench.parse_args(argv)
    assert exit.value.code == 2 and cause in capsys.readouterr().err
