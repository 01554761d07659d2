"""Where a command may write: every output checked before any work, so that nothing it reads or finds is replaced.

A command that writes (evaluate.py, export.py, plot.py, scripts/split_squad.py) names its outputs, the kind of file
or folder each one is, and its inputs, and calls `check_outputs` before it loads anything. An output is refused when
- it is one of the command's inputs, symlinks resolved (a link to the eval set is the eval set);
- two outputs of the command are one file (evaluate.py --report equal to --out);
- something is already there that this command did not write: only a file (or folder) of the very kind it writes
  may be replaced, and only with --overwrite;
- it would put a foreign name into a folder whose listing others rely on: a train.py run holds only its own files,
  evaluate.py's metrics*.json and *.png pictures (else --resume refuses the run); a model folder or a PEFT adapter
  holds nothing else (else transformers loads the folder with the stray adapter, or the adapter's reader refuses).

    check_outputs([Output(Path("m.json"), "--out", METRICS)], inputs=[Path("dev.json")], overwrite=False)
"""
import fnmatch
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

from gpt2 import UserError
from gpt2.pretrained import MODEL_FILES
from tensorio import check_writable_dir

from .run import CHECKPOINT, CONFIG, LOG, PEFT_FILES, RUN_FILES, Run, is_temporary

RUN, MODEL, PEFT_ADAPTER, EMPTY, OTHER = "a train.py run", "a model", "a PEFT adapter", "empty", "other files"


@dataclass(frozen=True)
class Kind:
    """What a command writes, and how to tell a file (or folder) it wrote earlier from anything else there."""
    name: str                           # for messages: "a metrics JSON of evaluate.py"
    written_here: Callable[[Path], bool]
    files: tuple[str, ...] = ()         # a folder kind: the only names it holds


def _json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _json_object_of(value_types: tuple[type, ...]) -> Callable[[Path], bool]:
    def check(path: Path) -> bool:
        data = _json(path)
        return isinstance(data, dict) and all(isinstance(v, value_types) for v in data.values())
    return check


def _is_metrics(path: Path) -> bool:
    data = _json(path)
    return isinstance(data, dict) and {"exact", "f1", "total"} <= data.keys()


def _is_squad(path: Path) -> bool:
    data = _json(path)
    return isinstance(data, dict) and isinstance(data.get("data"), list)


def _is_report(path: Path) -> bool:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, ValueError):
        return False
    return text.startswith("# ") and "\n| metric | value |\n" in text


def _is_png(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(8) == b"\x89PNG\r\n\x1a\n"
    except OSError:
        return False


def _holds_only(files: tuple[str, ...]) -> Callable[[Path], bool]:
    def check(directory: Path) -> bool:  # leftovers of an interrupted atomic write count as the file's own
        return all(name in files or is_temporary(name, files)
                   for name in os.listdir(directory))
    return check


METRICS = Kind("a metrics JSON of evaluate.py", _is_metrics)
PREDICTIONS = Kind("a predictions JSON (question id -> answer)", _json_object_of((str,)))
NA_PROBS = Kind("a no-answer probabilities JSON (question id -> number)", _json_object_of((int, float)))
REPORT = Kind("a Markdown report of evaluate.py", _is_report)
PICTURE = Kind("a PNG picture", _is_png)
SQUAD_HALF = Kind("a SQuAD JSON (an object with a \"data\" list)", _is_squad)
PEFT_DIR = Kind(PEFT_ADAPTER, _holds_only(PEFT_FILES), PEFT_FILES)
MODEL_DIR = Kind(MODEL, _holds_only(MODEL_FILES), MODEL_FILES)


@dataclass(frozen=True)
class Output:
    path: Path
    flag: str   # the flag that chose it, for messages
    kind: Kind


def folder_kind(directory: Path) -> str:
    """What a folder holds, as far as writing into it matters: RUN, MODEL, PEFT_ADAPTER, EMPTY or OTHER."""
    names = os.listdir(directory)
    if not names:
        return EMPTY
    if any(name in names and Run(directory).is_run_file(directory / name) for name in (CONFIG, LOG, CHECKPOINT)):
        return RUN
    if "model.safetensors" in names:
        return MODEL
    if any(name in names for name in PEFT_FILES):
        return PEFT_ADAPTER
    return OTHER


def check_outputs(outputs: list[Output], inputs: Iterable[str | os.PathLike | None], overwrite: bool) -> None:
    """Refuse, before any work, every output that would replace an input, another output, or anything this command
    did not write (see the module's docstring). `inputs` may hold None for an input not given."""
    read = {Path(path).resolve(): Path(path) for path in inputs if path is not None}
    seen: dict[Path, Output] = {}
    for output in outputs:
        check_writable_dir(output.path if output.kind.files else output.path.parent, output.flag)
        target = output.path.resolve()
        written = [target, *(target / name for name in output.kind.files)]
        for path in written:
            if path in read:
                raise UserError(f"{output.flag} {output.path} would replace {read[path]}, which this command reads: "
                                f"write elsewhere")
        if target in seen:
            raise UserError(f"{output.flag} {output.path} and {seen[target].flag} {seen[target].path} are the same "
                            f"file: give each its own")
        seen[target] = output
        _check_the_folder_around(output, target)
        if target.exists():
            _check_replaceable(output, target, overwrite)


def _check_the_folder_around(output: Output, target: Path) -> None:
    """A new name in a run, a model folder or a PEFT adapter would spoil it for the tool that reads the folder."""
    entry = next(p for p in (target, *target.parents) if p.exists() or p.parent.exists())  # what lands in a folder
    folder, name = entry.parent, entry.name
    holder = folder_kind(folder)
    own_file = entry == target and not output.kind.files and any(fnmatch.fnmatchcase(name, p) for p in RUN_FILES)
    if holder == RUN and not own_file:
        raise UserError(f"{output.flag} {output.path}: {folder} is {RUN}, which holds only train.py's files, "
                        f"metrics*.json and *.png (else --resume refuses it); write {name} elsewhere")
    if holder in (MODEL, PEFT_ADAPTER):
        raise UserError(f"{output.flag} {output.path}: {folder} is {holder}; a file added there is loaded with it or "
                        f"refused by its readers: write {name} elsewhere")


def _check_replaceable(output: Output, target: Path, overwrite: bool) -> None:
    kind = output.kind  # a folder kind's output is a folder here: check_writable_dir refused a file
    if not kind.files and target.is_dir():
        raise UserError(f"{output.flag} {output.path} is a directory: name the file to write")
    if kind.files and not os.listdir(target):
        return  # an empty folder: nothing to replace
    if not kind.written_here(target):
        found = f"{folder_kind(target)} ({', '.join(sorted(os.listdir(target))[:4])})" if kind.files else \
            "another file"
        raise UserError(f"{output.flag} {output.path} holds {found}, not {kind.name}: this command replaces only "
                        f"what it writes itself; choose another {output.flag}")
    if not overwrite:
        raise UserError(f"{output.path} already exists ({kind.name}, from an earlier run of this command): pass "
                        f"--overwrite to replace it, or another {output.flag}")
