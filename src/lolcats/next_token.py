"""Next-token losses over the vocabulary without (positions × vocabulary) logits.

A causal LM's logits for a training batch are the largest tensor of a step: 4,096 positions of Gemma-3's
262k vocabulary are 4.3 GB in fp32, and cross-entropy or KL keep two or three more of that size for
backward. Here the LM head runs over a few positions at a time (``chunk_rows``, sized so that one chunk's
logits stay near 64 MB), the loss is accumulated in fp32, and the gradient with respect to the hidden states
is computed in the same pass (softmax minus target distribution, times the head's weight), so no chunk is
recomputed in backward and nothing of vocabulary size outlives its chunk. The result is exact, not an
approximation (tested against the full-logits losses).

The LM head is frozen in every lolcats stage; it runs in the model's dtype (as in the model's own forward)
and its logits are upcast to fp32 before the softmax.
"""

from __future__ import annotations

import torch
from torch import nn

CHUNK_ELEMENTS = 2**24  # fp32 logits per chunk: 64 MB


def output_head(model: nn.Module) -> tuple[nn.Linear, float | None]:
    """The model's LM head and its final logit soft-capping (Gemma 2 style), if any."""
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise ValueError(f"{type(model).__name__}: expected a linear LM head, got {type(head).__name__}")
    config = model.config.get_text_config(decoder=True)
    return head, getattr(config, "final_logit_softcapping", None)


def chunk_rows(vocab_size: int) -> int:
    return max(1, CHUNK_ELEMENTS // vocab_size)


def _logits(head: nn.Linear, hidden: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = head(hidden).float()
    if softcap:
        logits = softcap * torch.tanh(logits / softcap)
    return logits


class _HeadLoss(torch.autograd.Function):
    """Sum over rows of CE(targets) or KL(teacher ‖ student), with d(sum)/d(hidden) computed in forward."""

    @staticmethod
    def forward(ctx, hidden, head, softcap, targets, teacher_hidden, need_grad):
        rows = chunk_rows(head.out_features)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = torch.empty_like(hidden) if need_grad else None
        for begin in range(0, hidden.shape[0], rows):
            end = min(begin + rows, hidden.shape[0])
            logits = _logits(head, hidden[begin:end], softcap)
            log_probs = torch.log_softmax(logits, dim=-1)
            if teacher_hidden is None:
                target = targets[begin:end]
                total += -log_probs.gather(1, target[:, None]).sum()
            else:
                teacher_log_probs = torch.log_softmax(_logits(head, teacher_hidden[begin:end], softcap), dim=-1)
                teacher_probs = teacher_log_probs.exp()
                total += (teacher_probs * (teacher_log_probs - log_probs)).sum()
            if need_grad:
                # d loss / d logits = softmax(student) − target distribution (one-hot or the teacher's).
                grad_logits = log_probs.exp_()
                if teacher_hidden is None:
                    grad_logits[torch.arange(end - begin, device=hidden.device), target] -= 1
                else:
                    grad_logits -= teacher_probs
                if softcap:
                    grad_logits *= 1 - (logits / softcap).pow(2)
                grad[begin:end] = (grad_logits.to(head.weight.dtype) @ head.weight).to(hidden.dtype)
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (grad,) = ctx.saved_tensors
        return grad * grad_total.to(grad.dtype), None, None, None, None, None


def next_token_loss_sum(
    model: nn.Module,
    hidden: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    teacher_hidden: torch.Tensor | None = None,
) -> torch.Tensor:
    """Σ over the N rows of ``hidden`` (N, d: final hidden states at scored positions) of the cross-entropy
    of ``targets`` (N,), or, with ``teacher_hidden`` (N, d), of KL(teacher ‖ model) of the next-token
    distributions; fp32, differentiable with respect to ``hidden``."""
    if (targets is None) == (teacher_hidden is None):
        raise ValueError("give either targets (cross-entropy) or teacher_hidden (KL to the teacher)")
    head, softcap = output_head(model)
    need_grad = torch.is_grad_enabled() and hidden.requires_grad
    if torch.is_grad_enabled() and head.weight.requires_grad:
        raise ValueError("the chunked next-token losses train no LM head: freeze it (lolcats stages do)")
    hidden = hidden.contiguous()  # a frozen Linear on a strided input is several times slower on CPU
    if teacher_hidden is not None:
        teacher_hidden = teacher_hidden.detach().contiguous()
    return _HeadLoss.apply(hidden, head, softcap, targets, teacher_hidden, need_grad)


def final_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden states (after its final norm), what the LM head reads: (B, L, d)."""
    return model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
