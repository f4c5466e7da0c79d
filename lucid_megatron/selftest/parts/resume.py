"""The bf16 run stopped part-way and resumed from its checkpoint: the later losses against the uninterrupted run."""

from __future__ import annotations

import dataclasses

from .base import Context, Part, Result, Status, failed, passed_if
from .training import TRAIN_STEPS, train_run, uninterrupted_run

# What each size means: (GPU, --cpu-smoke)
STOP_AT = (15, 2)
# bf16 kernels with atomics (flash backward) need not be bit-reproducible: relative bound per step
RESUME_TOLERANCE = 1e-2


@dataclasses.dataclass(kw_only=True)
class ResumeResult(Result):
    stopped_at: int
    compared_steps: str
    max_abs_diff: float
    bit_identical: bool

    def markdown(self) -> str:
        return (f"## c. resume\n\nstopped at {self.stopped_at}, resumed; steps {self.compared_steps}: max |loss diff| "
                f"{self.max_abs_diff:.2e}, bit-identical: {self.bit_identical} ({self.status})\n")


def check_resume(ctx: Context) -> Result:
    uninterrupted = uninterrupted_run(ctx)
    if uninterrupted is None:
        return failed("no bf16-local run to resume")
    stop = STOP_AT[ctx.cpu_smoke]
    common = ["train.precision=bf16", "model.spec=local"]
    first = train_run(ctx, "bf16-resumed", common + [f"train.stop_at_step={stop}"])
    second = train_run(ctx, "bf16-resumed", common, resume=True)
    want, got = uninterrupted.losses, second.losses
    if first.status != Status.PASS or second.status != Status.PASS or len(got) != len(want):
        return failed(f"runs: {first.status}, {second.status}; {len(got)} vs {len(want)} steps")
    compared = range(stop, len(want))
    diffs = [abs(got[i] - want[i]) for i in compared]
    ok = all(d <= RESUME_TOLERANCE * abs(want[i]) for d, i in zip(diffs, compared))
    return ResumeResult(status=passed_if(ok), stopped_at=stop, compared_steps=f"{stop + 1}-{len(want)}",
                        max_abs_diff=max(diffs), bit_identical=max(diffs) == 0.0)


RESUME = Part("resume", f"the bf16 run stopped at step {STOP_AT[0]} and resumed: the losses of steps {STOP_AT[0] + 1}"
              f"-{TRAIN_STEPS[0]} within {RESUME_TOLERANCE:g} (relative) of the uninterrupted run, and whether they "
              "are bit-identical.", check_resume)
