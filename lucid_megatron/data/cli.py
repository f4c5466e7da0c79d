"""``lucid data synth`` and ``lucid data prepare``: write token shards plus their manifest."""

from __future__ import annotations

import sys

DEFAULT_TASK = {"min_len": 256, "max_len": 512, "num_needles": 4, "num_queries": 1, "key_len": 4, "value_len": 4,
                "filler_words": 64, "updates": 1, "key_vocab": 26, "value_vocab": 10, "template": "sentence"}
TASK_HELP = {
    "num_needles": "distinct keys per document",
    "num_queries": "keys asked at the end (the others are distractors)",
    "updates": "assignments per key, each changing its value; >1 is the key-update task (answer: the latest value)",
    "key_vocab": "letters keys are drawn from (1-26)",
    "value_vocab": "digits values are drawn from (1-10)",
    "filler_words": "size of the haystack's word list (the distractor words between assignments)",
    "template": "'sentence' (' key A is 3.' / ' what is A? 3.') or 'compact' (' A3' / ' ?A3')",
}


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="ACTION", required=True)

    synth = sub.add_parser("synth", help="write the synthetic long-context retrieval dataset",
                           description="Write the synthetic key->value retrieval dataset (with answer masks): needle "
                                       "retrieval, or key update with --updates > 1.")
    synth.add_argument("out_dir", metavar="OUT_DIR", help="new (or empty) dataset directory")
    synth.add_argument("--train-docs", type=int, default=8192)
    synth.add_argument("--valid-docs", type=int, default=256)
    for name, default in DEFAULT_TASK.items():
        synth.add_argument("--" + name.replace("_", "-"), type=type(default), default=default, help=TASK_HELP.get(name))
    synth.add_argument("--docs-per-shard", type=int, default=512)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--tokenizer", default="byte", help="'byte' or a local Hugging Face tokenizer directory")

    prepare = sub.add_parser(
        "prepare", help="tokenize text corpora (.txt, .jsonl[.gz|.zst], .parquet) into shards, in parallel",
        description="Tokenize text in parallel: a .txt file is one document, a .jsonl line is one, a parquet row is "
                    "one. The result is the same for any --workers; an interrupted run, rerun with the same "
                    "arguments, continues from the parts it finished.")
    prepare.add_argument("inputs", metavar="INPUT", nargs="+",
                         help="files, directories (searched recursively) or quoted globs of .txt, .jsonl, .jsonl.gz, "
                              ".jsonl.zst and .parquet files")
    prepare.add_argument("--out", required=True, metavar="DIR", help="new (or empty) dataset directory")
    prepare.add_argument("--tokenizer", default="byte", help="'byte' or a local Hugging Face tokenizer directory")
    prepare.add_argument("--workers", type=int, default=None,
                         help="tokenizer processes (default: the CPU cores this process may use)")
    prepare.add_argument("--valid-fraction", type=float, default=0.01)
    prepare.add_argument("--docs-per-shard", type=int, default=1000)
    prepare.add_argument("--text-key", default="text", help="field (.jsonl) or column (.parquet) holding the text")
    prepare.add_argument("--part-mb", type=float, default=8.0,
                         help="MiB of text per part: the unit of work and of resuming (does not change the result)")
    prepare.add_argument("--seed", type=int, default=0)
    prepare.add_argument("--no-bos", action="store_true", help="do not start documents with BOS")
    prepare.add_argument("--no-eos", action="store_true", help="do not end documents with EOS")


def _report(manifest) -> None:
    print(f"wrote {manifest.dir} (tokenizer {manifest.tokenizer['name']}, "
          f"answer masks: {'yes' if manifest.has_answer_mask else 'no'})")
    for name, info in manifest.splits.items():
        print(f"  {name:6s} {len(info.shards):5d} shards {info.documents:10d} documents {info.tokens:12d} tokens")


def run(args) -> int:
    from .prepare import prepare_dataset
    from .synth import RetrievalTask, write_synth_dataset
    from .tokenizer import load_tokenizer

    try:
        if args.data_command == "synth":
            task = RetrievalTask(**{name: getattr(args, name) for name in DEFAULT_TASK})
            manifest = write_synth_dataset(args.out_dir, task, train_docs=args.train_docs, valid_docs=args.valid_docs,
                                           docs_per_shard=args.docs_per_shard, seed=args.seed,
                                           tokenizer=load_tokenizer(args.tokenizer))
        else:
            if not 0 < args.part_mb <= 1 << 20:
                raise ValueError(f"--part-mb {args.part_mb} is not allowed; allowed: 0 < MiB <= {1 << 20}")
            part_bytes = max(1, round(args.part_mb * (1 << 20)))
            # prepare loads the tokenizer itself: a directory that does not load is a one-line error there
            manifest = prepare_dataset(args.inputs, args.out, tokenizer=args.tokenizer, workers=args.workers,
                                       valid_fraction=args.valid_fraction, docs_per_shard=args.docs_per_shard,
                                       text_key=args.text_key, seed=args.seed, add_bos=not args.no_bos,
                                       add_eos=not args.no_eos, part_bytes=part_bytes)
    except (ValueError, OSError) as err:
        print(f"lucid data {args.data_command}: error: {err}", file=sys.stderr)
        return 1
    _report(manifest)
    return 0
