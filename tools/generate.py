"""Sample text from a checkpoint, in one process, with the checkpoint's own tokenizer.

    python tools/generate.py --load checkpoints/run1 --prompt "To be, or not to be" \
        --max-new-tokens 64 --temperature 0.8 --top-k 50 --top-p 0.95 --seed 1234

--load takes a checkpoint of any layout (a --save directory or one iter_NNNNNNN directory) or
a directory written by `tools/checkpoint_convert.py consolidate`. --temperature 0 is greedy.
Each new token re-runs the forward on the whole sequence (no KV cache: simple, and exact for
these sizes); the sequence stops at the model's --max-position-embeddings, at the end-of-document
id (unless --ignore-eod) or after --max-new-tokens. The same flags and --seed give the same text.
Padded vocabulary ids are never sampled: only the tokenizer's ids are candidates.

--transformers DIR (greedy only) also continues the same prompt ids with Hugging Face
transformers from DIR, a `tools/checkpoint_convert.py export` of the same checkpoint, prints both
id lists and exits 1 when they differ: the export computes what we compute.
"""

import argparse
import dataclasses
import os
import sys
import warnings

# Runnable as `python tools/generate.py` from anywhere: the repo root holds megatron/training.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# megatron-core warns at import that Transformer Engine / Apex are absent; we do not use them.
warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex are not installed.*")
# torch.distributed.checkpoint warns that it reads in one process, which is what these tools mean.
warnings.filterwarnings("ignore",
                        message="torch.distributed is disabled, unavailable or uninitialized")

import torch  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--load", required=True,
                   help="checkpoint directory (any layout) or consolidated directory")
    p.add_argument("--prompt", default="",
                   help="text to continue (empty: start from the end-of-document id)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0,
                   help="sample among the k most likely ids (0: all)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="sample among the most likely ids holding this mass")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--ignore-eod", action="store_true",
                   help="keep going past the end-of-document id")
    p.add_argument("--disable-moe-token-dropping", action="store_true",
                   help="route with no expert capacity (as Hugging Face exports do) instead of the "
                        "checkpoint's evaluation capacity")
    p.add_argument("--fp32", action="store_true",
                   help="compute in float32 whatever the checkpoint's dtype")
    p.add_argument("--transformers", metavar="DIR",
                   help="also generate greedily with transformers from DIR (an export of this "
                        "checkpoint) and check the ids are ours; needs --temperature 0, implies "
                        "--disable-moe-token-dropping (exports have no expert capacity)")
    args = p.parse_args(argv)
    for ok, message in ((args.max_new_tokens >= 0,
                         f"--max-new-tokens must be >= 0 (got {args.max_new_tokens})"),
                        (args.temperature >= 0,
                         f"--temperature must be >= 0 (got {args.temperature})"),
                        (args.top_k >= 0, f"--top-k must be >= 0 (got {args.top_k})"),
                        (0 < args.top_p <= 1, f"--top-p must be in (0, 1] (got {args.top_p})"),
                        (not args.transformers or args.temperature == 0,
                         "--transformers compares greedy ids: add --temperature 0")):
        if not ok:
            p.error(message)
    return args


# ---- sampling -----------------------------------------------------------------------------------
def next_token(logits_V: torch.Tensor, temperature: float, top_k: int, top_p: float,
               generator: torch.Generator) -> int:
    """One id from the logits of the real vocabulary [V]."""
    logits_V = logits_V.float()
    if temperature == 0:
        return int(logits_V.argmax())
    logits_V = logits_V / temperature
    if 0 < top_k < logits_V.numel():
        kth = logits_V.topk(top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    if top_p < 1.0:
        probs, order = logits_V.softmax(-1).sort(descending=True)
        # drop an id once the more likely ones already hold top_p (the most likely always stays)
        drop = probs.cumsum(-1) - probs >= top_p
        logits_V = logits_V.masked_fill(torch.zeros_like(drop).scatter(0, order, drop),
                                        float("-inf"))
    return int(torch.multinomial(logits_V.softmax(-1), 1, generator=generator))


@torch.no_grad()
def generate(model, prompt_ids: list[int], *, max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 1234, eod=None) -> list[int]:
    """The new ids after `prompt_ids` (not including a final `eod`), at most up to the model's
    max positions. Re-runs the whole forward per token."""
    limit = model.cfg.max_position_embeddings
    if not prompt_ids:
        raise ValueError("the prompt has no tokens")
    if len(prompt_ids) > limit:
        raise ValueError(f"--prompt is {len(prompt_ids)} tokens, more than the model's "
                         f"--max-position-embeddings {limit}")
    generator = torch.Generator().manual_seed(seed)
    device = model.embedding.weight.device
    ids, new = list(prompt_ids), []
    for _ in range(min(max_new_tokens, limit - len(prompt_ids))):
        tokens = torch.tensor([ids], device=device)
        logits = model(tokens, torch.arange(len(ids), device=device)[None])
        token = next_token(logits[0, -1, :model.cfg.vocab_size].cpu(), temperature, top_k, top_p,
                           generator)
        if token == eod:
            break
        ids.append(token)
        new.append(token)
    return new


# ---- the model ----------------------------------------------------------------------------------
def load_model(model_cfg, moe_cfg, tensors: dict, groups):
    """A one-process GPT (with its MoE layers) holding the stored tensors, in eval mode."""
    from megatron.model.params import load_stored_tensors
    from ted_patches.build import build_model

    model = build_model(model_cfg, moe_cfg, groups, seed=0)
    load_stored_tensors(model, tensors, groups)
    return model.eval()


def load(path: str, groups, *, no_drop: bool = False, fp32: bool = False):
    """(model, tokenizer) of a checkpoint or consolidated directory."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--load {path}: no such directory")
    from megatron.checkpoint import configs_from_meta
    from megatron.convert import read_model
    from megatron.data.tokenizer import build_tokenizer

    meta, tensors = read_model(path)
    model_cfg, moe_cfg = configs_from_meta(meta)
    if fp32:
        model_cfg = dataclasses.replace(model_cfg, params_dtype=torch.float32)
    if no_drop and moe_cfg is not None:
        moe_cfg = dataclasses.replace(moe_cfg, drop_tokens=False)
    tokenizer = build_tokenizer(**meta["tokenizer"])
    if tokenizer.vocab_size != model_cfg.vocab_size:
        raise ValueError(f"--load {path}: the tokenizer has {tokenizer.vocab_size} ids, the model "
                         f"{model_cfg.vocab_size} (were the tokenizer files replaced?)")
    return load_model(model_cfg, moe_cfg, tensors, groups), tokenizer


# ---- the same ids from transformers -------------------------------------------------------------
def transformers_ids(path: str, prompt_ids: list[int], max_new_tokens: int, eod) -> list[int]:
    """Greedy ids after `prompt_ids` from the exported model in `path`, cut at `eod` as ours."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--transformers {path}: no such directory (write it with "
                                "tools/checkpoint_convert.py export)")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()  # a loading bar per weight file: noise beside two id lists
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = model.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids),
                                                                               dtype=torch.long),
                         max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                         pad_token_id=0)
    new = out[0, len(prompt_ids):].tolist()
    return new[:new.index(eod)] if eod in new else new


def compare_with_transformers(args, ids: list[int], new: list[int], eod) -> None:
    theirs = transformers_ids(args.transformers, ids, len(new) + (eod is not None), eod)[:len(new)]
    print(f"ours:         {new}\ntransformers: {theirs}")
    if theirs != new:
        diverged = next(i for i, (a, b) in enumerate(zip(new, theirs)) if a != b)
        print(f"generate.py: error: transformers ({args.transformers}) diverged at new token "
              f"{diverged}: the export does not compute what the checkpoint does", file=sys.stderr)
        sys.exit(1)
    print(f"transformers ({args.transformers}) gives the same {len(new)} greedy ids")


def main(argv=None) -> str:
    args = parse_args(argv)
    try:
        from megatron.parallel.topology import Topology
        from megatron.launch.initialize import initialize_distributed

        groups, _ = initialize_distributed(Topology(1), backend="gloo")
        no_drop = args.disable_moe_token_dropping or bool(args.transformers)
        model, tokenizer = load(args.load, groups, no_drop=no_drop, fp32=args.fp32)
        prompt_ids = tokenizer.tokenize(args.prompt)
        start = ([] if prompt_ids
                 else [tokenizer.bos if tokenizer.bos is not None else tokenizer.eod])
        new = generate(model, start + prompt_ids, max_new_tokens=args.max_new_tokens,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       seed=args.seed, eod=None if args.ignore_eod else tokenizer.eod)
        text = tokenizer.detokenize(prompt_ids + new)
        if args.transformers:
            print(text)
            compare_with_transformers(args, start + prompt_ids, new,
                                      None if args.ignore_eod else tokenizer.eod)
            return text
    except (ValueError, KeyError, OSError) as e:
        print(f"generate.py: error: {e.args[0] if isinstance(e, KeyError) else e}", file=sys.stderr)
        sys.exit(2)
    print(text)
    return text


if __name__ == "__main__":
    main()
