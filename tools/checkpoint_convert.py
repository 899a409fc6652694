"""Checkpoint conversion: consolidate to one process's files, export to Hugging Face, import
a Mixtral model from Hugging Face.

    python tools/checkpoint_convert.py consolidate --load checkpoints/run1 \
        --output run1-consolidated
    python tools/checkpoint_convert.py export --load checkpoints/run1 --format mixtral \
        --output run1-hf
    python tools/checkpoint_convert.py import --format mixtral --input Mixtral-8x7B \
        --save checkpoints/upcycled \
        [--tokenizer-type SentencePieceTokenizer --tokenizer-model Mixtral-8x7B/tokenizer.model]

--load takes a checkpoint of any layout (a --save directory or one iter_NNNNNNN directory) or a
consolidated directory. consolidate writes model.safetensors (the stored tensors: full tensors by
parameter name, each expert by its global id) and meta.json (the checkpoint's meta). export
writes a Hugging Face directory (config.json, model.safetensors) that transformers loads as
MixtralForCausalLM, Qwen2MoeForCausalLM or GPT2LMHeadModel, with the training tokenizer's files
and a tokenizer_config.json that AutoTokenizer reads (GPT2Tokenizer for GPT-2 BPE,
LlamaTokenizer for sentencepiece; none for NullTokenizer); a model the format cannot express
is refused with the features that block it. Hugging Face MoE models have no expert capacity:
they compute our model with --disable-moe-token-dropping. import writes a model-only checkpoint
that pretrain_gpt_moe.py --load accepts (with --finetune or --no-load-optim).
Bad input: one `error:` line and exit status 2.
"""

import argparse
import os
import sys
import warnings

# Runnable as `python tools/checkpoint_convert.py` from anywhere: the repo root holds
# megatron/training.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# megatron-core warns at import that Transformer Engine / Apex are absent; we do not use them.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
# torch.distributed.checkpoint warns that it reads in one process, which is what these tools mean.
warnings.filterwarnings("ignore",
                        message="torch.distributed is disabled, unavailable or uninitialized")

from megatron.convert import EXPORT_FORMATS, IMPORT_FORMATS  # noqa: E402
from megatron.data.tokenizer import TOKENIZER_TYPES  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("consolidate", help="one safetensors file of the stored tensors + meta.json")
    c.add_argument("--load", required=True, help="checkpoint directory (any layout)")
    c.add_argument("--output", required=True, help="new directory")
    e = sub.add_parser("export", help="a Hugging Face model directory")
    e.add_argument("--load", required=True,
                   help="checkpoint directory (any layout) or consolidated directory")
    e.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    e.add_argument("--output", required=True, help="new directory")
    e.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="of the exported weights (default: the model's --bf16 / --fp16 training "
                        "dtype)")
    i = sub.add_parser("import", help="a Hugging Face model -> a model-only checkpoint")
    i.add_argument("--format", required=True, choices=IMPORT_FORMATS)
    i.add_argument("--input", required=True,
                   help="Hugging Face model directory (config.json, *.safetensors)")
    i.add_argument("--save", required=True, help="checkpoint directory to write")
    i.add_argument("--iteration", type=int, default=0,
                   help="iteration number the checkpoint records")
    i.add_argument("--tokenizer-type", choices=TOKENIZER_TYPES,
                   help="default: SentencePieceTokenizer with --input's tokenizer.model, when it "
                        "has one")
    i.add_argument("--tokenizer-model", help="sentencepiece .model (SentencePieceTokenizer)")
    i.add_argument("--vocab-file", help="GPT-2 vocab.json / encoder.json (GPT2BPETokenizer)")
    i.add_argument("--merge-file", help="GPT-2 merges.txt / vocab.bpe (GPT2BPETokenizer)")
    i.add_argument("--vocab-size", type=int, help="ordinary ids (NullTokenizer)")
    return p.parse_args(argv)


def _new_dir(path: str, flag: str) -> None:
    # never mix the files of two models in one directory
    if os.path.exists(path) and (not os.path.isdir(path) or os.listdir(path)):
        raise ValueError(f"{flag} {path} exists and is not an empty directory")


def _read(path: str):
    """(meta, model config, MoE config, stored tensors) of --load."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--load {path}: no such directory")
    from megatron.checkpoint import configs_from_meta
    from megatron.convert import read_model

    meta, tensors = read_model(path)
    model_cfg, moe_cfg = configs_from_meta(meta)
    return meta, model_cfg, moe_cfg, tensors


def consolidate(args) -> str:
    from megatron.convert import write_consolidated

    _new_dir(args.output, "--output")
    meta, _, _, tensors = _read(args.load)
    write_consolidated(args.output, tensors, meta)
    parameters = sum(t.numel() for t in tensors.values())
    return f"wrote {args.output}: {len(tensors)} tensors, {parameters:,} parameters"


def _special_ids(meta: dict) -> dict:
    """The tokenizer's special ids for config.json; none when its files are gone (a warning)."""
    from megatron.data.tokenizer import build_tokenizer

    try:
        tokenizer = build_tokenizer(**meta["tokenizer"])
    except (ValueError, OSError, KeyError, TypeError) as e:
        print(f"checkpoint_convert.py: warning: no special token ids in config.json (tokenizer: "
              f"{e})", file=sys.stderr)
        return {}
    return {"bos_token_id": tokenizer.bos, "eos_token_id": tokenizer.eod,
            "pad_token_id": tokenizer.pad if tokenizer.pad >= 0 else None}


def export(args) -> str:
    import torch

    from megatron.convert import check_exportable, to_hf, write_hf

    _new_dir(args.output, "--output")
    meta, model_cfg, moe_cfg, tensors = _read(args.load)
    check_exportable(args.format, model_cfg, moe_cfg)  # before the tokenizer's warning
    dtype = getattr(torch, args.dtype) if args.dtype else model_cfg.params_dtype
    config, hf = to_hf(args.format, tensors, model_cfg, moe_cfg, _special_ids(meta), dtype=dtype)
    write_hf(args.output, config, hf)
    note = ""
    if moe_cfg is not None and moe_cfg.drop_tokens:
        note = (" (no expert capacity there: it computes this model with "
                "--disable-moe-token-dropping)")
    return (f"wrote {args.output}: {config['architectures'][0]}{note}"
            f"{_tokenizer_note(meta, args.output)}")


def _tokenizer_note(meta: dict, out_dir: str) -> str:
    """Copy the tokenizer's files beside the model; a warning (not an error) when they are gone."""
    from megatron.convert import write_hf_tokenizer

    try:
        kind = write_hf_tokenizer(out_dir, meta.get("tokenizer") or {})
    except (OSError, KeyError, TypeError) as e:
        print(f"checkpoint_convert.py: warning: no tokenizer files written ({e})", file=sys.stderr)
        return ""
    return f", tokenizer as {kind}" if kind else ", no tokenizer files (NullTokenizer: ids only)"


def _tokenizer_kwargs(args) -> dict:
    kind, model_file = args.tokenizer_type, args.tokenizer_model
    default_model = os.path.join(args.input, "tokenizer.model")
    if kind is None:
        if not os.path.isfile(default_model):
            raise ValueError(f"--tokenizer-type is required: --input {args.input} has no "
                             f"tokenizer.model (one of {', '.join(TOKENIZER_TYPES)})")
        kind, model_file = "SentencePieceTokenizer", model_file or default_model
    absolute = {k: os.path.abspath(v) if v else None for k, v in
                (("tokenizer_model", model_file), ("vocab_file", args.vocab_file),
                 ("merge_file", args.merge_file))}
    return dict(tokenizer_type=kind, vocab_size=args.vocab_size, **absolute)


def import_hf(args) -> str:
    from megatron.checkpoint import config_dict
    from megatron.convert import from_hf, read_hf
    from megatron.data.tokenizer import build_tokenizer

    if args.iteration < 0:
        raise ValueError(f"--iteration must be >= 0 (got {args.iteration})")
    tokenizer_kw = _tokenizer_kwargs(args)
    tokenizer = build_tokenizer(**tokenizer_kw)
    config, hf = read_hf(args.input)
    model_cfg, moe_cfg, tensors = from_hf(args.format, config, hf)
    if tokenizer.vocab_size != model_cfg.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but --input {args.input} "
                         f"has vocab_size {model_cfg.vocab_size}: give the model's own tokenizer "
                         "(--tokenizer-type and its files)")
    meta = {"model": config_dict(model_cfg), "moe": config_dict(moe_cfg), "tokenizer": tokenizer_kw,
            "iteration": args.iteration,
            "imported_from": {"format": args.format, "path": os.path.abspath(args.input)}}
    from megatron.checkpoint import write_model_checkpoint

    path = write_model_checkpoint(args.save, tensors, meta, iteration=args.iteration)
    return (f"wrote {path}: {model_cfg.num_layers} layers, {moe_cfg.num_experts} experts, "
            f"top-{moe_cfg.topk}")


COMMANDS = {"consolidate": consolidate, "export": export, "import": import_hf}


def main(argv=None) -> str:
    args = parse_args(argv)
    try:
        message = COMMANDS[args.command](args)
    except (ValueError, KeyError, OSError) as e:
        print(f"checkpoint_convert.py: error: {e.args[0] if isinstance(e, KeyError) else e}",
              file=sys.stderr)
        sys.exit(2)
    print(message)
    return message


if __name__ == "__main__":
    main()
