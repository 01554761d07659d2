"""Cross-entropy through the output head, without the memory of a textbook implementation.

The head turns each hidden state (C numbers) into V = 50,257 logits. For a batch of 16 x 512 tokens that is a
(8192, 50257) matrix: 0.8 GB in bf16. `F.cross_entropy(logits.float(), ...)` then makes an fp32 copy (1.6 GB),
saves its log-softmax for the backward pass (1.6 GB more) and produces a gradient of the same size: several
times the memory of the whole GPT-2 124M activations.

This function keeps only the logits themselves. The softmax is computed in fp32 in slices, and the backward pass
writes the gradient (softmax - one_hot(target)) into the logits' own memory, slice by slice. The head's weight is
the frozen token embedding, so no weight gradient is needed: just (N, V) @ (V, C) back to the hidden states.
"""
import torch

ROWS_PER_SLICE = 2048  # fp32 temporaries of 2048 x 50257: 0.4 GB


class HeadCrossEntropy(torch.autograd.Function):
    """sum_i cross_entropy(hidden[i] @ weight.T, targets[i]), computed in weight's dtype with fp32 softmax.

    hidden (N, C), weight (V, C), targets (N,) -> a scalar. Supports one backward pass (it reuses its buffers)."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = hidden.to(weight.dtype) @ weight.T  # (N, V)
        lse = torch.cat([s.float().logsumexp(dim=-1) for s in logits.split(ROWS_PER_SLICE)])  # (N,) log sum exp
        target_logits = logits.gather(1, targets[:, None]).squeeze(1).float()  # (N,)
        ctx.save_for_backward(hidden, weight, targets, logits, lse)
        return (lse - target_logits).sum()  # -log softmax(logits)[target], summed

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor):
        hidden, weight, targets, logits, lse = ctx.saved_tensors
        for logit_slice, lse_slice, target_slice in zip(logits.split(ROWS_PER_SLICE), lse.split(ROWS_PER_SLICE),
                                                        targets.split(ROWS_PER_SLICE)):
            grad = torch.exp(logit_slice.float() - lse_slice[:, None])  # softmax, (rows, V) in fp32
            grad[torch.arange(len(grad), device=grad.device), target_slice] -= 1.0  # - one_hot(target)
            logit_slice.copy_(grad * grad_loss)  # the logits' memory now holds d loss / d logits
        grad_hidden = (logits @ weight).to(hidden.dtype)  # (N, C)
        grad_weight = logits.T @ hidden.to(weight.dtype) if ctx.needs_input_grad[1] else None  # (V, C)
        return grad_hidden, grad_weight, None


# Under torch.compile this runs as written, outside the compiled graph: the number of slices depends on the batch's
# target count, and a compiled loop over them would be compiled again for every new count. Its work is the two
# large matmuls and the softmax slices, which the compiler would not make faster.
@torch.compiler.disable
def head_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return HeadCrossEntropy.apply(hidden, weight, targets)
