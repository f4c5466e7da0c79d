"""``lucid experiment repro | toy``.

    lucid experiment repro configs/repro/experiment.yaml --out results/repro [--jobs 2]
                           [--only softmax lucid] [--seeds 0 1] [--set train.steps=10] [--eval-samples 8]
    lucid experiment toy --out results/toy [--steps 1500] [--seeds 0 1 2] [--no-residual]

``repro`` trains and evaluates every condition x seed (resumable; see lucid_megatron/experiment/repro.py)
and writes results.json, table.md and one PNG per plot group.  ``toy`` runs the authors' one-layer
attention-sink experiment for softmax and LUCID and writes toy.json and toy.png.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="experiment_command", metavar="{repro,toy}", required=True)
    repro = sub.add_parser("repro", help="LUCID vs softmax needle retrieval over conditions and seeds")
    repro.add_argument("experiment", help="experiment YAML (e.g. configs/repro/experiment.yaml)")
    repro.add_argument("--out", required=True, help="output directory (runs/, results.json, table.md, plots)")
    repro.add_argument("--jobs", type=int, default=2, help="runs in parallel (CPU threads are split between them)")
    repro.add_argument("--only", nargs="+", help="run only these conditions")
    repro.add_argument("--seeds", type=int, nargs="+", help="run only these seeds")
    repro.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                       help="override a training value in every condition (e.g. for a smoke run)")
    repro.add_argument("--eval-samples", type=int, help="documents per evaluation length (default: the file's)")

    toy = sub.add_parser("toy", help="one attention layer: identity, then cumulative average (attention sink)")
    toy.add_argument("--out", required=True)
    toy.add_argument("--steps", type=int, default=1500, help="optimizer steps per phase")
    toy.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    toy.add_argument("--lr", type=float, default=1e-3)
    toy.add_argument("--no-residual", action="store_true", help="the head reads the attention output alone")


def _fail(message: str) -> int:
    print(f"lucid experiment: error: {message}", file=sys.stderr)
    return 2


def _repro(args) -> int:
    from lucid_megatron.experiment.repro import load_experiment, run_experiment

    exp = load_experiment(args.experiment)
    eval_overrides = {"num_samples": args.eval_samples} if args.eval_samples else None
    run_experiment(exp, Path(args.out), jobs=args.jobs, only=args.only, seeds=args.seeds, extra=args.overrides,
                   eval_overrides=eval_overrides)
    print(f"wrote {Path(args.out) / 'table.md'}")
    return 0


def _toy(args) -> int:
    from lucid_megatron.atomic import write_text as atomic_write_text
    from lucid_megatron.experiment import toy

    if args.steps < 1:
        return _fail(f"--steps={args.steps}: must be >= 1")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results, summary = {}, {}
    for attention in ("softmax", "lucid"):
        for seed in args.seeds:
            cfg = toy.ToyConfig(phase_steps=args.steps, seed=seed, lr=args.lr, residual=not args.no_residual)
            curves, sink = toy.train_toy(cfg, attention)
            results[(attention, seed)] = curves
            final = {phase: toy.final_loss(c) for phase, c in curves.items()}
            summary[f"{attention}/seed{seed}"] = {**final, "first_token_attention": sink}
            print(f"{attention:8s} seed {seed}: final loss identity {final['identity']:.4f} (first-token attention "
                  f"{sink['identity']:.2f})  cumulative average {final['cumavg']:.4f} (first-token attention "
                  f"{sink['cumavg']:.2f})", flush=True)
    fixed = {k: v for k, v in vars(toy.ToyConfig()).items() if k not in ("phase_steps", "seed", "lr", "residual")}
    payload = {"config": {"steps_per_phase": args.steps, "seeds": args.seeds, "lr": args.lr,
                          "residual": not args.no_residual, **fixed},
               "final_loss": summary,
               "curves": {f"{a}/seed{s}": c for (a, s), c in results.items()}}
    atomic_write_text(out / "toy.json", json.dumps(payload, indent=1))
    title = "one attention layer: identity, then cumulative average" + (" (no residual)" if args.no_residual else "")
    toy.plot(results, out / "toy.png", title)
    print(f"wrote {out / 'toy.json'} and {out / 'toy.png'}")
    return 0


def run(args) -> int:
    try:
        return {"repro": _repro, "toy": _toy}[args.experiment_command](args)
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        return _fail(str(err))
