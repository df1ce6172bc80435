"""Chunked next-token losses: the same values and gradients as full (positions × vocabulary) logits."""

import pytest
import torch
from tiny_models import FAMILY_CONFIGS, tiny_model

from lolcats import next_token
from lolcats.next_token import final_hidden, next_token_loss_sum


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 7 positions for a 96-token vocabulary: several chunks, the last one partial."""
    monkeypatch.setattr(next_token, "CHUNK_ELEMENTS", 96 * 7)


def full_logits_losses(model, hidden, targets, teacher_hidden):
    head = model.get_output_embeddings()
    cap = getattr(model.config, "final_logit_softcapping", None)

    def logits(h):
        out = head(h).float()
        return cap * torch.tanh(out / cap) if cap else out

    ce = torch.nn.functional.cross_entropy(logits(hidden), targets, reduction="sum")
    kl = torch.nn.functional.kl_div(torch.log_softmax(logits(hidden), -1), torch.log_softmax(logits(teacher_hidden), -1),
                                    log_target=True, reduction="sum")
    return ce, kl


@pytest.mark.parametrize("softcap", [None, 3.0])
@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_chunked_losses_and_gradients_equal_full_logits(family, softcap, small_chunks):
    overrides = {"final_logit_softcapping": softcap} if softcap else {}
    if softcap and family != "gemma3_text":
        pytest.skip("final logit soft-capping is a Gemma setting")
    model = tiny_model(family, **overrides).requires_grad_(False)
    ids = torch.randint(0, 96, (2, 30), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        states = final_hidden(model, ids, torch.ones_like(ids))
        # The decoder's hidden state is what the model's own LM head reads.
        torch.testing.assert_close(model.get_output_embeddings()(states) if not softcap else
                                   softcap * torch.tanh(model.get_output_embeddings()(states) / softcap),
                                   model(ids).logits, rtol=1e-5, atol=1e-5)
    hidden = states[0].clone().requires_grad_(True)
    teacher_hidden = states[1]
    targets = ids[0]
    expected_ce, expected_kl = full_logits_losses(model, hidden, targets, teacher_hidden)
    expected_ce_grad, = torch.autograd.grad(expected_ce, hidden)
    expected_kl_grad, = torch.autograd.grad(expected_kl, hidden)

    ce = next_token_loss_sum(model, hidden, targets)
    ce_grad, = torch.autograd.grad(2.0 * ce, hidden)
    kl = next_token_loss_sum(model, hidden, teacher_hidden=teacher_hidden)
    kl_grad, = torch.autograd.grad(kl, hidden)
    torch.testing.assert_close(ce, expected_ce, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kl, expected_kl, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ce_grad, 2.0 * expected_ce_grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(kl_grad, expected_kl_grad, rtol=1e-4, atol=1e-6)


def test_chunk_size_follows_the_vocabulary():
    assert next_token.chunk_rows(262_144) * 262_144 <= next_token.CHUNK_ELEMENTS
    assert next_token.chunk_rows(10**9) == 1


def test_needs_exactly_one_target_kind():
    model = tiny_model("llama")
    hidden = torch.zeros(3, 64)
    with pytest.raises(ValueError, match="either targets"):
        next_token_loss_sum(model, hidden)
    with pytest.raises(ValueError, match="either targets"):
        next_token_loss_sum(model, hidden, torch.zeros(3, dtype=torch.long), teacher_hidden=hidden)
