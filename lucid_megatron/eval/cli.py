"""``lucid eval niah | ppl``.

    lucid eval niah (--checkpoint C | --hf DIR) [...] --lengths 256 512 1024 [--needles 4 --queries 2]
                    [--num-samples 100 --seed 0 --batch-size 8] [--out results.json] [--plot plot.png]
                    [--tensor-parallel-size T --context-parallel-size C [--cp-comm-type p2p]]
    lucid eval ppl --checkpoint C --data DIR [--split valid --seq-length L --rows N --bucket-size B] [...]

With T x C > 1 the command starts torchrun for T x C processes (or runs under one) and evaluates the
checkpoint at that layout; only rank 0 writes.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from lucid_megatron.atomic import write_text as atomic_write_text


def _parallel_args(parser) -> None:
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--context-parallel-size", type=int, default=1)
    parser.add_argument("--cp-comm-type", choices=["a2a", "p2p"], default="p2p")


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="eval_command", metavar="{niah,ppl}", required=True)
    niah = sub.add_parser("niah", help="single/multi-needle retrieval accuracy vs context length")
    niah.add_argument("--checkpoint", action="append", default=[], help="Megatron checkpoint (repeatable)")
    niah.add_argument("--hf", action="append", default=[], help="Hugging Face model directory (repeatable)")
    niah.add_argument("--label", action="append", default=[], help="names for the models, in the order given")
    niah.add_argument("--trust-remote-code", action="store_true",
                      help="let --hf directories run their own Python code (auto_map); only for directories you trust")
    niah.add_argument("--lengths", type=int, nargs="+", required=True)
    niah.add_argument("--needles", type=int, default=1, help="distinct keys per document")
    niah.add_argument("--queries", type=int, default=1, help="how many are asked (the others are distractors)")
    niah.add_argument("--updates", type=int, default=1,
                      help="assignments per key; >1 is the key-update task (the answer is the latest value)")
    niah.add_argument("--key-len", type=int, default=4)
    niah.add_argument("--value-len", type=int, default=4)
    niah.add_argument("--key-vocab", type=int, default=26, help="letters keys are drawn from")
    niah.add_argument("--value-vocab", type=int, default=10, help="digits values are drawn from")
    niah.add_argument("--template", default="sentence", help="'sentence' or 'compact' (see lucid data synth)")
    niah.add_argument("--filler-words", type=int, default=64)
    niah.add_argument("--num-samples", type=int, default=100, help="documents per length")
    niah.add_argument("--batch-size", type=int, default=8)
    niah.add_argument("--seed", type=int, default=0)
    niah.add_argument("--out", help="JSON results (default: print only)")
    niah.add_argument("--plot", help="PNG of exact match vs length")
    _parallel_args(niah)

    ppl = sub.add_parser("ppl", help="validation loss/perplexity by position bucket")
    ppl.add_argument("--checkpoint", required=True)
    ppl.add_argument("--data", required=True, help="dataset directory (manifest.json + shards)")
    ppl.add_argument("--split", default="valid")
    ppl.add_argument("--seq-length", type=int, default=2048)
    ppl.add_argument("--rows", type=int, default=64, help="packed rows to score")
    ppl.add_argument("--batch-size", type=int, default=4, help="rows per forward pass")
    ppl.add_argument("--bucket-size", type=int, default=256)
    ppl.add_argument("--loss-tokens", choices=["all", "answer"], default="all")
    ppl.add_argument("--out")
    ppl.add_argument("--plot")
    _parallel_args(ppl)


def _fail(message: str) -> int:
    print(f"lucid eval: error: {message}", file=sys.stderr)
    return 2


def _is_writer() -> bool:
    # From the launcher's RANK, not the process group: the scorer tears its group down before results are written.
    return int(os.environ.get("RANK", "0")) == 0


def _write(args, results: dict, plot_fn, title: str) -> None:
    if not _is_writer():
        return
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(results, indent=1))
        print(f"wrote {args.out}")
    if args.plot:
        plot_fn(results, args.plot, title)
        print(f"wrote {args.plot}")


def task_from_args(args):
    """The RetrievalTask the niah options describe.  Each length gets exact-length documents, so the task is
    built roomy and the caller checks every length against its minimum (naming the ones too short)."""
    from lucid_megatron.data.synth import RetrievalTask

    roomy = max(args.lengths + [1 << 20])
    return RetrievalTask(min_len=roomy, max_len=roomy, num_needles=args.needles, num_queries=args.queries,
                         key_len=args.key_len, value_len=args.value_len, filler_words=args.filler_words,
                         updates=args.updates, key_vocab=args.key_vocab, value_vocab=args.value_vocab,
                         template=args.template)


def _niah(args) -> int:
    from lucid_megatron.eval import niah
    from lucid_megatron.eval.scorers import HFScorer, MegatronScorer

    models = [("checkpoint", c) for c in args.checkpoint] + [("hf", h) for h in args.hf]
    if not models:
        return _fail("give at least one --checkpoint or --hf")
    if args.label and len(args.label) != len(models):
        return _fail(f"{len(args.label)} --label for {len(models)} models")
    labels = args.label or [Path(path).name if Path(path).name not in ("checkpoints", "") else str(path)
                            for _, path in models]
    task = task_from_args(args)
    too_short = [n for n in args.lengths if n < task.minimum_length()]
    if too_short:
        return _fail(f"--lengths {too_short} cannot hold {args.needles} keys x {args.updates} assignments and "
                     f"{args.queries} queries; the minimum is {task.minimum_length()} tokens")
    results = {"task": {"needles": args.needles, "queries": args.queries, "updates": args.updates,
                        "key_len": args.key_len, "value_len": args.value_len, "key_vocab": args.key_vocab,
                        "value_vocab": args.value_vocab, "template": args.template,
                        "filler_words": args.filler_words, "num_samples": args.num_samples, "seed": args.seed,
                        "lengths": args.lengths}, "models": {}}
    for label, (kind, path) in zip(labels, models):
        if kind == "hf":
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                return _fail("Hugging Face models are evaluated in one process")
            scorer = HFScorer(path, trust_remote_code=args.trust_remote_code)
        else:
            scorer = MegatronScorer(path, tp=args.tensor_parallel_size, cp=args.context_parallel_size,
                                    cp_comm_type=args.cp_comm_type)
        try:
            by_length = niah.evaluate(scorer, task, args.lengths, num_samples=args.num_samples, seed=args.seed,
                                      batch_size=args.batch_size)
        finally:
            scorer.close()
        results["models"][label] = by_length
        if _is_writer():
            cells = "  ".join(f"{n}: {r['exact_match']:.3f} ({r['answer_loss']:.3f} nats)"
                              for n, r in by_length.items())
            print(f"{label}: exact match (answer loss) by length  {cells}", flush=True)
    _write(args, results, lambda r, p, t: niah.plot(r["models"], p, t),
           f"retrieval, {args.needles} key(s) x {args.updates} assignment(s), {args.queries} queried")
    return 0


def _ppl(args) -> int:
    from lucid_megatron.data.loader import make_eval_loader
    from lucid_megatron.data.shards import read_manifest
    from lucid_megatron.eval import ppl
    from lucid_megatron.eval.scorers import MegatronScorer

    manifest = read_manifest(args.data)
    shards = len(manifest.splits.get(args.split).shards) if manifest.splits.get(args.split) else 0
    if not shards:
        return _fail(f"{args.data}: split {args.split!r} has no shards")
    scorer = MegatronScorer(args.checkpoint, tp=args.tensor_parallel_size, cp=args.context_parallel_size,
                            cp_comm_type=args.cp_comm_type)
    try:
        batches = make_eval_loader(args.data, split=args.split, seq_length=args.seq_length,
                                   micro_batch_size=args.batch_size, dp_rank=0, dp_size=1,
                                   num_streams=min(shards, 8), max_rows=args.rows, loss_tokens=args.loss_tokens)
        result = ppl.evaluate(scorer, batches, bucket_size=args.bucket_size)
    finally:
        scorer.close()
    if _is_writer():
        print(f"validation loss {result['loss']:.4f} (perplexity {result['perplexity']:.2f}) over {result['tokens']} tokens")
        for bucket, r in result["by_position"].items():
            print(f"  positions {bucket:>12s}: loss {r['loss']:.4f}  ({r['tokens']} tokens)")
    _write(args, result, ppl.plot, f"validation loss by position ({args.split})")
    return 0


def run(args) -> int:
    world = args.tensor_parallel_size * args.context_parallel_size
    if world > 1 and "WORLD_SIZE" not in os.environ:  # start the processes
        from lucid_megatron.runtime.torchrun import run_torchrun

        return run_torchrun(world, args._argv)
    try:
        return {"niah": _niah, "ppl": _ppl}[args.eval_command](args)
    except (FileNotFoundError, ValueError) as err:
        return _fail(str(err))
