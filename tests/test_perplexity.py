"""Every perplexity entry point goes through evaluate/perplexity.next_token_nll (final hidden states + the chunked
LM-head loss of next_token.py); each is checked here against a plain computation (the model's full logits and
torch's cross-entropy, one window or batch at a time) over the same scored positions, on a tiny random model."""

import importlib
import math

import pytest
import torch
import torch.nn.functional as F
from tiny_models import teacher_or_linearized

import lolcats
import lolcats.next_token
from lolcats.cli.convert import _perplexity
from lolcats.data import IGNORE_INDEX, Example, make_batches, read_documents
from lolcats.evaluate.perplexity import next_token_nll, perplexity, rolling_windows, window_batches
from lolcats.evaluate.runner import text_perplexity
from lolcats.evaluate.scoring import rolling_loglikelihood
from lolcats.training.linearize import held_out_perplexity

REL = 2e-6

TEXT = "\n\n".join([
    "Once upon a time there was a cat who liked to sit in the sun all day long.",
    "Tom had a red ball.",
    "x",
    "The dog ran to the park, and the bird sang a song about the rain and the wind and the sea " * 3,
    "She said hello to her friend and they played together until dinner.",
])


class CharTokenizer:
    """One token a character (ids 3..95 of the tiny models' 96), BOS = 1."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=False, **_):
        ids = [3 + ord(c) % 93 for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


@pytest.fixture(scope="module", params=["teacher", "linearized"])
def model(request):
    return teacher_or_linearized(request.param)


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(params=[None, 96 * 7], ids=["one-chunk", "7-row-chunks"])
def chunking(request, monkeypatch):
    """The LM head's rows per chunk: all at once, or 7 at a time (so chunks cut across windows and rows)."""
    if request.param:
        monkeypatch.setattr(lolcats.next_token, "CHUNK_ELEMENTS", request.param)


@torch.no_grad()
def plain_nll(model, windows):
    """(Σ NLL, count) of windows [(tokens, context)], each alone through the full logits."""
    total, count = 0.0, 0
    for tokens, context in windows:
        tokens = torch.as_tensor(tokens)
        logits = model(input_ids=tokens[None], use_cache=False).logits[0].float()
        total += float(F.cross_entropy(logits[context - 1:-1], tokens[context:], reduction="sum"))
        count += len(tokens) - context
    return total, count


def expected_windows(path, protocol, seq_len, max_tokens=None):
    """The windows of each protocol as perplexity.py's docstring states them, built here from scratch."""
    tokenizer = CharTokenizer()
    documents = [[1] + tokenizer(d.prompt + d.text)["input_ids"] for d in read_documents(path)]
    if protocol == "documents":
        stream = [t for d in documents for t in d][:max_tokens]
        return [(stream[i:i + seq_len], 1) for i in range(0, len(stream), seq_len) if len(stream[i:i + seq_len]) > 1]
    if protocol == "per-document":
        return [(d[:seq_len], 1) for d in documents if len(d[:seq_len]) > 1]
    stream = tokenizer(TEXT)["input_ids"][:max_tokens]
    return [([1] + stream[i:i + seq_len], 1) for i in range(0, len(stream), seq_len)]


def no_full_logits(model, monkeypatch):
    """The model's own forward (which would build the positions × vocabulary logits) must not run."""
    def refuse(*args, **kwargs):
        raise AssertionError("full logits computed")

    monkeypatch.setattr(model, "forward", refuse)


@pytest.mark.parametrize("protocol,max_tokens", [("documents", None), ("documents", 150), ("per-document", None),
                                                 ("bos-window", None), ("bos-window", 200)])
def test_perplexity_protocols_match_the_plain_computation(model, text_file, chunking, monkeypatch, protocol, max_tokens):
    expected_nll, expected_tokens = plain_nll(model, expected_windows(text_file, protocol, 32, max_tokens))
    no_full_logits(model, monkeypatch)
    result = perplexity(model, CharTokenizer(), text_file, seq_len=32, protocol=protocol, max_tokens=max_tokens,
                        batch_size=3)
    assert result.tokens == expected_tokens
    assert result.nll == pytest.approx(expected_nll / expected_tokens, rel=REL)
    assert result.ppl == pytest.approx(math.exp(expected_nll / expected_tokens), rel=REL)


def plain_rolling(model, ids, seq_len, stride):
    """Every token after the first predicted once, from the window of at most seq_len tokens that ends with the
    stride-long group it belongs to."""
    stride = stride or seq_len - 1
    windows, first = [], 1
    while first < len(ids):
        end = min(first + stride, len(ids))
        begin = max(0, end - seq_len)
        windows.append((ids[begin:end], first - begin))
        first = end
    return plain_nll(model, windows)


@pytest.mark.parametrize("seq_len,stride", [(32, None), (32, 5), (32, 31), (500, None)])
def test_rolling_windows_match_the_plain_computation(model, text_file, chunking, monkeypatch, seq_len, stride):
    ids = [1] + CharTokenizer()(TEXT)["input_ids"]
    expected_nll, expected_tokens = plain_rolling(model, ids, seq_len, stride)
    assert expected_tokens == len(ids) - 1
    capped_nll, _ = plain_rolling(model, ids[:41], seq_len, stride)  # BOS + the first 40 tokens
    no_full_logits(model, monkeypatch)
    total, count = rolling_loglikelihood(model, ids, seq_len=seq_len, stride=stride, batch_size=3)
    assert count == expected_tokens and -total == pytest.approx(expected_nll, rel=REL)
    scored = text_perplexity(model, CharTokenizer(), text_file, seq_len=seq_len, stride=stride, batch_size=4)
    assert scored["tokens"] == expected_tokens
    assert scored["ppl"] == pytest.approx(math.exp(expected_nll / expected_tokens), rel=REL)
    capped = text_perplexity(model, CharTokenizer(), text_file, seq_len=seq_len, stride=stride, max_tokens=40)
    assert capped["tokens"] == 40 and capped["ppl"] == pytest.approx(math.exp(capped_nll / 40), rel=REL)


def test_rolling_windows_refuse_a_stride_that_skips_or_repeats_tokens():
    for stride in (-1, 32, 40):
        with pytest.raises(ValueError, match="stride"):
            rolling_windows(list(range(100)), seq_len=32, stride=stride)


def held_out_examples():
    generator = torch.Generator().manual_seed(3)
    examples = []
    for index in range(11):
        length = int(torch.randint(4, 40, (), generator=generator))
        ids = torch.randint(3, 96, (length,), generator=generator).tolist()
        prompt = index % 3  # some examples have prompt tokens that get no loss
        examples.append(Example(tuple([1] + ids), tuple([IGNORE_INDEX] * (1 + prompt) + ids[prompt:]), document=index))
    return examples


@pytest.mark.parametrize("max_tokens", [10**9, 60])
def test_held_out_perplexity_matches_the_plain_computation(model, chunking, monkeypatch, max_tokens):
    """Left-padded batches of examples whose labels skip their prompt; scoring stops once max_tokens are in."""
    held = held_out_examples()
    total = count = 0
    with torch.no_grad():
        for batch in make_batches(held, batch_tokens=100, seed=0, epoch=0, pad_id=0):
            if count >= max_tokens:
                break
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False).logits.float()
            targets = batch.labels[:, 1:]
            total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                           reduction="sum"))
            count += int((targets != IGNORE_INDEX).sum())
    assert 0 < count < sum(len(e.input_ids) for e in held)
    no_full_logits(model, monkeypatch)
    assert held_out_perplexity(model, held, 0, 100, max_tokens) == pytest.approx(math.exp(total / count), rel=REL)


def test_the_convert_reports_perplexity_matches_the_plain_computation(model, chunking, monkeypatch):
    ids = torch.tensor([[1] + CharTokenizer()(TEXT)["input_ids"][:200]])
    with torch.no_grad():
        loss = F.cross_entropy(model(ids, use_cache=False).logits[0, :-1].float(), ids[0, 1:])
    no_full_logits(model, monkeypatch)
    assert _perplexity(model, ids) == pytest.approx(math.exp(float(loss)), rel=REL)


def test_window_batches_group_equal_lengths_and_mask_the_context():
    windows = [([5, 6, 7], 1), ([8, 9], 1), ([10, 11, 12], 2), ([13, 14, 15], 1), ([16, 17], 1)]
    batches = list(window_batches(windows, batch_size=2))
    assert [tuple(ids.shape) for ids, _, _ in batches] == [(2, 2), (2, 3), (1, 3)]
    assert all(mask is None for _, mask, _ in batches)
    _, _, labels = batches[1]
    assert labels.tolist() == [[IGNORE_INDEX, 6, 7], [IGNORE_INDEX, IGNORE_INDEX, 12]]


def test_next_token_nll_skips_batches_with_nothing_scored(model, monkeypatch):
    ids = torch.tensor([[1, 5, 6]])
    calls = []
    module = importlib.import_module("lolcats.evaluate.perplexity")  # (the package's `perplexity` is the function)
    monkeypatch.setattr(module, "final_hidden", lambda *args: calls.append(args))
    assert next_token_nll(model, [(ids, None, torch.full_like(ids, IGNORE_INDEX))]) == (0.0, 0) and not calls
