"""A training run's settings as one typed value: train.py's flags are built from it, config.json and the checkpoint
record it, and --resume restores it.

Each field is one flag (`max_steps` is --max-steps) with its default, its range and its help beside it. Two facts
about a field are written once, here, as its metadata:
- `defines_run`: --resume may not change it, since the resumed steps would belong to another run (the rank, the
  seed, the batch shape...). The base model and the training data are compared by their content's fingerprint
  instead (`by_content`), so a run resumes from the same files moved elsewhere.
- its default is also its value in a checkpoint saved before the field existed.

A new flag is one line in the class below, for example
    label_smoothing: float = flag(0.0, "optimisation", "...", type=non_negative, defines_run=True)
and then the line of code that uses `settings.label_smoothing`.
"""
import argparse
from dataclasses import asdict, dataclass, field, fields, replace

from data.prompts import LOSS_ON
from gpt2 import UserError
from lora import INITS, LoRAConfig, LoRAError, VALID_TARGETS
from lora.quant import MODES

from .cli import at_least, given_flags, non_negative, positive, probability
from .precision import PRECISIONS

EVAL_ANSWERS_ON_GPU = 200  # --eval-answers' default on a GPU: seconds per evaluation; on a CPU, 0
GROUPS = ("model", "LoRA", "data", "optimisation", "evaluation, logging and checkpoints")


def flag(default, group: str, help: str | None = None, *, defines_run: bool = False, by_content: bool = False,
         exclusive: str | None = None, **argparse_options):
    """A field of Settings that is also a flag: `argparse_options` go to add_argument as they are (type, choices,
    nargs, metavar); `exclusive` names a group of flags that exclude each other."""
    return field(default=default, metadata=dict(group=group, help=help, defines_run=defines_run or by_content,
                                                by_content=by_content, exclusive=exclusive, options=argparse_options))


@dataclass(frozen=True)
class Settings:
    # model
    model: str = flag("gpt2", "model", "gpt2 | gpt2-medium | gpt2-large | gpt2-xl, a directory holding "
                      "model.safetensors, or (with --init random) gpt2-tiny", by_content=True)
    init: str = flag("pretrained", "model", "random: the architecture with GPT-2's random initialisation (offline "
                     "runs, benchmarks)", choices=("pretrained", "random"), defines_run=True)
    base_dropout: float = flag(0.1, "model", "dropout inside the frozen model while training (transformers' GPT-2 "
                               "default, as the seed)", type=probability)
    compile: bool = flag(False, "model", "torch.compile the model (GPU; slower start)")
    quantize: str = flag("none", "model", "store the frozen block projections in int8 (row-wise absmax, like the "
                         "seed's 8-bit GPT-2) or QLoRA's 4-bit NF4 (lora/quant.py); embeddings, the tied head and "
                         "LayerNorms stay as they are", choices=MODES, defines_run=True)
    precision: str = flag("auto", "model", "auto: bf16 on GPUs that have it, else fp16 with loss scaling; fp32 on a "
                          "CPU", choices=PRECISIONS)
    # LoRA
    rank: int = flag(4, "LoRA", type=at_least(1), defines_run=True)
    alpha: float = flag(8.0, "LoRA", type=positive, defines_run=True)
    lora_dropout: float = flag(0.2, "LoRA", type=probability)
    targets: tuple[str, ...] = flag(("c_attn", "c_proj", "c_fc"), "LoRA", f"projections to adapt: "
                                    f"{', '.join(VALID_TARGETS)}", nargs="+", metavar="NAME", choices=VALID_TARGETS,
                                    defines_run=True)
    qkv: str = flag("", "LoRA", "adapt only these parts of c_attn, each with its own A and B (e.g. qv)",
                    defines_run=True)
    rslora: bool = flag(False, "LoRA", "rank-stabilised scaling alpha / sqrt(rank)", defines_run=True)
    dora: bool = flag(False, "LoRA", "DoRA: also train each output row's magnitude (Liu et al., 2024; "
                      "lora/dora.py)", defines_run=True)
    lora_init: str = flag("default", "LoRA", "pissa: start A, B from W's top-r singular vectors, W -> the residual "
                          "(Meng et al., 2024)", choices=INITS, defines_run=True)
    loraplus_ratio: float | None = flag(None, "LoRA", "LoRA+: B's learning rate is λ times A's (Hayou et al., 2024; "
                                        "e.g. 16)", type=positive, metavar="λ", defines_run=True)
    # data
    data_dir: str | None = flag(None, "data", "directory holding train-v2.0.json and dev-v2.0.json (default: the "
                                "Hub)", by_content=True)
    train_file: str | None = flag(None, "data", "official-format SQuAD 2.0 JSON to train on", by_content=True)
    eval_file: str | None = flag(None, "data", "official-format SQuAD 2.0 JSON for the eval loss")
    max_len: int = flag(1024, "data", "tokens per sequence; the context is shortened to fit", type=at_least(1),
                        defines_run=True)
    loss_on: str = flag("all", "data", "all: every token, like the seed; answer: only the answer and EOS",
                        choices=LOSS_ON, defines_run=True)
    no_eos: bool = flag(False, "data", "no EOS after the answer (the seed's model never stops)", defines_run=True)
    # optimisation
    lr: float = flag(5e-5, "optimisation", type=positive)
    weight_decay: float = flag(0.0, "optimisation", type=non_negative)
    betas: tuple[float, float] = flag((0.9, 0.999), "optimisation", type=probability, nargs=2)
    eps: float = flag(1e-8, "optimisation", type=positive)
    warmup_steps: int = flag(100, "optimisation", type=at_least(0))
    max_steps: int = flag(1200, "optimisation", "optimizer steps (default 1200, the seed's)", type=at_least(1),
                          exclusive="length")
    epochs: float | None = flag(None, "optimisation", "train this many passes over the data instead", type=positive,
                                exclusive="length")
    micro_batch_size: int = flag(5, "optimisation", "sequences per forward pass (per GPU)", type=at_least(1),
                                 defines_run=True)
    grad_accum: int = flag(10, "optimisation", "micro-batches per optimizer step", type=at_least(1),
                           defines_run=True)
    micro_batch_split: int = flag(1, "optimisation", "cut each micro-batch of length-sorted sequences into K where "
                                  "padding is least: the same steps, less padding (e.g. 2 with --micro-batch-size 50 "
                                  "--grad-accum 1)", type=at_least(1), metavar="K", defines_run=True)
    clip: float = flag(1.0, "optimisation", "gradient norm clipping", type=positive)
    seed: int = flag(42, "optimisation", type=at_least(0), defines_run=True)
    # evaluation, logging and checkpoints
    eval_every: int = flag(200, GROUPS[4], "steps between eval-loss measurements", type=at_least(1))
    eval_examples: int | None = flag(None, GROUPS[4], "eval loss on this many eval questions (default: all)",
                                     type=at_least(1))
    eval_answers: int | None = flag(None, GROUPS[4], "also answer this many eval questions (a fixed random set) at "
                                    f"each evaluation: EM, F1, abstentions, and best/ (default: {EVAL_ANSWERS_ON_GPU} "
                                    f"on a GPU, 0 on a CPU)", type=at_least(0), metavar="N")
    eval_batch_size: int = flag(32, GROUPS[4], type=at_least(1))
    save_every: int = flag(200, GROUPS[4], "steps between checkpoints", type=at_least(1))
    log_every: int = flag(10, GROUPS[4], "steps between log.jsonl lines", type=at_least(1))
    out: str = flag("runs/gpt2-lora", GROUPS[4], "run directory: new, empty, or a run to --resume")
    resume: bool = flag(False, GROUPS[4], "continue the run in --out from its checkpoint, with its settings; flags "
                        "given replace them (--max-steps, --lr, ...) unless they would change the run")
    device: str | None = flag(None, GROUPS[4], "cpu, cuda, cuda:1, ... (default: cuda if available)")

    def __post_init__(self):  # argparse gives nargs flags as lists, JSON and old checkpoints too: one type, tuple
        for name in ("targets", "betas"):
            object.__setattr__(self, name, tuple(getattr(self, name)))

    def problem(self) -> str | None:
        """What is wrong with these settings taken together (each flag's own range is its type's to check)."""
        if self.quantize != "none" and (self.dora or self.lora_init == "pissa"):
            return "--quantize takes plain LoRA: DoRA's weight norm and PiSSA's residual need the dense weight"
        if self.max_len > 1024:
            return "--max-len cannot exceed GPT-2's 1024-token context"
        try:
            self.lora_config()  # LoRAConfig checks its own settings (--qkv letters, PiSSA without --qkv, ...)
        except LoRAError as e:
            return str(e)
        if self.data_dir and self.train_file and self.eval_file:
            return "--data-dir is unused when --train-file and --eval-file are both given: drop one"
        return None

    def lora_config(self) -> LoRAConfig:
        return LoRAConfig(rank=self.rank, alpha=self.alpha, dropout=self.lora_dropout, targets=self.targets,
                          qkv=self.qkv, rank_stabilized=self.rslora, dora=self.dora, init=self.lora_init)

    def as_dict(self) -> dict:
        return asdict(self)

    def resumed(self, recorded: "Settings", given: set[str], path) -> "Settings":
        """The settings of the run being resumed: the recorded ones, with the flags written on this command line
        in their place (--max-steps, --lr, --eval-every, --device, ...). A flag that would make it another run is
        refused, except the base and the data, which are checked by content once loaded."""
        changed = [f"--{f.name.replace('_', '-')} {getattr(recorded, f.name)} -> {getattr(self, f.name)}"
                   for f in fields(self) if f.name in given and f.metadata["defines_run"]
                   and not f.metadata["by_content"] and getattr(recorded, f.name) != getattr(self, f.name)]
        if changed:
            raise UserError(f"{path} was trained with other settings ({'; '.join(changed)}): resume with the same "
                            f"ones (or with none: --resume reads them from the checkpoint), or start a new run with "
                            f"another --out")
        settings = replace(recorded, **{name: getattr(self, name) for name in given | {"out", "resume"}})
        if "max_steps" in given:  # --max-steps and --epochs exclude each other: the one given wins
            settings = replace(settings, epochs=None)
        return settings

    @classmethod
    def from_record(cls, record, where: str) -> "Settings":
        """Settings as config.json or a checkpoint recorded them, each value checked as its flag would check it;
        a field the record lacks (it is older than the flag) takes its default. A bad value is a UserError that
        names `where` and the field."""
        if not isinstance(record, dict):
            raise UserError(f"{where} is damaged: the settings are a {type(record).__name__}, not a dict")
        values = {}
        for f in fields(cls):
            value = record.get(f.name, f.default)
            problem = _bad_value(f, value)
            if problem:
                raise UserError(f"{where} is damaged: {f.name} = {value!r} ({problem}); start a new run with "
                                f"another --out")
            values[f.name] = value
        settings = cls(**values)
        if settings.problem():
            raise UserError(f"{where} is damaged: {settings.problem()}")
        return settings


def _bad_value(f, value) -> str | None:
    """Why a recorded value is not one its flag could have given, or None."""
    options = f.metadata["options"]
    if value is None:
        return None if f.default is None else "missing"
    if isinstance(f.default, bool):
        return None if isinstance(value, bool) else "not true or false"
    items = value if "nargs" in options else [value]
    if "nargs" in options and (not isinstance(value, (list, tuple)) or not value
                               or options["nargs"] != "+" and len(value) != options["nargs"]):
        return f"not {options['nargs']} value(s)"
    for item in items:
        if "choices" in options and item not in options["choices"]:
            return f"not one of {', '.join(map(str, options['choices']))}"
        if "type" in options:
            if isinstance(item, (bool, str)) or not isinstance(item, (int, float)):
                return "not a number"
            try:
                if options["type"](repr(item)) != item:
                    return "not a number its flag takes"
            except argparse.ArgumentTypeError as e:
                return str(e)
        elif "choices" not in options and not isinstance(item, str):
            return "not text"
    return None


def parse(argv: list[str] | None = None, description: str | None = None) -> tuple[Settings, set[str]]:
    """train.py's command line: one flag per field of Settings. Returns the settings and which of them were written
    on the command line (--resume keeps the run's for the rest)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    groups = {name: p.add_argument_group(name) for name in GROUPS}
    exclusive = {}
    for f in fields(Settings):
        meta, options = f.metadata, dict(f.metadata["options"])
        group = groups[meta["group"]]
        if meta["exclusive"]:
            if meta["exclusive"] not in exclusive:
                exclusive[meta["exclusive"]] = group.add_mutually_exclusive_group()
            group = exclusive[meta["exclusive"]]
        if isinstance(f.default, bool):
            options["action"] = "store_true"
        else:
            options["default"] = f.default
        group.add_argument(f"--{f.name.replace('_', '-')}", help=meta["help"], **options)
    args = p.parse_args(argv)
    settings = Settings(**vars(args))
    if settings.problem():
        p.error(settings.problem())
    return settings, given_flags(p, argv, args)
