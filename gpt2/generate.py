"""Batched greedy decoding with a KV cache."""
from collections.abc import Sequence

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
        new = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        for step in range(max_new_tokens):
            token = logits.argmax(dim=-1)  # (B,)
            new[:, step] = token
            done |= token == eos_id
            for s in stops:
                if step + 1 >= len(s):
                    done |= (new[:, step + 1 - len(s):step + 1] == s).all(dim=-1)
            if step + 1 == max_new_tokens or (step % STOP_CHECK_EVERY == STOP_CHECK_EVERY - 1 and done.all()):
                break
            logits = model(token[:, None], cache=cache)  # (B, V): one position per row
    finally:
        model.train(was_training)
    rows = new[:, :step + 1].tolist()
    return [_cut_at_stop(row, eos_id, [list(s) for s in stop_sequences]) for row in rows]


def _cut_at_stop(tokens: list[int], eos_id: int, stop_sequences: list[list[int]]) -> list[int]:
    """The tokens before the first EOS or stop sequence (a row keeps decoding after it stops, until all have)."""
    end = tokens.index(eos_id) if eos_id in tokens else len(tokens)
    for s in stop_sequences:
        starts = (i for i in range(len(tokens) - len(s) + 1) if tokens[i:i + len(s)] == s)
        end = min(end, next(starts, end))
    return tokens[:end]
