"""The edge of the scripts: command-line values checked before any work is done.

argparse calls these types on each value, so a bad one stops the script at once with the flag's name and the
range it needs (exit code 2), before a model or a data set is loaded. NaN and infinity are refused everywhere:
`float("nan")` parses, but no setting means anything with it.
"""
import argparse
import math

import torch

from gpt2 import UserError


def _number(kind, text: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


def at_least(low: int):
    """An integer >= low."""
    def parse(text: str) -> int:
        value = _number(int, text)
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below {low}: give at least {low}")
        return value
    return parse


def positive(text: str) -> float:
    """A finite number > 0."""
    value = _number(float, text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be above 0")
    return value


def non_negative(text: str) -> float:
    """A finite number >= 0."""
    value = _number(float, text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{value} must be 0 or more")
    return value


def probability(text: str) -> float:
    """A dropout rate or an Adam beta: 0 <= p < 1 (at 1, dropout keeps nothing and Adam never forgets)."""
    value = _number(float, text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{value} is outside [0, 1)")
    return value


def given_flags(parser: argparse.ArgumentParser, argv: list[str] | None, args: argparse.Namespace) -> set[str]:
    """Which settings of `args` were written on the command line rather than left at their defaults. argparse
    fills in a default only where the namespace lacks the name, so parsing again into a namespace that holds a
    marker for every name leaves the marker exactly where no flag was given."""
    unset = object()
    parsed = parser.parse_args(argv, namespace=argparse.Namespace(**{name: unset for name in vars(args)}))
    return {name for name, value in vars(parsed).items() if value is not unset}


def resolve_device(name: str | None) -> torch.device:
    """--device: cpu, cuda or cuda:N, checked against this machine; None: cuda if there is one, else cpu."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r}: give cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: this machine has no CUDA GPU that torch can use; run on the CPU with "
                            f"--device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA GPU(s), numbered "
                            f"from 0")
    elif device.type != "cpu":
        raise UserError(f"--device {name}: this project runs on cpu or cuda")
    return device
