"""The machinery of a fine-tuning run, shared by train.py, evaluate.py and bench.py.

    cli.py        flag values checked at the edge (ranges, NaN), the device, which flags were given
    precision.py  bf16 / fp16 / fp32: which one, autocast, gradient scaling
    model.py      the base model with LoRA, for training; the merged model, for answering
    step.py       the optimizer, the learning-rate schedule, one training step, the eval loss
    settings.py   a run's settings as one dataclass: train.py's flags, config.json, what --resume may change
    run.py        a run's directory and checkpoint: its files, what it may hold, one process at a time, resuming
    outputs.py    where a command may write: never over its inputs or over files it did not write
    signals.py    how a script ends: one-line errors (install_error_handling); Ctrl-C and SIGTERM: save, exit
    answer.py     batched greedy answers to SQuAD questions, and their no-answer probabilities
    quality.py    EM and F1 while training, and the best adapter so far
    report.py     what a run prints: its settings at the start, a warm-up warning, a summary at the end
    adapters.py   adapters on disk in both formats (ours, PEFT's) and the adapted model built from either

The scripts hold the command lines and the loops a reader should see; this package holds what they share.
"""
