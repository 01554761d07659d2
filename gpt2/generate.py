"""Batched greedy decoding with a KV cache, replayed as a CUDA graph on a GPU."""
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain

import torch

from .model import GPT, KVCache
from .tokenizer import EOS_ID

STOP_CHECK_EVERY = 4  # asking "is every row done?" waits for the GPU; ask every few tokens, not every token
# KV-cache slots are rounded up to a multiple of this: batches of similar prompt lengths (evaluate.py sorts them)
# then have the same shapes, and reuse one cache and one captured decoding graph instead of recording their own.
CACHE_SLOTS_ROUNDED_TO = 32


@torch.no_grad()
def generate(model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             stop_sequences: Sequence[Sequence[int]] = (), eos_id: int = EOS_ID,
             forbid_first: Sequence[Sequence[int]] = ()) -> list[list[int]]:
    """Greedy continuations of a batch of token-id prompts, of any lengths; returns the new tokens of each.

    A row stops at `eos_id` or at any of `stop_sequences`; neither is included in what is returned. Prompts are
    left-padded so that every row's next token sits in the same column: one forward pass per new token for the
    whole batch, each attending only to its own row's cached keys (see KVCache). `forbid_first`: for each prompt,
    token ids that may not be its first new token (their first-step logits become -inf), e.g. to rule out one
    answer's start.
    """
    was_training = model.training
    model.eval()
    try:
        cache, logits = _prefill(model, prompts, max_new_tokens)  # (B, V): the next token after each prompt
        for row, forbidden in enumerate(forbid_first):
            logits[row, list(forbidden)] = float("-inf")
        token = logits.argmax(dim=-1)  # (B,)
        decode = _decoder(model, cache, token) if max_new_tokens > 1 else None
        B, device = len(prompts), token.device
        new = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        stops = [torch.tensor(s, device=device) for s in stop_sequences]
        for step in range(max_new_tokens):
            new[:, step] = token
            done |= token == eos_id
            for s in stops:
                if step + 1 >= len(s):
                    done |= (new[:, step + 1 - len(s):step + 1] == s).all(dim=-1)
            if step + 1 == max_new_tokens or (step % STOP_CHECK_EVERY == STOP_CHECK_EVERY - 1 and done.all()):
                break
            token = decode(token).argmax(dim=-1)  # (B,): one position per row
    finally:
        model.train(was_training)
    rows = new[:, :step + 1].tolist()
    return [_cut_at_stop(row, eos_id, [list(s) for s in stop_sequences]) for row in rows]


@torch.no_grad()
def continuation_log_prob(model: GPT, prompts: Sequence[Sequence[int]], continuation: Sequence[int]) -> torch.Tensor:
    """log P(continuation | prompt) for every prompt, (B,) in fp32: the same tokens teacher-forced after each one.

    The sum over the continuation's tokens of log softmax(logits)[token], each given the prompt and the
    continuation's tokens before it. It runs on generate()'s path (left padding, KV cache): the prefill scores the
    first token, then the continuation's tokens go in one cached position per call, as generated tokens would.
    A continuation is a few tokens, so the prefill is nearly all the cost: about one forward pass over the prompts.
    """
    was_training = model.training
    model.eval()
    try:
        cache, logits = _prefill(model, prompts, len(continuation))
        total = torch.zeros(len(prompts), device=logits.device)
        for i, token in enumerate(continuation):
            total += logits.float().log_softmax(dim=-1)[:, token]
            if i + 1 < len(continuation):
                logits = model(torch.full((len(prompts), 1), token, device=logits.device), cache=cache)
    finally:
        model.train(was_training)
    return total


def _prefill(model: GPT, prompts: Sequence[Sequence[int]], new_tokens: int) -> tuple[KVCache, torch.Tensor]:
    """Run the left-padded prompts through the model in one pass; returns their KV cache, with room for
    `new_tokens` more positions, and the logits (B, V) of the token after each prompt."""
    limit = model.config.block_size
    if new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, not {new_tokens}")
    for i, p in enumerate(prompts):
        if not 0 < len(p) <= limit - new_tokens:
            raise ValueError(f"prompt {i} has {len(p)} tokens: with {new_tokens} new tokens it must have 1 to "
                             f"{limit - new_tokens} to fit the {limit}-token context; shorten it")
    device, dtype = model.transformer.wte.weight.device, model.transformer.wte.weight.dtype
    B, T = len(prompts), max(len(p) for p in prompts)
    idx = torch.full((B, T), EOS_ID, dtype=torch.long)  # padding: any token, it is never attended to
    for row, p in enumerate(prompts):
        idx[row, T - len(p):] = torch.tensor(p)
    pad = torch.tensor([T - len(p) for p in prompts], device=device)
    max_len = min(limit, -(-(T + new_tokens) // CACHE_SLOTS_ROUNDED_TO) * CACHE_SLOTS_ROUNDED_TO)
    cache = _reused_cache(model, pad, max_len, dtype)
    return cache, model(idx.to(device, non_blocking=True), cache=cache)


@dataclass
class _Decoding:
    """A model's last KV cache and, on a GPU, the decoding step captured on it, with what they were made for."""
    shape: tuple  # batch size, slots, dtype, and where the model's tensors were (a captured graph reads them there)
    cache: KVCache
    step: Callable[[torch.Tensor], torch.Tensor] | None = None


# One per model, held no longer than the model: the last batch shape only, so that memory stays one cache's.
_last_decoding: "weakref.WeakKeyDictionary[GPT, _Decoding]" = weakref.WeakKeyDictionary()


def _reused_cache(model: GPT, pad: torch.Tensor, max_len: int, dtype: torch.dtype) -> KVCache:
    """The model's last cache, emptied, if the last batch had these shapes (and the model's tensors have not
    moved); else a new one, which replaces it."""
    shape = (len(pad), max_len, dtype, tuple(t.data_ptr() for t in chain(model.parameters(), model.buffers())))
    last = _last_decoding.get(model)
    if last is not None and last.shape == shape:
        last.cache.reset(pad)
        return last.cache
    _last_decoding.pop(model, None)  # free the old cache (and graph) before allocating the new one
    cache = KVCache(model.config, pad, max_len=max_len, dtype=dtype)
    _last_decoding[model] = _Decoding(shape, cache)
    return cache


def _decoder(model: GPT, cache: KVCache, token: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """token (B,) -> next-token logits (B, V), one cached position per call.

    Each step is the same ~15 small kernels per layer on the same shapes, so on a GPU the time goes to launching
    them from Python rather than to running them. There the step is recorded once as a CUDA graph and replayed:
    one launch per token. A graph replays fixed memory, hence the static input buffer; the KV cache's state is
    on the device (KVCache), so replays advance it. The graph is kept with the cache it was recorded on, and the
    next batch of the same shapes, which reuses that cache, replays it too. On a CPU the step simply runs."""
    if token.device.type != "cuda":
        return lambda t: model(t[:, None], cache=cache)
    decoding = _last_decoding[model]
    if decoding.step is not None and decoding.cache is cache:  # recorded on this cache for an earlier batch
        return decoding.step
    static_token = token[:, None].clone()  # (B, 1)
    length = cache.length.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # a warm-up run first, off the main stream, as CUDA graphs require
        model(static_token, cache=cache)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_logits = model(static_token, cache=cache)
    cache.length.copy_(length)  # the warm-up (not the recording) advanced the cache; its slot is rewritten

    def step(t: torch.Tensor) -> torch.Tensor:
        static_token.copy_(t[:, None])
        graph.replay()
        return static_logits
    decoding.step = step
    return step


def _cut_at_stop(tokens: list[int], eos_id: int, stop_sequences: list[list[int]]) -> list[int]:
    """The tokens before the first EOS or stop sequence (a row keeps decoding after it stops, until all have)."""
    end = tokens.index(eos_id) if eos_id in tokens else len(tokens)
    for s in stop_sequences:
        starts = (i for i in range(len(tokens) - len(s) + 1) if tokens[i:i + len(s)] == s)
        end = min(end, next(starts, end))
    return tokens[:end]
