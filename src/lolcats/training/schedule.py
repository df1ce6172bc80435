"""The learning-rate schedule of a training stage, as a torch LR scheduler whose state_dict the trainer
checkpoint holds.

    lr(step) = lr × min(1, (step + 1) / warmup_steps) × plateau_scale [× ½ (1 + cos(π · min(tokens / budget, 1)))]

``step`` is the index of the optimizer step about to be taken (the scheduler's ``last_epoch``), ``tokens`` the
tokens trained on before it, ``budget`` the stage's token budget (the cosine factor is the ``decay="cosine"``
option; it follows tokens, not steps, because batches differ in size). ``plateau_scale`` starts at 1 and is
multiplied by ``plateau_factor`` after ``plateau_patience`` evaluations in a row without a new best held-out
loss. One subclass of ``torch.optim.lr_scheduler.LRScheduler`` rather than a composition of torch's own:
``ReduceLROnPlateau`` cannot be chained with warmup or cosine (it rescales the current LR, and stops below its
``eps``) and ``LambdaLR`` would multiply the factors in another order (the LRs must stay bit-identical to the
earlier hand-written schedule, whose logs and runs they continue).

The state_dict holds the counters only (``last_epoch``, ``tokens``, ``plateau_scale``, ``bad_evals``): the
settings and the base LR come from the StageSettings of the run that loads it, so a resumed run may change
them (the divergence message's advice: lower the learning rate and resume).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch.optim.lr_scheduler import LRScheduler

COUNTERS = ("last_epoch", "tokens", "plateau_scale", "bad_evals")


class StageSchedule(LRScheduler):
    """Call ``advance(tokens)`` after each ``optimizer.step()`` (tokens: trained on so far) and
    ``evaluated(improved)`` after each held-out evaluation; the optimizer's LR is always the next step's.
    ``settings`` is the stage's ``StageSettings`` (its lr is the optimizer's initial LR; the schedule reads
    warmup_steps, plateau_patience, plateau_factor, decay and tokens)."""

    def __init__(self, optimizer: torch.optim.Optimizer, settings):
        self.settings = settings
        self.tokens = 0
        self.plateau_scale = 1.0
        self.bad_evals = 0
        super().__init__(optimizer)  # sets the LR of step 0

    def _lr(self, base: float) -> float:
        s = self.settings
        lr = base * min(1.0, (self.last_epoch + 1) / max(s.warmup_steps, 1)) * self.plateau_scale
        if s.decay == "cosine":  # (a stage with no token budget never steps; its step 0 LR is only a placeholder)
            lr *= 0.5 * (1 + math.cos(math.pi * (min(self.tokens / s.tokens, 1.0) if s.tokens > 0 else 1.0)))
        return lr

    def get_lr(self) -> list[float]:
        return [self._lr(base) for base in self.base_lrs]

    def _apply(self) -> None:
        """Set the optimizer's LR for the current counters (after a plateau step or a load)."""
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def advance(self, tokens: int) -> None:
        """One optimizer step was taken; ``tokens`` have been trained on in all."""
        self.tokens = tokens
        self.step()

    def evaluated(self, improved: bool) -> None:
        """A held-out evaluation, with or without a new best loss."""
        if improved:
            self.bad_evals = 0
            return
        self.bad_evals += 1
        if self.bad_evals >= self.settings.plateau_patience:
            self.plateau_scale *= self.settings.plateau_factor
            self.bad_evals = 0
            self._apply()

    def state_dict(self) -> dict:
        return {key: getattr(self, key) for key in COUNTERS}

    def load_state_dict(self, state_dict: Mapping) -> None:
        missing = [key for key in COUNTERS if key not in state_dict]
        if missing:
            raise KeyError(f"learning-rate schedule state without {missing}")
        super().load_state_dict({key: state_dict[key] for key in COUNTERS})
        self._apply()


def legacy_schedule_state(trainer: Mapping) -> dict:
    """The schedule's state_dict from the loop counters of a checkpoint written before the schedule had its own
    state (the plateau scale and its bad-evaluation count were loop counters then)."""
    return {"last_epoch": trainer["step"], "tokens": trainer["tokens"], "plateau_scale": trainer["plateau_scale"],
            "bad_evals": trainer["bad_evals"]}
