"""``lucid convert to-hf | from-hf | verify``.

    lucid convert to-hf CHECKPOINT OUT_DIR [--dtype float32|bfloat16] [--max-shard-size 5GB]
    lucid convert from-hf HF_DIR CHECKPOINT [--tp N] [--init-from-llama [--lucid-layers PATTERN]]
    lucid convert verify CHECKPOINT HF_DIR [--batches 4 --batch-size 2 --seq-len 128 --seed 0]

CHECKPOINT (input) may be a step directory, a run's ``checkpoints/`` directory or the run directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="convert_command", metavar="{to-hf,from-hf,verify}", required=True)
    to_hf = sub.add_parser("to-hf", help="Megatron checkpoint (any TP/DP/CP layout) -> Hugging Face directory")
    to_hf.add_argument("checkpoint")
    to_hf.add_argument("out_dir")
    to_hf.add_argument("--dtype", choices=list(DTYPES), default="float32")
    to_hf.add_argument("--max-shard-size", default="5GB", help="safetensors shard size (an index is written if >1)")
    to_hf.add_argument("--tokenizer", help="'byte' or a tokenizer directory (default: the one the run trained with)")

    from_hf = sub.add_parser("from-hf", help="Hugging Face directory -> Megatron checkpoint (to continue training)")
    from_hf.add_argument("hf_dir")
    from_hf.add_argument("checkpoint", help="new checkpoint directory (use as checkpoint.init_from)")
    from_hf.add_argument("--tp", type=int, default=1,
                         help="tensor-parallel size the checkpoint is meant for (checked; the format reshards)")
    from_hf.add_argument("--init-from-llama", action="store_true",
                         help="HF_DIR is a Llama model: same weights, attention becomes LUCID")
    from_hf.add_argument("--lucid-layers", default="all",
                         help="with --init-from-llama: 'all', 'none', 'every:K' or a comma list like 1,3")

    verify = sub.add_parser("verify", help="compare logits of a Megatron checkpoint and a Hugging Face directory")
    verify.add_argument("checkpoint")
    verify.add_argument("hf_dir")
    verify.add_argument("--batches", type=int, default=4)
    verify.add_argument("--batch-size", type=int, default=2)
    verify.add_argument("--seq-len", type=int, default=128)
    verify.add_argument("--seed", type=int, default=0)
    verify.add_argument("--max-kl", type=float, default=1e-9, help="fail above this KL(megatron || hf) per token")
    verify.add_argument("--max-abs", type=float, default=1e-4, help="fail above this max |logit difference|")
    verify.add_argument("--trust-remote-code", action="store_true",
                        help="run the directory's own Python code (its auto_map); only for directories you trust. "
                             "Without it LUCID exports load with this package's classes")


def _fail(message: str) -> int:
    print(f"lucid convert: error: {message}", file=sys.stderr)
    return 2


def _tokenizer_for_export(spec: str | None, state: dict):
    from lucid_megatron.data.tokenizer import load_tokenizer, tokenizer_from_manifest

    if spec is not None:
        return load_tokenizer(spec)
    entry = state.get("tokenizer")
    if entry is None:
        raise ValueError("the checkpoint does not record its tokenizer; pass --tokenizer byte|DIR")
    return tokenizer_from_manifest(entry)


def to_hf(args) -> int:
    from lucid_megatron.convert import hf_io, mapping, megatron_io

    checkpoint = megatron_io.resolve_checkpoint(args.checkpoint)
    cfg = megatron_io.read_model_config(checkpoint)
    state = megatron_io.read_state(checkpoint)
    tokenizer = _tokenizer_for_export(args.tokenizer, state)
    with megatron_io.single_process():
        weights = megatron_io.load_megatron_weights(checkpoint, cfg)
    config = hf_io.hf_config_for(cfg, tokenizer.manifest_entry())
    hf_weights = {k: v.to(DTYPES[args.dtype])
                  for k, v in mapping.megatron_to_hf(weights, cfg, config.vocab_size).items()}
    config.dtype = args.dtype
    out = hf_io.write_hf_dir(Path(args.out_dir), hf_weights, config, tokenizer.to_hf(),
                             max_shard_size=args.max_shard_size)
    params = sum(v.numel() for v in hf_weights.values())
    print(f"wrote {out}: {params / 1e6:.1f}M parameters ({args.dtype}) from {checkpoint}")
    print(f"  load with: AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True)")
    print(f"             AutoTokenizer.from_pretrained({str(out)!r}, trust_remote_code=True)")
    return 0


def _parse_pattern(text: str):
    if "," in text or text.isdigit():
        return [int(x) for x in text.split(",")]
    return text


def from_hf(args) -> int:
    from lucid_megatron.config.parallel import ParallelConfig, check_model_fits
    from lucid_megatron.convert import hf_io, mapping, megatron_io

    source = Path(args.hf_dir)
    config = hf_io.read_config(source)
    cfg = hf_io.model_config_from_hf(config, source, from_llama=args.init_from_llama,
                                     lucid_layers=_parse_pattern(args.lucid_layers) if args.init_from_llama else None)
    check_model_fits(cfg, ParallelConfig(tensor_parallel_size=args.tp))
    weights = hf_io.read_hf_weights(source)
    if cfg.tie_embeddings:
        weights.pop("lm_head.weight", None)
    hf_io.check_hf_weights(weights, cfg, str(source), config["vocab_size"])
    megatron = mapping.hf_to_megatron({k: v.float() for k, v in weights.items()}, cfg)
    from lucid_megatron.data.tokenizer import ByteTokenizer, HFTokenizer

    if config.get("lucid_megatron", {}).get("tokenizer_kind") == "byte":
        tokenizer = ByteTokenizer().manifest_entry()
    else:  # the directory's own tokenizer files
        tokenizer = HFTokenizer(source).manifest_entry()
    with megatron_io.single_process():
        out = megatron_io.save_megatron_checkpoint(Path(args.checkpoint), megatron, cfg,
                                                   {"tokenizer": tokenizer, "source": str(source.resolve())})
    print(f"wrote {out}: Megatron weights of {source} ({cfg.num_layers} layers, LUCID layers "
          f"{[i + 1 for i, x in enumerate(cfg.layer_is_lucid()) if x]}); loads at any TP (TP={args.tp} fits).")
    print(f"  continue training with: --set checkpoint.init_from={out}")
    return 0


def compare_logits(checkpoint, hf_dir, *, batches: int = 4, batch_size: int = 2, seq_len: int = 128,
                   seed: int = 0, trust_remote_code: bool = False) -> dict:
    """Logits of a Megatron checkpoint and a Hugging Face directory on the same random tokens, both in
    float32 on this process's device, over the exported vocabulary: max |logit difference|, KL(megatron || hf)
    per token, top-1 agreement."""
    from transformers import AutoModelForCausalLM

    import lucid_megatron.hf  # noqa: F401  (registers the LUCID classes: own exports need no remote code)
    from lucid_megatron.convert import megatron_io

    checkpoint = megatron_io.resolve_checkpoint(checkpoint)
    cfg = megatron_io.read_model_config(checkpoint)
    vocab = megatron_io.read_state(checkpoint).get("tokenizer", {}).get("vocab_size") or cfg.vocab_size
    g = torch.Generator().manual_seed(seed)
    worst_abs, worst_kl, kl_sum, agree, count = 0.0, 0.0, 0.0, 0, 0
    with megatron_io.single_process() as runtime, torch.no_grad():
        model = megatron_io.build_megatron_model(checkpoint, cfg, runtime)
        hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), trust_remote_code=trust_remote_code,
                                                  dtype=torch.float32)
        hf = hf.to(runtime.device).eval()
        for _ in range(batches):
            tokens = torch.randint(0, vocab, (batch_size, seq_len), generator=g).to(runtime.device)
            positions = torch.arange(seq_len, device=runtime.device).expand_as(tokens)
            got = hf(tokens, use_cache=False, float32_logits=True).logits.double()
            # over the exported vocabulary: Megatron's padding rows, which no token reaches, are not exported
            want = model(tokens, positions, None)[..., : got.shape[-1]].double()
            log_p, log_q = want.log_softmax(-1), got.log_softmax(-1)
            kl = (log_p.exp() * (log_p - log_q)).sum(-1)
            batch_abs, batch_kl, batch_kl_sum, batch_agree = runtime.host(torch.stack([
                (want - got).abs().max(), kl.max(), kl.sum(), (want.argmax(-1) == got.argmax(-1)).sum().double(),
            ]))
            worst_abs, worst_kl = max(worst_abs, batch_abs), max(worst_kl, batch_kl)
            kl_sum, agree, count = kl_sum + batch_kl_sum, agree + int(batch_agree), count + kl.numel()
        device = str(runtime.device)
    return {"checkpoint": str(checkpoint), "tokens": count, "device": device, "max_abs_logit_diff": worst_abs,
            "max_kl": worst_kl, "mean_kl": kl_sum / count, "top1_agreement": agree / count}


def verify(args) -> int:
    r = compare_logits(args.checkpoint, args.hf_dir, batches=args.batches, batch_size=args.batch_size,
                       seq_len=args.seq_len, seed=args.seed, trust_remote_code=args.trust_remote_code)
    ok = r["max_kl"] <= args.max_kl and r["max_abs_logit_diff"] <= args.max_abs
    print(f"{r['tokens']} tokens ({args.batches} x {args.batch_size} x {args.seq_len}) on {r['device']}, "
          f"Megatron {r['checkpoint']} vs HF {args.hf_dir}")
    print(f"  max |logit diff|        {r['max_abs_logit_diff']:.3e}   (limit {args.max_abs:g})")
    print(f"  KL(megatron || hf)      max {r['max_kl']:.3e}, mean {r['mean_kl']:.3e} per token   (limit {args.max_kl:g})")
    print(f"  top-1 agreement         {r['top1_agreement']:.6f}")
    print("  PASS" if ok else "  FAIL")
    return 0 if ok else 1


def run(args) -> int:
    try:
        return {"to-hf": to_hf, "from-hf": from_hf, "verify": verify}[args.convert_command](args)
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        return _fail(str(err))
