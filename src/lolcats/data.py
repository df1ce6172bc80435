"""Text and jsonl files -> tokens -> document-aligned, left-padded training batches.

Every example comes from exactly one document, so neither attention nor loss ever crosses a document boundary
(linear attention carries state across the whole row, so packing unrelated documents would leak). Batches are
left padded, which keeps the last real token of every row at the same position for generation-style use, and
everything that is shuffled is shuffled by a seeded ``torch.Generator`` so a resumed run sees the same batches.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from .jsonl import jsonl_objects

IGNORE_INDEX = -100
PROMPT_TEMPLATE = "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
PROMPT_TEMPLATE_NO_INPUT = "### Instruction:\n{instruction}\n\n### Response:\n"
_GROUP_BATCHES = 64  # length-sorting window, in batches' worth of tokens: less padding, still well mixed


class DataError(ValueError):
    """A data file that cannot be used; the message names the file (and the 1-based line for jsonl)."""


@dataclass(frozen=True)
class Document:
    text: str  # plain text, or the response of an instruction example
    prompt: str = ""  # gets no loss; "" for plain text


@dataclass(frozen=True)
class Example:
    input_ids: tuple[int, ...]
    labels: tuple[int, ...]  # unshifted (the model shifts); IGNORE_INDEX where no loss
    document: int = 0  # index of the source document, so a held-out split can keep its pieces together


@dataclass(frozen=True, eq=False)
class Batch:
    input_ids: torch.Tensor  # (B, T) long, left padded
    attention_mask: torch.Tensor  # (B, T) long, 0 on padding
    labels: torch.Tensor  # (B, T) long, IGNORE_INDEX on padding

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())


def _document_from_json(obj: object, where: str) -> Document:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "text" in obj and "instruction" in obj:
        raise DataError(f"{where}: has both 'text' and 'instruction'; use one form")
    if "text" in obj:
        if not isinstance(obj["text"], str):
            raise DataError(f"{where}: 'text' must be a string")
        return Document(text=obj["text"])
    if "instruction" not in obj or "output" not in obj:
        raise DataError(f"{where}: expected {{'text': ...}} or {{'instruction': ..., 'output': ...}}")
    fields = {key: obj.get(key, "") for key in ("instruction", "input", "output")}
    for key, value in fields.items():
        if not isinstance(value, str):
            raise DataError(f"{where}: '{key}' must be a string")
    template = PROMPT_TEMPLATE if fields["input"].strip() else PROMPT_TEMPLATE_NO_INPUT
    return Document(text=fields["output"], prompt=template.format(instruction=fields["instruction"], input=fields["input"]))


def read_documents(path: str | Path) -> list[Document]:
    """Documents of a ``.jsonl`` file (one object a line) or of a text file (separated by blank lines)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: no such data file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read as UTF-8 text: {error}") from None
    if path.suffix.lower() == ".jsonl":
        documents = [_document_from_json(obj, where) for where, obj in jsonl_objects(path, DataError)]
    else:
        documents = [Document(text=part.strip()) for part in re.split(r"\n\s*\n", text) if part.strip()]
    if not documents:
        raise DataError(f"{path}: contains no documents")
    return documents


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids without special tokens. ``split_special_tokens`` keeps literal "<bos>" in text from becoming a
    control token (Gemma would otherwise parse it); tokenizers that do not know the argument get the plain call."""
    if not texts:
        return []
    try:
        return tokenizer(texts, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]
    except TypeError:
        return tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]


def tokenize_documents(documents: Sequence[Document], tokenizer, seq_len: int, *, add_eos: bool = False) -> list[Example]:
    """One example per document, or consecutive pieces of at most ``seq_len`` tokens for longer ones.

    Only the first piece starts with BOS. Pieces too short to train on (< 2 tokens) or with no loss at all
    are dropped, so every example contributes something."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    prompts = _encode(tokenizer, [doc.prompt for doc in documents])
    texts = _encode(tokenizer, [doc.text for doc in documents])
    examples = []
    for index, (prompt, text) in enumerate(zip(prompts, texts)):
        head = ([bos] if bos is not None else []) + list(prompt)
        tail = list(text) + ([eos] if add_eos and eos is not None else [])
        ids = head + tail
        labels = [IGNORE_INDEX] * len(head) + tail
        for start in range(0, len(ids), seq_len):
            piece_ids, piece_labels = ids[start:start + seq_len], labels[start:start + seq_len]
            if len(piece_ids) >= 2 and any(label != IGNORE_INDEX for label in piece_labels):
                examples.append(Example(tuple(piece_ids), tuple(piece_labels), document=index))
    return examples


def split_held_out(examples: Sequence[Example], held_out: float | int, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, held) with whole documents on each side, so no held-out text was seen in training.

    ``held_out`` is a fraction (0 < f < 1) or a count (int >= 1) of examples; documents are taken in a seeded
    random order until the held-out side has at least that many examples. Both sides keep the input order."""
    is_count = isinstance(held_out, int) and not isinstance(held_out, bool) and held_out >= 1
    if not (is_count or (isinstance(held_out, float) and 0 < held_out < 1)):
        raise ValueError(f"held_out must be a fraction in (0, 1) or a count >= 1, got {held_out!r}")
    target = held_out if is_count else max(1, round(held_out * len(examples)))
    sizes = Counter(example.document for example in examples)
    documents = sorted(sizes)
    order = torch.randperm(len(documents), generator=torch.Generator().manual_seed(seed)).tolist()
    held_docs, held_count = set(), 0
    for position in order:
        if held_count >= target:
            break
        held_docs.add(documents[position])
        held_count += sizes[documents[position]]
    train = [example for example in examples if example.document not in held_docs]
    held = [example for example in examples if example.document in held_docs]
    if not train or not held:
        raise ValueError(f"held_out={held_out} leaves {len(train)} training and {len(held)} held-out examples "
                         f"from {len(documents)} documents; both sides need at least one")
    return train, held


def pack_stream(examples: Sequence[Example], seq_len: int, seed: int) -> list[Example]:
    """Concatenate whole documents (in a seeded order) and cut the stream into rows of ``seq_len`` tokens.

    This is the explicit opt-in (``packing: stream``) to let attention run across document boundaries, the
    way models pretrained on packed text (BOS-separated documents) saw their data; it matches evaluation
    protocols that pack documents into fixed windows. Each document still starts with its BOS.
    """
    by_document: dict[int, list[Example]] = {}
    for example in examples:
        by_document.setdefault(example.document, []).append(example)
    documents = sorted(by_document)
    order = torch.randperm(len(documents), generator=torch.Generator().manual_seed(seed)).tolist()
    ids: list[int] = []
    labels: list[int] = []
    for position in order:
        for example in by_document[documents[position]]:
            ids += example.input_ids
            labels += example.labels
    rows = []
    for row, start in enumerate(range(0, len(ids), seq_len)):
        if len(ids[start:start + seq_len]) >= 2:
            rows.append(Example(tuple(ids[start:start + seq_len]), tuple(labels[start:start + seq_len]), document=row))
    return rows


def count_tokens(examples: Sequence[Example]) -> int:
    return sum(len(example.input_ids) for example in examples)


def pad_id_for(tokenizer) -> int:
    """Any valid id will do: padding is masked out of attention and loss, it only has to embed."""
    for candidate in (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def _plan_batches(examples: Sequence[Example], batch_tokens: int, seed: int, epoch: int) -> list[list[int]]:
    """Example indices of each batch for one epoch: shuffle, sort by length within windows of about 64 batches
    (so rows of a batch have similar lengths and little padding), fill greedily, then shuffle the batches."""
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens must be positive, got {batch_tokens}")
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(examples), generator=generator).tolist()
    groups, group, group_tokens = [], [], 0
    for index in order:
        group.append(index)
        group_tokens += len(examples[index].input_ids)
        if group_tokens >= _GROUP_BATCHES * batch_tokens:
            groups.append(group)
            group, group_tokens = [], 0
    if group:
        groups.append(group)
    plan = []
    for group in groups:
        batch: list[int] = []
        for index in sorted(group, key=lambda i: len(examples[i].input_ids)):  # stable: ties keep shuffled order
            if batch and (len(batch) + 1) * len(examples[index].input_ids) > batch_tokens:
                plan.append(batch)
                batch = []
            batch.append(index)
        if batch:
            plan.append(batch)
    return [plan[i] for i in torch.randperm(len(plan), generator=generator).tolist()]


def _collate(rows: Sequence[Example], pad_id: int) -> Batch:
    width = max(len(row.input_ids) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, example in enumerate(rows):
        start = width - len(example.input_ids)
        input_ids[row, start:] = torch.tensor(example.input_ids, dtype=torch.long)
        labels[row, start:] = torch.tensor(example.labels, dtype=torch.long)
        attention_mask[row, start:] = 1
    return Batch(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def make_batches(examples: Sequence[Example], *, batch_tokens: int, seed: int, epoch: int, pad_id: int) -> list[Batch]:
    """One epoch of batches with rows * width <= batch_tokens (a longer single example is a batch alone);
    the same (examples, batch_tokens, seed, epoch) always give the same batches."""
    return [_collate([examples[i] for i in batch], pad_id) for batch in _plan_batches(examples, batch_tokens, seed, epoch)]


def batch_stream(examples: Sequence[Example], *, batch_tokens: int, seed: int, pad_id: int,
                 start_batch: int = 0) -> Iterator[tuple[int, Batch]]:
    """Endless (global index, batch) over epochs 0, 1, 2, ...; starting at ``start_batch`` yields exactly what an
    uninterrupted stream yields from there. Skipped batches are only planned, never padded into tensors."""
    if not examples:
        raise ValueError("batch_stream needs at least one example")
    index = 0
    for epoch in itertools.count():
        plan = _plan_batches(examples, batch_tokens, seed, epoch)
        if index + len(plan) <= start_batch:
            index += len(plan)
            continue
        for batch in plan:
            if index >= start_batch:
                yield index, _collate([examples[i] for i in batch], pad_id)
            index += 1
