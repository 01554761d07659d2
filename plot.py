"""Pictures of a run and of an evaluation, as PNG files (needs matplotlib: pip install matplotlib).

    python plot.py runs/gpt2-lora                  # runs/gpt2-lora/curves.png: train loss, eval loss, eval F1
    python plot.py runs/gpt2-lora/metrics.dev.json   # runs/gpt2-lora/metrics.dev.breakdown.png: evaluate.py's breakdown

The curves come from the run's log.jsonl (eval F1 when it was trained with --eval-answers); the breakdown from the
metrics JSON that evaluate.py writes: answered or abstained, and F1 by question word and by gold answer length.
"""
from finetune.signals import install_error_handling

install_error_handling()  # first: a UserError prints one line, and Ctrl-C during the slow imports below too
import argparse
import json
from pathlib import Path

from finetune.outputs import PICTURE, Output, check_outputs
from gpt2 import UserError
from tensorio import atomic_write


def pyplot():
    """matplotlib's pyplot, drawing to files only (no display needed), or a UserError saying how to install it."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("plotting needs matplotlib, an optional extra: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def read_log(run: Path) -> list[dict]:
    try:
        return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {run / 'log.jsonl'} ({e}): give a train.py --out directory") from None


def plot_curves(run: Path, out: Path) -> None:
    """Left: train loss and eval loss against step. Right: eval EM and F1 (overall, answerable, unanswerable)."""
    log = read_log(run)
    train = [(r["step"], r["loss"]) for r in log if "loss" in r]
    evals = [r for r in log if "eval_loss" in r]
    scored = [r for r in evals if "f1" in r]
    plt = pyplot()
    fig, (losses, quality) = plt.subplots(1, 2, figsize=(12, 4.5))
    if train:
        losses.plot(*zip(*train), label="train loss")
    if evals:
        losses.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", label="eval loss")
    losses.set(xlabel="step", ylabel="loss per token", title="loss")
    losses.legend()
    for key, label in (("f1", "F1"), ("exact", "EM"), ("HasAns_f1", "F1 answerable"), ("NoAns_f1", "F1 unanswerable")):
        points = [(r["step"], r[key]) for r in scored if key in r]
        if points:
            quality.plot(*zip(*points), "o-" if key == "f1" else ".--", label=label)
    quality.set(xlabel="step", ylabel="%", ylim=(0, 100), title="answers (--eval-answers)" if scored else
                "no answers scored: train with --eval-answers N")
    if scored:
        quality.legend()
    fig.suptitle(str(run))
    save(fig, out)


def plot_breakdown(metrics_file: Path, out: Path) -> None:
    """The 2x2 abstention table as a heat map, and F1 by question word and by gold answer length as bars."""
    try:
        tables = json.loads(metrics_file.read_text())["breakdown"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"no breakdown in {metrics_file} ({type(e).__name__}: {e}): give a metrics JSON written by "
                        f"evaluate.py") from None
    plt = pyplot()
    fig, (table, words, lengths) = plt.subplots(1, 3, figsize=(16, 4.5), width_ratios=(1, 1.6, 1.6))
    rows, columns = ("answerable", "unanswerable"), ("answered", "abstained")
    counts = [[tables["abstention"][r][c] for c in columns] for r in rows]
    table.imshow(counts, cmap="Blues")
    for i, row in enumerate(counts):
        for j, n in enumerate(row):
            dark = n > max(map(max, counts)) / 2
            table.text(j, i, str(n), ha="center", va="center", fontsize=14, color="white" if dark else "black")
    table.set(xticks=range(2), xticklabels=columns, yticks=range(2), yticklabels=rows,
              title=f"{tables['questions']} questions")
    for axis, key, title in ((words, "by_question_word", "F1 by question word"),
                             (lengths, "by_answer_length", "F1 by gold answer length")):
        groups = tables[key]
        bars = axis.bar(list(groups), [g["f1"] for g in groups.values()])
        axis.bar_label(bars, labels=[f"n={g['count']}" for g in groups.values()], fontsize=8)
        axis.set(ylabel="F1 (%)", ylim=(0, 105), title=title)
        axis.tick_params(axis="x", labelrotation=30)
    fig.suptitle(str(metrics_file))
    save(fig, out)


def save(fig, out: Path) -> None:
    fig.tight_layout()
    with atomic_write(out) as f:
        fig.savefig(f, format="png", dpi=120)
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", type=Path, help="a train.py --out directory, or a metrics JSON written by evaluate.py")
    p.add_argument("--out", type=Path, help="the PNG (default: curves.png in the run, or <metrics>.breakdown.png)")
    p.add_argument("--overwrite", action="store_true", help="replace a PNG already there")
    args = p.parse_args(argv)
    if args.path.is_dir():
        out, plot, read = args.out or args.path / "curves.png", plot_curves, args.path / "log.jsonl"
    elif args.path.is_file():
        out, plot, read = args.out or args.path.with_suffix(".breakdown.png"), plot_breakdown, args.path
    else:
        raise UserError(f"no run directory or metrics file at {args.path}")
    check_outputs([Output(out, "--out", PICTURE)], [args.path, read], args.overwrite)
    plot(args.path, out)


if __name__ == "__main__":
    main()
