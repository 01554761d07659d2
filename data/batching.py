"""Batches for training: which examples go together, and padding them into tensors.

An optimizer step sees `examples_per_step` random examples (micro-batch x accumulation x GPUs), as in the
seed. Within a step the examples are sorted by length before being cut into micro-batches, so each micro-batch
holds similar lengths and little compute goes to padding. The gradient does not change: it is the sum over the
step's tokens, whatever the split (train.py divides by the step's token count, not per micro-batch), so each
micro-batch may also be cut again where that saves the most padding (train.py --micro-batch-split).
"""
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from gpt2 import EOS_ID, UserError


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T), right-padded
    targets: torch.Tensor  # (N,) the token each loss position must predict
    target_positions: torch.Tensor  # (N,) flat indices into the B*T positions
    n_real: int  # tokens that are not padding
    n_padded: int  # B * T


def collate(sequences: Sequence[tuple[list[int], int]]) -> Batch:
    """Right-pad (ids, first loss position) pairs; position i of a row predicts token i + 1 from `first` on."""
    T = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), T), EOS_ID, dtype=torch.long)
    targets, positions = [], []
    for row, (ids, first) in enumerate(sequences):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        targets.extend(ids[first + 1:])
        positions.extend(range(row * T + first, row * T + len(ids) - 1))  # padding never carries loss
    return Batch(input_ids, torch.tensor(targets), torch.tensor(positions),
                 n_real=sum(len(ids) for ids, _ in sequences), n_padded=input_ids.numel())


def plan_epoch(lengths: Sequence[int], examples_per_step: int, micro_batch_size: int, seed: int,
               epoch: int) -> list[list[list[int]]]:
    """Example indices for one epoch: steps -> micro-batches -> indices. The same for the same seed and epoch,
    so a resumed run sees exactly the batches it would have seen. An incomplete last step is dropped."""
    order = np.random.default_rng([seed, epoch]).permutation(len(lengths))
    steps = []
    for start in range(0, len(order) - examples_per_step + 1, examples_per_step):
        step = sorted(order[start:start + examples_per_step].tolist(), key=lambda i: -lengths[i])
        steps.append([step[i:i + micro_batch_size] for i in range(0, len(step), micro_batch_size)])
    return steps


def least_padding_split(lengths: Sequence[int], pieces: int) -> list[int]:
    """Where to cut a longest-first run of lengths into `pieces` consecutive groups so that the padded size,
    sum over groups of (rows x longest row), is least; returns each group's number of rows.

    One micro-batch of 50 sorted sequences pads every row to the longest: on SQuAD more than half of its tokens
    are padding. Cut in two where the lengths drop most and the short half is padded only to its own longest.
    Dynamic programming over the cut points: best[k][i] = least padded size of the first i rows in k groups;
    since the rows are sorted longest first, a group starting at row j is padded to lengths[j]."""
    n = len(lengths)
    pieces = min(pieces, n)
    best = [[0] + [float("inf")] * n] + [[float("inf")] * (n + 1) for _ in range(pieces)]
    cut = [[0] * (n + 1) for _ in range(pieces + 1)]
    for k in range(1, pieces + 1):
        for i in range(k, n + 1):
            for j in range(k - 1, i):  # the last group is rows j .. i-1
                size = best[k - 1][j] + (i - j) * lengths[j]
                if size < best[k][i]:
                    best[k][i], cut[k][i] = size, j
    sizes, i = [], n
    for k in range(pieces, 0, -1):
        sizes.append(i - cut[k][i])
        i = cut[k][i]
    return sizes[::-1]


def training_steps(sequences: Sequence[tuple[list[int], int]], micro_batch_size: int, accumulation: int,
                   seed: int, start_step: int = 0, rank: int = 0, world_size: int = 1,
                   split: int = 1) -> Iterator[list[Batch]]:
    """Endless optimizer steps from `start_step` on, epoch after epoch; each is this rank's micro-batches.

    With several GPUs, a step's sorted micro-batches are dealt out in turn, so every rank gets a similar mix
    of lengths. `split` > 1 cuts each micro-batch further into that many, where padding is least
    (least_padding_split): the step holds the same sequences, so its gradient is the same (train_step divides by
    the step's token count), and less compute goes to padding."""
    lengths = [len(ids) for ids, _ in sequences]
    per_step = micro_batch_size * accumulation * world_size
    steps_per_epoch = len(sequences) // per_step
    if steps_per_epoch == 0:
        raise UserError(f"{len(sequences)} training sequences do not fill one step of {per_step} (micro-batch x "
                        f"accumulation x GPUs): use more data or a smaller --micro-batch-size / --grad-accum")
    epoch, skip = divmod(start_step, steps_per_epoch)
    while True:
        for step in plan_epoch(lengths, per_step, micro_batch_size, seed, epoch)[skip:]:
            yield [collate([sequences[i] for i in piece]) for micro in step[rank::world_size]
                   for piece in _split(micro, lengths, split)]
        epoch, skip = epoch + 1, 0


def _split(micro: list[int], lengths: Sequence[int], pieces: int) -> list[list[int]]:
    """The micro-batch's indices (longest first) cut where least_padding_split says."""
    groups, start = [], 0
    for size in least_padding_split([lengths[i] for i in micro], pieces):
        groups.append(micro[start:start + size])
        start += size
    return groups


def eval_batches(sequences: Sequence[tuple[list[int], int]], batch_size: int) -> Iterator[Batch]:
    """Every sequence once, shortest first, in batches of similar length."""
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]))
    for start in range(0, len(order), batch_size):
        yield collate([sequences[i] for i in order[start:start + batch_size]])
