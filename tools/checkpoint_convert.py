"""Checkpoint conversion: consolidate to one process's files, export to Hugging Face or to
Megatron-Core, import a Mixtral model from Hugging Face or a checkpoint of the peers.

    python tools/checkpoint_convert.py consolidate --load checkpoints/run1 \
        --output run1-consolidated
    python tools/checkpoint_convert.py export --load checkpoints/run1 --format mixtral \
        --output run1-hf
    python tools/checkpoint_convert.py export --load checkpoints/run1 --to mcore --output run1-mcore
    python tools/checkpoint_convert.py import --format mixtral --input Mixtral-8x7B \
        --save checkpoints/upcycled \
        [--tokenizer-type SentencePieceTokenizer --tokenizer-model Mixtral-8x7B/tokenizer.model]
    python tools/checkpoint_convert.py import --from megatron-deepspeed|mcore|megatron-legacy \
        SRC DST [--vocab-size N | --tokenizer-type ... and its files]

--load takes a checkpoint of any layout (a --save directory or one iter_NNNNNNN directory) or a
consolidated directory. consolidate writes model.safetensors (the stored tensors: full tensors by
parameter name, each expert by its global id) and meta.json (the checkpoint's meta). export
writes a Hugging Face directory (config.json, model.safetensors) that transformers loads as
MixtralForCausalLM, Qwen2MoeForCausalLM or GPT2LMHeadModel, with the training tokenizer's files
and a tokenizer_config.json that AutoTokenizer reads (GPT2Tokenizer for GPT-2 BPE,
LlamaTokenizer for sentencepiece; none for NullTokenizer); a model the format cannot express
is refused with the features that block it. Hugging Face MoE models have no expert capacity:
they compute our model with --disable-moe-token-dropping. `export --to mcore` writes a
Megatron-LM --save folder in torch_dist (dist_checkpointing) that megatron-core's GPTModel loads.
import --format writes a model-only checkpoint that pretrain_gpt_moe.py --load accepts (with
--finetune or --no-load-optim). import --from reads a Megatron-DeepSpeed MoE checkpoint (SRC: its
--save folder or a global_stepN folder), a Megatron-Core torch_dist one or a Megatron-LM legacy
torch one (SRC: the --save folder or an iter_N folder) at any TP / PP / EP it was saved at, and
writes a checkpoint of ours to DST that loads at any layout; it prints which of weights /
optimizer / schedule / RNG it carried. Adam's moments are carried where the source keeps a plain
torch optimizer's state (DeepSpeed without ZeRO; Megatron-LM torch with the non-distributed
optimizer), the lr scheduler's state wherever it has one: `pretrain_gpt_moe.py --load DST`
resumes with both (with flags of another schedule: --use-checkpoint-opt_param-scheduler or
--override-opt_param-scheduler); --no-load-optim starts a fresh optimizer and schedule.
Pickled files are read with torch's weights-only loader
and an explicit allow-list (megatron/convert/safe_pickle.py): a file that would run code is
refused by name. The tokenizer is the one the run's args name (override with the flags).
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
from megatron.convert.peers import EXPORT_FORMATS as PEER_EXPORTS  # noqa: E402
from megatron.convert.peers import IMPORT_FORMATS as PEER_IMPORTS  # noqa: E402
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
    e.add_argument("--format", choices=EXPORT_FORMATS, help="a Hugging Face format")
    e.add_argument("--to", dest="to", metavar="{mcore}",
                   help="a peer's format: mcore (Megatron-Core torch_dist, a Megatron-LM --save "
                        "folder)")
    e.add_argument("--output", required=True, help="new directory")
    e.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                   help="of the exported weights (default: the model's --bf16 / --fp16 training "
                        "dtype)")
    i = sub.add_parser("import", help="a Hugging Face model or a peer's checkpoint -> ours")
    i.add_argument("--format", choices=IMPORT_FORMATS, help="a Hugging Face format")
    i.add_argument("--from", dest="source_format",
                   metavar="{megatron-deepspeed,mcore,megatron-legacy}",
                   help="a peer's checkpoint format (with SRC and DST)")
    i.add_argument("src", nargs="?", metavar="SRC", help="the peer's checkpoint (--from)")
    i.add_argument("dst", nargs="?", metavar="DST", help="checkpoint directory to write (--from)")
    i.add_argument("--input",
                   help="Hugging Face model directory (config.json, *.safetensors)")
    i.add_argument("--save", help="checkpoint directory to write (--format)")
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

    if (args.format is None) == (args.to is None):
        raise ValueError("export needs one of --format (" + ", ".join(EXPORT_FORMATS) + ") or "
                         "--to (" + ", ".join(PEER_EXPORTS) + ")")
    if args.to is not None:
        return export_peer(args)
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


def export_peer(args) -> str:
    import time

    import torch

    from megatron.convert.peers import EXPORTERS

    if args.to not in EXPORTERS:
        raise ValueError(f"--to {args.to!r}: use one of {', '.join(PEER_EXPORTS)}")
    _new_dir(args.output, "--output")
    started = time.time()
    meta, model_cfg, moe_cfg, tensors = _read(args.load)
    adapter = EXPORTERS[args.to]
    found = adapter.EXPRESSES.blockers(model_cfg, moe_cfg)
    if found:
        raise ValueError(f"cannot export as {args.to}: " + "; ".join(found))
    dtype = getattr(torch, args.dtype) if args.dtype else model_cfg.params_dtype
    folder = adapter.write(args.output, tensors, model_cfg, moe_cfg, meta.get("iteration", 0),
                           dtype)
    return (f"wrote {folder} (Megatron-Core torch_dist, {len(tensors)} tensors as "
            f"{str(dtype).removeprefix('torch.')}) in {time.time() - started:.2f} s; carried: "
            "weights yes, optimizer no, schedule iteration only, RNG no")


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


def import_any(args) -> str:
    if args.source_format is not None:
        return import_peer(args)
    if args.format is None:
        raise ValueError("import needs --from (" + ", ".join(PEER_IMPORTS) + ") with SRC DST, "
                         "or --format (" + ", ".join(IMPORT_FORMATS) + ") with --input and "
                         "--save")
    missing = [flag for flag, value in (("--input", args.input), ("--save", args.save))
               if value is None]
    if missing or args.src is not None:
        raise ValueError(f"import --format {args.format} takes --input and --save (not "
                         "positional SRC DST)")
    return import_hf(args)


def import_peer(args) -> str:
    import time

    from megatron.checkpoint import config_dict, write_model_checkpoint
    from megatron.convert.peers import IMPORTERS

    fmt = args.source_format
    if fmt not in IMPORTERS:
        raise ValueError(f"--from {fmt!r}: use one of {', '.join(PEER_IMPORTS)}")
    if args.src is None or args.dst is None or args.format is not None:
        raise ValueError(f"import --from {fmt} takes SRC and DST (positional), not --format")
    if not os.path.isdir(args.src):
        raise FileNotFoundError(f"SRC {args.src}: no such directory")
    _new_dir(args.dst, "DST")
    started = time.time()
    overrides = {"tokenizer_type": args.tokenizer_type, "tokenizer_model": args.tokenizer_model,
                 "vocab_file": args.vocab_file, "merge_file": args.merge_file,
                 "vocab_size": args.vocab_size}
    imported = IMPORTERS[fmt].read(args.src, overrides)
    run = imported.run
    meta = {"model": config_dict(imported.model),
            "moe": config_dict(imported.moe) if imported.moe else None,
            "tokenizer": imported.tokenizer, "consumed_samples": run["consumed_samples"],
            "imported_from": {"format": fmt, "path": os.path.abspath(args.src),
                              "tp": imported.source_tp, "pp": imported.source_pp,
                              "ep": imported.source_ep, "scheduler": run["scheduler"]}}
    if imported.moments or run["scheduler"]:  # resumable with the optimizer and the schedule
        from megatron.convert.peer_optim import write_checkpoint

        path = write_checkpoint(args.dst, imported, meta)
    else:
        path = write_model_checkpoint(args.dst, imported.tensors, meta,
                                      iteration=run["iteration"])
    for note in imported.notes:
        print(f"checkpoint_convert.py: warning: {note}", file=sys.stderr)
    carried = "; ".join(f"{k} {v}" for k, v in imported.carried.items())
    experts = (f", {imported.moe.num_experts} experts in layers {list(imported.moe.layers)}"
               if imported.moe else ", dense")
    return (f"wrote {path} from {fmt} (saved at TP {imported.source_tp}, PP "
            f"{imported.source_pp}, EP {imported.source_ep}): {imported.model.num_layers} layers"
            f"{experts}, {len(imported.tensors)} tensors in {time.time() - started:.2f} s\n"
            f"carried: {carried}")


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


COMMANDS = {"consolidate": consolidate, "export": export, "import": import_any}


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
