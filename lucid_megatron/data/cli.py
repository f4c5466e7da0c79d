"""``lucid data synth`` and ``lucid data prepare``: write token shards plus their manifest."""

from __future__ import annotations

from lucid_megatron import cli_args
from lucid_megatron.memory_estimate import IGNORE_FLAG

DEFAULT_TASK = {"min_len": 256, "max_len": 512, "num_needles": 4, "num_queries": 1, "key_len": 4, "value_len": 4,
                "filler_words": 64, "updates": 1, "key_vocab": 26, "value_vocab": 10, "template": "sentence"}
TASK_HELP = {
    "num_needles": "distinct keys per document",
    "num_queries": "keys asked at the end (the others are distractors)",
    "updates": "assignments per key (mqar: at most, 1-updates uniformly), each changing its value; >1 is the "
               "key-update task (answer: the latest value)",
    "key_vocab": "retrieval: letters keys are drawn from (1-26); mqar: keys are token ids 0..key_vocab-1 (default 64)",
    "value_vocab": "retrieval: digits values are drawn from (1-10); mqar: values are the next value_vocab token ids "
                   "(default 64)",
    "filler_words": "size of the haystack's word list (the distractor words between assignments)",
    "template": "'sentence' (' key A is 3.' / ' what is A? 3.') or 'compact' (' A3' / ' ?A3')",
}
MAX_TASK_SIZE = 1 << 20  # keys, queries, assignments, characters: RetrievalTask's length check refuses far sooner
MAX_DOCS_PER_SHARD = 10**7
MQAR_HELP = {"min_pairs": "fewest key-value pairs (distinct keys) in a document", "max_pairs": "most of them"}
MQAR_FIELDS = ["min_pairs", "max_pairs", "key_vocab", "value_vocab", "updates"]  # MqarTask's, in its order


def _task_options(parser) -> None:
    """One option per RetrievalTask and MqarTask field, default None = the task's own default (each task
    checks its values and how they combine; an option of the other task is refused)."""
    from .synth import MAX_FILLER_WORDS, TEMPLATES

    task_size = cli_args.positive_int(MAX_TASK_SIZE)
    length = cli_args.positive_int(cli_args.MAX_TOKENS)
    types = {"min_len": length, "max_len": length, "filler_words": cli_args.positive_int(MAX_FILLER_WORDS)}
    parser.add_argument("--task", choices=["retrieval", "mqar"], default="retrieval",
                        help="'retrieval' (keys and values as text in a haystack of words; the default) or 'mqar' "
                             "(multi-query associative recall: single-token keys and values, docs/data.md)")
    for name in DEFAULT_TASK:
        kind = {"choices": list(TEMPLATES)} if name == "template" else {"type": types.get(name, task_size)}
        parser.add_argument("--" + name.replace("_", "-"), default=None, help=TASK_HELP.get(name), **kind)
    for name, text in MQAR_HELP.items():
        parser.add_argument("--" + name.replace("_", "-"), type=task_size, default=None, help=text)


def task_from_args(args):
    """The RetrievalTask or MqarTask of ``lucid data synth``'s options (ValueError naming a misplaced option)."""
    from .mqar import MqarTask
    from .synth import RetrievalTask

    fields = MQAR_FIELDS if args.task == "mqar" else list(DEFAULT_TASK)
    foreign = [name for name in [*DEFAULT_TASK, *MQAR_HELP] if name not in fields and getattr(args, name) is not None]
    if foreign:
        allowed = " ".join("--" + f.replace("_", "-") for f in fields)
        raise ValueError(f"--task {args.task} does not take {', '.join('--' + f.replace('_', '-') for f in foreign)}; "
                         f"its options: {allowed}")
    given = {name: getattr(args, name) for name in fields if getattr(args, name) is not None}
    if args.task == "mqar":
        return MqarTask(**given)
    return RetrievalTask(**{**DEFAULT_TASK, **given})


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    synth = sub.add_parser("synth", help="write a synthetic recall dataset (retrieval or MQAR, optionally key update)",
                           description="Write a synthetic key->value recall dataset (with answer masks): needle "
                                       "retrieval (--task retrieval), or multi-query associative recall (--task "
                                       "mqar); either becomes key update with --updates > 1.")
    synth.add_argument("out_dir", metavar="OUT_DIR", type=cli_args.output_dir(),
                       help="new (or empty) dataset directory")
    synth.add_argument("--train-docs", type=cli_args.positive_int(cli_args.MAX_COUNT), default=8192)
    synth.add_argument("--valid-docs", type=cli_args.nonnegative_int(cli_args.MAX_COUNT), default=256)
    _task_options(synth)
    synth.add_argument("--docs-per-shard", type=cli_args.positive_int(MAX_DOCS_PER_SHARD), default=512)
    synth.add_argument("--seed", type=cli_args.seed(), default=0)
    synth.add_argument("--tokenizer", type=cli_args.input_dir(word="byte"), default="byte",
                       help="'byte' or a local Hugging Face tokenizer directory")
    synth.add_argument(IGNORE_FLAG, action="store_true",
                       help="run even when the memory estimate exceeds the memory available (docs/cli.md)")

    prepare = sub.add_parser(
        "prepare", help="tokenize text corpora (.txt, .jsonl[.gz|.zst], .parquet) into shards, in parallel",
        description="Tokenize text in parallel: a .txt file is one document, a .jsonl line is one, a parquet row is "
                    "one. The result is the same for any --workers; an interrupted run, rerun with the same "
                    "arguments, continues from the parts it finished.")
    prepare.add_argument("inputs", metavar="INPUT", nargs="+", type=cli_args.input_path(),
                         help="files, directories (searched recursively) or quoted globs of .txt, .jsonl, .jsonl.gz, "
                              ".jsonl.zst and .parquet files")
    prepare.add_argument("--out", required=True, metavar="DIR", type=cli_args.output_dir(),
                         help="new (or empty) dataset directory")
    prepare.add_argument("--tokenizer", type=cli_args.input_dir(word="byte"), default="byte",
                         help="'byte' or a local Hugging Face tokenizer directory")
    prepare.add_argument("--workers", type=cli_args.positive_int(cli_args.MAX_PROCESSES), default=None,
                         help="tokenizer processes (default: the CPU cores this process may use)")
    prepare.add_argument("--valid-fraction", type=cli_args.float_in(0, 1, high_open=True), default=0.01)
    prepare.add_argument("--docs-per-shard", type=cli_args.positive_int(MAX_DOCS_PER_SHARD), default=1000)
    prepare.add_argument("--text-key", default="text", help="field (.jsonl) or column (.parquet) holding the text")
    prepare.add_argument("--part-mb", type=cli_args.float_in(0, 1 << 20, low_open=True), default=8.0,
                         help="MiB of text per part: the unit of work and of resuming (does not change the result)")
    prepare.add_argument("--seed", type=cli_args.seed(), default=0)
    prepare.add_argument("--no-bos", action="store_true", help="do not start documents with BOS")
    prepare.add_argument("--no-eos", action="store_true", help="do not end documents with EOS")


def _report(manifest) -> None:
    print(f"wrote {manifest.dir} (tokenizer {manifest.tokenizer['name']}, "
          f"answer masks: {'yes' if manifest.has_answer_mask else 'no'})")
    for name, info in manifest.splits.items():
        print(f"  {name:6s} {len(info.shards):5d} shards {info.documents:10d} documents {info.tokens:12d} tokens")


def _check_synth_memory(args, task) -> None:
    """One document at a time is generated and written: refuse a --max-len whose document cannot fit."""
    from lucid_megatron import memory_estimate as mem

    if args.ignore_memory_check:
        return
    if args.task == "mqar":
        longest, what = task.max_length(), f"documents of up to {task.max_length()} tokens (--task mqar)"
    else:
        longest, what = task.max_len, f"--max-len {task.max_len}"
    estimate = mem.MemoryEstimate({"document": mem.documents_bytes(documents=1, length=longest)})
    mem.check_fits(estimate, what=f"lucid data synth with {what}")


def _synth(args):
    from lucid_megatron.atomic import check_output_dir

    from .prepare import load_prepare_tokenizer
    from .synth import write_synth_dataset

    check_output_dir(args.out_dir, label="OUT_DIR")
    task = task_from_args(args)
    _check_synth_memory(args, task)
    tokenizer = load_prepare_tokenizer(args.tokenizer)  # a directory that does not load: one line, exit 2
    return write_synth_dataset(args.out_dir, task, train_docs=args.train_docs, valid_docs=args.valid_docs,
                               docs_per_shard=args.docs_per_shard, seed=args.seed, tokenizer=tokenizer)


def _prepare(args):
    from lucid_megatron.atomic import check_output_dir

    from .prepare import prepare_dataset

    check_output_dir(args.out, label="--out")
    part_bytes = max(1, round(args.part_mb * (1 << 20)))
    # prepare loads the tokenizer itself: a directory that does not load is a one-line error there
    return prepare_dataset(args.inputs, args.out, tokenizer=args.tokenizer, workers=args.workers,
                           valid_fraction=args.valid_fraction, docs_per_shard=args.docs_per_shard,
                           text_key=args.text_key, seed=args.seed, add_bos=not args.no_bos,
                           add_eos=not args.no_eos, part_bytes=part_bytes)


def run(args) -> int:
    try:
        manifest = {"synth": _synth, "prepare": _prepare}[args.data_command](args)
    except (ValueError, OSError) as err:  # bad input: 2; a failure while writing (a full disk, a worker killed): 1
        return cli_args.fail(f"data {args.data_command}", str(err), cli_args.exit_code(err))
    _report(manifest)
    return 0
