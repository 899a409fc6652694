"""Megatron-DeepSpeed GPT-MoE checkpoints, as DeepSpeed's engine writes them:

    SAVE/latest                                          the tag, e.g. global_step100
    SAVE/global_step100/mp_rank_TT_model_states.pt       {"module": the non-expert state dict,
        "args" (Megatron-DS's client state), "iteration", "global_steps", "global_samples",
        "lr_scheduler", "mp_world_size", ...}
    SAVE/global_step100/layer_L_expert_E_mp_rank_TT_model_states.pt
                                                         one expert of the L-th MoE layer (L
        counts MoE layers, E the global expert id; DeepSpeed renames each EP rank's local ids)
    SAVE/global_step100/zero_pp_rank_*_optim_states.pt, expp_rank_*_optim_states.pt (optimizer)

Names are the legacy GPTModel's (language_model.encoder.layers.N ...), the MoE block DeepSpeed's
(mlp.deepspeed_moe.gate.wg, mlp.deepspeed_moe.experts.deepspeed_experts.E.dense_h_to_4h, residual
MoE's mlp.mlp.* and mlp.coefficient). Experts are replicated over TP unless
--enable-expert-tensor-parallelism. MoE layers follow --expert-interval (1-based: layers N, 2N,
...); the gate is DeepSpeed's TopKGate (raw top-1 probability, top-2 renormalized over the
survivors, capacity by position).
"""

from __future__ import annotations

import os
import re

from megatron.convert import megatron_args, peer_optim, safe_pickle
from megatron.convert.common import ConversionError
from megatron.convert.peer_common import (Imported, canonical, check_tensors, flatten,
                                          legacy_split, legacy_to_stored, merge_all,
                                          tokenizer_kwargs, vocab_of)

FORMAT = "megatron-deepspeed"
_EXPERT_FILE = re.compile(r"^layer_(\d+)_expert_(\d+)_mp_rank_(\d+)_model_states\.pt$")
_EXPERT_NAME = re.compile(r"^encoder\.layers\.(\d+)\.mlp\.deepspeed_moe\.experts\."
                          r"deepspeed_experts\.(\d+)\.")


def tag_folder(src: str) -> str:
    if os.path.isfile(os.path.join(src, "mp_rank_00_model_states.pt")):
        return src
    latest = os.path.join(src, "latest")
    if not os.path.isfile(latest):
        raise FileNotFoundError(f"{src}: no DeepSpeed checkpoint (no 'latest' file and no "
                                "mp_rank_00_model_states.pt)")
    with open(latest) as f:
        tag = f.read().strip()
    folder = os.path.join(src, tag)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{latest} names {tag!r}, but {folder} does not exist")
    return folder


def _expert_files(folder: str) -> dict[int, dict[int, set]]:
    """MoE layer ordinal -> {global expert id -> the mp ranks with a file}."""
    found: dict[int, dict[int, set]] = {}
    for entry in os.listdir(folder):
        m = _EXPERT_FILE.match(entry)
        if m:
            layer, expert, tp = map(int, m.groups())
            found.setdefault(layer, {}).setdefault(expert, set()).add(tp)
    return found


def _check_expert_files(folder: str, found: dict, args, tp: int) -> None:
    """Every expert file DeepSpeed writes for these args must be there (named when missing)."""
    counts = megatron_args.get(args, "num_experts") or [1]
    counts = counts if isinstance(counts, (list, tuple)) else [counts]
    if max(counts) <= 1:
        return
    layers = megatron_args.get(args, "num_layers") // megatron_args.get(args, "expert_interval", 2)
    per_layer = counts if len(counts) > 1 else counts * layers
    for layer, experts in enumerate(per_layer):
        for expert in range(experts):
            for rank in range(tp):
                if rank not in found.get(layer, {}).get(expert, set()):
                    name = f"layer_{layer}_expert_{expert}_mp_rank_{rank:02d}_model_states.pt"
                    raise FileNotFoundError(f"{os.path.join(folder, name)} is missing (MoE layer "
                                            f"{layer}, expert {expert} of {experts})")


def read(src: str, tokenizer_overrides: dict) -> Imported:
    folder = tag_folder(src)
    first_path = os.path.join(folder, "mp_rank_00_model_states.pt")
    first = safe_pickle.load(first_path, "rank file")
    args = first.get("args")
    if args is None:
        raise ConversionError(f"{first_path} holds no 'args' (Megatron-DeepSpeed's client state): "
                              "cannot tell the model's configuration")
    tp = megatron_args.get(args, "tensor_model_parallel_size") or first.get("mp_world_size", 1)
    if (megatron_args.get(args, "pipeline_model_parallel_size", 1) or 1) > 1:
        raise ConversionError("args.pipeline_model_parallel_size > 1: DeepSpeed's pipeline "
                              "engine's layer_NN-model_states files are not imported")
    experts = _expert_files(folder)
    _check_expert_files(folder, experts, args, tp)
    shards, rank_states = [], []
    for rank in range(tp):
        path = os.path.join(folder, f"mp_rank_{rank:02d}_model_states.pt")
        ckpt = first if rank == 0 else safe_pickle.load(path, "rank file")
        if "module" not in ckpt:
            raise ConversionError(f"{path} holds no 'module' state dict")
        sd = flatten(ckpt["module"])
        expert_sds = {}
        for layer, by_id in experts.items():
            for expert in by_id:
                name = f"layer_{layer}_expert_{expert}_mp_rank_{rank:02d}_model_states.pt"
                expert_sds[(layer, expert)] = flatten(
                    safe_pickle.load(os.path.join(folder, name), "expert file"))
        rank_states.append((ckpt, sd, expert_sds))
        shards.append({k: v for one in (sd, *expert_sds.values()) for k, v in one.items()})
    swiglu = bool(megatron_args.get(args, "swiglu"))
    expert_tp = bool(megatron_args.get(args, "enable_expert_tensor_parallelism"))

    def merged_of(per_rank):
        return merge_all([{canonical(k): v for k, v in sd.items()} for sd in per_rank],
                         lambda n: legacy_split(n, swiglu, expert_tp))

    imported = _imported(merged_of(shards), args, first, folder, tokenizer_overrides, tp)
    _add_moments(imported, folder, rank_states, merged_of)
    return imported


def _add_moments(imported: Imported, folder: str, rank_states: list, merged_of) -> None:
    """Adam's moments from DeepSpeed's non-ZeRO optimizer files, tied to parameter names
    (peer_optim.py), merged like the weights; the 'optimizer' note says why when they are not."""
    entries = os.listdir(folder)
    if any(e.startswith(("zero_pp_rank_", "bf16_zero_pp_rank_")) for e in entries):
        imported.carried["optimizer"] = peer_optim.optimizer_note(
            "DeepSpeed's ZeRO optimizer shards are not converted")
        return
    try:
        per_tp = [_rank_moments(folder, tp, *state) for tp, state in enumerate(rank_states)]
    except peer_optim.NotMapped as e:
        imported.carried["optimizer"] = peer_optim.optimizer_note(str(e))
        return
    if per_tp[0] is None:
        return  # no optimizer state saved: the note already says so
    steps = {step for _, _, step, _ in per_tp}
    if len(steps) > 1:
        imported.carried["optimizer"] = peer_optim.optimizer_note(
            f"TP ranks took different numbers of steps {sorted(steps)}")
        return
    model = imported.model
    imported.moments = {key: legacy_to_stored(merged_of([m[i] for m in per_tp]), model)
                        for i, key in enumerate(("exp_avg", "exp_avg_sq"))}
    imported.optimizer_step = steps.pop()
    imported.loss_scaler = per_tp[0][3]
    imported.carried["optimizer"] = peer_optim.optimizer_note(imported.moments,
                                                              imported.optimizer_step)


def _rank_moments(folder: str, tp: int, ckpt: dict, sd: dict, expert_sds: dict):
    """(exp_avg, exp_avg_sq, step, loss scaler) by name over every EP rank of TP rank `tp`, or
    None when there is no optimizer state. DeepSpeed's MoE save writes each EP rank's optimizer
    (over that rank's module: its local experts) to expp_rank_E_mp_rank_TT_optim_states.pt; a
    model without MoE keeps it in the model-states file."""
    pattern = re.compile(rf"^expp_rank_(\d+)_mp_rank_{tp:02d}_optim_states\.pt$")
    files = sorted((int(m.group(1)), e) for e in os.listdir(folder) if (m := pattern.match(e)))
    if not files:
        state = ckpt.get("optimizer")
        return None if state is None else _one_rank(state, _names(sd, ckpt, {}, 0, 1),
                                                    f"mp_rank_{tp:02d}_model_states.pt")
    ep_size = len(files)
    if [e for e, _ in files] != list(range(ep_size)):
        raise peer_optim.NotMapped(f"expp_rank files {[e for e, _ in files]} are not 0..{ep_size}")
    avg, avg_sq, steps, scaler = {}, {}, set(), None
    for ep, name in files:
        state = safe_pickle.load(os.path.join(folder, name), "optimizer file").get("optimizer")
        if state is None:
            return None
        a, s, step, scaler = _one_rank(state, _names(sd, ckpt, expert_sds, ep, ep_size), name)
        for k in a:  # the replicated parameters: EP rank 0's copy
            avg.setdefault(k, a[k])
            avg_sq.setdefault(k, s[k])
        steps.add(step)
    if len(steps) > 1:
        raise peer_optim.NotMapped(f"EP ranks took different numbers of steps {sorted(steps)}")
    return avg, avg_sq, steps.pop(), scaler


def _one_rank(state, params: list, where: str):
    avg, avg_sq, step = peer_optim.moments(state, [(n, tuple(t.shape)) for n, t in params],
                                           where)
    return avg, avg_sq, step, peer_optim.loss_scaler(state)


_GATE = "deepspeed_moe.gate.wg.weight"


def _names(sd: dict, ckpt: dict, expert_sds: dict, ep: int, ep_size: int) -> list:
    """EP rank `ep`'s parameters (name, tensor) in its module's order, experts under their global
    names: the non-expert state dict's order, each MoE layer's local experts right after its
    gate (DeepSpeed's MoE holds `deepspeed_moe.gate` before `deepspeed_moe.experts`)."""
    buffers = set(ckpt.get("buffer_names") or ())
    by_layer: dict[str, dict[int, dict]] = {}
    for (_, expert), one in expert_sds.items():
        prefix = next(iter(one)).split("experts.deepspeed_experts.")[0]
        by_layer.setdefault(prefix, {})[expert] = one
    out = []
    for name, t in sd.items():
        if name in buffers:
            continue
        out.append((name, t))
        if name.endswith(_GATE):
            ids = sorted(by_layer.get(name[:-len("gate.wg.weight")], {}))
            local = len(ids) // ep_size
            for expert in ids[ep * local:(ep + 1) * local]:
                out += list(by_layer[name[:-len("gate.wg.weight")]][expert].items())
    return out


def legacy_configs(args, full: dict, vocab: int, padded: int):
    """(ModelConfig, MoEConfig or None) of a legacy-named model (Megatron-DS / Megatron-LM)."""
    model = megatron_args.model_config(args, vocab, padded, megatron_args.params_dtype(args))
    if model.num_query_groups != model.num_attention_heads:
        raise ConversionError(f"args.num_key_value_heads = {model.num_query_groups}: grouped-query "
                              "attention in Megatron-DeepSpeed's layout is not imported")
    found: dict[int, set] = {}
    for name in full:
        m = _EXPERT_NAME.match(name)
        if m:
            found.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    if not found:
        return model, None
    counts = {layer: len(ids) for layer, ids in found.items()}
    moe = megatron_args.deepspeed_moe_config(args, model.num_layers, counts)
    return model, moe


def _imported(full: dict, args, first: dict, folder: str, overrides: dict, tp: int) -> Imported:
    name = "embedding.word_embeddings.weight"
    if name not in full:
        raise ConversionError(f"{folder}: no language_model.{name} in mp_rank_00")
    padded = full[name].shape[0]
    vocab, tok = vocab_of(args, tokenizer_kwargs(args, overrides), padded)
    model, moe = legacy_configs(args, full, vocab, padded)
    tensors = legacy_to_stored(full, model)
    check_tensors(tensors, model, moe, folder)
    iteration = first.get("iteration", first.get("global_steps", 0)) or 0
    run = megatron_args.run_state(args, iteration, first.get("lr_scheduler"))
    if megatron_args.get(args, "consumed_train_samples") is None and first.get("global_samples"):
        run["consumed_samples"] = int(first["global_samples"])
    carried = {"weights": "yes", "optimizer": peer_optim.optimizer_note(None),
               "schedule": peer_optim.schedule_note(run),
               "RNG": "no (per-rank streams of another layout)"}
    ep = megatron_args.get(args, "ep_world_size", 1) or megatron_args.get(
        args, "moe_expert_parallel_size", 1) or 1
    return Imported(model, moe, tensors, run, tok, carried, source_tp=tp, source_ep=ep,
                    notes=megatron_args.notes(args, model))
