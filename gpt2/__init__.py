"""GPT-2 from scratch: the model, its official weights, its tokenizer, and greedy generation."""
from .errors import UserError
from .generate import generate
from .model import GPT, PRESETS, GPTConfig, KVCache, preset
from .pretrained import load_model
from .tokenizer import EOS_ID, get_tokenizer

__all__ = ["GPT", "GPTConfig", "PRESETS", "KVCache", "preset", "load_model", "generate", "get_tokenizer", "EOS_ID",
           "UserError"]
