"""GPT-2's byte-level BPE tokenizer: tiktoken's fast encoder, built from the two BPE files this repository ships.

GPT-2's tokenizer is two files (gpt2/bpe/, from OpenAI's gpt-2 repository; the Hub's merges.txt and vocab.json
are the same two): `vocab.bpe` lists the 50,000 merges in the order they were learned ("Ġ t" first: a space, then
"t"), and `encoder.json` maps each token to its id. A token's id is also its merge rank: the 256 single bytes
come first, then one token per merge. tiktoken needs exactly that map, token bytes -> rank, so no download and
no cache are involved: the encoding works on a fresh clone without network.
"""
import functools
import json
from pathlib import Path

import tiktoken

EOS_ID = 50256  # <|endoftext|>: GPT-2's only special token; it also serves as padding
BPE_DIR = Path(__file__).with_name("bpe")
BPE_FILES = ("vocab.bpe", "encoder.json")
# How GPT-2 splits text into words before BPE (tiktoken's r50k pattern): contractions, letters, digits, other
# symbols, each with its leading space; BPE never merges across these pieces.
SPLIT_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def byte_of_char() -> dict[str, int]:
    """The files write each byte as one printable character: printable bytes as themselves, the 68 others (space,
    control bytes, ...) as chr(256), chr(257), ... in byte order, so that "Ġ" (chr(288)) is a space. The
    dictionary's order is the single bytes' ranks, 0 to 255."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + n): b for n, b in enumerate(others)}


def mergeable_ranks() -> dict[bytes, int]:
    """token bytes -> rank, from the merges; checked against encoder.json's ids, which must be the same numbers."""
    byte_of = byte_of_char()

    def to_bytes(token: str) -> bytes:
        return bytes(byte_of[c] for c in token)
    ranks = {bytes([b]): rank for rank, b in enumerate(byte_of.values())}
    merges = (BPE_DIR / "vocab.bpe").read_text(encoding="utf-8").split("\n")[1:-1]  # line 1: "#version: 0.2"
    for merge in merges:
        first, second = merge.split()
        ranks[to_bytes(first) + to_bytes(second)] = len(ranks)
    ids = json.loads((BPE_DIR / "encoder.json").read_text(encoding="utf-8"))
    if {to_bytes(token): i for token, i in ids.items() if i != EOS_ID} != ranks:
        raise ValueError(f"{BPE_DIR}: vocab.bpe and encoder.json are not the same tokenizer")
    return ranks


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """tiktoken's "gpt2" encoding, token for token (tests/test_offline.py), built once per process."""
    return tiktoken.Encoding("gpt2", pat_str=SPLIT_PATTERN, mergeable_ranks=mergeable_ranks(),
                             special_tokens={"<|endoftext|>": EOS_ID}, explicit_n_vocab=EOS_ID + 1)
