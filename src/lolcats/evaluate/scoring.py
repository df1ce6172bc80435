"""Log-likelihood of continuations given contexts, batched: the one primitive every task is scored with.

Tokenisation follows lm-evaluation-harness: trailing whitespace of the context moves to the
continuation, the pair is encoded whole and the context's tokens are cut off the front, so a
continuation's tokens are exactly those it gets inside the full text. Every context starts with BOS
when the tokenizer has one (all models lolcats supports are trained with it); a context too long for
``max_length`` loses tokens on the left, and a continuation longer than ``max_length`` by itself keeps only
its last tokens (flagged in the score, counted in task results). Batches are left-padded with position ids counted from each
row's first real token, and only the continuation positions go through the LM head, so batched scores
equal one-at-a-time scores up to float rounding (tested).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .perplexity import next_token_nll, rolling_windows, window_batches


@dataclass(frozen=True)
class Score:
    loglikelihood: float  # sum over the continuation's tokens
    is_greedy: bool  # every continuation token is the argmax given its prefix
    tokens: int  # continuation tokens scored
    truncated: bool = False  # the continuation alone was longer than max_length: only its last tokens scored


def encode(tokenizer, text: str) -> list[int]:
    if not text:
        return []
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encode(tokenizer, context + continuation)
    context_ids = encode(tokenizer, context)
    continuation_ids = whole[len(context_ids):]
    start = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    if not start and not context_ids:
        start = [tokenizer.eos_token_id]
    return start + context_ids, continuation_ids


# One forward's logits (rows × length × vocabulary) stay under this many elements (fp32: 128 MiB) when a caller
# sizes its batches with ``rows_per_forward``.
MAX_LOGIT_ELEMENTS = 2 ** 25


def vocab_size(model) -> int:
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None:
        return head.weight.shape[0]
    return model.config.get_text_config(decoder=True).vocab_size


def rows_per_forward(model, length: int, most: int, least: int = 1) -> int:
    """Sequences of ``length`` tokens to run per forward: up to ``most`` while their logits fit
    ``MAX_LOGIT_ELEMENTS``, never fewer than ``least`` (nor than 1). Fewer, larger forwards matter for a
    linearized model, whose forward is several thousand small ops whatever the batch."""
    fit = MAX_LOGIT_ELEMENTS // max(1, length * vocab_size(model))
    return max(1, least, min(most, fit))


def model_max_length(model, default: int = 2048) -> int:
    config = model.config.get_text_config(decoder=True)
    return min(getattr(config, "max_position_embeddings", None) or default, default)


@torch.no_grad()
def score_token_pairs(model, pairs: list[tuple[list[int], list[int]]], *, batch_size: int = 8,
                      max_length: int | None = None) -> list[Score]:
    """Scores of (context ids, continuation ids) pairs, in the order given."""
    max_length = max_length or model_max_length(model)
    device = next(model.parameters()).device
    rows = []  # (inputs, continuation) per pair
    truncated = []
    for context, continuation in pairs:
        if not continuation:
            raise ValueError("cannot score an empty continuation")
        truncated.append(len(continuation) > max_length)
        continuation = continuation[-max_length:]
        ids = (context + continuation)[-(max_length + 1):]
        rows.append((ids[:-1], continuation))
    # Pairs with the same inputs share one forward (a multiple-choice item whose choices are single tokens, such as
    # MMLU's " A" ... " D", is one row, not four): the logits of a row do not depend on what is scored from them.
    sequences: dict[tuple[int, ...], list[int]] = {}
    for index, (inputs, _) in enumerate(rows):
        sequences.setdefault(tuple(inputs), []).append(index)
    unique = list(sequences.items())
    # Longest first, so each batch pads little and the first batch shows the peak memory.
    order = sorted(range(len(unique)), key=lambda i: -len(unique[i][0]))
    scores: list[Score | None] = [None] * len(rows)
    for begin in range(0, len(order), batch_size):
        batch = [unique[i] for i in order[begin:begin + batch_size]]
        width = max(len(inputs) for inputs, _ in batch)
        keep = max(len(rows[member][1]) for _, members in batch for member in members)
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)
        attention_mask = torch.zeros(len(batch), width, dtype=torch.long)
        for row, (inputs, _) in enumerate(batch):
            input_ids[row, width - len(inputs):] = torch.tensor(inputs)
            attention_mask[row, width - len(inputs):] = 1
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        # Indices rather than a count: transformers then hands the LM head a contiguous copy of the kept
        # positions, and a strided input makes a frozen (requires_grad=False) Linear several times slower on CPU.
        kept = torch.arange(width - keep, width, device=device)
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                       position_ids=position_ids.to(device), use_cache=False, logits_to_keep=kept).logits
        log_probs = torch.log_softmax(logits.float(), dim=-1)  # (B, keep, V): only the last `keep` positions
        for row, (_, members) in enumerate(batch):
            for member in members:
                continuation = rows[member][1]
                target = torch.tensor(continuation, device=device)
                row_log_probs = log_probs[row, keep - len(continuation):]
                picked = row_log_probs.gather(-1, target[:, None]).squeeze(-1)
                scores[member] = Score(
                    loglikelihood=float(picked.sum()),
                    is_greedy=bool((row_log_probs.argmax(-1) == target).all()),
                    tokens=len(continuation),
                    truncated=truncated[member],
                )
    return scores


def score_pairs(model, tokenizer, pairs: list[tuple[str, str]], *, batch_size: int = 8,
                max_length: int | None = None) -> list[Score]:
    """Scores of (context, continuation) strings."""
    return score_token_pairs(model, [encode_pair(tokenizer, c, x) for c, x in pairs], batch_size=batch_size,
                             max_length=max_length)


def rolling_loglikelihood(model, token_ids: list[int], *, seq_len: int, stride: int | None = None,
                          batch_size: int = 4) -> tuple[float, int]:
    """(total log-likelihood, predicted tokens) of a token stream scored by sliding windows
    (perplexity.rolling_windows: every token after the first predicted once), ``batch_size`` windows a forward."""
    total_nll, count = next_token_nll(model, window_batches(rolling_windows(token_ids, seq_len=seq_len, stride=stride),
                                                            batch_size))
    return -total_nll, count
