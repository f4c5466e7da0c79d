"""CPU step time of the Megatron GPT presets with LUCID vs softmax attention, and parameter counts.

    python benchmarks/bench_model.py [--presets tiny 125m] [--seq-len 1024] [--repeats 3]

LUCID and softmax models are timed side by side in one run (forward + backward of the mean loss,
batch 1, float32); the ratio is what matters.  Not a test.
"""

from __future__ import annotations

import argparse
import datetime

import torch

from lucid_megatron.config import load_model_config, model_preset_names
from lucid_megatron.model.gpt import build_gpt_model
from lucid_megatron.parallel.state import destroy_parallel, initialize_parallel
from lucid_megatron.timing import cpu_name, median_seconds


def step_seconds(preset: str, pattern: str, seq_len: int, repeats: int) -> float:
    cfg = load_model_config(preset, {"lucid_layers": pattern})
    model = build_gpt_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (1, seq_len + 1))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    positions = torch.arange(seq_len)[None]

    def step():
        model.zero_grad(set_to_none=True)
        model(inputs, positions, None, labels=labels).mean().backward()

    return median_seconds(step, repeats)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "125m"])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    initialize_parallel(1)
    try:
        print(f"# {datetime.date.today()} | {cpu_name()} | {torch.get_num_threads()} threads | torch {torch.__version__}")
        print(f"# forward+backward, batch 1, seq {args.seq_len}, float32, median of {args.repeats}\n")
        print("| preset | softmax step ms | LUCID step ms | LUCID / softmax |")
        print("|---|---|---|---|")
        for preset in args.presets:
            t_soft = step_seconds(preset, "none", args.seq_len, args.repeats)
            t_lucid = step_seconds(preset, "all", args.seq_len, args.repeats)
            print(f"| {preset} | {1e3 * t_soft:.0f} | {1e3 * t_lucid:.0f} | {t_lucid / t_soft:.2f}x |", flush=True)
        print("\n| preset | layers | hidden | heads / KV heads | head dim | parameters |")
        print("|---|---|---|---|---|---|")
        for preset in model_preset_names():
            cfg = load_model_config(preset)
            model = build_gpt_model(cfg, initialize=False)
            count = sum(p.numel() for p in model.parameters())
            print(
                f"| {preset} | {cfg.num_layers} | {cfg.hidden_size} | {cfg.num_attention_heads} / {cfg.kv_heads} "
                f"| {cfg.kv_channels} | {count / 1e6:.1f}M |"
            )
    finally:
        destroy_parallel()


if __name__ == "__main__":
    main()
