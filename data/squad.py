"""SQuAD 2.0 questions, from the official JSON files or from the Hugging Face Hub.

Official format: {"data": [{"title", "paragraphs": [{"context", "qas": [{"id", "question", "answers":
[{"text", "answer_start"}], "is_impossible"}]}]}]}. SQuAD 2.0 adds unanswerable questions: no answers.
"""
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from gpt2.errors import UserError

HUB_DATASET = "rajpurkar/squad_v2"
HUB_SPLITS = {"train": "train", "eval": "validation"}
FILE_NAMES = {"train": "train-v2.0.json", "eval": "dev-v2.0.json"}
OFFLINE_HELP = ("Offline, download train-v2.0.json and dev-v2.0.json from https://rajpurkar.github.io/SQuAD-explorer/ "
                "and pass --data-dir DIR (holding both) or --train-file / --eval-file FILE")


@dataclass
class SquadExample:
    id: str
    context: str
    question: str
    answers: list[str]  # gold answer texts; [] for an unanswerable question


def load_split(split: str, data_dir: Optional[str] = None, file: Optional[str] = None) -> list[SquadExample]:
    """The 'train' or 'eval' questions, in file order: from `file`, else from `data_dir`, else from the Hub."""
    if file is not None:
        return load_squad_file(file)
    if data_dir is not None:
        return load_squad_file(Path(data_dir) / FILE_NAMES[split])
    return load_squad_hub(split)


def load_squad_file(path: str | os.PathLike) -> list[SquadExample]:
    """Every question of an official-format file, in order (article, paragraph, question)."""
    if not os.path.isfile(path):
        raise UserError(f"no SQuAD file at {path}. {OFFLINE_HELP}")
    try:
        with open(path, encoding="utf-8") as f:
            articles = json.load(f)["data"]
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} is not a SQuAD 2.0 JSON file ({type(e).__name__}: {e})") from None
    examples, where = [], "data"
    try:
        for a, article in enumerate(articles):
            where = f"data[{a}]"
            for p, paragraph in enumerate(article["paragraphs"]):
                where = f"data[{a}].paragraphs[{p}]"
                for q, qa in enumerate(paragraph["qas"]):
                    where = f"data[{a}].paragraphs[{p}].qas[{q}]"
                    example = SquadExample(qa["id"], paragraph["context"], qa["question"],
                                           [answer["text"] for answer in qa["answers"]])
                    if not all(isinstance(text, str) for text in (example.id, example.context, example.question,
                                                                  *example.answers)):
                        raise TypeError("its id, context, question and answer texts must all be strings")
                    examples.append(example)
    except (KeyError, TypeError) as e:
        raise UserError(f"{path}: {where} is not in SQuAD format ({type(e).__name__}: {e}); expected articles with "
                        f"'paragraphs', each with a 'context' and 'qas' of 'id', 'question', 'answers'") from None
    if not examples:
        raise UserError(f"{path} holds no questions")
    check_unique_ids(examples, path)
    return examples


def check_unique_ids(examples: list[SquadExample], source: str | os.PathLike) -> None:
    """Question ids key the predictions and the scores: two questions under one id would be scored as one."""
    seen, duplicates = set(), []
    for ex in examples:
        if ex.id in seen:
            duplicates.append(ex.id)
        seen.add(ex.id)
    if duplicates:
        raise UserError(f"{source}: {len(duplicates)} question id(s) occur more than once (first: {duplicates[0]!r}); "
                        f"every question needs its own id")


def examples_fingerprint(examples: list[SquadExample]) -> str:
    """A short hash of the questions' content (ids, contexts, questions, answers, in order): the same data, wherever
    its file lives, has the same fingerprint, and a changed file another one."""
    digest = hashlib.sha256()
    for ex in examples:
        digest.update(json.dumps([ex.id, ex.context, ex.question, ex.answers]).encode())
    return digest.hexdigest()[:16]


def load_squad_hub(split: str) -> list[SquadExample]:
    """The split from the Hub via `datasets` (cached after the first download; with HF_HUB_OFFLINE=1 the cached
    copy only)."""
    try:
        import datasets  # only here: local-file runs need no `datasets`
    except ImportError:
        raise UserError(f"loading SQuAD from the Hub needs the datasets package (pip install datasets). "
                        f"{OFFLINE_HELP}") from None
    try:
        rows = datasets.load_dataset(HUB_DATASET, split=HUB_SPLITS[split])
    except Exception as e:  # datasets raises many kinds: connection, cache, offline mode
        offline = "" if os.environ.get("HF_HUB_OFFLINE") else " (without network, HF_HUB_OFFLINE=1 fails at once)"
        raise UserError(f"could not load {HUB_DATASET} from the Hugging Face Hub ({type(e).__name__}: {e}). "
                        f"{OFFLINE_HELP}{offline}") from None
    examples = [SquadExample(r["id"], r["context"], r["question"], list(r["answers"]["text"])) for r in rows]
    check_unique_ids(examples, HUB_DATASET)
    return examples

