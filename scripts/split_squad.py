"""Split an official-format SQuAD file in two by article, for tuning on one half and reporting on the other.

    python scripts/split_squad.py dev-v2.0.json dev-a.json dev-b.json

Articles go alternately to the two halves (1st, 3rd, ... to the first), so no paragraph, and no topic, is in both:
a threshold tuned on one half and applied to the other has never seen the questions it is scored on.
"""
import json
import os
import sys
from pathlib import Path


def write(path: Path, data: dict) -> None:
    """Atomically: a temporary file beside `path`, renamed over it."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def main(argv: list[str]) -> None:
    if len(argv) != 3:
        sys.exit(__doc__)
    source, first, second = map(Path, argv)
    try:
        squad = json.loads(source.read_text(encoding="utf-8"))
        articles = squad["data"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        sys.exit(f"error: {source} is not a readable SQuAD JSON file ({type(e).__name__}: {e})")
    for path, half in ((first, articles[0::2]), (second, articles[1::2])):
        write(path, {**squad, "data": half})
        questions = sum(len(p["qas"]) for a in half for p in a["paragraphs"])
        print(f"{path}: {len(half)} articles, {questions} questions")


if __name__ == "__main__":
    main(sys.argv[1:])
