"""The GPU acceptance run: everything the CPU tests cannot prove, in one call on one GPU.

    python -m lucid_megatron selftest gpu --out DIR               # one H100/H200, about 8 minutes
    python -m lucid_megatron selftest gpu --out DIR --cpu-smoke   # the same code paths, toy sizes, CPU

In order (each part records its numbers even when a later one fails):

a. kernels   Triton preconditioner forward/backward vs the float64 dense reference, fp32 and bf16.
b. training  the tiny model, 30 steps, world of one (NCCL on GPU): bf16 with the local spec and with the
             Transformer Engine spec, each against the same run in fp32 on the CPU (loss per step).
c. resume    the bf16 run stopped at step 15 and resumed: losses of steps 16-30 vs the uninterrupted run.
d. hf        ``lucid convert to-hf`` of the bf16 run, then Megatron vs Hugging Face logits on the device.
e. timings   preconditioner vs causal flash attention (fwd, bwd), and LUCID vs softmax model steps for the
             125m and 1b shapes at 2K and 8K tokens: ratios, tokens/s, peak memory.

It installs nothing: on a GPU image without this project's dependencies, carry their wheels (docs/training.md,
"Running on GPUs"). Writes ``DIR/results.json`` and ``DIR/results.md`` after every part.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

# What each size means: (GPU, --cpu-smoke)
TRAIN_STEPS = (30, 4)
STOP_AT = (15, 2)
TRAIN_SEQ = (256, 64)
# bf16 vs fp32 loss of the same step, relative (on CPU, tiny model, 30 steps: 4e-4; GPU kernels round more)
BF16_LOSS_TOLERANCE = 0.02


class Results:
    """results.json + results.md, rewritten after every part so that a run cut short still reports."""

    def __init__(self, out: Path, header: dict):
        self.out, self.data = out, {"header": header, "parts": {}}

    def record(self, part: str, value: dict) -> None:
        self.data["parts"][part] = value
        (self.out / "results.json").write_text(json.dumps(self.data, indent=1, default=str))
        (self.out / "results.md").write_text(markdown(self.data))
        status = value.get("status", "?")
        print(f"[selftest] {part}: {status}" + (f" ({value['error']})" if "error" in value else ""), flush=True)


def markdown(data: dict) -> str:
    h = data["header"]
    lines = [f"# lucid selftest gpu — {h['date']} | {h['device']} | torch {h['torch']} | triton {h.get('triton')}",
             f"mode: {h['mode']}", ""]
    parts = data["parts"]
    if "kernels" in parts and parts["kernels"].get("cases"):
        lines += ["## a. kernels vs float64 reference (relative max error)", "",
                  "| case | dtype | V' | dK | dV | tolerance | ok |", "|---|---|---|---|---|---|---|"]
        for c in parts["kernels"]["cases"]:
            lines.append(f"| {c['case']} | {c['dtype']} | {c['out']:.1e} | {c['dk']:.1e} | {c['dv']:.1e} "
                         f"| {c['tolerance']:g} | {c['ok']} |")
        lines.append("")
    if "training" in parts and parts["training"].get("runs"):
        lines += ["## b. training (tiny model) vs fp32 on CPU", "",
                  "| run | device | status | first loss | last loss | max rel. diff vs fp32 CPU | tolerance |",
                  "|---|---|---|---|---|---|---|"]
        for name, r in parts["training"]["runs"].items():
            losses = r.get("losses") or [float("nan")]
            diff = r.get("max_rel_diff_vs_reference")
            status = r["status"] if "reason" not in r else f"{r['status']}: {r['reason'][:90]}..."
            lines.append(f"| {name} | {r.get('device', '')} | {status} | {losses[0]:.4f} | {losses[-1]:.4f} "
                         f"| {'' if diff is None else f'{diff:.2e}'} | {r.get('tolerance', '')} |")
        lines.append("")
    if "resume" in parts and "max_abs_diff" in parts["resume"]:
        r = parts["resume"]
        lines += ["## c. resume", "", f"stopped at {r['stopped_at']}, resumed; steps {r['compared_steps']}: "
                  f"max |loss diff| {r['max_abs_diff']:.2e}, bit-identical: {r['bit_identical']} ({r['status']})", ""]
    if "hf" in parts and "max_kl" in parts["hf"]:
        r = parts["hf"]
        lines += ["## d. Hugging Face export vs Megatron (float32 logits)", "",
                  f"{r['tokens']} tokens on {r['device']}: max |logit diff| {r['max_abs_logit_diff']:.2e}, "
                  f"KL max {r['max_kl']:.2e} mean {r['mean_kl']:.2e}, top-1 {r['top1_agreement']:.4f} ({r['status']})", ""]
    if "timings" in parts:
        t = parts["timings"]
        if t.get("preconditioner"):
            lines += ["## e1. preconditioner vs causal flash attention (bf16)", "",
                      "| B | H | N | D | precond fwd ms | flash fwd ms | fwd ratio | precond bwd ms | flash bwd ms "
                      "| bwd ratio | precond peak MiB | flash peak MiB |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for r in t["preconditioner"]:
                lines.append(f"| {r['B']} | {r['H']} | {r['N']} | {r['D']} | {r['precond_fwd_ms']:.2f} "
                             f"| {r['flash_fwd_ms']:.2f} | {r['fwd_ratio']:.2f} | {r['precond_bwd_ms']:.2f} "
                             f"| {r['flash_bwd_ms']:.2f} | {r['bwd_ratio']:.2f} | {r['precond_peak_mib']:.0f} "
                             f"| {r['flash_peak_mib']:.0f} |")
            lines.append("")
        if t.get("models"):
            lines += ["## e2. model step (forward+backward, batch 1): LUCID vs softmax", "",
                      "| model | tokens | softmax ms | LUCID ms | LUCID / softmax | LUCID tokens/s | softmax peak GiB "
                      "| LUCID peak GiB |", "|---|---|---|---|---|---|---|---|"]
            for r in t["models"]:
                lines.append(f"| {r['model']} | {r['tokens']} | {r['softmax_ms']:.1f} | {r['lucid_ms']:.1f} "
                             f"| {r['ratio']:.2f} | {r['lucid_tokens_per_s']:.0f} | {r['softmax_peak_gib']:.2f} "
                             f"| {r['lucid_peak_gib']:.2f} |")
            lines.append("")
        if t.get("skipped"):
            lines += [f"not timed (budget): {', '.join(t['skipped'])}", ""]
    if parts.get("numerics", {}).get("rows"):
        from .numerics import format_table

        lines += ["## a2. bf16 error vs float64: LUCID (Triton) next to softmax (flash), same inputs", "",
                  format_table(parts["numerics"]["rows"]), "", f"bound: {parts['numerics']['bound']}", ""]
    if parts.get("tuning", {}).get("candidates"):
        t = parts["tuning"]
        lines += [f"## f. kernel configs at B, Hkv, N, D = {tuple(t['shape'])} (bf16)", "",
                  "| BM | warps | stages | group | fwd ms | bwd ms | fwd / flash | bwd / flash |", "|---|---|---|---|---|---|---|---|"]
        for r in t["candidates"]:
            if "error" in r:
                lines.append(f"| {r['block_m']} | {r['num_warps']} | {r['num_stages']} | {r['group']} | {r['error']} | | | |")
            else:
                lines.append(f"| {r['block_m']} | {r['num_warps']} | {r['num_stages']} | {r['group']} | {r['fwd_ms']:.2f} "
                             f"| {r['bwd_ms']:.2f} | {r['fwd_ratio']:.2f} | {r['bwd_ratio']:.2f} |")
        lines.append("")
    failed = [p for p, v in parts.items() if v.get("status") == "FAIL"]
    lines.append("overall: " + ("FAIL (" + ", ".join(failed) + ")" if failed else "PASS"))
    return "\n".join(lines) + "\n"


def _rel(a, b) -> float:
    return ((a.detach().double().cpu() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


# ---- a. kernels -------------------------------------------------------------------------------------


def check_kernels(device, cpu_smoke: bool) -> dict:
    import torch

    from lucid_megatron.ops import lucid_precondition

    g = torch.Generator().manual_seed(0)
    if cpu_smoke:
        cases, dtypes = [("N=40 D=16", (1, 40, 1, 16, 16), None)], [torch.float32]
    else:
        cases = [("N=300 D=64 Hkv=2", (1, 300, 2, 64, 64), None), ("B=2 N=129 D=68", (2, 129, 1, 68, 68), None),
                 ("packed N=200 D=128", (1, 200, 2, 128, 128), [0, 77, 78, 200]),
                 ("N=2048 D=128 Hkv=4", (1, 2048, 4, 128, 128), None)]
        dtypes = [torch.float32, torch.bfloat16]
    tolerance = {torch.float32: 1e-4, torch.bfloat16: 3e-2}
    results = []
    for name, (b, n, h, d, dv), cu in cases:
        k64 = torch.randn(b, n, h, d, generator=g, dtype=torch.float64)
        v64 = torch.randn(b, n, h, dv, generator=g, dtype=torch.float64)
        grad = torch.randn(b, n, h, dv, generator=g, dtype=torch.float64)
        for dtype in dtypes:
            k, v = (x.to(device, dtype).requires_grad_() for x in (k64, v64))
            cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32, device=device)
            got = lucid_precondition(k, v, cu_seqlens=cu_t, backend="triton")
            got_dk, got_dv = torch.autograd.grad(got, (k, v), grad.to(device, dtype))
            # the reference sees the same (rounded) inputs, in float64 on the CPU
            kr, vr = (x.detach().cpu().double().requires_grad_() for x in (k, v))
            want = lucid_precondition(kr, vr, cu_seqlens=None if cu is None else cu_t.cpu(), backend="reference")
            want_dk, want_dv = torch.autograd.grad(want, (kr, vr), grad.to(dtype).double())
            errors = {"out": _rel(got, want), "dk": _rel(got_dk, want_dk), "dv": _rel(got_dv, want_dv)}
            ok = all(math.isfinite(e) and e < tolerance[dtype] for e in errors.values())
            results.append({"case": name, "dtype": str(dtype).removeprefix("torch."), **errors,
                            "tolerance": tolerance[dtype], "ok": ok})
    return {"status": "PASS" if all(r["ok"] for r in results) else "FAIL", "cases": results}


# ---- b/c/d. training, resume, conversion (real `lucid train` / `lucid convert` processes) ------------


def _train_config(out: Path, cpu_smoke: bool) -> Path:
    from lucid_megatron.data.synth import RetrievalTask, write_synth_dataset
    from lucid_megatron.data.tokenizer import ByteTokenizer

    data = out / "data"
    if not (data / "manifest.json").exists():
        seq = TRAIN_SEQ[cpu_smoke]
        write_synth_dataset(data, RetrievalTask(min_len=seq - seq // 4, max_len=seq, num_needles=1, num_queries=1),
                            train_docs=800, valid_docs=40, docs_per_shard=100, seed=0, tokenizer=ByteTokenizer())
    config = {
        "model": {"preset": "tiny"},
        "data": {"path": str(data), "num_streams": 4, "num_workers": 0, "eval_rows": 8},
        "optimizer": {"lr": 3.0e-3, "weight_decay": 0.01, "grad_clip": 1.0},
        "schedule": {"warmup_fraction": 0.1, "decay": "cosine", "min_lr_ratio": 0.1},
        "train": {"steps": TRAIN_STEPS[cpu_smoke], "global_batch_size": 8, "micro_batch_size": 2,
                  "seq_length": TRAIN_SEQ[cpu_smoke], "zero_stage": 1},
        "logging": {"interval": 1, "progress": False},
    }
    path = out / "train.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _lucid(args: list[str], log: Path, *, cpu_only: bool = False, timeout: float = 600) -> int:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "4"))
    if cpu_only:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the fp32 reference runs on the CPU even on a GPU machine
    with open(log, "w") as f:
        return subprocess.run([sys.executable, "-m", "lucid_megatron", *args], stdout=f, stderr=subprocess.STDOUT,
                              env=env, timeout=timeout).returncode


def _losses(run_dir: Path) -> dict[int, float]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    records = [json.loads(line) for line in path.read_text().splitlines() if line]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _train(out: Path, config: Path, name: str, overrides: list[str], device, *, cpu_only=False,
           resume=False) -> dict:
    from lucid_megatron.runtime.parallelize import check_spec

    run_dir = out / "runs" / name
    args = ["train", str(config), "--run-dir", str(run_dir)]
    for o in overrides:
        args += ["--set", o]
    if resume:
        args += ["--resume", "auto"]
    spec = next((o.split("=", 1)[1] for o in overrides if o.startswith("model.spec=")), "local")
    try:
        check_spec(spec)
    except ValueError as err:
        return {"status": "SKIPPED", "reason": str(err), "run_dir": str(run_dir)}
    started = time.monotonic()
    code = _lucid(args, out / f"{name}{'-resume' if resume else ''}.log", cpu_only=cpu_only)
    losses = _losses(run_dir)
    return {"status": "ok" if code == 0 else "FAIL", "exit_code": code, "seconds": round(time.monotonic() - started, 1),
            "run_dir": str(run_dir), "losses": [losses[s] for s in sorted(losses)],
            "device": "cpu" if cpu_only else str(device)}


def check_training(out: Path, config: Path, device) -> dict:
    reference = _train(out, config, "fp32-cpu", ["train.precision=fp32"], device, cpu_only=True)
    runs = {"fp32-cpu": reference}
    for name, spec in (("bf16-local", "local"), ("bf16-te", "te")):
        r = _train(out, config, name, ["train.precision=bf16", f"model.spec={spec}"], device)
        if r["status"] == "ok":
            pairs = list(zip(r["losses"], reference["losses"]))
            finite = all(math.isfinite(a) for a, _ in pairs) and len(pairs) == len(reference["losses"]) > 0
            diff = max((abs(a - b) / abs(b) for a, b in pairs), default=float("inf"))
            r.update(max_rel_diff_vs_reference=diff, tolerance=BF16_LOSS_TOLERANCE,
                     status="PASS" if finite and diff <= BF16_LOSS_TOLERANCE else "FAIL")
        runs[name] = r
    failed = reference["status"] != "ok" or any(r["status"] == "FAIL" for r in runs.values())
    return {"status": "FAIL" if failed else "PASS", "runs": runs}


def check_resume(out: Path, config: Path, uninterrupted: dict, device, cpu_smoke: bool) -> dict:
    stop = STOP_AT[cpu_smoke]
    common = ["train.precision=bf16", "model.spec=local"]
    first = _train(out, config, "bf16-resumed", common + [f"train.stop_at_step={stop}"], device)
    second = _train(out, config, "bf16-resumed", common, device, resume=True)
    want, got = uninterrupted["losses"], second["losses"]
    if first["status"] != "ok" or second["status"] != "ok" or len(got) != len(want):
        return {"status": "FAIL", "error": f"runs: {first['status']}, {second['status']}; {len(got)} vs {len(want)} steps"}
    compared = list(range(stop, len(want)))
    diffs = [abs(got[i] - want[i]) for i in compared]
    # bf16 kernels with atomics (flash backward) need not be bit-reproducible; 1e-2 relative is the bound
    ok = all(d <= 1e-2 * abs(want[i]) for d, i in zip(diffs, compared))
    return {"status": "PASS" if ok else "FAIL", "stopped_at": stop, "compared_steps": f"{stop + 1}-{len(want)}",
            "max_abs_diff": max(diffs), "bit_identical": max(diffs) == 0.0}


def check_hf(out: Path, run_dir: str) -> dict:
    from lucid_megatron.convert.cli import compare_logits

    hf_dir = out / "hf"
    code = _lucid(["convert", "to-hf", run_dir, str(hf_dir)], out / "to-hf.log")
    if code != 0:
        return {"status": "FAIL", "error": f"lucid convert to-hf exited {code} (see to-hf.log)"}
    result = compare_logits(run_dir, hf_dir, batches=2, batch_size=2, seq_len=128)
    ok = result["max_kl"] <= 1e-6 and result["top1_agreement"] >= 0.999
    return {"status": "PASS" if ok else "FAIL", "bounds": "KL max <= 1e-6, top-1 >= 0.999", **result}


# ---- e. timings ------------------------------------------------------------------------------------


def _time_ms(fn, device, repeats: int = 3) -> tuple[float, float]:
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


def time_preconditioner(device, b: int, h: int, n: int, d: int, config=None) -> dict:
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
    return {"B": b, "H": h, "N": n, "D": d, "precond_fwd_ms": pf, "flash_fwd_ms": ff, "fwd_ratio": pf / ff,
            "precond_bwd_ms": pb - pf, "flash_bwd_ms": fb - ff, "bwd_ratio": (pb - pf) / max(fb - ff, 1e-9),
            "precond_peak_mib": max(pf_mem, pb_mem) / 2**20, "flash_peak_mib": max(ff_mem, fb_mem) / 2**20}


TUNING_SHAPE = (1, 8, 8192, 128)  # B, Hkv, N, D: few heads, so the sequential chain matters


def tune_kernels(device, cpu_smoke: bool, deadline: float) -> dict:
    """Forward/backward time of each (BM, num_warps, num_stages, group) candidate at one shape; a candidate
    that fails to launch (e.g. out of shared memory) is recorded as such.  For choosing configs.config_for."""
    from lucid_triton import KernelConfig

    shape = (1, 2, 64, 16) if cpu_smoke else TUNING_SHAPE
    # (BM, warps, stages, group): the default first, then one knob changed at a time (each compiles anew)
    grid = [(32, 4, 2, 4)] if cpu_smoke else [(64, 8, 2, 4), (64, 4, 2, 4), (64, 8, 3, 4), (64, 8, 2, 2),
                                              (64, 8, 2, 8), (128, 8, 2, 4)]
    rows, skipped = [], []
    for bm, warps, stages, group in grid:
        if time.monotonic() > deadline:
            skipped.append(f"BM={bm} w={warps} s={stages} g={group}")
            continue
        cfg = KernelConfig(block_m=bm, block_n=64, group=group, num_warps=warps, num_stages=stages)
        try:
            r = time_preconditioner(device, *shape, config=cfg)
            rows.append({"block_m": bm, "num_warps": warps, "num_stages": stages, "group": group,
                         "fwd_ms": r["precond_fwd_ms"], "bwd_ms": r["precond_bwd_ms"], "fwd_ratio": r["fwd_ratio"],
                         "bwd_ratio": r["bwd_ratio"]})
        except Exception as err:  # noqa: BLE001 - a config that cannot launch is a result too
            rows.append({"block_m": bm, "num_warps": warps, "num_stages": stages, "group": group,
                         "error": f"{type(err).__name__}: {str(err)[:120]}"})
    return {"status": "PASS", "shape": list(shape), "candidates": rows, "skipped": skipped}


def check_numerics(device, cpu_smoke: bool) -> dict:
    """bf16 LUCID vs bf16 flash attention errors against float64 (selftest.numerics), random and correlated
    keys; LUCID must stay within 2x flash's own error (the bound the CPU test also uses)."""
    import torch

    from .numerics import error_table

    if cpu_smoke:  # the interpreter's bf16 dot is wrong: fp16 stands in
        rows = error_table(device, n=64, heads=1, d=16, dtype=torch.float16)
    else:
        rows = error_table(device, n=4096, heads=4, d=128)
    ok = True
    for kind in ("random", "correlated"):
        lucid = max(v for r in rows if r["keys"] == kind and r["attention"] == "lucid" for k, v in r.items()
                    if k in ("out", "dq", "dk", "dv"))
        flash = max(v for r in rows if r["keys"] == kind and r["attention"] == "softmax" for k, v in r.items()
                    if k in ("out", "dq", "dk", "dv"))
        ok &= math.isfinite(lucid) and lucid <= NUMERICS_RATIO * flash
    return {"status": "PASS" if ok else "FAIL", "rows": rows, "bound": f"LUCID <= {NUMERICS_RATIO} x flash"}


NUMERICS_RATIO = 2.0
TUNING_SECONDS = 60.0  # after the timings' budget


def time_model_step(runtime, preset: str, tokens: int) -> dict:
    import torch

    from lucid_megatron.config import load_model_config
    from lucid_megatron.runtime.parallelize import build_model

    row = {"model": preset, "tokens": tokens}
    precision = "bf16" if runtime.device.type == "cuda" else "fp32"
    for kind, pattern in (("softmax", "none"), ("lucid", "all")):
        cfg = load_model_config(preset, {"lucid_layers": pattern, "max_seq_len": max(tokens, 2048)})
        model = build_model(runtime, cfg, precision=precision, initialize=False)
        with torch.no_grad():  # weights drawn on the device (CPU drawing of 1B weights is slow)
            for p in model.parameters():
                p.normal_(0.0, 0.02) if p.dim() > 1 else p.fill_(1.0)
        ids = torch.randint(0, cfg.vocab_size, (1, tokens), device=runtime.device)
        positions = torch.arange(tokens, device=runtime.device)[None]

        def step(model=model):
            model.zero_grad(set_to_none=True)
            model(ids, positions, None, labels=ids).float().mean().backward()

        ms, peak = _time_ms(step, runtime.device)
        if runtime.device.type == "cuda":
            peak += torch.cuda.memory_allocated(runtime.device)
        row[f"{kind}_ms"], row[f"{kind}_peak_gib"] = ms, peak / 2**30
        del model
        if runtime.device.type == "cuda":
            torch.cuda.empty_cache()
    row["ratio"] = row["lucid_ms"] / row["softmax_ms"]
    row["lucid_tokens_per_s"] = tokens / (row["lucid_ms"] / 1e3)
    return row


def check_timings(device, cpu_smoke: bool, deadline: float) -> dict:
    from lucid_megatron.runtime import start_runtime, stop_runtime

    if cpu_smoke:
        precond_shapes, model_shapes = [(1, 2, 64, 16)], [("tiny", 128)]
    else:
        precond_shapes = [(1, 8, 2048, 64), (1, 8, 8192, 64), (1, 8, 8192, 128), (4, 16, 8192, 128)]
        model_shapes = [("125m", 2048), ("125m", 8192), ("1b", 2048), ("1b", 8192)]
    result = {"status": "PASS", "preconditioner": [], "models": [], "skipped": []}
    for shape in precond_shapes:
        if time.monotonic() > deadline:
            result["skipped"].append(f"precond {shape}")
            continue
        result["preconditioner"].append(time_preconditioner(device, *shape))
    runtime = start_runtime(1, device=device)
    try:
        for preset, tokens in model_shapes:
            if time.monotonic() > deadline:
                result["skipped"].append(f"{preset}@{tokens}")
                continue
            result["models"].append(time_model_step(runtime, preset, tokens))
    finally:
        stop_runtime()
    return result


# ---- the run -----------------------------------------------------------------------------------------


def run_selftest(out: str | Path, *, cpu_smoke: bool = False, budget_s: float = 420.0) -> int:
    import torch

    started = time.monotonic()
    if not cpu_smoke and not torch.cuda.is_available():
        raise RuntimeError("no CUDA device here: run on a GPU machine, or pass --cpu-smoke")
    device = torch.device("cpu") if cpu_smoke else torch.device("cuda", 0)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    results = Results(out, {
        "date": time.strftime("%Y-%m-%d %H:%M"), "mode": "cpu-smoke" if cpu_smoke else "gpu",
        "device": torch.cuda.get_device_name(0) if not cpu_smoke else "CPU", "torch": torch.__version__,
        "triton": triton_version, "python": sys.version.split()[0],
    })

    def part(name, fn, *args):
        try:
            value = fn(*args)
        except Exception as err:  # record and go on: later parts still report
            value = {"status": "FAIL", "error": f"{type(err).__name__}: {err}"}
        results.record(name, value)
        return value

    part("kernels", check_kernels, device, cpu_smoke)
    part("numerics", check_numerics, device, cpu_smoke)
    config = _train_config(out, cpu_smoke)
    training = part("training", check_training, out, config, device)
    local = training.get("runs", {}).get("bf16-local", {})
    if local.get("status") in ("PASS", "FAIL") and local.get("losses"):
        part("resume", check_resume, out, config, local, device, cpu_smoke)
        part("hf", check_hf, out, local["run_dir"])
    else:
        results.record("resume", {"status": "FAIL", "error": "no bf16-local run to resume"})
        results.record("hf", {"status": "FAIL", "error": "no bf16-local run to export"})
    part("timings", check_timings, device, cpu_smoke, started + budget_s)
    part("tuning", tune_kernels, device, cpu_smoke, started + budget_s + TUNING_SECONDS)
    results.data["header"]["seconds"] = round(time.monotonic() - started, 1)
    results.record("done", {"status": "ok"})
    print((out / "results.md").read_text())
    return 1 if any(v.get("status") == "FAIL" for v in results.data["parts"].values()) else 0
