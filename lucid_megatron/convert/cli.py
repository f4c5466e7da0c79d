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
    from lucid_megatron import cli_args
    from lucid_megatron.memory_estimate import IGNORE_FLAG

    sub = parser.add_subparsers(dest="convert_command", metavar="{to-hf,from-hf,verify}", required=True)
    to_hf = sub.add_parser("to-hf", help="Megatron checkpoint (any TP/DP/CP layout) -> Hugging Face directory")
    to_hf.add_argument("checkpoint", type=cli_args.input_dir())
    to_hf.add_argument("out_dir", type=cli_args.output_dir())
    to_hf.add_argument("--dtype", choices=list(DTYPES), default="float32")
    to_hf.add_argument("--max-shard-size", type=cli_args.byte_size(10**3, 1 << 40), default="5GB",
                       help="safetensors shard size, e.g. 500MB, 5GB (an index is written if >1 shard)")
    to_hf.add_argument("--tokenizer", type=cli_args.input_dir(word="byte"),
                       help="'byte' or a tokenizer directory (default: the one the run trained with)")

    from_hf = sub.add_parser("from-hf", help="Hugging Face directory -> Megatron checkpoint (to continue training)")
    from_hf.add_argument("hf_dir", type=cli_args.input_dir())
    from_hf.add_argument("checkpoint", type=cli_args.output_dir(),
                         help="new checkpoint directory (use as checkpoint.init_from)")
    from_hf.add_argument("--tp", type=cli_args.positive_int(cli_args.MAX_PROCESSES), default=1,
                         help="tensor-parallel size the checkpoint is meant for (checked; the format reshards)")
    from_hf.add_argument("--init-from-llama", action="store_true",
                         help="HF_DIR is a Llama model: same weights, attention becomes LUCID")
    from_hf.add_argument("--lucid-layers", default="all",
                         help="with --init-from-llama: 'all', 'none', 'every:K' or a comma list like 1,3")

    verify = sub.add_parser("verify", help="compare logits of a Megatron checkpoint and a Hugging Face directory")
    verify.add_argument("checkpoint", type=cli_args.input_dir())
    verify.add_argument("hf_dir", type=cli_args.input_dir())
    verify.add_argument("--batches", type=cli_args.positive_int(10**6), default=4)
    verify.add_argument("--batch-size", type=cli_args.positive_int(cli_args.MAX_BATCH), default=2)
    verify.add_argument("--seq-len", type=cli_args.positive_int(cli_args.MAX_TOKENS), default=128)
    verify.add_argument("--seed", type=cli_args.seed(), default=0)
    verify.add_argument("--max-kl", type=cli_args.float_in(0, 1e3), default=1e-9,
                        help="fail above this KL(megatron || hf) per token")
    verify.add_argument("--max-abs", type=cli_args.float_in(0, 1e3), default=1e-4,
                        help="fail above this max |logit difference|")
    verify.add_argument("--trust-remote-code", action="store_true",
                        help="run the directory's own Python code (its auto_map); only for directories you trust. "
                             "Without it LUCID exports load with this package's classes")
    verify.add_argument(IGNORE_FLAG, action="store_true",
                        help="run even when the memory estimate exceeds the memory available (docs/cli.md)")


def _fail(message: str, code: int = 2) -> int:
    from lucid_megatron import cli_args

    return cli_args.fail("convert", message, code)


def _tokenizer_for_export(spec: str | None, state: dict):
    """The run's tokenizer, or ``--tokenizer`` when it is the same one (kind, name, vocabulary, special ids):
    another tokenizer would give the model's ids other meanings.  A checkpoint that records none (older ones)
    takes ``--tokenizer`` unchecked, with a note."""
    from lucid_megatron.data.tokenizer import load_tokenizer, tokenizer_from_manifest, tokenizer_mismatch

    trained_with = state.get("tokenizer")
    if spec is None:
        if trained_with is None:
            raise ValueError("the checkpoint does not record its tokenizer; pass --tokenizer byte|DIR")
        try:
            return tokenizer_from_manifest(trained_with)
        except FileNotFoundError as err:  # the recorded directory moved: a copy elsewhere is the same tokenizer
            raise FileNotFoundError(f"{err}, or pass --tokenizer with the copy's directory") from None
    tokenizer = load_tokenizer(spec)
    if trained_with is None:
        print(f"lucid convert: note: the checkpoint does not record the tokenizer it was trained with (an older "
              f"checkpoint); --tokenizer {spec} is exported unchecked", file=sys.stderr)
        return tokenizer
    problem = tokenizer_mismatch(trained_with, tokenizer.manifest_entry(), a_is="the checkpoint was trained with",
                                 b_is=f"--tokenizer {spec} is")
    if problem:
        raise ValueError(problem)
    return tokenizer


def to_hf(args) -> int:
    from lucid_megatron.convert import hf_io, mapping, megatron_io

    with megatron_io.reading(args.checkpoint) as checkpoint:  # kept from its run's rotation while read
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
    from lucid_megatron.convert import hf_io, megatron_io

    # the checkpoint is kept from its run's rotation for the whole comparison (it reads weights lazily)
    with megatron_io.reading(checkpoint) as held, megatron_io.single_process() as runtime, torch.no_grad():
        cfg = megatron_io.read_model_config(held)
        vocab = megatron_io.read_state(held).get("tokenizer", {}).get("vocab_size") or cfg.vocab_size
        hf = hf_io.load_hf_model(hf_dir, trust_remote_code=trust_remote_code)
        model = megatron_io.build_megatron_model(held, cfg, runtime)
        hf = hf.to(runtime.device).eval()
        g = torch.Generator().manual_seed(seed)
        worst_abs, worst_kl, kl_sum, agree, count = 0.0, 0.0, 0.0, 0, 0
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


def _verify_memory(args, checkpoint) -> None:
    """Refuse a comparison that cannot fit (memory_estimate.py): both models' weights, one forward's
    activations, and the logits both models give, compared in float64 (about 6 copies)."""
    from lucid_megatron import memory_estimate as mem
    from lucid_megatron.convert import megatron_io

    shape = mem.ModelShape.of_config(megatron_io.read_model_config(checkpoint))
    parts = {"weights": mem.weights_bytes(shape, models=2)}
    if not torch.cuda.is_available():  # on a GPU the forward's buffers live in GPU memory
        parts.update(mem.forward_bytes(shape, rows=args.batch_size, length=args.seq_len, logit_bytes=8,
                                       logit_copies=6))
    mem.check_fits(mem.MemoryEstimate(parts),
                   what=f"lucid convert verify with {args.batch_size} x {args.seq_len} tokens per batch")


def preflight(args) -> None:
    """What can be checked before loading anything: outputs, inputs that exist, the memory (verify)."""
    from lucid_megatron.atomic import check_output_dir
    from lucid_megatron.convert import hf_io, megatron_io

    if args.convert_command == "to-hf":
        check_output_dir(args.out_dir, label="OUT_DIR")
    elif args.convert_command == "from-hf":
        check_output_dir(args.checkpoint, label="CHECKPOINT")
    else:
        checkpoint = megatron_io.resolve_checkpoint(args.checkpoint)
        hf_io.check_hf_model_dir(args.hf_dir, trust_remote_code=args.trust_remote_code)
        if not args.ignore_memory_check:
            _verify_memory(args, checkpoint)


def run(args) -> int:
    from lucid_megatron import cli_args

    try:
        preflight(args)
        return {"to-hf": to_hf, "from-hf": from_hf, "verify": verify}[args.convert_command](args)
    except cli_args.BAD_INPUT_ERRORS as err:
        return _fail(str(err), cli_args.exit_code(err))
    except (MemoryError, torch.cuda.OutOfMemoryError) as err:
        return _fail(f"out of memory ({type(err).__name__}); use smaller sizes", cli_args.FAILURE)
