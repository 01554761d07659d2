"""The GPU check's table (scripts/gpu_check.sh): every step's status, its figures, and ours against the
Hugging Face + PEFT anchor measured in the same run. The check rewrites it after every step, so it must read
whatever is there: a step not run yet, failed or cut off shows as such, and its figures as "-".

    python scripts/gpu_summary.py LOG_DIR GPU_NAME
"""
import json
import sys
from pathlib import Path


def json_lines(path: Path) -> list[dict]:
    """The JSON lines of a log; a line cut off mid-write (the step was killed) is left out."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return records


def anchor(log: Path, name: str, what: str) -> dict:
    """The anchor script's last line of one kind ("what": hf_peft_train, hf_generate)."""
    found = [r for r in json_lines(log / f"{name}.log") if r.get("what") == what]
    return found[-1] if found else {}


def ours(log: Path, name: str) -> dict:
    """bench.py's figures in a step's log: its phases' JSON lines (training, profile, padding, answering) merged;
    a failed phase's line holds only its error."""
    merged = {}
    for r in json_lines(log / f"{name}.log"):
        if "phase" in r and "error" not in r:
            merged |= r
    return merged


def ratio(value: dict, reference: dict, key: str) -> str:
    return f"{value[key] / reference[key]:.2f}x" if value.get(key) and reference.get(key) else "-"


def median_speed(run: Path) -> float | None:
    speeds = sorted(r["tokens_per_s"] for r in json_lines(run / "log.jsonl") if "tokens_per_s" in r)
    return round(speeds[len(speeds) // 2]) if speeds else None


def main(log: Path, gpu: str) -> None:
    hf, hf_answers = anchor(log, "anchor", "hf_peft_train"), anchor(log, "anchor", "hf_generate")
    hf_medium = anchor(log, "anchor-medium", "hf_peft_train")
    eager, compiled, medium, dev = (ours(log, name) for name in ("ours", "ours-compiled", "ours-medium",
                                                                  "dev-answers"))
    steps = json_lines(log / "steps.jsonl")
    print(f"\n== GPU check on {gpu}")
    for s in steps:
        print(f"  {s['step']:<14} {s['status']:<9} {s['seconds']:>4} s  {s['why']}")
    rows = [
        ("training tokens/s, gpt2, batch 16 x 512, r=4", eager.get("tokens_per_s"), compiled.get("tokens_per_s"),
         hf.get("tokens_per_s"), f"{ratio(eager, hf, 'tokens_per_s')} / {ratio(compiled, hf, 'tokens_per_s')}"),
        ("peak training memory GB, same", eager.get("peak_GB"), compiled.get("peak_GB"), hf.get("peak_GB"),
         f"{ratio(eager, hf, 'peak_GB')} / {ratio(compiled, hf, 'peak_GB')}"),
        ("MFU, same", eager.get("mfu"), compiled.get("mfu"), None, ""),
        ("graphs compiled (1: no recompilation)", None, compiled.get("compiled_graphs"), None, ""),
        ("training tokens/s, gpt2-medium, same", medium.get("tokens_per_s"), None, hf_medium.get("tokens_per_s"),
         ratio(medium, hf_medium, "tokens_per_s")),
        ("peak training memory GB, gpt2-medium", medium.get("peak_GB"), None, hf_medium.get("peak_GB"),
         ratio(medium, hf_medium, "peak_GB")),
        ("answers/s, batch 64, 32 new tokens", eager.get("answers_per_s"), None, hf_answers.get("answers_per_s"),
         ratio(eager, hf_answers, "answers_per_s")),
        ("11,873 dev questions answered, seconds", dev.get("answer_seconds"), None, None, ""),
        ("dev questions, answers/s (batch 256, <= 32 tokens)", dev.get("answers_per_s"), None, None, ""),
    ]
    show = lambda v: "-" if v is None else str(v)
    print(f"\n  {'what':<50} {'ours eager':>11} {'compiled':>9} {'HF+PEFT':>9}  ours / HF+PEFT (eager / compiled)")
    for what, value, comp, reference, r in rows:
        print(f"  {what:<50} {show(value):>11} {show(comp):>9} {show(reference):>9}  {r}")
    if eager.get("top_self_time"):
        shares = ", ".join(f"{name} {share:.0%}" for name, share in list(eager["top_self_time"].items())[:6])
        print(f"\n  where an eager step's time goes ({eager['clock']} self time): {shares}")
    recipe = next((s for s in steps if s["step"] == "seed-recipe"), None)
    if recipe and recipe["status"] != "skipped":
        seed = json_lines(log / "seed-run" / "log.jsonl")
        evals = [round(r["eval_loss"], 3) for r in seed if "eval_loss" in r]
        padding = [r["padding"] for r in seed if "padding" in r]
        print(f"\n  seed recipe end to end: {recipe['seconds']} s wall ({recipe['status']}), "
              f"{max((r['step'] for r in seed), default=0)} steps of 50 sequences (cut in 2 where padding is least), "
              f"median {median_speed(log / 'seed-run')} tokens/s, padding "
              f"{sum(padding) / len(padding) if padding else 0:.0%}, eval losses {evals}")
        print(f"  the same steps uncut (1 micro-batch of 50): median {median_speed(log / 'seed-unsplit')} tokens/s")
    mixed = ours(log, "mixed-adapters").get("mixed_adapters", [])
    if mixed:
        print("\n  serve.py's batching, answers/s (batch 64, 32 new tokens): N adapters mixed in one batch / one at a time")
        for r in mixed:
            print(f"    N={r['adapters']:<3} {r['mixed_answers_per_s']:>9} / {r['one_adapter_at_a_time_answers_per_s']:<9} "
                  f"same answers: {r['same_answers']}")
    xl = {mode: ours(log, f"xl-{mode}") for mode in ("bf16", "nf4")}
    if xl["bf16"] or xl["nf4"]:
        print("\n  gpt2-xl shapes, eager, batch 4 x 512: base  tokens/s  peak GB  (vs bf16)")
        for mode, r in xl.items():
            if r:
                print(f"    {mode:<5} {r['tokens_per_s']:>9} {show(r['peak_GB']):>8}  "
                      f"({ratio(r, xl['bf16'], 'tokens_per_s')} speed, {ratio(r, xl['bf16'], 'peak_GB')} memory)")
    metrics = log / "seed-run" / "metrics.json"
    if metrics.exists():
        m = json.loads(metrics.read_text())
        print(f"  evaluate.py on it: {m['total']} questions, exact {m['exact']:.2f}, f1 {m['f1']:.2f} (random weights)")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
