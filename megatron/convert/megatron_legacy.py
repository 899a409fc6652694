"""Megatron-LM's legacy torch checkpoints (--ckpt-format torch): one torch.save pickle per model-
parallel rank,

    SAVE/latest_checkpointed_iteration.txt              the iteration (or "release")
    SAVE/iter_0000100/mp_rank_TT[_PPP[_EEE]]/model_optim_rng.pt
        {"args": Namespace, "iteration", "checkpoint_version", "model": state dict,
         "optimizer", "opt_param_scheduler", "rng_state", ...}

_PPP appears with pipeline parallelism, _EEE with expert parallelism (Megatron-LM's
get_checkpoint_name). The model's state dict holds either the legacy GPTModel's names
(language_model.embedding / encoder.layers.N ..., nested dicts) or a Megatron-Core GPTModel's
(decoder.layers.N ..., experts as local_experts.<local id>), with layer numbers local to the
pipeline stage. TP shards are merged, pipeline stages offset by their first layer, experts
renumbered by global id (ep_rank * local experts + local id).
"""

from __future__ import annotations

import os
import re

from megatron.convert import mcore, megatron_args, peer_optim, safe_pickle
from megatron.convert.common import ConversionError
from megatron.convert.peer_common import (Imported, canonical as legacy_name, check_tensors,
                                          flatten, legacy_split, legacy_to_stored, merge_all,
                                          tokenizer_kwargs, tracked_folder, vocab_of)

FORMAT = "megatron-legacy"
TRACKER = "latest_checkpointed_iteration.txt"
FILE = "model_optim_rng.pt"


def iteration_folder(src: str) -> str:
    if os.path.isdir(os.path.join(src, "mp_rank_00")) or any(
            e.startswith("mp_rank_") for e in _listdir(src)):
        return src
    return tracked_folder(src, TRACKER, f"{src}: no Megatron-LM torch checkpoint (no {TRACKER} "
                          "and no mp_rank_* folders)")


def _listdir(path: str) -> list[str]:
    return os.listdir(path) if os.path.isdir(path) else []


def rank_file(folder: str, tp: int, pp: int, ep: int, pp_size: int, ep_size: int) -> str:
    name = f"mp_rank_{tp:02d}"
    if pp_size > 1:
        name += f"_{pp:03d}"
    if ep_size > 1:
        name += f"_{ep:03d}"
    return os.path.join(folder, name, FILE)


def _sizes(args) -> tuple[int, int, int]:
    get = megatron_args.get
    refused = [("virtual_pipeline_model_parallel_size", "virtual pipeline stages"),
               ("num_layers_per_virtual_pipeline_stage", "virtual pipeline stages"),
               ("decoder_first_pipeline_num_layers", "an uneven first pipeline stage"),
               ("decoder_last_pipeline_num_layers", "an uneven last pipeline stage"),
               ("expert_tensor_parallel_size", None)]
    for name, why in refused:
        value = get(args, name)
        if name == "expert_tensor_parallel_size":
            if value not in (None, get(args, "tensor_model_parallel_size", 1)):
                raise ConversionError(f"args.{name} = {value}: expert TP other than TP is not "
                                      "imported")
        elif value:
            raise ConversionError(f"args.{name} = {value}: {why} are not imported (only even "
                                  "stages)")
    return (get(args, "tensor_model_parallel_size", 1) or 1,
            get(args, "pipeline_model_parallel_size", 1) or 1,
            get(args, "expert_model_parallel_size", 1) or 1)


def _model_state(ckpt: dict, path: str) -> dict:
    if "model" not in ckpt:
        extra = " (virtual pipeline stages: model0, model1 ...)" if "model0" in ckpt else ""
        raise ConversionError(f"{path} holds no 'model'{extra}")
    return flatten(ckpt["model"])


def _is_mcore(names) -> bool:
    return any(n.startswith("decoder.") for n in names)


def read(src: str, tokenizer_overrides: dict) -> Imported:
    folder = iteration_folder(src)
    first_path = _first_file(folder)
    first = safe_pickle.load(first_path, "rank file")
    args = first.get("args")
    if args is None:
        raise ConversionError(f"{first_path} holds no 'args': cannot tell the model's "
                              "configuration")
    tp, pp, ep = _sizes(args)
    layers_per_stage = args.num_layers // pp
    full, optimizer_seen, stages = {}, "optimizer" in first, []
    for stage in range(pp):
        per_ep = []
        for e in range(ep):
            shards = []
            for t in range(tp):
                path = rank_file(folder, t, stage, e, pp, ep)
                ckpt = first if path == first_path else safe_pickle.load(path, "rank file")
                optimizer_seen = optimizer_seen or "optimizer" in ckpt
                shards.append((_model_state(ckpt, path), ckpt.get("optimizer"), path))
            per_ep.append(shards)
        stages.append(per_ep)
        full.update(_stage([[sd for sd, _, _ in s] for s in per_ep], args,
                           stage * layers_per_stage))
    imported = _imported(full, args, first, folder, tokenizer_overrides, (tp, pp, ep))
    if optimizer_seen:
        _add_moments(imported, stages, args, layers_per_stage, _is_mcore(full))
    return imported


def _add_moments(imported: Imported, stages: list, args, layers_per_stage: int,
                 mcore_names: bool) -> None:
    """Adam's moments of the plain (non-distributed) optimizer in each rank's file, tied to the
    rank's parameter names (peer_optim.py) and merged like the weights; otherwise the
    'optimizer' note says why not."""
    try:
        per_rank = [[[_rank_moments(sd, opt, path) for sd, opt, path in s] for s in per_ep]
                    for per_ep in stages]
    except peer_optim.NotMapped as e:
        imported.carried["optimizer"] = peer_optim.optimizer_note(str(e))
        return
    flat = [m for per_ep in per_rank for s in per_ep for m in s]
    steps = {m[2] for m in flat}
    if len(steps) > 1:
        imported.carried["optimizer"] = peer_optim.optimizer_note(
            f"model-parallel ranks took different numbers of steps {sorted(steps)}")
        return
    to_stored = mcore.to_stored if mcore_names else legacy_to_stored
    for i, key in enumerate(("exp_avg", "exp_avg_sq")):
        merged = {}
        for stage, per_ep in enumerate(per_rank):
            merged.update(_stage([[m[i] for m in s] for s in per_ep], args,
                                 stage * layers_per_stage))
        imported.moments[key] = to_stored(merged, imported.model)
    imported.optimizer_step, imported.loss_scaler = steps.pop(), flat[0][3]
    imported.carried["optimizer"] = peer_optim.optimizer_note(imported.moments,
                                                              imported.optimizer_step)


def _rank_moments(sd: dict, optimizer, path: str):
    if optimizer is None:
        raise peer_optim.NotMapped(f"{path} holds no optimizer state")
    avg, avg_sq, step = peer_optim.moments(optimizer, [(n, tuple(t.shape))
                                                       for n, t in sd.items()], path)
    return avg, avg_sq, step, peer_optim.loss_scaler(optimizer)


def _first_file(folder: str) -> str:
    found = sorted(e for e in _listdir(folder) if e.startswith("mp_rank_00"))
    if not found:
        raise FileNotFoundError(f"{folder}: no mp_rank_00*/{FILE} (rank 0's file is missing)")
    return os.path.join(folder, found[0], FILE)


def _stage(per_ep: list[list[dict]], args, offset: int) -> dict:
    """One pipeline stage's tensors (every TP and EP rank) under canonical global names."""
    swiglu = bool(megatron_args.get(args, "swiglu"))
    mcore_names = _is_mcore(per_ep[0][0])
    out = {}
    for e, shards in enumerate(per_ep):
        if mcore_names:
            shards = [{mcore.canonical(k): v for k, v in sd.items()} for sd in shards]
            merged = merge_all(shards, lambda n: mcore.split_of(n, swiglu))
        else:
            shards = [{legacy_name(k): v for k, v in sd.items()} for sd in shards]
            expert_tp = bool(megatron_args.get(args, "enable_expert_tensor_parallelism"))
            merged = merge_all(shards, lambda n: legacy_split(n, swiglu, expert_tp))
        counts = _local_experts(merged) if mcore_names else {}
        for name, t in merged.items():
            name = _global(name, offset, e, counts)
            if name is not None:
                out[name] = t
    return out


_LOCAL_EXPERT = re.compile(r"^decoder\.layers\.(\d+)\..*\.local_experts\.(\d+)\.")


def _local_experts(names) -> dict[int, int]:
    """Stage-local layer -> experts in one EP rank's file."""
    found: dict[int, set] = {}
    for name in names:
        m = _LOCAL_EXPERT.match(name)
        if m:
            found.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return {layer: len(ids) for layer, ids in found.items()}


def _global(name: str, offset: int, ep_rank: int, counts: dict[int, int]):
    """A stage-local name -> the global one (layer + offset; experts by global id); None for a
    replica an earlier EP rank's file holds too."""
    m = _LOCAL_EXPERT.match(name)
    if m:
        layer, local = int(m.group(1)), int(m.group(2))
        name = name.replace(f".local_experts.{local}.",
                            f".local_experts.{ep_rank * counts[layer] + local}.", 1)
    elif ep_rank:
        return None
    layer = re.match(r"^((?:decoder|encoder)\.layers\.)(\d+)(\..*)$", name)
    if layer:
        name = f"{layer.group(1)}{int(layer.group(2)) + offset}{layer.group(3)}"
    return name


def _imported(full: dict, args, first: dict, folder: str, overrides: dict, sizes) -> Imported:
    padded_name = ("embedding.word_embeddings.weight")
    if padded_name not in full:
        raise ConversionError(f"{folder}: no embedding.word_embeddings.weight in the first "
                              "stage's files")
    padded = full[padded_name].shape[0]
    vocab, tok = vocab_of(args, tokenizer_kwargs(args, overrides), padded)
    if _is_mcore(full):
        model, moe = mcore.configs(args, full, vocab, padded)
        tensors = mcore.to_stored(full, model)
    else:
        from megatron.convert.megatron_deepspeed import legacy_configs

        model, moe = legacy_configs(args, full, vocab, padded)
        tensors = legacy_to_stored(full, model)
    check_tensors(tensors, model, moe, folder)
    iteration = first.get("iteration", 0)
    scheduler = first.get("opt_param_scheduler") or first.get("lr_scheduler")
    run = megatron_args.run_state(args, 0 if iteration == "release" else iteration, scheduler)
    carried = {"weights": "yes", "optimizer": peer_optim.optimizer_note(None),
               "schedule": peer_optim.schedule_note(run),
               "RNG": "no (per-rank streams of another layout)"}
    tp, pp, ep = sizes
    return Imported(model, moe, tensors, run, tok, carried, tp, pp, ep,
                    megatron_args.notes(args, model))
