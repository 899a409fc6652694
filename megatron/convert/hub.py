"""Files: Hugging Face model directories (config.json, safetensors weights, the tokenizer's files)
and the consolidated one-process files (the stored tensors beside the checkpoint's meta)."""

from __future__ import annotations

import json
import os
import shutil
from typing import Optional

import torch

from megatron.convert.common import ConversionError

CONSOLIDATED_TENSORS, CONSOLIDATED_META = "model.safetensors", "meta.json"


# ---- Hub directories ----------------------------------------------------------------------------
def write_hf(out_dir: str, config: dict, tensors: dict[str, torch.Tensor]) -> None:
    """config.json and model.safetensors (one file: these tools serve models one process holds)."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    save_file(_owned(tensors), os.path.join(out_dir, "model.safetensors"),
              metadata={"format": "pt"})
    _write_json(os.path.join(out_dir, "config.json"), config)


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def write_hf_tokenizer(out_dir: str, tokenizer: dict) -> Optional[str]:
    """The checkpoint's tokenizer (its record in the checkpoint: type and file paths) into the Hub
    folder: its own files and a tokenizer_config.json naming the transformers class that reads
    them, so AutoTokenizer encodes text as we do. GPT-2 BPE: vocab.json, merges.txt and
    tokenizer.json for GPT2Tokenizer (a literal "<|endoftext|>" in text is the end-of-text id
    there, ordinary text in ours, as in Megatron-LM). sentencepiece: tokenizer.model for
    LlamaTokenizer, which adds no BOS or EOS (ours adds none) and keeps sentencepiece's own
    whitespace handling (legacy). Returns the class, or None for NullTokenizer (ids only, no
    files). Raises OSError when a file has gone."""
    kind = tokenizer.get("tokenizer_type")
    if kind == "GPT2BPETokenizer":
        from tokenizers import ByteLevelBPETokenizer

        shutil.copyfile(tokenizer["vocab_file"], os.path.join(out_dir, "vocab.json"))
        shutil.copyfile(tokenizer["merge_file"], os.path.join(out_dir, "merges.txt"))
        # and the same tokenizer serialized (what ours encodes with): AutoTokenizer reads it under
        # any model type (with a Mixtral config.json it would not build GPT-2's from the two
        # files)
        ByteLevelBPETokenizer(tokenizer["vocab_file"], tokenizer["merge_file"]).save(
            os.path.join(out_dir, "tokenizer.json"))
        eod = "<|endoftext|>"
        config = {"tokenizer_class": "GPT2Tokenizer", "bos_token": eod, "eos_token": eod,
                  "unk_token": eod, "add_prefix_space": False}
    elif kind == "SentencePieceTokenizer":
        import sentencepiece

        shutil.copyfile(tokenizer["tokenizer_model"], os.path.join(out_dir, "tokenizer.model"))
        sp = sentencepiece.SentencePieceProcessor(model_file=tokenizer["tokenizer_model"])
        piece = lambda i: sp.id_to_piece(i) if i >= 0 else None  # noqa: E731
        config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False,
                  "add_eos_token": False, "legacy": True, "bos_token": piece(sp.bos_id()),
                  "eos_token": piece(sp.eos_id()), "unk_token": piece(sp.unk_id()),
                  "pad_token": piece(sp.pad_id())}
    else:
        return None
    _write_json(os.path.join(out_dir, "tokenizer_config.json"),
                {k: v for k, v in config.items() if v is not None})
    return config["tokenizer_class"]


def read_hf(in_dir: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config.json, all tensors) of a Hub directory: model.safetensors, or the shards its
    model.safetensors.index.json names."""
    from safetensors.torch import load_file

    config_path = os.path.join(in_dir, "config.json")
    if not os.path.isfile(config_path):
        raise ConversionError(f"--input {in_dir}: no config.json (give a Hugging Face model "
                              "directory)")
    with open(config_path) as f:
        config = json.load(f)
    index = os.path.join(in_dir, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(in_dir, "model.safetensors")):
        files = ["model.safetensors"]
    else:
        raise ConversionError(f"--input {in_dir}: no model.safetensors or "
                              "model.safetensors.index.json (only safetensors weights are read)")
    tensors = {}
    for name in files:
        tensors.update(load_file(os.path.join(in_dir, name)))
    return config, tensors


def _owned(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share storage (views of one parameter): copy those."""
    out = {}
    for name, t in tensors.items():
        t = t.detach().cpu()
        whole = (t.is_contiguous() and t.storage_offset() == 0
                 and t.untyped_storage().nbytes() == t.numel() * t.element_size())
        out[name] = t if whole else t.contiguous().clone()
    return out


# ---- consolidated one-process files ---------------------------------------------------------
def write_consolidated(out_dir: str, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    """The stored tensors as one safetensors file beside the checkpoint's meta as JSON."""
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    save_file(_owned(tensors), os.path.join(out_dir, CONSOLIDATED_TENSORS),
              metadata={"format": "pt"})
    _write_json(os.path.join(out_dir, CONSOLIDATED_META), meta)


def is_consolidated(path: str) -> bool:
    return all(os.path.isfile(os.path.join(path, name))
               for name in (CONSOLIDATED_TENSORS, CONSOLIDATED_META))


def read_model(path: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(meta, stored tensors) of a consolidated directory or of a checkpoint of any layout (a
    --save directory or one iter_NNNNNNN directory), in this one process."""
    if is_consolidated(path):
        from safetensors.torch import load_file

        with open(os.path.join(path, CONSOLIDATED_META)) as f:
            return json.load(f), load_file(os.path.join(path, CONSOLIDATED_TENSORS))
    from megatron.checkpoint import read_checkpoint_meta, read_stored_tensors

    return read_checkpoint_meta(path), read_stored_tensors(path)
