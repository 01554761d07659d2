"""Answer SQuAD 2.0 questions with a fine-tuned GPT-2 and score the answers.

    python evaluate.py --checkpoint runs/gpt2-lora                       # the full dev set
    python evaluate.py --checkpoint runs/gpt2-lora --subset seed         # the seed notebook's 100 questions
    python evaluate.py --checkpoint runs/gpt2-lora --context "..." --question "..."
    python evaluate.py --predictions preds.json --eval-file dev-v2.0.json   # score a predictions file
    python evaluate.py --checkpoint runs/gpt2-lora --na-threshold 0.3 --report report.md

Writes metrics.json (with metrics.predictions.json and metrics.na_prob.json) into the run directory, or --out; an
existing file is replaced only with --overwrite. An adapter loaded onto a base with other weights than its own gets a
warning (--strict: an error).

Metrics: the official SQuAD 2.0 exact match and F1 (overall, answerable, unanswerable); with the model's
no-answer probabilities, the official best_exact / best_f1 and their thresholds; BLEU-1 computed like the seed's
metric with the right references (`bleu1`); and the seed's own protocol with its reference bug (`bleu1_seed`), for
comparison with the 13.89% it reported. Then a breakdown: answered or abstained, F1 by question word and by gold
answer length, and the worst answers.
"""
from finetune.signals import install_error_handling

install_error_handling()  # first: a UserError prints one line, and Ctrl-C during the slow imports below too
import argparse
import json
import math
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from data.breakdown import breakdown, breakdown_markdown, to_markdown
from data.metrics import (best_thresholds, bleu1, correct_references, seed_references, seed_subset_indices,
                          squad_v2_scores)
from data.prompts import NO_ANSWER, WINOGRAD
from data.squad import FILE_NAMES, SquadExample, load_split
from finetune.adapters import trained_with_eos
from finetune.answer import (answer, answer_with_threshold, na_prob_note, no_answer_probability, official_answer,
                             timing)
from finetune.cli import at_least, resolve_device
from finetune.model import load_answerer
from finetune.outputs import METRICS, NA_PROBS, PREDICTIONS, REPORT, Output, check_outputs
from finetune.precision import PRECISIONS, resolve_precision
from finetune.run import Checkpoint, checkpoint_path, read_checkpoint
from gpt2 import GPT, PRESETS, UserError
from gpt2.pretrained import HUB_MODELS
from lora.quant import MODES
from tensorio import atomic_write

SEED_REPORTED_BLEU1 = 0.1389
DEV_SET_SIZE = 11873


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", help="a train.py --out directory (or its checkpoint.pt), a PEFT adapter "
                   "directory, or the Hub repository id of one")
    p.add_argument("--model", help="the base model, a Hub repository id or a local path (default: the run's own "
                   "base, or the adapter's base_model_name_or_path); without --checkpoint, answer with it unadapted")
    p.add_argument("--predictions", help="score this predictions file (question id -> answer) instead of answering")
    p.add_argument("--data-dir", help="directory holding dev-v2.0.json (default: the run's eval file, else the Hub's "
                   "validation split)")
    p.add_argument("--eval-file", help="official-format SQuAD 2.0 JSON to answer (default: the run's eval file)")
    p.add_argument("--subset", choices=("seed",), help="seed: only the seed notebook's 100 test questions")
    p.add_argument("--limit", type=at_least(1), help="only the first N questions")
    p.add_argument("--batch-size", type=at_least(1), default=128, help="questions answered together")
    p.add_argument("--max-new-tokens", type=at_least(1), default=128, help="answer length limit (the seed's: 128)")
    p.add_argument("--out", help="metrics JSON (default: metrics.<what was scored>.json in the run directory, e.g. "
                   "metrics.dev.seed.json); beside it go <name>.predictions.json and <name>.na_prob.json")
    p.add_argument("--na-threshold", type=float, metavar="T", help="abstain where the no-answer probability is "
                   "above T, else give the best answer that is not an abstention (default: greedy decides)")
    p.add_argument("--report", metavar="FILE.md", help="also write the metrics and the breakdown as Markdown")
    p.add_argument("--overwrite", action="store_true", help="replace metrics and predictions files already there")
    p.add_argument("--strict", action="store_true", help="refuse a base model whose weights are not the ones the "
                   "adapter was trained on (default: a warning)")
    p.add_argument("--examples", type=at_least(0), default=3, help="answered examples to show")
    p.add_argument("--context", help="answer one question about this text (with --question)")
    p.add_argument("--question")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--quantize", choices=MODES, help="quantize the base like this (default: as the run was "
                   "trained, see train.py --quantize); the adapter is merged into the dequantized weights")
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="auto: bf16 on GPUs that have it, else fp16; fp32 on a CPU")
    args = p.parse_args(argv)
    if args.max_new_tokens >= 1000:
        p.error("--max-new-tokens must be between 1 and 999: prompt and answer share GPT-2's 1024 tokens")
    if args.na_threshold is not None and not (0 <= args.na_threshold <= 1 and args.predictions is None):
        p.error("--na-threshold is a probability (0 to 1) applied while answering: not with --predictions")
    if (args.context is None) != (args.question is None):
        p.error("--context and --question go together")
    if args.predictions is not None:
        answering = [f"--{name}" for name in ("checkpoint", "model", "context") if getattr(args, name) is not None]
        if answering:
            p.error(f"--predictions scores answers already written; {' and '.join(answering)} would answer "
                    f"questions: give one or the other")
    if args.data_dir and args.eval_file:
        p.error("--data-dir is unused when --eval-file is given: drop one")
    if args.model in PRESETS and args.model not in HUB_MODELS:
        p.error(f"{args.model} is a shape without pretrained weights; a run trained on it (train.py --init random) "
                f"is evaluated with --checkpoint RUN and no --model: the run rebuilds its base")
    if args.predictions is None and args.checkpoint is None and args.model is None:
        p.error("give --checkpoint (or --model) to answer questions, or --predictions to score a file")
    return args


def score(examples: list[SquadExample], predictions: dict[str, str], seed_positions: list[int] | None,
          na_probs: dict[str, float] | None = None) -> dict:
    """Every metric of the evaluation. In `predictions`, "" and "Cannot Find Answer" both mean no answer: for
    EM/F1 that is "", for BLEU the text "Cannot Find Answer" (what the references say). With `na_probs`, the
    official best_exact / best_f1 and their thresholds too."""
    golds = {ex.id: ex.answers for ex in examples}
    official = {qid: official_answer(text) for qid, text in predictions.items()}
    try:
        metrics: dict = squad_v2_scores(golds, official)
    except ValueError as e:
        raise UserError(f"the predictions do not match the questions: {e}") from None
    if na_probs is not None:
        metrics.update(best_thresholds(golds, official, na_probs))
    as_text = [official[ex.id] or NO_ANSWER for ex in examples]
    metrics["bleu1"] = bleu1(as_text, [correct_references(ex.answers) for ex in examples])
    if seed_positions is not None:
        metrics["bleu1_seed"] = bleu1([as_text[i] for i in seed_positions],
                                      [seed_references(examples[i].answers) for i in seed_positions])
    return metrics


def print_metrics(metrics: dict) -> None:
    rows = [(k, f"{v:.2f}" if isinstance(v, float) else str(v)) for k, v in metrics.items() if not isinstance(v, dict)]
    rows.append(("bleu1 (correct references)", f"{100 * metrics['bleu1']['bleu']:.2f}"))
    if "bleu1_seed" in metrics:
        rows.append(("bleu1_seed (the seed's protocol)", f"{100 * metrics['bleu1_seed']['bleu']:.2f}   the seed "
                     f"reported {100 * SEED_REPORTED_BLEU1:.2f}; its references reward mostly 'Cannot Find Answer'"))
    width = max(len(k) for k, _ in rows)
    print("\n".join(f"{k:<{width}}  {v}" for k, v in rows))


def show_examples(examples: list[SquadExample], answers: list[str], n: int) -> None:
    for ex, text in list(zip(examples, answers))[:n]:
        context = ex.context if len(ex.context) < 200 else ex.context[:200] + "..."
        text = text if len(text) < 200 else text[:200] + "..."
        print(f"\nCONTEXT: {context}\nQUESTION: {ex.question}\nGOLD: {ex.answers or [NO_ANSWER]}\nANSWER: {text}")


def read_predictions(path: str, all_ids: set[str], selected: list[SquadExample]) -> dict[str, str]:
    """A predictions file (question id -> answer string) without the eval set's questions that were not selected
    (--subset, --limit): those are ignored, as the official script does. Ids the eval set does not have stay, for
    scoring to report (they mean the file answers another data set); repeated ids are an error."""
    def refuse_repeats(pairs):  # json keeps the last of repeated keys without a word
        repeated = [key for key, n in Counter(key for key, _ in pairs).items() if n > 1]
        if repeated:
            raise UserError(f"{path} answers {len(repeated)} question id(s) more than once (first: {repeated[0]!r})")
        return dict(pairs)
    try:
        predictions = json.loads(Path(path).read_text(encoding="utf-8"), object_pairs_hook=refuse_repeats)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read predictions from {path}: {e}") from None
    if not isinstance(predictions, dict):
        raise UserError(f"{path} must map question ids to answer strings (a JSON object)")
    not_text = [qid for qid, text in predictions.items() if not isinstance(text, str)]
    if not_text:
        raise UserError(f"{path}: {len(not_text)} answer(s) are not strings (first: {not_text[0]!r} -> "
                        f"{predictions[not_text[0]]!r}); no answer is written \"\"")
    selected_ids = {ex.id for ex in selected}
    return {qid: text for qid, text in predictions.items() if qid in selected_ids or qid not in all_ids}


def select(examples: list[SquadExample], args: argparse.Namespace) -> tuple[list[SquadExample], list[int] | None]:
    """The questions to evaluate, and where the seed's 100 test questions are among them (if they all are)."""
    seed_indices = seed_subset_indices(DEV_SET_SIZE)
    if args.subset == "seed":
        if len(examples) != DEV_SET_SIZE:
            raise UserError(f"--subset seed indexes the SQuAD 2.0 dev set ({DEV_SET_SIZE} questions); this eval set "
                            f"has {len(examples)}")
        examples, seed_indices = [examples[i] for i in seed_indices], list(range(len(seed_indices)))
    elif len(examples) != DEV_SET_SIZE:
        seed_indices = None
    if args.limit is not None and args.limit < len(examples):
        examples, seed_indices = examples[:args.limit], None
    return examples, seed_indices


def use_the_runs_eval_data(args: argparse.Namespace, run: Checkpoint) -> None:
    """Without --eval-file or --data-dir, answer the questions a train.py run measured its eval loss on (recorded
    in its checkpoint), so that scoring an offline run needs no network and no repeated paths."""
    if args.eval_file is not None or args.data_dir is not None:
        return
    if run.settings is not None:
        args.eval_file, args.data_dir = run.settings.eval_file, run.settings.data_dir
    recorded = args.eval_file or (args.data_dir and str(Path(args.data_dir) / FILE_NAMES["eval"]))
    if recorded and not Path(recorded).is_file():
        raise UserError(f"the run was evaluated on {recorded}, which is not there from this directory: "
                        f"give --eval-file FILE (or --data-dir DIR)")
    if recorded:
        print(f"questions from the run's eval file {recorded} (--eval-file to choose others)", file=sys.stderr)


def scored_name(args: argparse.Namespace) -> str:
    """What an evaluation scored, as file names say it: 'dev' (dev-v2.0.json, or the Hub's validation split),
    'dev.seed', 'dev.first100', 'short16.seed.first50' ..."""
    parts = [Path(args.eval_file or FILE_NAMES["eval"]).name.removesuffix(".json").removesuffix("-v2.0")]
    if args.subset:
        parts.append(args.subset)
    if args.limit is not None:
        parts.append(f"first{args.limit}")
    return ".".join(parts)


def metrics_path(args: argparse.Namespace) -> Path:
    """The metrics file: --out, else metrics.<scored_name>.json in the run directory (or here, without a run, and for
    a PEFT adapter, whose folder holds nothing else). Named after what was scored, so that scoring another subset
    never replaces an earlier file."""
    if args.out:
        return Path(args.out)
    run_checkpoint = checkpoint_path(args.checkpoint) if args.checkpoint else None
    if run_checkpoint:
        return run_checkpoint.parent / f"metrics.{scored_name(args)}.json"
    return Path(f"metrics.{scored_name(args)}.json")


def beside(metrics_file: Path, kind: str) -> Path:
    """A file that goes with a metrics file: beside(metrics.dev.json, "predictions") = metrics.dev.predictions.json."""
    return metrics_file.with_suffix(f".{kind}.json")


def read_paths(args: argparse.Namespace) -> list[str | Path | None]:
    """Every file (or folder) evaluate.py reads: no output may replace one of them."""
    checkpoint = Path(args.checkpoint) if args.checkpoint else None
    eval_file = args.eval_file or (args.data_dir and Path(args.data_dir) / FILE_NAMES["eval"])
    return [eval_file, args.predictions, args.model, checkpoint, checkpoint and checkpoint_path(checkpoint)]


def checked_outputs(args: argparse.Namespace, answering: bool) -> tuple[Path, bool]:
    """The metrics file, checked with the files that go beside it before any work (none may replace an input, or
    a file evaluate.py did not write); and whether it is there already (to be replaced, with --overwrite)."""
    out = metrics_path(args)
    outputs = [Output(out, "--out", METRICS)]
    if answering:
        outputs += [Output(beside(out, "predictions"), "--out", PREDICTIONS),
                    Output(beside(out, "na_prob"), "--out", NA_PROBS)]
    if args.report:
        outputs.append(Output(Path(args.report), "--report", REPORT))
    check_outputs(outputs, read_paths(args), args.overwrite)
    return out, out.exists()


def ask(args: argparse.Namespace, model: GPT) -> None:
    """--context and --question: print the model's answer."""
    print(answer(model, [SquadExample("cli", args.context, args.question, [])], 1, args.max_new_tokens,
                 progress=False)[0])


def score_predictions(args: argparse.Namespace) -> None:
    """--predictions: score a predictions file against the eval set."""
    out, replacing = checked_outputs(args, answering=False)
    all_examples = load_split("eval", args.data_dir, args.eval_file)
    examples, seed_positions = select(all_examples, args)
    predictions = read_predictions(args.predictions, {ex.id for ex in all_examples}, examples)
    write_results(args, examples, predictions, seed_positions, None, out, replacing)


def score_checkpoint(args: argparse.Namespace, run: Checkpoint | None, device: torch.device,
                     dtype: torch.dtype) -> None:
    """Answer the eval questions with the adapted model (or, with --model alone, the base model) and score it."""
    if run is not None:
        use_the_runs_eval_data(args, run)
    out, replacing = checked_outputs(args, answering=True)
    model = answerer(args, run, device, dtype)
    examples, seed_positions = select(load_split("eval", args.data_dir, args.eval_file), args)
    start = time.perf_counter()
    probabilities = no_answer_probability(model, examples, args.batch_size, args.max_new_tokens,
                                          add_eos=trained_with_eos(run))
    na_probs = {ex.id: p for ex, p in zip(examples, probabilities)}
    not_numbers = [qid for qid, p in na_probs.items() if not math.isfinite(p)]
    if not_numbers:  # a NaN would be written as a bare NaN, which is not JSON, and every answer is garbage
        raise UserError(f"the no-answer probability of {len(not_numbers)} question(s) is not a number (first: "
                        f"{not_numbers[0]!r}): the model's outputs are not finite. The adapter or the base is "
                        f"damaged, or half precision overflowed: try --precision fp32")
    na_seconds, start = time.perf_counter() - start, time.perf_counter()
    if args.na_threshold is None:
        answers = answer(model, examples, args.batch_size, args.max_new_tokens)
    else:
        answers = answer_with_threshold(model, examples, probabilities, args.na_threshold, args.batch_size,
                                        args.max_new_tokens)
    seconds = time.perf_counter() - start
    decoded = len(examples) if args.na_threshold is None else sum(p <= args.na_threshold for p in probabilities)
    note = na_prob_note(probabilities)  # a near-uniform model's, as the smoke run's
    print(timing(decoded, len(examples), seconds, na_seconds) + (f"\n{note}" if note else ""))
    predictions = {ex.id: official_answer(text) for ex, text in zip(examples, answers)}
    show_examples(examples, answers, args.examples)
    print(f"\nWinograd: {WINOGRAD[0]} {WINOGRAD[1]} -> "
          f"{answer(model, [SquadExample('winograd', *WINOGRAD, [])], 1, args.max_new_tokens, False)[0]!r} "
          f"(the seed answered 'the brown suitcase.')\n")
    write_results(args, examples, predictions, seed_positions, na_probs, out, replacing)


def write_results(args: argparse.Namespace, examples: list[SquadExample], predictions: dict[str, str],
                  seed_positions: list[int] | None, na_probs: dict[str, float] | None, out: Path,
                  replacing: bool) -> None:
    """Score, print the metrics and the breakdown, and write them (with the answers and their no-answer
    probabilities, when the model answered here)."""
    metrics = score(examples, predictions, seed_positions, na_probs)
    if args.na_threshold is not None:
        metrics["na_threshold"] = args.na_threshold
    print_metrics(metrics)
    tables = breakdown(examples, {qid: official_answer(text) for qid, text in predictions.items()}, na_probs)
    print("\n" + breakdown_markdown(tables))
    metrics["breakdown"] = tables
    written = [out]
    with atomic_write(out, "w") as f:
        json.dump(metrics, f, indent=2, allow_nan=False)
    if na_probs is not None:
        written += [beside(out, "predictions"), beside(out, "na_prob")]
        for path, content in zip(written[1:], (predictions, na_probs)):
            with atomic_write(path, "w") as f:
                json.dump(content, f, indent=2, allow_nan=False)
    if args.report:
        written.append(Path(args.report))
        with atomic_write(args.report, "w") as f:
            f.write(to_markdown(metrics, tables, f"Evaluation of {args.checkpoint or args.predictions or args.model}"))
    print(f"\nwrote {', '.join(map(str, written))}" + (" (replacing those of the same questions)" if replacing else ""),
          file=sys.stderr)


def answerer(args: argparse.Namespace, run: Checkpoint | None, device: torch.device, dtype: torch.dtype) -> GPT:
    """The model that answers: quantized as the run was trained (or as --quantize says), the adapter merged."""
    quantize = args.quantize or (run.base.quantize if run else "none")
    if quantize != "none" and run and run.lora_config.dora:
        raise UserError(f"--quantize {quantize} takes plain LoRA: {args.checkpoint} is a DoRA adapter, whose weight "
                        f"norm needs the dense weight; drop --quantize")
    return load_answerer(run or args.checkpoint, args.model, device, dtype, quantize, args.strict)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    device = resolve_device(args.device)
    dtype = resolve_precision(args.precision, device)
    run = read_checkpoint(args.checkpoint) if args.checkpoint and checkpoint_path(args.checkpoint) else None
    if args.context is not None:
        ask(args, answerer(args, run, device, dtype))
    elif args.predictions is not None:
        score_predictions(args)
    else:
        score_checkpoint(args, run, device, dtype)


if __name__ == "__main__":
    main()
