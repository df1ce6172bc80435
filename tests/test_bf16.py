"""bf16 models end to end: frozen weights in bf16, φ/γ/state/accumulation in fp32.

Tolerance: a bf16 model is compared with the same model in fp32; bf16 keeps 8 significant bits, so
after a few layers the logits differ by about 1% of their range. We require the largest logit
difference to stay within BF16_TOLERANCE = 5% of the largest |logit| of the fp32 model, and the greedy
next tokens to agree on most positions.
"""

import pytest
import torch
from tiny_models import tiny_model

import lolcats
from lolcats import convert, linearized_layers
from lolcats.artifacts import ArtifactError, fingerprint, save_adapter
from lolcats.training.config import RunConfig
from lolcats.training.linearize import linearize
from lolcats.training.transfer import transfer_loss_fn, transfer_parameters

BF16_TOLERANCE = 0.05
WINDOW = 4
LENGTH = 7 * WINDOW  # far past 2·window, so the linear term is used


def relative_error(actual, expected):
    return ((actual.float() - expected.float()).abs().max() / expected.float().abs().max()).item()


def learned_tensors(model):
    return [p for layer in linearized_layers(model) for name, p in layer.named_parameters()
            if name.startswith("feature_map") or name == "window_logit"]


def gqa_folder(tmp_path, seed=0):
    """A tiny grouped-query Llama (4 query heads, 2 kv heads) saved as a model folder."""
    folder = tmp_path / f"tiny-gqa-{seed}"
    tiny_model("llama", seed=seed).save_pretrained(folder)
    return folder


def ids(length=LENGTH, batch=2):
    return torch.randint(0, 96, (batch, length), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("feature_map", ["hedgehog", "t2r", "elu", "taylor"])
def test_model_to_bf16_after_convert_keeps_phi_and_gamma_fp32(feature_map):
    """The reported crash: convert, then model.to(bfloat16), then a forward past 2·window."""
    model = convert(tiny_model("llama"), window=WINDOW, chunk_size=WINDOW, feature_map=feature_map)
    expected = model(ids(), use_cache=False).logits
    model.to(torch.bfloat16)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in learned_tensors(model))
    logits = model(ids(), use_cache=False).logits
    assert logits.dtype == torch.bfloat16
    assert relative_error(logits, expected) <= BF16_TOLERANCE
    model.to(torch.float64)  # casts up (gradient checks) still apply to everything
    assert all(p.dtype == torch.float64 for p in learned_tensors(model))


def test_bf16_stage1_backward_gives_fp32_gradients_close_to_fp32(tmp_path):
    from lolcats.data import Batch

    batch = Batch(input_ids=ids(), attention_mask=torch.ones(2, LENGTH, dtype=torch.long),
                  labels=ids())
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = convert(lolcats.load_base_model(str(gqa_folder(tmp_path)), dtype=dtype), window=WINDOW, chunk_size=WINDOW)
        params = transfer_parameters(model)
        loss = transfer_loss_fn(model)(batch)
        loss.backward()
        assert all(p.grad.dtype == torch.float32 for p in params.values())
        grads[dtype] = torch.cat([p.grad.flatten() for p in params.values()])
    assert relative_error(grads[torch.bfloat16], grads[torch.float32]) <= 0.1


def test_bf16_gqa_convert_save_load_generate(tmp_path):
    """convert -> forward/backward -> save -> load(dtype=bf16) -> generate, against the same in fp32."""
    folder = gqa_folder(tmp_path)
    model = convert(lolcats.load_base_model(str(folder), dtype=torch.bfloat16), window=WINDOW, chunk_size=WINDOW)
    generator = torch.Generator().manual_seed(1)
    for p in learned_tensors(model):  # a "trained" state, away from the identity initialisation
        p.data += 0.3 * torch.randn(p.shape, generator=generator)
    model(ids(), use_cache=False).logits.float().pow(2).mean().backward()
    with torch.no_grad():
        logits = model(ids(), use_cache=False).logits
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in learned_tensors(model))
    run = tmp_path / "run"
    manifest = {"base_model": {"spec": str(folder), **fingerprint(model)}, "dtype": "bfloat16",
                "conversion": model.lolcats_config.model_dump(mode="json"), "lora": None}
    save_adapter(run, model, manifest)

    loaded = lolcats.load(run)  # the dtype it was trained in
    reference = lolcats.load(run, dtype=torch.float32)
    assert loaded.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in learned_tensors(loaded))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids(), use_cache=False).logits, logits, rtol=0, atol=0)  # saved == in memory
        assert relative_error(loaded(ids(), use_cache=False).logits, reference(ids(), use_cache=False).logits) <= BF16_TOLERANCE
        prompt = ids(LENGTH, batch=1)
        out = loaded.generate(prompt, max_new_tokens=12, do_sample=False)
        # decode == full forward in bf16: greedy tokens from the cache equal greedy tokens by full forwards
        sequence = prompt
        for _ in range(12):
            sequence = torch.cat([sequence, loaded(sequence, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    assert torch.equal(out, sequence)


def test_bf16_decode_matches_full_forward():
    model = convert(tiny_model("llama"), window=WINDOW, chunk_size=WINDOW).to(torch.bfloat16)
    sequence = ids(40)
    with torch.no_grad():
        full = model(sequence, use_cache=False).logits
        out = model(sequence[:, :9])
        steps, cache = [out.logits], out.cache
        for t in range(9, 40):
            out = model(sequence[:, t:t + 1], cache=cache)
            steps.append(out.logits)
            cache = out.cache
    assert all(layer.state.state.dtype == torch.float32 for layer in cache.layers)
    assert relative_error(torch.cat(steps, dim=1), full) <= BF16_TOLERANCE / 5


def test_fingerprint_does_not_depend_on_load_dtype_and_refuses_a_wrong_base(tmp_path):
    folder, other = gqa_folder(tmp_path, seed=0), gqa_folder(tmp_path, seed=1)
    prints = {dtype: fingerprint(lolcats.load_base_model(str(folder), dtype=dtype))
              for dtype in (torch.float32, torch.bfloat16)}
    assert prints[torch.float32] == prints[torch.bfloat16]
    model = convert(lolcats.load_base_model(str(folder)), window=WINDOW)
    run = tmp_path / "run"
    save_adapter(run, model, {"base_model": {"spec": str(folder), **prints[torch.float32]}, "dtype": "float32",
                              "conversion": model.lolcats_config.model_dump(mode="json"), "lora": None})
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert lolcats.load(run, dtype=dtype).model.embed_tokens.weight.dtype == dtype
        with pytest.raises(ArtifactError, match="different weights"):
            lolcats.load(run, base_model=str(other), dtype=dtype)


def test_pipeline_in_bf16(tiny, tmp_path):
    """The whole linearize pipeline in bf16 on the tiny teacher, then load(dtype=bf16) and generate."""
    stories = tiny.train.read_text().split("\n\n")[:120]
    data = tmp_path / "stories.txt"
    data.write_text("\n\n".join(stories))
    run = RunConfig(model=str(tiny.model), data=(str(data),), out=str(tmp_path / "run"), dtype="bfloat16",
                    seq_len=256, batch_tokens=1024, held_out=8, stage1_tokens=3072, stage2_tokens=1024,
                    eval_every=2, eval_tokens=512, warmup_steps=1, conversion={"window": 32})  # rows reach the linear term
    manifest = linearize(run, progress=False)
    assert manifest["dtype"] == "bfloat16"
    assert manifest["stages"]["stage1"]["best_eval_loss"] < manifest["stages"]["stage1"]["first_eval_loss"]
    model = lolcats.load(run.out)
    reference = lolcats.load(run.out, dtype=torch.float32)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    tokenizer = lolcats.load_tokenizer(str(tiny.model))
    prompt = tokenizer("Once upon a time, there was a little girl named Lily. " * 12, return_tensors="pt")
    assert prompt.input_ids.shape[1] > 2 * 64
    with torch.no_grad():
        error = relative_error(model(**prompt, use_cache=False).logits, reference(**prompt, use_cache=False).logits)
        out = model.generate(**prompt, max_new_tokens=20, do_sample=False)
    assert error <= BF16_TOLERANCE
    assert out.shape[1] == prompt.input_ids.shape[1] + 20
    # Export follows the run's dtype: from_pretrained(DIR) with transformers' defaults is lolcats.load(run).
    from transformers import AutoModelForCausalLM

    from lolcats.export import export

    folder = export(run.out, tmp_path / "hf", echo=lambda _: None)
    exported = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert exported.get_input_embeddings().weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert relative_error(exported(**prompt, use_cache=False).logits.float(),
                              model(**prompt, use_cache=False).logits.float()) <= 1e-5
