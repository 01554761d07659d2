"""Split an official-format SQuAD file in two by article, for tuning on one half and reporting on the other.

    python scripts/split_squad.py ../shared/squad_v2/dev-v2.0.json runs/dev-a.json runs/dev-b.json

Articles go alternately to the two halves (1st, 3rd, ... to the first), so no paragraph, and no topic, is in both:
a threshold tuned on one half and applied to the other has never seen the questions it is scored on. The halves
go where they are named (their folders are made). Both are checked before any work (finetune/outputs.py): never the
source, never one file for both, never into a run, a model or a PEFT adapter folder; an existing file is replaced
only with --overwrite, and only if it is a SQuAD JSON this script could have written.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a file: the repository root holds the packages

from finetune.signals import install_error_handling

install_error_handling()  # first: a UserError prints one line, not a traceback

import argparse
import json

from finetune.outputs import SQUAD_HALF, Output, check_outputs
from gpt2 import UserError
from tensorio import atomic_write


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="the SQuAD JSON file to split")
    p.add_argument("first", type=Path, help="where the 1st, 3rd, ... articles go")
    p.add_argument("second", type=Path, help="where the 2nd, 4th, ... articles go")
    p.add_argument("--overwrite", action="store_true", help="replace FIRST and SECOND if they are SQuAD JSON files")
    args = p.parse_args(argv)
    check_outputs([Output(args.first, "FIRST", SQUAD_HALF), Output(args.second, "SECOND", SQUAD_HALF)],
                  inputs=[args.source], overwrite=args.overwrite)
    try:
        squad = json.loads(args.source.read_text(encoding="utf-8"))
        articles = squad["data"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{args.source} is not a readable SQuAD JSON file ({type(e).__name__}: {e})") from None
    for path, half in ((args.first, articles[0::2]), (args.second, articles[1::2])):
        with atomic_write(path, "w") as f:
            json.dump({**squad, "data": half}, f)
        questions = sum(len(p["qas"]) for a in half for p in a["paragraphs"])
        print(f"{path}: {len(half)} articles, {questions} questions")


if __name__ == "__main__":
    main(sys.argv[1:])
