"""bench.py runs on a CPU and ends with one JSON line (speed itself is never asserted in tests)."""
import json

import bench
from conftest import DEV_FILE


def test_bench_runs_on_cpu_and_prints_json_last(capsys):
    bench.main(["--model", "gpt2-tiny", "--device", "cpu", "--batch-size", "2", "--seq-len", "64", "--answers", "4",
                "--max-new-tokens", "4"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["tokens_per_s"] > 0 and result["answers_per_s"] > 0 and result["answers"] == 4
    assert result["seq_len"] == 64 and result["padding"] == 0.0


def test_bench_on_real_squad_sequences(capsys):
    bench.main(["--model", "gpt2-tiny", "--device", "cpu", "--data", str(DEV_FILE), "--batch-size", "2",
                "--grad-accum", "2", "--answers", "3", "--max-new-tokens", "4"])
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["data"] == "squad" and result["answers"] == 3 and 0 <= result["padding"] < 1
