"""Micro-batches bound a step's activation memory without changing the update; memory errors say what to change."""

import dataclasses

import pytest
import torch
from tiny_models import tiny_model

from lolcats import convert
from lolcats.data import Batch
from lolcats.training.loop import StageSettings, TrainingError, example_data, micro_batches, train_stage
from lolcats.convert import add_lora, lora_parameters
from lolcats.training.lora import lm_loss_fn
from lolcats.training.transfer import transfer_loss_fn, transfer_parameters


def examples(count=12, seed=0):
    from lolcats.data import Example

    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        length = 20 + 3 * i  # rows of different lengths: left padding inside batches
        ids = torch.randint(0, 96, (length,), generator=generator).tolist()
        out.append(Example(input_ids=ids, labels=ids))
    return out


def test_micro_batches_cover_the_rows_in_order():
    ids = torch.arange(5 * 8).view(5, 8)
    batch = Batch(ids, torch.ones_like(ids), ids)
    pieces = micro_batches(batch, 17)
    assert [p.input_ids.shape[0] for p in pieces] == [2, 2, 1]
    assert torch.equal(torch.cat([p.input_ids for p in pieces]), ids)
    assert micro_batches(batch, None) == [batch] and micro_batches(batch, 40) == [batch]
    assert [p.input_ids.shape[0] for p in micro_batches(batch, 3)] == [1] * 5  # at least one row


@pytest.mark.parametrize("stage", ["stage1", "stage2"])
def test_micro_batched_training_makes_the_same_updates(stage, tmp_path):
    train, held = examples(), examples(3, seed=1)
    results = {}
    for micro in (None, 60):
        model = convert(tiny_model("llama"), window=4, chunk_size=4)
        if stage == "stage1":
            params, loss_fn = transfer_parameters(model), transfer_loss_fn(model)
        else:
            add_lora(model, rank=2, alpha=4, targets=("q_proj", "v_proj"))
            params, loss_fn = lora_parameters(model), lm_loss_fn(model)
        settings = StageSettings(name=stage, tokens=600, lr=1e-2, batch_tokens=200, warmup_steps=1, eval_every=3,
                                 eval_tokens=100, checkpoint_every=100, micro_batch_tokens=micro)
        result = train_stage(params, loss_fn, example_data(train, held, settings, seed=0, pad_id=0), settings,
                             run_dir=tmp_path / str(micro), progress=False)
        results[micro] = ([r["loss"] for r in result.history if "loss" in r],
                          torch.cat([p.detach().flatten() for p in params.values()]))
    (whole_losses, whole), (micro_losses, micro_params) = results[None], results[60]
    assert len(whole_losses) >= 3
    torch.testing.assert_close(torch.tensor(micro_losses), torch.tensor(whole_losses), rtol=1e-5, atol=1e-7)
    # AdamW divides by sqrt of tiny second moments: a 1e-7 gradient difference moves a weight ~1e-6 (lr 1e-2).
    torch.testing.assert_close(micro_params, whole, rtol=1e-4, atol=1e-5)


def test_out_of_memory_in_a_step_names_what_to_change(tmp_path):
    model = convert(tiny_model("llama"), window=4, chunk_size=4)
    loss_fn = transfer_loss_fn(model)

    def failing(batch):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: not enough memory: you tried "
                           "to allocate 123456789 bytes.")

    failing.count_tokens = lambda batch: batch.num_tokens
    settings = StageSettings(name="stage1", tokens=100, lr=1e-2, batch_tokens=200, eval_every=100, eval_tokens=50,
                             micro_batch_tokens=64)
    data = example_data(examples(), examples(2, seed=1), settings, seed=0, pad_id=0)
    with pytest.raises(TrainingError, match="out of memory.*--micro-batch-tokens \\(now 64\\)"):
        train_stage(transfer_parameters(model), lambda b: loss_fn(b) if not torch.is_grad_enabled() else failing(b),
                    data, settings, run_dir=tmp_path, progress=False)
    assert dataclasses.replace(settings, micro_batch_tokens=None).micro_batch_tokens is None


@pytest.mark.parametrize("attention_ce", [0.0, 0.5])
def test_stage1_layer_by_layer_gradients_equal_one_backward_through_all_layers(attention_ce):
    """Stage 1 takes each layer's gradient as soon as the layer has run (so a step keeps one layer's
    activations); the gradients, scaled as the loop scales the loss, must equal a plain backward of the
    same loss built from the layers' own recorded losses."""
    from lolcats.convert import set_attention_mode
    from lolcats.runtime.swap import linearized_layers

    model = convert(tiny_model("llama"), window=4, chunk_size=4)
    with torch.no_grad():
        for p in transfer_parameters(model).values():
            p.add_(0.1 * torch.randn_like(p))  # away from identity, so every gradient is non-trivial
    params = transfer_parameters(model)
    ids = torch.randint(0, 96, (2, 30), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :7] = 0
    batch = Batch(ids, mask, ids)

    loss = transfer_loss_fn(model, attention_ce=attention_ce)(batch)
    (0.37 * loss).backward()
    layer_by_layer = {name: p.grad.clone() for name, p in params.items()}
    assert all(g.abs().sum() > 0 for name, g in layer_by_layer.items() if "feature_map" in name)

    for p in params.values():
        p.grad = None
    layers = list(linearized_layers(model))
    for layer in layers:
        layer.attention_ce_weight = attention_ce
    set_attention_mode(model, "distill")
    with torch.enable_grad():
        model.get_decoder()(input_ids=ids, attention_mask=mask, use_cache=False)
    reference = 1000.0 * torch.stack([layer.distill_loss for layer in layers]).mean()
    if attention_ce:
        reference = reference + attention_ce * torch.stack([layer.attention_ce for layer in layers]).mean()
    (0.37 * reference).backward()
    torch.testing.assert_close(loss.detach(), reference.detach(), rtol=1e-6, atol=0)
    for name, p in params.items():
        torch.testing.assert_close(layer_by_layer[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_stage2_activation_checkpointing_makes_the_same_updates(tmp_path):
    from lolcats.training.lora import is_recomputing_layers, recompute_layers_in_backward

    train, held = examples(), examples(3, seed=1)
    results = {}
    for recompute in (False, True):
        model = convert(tiny_model("llama"), window=4, chunk_size=4)
        add_lora(model, rank=2, alpha=4, targets=("q_proj", "v_proj"))
        params = lora_parameters(model)
        recompute_layers_in_backward(model, recompute)
        assert is_recomputing_layers(model) == recompute and model.training == recompute
        settings = StageSettings(name="stage2", tokens=600, lr=1e-2, batch_tokens=200, warmup_steps=1, eval_every=3,
                                 eval_tokens=100, checkpoint_every=100)
        result = train_stage(params, lm_loss_fn(model), example_data(train, held, settings, seed=0, pad_id=0), settings,
                             run_dir=tmp_path / str(recompute), progress=False)
        recompute_layers_in_backward(model, False)
        assert not is_recomputing_layers(model) and not model.training
        results[recompute] = ([r["loss"] for r in result.history if "loss" in r],
                              torch.cat([p.detach().flatten() for p in params.values()]))
    (plain_losses, plain), (recomputed_losses, recomputed) = results[False], results[True]
    assert len(plain_losses) >= 3
    torch.testing.assert_close(torch.tensor(recomputed_losses), torch.tensor(plain_losses), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(recomputed, plain, rtol=1e-4, atol=1e-5)
