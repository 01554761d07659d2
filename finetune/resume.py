"""What a resumed run tells its user about what changed since its checkpoint."""
from pathlib import Path

from .step import learning_rate


def schedule_change(recorded: dict, now: dict, steps_per_epoch: int, step: int, max_steps: int) -> str | None:
    """A note when flags given to --resume (--max-steps, --epochs, --lr, --warmup-steps) change the learning rate
    at the resume step: the linear decay is stretched or squeezed to end at the new last step, so the run goes on
    at another learning rate than the one it stopped at. `recorded` and `now` are the run's arguments then and
    now."""
    recorded_steps = (round(recorded["epochs"] * steps_per_epoch) if recorded.get("epochs") is not None
                      else recorded["max_steps"])
    before = learning_rate(step, recorded["lr"], recorded["warmup_steps"], recorded_steps)
    after = learning_rate(step, now["lr"], now["warmup_steps"], max_steps)
    if f"{before:.2g}" == f"{after:.2g}":
        return None
    return (f"note: the learning-rate schedule changed: at step {step} it was {before:.2g} (decaying to 0 at step "
            f"{recorded_steps}) and is now {after:.2g} (decaying to 0 at step {max_steps})")


def stale_metrics(out: Path, step: int) -> str | None:
    """A note naming the evaluations already in the run directory: they scored the adapter of step `step` or
    earlier, not the one this run will save."""
    names = sorted(path.name for path in out.glob("metrics*.json")
                   if not path.name.endswith((".predictions.json", ".na_prob.json")))
    if not names:
        return None
    return (f"note: {', '.join(names)} scored the adapter of step {step} or earlier; evaluate again after this run "
            f"(evaluate.py --overwrite replaces them)")
