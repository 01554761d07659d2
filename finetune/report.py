"""What a training run tells its user: the settings at the start, a warning about a schedule that cannot reach its
learning rate, and a summary at the end, read back from log.jsonl so that a resumed run's earlier steps count."""
import json

from .run import Run
from .step import learning_rate

CPU_EVAL_LIMIT = 50  # questions the end-of-run hint scores on a CPU, as the README's smoke run does


def warmup_warning(warmup_steps: int, max_steps: int, lr: float) -> str | None:
    """A warning when the warmup is as long as the run: the learning rate would only climb, never reaching --lr,
    and a short run would barely move from where it started."""
    if not 0 < max_steps <= warmup_steps:
        return None
    last = learning_rate(max_steps - 1, lr, warmup_steps, max_steps)
    return (f"warning: --warmup-steps {warmup_steps} is not shorter than the run ({max_steps} steps): the learning "
            f"rate only climbs, to {last:.2g} at the last step instead of --lr {lr:g}. Lower --warmup-steps (for "
            f"example to {max_steps // 10}).")


def settings_table(s: dict) -> str:
    """The run's settings in a few lines, to read at a glance; config.json holds every one of them."""
    per_step = s["micro_batch_size"] * s["grad_accum"] * s["world_size"]
    processes = f" x {s['world_size']} processes" if s["world_size"] > 1 else ""
    epochs = f", {s['max_steps'] / s['steps_per_epoch']:.2f} epochs" if s["steps_per_epoch"] else ""
    variants = ["DoRA"] if s["dora"] else []
    if s["lora_init"] != "default":
        variants.append(f"{s['lora_init']} init")
    if s["loraplus_ratio"]:
        variants.append(f"LoRA+ ratio {s['loraplus_ratio']:g}")
    quantized = f", base quantized {s['quantize']}" if s["quantize"] != "none" else ""
    rows = [
        ("model", f"{s['model']} ({s['init']} weights), {s['precision']} on {s['device']}{processes}{quantized}"),
        ("LoRA", f"r={s['rank']}, alpha={s['alpha']:g}, dropout {s['lora_dropout']:g} on {' '.join(s['targets'])}"
                 f"{' (' + s['qkv'] + ' of c_attn)' if s['qkv'] else ''}{''.join(', ' + v for v in variants)}; "
                 f"{s['parameters']}"),
        ("data", f"{s['train_sequences']:,} training sequences ({s['skipped_too_long']:,} too long to keep), "
                 f"{s['eval_sequences']:,} for the eval loss"),
        ("steps", f"{s['max_steps']:,} of {per_step} sequences ({s['micro_batch_size']} x {s['grad_accum']} "
                  f"accumulated{processes}){epochs}"),
        ("optimizer", f"AdamW, lr {s['lr']:g} after {s['warmup_steps']} warmup steps, then linear decay to 0; "
                      f"weight decay {s['weight_decay']:g}, clipping {s['clip']:g}"),
        ("eval loss", f"every {s['eval_every']} steps" + (f", with answers to {s['eval_answers']:,} questions"
                                                          if s["eval_answers"] else "")
                      + f"; a checkpoint every {s['save_every']} steps"),
        ("out", f"{s['out']} (every setting in config.json)"),
    ]
    return "\n".join(f"{name:<10} {value}" for name, value in rows)


def run_summary(run: Run, steps: tuple[int, int], seconds: float, tokens: int, on_cpu: bool = False) -> str:
    """What the run did, read back from log.jsonl (a resumed run's earlier steps included), and what to do next: on
    a CPU, an evaluation of a few questions (answering all 11,873 takes hours there)."""
    # log.jsonl is absent when a run stops before its first log line
    records = [json.loads(line) for line in run.log.read_text().splitlines()] if run.log.is_file() else []
    losses = [r["loss"] for r in records if "loss" in r]
    evals = [(r["eval_loss"], r["step"]) for r in records if "eval_loss" in r]
    lines = [f"steps      {steps[0]} -> {steps[1]} in {seconds:.0f} s, {tokens / seconds:,.0f} tokens/s"]
    if losses:
        lines.append(f"train loss {losses[0]:.4f} (first logged) -> {losses[-1]:.4f} (last)")
    if evals:
        (last, last_step), (best, best_step) = evals[-1], min(evals)
        lines.append(f"eval loss  {last:.4f} at step {last_step} (last), {best:.4f} at step {best_step} (best)")
    else:
        lines.append("eval loss  not measured: the run ended before its first --eval-every")
    f1s = [(r["f1"], r["step"]) for r in records if "f1" in r]
    if f1s:
        (last, last_step), (best, best_step) = f1s[-1], max(f1s)
        lines.append(f"eval F1    {last:.1f} at step {last_step} (last), {best:.1f} at step {best_step} (best: its "
                     f"adapter is {run.best})")
    score = f"python evaluate.py --checkpoint {run.dir}"
    if on_cpu:
        score += f" --limit {CPU_EVAL_LIMIT} --max-new-tokens 8   (a first look; without --limit, every question)"
    lines += [f"files      {run.config} (settings), {run.log} (losses), "
              f"{run.checkpoint} (adapter and training state), {run.adapter} (the adapter for PEFT)",
              f"score it   {score}"]
    return "\n".join(lines)
