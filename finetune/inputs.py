"""Before a long run: is every input it needs there? The data, the tokenizer and the base weights are checked
together, and all that are missing are named in one message, instead of one failure (after its network retries)
per run.

Local paths are checked always. What comes from the Hugging Face Hub is checked only offline (HF_HUB_OFFLINE=1):
then the Hub's cache alone can serve it, and looking there costs no network attempt. Online, a Hub input is
downloaded when it is first needed.
"""
import os
from pathlib import Path

from huggingface_hub import constants, try_to_load_from_cache

from data.squad import FILE_NAMES, load_squad_hub, offline_help
from gpt2 import UserError
from gpt2.hub import is_repo_id
from gpt2.pretrained import HUB_MODELS, MODEL_FILES
from gpt2.tokenizer import BPE_DIR, BPE_FILES

from .settings import Settings


def missing_data(split: str, data_dir: str | None, file: str | None) -> str | None:
    """What is missing of the 'train' or 'eval' questions, or None."""
    name = {"train": "the training data", "eval": "the eval data"}[split]
    if file is not None or data_dir is not None:
        path = Path(file) if file is not None else Path(data_dir) / FILE_NAMES[split]
        return None if path.is_file() else f"{name} (no file at {path})"
    if not constants.HF_HUB_OFFLINE:
        return None
    try:
        load_squad_hub(split)  # offline, the cached copy or at once an error
    except UserError:
        return f"{name} (the Hub's SQuAD 2.0 is not in the cache)"
    return None


def missing_model(model: str) -> str | None:
    """What is missing of the base model's weights (a local directory or file, or a Hub repository), or None."""
    if model not in HUB_MODELS and os.path.isdir(model):
        weights = Path(model) / "model.safetensors"
        return None if weights.is_file() else f"the base model's weights (no {weights})"
    if model not in HUB_MODELS and os.path.isfile(model):
        return None
    if not is_repo_id(model):
        return f"the base model (no directory or file {model})"
    if constants.HF_HUB_OFFLINE and not all(isinstance(try_to_load_from_cache(model, name), str)
                                            for name in MODEL_FILES):
        return (f"the base model {model} (not in the Hugging Face cache: on a machine with network run `hf download "
                f"{model} {' '.join(MODEL_FILES)} --local-dir DIR`, copy DIR here and pass --model DIR)")
    return None


def check_inputs(settings: Settings) -> None:
    """Every input of a train.py run, checked at once: a UserError naming all that are missing."""
    missing = [missing_data("train", settings.data_dir, settings.train_file),
               missing_data("eval", settings.data_dir, settings.eval_file),
               None if settings.init == "random" else missing_model(settings.model),
               None if all((BPE_DIR / name).is_file() for name in BPE_FILES) else
               f"the tokenizer's files ({', '.join(BPE_FILES)} in {BPE_DIR}, which come with the repository)"]
    missing = [what for what in missing if what is not None]
    if missing:
        offline = " (HF_HUB_OFFLINE is set)" if constants.HF_HUB_OFFLINE else ""
        data_missing = any(what.startswith(("the training data", "the eval data")) for what in missing)
        data_help = f". {offline_help('train')}" if data_missing else ""
        raise UserError(f"{len(missing)} input(s) missing{offline}: {'; '.join(missing)}{data_help}")
