"""A fresh clone works without network: the tokenizer comes from the repository's own BPE files."""
import tiktoken

from conftest import DEV_FILE
from gpt2 import EOS_ID, get_tokenizer


def test_the_shipped_bpe_files_build_tiktokens_gpt2_encoding():
    ours, theirs = get_tokenizer(), tiktoken.get_encoding("gpt2")  # theirs: from TIKTOKEN_CACHE_DIR (conftest)
    assert ours.n_vocab == theirs.n_vocab == 50257
    assert all(ours.decode_single_token_bytes(i) == theirs.decode_single_token_bytes(i) for i in range(50257))
    assert ours.encode("Hello world") == [15496, 995]
    text = DEV_FILE.read_text(encoding="utf-8")[:200_000]  # contexts, questions, JSON punctuation, unicode
    assert ours.encode_ordinary(text) == theirs.encode_ordinary(text)
    assert ours.encode("a<|endoftext|>", allowed_special="all") == [64, EOS_ID]
