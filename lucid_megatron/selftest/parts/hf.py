"""``lucid convert to-hf`` of the bf16 run, then its logits in Megatron and in Hugging Face on the device."""

from __future__ import annotations

import dataclasses

from .base import Context, Part, Result, failed, passed_if
from .training import run_lucid, uninterrupted_run

MAX_KL = 1e-6
MIN_TOP1 = 0.999


@dataclasses.dataclass(kw_only=True)
class HfResult(Result):
    bounds: str
    # convert.cli.compare_logits: Megatron vs Hugging Face logits in float32 on the same random tokens
    checkpoint: str
    tokens: int
    device: str
    max_abs_logit_diff: float
    max_kl: float
    mean_kl: float
    top1_agreement: float

    def markdown(self) -> str:
        return (f"## d. Hugging Face export vs Megatron (float32 logits)\n\n{self.tokens} tokens on {self.device}: "
                f"max |logit diff| {self.max_abs_logit_diff:.2e}, KL max {self.max_kl:.2e} mean {self.mean_kl:.2e}, "
                f"top-1 {self.top1_agreement:.4f} ({self.status})\n")


def check_hf(ctx: Context) -> Result:
    from lucid_megatron.convert.cli import compare_logits

    run = uninterrupted_run(ctx)
    if run is None:
        return failed("no bf16-local run to export")
    hf_dir = ctx.out / "hf"
    code = run_lucid(["convert", "to-hf", run.run_dir, str(hf_dir)], ctx.out / "to-hf.log")
    if code != 0:
        return failed(f"lucid convert to-hf exited {code} (see to-hf.log)")
    comparison = compare_logits(run.run_dir, hf_dir, batches=2, batch_size=2, seq_len=128)
    ok = comparison["max_kl"] <= MAX_KL and comparison["top1_agreement"] >= MIN_TOP1
    return HfResult(status=passed_if(ok), bounds=f"KL max <= {MAX_KL:g}, top-1 >= {MIN_TOP1:g}", **comparison)


HF = Part("hf", f"`lucid convert to-hf` of that run, then Megatron vs Hugging Face logits in float32 on the device "
          f"(KL at most {MAX_KL:g}, top-1 agreement at least {MIN_TOP1:g}).", check_hf)
