"""Block-wise attention transfer: collect / train / stitch on the tiny teacher (4 layers), against joint training."""

import json

import pytest
import torch

import lolcats
from lolcats.artifacts import ArtifactError, read_tensors
from lolcats.training.config import RunConfig
from lolcats.training.blockwise import blockwise_collect, blockwise_stitch, blockwise_train
from lolcats.training.linearize import linearize
from lolcats.training import blockwise
from lolcats.training.loop import StageSettings, example_data, train_stage
from lolcats.convert import linearized_layers
from lolcats.training.transfer import transfer_loss_fn, transfer_parameters

from conftest import tiny_examples


@pytest.fixture(scope="module")
def examples(tiny):
    return tiny_examples(tiny, 120, 192, 12)


@pytest.fixture(scope="module")
def layers(tiny):
    return lolcats.load_base_model(str(tiny.model)).config.num_hidden_layers


SETTINGS = StageSettings(name="stage1", tokens=4000, lr=2e-2, batch_tokens=768, warmup_steps=2, eval_every=3,
                         eval_tokens=1024, checkpoint_every=3)

WINDOW = 32  # short enough for the tiny rows to reach the linear term (the default student otherwise)


def identity():
    return {"test": 1}


def test_plan_blocks():
    assert blockwise.plan_blocks(5, 2) == [range(0, 2), range(2, 4), range(4, 5)]
    assert blockwise.plan_blocks(5, 8) == [range(0, 5)]
    with pytest.raises(ValueError, match="block size"):
        blockwise.plan_blocks(5, 0)


def test_one_block_over_all_layers_trains_the_same_weights_as_joint_training(tiny, examples, layers, tmp_path):
    train, held = examples
    data = example_data(train, held, SETTINGS, seed=0, pad_id=0)

    joint = lolcats.convert(lolcats.load_base_model(str(tiny.model)), window=WINDOW)
    train_stage(transfer_parameters(joint), transfer_loss_fn(joint), data, SETTINGS, run_dir=tmp_path / "joint",
                progress=False)

    model = lolcats.convert(lolcats.load_base_model(str(tiny.model)), window=WINDOW)
    before = {n: p.detach().clone() for n, p in transfer_parameters(model).items()}
    train_batches, eval_batches = blockwise.planned_batches(data, SETTINGS.tokens)
    plan = blockwise.collect(model, train_batches, eval_batches, layers, tmp_path / "acts", identity=identity(),
                             dtype="float32", echo=lambda _: None)
    assert plan["stored_blocks"] == [0] and plan["complete"]
    tensors, summary = blockwise.train_block(model, 0, tmp_path / "acts", plan, SETTINGS, run_dir=tmp_path / "b0",
                                             progress=False)
    expected = transfer_parameters(joint)
    assert set(tensors) == set(expected)
    assert any(not torch.equal(before[n], tensors[n]) for n in tensors)  # it did train
    for name in expected:
        torch.testing.assert_close(tensors[name], expected[name].detach(), rtol=1e-5, atol=1e-6)
    joint_log = (tmp_path / "joint" / "logs" / "stage1.jsonl").read_text()
    block_log = (tmp_path / "b0" / "logs" / "stage1.jsonl").read_text()
    curve = lambda log: [(r["step"], r.get("loss", r.get("eval_loss"))) for r in map(json.loads, log.splitlines())]  # noqa: E731
    assert [step for step, _ in curve(joint_log)] == [step for step, _ in curve(block_log)]
    assert [loss for _, loss in curve(joint_log)] == pytest.approx([loss for _, loss in curve(block_log)], rel=1e-5)


def test_a_later_block_sees_the_residual_stream_of_the_full_model(tiny, examples, tmp_path):
    """Layers 2 and 3's distillation losses from stored inputs (block 1: layers 2-3) equal their losses inside
    the full model."""
    train, held = examples
    data = example_data(train, held, SETTINGS, seed=0, pad_id=0)
    model = lolcats.convert(lolcats.load_base_model(str(tiny.model)), window=WINDOW)
    train_batches, eval_batches = blockwise.planned_batches(data, 1500)
    plan = blockwise.collect(model, train_batches, eval_batches, 2, tmp_path / "acts", identity=identity(),
                             dtype="float32", echo=lambda _: None)
    assert plan["stored_blocks"] == [0, 1]
    batch = train_batches[1]

    with torch.no_grad():
        transfer_loss_fn(model)(batch)
        full = [float(layer.distill_loss) for layer in linearized_layers(model)]
        activations = blockwise.StoredActivations(tmp_path / "acts", 1, plan)
        with blockwise.block_view(model, range(2, 4)):
            blockwise.block_loss_fn(model, activations)(batch)
            block = [float(layer.distill_loss) for layer in linearized_layers(model)]
    assert len(block) == 2 and block == pytest.approx(full[2:4], rel=1e-5)
    assert all(loss > 0 for loss in block)  # the linear term is in use in this batch


def test_collect_refuses_when_the_disk_is_too_small_and_writes_nothing(tiny, examples, layers, tmp_path):
    train, held = examples
    model = lolcats.convert(lolcats.load_base_model(str(tiny.model)), window=WINDOW)
    train_batches, eval_batches = blockwise.planned_batches(example_data(train, held, SETTINGS, seed=0, pad_id=0), 1500)
    messages = []
    with pytest.raises(ArtifactError, match=r"needs .* GiB .* but only .* GiB is free"):
        blockwise.collect(model, train_batches, eval_batches, 1, tmp_path / "acts", identity=identity(),
                          echo=messages.append, free_bytes=lambda path: 1000)
    assert f"x 2 bytes x {layers} block inputs" in messages[0]
    assert not list((tmp_path / "acts").rglob("*.safetensors"))
    # the estimate is exactly 2 bytes * padded tokens * hidden size * blocks
    tokens = sum(b.input_ids.numel() for b in {blockwise.batch_key(b): b for b in (*train_batches, *eval_batches)}.values())
    hidden = model.config.hidden_size
    assert f"{tokens:,} tokens (with padding) x hidden {hidden} x" in messages[0]
    assert f"{tokens * hidden * 2 * layers / 2**30:.2f} GiB" in messages[0]


def test_collect_resumes_an_interrupted_run_and_refuses_other_settings(tiny, examples, tmp_path):
    train, held = examples
    model = lolcats.convert(lolcats.load_base_model(str(tiny.model)), window=WINDOW)
    train_batches, eval_batches = blockwise.planned_batches(example_data(train, held, SETTINGS, seed=0, pad_id=0), 3000)
    directory = tmp_path / "acts"
    kwargs = dict(identity=identity(), echo=lambda _: None, buffer_bytes=60_000)
    full = blockwise.collect(model, train_batches, eval_batches, 2, directory, **kwargs)
    assert len(full["shards"]) > 2 and full["stored_blocks"] == [0, 1]
    first = {p: p.stat().st_mtime_ns for p in directory.rglob("shard-00000.safetensors")}
    last = directory / "block-001" / f"shard-{len(full['shards']) - 1:05d}.safetensors"
    reference, _ = read_tensors(last)
    last.unlink()  # as if killed before the last shard of block 1 was written
    plan = json.loads((directory / "plan.json").read_text())
    plan["complete"] = False
    (directory / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(ArtifactError, match="interrupted"):
        blockwise.read_plan(directory)
    blockwise.collect(model, train_batches, eval_batches, 2, directory, **kwargs)
    assert {p: p.stat().st_mtime_ns for p in directory.rglob("shard-00000.safetensors")} == first  # kept
    again, _ = read_tensors(last)
    assert again.keys() == reference.keys() and all(torch.equal(again[k], reference[k]) for k in reference)
    assert again[next(iter(again))].dtype == torch.bfloat16
    with pytest.raises(ArtifactError, match="other settings"):
        blockwise.collect(model, train_batches, eval_batches, 1, directory, **kwargs)


def test_cli_phases_then_linearize_continues_to_stage_2(tiny, tmp_path):
    """collect -> train each block in its own (partially loaded) model -> stitch -> linearize finishes."""
    run = RunConfig(model=str(tiny.model), data=(str(tiny.train),), out=str(tmp_path / "out"), seq_len=128,
                    batch_tokens=512, held_out=8, stage1_tokens=1500, stage2_tokens=600, eval_every=4,
                    eval_tokens=512, block_size=3, dtype="float32", conversion={"window": WINDOW})
    plan = blockwise_collect(run, echo=lambda _: None)
    assert plan["blocks"] == [[0, 3], [3, 4]]  # the last block is shorter
    with pytest.raises(ArtifactError, match=r"blocks \[0, 1\] are not trained yet"):
        blockwise_stitch(run, echo=lambda _: None)
    for block in plan["stored_blocks"]:
        blockwise_train(run, block, echo=lambda _: None, progress=False)
    with pytest.raises(ValueError, match="block 2 does not exist"):
        blockwise_train(run, 2, echo=lambda _: None, progress=False)
    summary = blockwise_stitch(run, echo=lambda _: None)
    assert set(summary["blocks"]) == {"0", "1"}
    stitched, _ = read_tensors(tmp_path / "out" / "blockwise" / "stage1.safetensors")

    messages = []
    manifest = linearize(run, echo=messages.append, progress=False)
    assert sum("already trained" in m for m in messages) == 2  # the separately trained blocks are reused
    assert "stage2" in manifest["stages"] and manifest["stages"]["stage1"]["block_size"] == 3
    loaded = lolcats.load(tmp_path / "out", merge=False)
    for name, tensor in stitched.items():
        torch.testing.assert_close(dict(loaded.named_parameters())[name], tensor)


def test_partial_block_model_holds_only_its_layers(tiny):
    model = blockwise.load_block_model(str(tiny.model), lolcats.LinearizeConfig(), range(1, 3), echo=lambda _: None)
    materialised = {name.split(".")[2] for name, p in model.named_parameters() if p.device.type != "meta"
                    and name.startswith("model.layers.")}
    assert materialised == {"1", "2"}  # of 0-3
    assert all(p.device.type == "meta" for name, p in model.named_parameters() if not name.startswith("model.layers."))
    full = lolcats.load_base_model(str(tiny.model))
    reference = dict(full.named_parameters())
    for name, p in model.named_parameters():
        if p.device.type != "meta" and name in reference:
            assert torch.equal(p, reference[name])
