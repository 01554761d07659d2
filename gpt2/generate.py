"""Batched greedy decoding with a KV cache, replayed as a CUDA graph on a GPU."""
from collections.abc import Callable, Sequence

import torch

from .model import GPT, KVCache
from .tokenizer import EOS_ID

STOP_CHECK_EVERY = 4  # asking "is every row done?" waits for the GPU; ask every few tokens, not every token


@torch.no_grad()
def generate(model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int,
             stop_sequences: Sequence[Sequence[int]] = (), eos_id: int = EOS_ID) -> list[list[int]]:
    """Greedy continuations of a batch of token-id prompts, of any lengths; returns the new tokens of each.

    A row stops at `eos_id` or at any of `stop_sequences`; neither is included in what is returned. Prompts are
    left-padded so that every row's next token sits in the same column: one forward pass per new token for the
    whole batch, each attending only to its own row's cached keys (see KVCache).
    """
    limit = model.config.block_size
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, not {max_new_tokens}")
    for i, p in enumerate(prompts):
        if not 0 < len(p) <= limit - max_new_tokens:
            raise ValueError(f"prompt {i} has {len(p)} tokens: with {max_new_tokens} new tokens it must have 1 to "
                             f"{limit - max_new_tokens} to fit the {limit}-token context; shorten it")
    device, dtype = model.transformer.wte.weight.device, model.transformer.wte.weight.dtype
    B, T = len(prompts), max(len(p) for p in prompts)
    idx = torch.full((B, T), EOS_ID, dtype=torch.long)  # padding: any token, it is never attended to
    for row, p in enumerate(prompts):
        idx[row, T - len(p):] = torch.tensor(p)
    pad = torch.tensor([T - len(p) for p in prompts], device=device)
    stops = [torch.tensor(s, device=device) for s in stop_sequences]

    was_training = model.training
    model.eval()
    try:
        cache = KVCache(model.config, pad, max_len=T + max_new_tokens, dtype=dtype)
        logits = model(idx.to(device, non_blocking=True), cache=cache)  # (B, V): prefill the whole prompts
        token = logits.argmax(dim=-1)  # (B,)
        decode = _decoder(model, cache, token) if max_new_tokens > 1 else None
        new = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
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


def _decoder(model: GPT, cache: KVCache, token: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """token (B,) -> next-token logits (B, V), one cached position per call.

    Each step is the same ~15 small kernels per layer on the same shapes, so on a GPU the time goes to launching
    them from Python rather than to running them. There the step is recorded once as a CUDA graph and replayed:
    one launch per token. A graph replays fixed memory, hence the static input buffer; the KV cache's state is
    on the device (KVCache), so replays advance it. On a CPU the step simply runs."""
    if token.device.type != "cuda":
        return lambda t: model(t[:, None], cache=cache)
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
    return step


def _cut_at_stop(tokens: list[int], eos_id: int, stop_sequences: list[list[int]]) -> list[int]:
    """The tokens before the first EOS or stop sequence (a row keeps decoding after it stops, until all have)."""
    end = tokens.index(eos_id) if eos_id in tokens else len(tokens)
    for s in stop_sequences:
        starts = (i for i in range(len(tokens) - len(s) + 1) if tokens[i:i + len(s)] == s)
        end = min(end, next(starts, end))
    return tokens[:end]
