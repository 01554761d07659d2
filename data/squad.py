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
SQUAD_SITE = "https://rajpurkar.github.io/SQuAD-explorer/"


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
        if not (Path(data_dir) / FILE_NAMES[split]).is_file():
            raise UserError(f"--data-dir {data_dir} holds no {FILE_NAMES[split]}. {offline_help(split)}")
        return load_squad_file(Path(data_dir) / FILE_NAMES[split])
    return load_squad_hub(split)


def load_squad_file(path: str | os.PathLike) -> list[SquadExample]:
    """Every question of an official-format file, in order (article, paragraph, question). Each field is checked
    here, before any work: a wrong type or a text that cannot be written out again (a lone surrogate such as
    "\\ud800", which JSON allows) would otherwise stop a run or an evaluation at its very end."""
    if not os.path.isfile(path):
        raise UserError(f"no SQuAD file at {path}: the official files (train-v2.0.json, dev-v2.0.json) are at "
                        f"{SQUAD_SITE}")
    try:
        with open(path, encoding="utf-8") as f:
            squad = json.load(f)
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise UserError(f"{path} is not a SQuAD 2.0 JSON file ({type(e).__name__}: {e})") from None
    if not isinstance(squad, dict):
        raise UserError(f"{path} is not a SQuAD 2.0 JSON file: it holds a {type(squad).__name__}, not an object "
                        f"with 'data'")
    examples = []
    for a, article in enumerate(_field(squad, "data", list, path, "")):
        for p, paragraph in enumerate(_field(article, "paragraphs", list, path, f"data[{a}]")):
            where = f"data[{a}].paragraphs[{p}]"
            context = _text(paragraph, "context", path, where)
            for q, qa in enumerate(_field(paragraph, "qas", list, path, where)):
                where = f"data[{a}].paragraphs[{p}].qas[{q}]"
                qid = _text(qa, "id", path, where)
                where += f" (question {qid!r})"
                answers = [_text(answer, "text", path, f"{where}.answers[{i}]")
                           for i, answer in enumerate(_field(qa, "answers", list, path, where))]
                examples.append(SquadExample(qid, context, _text(qa, "question", path, where), answers))
    if not examples:
        raise UserError(f"{path} holds no questions")
    check_unique_ids(examples, path)
    return examples


def _field(record, key: str, kind: type, path, where: str):
    """record[key], which must be a `kind`; else a UserError naming the file and the field."""
    name = f"{where}.{key}" if where else key
    if not isinstance(record, dict) or key not in record:
        raise UserError(f"{path}: {name} is not in SQuAD format: it is missing (expected articles with "
                        f"'paragraphs', each with a 'context' and 'qas' of 'id', 'question', 'answers')")
    if not isinstance(record[key], kind):
        raise UserError(f"{path}: {name} is not in SQuAD format: it must be a {'list' if kind is list else 'string'}, "
                        f"not {type(record[key]).__name__}")
    return record[key]


def _text(record, key: str, path, where: str) -> str:
    """A string field that UTF-8 can encode (what the tokenizer and every file written later need)."""
    text = _field(record, key, str, path, where)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UserError(f"{path}: {where}.{key} holds {text[e.start]!r} at character {e.start}, half of a UTF-16 "
                        f"pair, which is not text: fix or remove it") from None
    return text


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


def offline_help(split: str) -> str:
    """How to do without the Hub, in flags that both train.py and evaluate.py have for `split` (training needs
    the eval questions too, evaluating only those)."""
    if split == "train":
        return (f"Offline, download train-v2.0.json and dev-v2.0.json from {SQUAD_SITE} and pass --data-dir DIR "
                f"(holding both) or --train-file / --eval-file FILE")
    return f"Offline, download dev-v2.0.json from {SQUAD_SITE} and pass --data-dir DIR (holding it) or --eval-file FILE"


def load_squad_hub(split: str) -> list[SquadExample]:
    """The split from the Hub via `datasets` (cached after the first download; with HF_HUB_OFFLINE=1 the cached
    copy only)."""
    try:
        import datasets  # only here: local-file runs need no `datasets`
    except ImportError:
        raise UserError(f"loading SQuAD from the Hub needs the datasets package (pip install datasets). "
                        f"{offline_help(split)}") from None
    try:
        rows = datasets.load_dataset(HUB_DATASET, split=HUB_SPLITS[split])
    except Exception as e:  # datasets raises many kinds: connection, cache, offline mode
        offline = "" if os.environ.get("HF_HUB_OFFLINE") else " (without network, HF_HUB_OFFLINE=1 fails at once)"
        raise UserError(f"could not load {HUB_DATASET} from the Hugging Face Hub ({type(e).__name__}: {e}). "
                        f"{offline_help(split)}{offline}") from None
    examples = [SquadExample(r["id"], r["context"], r["question"], list(r["answers"]["text"])) for r in rows]
    check_unique_ids(examples, HUB_DATASET)
    return examples

