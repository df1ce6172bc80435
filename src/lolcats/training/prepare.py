"""The teacher and its data, ready for training: load the base model (and its fingerprint), read, tokenize
and split the documents (held-out documents never train), sampling the demo data for the embedded default."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..artifacts import fingerprint
from ..data import count_tokens, pack_stream, pad_id_for, read_documents, split_held_out, tokenize_documents
from ..models import DEFAULT_MODEL, dtype_name, load_base_model, load_tokenizer
from . import distributed
from .config import RunConfig
from .demo_data import default_data


@dataclass
class Prepared:
    """A loaded teacher and its tokenized data, split into training and held-out examples."""

    model: torch.nn.Module
    tokenizer: object
    base_fingerprint: dict
    train: list
    held: list
    pad_id: int
    data_files: list[str]
    eval_files: list[str]
    documents: int


def prepare(run: RunConfig, echo: Callable[[str], None] = print) -> Prepared:
    torch.manual_seed(run.seed)
    dtype = run.torch_dtype()
    echo(f"loading {run.model} ({dtype_name(dtype)})")
    tokenizer = load_tokenizer(run.model)
    model = load_base_model(run.model, dtype=dtype).to(distributed.training_device())
    base_fingerprint = fingerprint(model)

    data_files, eval_files = list(run.data), list(run.eval_text)
    if not data_files:
        if run.model != DEFAULT_MODEL:
            raise ValueError("--data is required unless the model is the embedded default")
        if not distributed.is_main():
            distributed.barrier()  # rank 0 samples (or finds) the demo data first; the others read its cache
        train_file, held_file = default_data(model, tokenizer, base_fingerprint["weights_sha256"], echo=echo)
        if distributed.is_main():
            distributed.barrier()
        data_files, eval_files = [str(train_file)], eval_files or [str(held_file)]

    documents = [doc for path in data_files for doc in read_documents(path)]
    examples = tokenize_documents(documents, tokenizer, run.seq_len, add_eos=run.add_eos)
    held_out = int(run.held_out) if run.held_out >= 1 else run.held_out
    train, held = split_held_out(examples, held_out, run.seed)
    if run.packing == "stream":
        train, held = pack_stream(train, run.seq_len, run.seed), pack_stream(held, run.seq_len, run.seed)
    echo(f"data: {len(documents)} documents, {count_tokens(train):,} training tokens, {count_tokens(held):,} held out")
    return Prepared(model, tokenizer, base_fingerprint, train, held, pad_id_for(tokenizer), data_files, eval_files,
                    len(documents))
