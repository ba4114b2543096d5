"""The NaN guard: skipped non-finite steps, the divergence verdict, and finite-only checkpoints.

A step whose global loss or gradient norm is not finite is skipped by the trainer: no optimizer step (the
weights and AdamW's moments stay the last good ones), no LR-schedule step (the schedule follows the updates
actually applied), no checkpoint; the step counter and the data stream still advance, so the run keeps its
length and a resume its data position. More than ``train.max_bad_steps`` CONSECUTIVE skipped steps stop the
run with :class:`~seqpar.train.exit_codes.TrainingDiverged` (exit code 4): one bad batch is survived,
a run that diverged is not. No checkpoint is written while the latest step was skipped, so a diverged run
never rotates its good checkpoints out (``checkpoint.keep_last``).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from seqpar.train.exit_codes import TrainingDiverged


class NonFiniteGuard:
    """Counts consecutive skipped steps; ``bad`` > 0 means the latest step was skipped (do not save)."""

    def __init__(self, max_bad_steps: int):
        self.max_bad_steps = max_bad_steps
        self.bad = 0

    def update(self, step: int, finite: bool, loss: float, grad_norm: float, before_raise=None) -> str | None:
        """Record ``step``; the warning line for a skipped step (None for a good one).

        Raises TrainingDiverged after more than ``max_bad_steps`` consecutive skipped steps, after calling
        ``before_raise()`` (the trainer commits an async save of a good step still in flight).
        """
        if finite:
            self.bad = 0
            return None
        self.bad += 1
        if self.bad > self.max_bad_steps:
            if before_raise is not None:
                before_raise()
            raise TrainingDiverged(
                f"training diverged: {self.bad} consecutive steps up to step {step} had a non-finite loss or "
                f"gradient norm (loss {loss}, grad norm {grad_norm}; train.max_bad_steps={self.max_bad_steps}); "
                "nothing non-finite was saved, the last good checkpoint is kept. Lower optim.lr, set optim.grad_clip "
                "(> 0), or resume from that checkpoint.")
        return (f"step {step:>6} | loss {loss:.4g} | gnorm {grad_norm:.4g} | not finite: update skipped "
                f"({self.bad} in a row; train.max_bad_steps={self.max_bad_steps})")


def weights_finite(model: torch.nn.Module, *, world_size: int = 1, group=None) -> bool:
    """Whether every parameter (this rank's shards, agreed over ``group``) is finite. Collective."""
    local = [(p.to_local() if hasattr(p, "to_local") else p).detach() for p in model.parameters()]
    ok = torch.tensor([float(all(bool(torch.isfinite(t).all()) for t in local))])  # a host-side flag
    if world_size > 1 and dist.is_initialized():
        dist.all_reduce(ok, op=dist.ReduceOp.MIN, group=group)
    return bool(ok.item())
