import itertools
import json
from pathlib import Path

import pytest
import torch

from lolcats.data import (
    IGNORE_INDEX,
    PROMPT_TEMPLATE,
    PROMPT_TEMPLATE_NO_INPUT,
    DataError,
    Document,
    Example,
    batch_stream,
    count_tokens,
    make_batches,
    pad_id_for,
    read_documents,
    split_held_out,
    tokenize_documents,
)

TOKENIZER_PATH = Path(__file__).parents[1].parent / "shared/models/stories260k"


@pytest.fixture(scope="module")
def tokenizer():
    if not (TOKENIZER_PATH / "tokenizer.json").is_file():
        pytest.skip(f"tokenizer missing: {TOKENIZER_PATH}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(TOKENIZER_PATH)


def synthetic_examples(count: int = 200, seed: int = 0) -> list[Example]:
    """Examples of varied lengths whose first id identifies them, so tests can track each one."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 40, (count,), generator=generator).tolist()
    return [Example(tuple([1000 + i] + [5] * (n - 1)), tuple([IGNORE_INDEX] + [5] * (n - 1)), document=i)
            for i, n in enumerate(lengths)]


def batches_equal(a, b) -> bool:
    return (torch.equal(a.input_ids, b.input_ids) and torch.equal(a.attention_mask, b.attention_mask)
            and torch.equal(a.labels, b.labels))


def row_ids(batch) -> list[int]:
    """Identifying first id of each row (the first real token after the left padding)."""
    firsts = batch.attention_mask.argmax(dim=1)
    return [int(batch.input_ids[row, col]) for row, col in enumerate(firsts)]


# --- reading -------------------------------------------------------------------------------------------------


def test_txt_splits_on_blank_lines(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n\nFirst doc\nsecond line.\n\n\n  \nSecond doc.\n \t\nThird\n\n", encoding="utf-8")
    assert read_documents(path) == [Document("First doc\nsecond line."), Document("Second doc."), Document("Third")]


def test_jsonl_text_and_instruction_forms(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"text": "Plain story."},
            {"instruction": "Say hi.", "input": "", "output": "Hi!"},
            {"instruction": "Add.", "input": "2 and 3", "output": "5", "id": 7}]
    path.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" + json.dumps(rows[2]) + "\n", encoding="utf-8")
    docs = read_documents(path)
    assert docs[0] == Document("Plain story.")
    assert docs[1] == Document("Hi!", prompt=PROMPT_TEMPLATE_NO_INPUT.format(instruction="Say hi."))
    assert docs[2] == Document("5", prompt=PROMPT_TEMPLATE.format(instruction="Add.", input="2 and 3"))


@pytest.mark.parametrize("bad", ['{"text": "ok"', "[1, 2]", '{"text": 3}', '{"instruction": "x"}',
                                 '{"instruction": "x", "output": "y", "input": null}', '{"other": "x"}'])
def test_malformed_jsonl_names_file_and_line(tmp_path, bad):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n' + bad + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.jsonl:3\b"):
        read_documents(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="nope.txt"):
        read_documents(tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("\n \n\n", encoding="utf-8")
    with pytest.raises(DataError, match="empty.txt"):
        read_documents(tmp_path / "empty.txt")


# --- tokenizing ----------------------------------------------------------------------------------------------


def test_prompt_tokens_get_no_loss(tokenizer):
    doc = Document("The cat sat.", prompt=PROMPT_TEMPLATE_NO_INPUT.format(instruction="Tell a story."))
    (example,) = tokenize_documents([doc], tokenizer, seq_len=512, add_eos=True)
    prompt = tokenizer(doc.prompt, add_special_tokens=False)["input_ids"]
    response = tokenizer(doc.text, add_special_tokens=False)["input_ids"]
    assert example.input_ids == (1, *prompt, *response, tokenizer.eos_token_id)
    assert len(example.labels) == len(example.input_ids)
    n_masked = 1 + len(prompt)
    assert example.labels[:n_masked] == (IGNORE_INDEX,) * n_masked
    assert example.labels[n_masked:] == example.input_ids[n_masked:]


def test_plain_text_without_eos(tokenizer):
    (example,) = tokenize_documents([Document("Once upon a time.")], tokenizer, seq_len=512)
    assert example.input_ids == tuple(tokenizer("Once upon a time.")["input_ids"])  # BOS + text, no EOS
    assert example.labels == (IGNORE_INDEX, *example.input_ids[1:])


def test_long_documents_split_without_crossing(tokenizer):
    long_text = " ".join(["Lily went to the park and played with her ball."] * 30)
    docs = [Document("Short one."), Document(long_text), Document("Another short one.")]
    seq_len = 16
    examples = tokenize_documents(docs, tokenizer, seq_len)
    full = [[1] + tokenizer(d.text, add_special_tokens=False)["input_ids"] for d in docs]
    assert all(2 <= len(e.input_ids) <= seq_len for e in examples)
    for index, ids in enumerate(full):
        pieces = [e for e in examples if e.document == index]
        rebuilt = [t for e in pieces for t in e.input_ids]
        assert rebuilt == ids[:len(rebuilt)]  # consecutive pieces of exactly this document, nothing else
        assert len(ids) - len(rebuilt) < 2  # only a 1-token tail may be dropped
        assert pieces[0].input_ids[0] == 1 and all(1 not in p.input_ids for p in pieces[1:])
    assert len([e for e in examples if e.document == 1]) > 10
    assert count_tokens(examples) == sum(len(e.input_ids) for e in examples)


def test_pieces_without_loss_are_dropped(tokenizer):
    doc = Document("Yes.", prompt=" ".join(["word"] * 40))
    examples = tokenize_documents([doc], tokenizer, seq_len=8)
    assert examples and all(any(l != IGNORE_INDEX for l in e.labels) for e in examples)


def test_pad_id_falls_back_to_unk(tokenizer):
    assert tokenizer.pad_token_id is None
    assert pad_id_for(tokenizer) == tokenizer.unk_token_id == 0


# --- held-out split ------------------------------------------------------------------------------------------


def test_held_out_split_by_document_and_deterministic():
    examples = [Example((1, d, k), (IGNORE_INDEX, d, k), document=d) for d in range(30) for k in range((d % 4) + 1)]
    train, held = split_held_out(examples, 0.2, seed=3)
    assert split_held_out(examples, 0.2, seed=3) == (train, held)
    assert split_held_out(examples, 0.2, seed=4) != (train, held)
    assert {e.document for e in train}.isdisjoint({e.document for e in held})
    assert sorted(train + held, key=examples.index) == examples
    assert len(held) >= round(0.2 * len(examples))
    _, held5 = split_held_out(examples, 5, seed=0)
    assert len(held5) >= 5
    with pytest.raises(ValueError):
        split_held_out(examples[:1], 1, seed=0)
    with pytest.raises(ValueError):
        split_held_out(examples, 1.5, seed=0)


# --- batching ------------------------------------------------------------------------------------------------


def test_make_batches_deterministic_and_seeded():
    examples = synthetic_examples()
    a = make_batches(examples, batch_tokens=128, seed=1, epoch=0, pad_id=0)
    b = make_batches(examples, batch_tokens=128, seed=1, epoch=0, pad_id=0)
    assert len(a) == len(b) and all(batches_equal(x, y) for x, y in zip(a, b))
    for other in (make_batches(examples, batch_tokens=128, seed=2, epoch=0, pad_id=0),
                  make_batches(examples, batch_tokens=128, seed=1, epoch=1, pad_id=0)):
        assert [row_ids(x) for x in other] != [row_ids(x) for x in a]


def test_make_batches_layout():
    examples = synthetic_examples()
    examples.append(Example(tuple([999] + [5] * 299), tuple([5] * 300), document=999))  # longer than batch_tokens
    batch_tokens, pad_id = 128, 7
    by_id = {e.input_ids[0]: e for e in examples}
    seen = []
    for batch in make_batches(examples, batch_tokens=batch_tokens, seed=0, epoch=0, pad_id=pad_id):
        rows, width = batch.input_ids.shape
        assert batch.input_ids.dtype == batch.labels.dtype == batch.attention_mask.dtype == torch.long
        assert rows * width <= batch_tokens or rows == 1
        assert batch.num_tokens == int(batch.attention_mask.sum())
        for row, first in enumerate(row_ids(batch)):
            example = by_id[first]
            pad = width - len(example.input_ids)
            mask = batch.attention_mask[row]
            assert mask[:pad].sum() == 0 and bool(mask[pad:].all())  # left padded
            assert (batch.input_ids[row, :pad] == pad_id).all()
            assert (batch.labels[row, :pad] == IGNORE_INDEX).all()
            assert tuple(batch.input_ids[row, pad:].tolist()) == example.input_ids
            assert tuple(batch.labels[row, pad:].tolist()) == example.labels
            seen.append(first)
    assert sorted(seen) == sorted(by_id)  # every example exactly once per epoch


def test_batch_stream_resume_matches_uninterrupted():
    examples = synthetic_examples(60)
    per_epoch = len(make_batches(examples, batch_tokens=96, seed=5, epoch=0, pad_id=0))
    total = 3 * per_epoch + 4
    full = list(itertools.islice(batch_stream(examples, batch_tokens=96, seed=5, pad_id=0), total))
    assert [i for i, _ in full] == list(range(total))
    epoch1 = make_batches(examples, batch_tokens=96, seed=5, epoch=1, pad_id=0)
    assert all(batches_equal(x, y) for (_, x), y in zip(full[per_epoch:], epoch1))
    for start in (0, 3, per_epoch, per_epoch + 2, 2 * per_epoch + 1):
        resumed = list(itertools.islice(batch_stream(examples, batch_tokens=96, seed=5, pad_id=0, start_batch=start),
                                        total - start))
        assert [i for i, _ in resumed] == list(range(start, total))
        assert all(batches_equal(x, y) for (_, x), (_, y) in zip(resumed, full[start:]))


def test_pack_stream_keeps_whole_documents_in_order_and_is_deterministic():
    from lolcats.data import pack_stream

    examples = synthetic_examples(50)
    rows = pack_stream(examples, seq_len=64, seed=1)
    assert rows == pack_stream(examples, seq_len=64, seed=1)
    assert rows != pack_stream(examples, seq_len=64, seed=2)
    assert all(len(row.input_ids) <= 64 for row in rows)
    stream = [token for row in rows for token in row.input_ids]
    assert len(stream) == count_tokens(examples)
    # Every document appears once, contiguous, starting with its identifying first id.
    starts = [i for i, token in enumerate(stream) if token >= 1000]
    assert sorted(stream[i] - 1000 for i in starts) == list(range(50))
    lengths = {1000 + e.document: len(e.input_ids) for e in examples}
    for i, j in zip(starts, starts[1:] + [len(stream)]):
        assert j - i == lengths[stream[i]]
