"""GPT-2's byte-level BPE tokenizer, through tiktoken."""
import functools

import tiktoken

from .errors import UserError

EOS_ID = 50256  # <|endoftext|>: GPT-2's only special token; it also serves as padding


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken downloads its BPE files on first use
        raise UserError(f"could not load tiktoken's gpt2 encoding ({e}). Offline, set TIKTOKEN_CACHE_DIR to a "
                        f"folder holding its cached files (this repository's tests use ../shared/tiktoken_cache)") \
            from None
