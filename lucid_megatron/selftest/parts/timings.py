"""Speed and memory: the preconditioner next to causal flash attention, LUCID next to softmax model steps, and
the kernel configs timed one knob at a time.  Within the run's time budget; what it cannot reach is listed."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .base import Context, Part, Result, Status

if TYPE_CHECKING:
    import torch

    from lucid_megatron.runtime import Runtime
    from lucid_triton import KernelConfig

TUNING_SHAPE = (1, 8, 8192, 128)  # B, Hkv, N, D: few heads, so the sequential chain matters
TUNING_SECONDS = 60.0  # after the timings' budget


def _time_ms(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> tuple[float, float]:
    """Median milliseconds of ``fn()`` after one warm-up, and its peak memory above the start (bytes)."""
    import torch

    fn()
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    base = 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) - base if device.type == "cuda" else 0
    return 1e3 * sorted(times)[len(times) // 2], peak


@dataclasses.dataclass
class PreconditionerTiming:
    B: int
    H: int
    N: int
    D: int
    precond_fwd_ms: float
    flash_fwd_ms: float
    fwd_ratio: float
    precond_bwd_ms: float
    flash_bwd_ms: float
    bwd_ratio: float
    precond_peak_mib: float
    flash_peak_mib: float

    def row(self) -> str:
        return (f"| {self.B} | {self.H} | {self.N} | {self.D} | {self.precond_fwd_ms:.2f} | {self.flash_fwd_ms:.2f} "
                f"| {self.fwd_ratio:.2f} | {self.precond_bwd_ms:.2f} | {self.flash_bwd_ms:.2f} | {self.bwd_ratio:.2f} "
                f"| {self.precond_peak_mib:.0f} | {self.flash_peak_mib:.0f} |")


def time_preconditioner(device: torch.device, b: int, h: int, n: int, d: int,
                        config: KernelConfig | None = None) -> PreconditionerTiming:
    """Preconditioner (Triton solver) vs causal flash attention of the same shape, forward and backward."""
    import torch
    import torch.nn.functional as F

    import lucid_triton
    from lucid_megatron.ops.solver import precondition_grouped

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    solver = lucid_triton.TritonSolver(dtype, config)
    k = torch.randn(b, n, h, d, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(b, n, h, d, device=device, dtype=dtype, requires_grad=True)
    q = torch.randn(b, h, n, d, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(b, h, n, d, device=device, dtype=dtype)
    kt, vt = k.detach().transpose(1, 2).requires_grad_(), v.detach().transpose(1, 2).requires_grad_()

    def pre_fwd():
        with torch.no_grad():
            precondition_grouped(k, v, None, 1e-6, solver)

    def pre_both():
        precondition_grouped(k, v, None, 1e-6, solver).backward(grad)

    def flash_fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, kt, vt, is_causal=True)

    def flash_both():
        F.scaled_dot_product_attention(q, kt, vt, is_causal=True).backward(grad)

    pf, pf_mem = _time_ms(pre_fwd, device)
    ff, ff_mem = _time_ms(flash_fwd, device)
    pb, pb_mem = _time_ms(pre_both, device)
    fb, fb_mem = _time_ms(flash_both, device)
    return PreconditionerTiming(B=b, H=h, N=n, D=d, precond_fwd_ms=pf, flash_fwd_ms=ff, fwd_ratio=pf / ff,
                                precond_bwd_ms=pb - pf, flash_bwd_ms=fb - ff,
                                bwd_ratio=(pb - pf) / max(fb - ff, 1e-9), precond_peak_mib=max(pf_mem, pb_mem) / 2**20,
                                flash_peak_mib=max(ff_mem, fb_mem) / 2**20)


@dataclasses.dataclass
class ModelStepTiming:
    model: str
    tokens: int
    softmax_ms: float
    softmax_peak_gib: float
    lucid_ms: float
    lucid_peak_gib: float
    ratio: float  # LUCID / softmax
    lucid_tokens_per_s: float
    lucid_tflops: float  # model FLOPs of the LUCID step (model/flops.py) per second, in TFLOP/s
    lucid_mfu: float | None  # against the device's dense bf16 peak; None where it is not known (CPU)

    def row(self) -> str:
        mfu = f"{self.lucid_mfu:.1%}" if self.lucid_mfu is not None else "-"
        return (f"| {self.model} | {self.tokens} | {self.softmax_ms:.1f} | {self.lucid_ms:.1f} | {self.ratio:.2f} "
                f"| {self.lucid_tokens_per_s:.0f} | {self.lucid_tflops:.3g} | {mfu} | {self.softmax_peak_gib:.2f} "
                f"| {self.lucid_peak_gib:.2f} |")


def _model_step(runtime: Runtime, preset: str, tokens: int, lucid_layers: str) -> tuple[float, float]:
    """Milliseconds and peak GiB of one forward+backward of ``preset`` (batch 1) with ``lucid_layers``."""
    import torch

    from lucid_megatron.config import load_model_config
    from lucid_megatron.runtime.parallelize import build_model

    device = runtime.device
    precision = "bf16" if device.type == "cuda" else "fp32"
    cfg = load_model_config(preset, {"lucid_layers": lucid_layers, "max_seq_len": max(tokens, 2048)})
    model = build_model(runtime, cfg, precision=precision, initialize=False)
    with torch.no_grad():  # weights drawn on the device (CPU drawing of 1B weights is slow)
        for p in model.parameters():
            p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    ids = torch.randint(0, cfg.vocab_size, (1, tokens), device=device)
    positions = torch.arange(tokens, device=device)[None]

    def step():
        model.zero_grad(set_to_none=True)
        model(ids, positions, None, labels=ids).float().mean().backward()

    ms, peak = _time_ms(step, device)
    if device.type == "cuda":
        peak += torch.cuda.memory_allocated(device)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return ms, peak / 2**30


def time_model_step(runtime: Runtime, preset: str, tokens: int) -> ModelStepTiming:
    import torch

    from lucid_megatron.config import load_model_config
    from lucid_megatron.model.flops import peak_flops, step_flops

    softmax_ms, softmax_peak = _model_step(runtime, preset, tokens, "none")
    lucid_ms, lucid_peak = _model_step(runtime, preset, tokens, "all")
    cfg = load_model_config(preset, {"lucid_layers": "all", "max_seq_len": max(tokens, 2048)})
    tflops = step_flops(cfg, [tokens]).model_total / (lucid_ms / 1e3) / 1e12
    device = runtime.device
    peak = peak_flops(torch.cuda.get_device_name(device), bf16=True) if device.type == "cuda" else None
    return ModelStepTiming(model=preset, tokens=tokens, softmax_ms=softmax_ms, softmax_peak_gib=softmax_peak,
                           lucid_ms=lucid_ms, lucid_peak_gib=lucid_peak, ratio=lucid_ms / softmax_ms,
                           lucid_tokens_per_s=tokens / (lucid_ms / 1e3), lucid_tflops=tflops,
                           lucid_mfu=None if peak is None else tflops * 1e12 / peak)


@dataclasses.dataclass(kw_only=True)
class TimingsResult(Result):
    preconditioner: list[PreconditionerTiming]
    models: list[ModelStepTiming]
    skipped: list[str]  # shapes the budget did not reach

    def markdown(self) -> str:
        lines = []
        if self.preconditioner:
            lines += ["## e1. preconditioner vs causal flash attention (bf16)", "",
                      "| B | H | N | D | precond fwd ms | flash fwd ms | fwd ratio | precond bwd ms | flash bwd ms "
                      "| bwd ratio | precond peak MiB | flash peak MiB |", "|---" * 12 + "|",
                      *[r.row() for r in self.preconditioner], ""]
        if self.models:
            lines += ["## e2. model step (forward+backward, batch 1): LUCID vs softmax", "",
                      "| model | tokens | softmax ms | LUCID ms | LUCID / softmax | LUCID tokens/s | LUCID TFLOP/s "
                      "| LUCID MFU | softmax peak GiB | LUCID peak GiB |", "|---" * 10 + "|",
                      *[r.row() for r in self.models], ""]
        if self.skipped:
            lines += [f"not timed (budget): {', '.join(self.skipped)}", ""]
        return "\n".join(lines)


def check_timings(ctx: Context) -> TimingsResult:
    from lucid_megatron.runtime import start_runtime, stop_runtime

    if ctx.cpu_smoke:
        precond_shapes, model_shapes = [(1, 2, 64, 16)], [("tiny", 128)]
    else:
        precond_shapes = [(1, 8, 2048, 64), (1, 8, 8192, 64), (1, 8, 8192, 128), (4, 16, 8192, 128)]
        model_shapes = [("125m", 2048), ("125m", 8192), ("1b", 2048), ("1b", 8192)]
    deadline = ctx.started + ctx.budget_s
    result = TimingsResult(status=Status.PASS, preconditioner=[], models=[], skipped=[])
    for shape in precond_shapes:
        if time.monotonic() > deadline:
            result.skipped.append(f"precond {shape}")
            continue
        result.preconditioner.append(time_preconditioner(ctx.device, *shape))
    runtime = start_runtime(1, device=ctx.device)
    try:
        for preset, tokens in model_shapes:
            if time.monotonic() > deadline:
                result.skipped.append(f"{preset}@{tokens}")
                continue
            result.models.append(time_model_step(runtime, preset, tokens))
    finally:
        stop_runtime()
    return result


@dataclasses.dataclass
class TuningCandidate:
    block_m: int
    num_warps: int
    num_stages: int
    group: int
    fwd_ms: float | None = None
    bwd_ms: float | None = None
    fwd_ratio: float | None = None  # vs flash attention of the same shape
    bwd_ratio: float | None = None
    error: str | None = None  # why it could not launch (e.g. out of shared memory)

    def row(self) -> str:
        knobs = f"| {self.block_m} | {self.num_warps} | {self.num_stages} | {self.group} "
        if self.error is not None:
            return knobs + f"| {self.error} | | | |"
        return knobs + f"| {self.fwd_ms:.2f} | {self.bwd_ms:.2f} | {self.fwd_ratio:.2f} | {self.bwd_ratio:.2f} |"


@dataclasses.dataclass(kw_only=True)
class TuningResult(Result):
    shape: list[int]  # B, Hkv, N, D
    candidates: list[TuningCandidate]
    skipped: list[str]  # candidates the budget did not reach

    def markdown(self) -> str:
        if not self.candidates:
            return ""
        lines = [f"## f. kernel configs at B, Hkv, N, D = {tuple(self.shape)} (bf16)", "",
                 "| BM | warps | stages | group | fwd ms | bwd ms | fwd / flash | bwd / flash |",
                 "|---|---|---|---|---|---|---|---|", *[c.row() for c in self.candidates]]
        return "\n".join(lines) + "\n"


def tune_kernels(ctx: Context) -> TuningResult:
    """Forward/backward time of each (BM, num_warps, num_stages, group) candidate at one shape; a candidate
    that fails to launch is recorded as such.  For choosing lucid_triton.configs.config_for."""
    from lucid_triton import KernelConfig

    shape = (1, 2, 64, 16) if ctx.cpu_smoke else TUNING_SHAPE
    # (BM, warps, stages, group): the default first, then one knob changed at a time (each compiles anew)
    grid = [(32, 4, 2, 4)] if ctx.cpu_smoke else [(64, 8, 2, 4), (64, 4, 2, 4), (64, 8, 3, 4), (64, 8, 2, 2),
                                                  (64, 8, 2, 8), (128, 8, 2, 4)]
    deadline = ctx.started + ctx.budget_s + TUNING_SECONDS
    result = TuningResult(status=Status.PASS, shape=list(shape), candidates=[], skipped=[])
    for bm, warps, stages, group in grid:
        if time.monotonic() > deadline:
            result.skipped.append(f"BM={bm} w={warps} s={stages} g={group}")
            continue
        candidate = TuningCandidate(block_m=bm, num_warps=warps, num_stages=stages, group=group)
        config = KernelConfig(block_m=bm, block_n=64, group=group, num_warps=warps, num_stages=stages)
        try:
            t = time_preconditioner(ctx.device, *shape, config=config)
            candidate = dataclasses.replace(candidate, fwd_ms=t.precond_fwd_ms, bwd_ms=t.precond_bwd_ms,
                                            fwd_ratio=t.fwd_ratio, bwd_ratio=t.bwd_ratio)
        except Exception as err:  # noqa: BLE001 - a config that cannot launch is a result too
            candidate.error = f"{type(err).__name__}: {str(err)[:120]}"
        result.candidates.append(candidate)
    return result


TIMINGS = Part("timings", "preconditioner vs causal flash attention (forward, backward, peak memory), and LUCID vs "
               "softmax model steps for the 125m and 1b shapes at 2K and 8K tokens (ratio, tokens/s, peak memory); "
               "stops at --budget.", check_timings)
TUNING = Part("tuning", f"kernel configs: (BM, warps, stages, group) candidates timed at B, Hkv, N, D = "
              f"{TUNING_SHAPE}, for choosing lucid_triton.configs.config_for ({TUNING_SECONDS:g} s after --budget).",
              tune_kernels)
