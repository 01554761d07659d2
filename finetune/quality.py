"""Answer quality during training: EM and F1 on a fixed set of eval questions, and the best adapter so far.

A falling loss does not say whether the model answers the answerable questions and abstains on the others. So at
each evaluation train.py (--eval-answers N) answers the same N eval questions, scores them as SQuAD 2.0 does, and
keeps the adapter of the best F1 in `best/`:

    best/checkpoint.pt   the adapter (lora checkpoint format: evaluate.py --checkpoint RUN/best), its step and metrics
    best/metrics.json    the same step and metrics, to read
"""
import json

import numpy as np
import torch

from data.metrics import squad_v2_scores
from data.squad import SquadExample
from tensorio import atomic_write

from .answer import answer, official_answer
from .precision import autocast
from .run import BEST_METRICS, CHECKPOINT, Base, Run, save_checkpoint
from .settings import Settings

MAX_NEW_TOKENS = 128  # evaluate.py's default: the same answers it would give


def fixed_subset(examples: list[SquadExample], n: int | None) -> list[SquadExample]:
    """The same n random questions at every call (in file order); all of them for None. The permutation is that of
    --eval-examples, so the answered questions and the eval-loss questions overlap as much as they can."""
    if n is None:
        return examples
    keep = np.sort(np.random.default_rng(0).permutation(len(examples))[:n])
    return [examples[i] for i in keep]


@torch.no_grad()
def answer_quality(model: torch.nn.Module, examples: list[SquadExample], batch_size: int, device: torch.device,
                   dtype: torch.dtype) -> dict[str, float]:
    """Greedy answers of the model being trained (adapter not merged) to `examples`: the official exact and f1,
    HasAns_f1 and NoAns_f1 where such questions are among them, and the fraction of questions abstained on."""
    # Under autocast, as training runs, with its cache of casted weights off, as PyTorch asks of code that records
    # CUDA graphs (generate() records its decoding step as one).
    with autocast(device, dtype, cache_enabled=False):
        texts = answer(model, examples, batch_size, MAX_NEW_TOKENS, progress=False)
    predictions = {ex.id: official_answer(text) for ex, text in zip(examples, texts)}
    scores = squad_v2_scores({ex.id: ex.answers for ex in examples}, predictions)
    quality = {k: scores[k] for k in ("exact", "f1", "HasAns_f1", "NoAns_f1") if k in scores}
    quality["abstained"] = sum(not p for p in predictions.values()) / len(predictions)
    return quality


def describe(quality: dict[str, float]) -> str:
    """One line for the progress bar: "EM 41.0, F1 45.2 (answerable 30.1, unanswerable 60.0), abstained 52%"."""
    groups = [f"{name} {quality[key]:.1f}" for name, key in (("answerable", "HasAns_f1"), ("unanswerable", "NoAns_f1"))
              if key in quality]
    return (f"EM {quality['exact']:.1f}, F1 {quality['f1']:.1f} ({', '.join(groups)}), "
            f"abstained {100 * quality['abstained']:.0f}%")


def save_best(run: Run, model: torch.nn.Module, settings: Settings, base: Base, step: int,
              quality: dict[str, float]) -> None:
    """Write `best/`: the adapter with its step and metrics, then metrics.json. Each file is written atomically, and
    the checkpoint carries its own metrics, so a crash between the two leaves nothing that disagrees with it."""
    save_checkpoint(run.best / CHECKPOINT, model, settings, base, step, quality=quality)
    with atomic_write(run.best / BEST_METRICS, "w") as f:
        json.dump({"step": step, **quality}, f, indent=2, allow_nan=False)
