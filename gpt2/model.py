"""GPT-2 in one file: the configuration, the transformer, and its forward pass.

Module names mirror OpenAI's checkpoint (`transformer.h.0.attn.c_attn`, ...), so the official weights load by
name and LoRA targets (`c_attn`, `c_proj`, `c_fc`) are the names a reader sees in the checkpoint.
Shapes in comments: B batch, T sequence length, C embedding width (n_embd), nh heads, hs head size (C // nh),
V vocabulary size.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import UserError
from .loss import head_cross_entropy


@dataclass
class GPTConfig:
    n_layer: int
    n_head: int
    n_embd: int
    vocab_size: int = 50257
    block_size: int = 1024  # the context window: learned position embeddings exist for 1024 positions
    dropout: float = 0.0  # on embeddings, attention probabilities and residual branches (GPT-2 trained with 0.1)


PRESETS = {
    "gpt2": GPTConfig(n_layer=12, n_head=12, n_embd=768),  # 124M parameters
    "gpt2-medium": GPTConfig(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": GPTConfig(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": GPTConfig(n_layer=48, n_head=25, n_embd=1600),  # 1558M
    # Not a released model: the real vocabulary and context on a toy body, for tests and CPU smoke runs.
    "gpt2-tiny": GPTConfig(n_layer=2, n_head=4, n_embd=64),
}


def preset(name: str) -> GPTConfig:
    """A copy of a named configuration (copies, so callers may change `dropout`)."""
    if name not in PRESETS:
        raise UserError(f"unknown model {name!r}: choose one of {', '.join(PRESETS)}, or give a checkpoint directory")
    return GPTConfig(**vars(PRESETS[name]))


class KVCache:
    """Keys and values of every layer for the tokens seen so far, so that each new token costs one position.

    Prompts of different lengths share a batch by left padding: row b's first `pad[b]` positions are padding.
    The buffers are allocated once at full size, and attention always reads all `max_len` slots, masking the ones
    not filled yet. `length` (how many slots are filled) lives on the device. So a decoding step has the same
    shapes every time and keeps no state in Python: on a GPU it can be recorded once as a CUDA graph and replayed
    for every new token (see generate.py).
    """

    def __init__(self, config: GPTConfig, pad: torch.Tensor, max_len: int, dtype: torch.dtype):
        hs = config.n_embd // config.n_head
        shape = (config.n_layer, len(pad), config.n_head, max_len, hs)  # (L, B, nh, max_len, hs)
        # Zeros, not empty: a masked slot gets attention weight 0, and 0 x (NaN left in fresh memory) is NaN.
        self.k = torch.zeros(shape, device=pad.device, dtype=dtype)
        self.v = torch.zeros(shape, device=pad.device, dtype=dtype)
        self.pad = pad  # (B,) number of padding positions on the left of each row
        self.length = torch.zeros((), dtype=torch.long, device=pad.device)  # slots filled so far
        self.slots = torch.arange(max_len, device=pad.device)  # (max_len,)

    def reset(self, pad: torch.Tensor) -> None:
        """Empty the cache for a new batch of the same size, in place: the same memory, so that a decoding step
        recorded on it as a CUDA graph can be replayed for the new batch too."""
        self.k.zero_()
        self.v.zero_()
        self.pad.copy_(pad)
        self.length.zero_()

    def next_slots(self, T: int) -> torch.Tensor:
        """The slots the next T tokens go into, (T,)."""
        return self.length + self.slots[:T]

    def positions_and_mask(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Position ids (B, T) of the next T tokens, and which slots each may attend to (B, 1, T, max_len)."""
        query = self.next_slots(T)  # (T,) the slot of each query
        key = self.slots  # (max_len,)
        positions = (query[None, :] - self.pad[:, None]).clamp(min=0)  # a row's first real token is position 0
        causal = key[None, :] <= query[:, None]  # (T, max_len): filled slots up to the query's own
        real = key[None, :] >= self.pad[:, None]  # (B, max_len): padding keys are never attended to...
        itself = key[None, :] == query[:, None]  # ...except by padding queries, to themselves, so no row is empty
        mask = causal[None] & (real[:, None, :] | itself[None])  # (B, T, max_len)
        return positions, mask[:, None]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # fused query | key | value projections
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)  # output projection
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None, layer: int = 0,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if cache is None:
            # Training and plain scoring: causal attention over this sequence; SDPA picks flash attention on GPU.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                               dropout_p=self.dropout if self.training else 0.0)
        else:
            slots = cache.next_slots(T)
            cache.k[layer].index_copy_(2, slots, k)  # (B, nh, max_len, hs) <- this call's keys at their slots
            cache.v[layer].index_copy_(2, slots, v)
            y = F.scaled_dot_product_attention(q, cache.k[layer], cache.v[layer], attn_mask=mask)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))  # GPT-2 used tanh GELU


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=1e-5)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, cache: Optional[KVCache] = None, layer: int = 0,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), cache, layer, mask)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),  # token embeddings
            wpe=nn.Embedding(config.block_size, config.n_embd),  # position embeddings
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=1e-5),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied: the output head reuses the token embeddings
        self.apply(self._init_weights)
        # GPT-2 scales the projections that write into the residual stream by 1/sqrt(number of residual
        # additions), so the stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None,
                target_positions: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None) -> torch.Tensor:
        """Three uses, one body:

        - `model(idx)`: logits (B, T, V) for every position.
        - `model(idx, targets, target_positions)`: the SUM of the cross-entropies of predicting `targets` (N,)
          at `target_positions` (N,), flat indices into the B*T positions. The output head (the largest matmul)
          runs only there: padding and positions without loss cost nothing (loss.py keeps its memory small).
          A sum, so that the caller can divide by the number of target tokens in a whole optimizer step
          (exact gradient accumulation).
        - `model(idx, cache=cache)`: generation. Attends to the cached keys, appends this call's, and returns only
          the next-token logits (B, V) of the last position.
        """
        B, T = idx.size()
        if cache is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens exceeds the context window of {self.config.block_size}")
            positions, mask = torch.arange(T, device=idx.device), None
        else:
            positions, mask = cache.positions_and_mask(T)
        x = self.transformer.wte(idx) + self.transformer.wpe(positions)  # (B, T, C)
        x = self.transformer.drop(x)
        for layer, block in enumerate(self.transformer.h):
            x = block(x, cache, layer, mask)
        x = self.transformer.ln_f(x)  # (B, T, C)
        if cache is not None:
            cache.length.add_(T)  # in place: a recorded CUDA graph advances it on every replay
            return self.lm_head(x[:, -1])  # (B, V)
        if targets is None:
            return self.lm_head(x)  # (B, T, V)
        hidden = x.view(B * T, -1).index_select(0, target_positions)  # (N, C)
        return head_cross_entropy(hidden, self.lm_head.weight, targets)  # = F.cross_entropy(lm_head(hidden), ...)
