"""The GPU check's table (scripts/gpu_check.sh): every step's exit code and time, its figures, and ours against
the Hugging Face + PEFT anchor measured in the same run.

    python scripts/gpu_summary.py LOG_DIR GPU_NAME
"""
import json
import sys
from pathlib import Path


def json_lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def last(log: Path, name: str, what: str | None = None) -> dict:
    found = [r for r in json_lines(log / f"{name}.log") if what is None or r.get("what") == what]
    return found[-1] if found else {}


def ratio(ours: dict, anchor: dict, key: str) -> str:
    return f"{ours[key] / anchor[key]:.2f}x" if ours.get(key) and anchor.get(key) else "-"


def median_speed(run: Path) -> float | None:
    speeds = sorted(r["tokens_per_s"] for r in json_lines(run / "log.jsonl") if "tokens_per_s" in r)
    return round(speeds[len(speeds) // 2]) if speeds else None


def main(log: Path, gpu: str) -> None:
    anchor, anchor_answers = last(log, "anchor", "hf_peft_train"), last(log, "anchor", "hf_generate")
    anchor_medium = last(log, "anchor-medium", "hf_peft_train")
    ours, compiled, medium, dev = (last(log, name) for name in ("ours", "ours-compiled", "ours-medium", "dev-answers"))
    steps = json_lines(log / "steps.jsonl")
    print(f"\n== GPU check on {gpu}")
    for s in steps:
        print(f"  {s['step']:<14} exit {s['exit']:<3} {s['seconds']:>4} s")
    rows = [
        ("training tokens/s, gpt2, batch 16 x 512, r=4", ours.get("tokens_per_s"), compiled.get("tokens_per_s"),
         anchor.get("tokens_per_s"), f"{ratio(ours, anchor, 'tokens_per_s')} / {ratio(compiled, anchor, 'tokens_per_s')}"),
        ("peak training memory GB, same", ours.get("peak_GB"), compiled.get("peak_GB"), anchor.get("peak_GB"),
         f"{ratio(ours, anchor, 'peak_GB')} / {ratio(compiled, anchor, 'peak_GB')}"),
        ("MFU, same", ours.get("mfu"), compiled.get("mfu"), None, ""),
        ("training tokens/s, gpt2-medium, same", medium.get("tokens_per_s"), None, anchor_medium.get("tokens_per_s"),
         ratio(medium, anchor_medium, "tokens_per_s")),
        ("peak training memory GB, gpt2-medium", medium.get("peak_GB"), None, anchor_medium.get("peak_GB"),
         ratio(medium, anchor_medium, "peak_GB")),
        ("answers/s, batch 64, 32 new tokens", ours.get("answers_per_s"), None, anchor_answers.get("answers_per_s"),
         ratio(ours, anchor_answers, "answers_per_s")),
        ("11,873 dev questions answered, seconds", dev.get("answer_seconds"), None, None, ""),
        ("dev questions, answers/s (batch 256, <= 32 tokens)", dev.get("answers_per_s"), None, None, ""),
    ]
    show = lambda v: "-" if v is None else str(v)
    print(f"\n  {'what':<50} {'ours eager':>11} {'compiled':>9} {'HF+PEFT':>9}  ours / HF+PEFT (eager / compiled)")
    for what, eager, comp, hf, r in rows:
        print(f"  {what:<50} {show(eager):>11} {show(comp):>9} {show(hf):>9}  {r}")
    recipe = next((s for s in steps if s["step"] == "seed-recipe"), None)
    if recipe:
        seed = json_lines(log / "seed-run" / "log.jsonl")
        evals = [round(r["eval_loss"], 3) for r in seed if "eval_loss" in r]
        print(f"\n  seed recipe end to end: {recipe['seconds']} s wall (exit {recipe['exit']}), "
              f"{max((r['step'] for r in seed), default=0)} steps of 50 sequences (1 micro-batch of 50), "
              f"median {median_speed(log / 'seed-run')} tokens/s, eval losses {evals}")
        print(f"  the same steps as 5 x 10 micro-batches (the seed's split): median "
              f"{median_speed(log / 'seed-5x10')} tokens/s")
    xl = {mode: last(log, f"xl-{mode}") for mode in ("bf16", "nf4", "int8")}
    if xl["bf16"]:
        print("\n  gpt2-xl shapes, compiled, batch 4 x 512: base  tokens/s  peak GB  (vs bf16)")
        for mode, r in xl.items():
            if r:
                print(f"    {mode:<5} {r['tokens_per_s']:>9} {str(r['peak_GB']):>8}  ({ratio(r, xl['bf16'], 'tokens_per_s')} "
                      f"speed, {ratio(r, xl['bf16'], 'peak_GB')} memory)")
    metrics = log / "seed-run" / "metrics.json"
    if metrics.exists():
        m = json.loads(metrics.read_text())
        print(f"  evaluate.py on it: {m['total']} questions, exact {m['exact']:.2f}, f1 {m['f1']:.2f} (random weights)")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
