"""The stage LR schedule (training/schedule.py): a torch LR scheduler that reproduces the hand-written schedule
it replaced (warmup × plateau scale × optional cosine over tokens) bit for bit, checkpointed through its
state_dict so that a resumed run continues the same LR sequence."""

import json
import math
import random

import pytest
import torch

from lolcats.artifacts import ArtifactError, atomic_save_tensors, read_tensors
from lolcats.data import Batch
from lolcats.training.loop import StageSettings, train_stage
from lolcats.training.schedule import StageSchedule


def reference_lr(settings: StageSettings, step: int, tokens: int, plateau_scale: float) -> float:
    """The schedule as loop.py computed it by hand before the scheduler (same operations, same order)."""
    lr = settings.lr * min(1.0, (step + 1) / max(settings.warmup_steps, 1)) * plateau_scale
    if settings.decay == "cosine":
        lr *= 0.5 * (1 + math.cos(math.pi * min(tokens / settings.tokens, 1.0)))
    return lr


class ReferencePlateau:
    """The plateau rule as loop.py applied it: ``patience`` evaluations in a row without a new best halve (× factor)."""

    def __init__(self, settings: StageSettings):
        self.settings, self.scale, self.bad = settings, 1.0, 0

    def evaluated(self, improved: bool) -> None:
        if improved:
            self.bad = 0
            return
        self.bad += 1
        if self.bad >= self.settings.plateau_patience:
            self.scale *= self.settings.plateau_factor
            self.bad = 0


def plan(seed: int, steps: int, eval_every: int) -> tuple[list[int], dict[int, bool]]:
    """Batch sizes of each step and, after every ``eval_every``-th step, whether the evaluation improved."""
    rng = random.Random(seed)
    sizes = [rng.randint(50, 400) for _ in range(steps)]
    evals = {step: rng.random() < 0.3 for step in range(eval_every, steps + 1, eval_every)}
    return sizes, evals


def new_schedule(settings: StageSettings) -> StageSchedule:
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=settings.lr)
    return StageSchedule(optimizer, settings)


def drive(schedule: StageSchedule, sizes: list[int], evals: dict[int, bool], *, first_step: int = 0,
          tokens: int = 0, stop: int | None = None) -> list[float]:
    """The LR of each step from ``first_step`` (before ``stop``), driven as train_stage drives it."""
    lrs = []
    for step in range(first_step, len(sizes) if stop is None else stop):
        lrs.append(schedule.get_last_lr()[0])
        assert schedule.optimizer.param_groups[0]["lr"] == lrs[-1]
        schedule.optimizer.step()
        tokens += sizes[step]
        schedule.advance(tokens)
        if step + 1 in evals:
            schedule.evaluated(evals[step + 1])
    return lrs


SETTINGS = [
    StageSettings(name="a", tokens=20_000, lr=1e-3, warmup_steps=10, plateau_patience=2, plateau_factor=0.5),
    StageSettings(name="b", tokens=20_000, lr=3e-4, warmup_steps=7, plateau_patience=1, plateau_factor=0.3,
                  decay="cosine"),
    StageSettings(name="c", tokens=9_000, lr=2e-2, warmup_steps=0, plateau_patience=3, plateau_factor=0.5,
                  decay="cosine"),  # the budget runs out before the steps: cosine stays at 0 past it
    StageSettings(name="d", tokens=20_000, lr=1e-2, warmup_steps=1, plateau_patience=2, plateau_factor=1.0),
]


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: s.name)
def test_the_schedule_gives_the_hand_written_lrs_step_by_step(settings):
    sizes, evals = plan(seed=len(settings.name) + ord(settings.name), steps=80, eval_every=3)
    expected, plateau, tokens = [], ReferencePlateau(settings), 0
    plateau.evaluated(True)  # the untrained state's evaluation
    for step, size in enumerate(sizes):
        expected.append(reference_lr(settings, step, tokens, plateau.scale))
        tokens += size
        if step + 1 in evals:
            plateau.evaluated(evals[step + 1])
    schedule = new_schedule(settings)
    schedule.evaluated(True)
    assert drive(schedule, sizes, evals) == expected  # exactly, not approximately
    if settings.plateau_factor != 1.0:
        assert plateau.scale < 1.0  # the plan does hit plateaus


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: s.name)
def test_a_schedule_restored_from_its_state_dict_continues_the_same_lrs(settings):
    sizes, evals = plan(seed=7, steps=60, eval_every=4)
    whole = new_schedule(settings)
    uninterrupted = drive(whole, sizes, evals)
    for cut in (1, 17, 33, 59):
        first = new_schedule(settings)
        before = drive(first, sizes, evals, stop=cut)
        state = json.loads(json.dumps(first.state_dict()))  # as the checkpoint's metadata holds it
        assert set(state) == {"last_epoch", "tokens", "plateau_scale", "bad_evals"}
        resumed = new_schedule(settings)
        resumed.optimizer.load_state_dict(first.optimizer.state_dict())
        resumed.load_state_dict(state)
        after = drive(resumed, sizes, evals, first_step=cut, tokens=sum(sizes[:cut]))
        assert before + after == uninterrupted


def test_a_resumed_schedule_takes_the_base_lr_of_the_run_that_resumes():
    """The divergence advice is "lower the learning rate and run again with --resume": the LR must follow."""
    settings = SETTINGS[0]
    first = new_schedule(settings)
    drive(first, [100] * 20, {}, stop=20)
    lower = StageSettings(**{**settings.__dict__, "lr": settings.lr / 10})
    resumed = new_schedule(lower)
    resumed.optimizer.load_state_dict(first.optimizer.state_dict())
    resumed.load_state_dict(first.state_dict())
    assert resumed.get_last_lr()[0] == resumed.optimizer.param_groups[0]["lr"] == reference_lr(lower, 20, 2000, 1.0)


# A whole stage: a one-tensor model whose held-out loss goes up and down (so the plateau rule fires) and whose
# batches differ in size (so the cosine factor, which follows tokens, differs from one over steps).

class Killed(Exception):
    pass


class SyntheticData:
    def stream(self, start_batch):
        index = start_batch
        while True:
            ids = torch.full((1, 5 + (index * 7) % 11), index % 5)
            yield index, Batch(ids, torch.ones_like(ids), ids.clone())
            index += 1

    def eval_batches(self):
        ids = torch.zeros(1, 4, dtype=torch.long)
        return [Batch(ids, torch.ones_like(ids), ids.clone())]


def run_stage(run_dir, settings, *, kill_at=None, resume=False):
    weight = torch.nn.Parameter(torch.zeros(3))
    calls = {"n": 0}

    def loss_fn(batch):
        if not torch.is_grad_enabled():  # held-out: oscillates as the weight moves
            return torch.cos(7 * weight).sum() + 0.01 * weight.square().sum()
        calls["n"] += 1
        if calls["n"] == kill_at:
            raise Killed
        return (weight - batch.input_ids.float().mean()).square().sum()

    train_stage({"weight": weight}, loss_fn, SyntheticData(), settings, run_dir=run_dir, resume=resume, progress=False)
    return [json.loads(line) for line in (run_dir / "logs" / f"{settings.name}.jsonl").read_text().splitlines()]


def lrs_by_formula(settings, log):
    """The LR each logged step should have had, from the logged tokens and evaluations alone."""
    plateau, tokens, expected = ReferencePlateau(settings), 0, []
    best = None
    for record in log:
        if "eval_loss" in record:
            plateau.evaluated(best is None or record["eval_loss"] < best)
            best = record["eval_loss"] if best is None else min(best, record["eval_loss"])
        else:
            expected.append(reference_lr(settings, record["step"] - 1, tokens, plateau.scale))
            tokens = record["tokens"]
    return expected


def without_timing(log):
    return [{key: value for key, value in record.items() if key != "tokens_per_s"} for record in log]


STAGE = dict(name="s", tokens=400, lr=0.3, warmup_steps=4, eval_every=2, checkpoint_every=3, plateau_patience=2,
             plateau_factor=0.5)


@pytest.mark.parametrize("decay", ["none", "cosine"])
def test_train_stage_logs_the_formula_lrs_and_a_resume_continues_them(tmp_path, decay):
    settings = StageSettings(**STAGE, decay=decay)
    full = run_stage(tmp_path / "full", settings)
    logged = [record["lr"] for record in full if "lr" in record]
    assert logged == lrs_by_formula(settings, full)
    assert min(logged[4:]) < 0.3 * 0.5 ** 3  # several plateaus happened
    with pytest.raises(Killed):
        run_stage(tmp_path / "killed", settings, kill_at=20)  # between the checkpoints of steps 18 and 21
    resumed = run_stage(tmp_path / "killed", settings, resume=True)
    assert without_timing(resumed) == without_timing(full)


def test_a_checkpoint_from_before_the_schedule_state_still_resumes(tmp_path):
    """Checkpoints written when the plateau scale was a loop counter (no schedule state_dict) resume exactly."""
    settings = StageSettings(**STAGE, decay="cosine")
    full = run_stage(tmp_path / "full", settings)
    with pytest.raises(Killed):
        run_stage(tmp_path / "old", settings, kill_at=20)
    path = tmp_path / "old" / "checkpoints" / "s.safetensors"
    tensors, metadata = read_tensors(path)
    schedule = json.loads(metadata.pop("schedule"))
    assert schedule["plateau_scale"] < 1  # the rewrite below matters
    trainer = json.loads(metadata["trainer"])
    metadata["trainer"] = json.dumps({**trainer, "plateau_scale": schedule["plateau_scale"],
                                      "bad_evals": schedule["bad_evals"]})
    metadata["param_groups"] = json.dumps([{k: v for k, v in group.items() if k != "initial_lr"}
                                           for group in json.loads(metadata["param_groups"])])
    atomic_save_tensors(tensors, path, metadata)
    assert without_timing(run_stage(tmp_path / "old", settings, resume=True)) == without_timing(full)

    del metadata["trainer"]
    metadata["trainer"] = json.dumps(trainer)  # neither the schedule's state nor the old counters
    atomic_save_tensors(tensors, path, metadata)
    with pytest.raises(ArtifactError, match="without --resume"):
        run_stage(tmp_path / "old", settings, resume=True)
