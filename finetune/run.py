"""A run directory (train.py --out) and its checkpoint: the one place that knows their files and what they hold.

A run directory holds only files of this project:
    config.json       the effective settings           log.jsonl      every logged step and evaluation, a line each
    checkpoint.pt     adapter + training state         adapter/       the adapter in PEFT's format
    best/             with --eval-answers: the adapter of the best eval F1 (checkpoint.pt) and its metrics.json
    metrics*.json     what evaluate.py writes beside a run (metrics.json, metrics.predictions.json, ...)
    train.lock        while a train.py runs in it: that process's id
A folder holding anything else (a model, another tool's files) is not a run: train.py refuses it as --out rather
than overwrite or delete what is there.

checkpoint.pt is lora's adapter checkpoint (A, B, the LoRA config, the base: lora/checkpoint.py) with the
training state beside it (the fields of Checkpoint below): the run's settings, the step, the optimizer's moments,
the fp16 loss scale, every process's random state (dropout masks), and the fingerprint of the training data, so
that a resumed run takes the very same steps an uninterrupted one would have taken.
"""
import contextlib
import fcntl
import fnmatch
import json
import os
import shutil
import sys
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from gpt2 import UserError
from lora import ADAPTER_LIMIT, LoRAConfig, load_adapter, load_lora_state_dict, recorded_config, save_adapter
from lora.peft_format import CONFIG_NAME, WEIGHTS_NAME
from tensorio import atomic_write, check_writable_dir

from .settings import Settings

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
LOG = "log.jsonl"
ADAPTER_DIR = "adapter"  # the PEFT copy
PEFT_FILES = (CONFIG_NAME, WEIGHTS_NAME)
BEST = "best"
BEST_METRICS = "metrics.json"  # in best/
LOCK = "train.lock"
# What a run directory may hold besides adapter/ and best/: train.py's files, evaluate.py's metrics (with their
# predictions and no-answer probabilities), and the pictures of plot.py and lora.anatomy.
RUN_FILES = (CONFIG, LOG, CHECKPOINT, LOCK, "metrics*.json", "*.png")
TRAINING_STATE = ("args", "step", "optimizer", "scaler", "rng")


@dataclass(frozen=True)
class Base:
    """How to rebuild the frozen base: the checkpoint's "base"."""
    model: str  # a name or a path
    init: str  # "pretrained" | "random"
    seed: int  # of the random init
    config: dict  # GPTConfig as a dict
    fingerprint: str | None = None  # lora.base_fingerprint of the weights as loaded; older checkpoints lack it
    quantize: str = "none"  # how the frozen projections were stored while training (lora/quant.py)


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint.pt, read once. `lora` is the file as lora.load_adapter returns it (what lora.apply_adapter
    takes); the other fields are what train.py keeps beside it, None where a checkpoint lacks them (an adapter saved
    without training state, or older than the field)."""
    path: Path
    lora: dict
    base: Base
    settings: Settings | None = None  # saved as "args"
    step: int | None = None
    precision: str | None = None
    optimizer: dict | None = None  # optimizer.state_dict()
    scaler: dict | None = None  # the fp16 GradScaler's state
    rng: list | None = None  # every process's random state, in rank order
    data_fingerprint: str | None = None  # data.squad.examples_fingerprint of the training data
    quality: dict | None = None  # best/ only: EM, F1, ... of the step

    @property
    def lora_config(self) -> LoRAConfig:
        return recorded_config(self.lora, str(self.path))

    def check_resumable(self) -> None:
        """The training state must be whole before --resume writes anything: one line naming the field otherwise."""
        missing = [key for key in TRAINING_STATE if key not in self.lora]
        if missing:
            raise UserError(f"{self.path} holds an adapter but no training state ({', '.join(missing)} missing): it "
                            f"cannot be resumed; start a new run with another --out")
        sound = {"step": isinstance(self.step, int) and not isinstance(self.step, bool) and self.step >= 0,
                 "optimizer": isinstance(self.optimizer, dict) and isinstance(self.optimizer.get("state"), dict)
                 and isinstance(self.optimizer.get("param_groups"), list),
                 "scaler": self.scaler is None or isinstance(self.scaler, dict),
                 "rng": isinstance(self.rng, list) and len(self.rng) > 0 and all(
                     isinstance(state, dict) and isinstance(state.get("torch"), torch.Tensor)
                     and state["torch"].dtype == torch.uint8 for state in self.rng)}
        broken = next((name for name, ok in sound.items() if not ok), None)
        if broken:
            raise UserError(f"{self.path} is damaged: its {broken} is not a train.py training state; it cannot be "
                            f"resumed (start a new run with another --out)")

    def restore(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                scaler: torch.amp.GradScaler | None, device: torch.device) -> int:
        """Load the adapter and the training state for --resume; returns the step to continue from."""
        load_lora_state_dict(model, self.lora["adapter"])
        try:
            optimizer.load_state_dict(self.optimizer)
            if scaler and self.scaler:
                scaler.load_state_dict(self.scaler)
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise UserError(f"{self.path} is damaged: its optimizer state does not fit the adapter ({e}); it cannot "
                            f"be resumed") from None
        rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        if len(self.rng) == world:  # the same number of processes: each continues its own random stream
            set_rng_state(self.rng[rank], device)
        return self.step


def checkpoint_path(run_or_checkpoint: str | os.PathLike) -> Path | None:
    """The checkpoint.pt of a run given as its directory or as the file itself; None for anything else (a PEFT
    adapter directory, a Hub repository id)."""
    path = Path(run_or_checkpoint)
    if path.is_file():
        return path
    return path / CHECKPOINT if (path / CHECKPOINT).is_file() else None


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """A checkpoint.pt (or a run directory's), each part checked: lora's by lora.load_adapter, the base's
    description and the settings here. One line naming the file and the field if any is damaged."""
    path = checkpoint_path(path) or Path(path)
    saved = load_adapter(path)
    base = saved["base"]
    missing = [f.name for f in fields(Base) if f.name not in base and f.default is MISSING]  # older ones have defaults
    if missing:
        raise UserError(f"{path} is damaged: base.{missing[0]} missing")
    settings = Settings.from_record(saved["args"], f"{path} (its args)") if "args" in saved else None
    return Checkpoint(path, saved, Base(**{f.name: base[f.name] for f in fields(Base) if f.name in base}), settings,
                      **{f.name: saved.get(f.name) for f in fields(Checkpoint)
                         if f.name not in ("path", "lora", "base", "settings")})


def save_checkpoint(path: Path, model: torch.nn.Module, settings: Settings, base: Base, step: int, **state) -> None:
    """Write a Checkpoint: lora's adapter checkpoint, the settings as "args", the step, and `state`, the other
    fields of Checkpoint by name (optimizer, rng, quality, ...)."""
    save_adapter(path, model, settings.lora_config(), asdict(base), args=settings.as_dict(), step=step, **state)


def check_adapter_sound(model: torch.nn.Module) -> float | None:
    """None if every trainable number is finite and within ADAPTER_LIMIT; else the worst magnitude found (a
    single device-to-host read, done only when saving)."""
    worst = torch.stack([p.detach().abs().max() for p in model.parameters() if p.requires_grad]).max().item()
    return None if worst <= ADAPTER_LIMIT else worst  # NaN fails the comparison too


def rng_state(device: torch.device) -> dict:
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and state.get("cuda") is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


RUN_OWNED = (CONFIG, LOG, CHECKPOINT, BEST_METRICS, *PEFT_FILES)  # the files a run writes through atomic_write


def is_temporary(name: str, owners: tuple[str, ...] = RUN_OWNED) -> bool:
    """A temporary file of tensorio.atomic_write (".NAME.random.tmp") for one of `owners` (by default a run's
    files), left by a process killed while writing it."""
    return name.startswith(".") and name.endswith(".tmp") and name[1:-len(".tmp")].rsplit(".", 1)[0] in owners


def _log_records(text: str) -> list | None:
    """log.jsonl's records, without a cut last line (a crash or a full disk mid-line); None if it is not ours."""
    lines = text.splitlines(keepends=True)
    try:
        records = [json.loads(line) for line in lines if line.endswith("\n")]
    except ValueError:
        return None
    return records if all(isinstance(record, dict) and "step" in record for record in records) else None


class Run:
    """A train.py run directory: its files, by name, and the checks that keep it one run's."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        self.checkpoint, self.config, self.log = self.dir / CHECKPOINT, self.dir / CONFIG, self.dir / LOG
        self.best, self.adapter = self.dir / BEST, self.dir / ADAPTER_DIR

    def is_run_file(self, path: Path) -> bool:
        name = path.name
        if is_temporary(name):
            return True
        if name == BEST:
            return path.is_dir() and all(f in (CHECKPOINT, BEST_METRICS) or is_temporary(f) for f in os.listdir(path))
        if name == ADAPTER_DIR:
            return path.is_dir() and all(f in PEFT_FILES or is_temporary(f) for f in os.listdir(path))
        if not path.is_file() or not any(fnmatch.fnmatchcase(name, pattern) for pattern in RUN_FILES):
            return False
        try:  # a config.json or log.jsonl of another tool must not be overwritten or deleted: check they are ours
            if name == CONFIG:
                settings = json.loads(path.read_text())
                return isinstance(settings, dict) and {"lora", "max_steps", "train_sequences"} <= settings.keys()
            if name == LOG:
                return _log_records(path.read_text()) is not None
        except (ValueError, UnicodeDecodeError):
            return False
        return True

    def check_is_ours(self) -> None:
        """--out must be writable and new, empty, or a run directory. Reads only: checked before anything else."""
        check_writable_dir(self.dir, "--out")
        if self.dir.is_dir():
            foreign = sorted(name for name in os.listdir(self.dir) if not self.is_run_file(self.dir / name))
            if foreign:
                raise UserError(f"--out {self.dir} holds files that are not a train.py run's ({', '.join(foreign[:4])}"
                                f"{', ...' if len(foreign) > 4 else ''}); a run would overwrite its {CONFIG} and "
                                f"{LOG}. Choose a new or empty folder for --out")

    def check_start(self, resume: bool) -> None:
        """--resume needs a checkpoint here, and a new run needs none."""
        if resume and not self.checkpoint.is_file():
            raise UserError(f"nothing to resume: no {self.checkpoint}")
        if not resume and self.checkpoint.is_file():
            raise UserError(f"{self.dir} already holds a run: continue it with --resume, or choose another --out")

    def check_best(self) -> None:
        """best/ (with --eval-answers) must hold its adapter with the F1 that --resume goes on comparing to."""
        path = self.best / CHECKPOINT
        if not self.best.is_dir() or not os.listdir(self.best):
            return
        if not path.is_file() or not (self.best / BEST_METRICS).is_file():
            raise UserError(f"{self.best} is damaged: {path.name if not path.is_file() else BEST_METRICS} missing; "
                            f"delete {self.best} to resume without it")
        quality = read_checkpoint(path).quality
        if not isinstance(quality, dict) or not isinstance(quality.get("f1"), (int, float)):
            raise UserError(f"{path} is damaged: quality.f1 missing; delete {self.best} to resume without it")

    def best_f1(self) -> float | None:
        """The F1 of the run's best adapter so far (None before the first evaluation): --resume compares to it."""
        path = self.best / CHECKPOINT
        return read_checkpoint(path).quality["f1"] if path.is_file() else None

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """One process per run folder, for the run's life: an exclusive flock on train.lock, which holds the pid.
        The OS releases a flock when its process dies, however it dies, so a killed run never leaves the folder
        locked. A second train.py is refused at once and changes nothing. The lock file is removed on release; a
        process that locked a file just removed by its holder retries on the new one (the inode check)."""
        created = not self.dir.exists()
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.dir / LOCK
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise UserError(f"{self.dir} is in use by another train.py (pid {holder}): wait for it to end, or "
                                f"choose another --out") from None
            if path.exists() and os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
            os.close(fd)
            if created and not os.listdir(self.dir):  # refused before writing anything: leave no trace
                self.dir.rmdir()

    def remove_leftovers(self) -> None:
        """Remove the temporary files of writes that a killed process left behind (never read: the files they
        were to replace are whole). Under the lock only: a running train.py's would be in the middle of a write."""
        leftovers = [folder / name for folder in (self.dir, self.best, self.adapter) if folder.is_dir()
                     for name in os.listdir(folder) if is_temporary(name)]
        for path in leftovers:
            path.unlink()
        if leftovers:
            print(f"removed {len(leftovers)} temporary file(s) left by an interrupted write: "
                  f"{', '.join(map(str, leftovers))}", file=sys.stderr)

    def start_afresh(self) -> None:
        """A new run in a folder where one stopped before its first checkpoint: its log and best/ go."""
        self.log.unlink(missing_ok=True)
        shutil.rmtree(self.best, ignore_errors=True)

    def forget_log_after(self, step: int) -> None:
        """Drop log.jsonl's lines after the checkpoint's step (logged before a crash or a refused save: the resumed
        run logs those steps again, and the log must tell each step once), and a cut last line."""
        if not self.log.is_file():
            return
        lines = self.log.read_text().splitlines(keepends=True)
        whole = [line for line in lines if line.endswith("\n")]
        if len(whole) < len(lines):
            print(f"dropped the cut last line of {self.log} (left by a crash or a full disk)", file=sys.stderr)
        kept = [line for line in whole if json.loads(line)["step"] <= step]
        if kept != lines:
            with atomic_write(self.log, "w") as f:
                f.writelines(kept)

    def write_config(self, settings: dict) -> None:
        with atomic_write(self.config, "w") as f:
            json.dump(settings, f, indent=2, allow_nan=False)

    def append_log(self, record: dict) -> None:
        """Add one line to log.jsonl with a single write of the whole line, so that a crash leaves the line whole
        or absent; a write cut short (a full disk) is undone before the error is reported. Strict JSON: the NaN
        guards run first."""
        line = (json.dumps(record, allow_nan=False) + "\n").encode()
        fd = os.open(self.log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        size = os.fstat(fd).st_size
        try:
            if os.write(fd, line) != len(line):
                raise OSError(28, "No space left on device")
        except OSError as e:
            os.ftruncate(fd, size)
            raise UserError(f"cannot write {self.log} ({e.strerror}): free some space; the checkpoint at the last "
                            f"save is whole, continue with --resume") from None
        finally:
            os.close(fd)
