"""The items of the ``lucid_key_update`` lm-eval task: ``load`` is the task's dataset (lm-eval imports this
file by path: a ``data_files`` path in the YAML would be read relative to the working directory instead).

``python configs/lm_eval/items.py`` rewrites ``items.jsonl``: key-update documents drawn as the
CPU-scale key-update experiment trains them (``configs/repro/key-update/``: 64-96 byte tokens, 4 keys of one
letter, each assigned 3 times a one-digit value, 4 queries, 8 filler words, compact template), one item per
query: the document up to the queried key, and the index of the key's latest value among the digits 0-9.
"""

import json
from pathlib import Path

ITEMS = Path(__file__).with_name("items.jsonl")


def load(**_):
    """The items as the task's ``test`` split (lm-eval passes the task's metadata, unused here)."""
    import datasets

    rows = [json.loads(line) for line in ITEMS.read_text().splitlines() if line]
    return datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)})


def write(documents: int = 10, seed: int = 2026) -> None:
    import numpy as np

    from lucid_megatron.data.synth import RetrievalTask, generate_retrieval_document
    from lucid_megatron.data.tokenizer import ByteTokenizer

    task = RetrievalTask(min_len=64, max_len=96, num_needles=4, num_queries=4, key_len=1, value_len=1,
                         filler_words=8, updates=3, template="compact")
    tokenizer = ByteTokenizer()
    lines = []
    for d in range(documents):
        tokens, _, meta = generate_retrieval_document(np.random.default_rng([seed, d]), task, tokenizer)
        for key, value, answer in meta["queries"]:
            context = tokenizer.decode(tokens[1:answer])  # without <bos>: the exported tokenizer prepends it
            lines.append(json.dumps({"context": context, "key": key, "answer": int(value)}))
    ITEMS.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    write()
