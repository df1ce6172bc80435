"""Token-level perplexity on a text file, with the BOS handling stated.

Protocols (``protocol=``):
  documents   each document (blank-line separated) is BOS + its tokens; documents are concatenated and cut
              into windows of ``seq_len`` tokens; every token but a window's first is predicted. This is
              the stories260k protocol of DEVELOPERS.md ("BOS-prefixed stories packed into 512-token
              windows"). Windows may span a story boundary, as in that protocol.
  per-document  each document is scored alone as BOS + its first ``seq_len`` − 1 tokens (the stories260k
              model card's protocol); no window mixes documents.
  bos-window  the file is one token stream (no special tokens; literal "<unk>" stays text); the first
              ``max_tokens`` are cut into windows of ``seq_len``, each scored as BOS + window, so every
              token is predicted. This is the Gemma protocol of shared/data/README.md.
ppl = exp(total NLL / predicted tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F

from ..data import read_documents

Protocol = Literal["documents", "per-document", "bos-window"]


@dataclass(frozen=True)
class PerplexityResult:
    ppl: float
    nll: float
    tokens: int


def _encode(tokenizer, text: str) -> list[int]:
    try:
        return tokenizer(text, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]
    except TypeError:
        return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def perplexity_windows(tokenizer, path: str | Path, *, seq_len: int, protocol: Protocol = "documents",
                       max_tokens: int | None = None) -> tuple[list[list[int]], int]:
    """The windows to score and how many leading tokens of each are context only (not predicted)."""
    bos = tokenizer.bos_token_id
    if protocol == "documents":
        stream: list[int] = []
        for document in read_documents(path):
            stream += ([bos] if bos is not None else []) + _encode(tokenizer, document.prompt + document.text)
        if max_tokens:
            stream = stream[:max_tokens]
        return [stream[i:i + seq_len] for i in range(0, len(stream), seq_len) if len(stream[i:i + seq_len]) > 1], 1
    if protocol == "per-document":
        prefix = [bos] if bos is not None else []
        windows = [(prefix + _encode(tokenizer, d.prompt + d.text))[:seq_len] for d in read_documents(path)]
        return [w for w in windows if len(w) > 1], 1
    if protocol == "bos-window":
        if bos is None:
            raise ValueError("the bos-window protocol needs a tokenizer with a BOS token")
        stream = _encode(tokenizer, Path(path).read_text())
        if max_tokens:
            stream = stream[:max_tokens]
        return [[bos] + stream[i:i + seq_len] for i in range(0, len(stream), seq_len)], 1
    raise ValueError(f"unknown perplexity protocol {protocol!r}; expected 'documents', 'per-document' or 'bos-window'")


@torch.no_grad()
def perplexity(model, tokenizer, path: str | Path, *, seq_len: int = 512, protocol: Protocol = "documents",
               max_tokens: int | None = None, batch_size: int = 4) -> PerplexityResult:
    windows, context = perplexity_windows(tokenizer, path, seq_len=seq_len, protocol=protocol, max_tokens=max_tokens)
    device = next(model.parameters()).device
    total_nll, total_tokens = 0.0, 0
    # Equal lengths batch without padding; the one short tail window runs alone.
    for length in sorted({len(w) for w in windows}):
        same = [w for w in windows if len(w) == length]
        for i in range(0, len(same), batch_size):
            ids = torch.tensor(same[i:i + batch_size], device=device)
            logits = model(input_ids=ids, use_cache=False).logits.float()
            nll = F.cross_entropy(logits[:, context - 1:-1].flatten(0, 1), ids[:, context:].flatten(), reduction="sum")
            total_nll += float(nll)
            total_tokens += ids[:, context:].numel()
    return PerplexityResult(ppl=math.exp(total_nll / total_tokens), nll=total_nll / total_tokens, tokens=total_tokens)
