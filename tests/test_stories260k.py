"""What only a real model shows, on stories260k from ../shared (skipped without it): how far stage 1 gets, and the
published perplexities of the evaluation protocols. Everything else of the pipeline runs on the tiny teacher the
tests build (test_pipeline.py)."""

import pytest

import lolcats
from lolcats.evaluate import perplexity

from conftest import SHARED, story_examples
from test_pipeline import converted, stage1

VALID = SHARED / "data" / "tinystories_valid.txt"


def test_stage1_halves_the_distillation_loss_of_a_real_model(stories260k_path, tmp_path):
    train, held = story_examples(stories260k_path, 200, 256, 20)
    result = stage1(converted(stories260k_path), train, held, tmp_path, tokens=8000)  # 0.37x at step 8
    assert result.best_eval_loss < 0.5 * result.first_eval_loss


def test_perplexity_protocols_reproduce_the_reference_numbers(stories260k_path):
    model = lolcats.load_base_model(str(stories260k_path))
    tokenizer = lolcats.load_tokenizer(str(stories260k_path))
    # DEVELOPERS.md: BOS-prefixed stories packed into 512-token windows -> 5.452.
    assert perplexity(model, tokenizer, VALID, seq_len=512, protocol="documents").ppl == pytest.approx(5.452, abs=5e-3)
    # shared/data/README.md: each story alone, BOS + <= 511 tokens -> 5.320.
    assert perplexity(model, tokenizer, VALID, seq_len=512, protocol="per-document").ppl == pytest.approx(5.320, abs=5e-3)
