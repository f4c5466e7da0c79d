"""``lucid experiment repro | extend | toy``.

    lucid experiment repro configs/repro/experiment.yaml --out results/repro [--jobs 2]
                           [--only softmax lucid] [--seeds 0 1] [--set train.steps=10] [--eval-samples 8]
    lucid experiment extend configs/context-extension/recipe.yaml --out results/context-extension [--jobs 2]
                            [--seeds 0] [--set train.steps=10] [--eval-samples 8]
    lucid experiment toy --out results/toy [--steps 30000] [--seeds 0 1] [--residual]

``repro`` trains and evaluates every condition x seed (resumable; see lucid_megatron/experiment/repro.py)
and writes results.json, table.md and one PNG per plot group.  ``extend`` trains the short model of each
attention x seed, continues it once per RoPE variant, scores all of them (lucid_megatron/experiment/extension.py)
and writes results.json and table.md.  ``toy`` runs the authors' one-layer
attention-sink experiment for softmax and LUCID and writes toy.json, toy.png (loss curves) and attention.png
(attention sharpness over training); each finished run is kept under runs/, so an interrupted call resumes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from lucid_megatron import cli_args


MAX_JOBS = 256
MAX_STEPS = 10**8


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="experiment_command", metavar="{repro,extend,toy}", required=True)
    repro = sub.add_parser("repro", help="LUCID vs softmax over conditions, seeds and tasks (needle retrieval, key update, MQAR)")
    repro.add_argument("experiment", type=cli_args.input_file(),
                       help="experiment YAML (e.g. configs/repro/mqar/experiment.yaml)")
    _run_options(repro, outputs="runs/, results.json, table.md, plots", parallel="runs",
                 overridden="every condition")
    repro.add_argument("--only", nargs="+", help="run only these conditions")

    extend = sub.add_parser("extend", help="context extension: a short model continued at 4x with each RoPE variant")
    extend.add_argument("recipe", type=cli_args.input_file(),
                        help="recipe YAML (e.g. configs/context-extension/recipe.yaml)")
    _run_options(extend, outputs="data/, runs/, results.json, table.md", parallel="(attention, seed) chains",
                 overridden="every run of both stages")

    toy = sub.add_parser("toy", help="one attention layer: identity, then cumulative average (attention sink)")
    toy.add_argument("--out", required=True, type=cli_args.output_dir(), help="a rerun continues in it")
    toy.add_argument("--steps", type=cli_args.positive_int(MAX_STEPS), default=30000,
                     help="optimizer steps per phase (the authors': 30,000)")
    toy.add_argument("--seeds", type=cli_args.seed(), nargs="+", default=[0, 1])
    toy.add_argument("--lr", type=cli_args.float_in(0, 10, low_open=True), default=1e-3)
    toy.add_argument("--residual", action="store_true",
                     help="add the embedding back (x + attention(x)); the authors' head reads the attention alone")


def _run_options(parser, *, outputs: str, parallel: str, overridden: str) -> None:
    """What the experiments that train through ``lucid train`` share: output, parallel runs, seeds, overrides."""
    parser.add_argument("--out", required=True, type=cli_args.output_dir(),
                        help=f"output directory ({outputs}); a rerun continues in it")
    parser.add_argument("--jobs", type=cli_args.positive_int(MAX_JOBS), default=2,
                        help=f"{parallel} in parallel (CPU threads are split between them)")
    parser.add_argument("--seeds", type=cli_args.seed(), nargs="+", help="run only these seeds")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help=f"override a training value in {overridden} (e.g. for a smoke run)")
    parser.add_argument("--eval-samples", type=cli_args.positive_int(10**6),
                        help="documents per evaluation length (default: the file's)")


def _fail(message: str, code: int = cli_args.USAGE) -> int:
    return cli_args.fail("experiment", message, code)


def _repro(args) -> int:
    from lucid_megatron.experiment.repro import load_experiment, run_experiment

    exp = load_experiment(args.experiment)
    eval_overrides = {"num_samples": args.eval_samples} if args.eval_samples else None
    run_experiment(exp, Path(args.out), jobs=args.jobs, only=args.only, seeds=args.seeds, extra=args.overrides,
                   eval_overrides=eval_overrides)
    print("wrote " + ", ".join(str(task.out(Path(args.out)) / "table.md") for task in exp.tasks.values()))
    return 0


def _extend(args) -> int:
    from lucid_megatron.experiment.extension import load_recipe, run_recipe

    recipe = load_recipe(args.recipe)
    run_recipe(recipe, Path(args.out), jobs=args.jobs, seeds=args.seeds, extra=args.overrides,
               eval_samples=args.eval_samples)
    print(f"wrote {Path(args.out) / 'table.md'}")
    return 0


def _toy_run(args, attention: str, seed: int, run_file: Path) -> dict:
    """Train one (attention, seed) unless ``run_file`` already holds it at the same settings (resumable)."""
    from lucid_megatron.atomic import write_text as atomic_write_text
    from lucid_megatron.experiment import toy

    cfg = toy.ToyConfig(phase_steps=args.steps, seed=seed, lr=args.lr, residual=args.residual)
    settings = dataclasses.asdict(cfg)
    if run_file.exists():
        done = json.loads(run_file.read_text())
        if done["config"] == settings:
            return done
    curves, stats = toy.train_toy(cfg, attention)
    done = {"config": settings, "curves": curves, "stats": stats}
    atomic_write_text(run_file, json.dumps(done))
    return done


def _toy(args) -> int:
    from lucid_megatron.atomic import write_text as atomic_write_text
    from lucid_megatron.experiment import toy

    out = Path(args.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    curves_by_run, stats_by_run, summary = {}, {}, {}
    for attention in ("softmax", "lucid"):
        for seed in args.seeds:
            run = _toy_run(args, attention, seed, out / "runs" / f"{attention}-seed{seed}.json")
            curves = {phase: [tuple(p) for p in c] for phase, c in run["curves"].items()}
            curves_by_run[(attention, seed)], stats_by_run[(attention, seed)] = curves, run["stats"]
            final = {phase: toy.final_loss(c) for phase, c in curves.items()}
            end = {phase: s["end"] for phase, s in run["stats"].items()}
            summary[f"{attention}/seed{seed}"] = {
                "final_loss": final, "attention_after": end,
                "cumavg_steps_to_loss_below": {str(t): toy.steps_to_reach(curves["cumavg"], t) for t in (0.1, 0.01)}}
            one, two = end["identity"], end["cumavg"]
            print(f"{attention:8s} seed {seed}: identity loss {final['identity']:.2e} (max weight "
                  f"{one['max_weight']:.3f}, logit range {one['logit_range']:.1f}, first token {one['first_token']:.3f})"
                  f"  cumulative average loss {final['cumavg']:.2e} (max weight {two['max_weight']:.3f}, "
                  f"first token {two['first_token']:.3f})", flush=True)
    fixed = {k: v for k, v in vars(toy.ToyConfig()).items() if k not in ("phase_steps", "seed", "lr", "residual")}
    payload = {"config": {"steps_per_phase": args.steps, "seeds": args.seeds, "lr": args.lr,
                          "residual": args.residual, **fixed},
               "summary": summary,
               "curves": {f"{a}/seed{s}": c for (a, s), c in curves_by_run.items()},
               "attention_trajectory": {f"{a}/seed{s}": st for (a, s), st in stats_by_run.items()}}
    atomic_write_text(out / "toy.json", json.dumps(payload, indent=1))
    title = "one attention layer: identity, then cumulative average" + (" (with residual)" if args.residual else "")
    toy.plot(curves_by_run, out / "toy.png", title)
    toy.plot_sharpness(stats_by_run, out / "attention.png", title)
    print(f"wrote {out / 'toy.json'}, {out / 'toy.png'} and {out / 'attention.png'}")
    return 0


def run(args) -> int:
    try:
        cli_args.check_resumable_dir(args.out, "--out")
        return {"repro": _repro, "extend": _extend, "toy": _toy}[args.experiment_command](args)
    except cli_args.BAD_INPUT_ERRORS as err:
        return _fail(str(err), cli_args.exit_code(err))
    except RuntimeError as err:  # a run of the experiment failed (it names its log)
        return _fail(str(err), cli_args.FAILURE)
