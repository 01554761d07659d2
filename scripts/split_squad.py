"""Split an official-format SQuAD file in two by article, for tuning on one half and reporting on the other.

    python scripts/split_squad.py ../shared/squad_v2/dev-v2.0.json runs/dev-a.json runs/dev-b.json

Articles go alternately to the two halves (1st, 3rd, ... to the first), so no paragraph, and no topic, is in both:
a threshold tuned on one half and applied to the other has never seen the questions it is scored on. The halves
go where they are named (their folders are made); an existing file is replaced only with --overwrite, and the
input never.
"""
import argparse
import json
import os
import sys
from pathlib import Path


def write(path: Path, data: dict) -> None:
    """Atomically: a temporary file beside `path`, renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", type=Path, help="the SQuAD JSON file to split")
    p.add_argument("first", type=Path, help="where the 1st, 3rd, ... articles go")
    p.add_argument("second", type=Path, help="where the 2nd, 4th, ... articles go")
    p.add_argument("--overwrite", action="store_true", help="replace FIRST and SECOND if they exist")
    args = p.parse_args(argv)
    if args.first.resolve() == args.second.resolve():
        sys.exit(f"error: the two halves would both be written to {args.first}: name two files")
    if args.source.resolve() in (args.first.resolve(), args.second.resolve()):
        sys.exit(f"error: {args.source} is the file being split: write the halves to other files")
    existing = [str(path) for path in (args.first, args.second) if path.exists()]
    if existing and not args.overwrite:
        sys.exit(f"error: {' and '.join(existing)} already exist(s): pass --overwrite to replace, or name other files")
    try:
        squad = json.loads(args.source.read_text(encoding="utf-8"))
        articles = squad["data"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        sys.exit(f"error: {args.source} is not a readable SQuAD JSON file ({type(e).__name__}: {e})")
    for path, half in ((args.first, articles[0::2]), (args.second, articles[1::2])):
        write(path, {**squad, "data": half})
        questions = sum(len(p["qas"]) for a in half for p in a["paragraphs"])
        print(f"{path}: {len(half)} articles, {questions} questions")


if __name__ == "__main__":
    main(sys.argv[1:])
