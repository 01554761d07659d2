"""GPT-2 from scratch: the model, its official weights, its tokenizer, and greedy generation."""
from .errors import UserError
from .generate import continuation_log_prob, generate
from .model import GPT, PRESETS, GPTConfig, KVCache, preset
from .pretrained import from_pretrained, load_model, save_pretrained
from .tokenizer import EOS_ID, get_tokenizer

__all__ = ["GPT", "GPTConfig", "PRESETS", "KVCache", "preset", "load_model", "from_pretrained", "save_pretrained",
           "generate", "continuation_log_prob", "get_tokenizer", "EOS_ID", "UserError"]
