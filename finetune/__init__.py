"""The machinery of a fine-tuning run, shared by train.py, evaluate.py and bench.py.

    precision.py  bf16 / fp16 / fp32: which one, autocast, gradient scaling
    model.py      the base model with LoRA, for training; the merged model, for answering
    step.py       the optimizer, the learning-rate schedule, one training step, the eval loss
    state.py      a run's checkpoint: saving it, checking it is sound, resuming from it
    signals.py    Ctrl-C and SIGTERM: finish the step, save, exit
    answer.py     batched greedy answers to SQuAD questions, and their no-answer probabilities
    quality.py    EM and F1 while training, and the best adapter so far

The scripts hold the command lines and the loops a reader should see; this package holds what they share.
"""
