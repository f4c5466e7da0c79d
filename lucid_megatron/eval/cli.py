"""``lucid eval niah | mqar | ppl | scalars``.

    lucid eval niah (--checkpoint C | --hf DIR) [...] --lengths 256 512 1024 [--needles 4 --queries 2]
                    [--num-samples 100 --seed 0 --batch-size 8] [--out results.json] [--plot plot.png]
                    [--tensor-parallel-size T --context-parallel-size C [--cp-comm-type p2p]]
    lucid eval mqar (--checkpoint C | --hf DIR) [...] --pairs 8 16 32 [--key-vocab 64 --value-vocab 64
                    --updates 1] [the sampling, output and layout options of niah]
    lucid eval ppl --checkpoint C --data DIR [--split valid --seq-length L --rows N --bucket-size B] [...]
    lucid eval scalars RUN_DIR [--out PNG]      (a training run's TensorBoard scalars; default RUN_DIR/scalars.png)

With T x C > 1 the command starts torchrun for T x C processes (or runs under one) and evaluates the
checkpoint at that layout; only rank 0 writes. Everything that can be checked before the workers start is
checked first, in this process: the options, the outputs, the checkpoints' shapes against the layout, the
memory (lucid_megatron/memory_estimate.py).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from lucid_megatron import cli_args
from lucid_megatron.atomic import write_text as atomic_write_text
from lucid_megatron.memory_estimate import IGNORE_FLAG

MAX_TASK_SIZE = 1 << 20  # keys, queries, assignments, characters: the length check refuses far sooner


def _parallel_args(parser) -> None:
    parser.add_argument("--tensor-parallel-size", type=cli_args.positive_int(cli_args.MAX_PROCESSES), default=1)
    parser.add_argument("--context-parallel-size", type=cli_args.positive_int(cli_args.MAX_PROCESSES), default=1)
    parser.add_argument("--cp-comm-type", choices=["a2a", "p2p"], default="p2p")
    parser.add_argument(IGNORE_FLAG, action="store_true",
                        help="run even when the memory estimate exceeds the memory available (docs/cli.md)")


def _task_args(niah) -> None:
    from lucid_megatron.data.synth import MAX_FILLER_WORDS, TEMPLATES

    task_size = cli_args.positive_int(MAX_TASK_SIZE)
    niah.add_argument("--needles", type=task_size, default=1, help="distinct keys per document")
    niah.add_argument("--queries", type=task_size, default=1, help="how many are asked (the others are distractors)")
    niah.add_argument("--updates", type=task_size, default=1,
                      help="assignments per key; >1 is the key-update task (the answer is the latest value)")
    niah.add_argument("--key-len", type=task_size, default=4)
    niah.add_argument("--value-len", type=task_size, default=4)
    niah.add_argument("--key-vocab", type=cli_args.positive_int(26), default=26, help="letters keys are drawn from")
    niah.add_argument("--value-vocab", type=cli_args.positive_int(10), default=10,
                      help="digits values are drawn from")
    niah.add_argument("--template", choices=list(TEMPLATES), default="sentence", help="see lucid data synth")
    niah.add_argument("--filler-words", type=cli_args.positive_int(MAX_FILLER_WORDS), default=64)


def _model_args(parser) -> None:
    parser.add_argument("--checkpoint", action="append", default=[], type=cli_args.input_dir(),
                        help="Megatron checkpoint (repeatable)")
    parser.add_argument("--hf", action="append", default=[], type=cli_args.input_dir(),
                        help="Hugging Face model directory (repeatable)")
    parser.add_argument("--label", action="append", default=[], help="names for the models, in the order given")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let --hf directories run their own Python code (auto_map); only for directories you "
                             "trust")


def _sampling_args(parser, samples_help: str, plot_help: str) -> None:
    parser.add_argument("--num-samples", type=cli_args.positive_int(10**6), default=100, help=samples_help)
    parser.add_argument("--batch-size", type=cli_args.positive_int(cli_args.MAX_BATCH), default=8)
    parser.add_argument("--seed", type=cli_args.seed(), default=0)
    parser.add_argument("--out", type=cli_args.output_file(), help="JSON results (default: print only)")
    parser.add_argument("--plot", type=cli_args.output_file(), help=plot_help)


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="eval_command", metavar="{niah,mqar,ppl,scalars}", required=True)
    niah = sub.add_parser("niah", help="single/multi-needle retrieval accuracy vs context length")
    _model_args(niah)
    niah.add_argument("--lengths", type=cli_args.positive_int(cli_args.MAX_TOKENS), nargs="+", required=True)
    _task_args(niah)
    _sampling_args(niah, "documents per length", "PNG of exact match vs length")
    _parallel_args(niah)

    mqar = sub.add_parser("mqar", help="multi-query associative recall (and key update) vs number of pairs")
    _model_args(mqar)
    mqar.add_argument("--pairs", type=cli_args.positive_int(MAX_TASK_SIZE), nargs="+", required=True,
                      help="key-value pairs per document (distinct keys), one evaluation each")
    mqar.add_argument("--key-vocab", type=cli_args.positive_int(MAX_TASK_SIZE), default=64,
                      help="keys are token ids 0..key_vocab-1 (as trained)")
    mqar.add_argument("--value-vocab", type=cli_args.positive_int(MAX_TASK_SIZE), default=64,
                      help="values are the next value_vocab token ids (as trained)")
    mqar.add_argument("--updates", type=cli_args.positive_int(MAX_TASK_SIZE), default=1,
                      help="most assignments of one key (1-updates, uniformly); >1 is key update")
    _sampling_args(mqar, "documents per number of pairs", "PNG of exact match vs pairs")
    _parallel_args(mqar)

    ppl = sub.add_parser("ppl", help="validation loss/perplexity by position bucket")
    ppl.add_argument("--checkpoint", required=True, type=cli_args.input_dir())
    ppl.add_argument("--data", required=True, type=cli_args.input_dir(),
                     help="dataset directory (manifest.json + shards)")
    ppl.add_argument("--split", default="valid")
    ppl.add_argument("--seq-length", type=cli_args.int_in(2, cli_args.MAX_TOKENS), default=2048)
    ppl.add_argument("--rows", type=cli_args.positive_int(cli_args.MAX_COUNT), default=64, help="packed rows to score")
    ppl.add_argument("--batch-size", type=cli_args.positive_int(cli_args.MAX_BATCH), default=4,
                     help="rows per forward pass")
    ppl.add_argument("--bucket-size", type=cli_args.positive_int(cli_args.MAX_TOKENS), default=256)
    ppl.add_argument("--loss-tokens", choices=["all", "answer"], default="all")
    ppl.add_argument("--out", type=cli_args.output_file())
    ppl.add_argument("--plot", type=cli_args.output_file())
    _parallel_args(ppl)

    scalars = sub.add_parser("scalars", help="a training run's TensorBoard scalars in one PNG")
    scalars.add_argument("run_dir", type=cli_args.input_dir(), help="the run's --run-dir (reads RUN_DIR/tensorboard)")
    scalars.add_argument("--out", type=cli_args.output_file(), help="the PNG (default: RUN_DIR/scalars.png)")


def _is_writer() -> bool:
    # From the launcher's RANK, not the process group: the scorer tears its group down before results are written.
    return int(os.environ.get("RANK", "0")) == 0


def _fail(message: str, code: int = cli_args.USAGE) -> int:
    if not _is_writer():  # every worker finds the same problem: rank 0 says it once
        return code
    return cli_args.fail("eval", message, code)


def _write(args, results: dict, plot_fn, title: str) -> None:
    if not _is_writer():
        return
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.out, json.dumps(results, indent=1))
        print(f"wrote {args.out}")
    if args.plot:
        Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
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


# ------------------------------------------------------------------------------------------ checks first


def _check_outputs(args) -> None:
    from lucid_megatron.atomic import check_output_file

    for option, path in (("--out", args.out), ("--plot", args.plot)):
        if path is not None:
            check_output_file(path, label=option)


def _checkpoint_shape(path, args):
    """The checkpoint's ModelShape, after checking that the layout splits its model (ValueError naming both)."""
    from lucid_megatron.checkpoint import read_model_config, resolve_checkpoint
    from lucid_megatron.config.parallel import ParallelConfig, check_model_fits
    from lucid_megatron.memory_estimate import ModelShape

    cfg = read_model_config(resolve_checkpoint(path))
    layout = ParallelConfig(tensor_parallel_size=args.tensor_parallel_size,
                            context_parallel_size=args.context_parallel_size, cp_comm_type=args.cp_comm_type)
    try:
        check_model_fits(cfg, layout)
    except ValueError as err:
        raise ValueError(f"--checkpoint {path}: {err} (--tensor-parallel-size {args.tensor_parallel_size}, "
                         f"--context-parallel-size {args.context_parallel_size})") from None
    return ModelShape.of_config(cfg)


def _hf_shape(path):
    """The ModelShape of a Hugging Face directory's config.json (FileNotFoundError / ValueError naming it)."""
    from lucid_megatron.memory_estimate import ModelShape

    config_file = Path(path) / "config.json"
    if not Path(path).is_dir():
        raise FileNotFoundError(f"--hf {str(path)!r} does not exist")
    if not config_file.is_file():
        raise FileNotFoundError(f"--hf {str(path)!r} has no config.json: not a Hugging Face model directory")
    try:
        return ModelShape.of_hf_config(json.loads(config_file.read_text()))
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{config_file}: not a model config this command reads "
                         f"({type(err).__name__}: {err})") from None


def _check_context_parallel_lengths(lengths: list[int], option: str, cp: int) -> None:
    short = [n for n in lengths if n < 2 * cp]
    if short:
        raise ValueError(f"{option} {short} is shorter than 2 x --context-parallel-size = {2 * cp}: the zigzag "
                         "layout gives every context-parallel rank two chunks of each sequence")


def _model_estimate(args, shape, *, rows: int, length: int, documents: int, on_gpu: bool):
    """What evaluating one model takes on this machine (memory_estimate.py's formula)."""
    from lucid_megatron import memory_estimate as mem

    tp, cp = args.tensor_parallel_size, args.context_parallel_size
    parts = {"weights": mem.weights_bytes(shape, tensor_parallel=tp)}
    if not on_gpu:  # on a GPU the forward's buffers live in GPU memory
        parts.update(mem.forward_bytes(shape, rows=rows, length=length, context_parallel=cp))
    if documents:
        parts["documents"] = mem.documents_bytes(documents=documents, length=length)
    return mem.MemoryEstimate(parts, processes=tp * cp)


def _check_memory(args, shapes, *, rows: int, length: int, documents: int) -> None:
    """Refuse sizes that cannot fit, unless --ignore-memory-check; in the process that starts the work only
    (workers started by torchrun would count each other's memory as taken)."""
    import torch

    from lucid_megatron.memory_estimate import check_fits

    if args.ignore_memory_check or not shapes or "WORLD_SIZE" in os.environ:
        return
    on_gpu = torch.cuda.is_available()
    estimates = [_model_estimate(args, shape, rows=rows, length=length, documents=documents, on_gpu=on_gpu)
                 for shape in shapes]  # the models are evaluated one after the other
    check_fits(max(estimates, key=lambda estimate: estimate.total),
               what=f"lucid eval {args.eval_command} with {rows} x {length} tokens per forward pass")


def _check_models(args, length: int) -> None:
    """The --checkpoint / --hf models, their labels and layout, and the memory to score documents of ``length``."""
    models = len(args.checkpoint) + len(args.hf)
    if not models:
        raise ValueError("give at least one --checkpoint or --hf")
    if args.label and len(args.label) != models:
        raise ValueError(f"{len(args.label)} --label for {models} models")
    if args.hf and args.tensor_parallel_size * args.context_parallel_size > 1:
        raise ValueError("Hugging Face models (--hf) are evaluated in one process: leave --tensor-parallel-size "
                         "and --context-parallel-size at 1")
    shapes = [_checkpoint_shape(path, args) for path in args.checkpoint] + [_hf_shape(path) for path in args.hf]
    from lucid_megatron.convert.hf_io import check_hf_model_dir

    for path in args.hf:  # weights present, with the shapes config.json implies
        check_hf_model_dir(path, trust_remote_code=args.trust_remote_code)
    _check_memory(args, shapes, rows=min(args.batch_size, args.num_samples), length=length,
                  documents=args.num_samples)


def _niah_preflight(args) -> None:
    task = task_from_args(args)
    too_short = [n for n in args.lengths if n < task.minimum_length()]
    if too_short:
        raise ValueError(f"--lengths {too_short} cannot hold {args.needles} keys x {args.updates} assignments and "
                         f"{args.queries} queries; the minimum is {task.minimum_length()} tokens")
    _check_context_parallel_lengths(args.lengths, "--lengths", args.context_parallel_size)
    _check_models(args, max(args.lengths))


def mqar_task_from_args(args):
    """The MqarTask the mqar options describe (its training range is the largest --pairs: not used here)."""
    from lucid_megatron.data.mqar import MqarTask
    from lucid_megatron.data.tokenizer import ByteTokenizer

    too_many = [n for n in args.pairs if n > args.key_vocab]
    if too_many:
        raise ValueError(f"--pairs {too_many} exceed --key-vocab {args.key_vocab}: each pair needs its own key")
    task = MqarTask(min_pairs=1, max_pairs=max(args.pairs), key_vocab=args.key_vocab,
                    value_vocab=args.value_vocab, updates=args.updates)
    task.check_tokenizer(ByteTokenizer())
    return task


def _mqar_preflight(args) -> None:
    task = mqar_task_from_args(args)
    lengths = [task.max_length(n) for n in args.pairs]
    _check_context_parallel_lengths([task.max_length(min(args.pairs))], "--pairs", args.context_parallel_size)
    _check_models(args, max(lengths))


def _ppl_preflight(args) -> None:
    from lucid_megatron.data.shards import read_manifest
    from lucid_megatron.eval import ppl

    _check_context_parallel_lengths([args.seq_length], "--seq-length", args.context_parallel_size)
    shape = _checkpoint_shape(args.checkpoint, args)
    manifest = read_manifest(args.data)
    if not _split_shards(manifest, args.split):
        raise ValueError(f"{args.data}: split {args.split!r} has no shards")
    note = ppl.check_tokenizer(args.checkpoint, args.data, manifest)
    if note and _is_writer() and "WORLD_SIZE" not in os.environ:
        print(f"lucid eval: note: {note}", flush=True)
    _check_memory(args, [shape], rows=args.batch_size, length=args.seq_length, documents=0)


def _split_shards(manifest, split: str) -> int:
    info = manifest.splits.get(split)
    return len(info.shards) if info else 0


def preflight(args) -> None:
    """Everything that can be checked before any worker starts (raises one of cli_args.BAD_INPUT_ERRORS)."""
    _check_outputs(args)
    {"niah": _niah_preflight, "mqar": _mqar_preflight, "ppl": _ppl_preflight}[args.eval_command](args)


# ------------------------------------------------------------------------------------------ the work


def _scored_models(args, evaluate):
    """``{label: evaluate(scorer)}`` for every --checkpoint and --hf model, one after the other."""
    from lucid_megatron.eval.scorers import HFScorer, MegatronScorer

    models = [("checkpoint", c) for c in args.checkpoint] + [("hf", h) for h in args.hf]
    labels = args.label or [Path(path).name if Path(path).name not in ("checkpoints", "") else str(path)
                            for _, path in models]
    for label, (kind, path) in zip(labels, models):
        if kind == "hf":
            scorer = HFScorer(path, trust_remote_code=args.trust_remote_code)
        else:
            scorer = MegatronScorer(path, tp=args.tensor_parallel_size, cp=args.context_parallel_size,
                                    cp_comm_type=args.cp_comm_type)
        try:
            yield label, evaluate(scorer)
        finally:
            scorer.close()


def _mqar(args) -> int:
    from lucid_megatron.eval import mqar

    task = mqar_task_from_args(args)
    results = {"task": {"pairs": args.pairs, "key_vocab": args.key_vocab, "value_vocab": args.value_vocab,
                        "updates": args.updates, "num_samples": args.num_samples, "seed": args.seed},
               "models": {}}
    for label, by_pairs in _scored_models(args, lambda scorer: mqar.evaluate(
            scorer, task, args.pairs, num_samples=args.num_samples, seed=args.seed, batch_size=args.batch_size)):
        results["models"][label] = by_pairs
        if _is_writer():
            cells = "  ".join(f"{n}: {r['exact_match']:.3f} ({r['answer_loss']:.3f} nats)" for n, r in by_pairs.items())
            print(f"{label}: exact match (answer loss) by pairs  {cells}", flush=True)
    kind = "MQAR" if args.updates == 1 else f"key update (1-{args.updates} assignments per key)"
    _write(args, results, lambda r, p, t: mqar.plot(r["models"], p, t), kind)
    return 0


def _niah(args) -> int:
    from lucid_megatron.eval import niah

    task = task_from_args(args)
    results = {"task": {"needles": args.needles, "queries": args.queries, "updates": args.updates,
                        "key_len": args.key_len, "value_len": args.value_len, "key_vocab": args.key_vocab,
                        "value_vocab": args.value_vocab, "template": args.template,
                        "filler_words": args.filler_words, "num_samples": args.num_samples, "seed": args.seed,
                        "lengths": args.lengths}, "models": {}}
    for label, by_length in _scored_models(args, lambda scorer: niah.evaluate(
            scorer, task, args.lengths, num_samples=args.num_samples, seed=args.seed, batch_size=args.batch_size)):
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

    shards = _split_shards(read_manifest(args.data), args.split)
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


def _scalars(args) -> int:
    """Draw a run's TensorBoard scalars (lucid_megatron/eval/scalars.py); reads event files, starts no model."""
    from lucid_megatron.atomic import check_output_file
    from lucid_megatron.eval import scalars

    out = args.out or str(Path(args.run_dir) / "scalars.png")
    try:
        check_output_file(out, label="--out")
        drawn = scalars.plot_scalars(args.run_dir, out)
    except cli_args.BAD_INPUT_ERRORS as err:
        return cli_args.fail("eval", str(err), cli_args.exit_code(err))
    print(f"wrote {out}: {scalars.count_panels(drawn)} panels of {len(drawn)} scalars from "
          f"{scalars.event_dir(args.run_dir)}")
    return 0


def run(args) -> int:
    if args.eval_command == "scalars":  # no model, no processes: none of the checks below apply
        return _scalars(args)
    import torch

    try:
        preflight(args)
    except cli_args.BAD_INPUT_ERRORS as err:
        return _fail(str(err), cli_args.exit_code(err))
    world = args.tensor_parallel_size * args.context_parallel_size
    if world > 1 and "WORLD_SIZE" not in os.environ:  # start the processes
        from lucid_megatron.runtime.torchrun import run_torchrun

        return run_torchrun(world, args._argv)
    try:
        return {"niah": _niah, "mqar": _mqar, "ppl": _ppl}[args.eval_command](args)
    except cli_args.BAD_INPUT_ERRORS as err:
        return _fail(str(err), cli_args.exit_code(err))
    except (MemoryError, torch.cuda.OutOfMemoryError) as err:
        return _fail(f"out of memory ({type(err).__name__}); lower --batch-size or the lengths", cli_args.FAILURE)
