"""Megatron-Core's GPTModel: its torch_dist checkpoints (dist_checkpointing: DCP files, common.pt,
metadata.json under Megatron-LM's iter_N folders), read and written; and its state-dict names
(what Megatron-LM's legacy torch format stores for an mcore model, megatron_legacy.py).

Sharded keys, as megatron-core 0.16 writes them (global layer numbers, experts stacked by global
id; the norms under the names the Transformer Engine spec fuses them into):
    embedding.word_embeddings.weight [V_pad, H]      output_layer.weight [V_pad, H] (untied)
    decoder.layers.N.self_attention.linear_qkv.{layer_norm_weight,layer_norm_bias,weight,bias}
    decoder.layers.N.self_attention.linear_proj.{weight,bias}
    decoder.layers.N.mlp.linear_fc1.{layer_norm_weight,layer_norm_bias,weight,bias}
    decoder.layers.N.mlp.linear_fc2.{weight,bias}
    decoder.layers.N.mlp.router.weight [E, H]
    decoder.layers.N.mlp.experts.experts.linear_fc1.{weight [E, (2)F, H], bias [E, (2)F]}
    decoder.layers.N.mlp.experts.experts.linear_fc2.{weight [E, H, F], bias [E, H]}
    decoder.final_layernorm.{weight,bias}
SwiGLU's fc1 rows are [gate; up] of the full tensor (megatron-core stores the TP-local
[gate_r; up_r] halves at their global offsets); QKV rows are [group, (q .., k, v), head_dim] as
ours. Megatron-Core places MoE with --moe-layer-freq (0-based).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
from typing import Optional

import torch

from megatron.convert import megatron_args, peer_optim, safe_pickle
from megatron.convert.allowlist import Declaration, any_value, only, when
from megatron.convert.common import ConversionError
from megatron.convert.peer_common import (COLUMN, REPLICATED, ROW, Imported, Names,
                                          check_tensors, tokenizer_kwargs, tracked_folder,
                                          vocab_of)
from megatron.model.config import ModelConfig
from ted_patches.config import MoEConfig

FORMAT = "mcore"
TRACKER = "latest_checkpointed_iteration.txt"
BACKEND = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
           "common_backend": "torch", "common_backend_version": 1}

# ---- what an export to Megatron-Core expresses ------------------------------------------------
# Features Megatron-Core has but this exporter does not write the tensors or args of: only their
# defaults (the model computes as without them); a field added later is refused as undeclared.
_MODEL_DEFAULTS_ONLY = ("kv_channels", "rotary_percent", "rope_type", "rotary_scaling_factor",
                        "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                        "mscale_all_dim", "qk_layernorm", "multi_latent_attention", "q_lora_rank",
                        "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim", "v_head_dim")
_MOE_DEFAULTS_ONLY = ("shared_expert_intermediate_size", "shared_expert_gate",
                      "shared_expert_overlap", "use_upcycling", "per_layer_logging",
                      "pre_softmax", "topk_scaling_factor", "router_dtype", "enable_expert_bias",
                      "bias_update_rate", "router_num_groups", "router_group_topk")


def _defaults_only(cls, names) -> dict:
    """`only(default)` for each of `names` that `cls` has (the rest need no declaration)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in names:
            default = f.default
            if f.name == "rope_type":  # resolved in __post_init__: None means plain RoPE
                out[f.name] = only(None, "rope", message=_not_exported(cls, f.name))
            else:
                out[f.name] = only(default, message=_not_exported(cls, f.name))
    return out


def _not_exported(cls, name: str):
    return lambda value, model, moe: (f"{cls.__name__}.{name} = {value!r}: the mcore exporter "
                                      "writes no such feature (only its default)")


EXPRESSES = Declaration(
    FORMAT,
    model={
        **any_value("num_layers", "hidden_size", "num_attention_heads", "vocab_size",
                    "max_position_embeddings", "ffn_hidden_size", "position_embedding_type",
                    "rotary_base", "normalization", "norm_epsilon", "swiglu", "add_bias_linear",
                    "untie_embeddings_and_output_weights", "hidden_dropout", "attention_dropout",
                    "init_method_std", "num_query_groups"),
        # the dtype is the export's; padded rows are written as zeros to the padded size
        **any_value("params_dtype", "padded_vocab_size"),
        **_defaults_only(ModelConfig, _MODEL_DEFAULTS_ONLY),
    },
    dense_refused="a dense model: this exporter writes Megatron-Core GPT-MoE checkpoints",
    moe={
        "experts_per_layer": when(lambda counts, model, moe: len(set(counts or ())) <= 1,
                                  "a different expert count per MoE layer (pyramid MoE): "
                                  "Megatron-Core has one --num-experts"),
        "mlp_type": only("standard", message="residual MoE (--mlp-type residual) has no "
                                             "Megatron-Core counterpart"),
        "score_function": only("softmax", message="Megatron-Core's softmax router only"),
        "gate_normalization": only("topk", "none",
                                   message="gates renormalized over the surviving choices "
                                           "(DeepSpeed's --moe-gate-normalization surviving): "
                                           "Megatron-Core normalizes over the top-k "
                                           "(--moe-gate-normalization topk) or not at all "
                                           "(none, --moe-router-pre-softmax)"),
        "aux_loss_type": only("aux_loss", "none",
                              message="DeepSpeed's aux loss: Megatron-Core's is the switch loss "
                                      "over all k choices (--moe-aux-loss-type aux_loss)"),
        # written as Megatron-LM args; capacity and dropping are how a run trains
        **any_value("num_experts", "layers", "topk", "capacity_factor", "eval_capacity_factor",
                    "min_capacity", "drop_tokens", "drop_policy", "aux_loss_coeff",
                    "z_loss_coeff", "jitter_eps", "dtd", "pad_free", "check_tp_routing",
                    "expert_ffn_hidden_size"),
        **_defaults_only(MoEConfig, _MOE_DEFAULTS_ONLY),
    },
)

# ---- Megatron-Core's names -> ours -------------------------------------------------------------
# canonical state-dict names (global layer numbers, experts as local_experts.<global id>)
_NORM_ALIASES = [(".self_attention.linear_qkv.layer_norm_", ".input_layernorm."),
                 (".mlp.linear_fc1.layer_norm_", ".pre_mlp_layernorm.")]
_LAYER_MODULES = {
    "input_layernorm": ("input_norm", REPLICATED),
    "pre_mlp_layernorm": ("post_attention_norm", REPLICATED),
    "self_attention.linear_qkv": ("attention.qkv", COLUMN),
    "self_attention.linear_proj": ("attention.proj", ROW),
    "mlp.linear_fc1": ("mlp.fc1", COLUMN),
    "mlp.linear_fc2": ("mlp.fc2", ROW),
    "mlp.router": ("mlp.router", REPLICATED),
}
_ENDS = {"embedding.word_embeddings.weight": ("embedding.weight", COLUMN),
         "embedding.position_embeddings.weight": ("position_embedding.weight", REPLICATED),
         "decoder.final_layernorm.weight": ("final_norm.weight", REPLICATED),
         "decoder.final_layernorm.bias": ("final_norm.bias", REPLICATED),
         "output_layer.weight": ("output.weight", COLUMN)}
NAMES = Names(_ENDS, _LAYER_MODULES, re.compile(r"^decoder\.layers\.(\d+)\.(.+)\.(weight|bias)$"),
              re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc1|linear_fc2)$"),
              "linear_fc1", "not a GPTModel tensor")


def canonical(name: str) -> str:
    for fused, plain in _NORM_ALIASES:
        if fused in name:
            name = name.replace(fused, plain)
    return name


def split_of(name: str, swiglu: bool) -> str:
    """How a canonical state-dict name is split over TP (experts split as the dense MLP)."""
    return NAMES.split(name, swiglu)


def to_stored(full: dict, model: ModelConfig, layer_offset: int = 0) -> dict:
    """Our stored tensors of canonical Megatron-Core names (full tensors; SwiGLU fc1 weights and
    biases as (gate, up) pairs). Raises ConversionError naming a tensor it does not know."""
    return NAMES.to_stored(full, model, layer_offset)


def moe_layers(full: dict) -> dict[int, int]:
    """MoE layer -> experts, from canonical names."""
    found: dict[int, set] = {}
    for name in full:
        m = NAMES.layer.match(name)
        e = m and NAMES.expert.match(m.group(2))
        if e:
            found.setdefault(int(m.group(1)), set()).add(int(e.group(1)))
    return {layer: len(ids) for layer, ids in found.items()}


def expert_ffn(full: dict, swiglu: bool) -> Optional[int]:
    for name, t in full.items():
        if name.endswith("local_experts.0.linear_fc2.weight"):
            return t.shape[1]
    return None


def configs(args, full: dict, vocab: int, padded: int) -> tuple[ModelConfig, Optional[MoEConfig]]:
    model = megatron_args.model_config(args, vocab, padded, megatron_args.params_dtype(args))
    experts = moe_layers(full)
    moe = (megatron_args.mcore_moe_config(args, model.num_layers, experts,
                                          expert_ffn(full, model.swiglu)) if experts else None)
    return model, moe


# ---- torch_dist checkpoints (dist_checkpointing) -------------------------------------------------
def iteration_folder(src: str) -> str:
    """The folder holding .metadata / common.pt: SRC itself, or SRC's latest (Megatron-LM's
    tracker)."""
    if os.path.isfile(os.path.join(src, ".metadata")):
        return src
    folder = tracked_folder(src, TRACKER, f"{src}: no Megatron-Core checkpoint (no {TRACKER} "
                            "and no .metadata)")
    if not os.path.isfile(os.path.join(folder, ".metadata")):
        raise FileNotFoundError(f"{folder}/.metadata is missing (the tracker names it)")
    return folder


def _check_backend(folder: str) -> None:
    path = os.path.join(folder, "metadata.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: not a dist_checkpointing checkpoint")
    with open(path) as f:
        backend = json.load(f).get("sharded_backend")
    if backend != "torch_dist":
        raise ConversionError(f"{path}: sharded_backend {backend!r}; only torch_dist is read "
                              "(zarr and fully_parallel formats: re-save with "
                              "--ckpt-format torch_dist)")


def read_dcp(folder: str, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor of a DCP folder whose key starts with `prefix`, in full, read without running
    code (allow-listed metadata classes; tensor bytes only, pickled values never read)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from megatron.checkpoint.storage import LoadPlanner, Parts

    class Reader(dcp.FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            metadata = safe_pickle.load_dcp_metadata(os.path.join(folder, ".metadata"))
            from torch.distributed.checkpoint.metadata import StorageMeta

            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    metadata = Reader(folder).read_metadata()
    parts = {}
    for key, md in metadata.state_dict_metadata.items():
        if key.startswith(prefix) and isinstance(md, TensorStorageMetadata):
            full = torch.empty(tuple(md.size), dtype=md.properties.dtype)
            parts[key] = Parts(tuple(md.size), {(0,) * full.dim(): full})
    _check_files(folder, metadata)
    try:
        dcp.load(parts, storage_reader=Reader(folder), planner=LoadPlanner(folder), no_dist=True)
    except dcp.api.CheckpointException as e:
        raise ConversionError(f"loading {folder} failed: {str(e).splitlines()[0][:300]}") from None
    return {k: p.views[(0,) * len(p.shape)] for k, p in parts.items()}


def _check_files(folder: str, metadata) -> None:
    """Every data file the metadata names must be there and long enough (named when not)."""
    needed: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        name = str(info.relative_path)
        needed[name] = max(needed.get(name, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} is missing (a rank's data file the metadata names)")
        if os.path.getsize(path) < size:
            raise ConversionError(f"{path} is truncated ({os.path.getsize(path)} of {size} "
                                  "bytes)")


def _unstack_experts(raw: dict) -> dict:
    """Sharded keys -> canonical state-dict names: experts one by one (global ids)."""
    out = {}
    for key, t in raw.items():
        m = re.match(r"^(decoder\.layers\.\d+\.mlp\.experts)\.experts\.(linear_fc[12])\."
                     r"(weight|bias)$", key)
        if m:
            for e in range(t.shape[0]):
                out[f"{m.group(1)}.local_experts.{e}.{m.group(2)}.{m.group(3)}"] = t[e]
        else:
            out[canonical(key)] = t
    return out


def _fc1_pairs(full: dict, swiglu: bool) -> dict:
    """SwiGLU fc1 weights and biases of full tensors: [gate; up] -> (gate, up)."""
    if not swiglu:
        return full
    return {k: tuple(t.chunk(2, dim=0)) if re.search(r"linear_fc1\.(weight|bias)$", k) else t
            for k, t in full.items()}


def read(src: str, tokenizer_overrides: dict) -> Imported:
    folder = iteration_folder(src)
    _check_backend(folder)
    common = safe_pickle.load(os.path.join(folder, "common.pt"), "common.pt")
    args = common.get("args")
    if args is None:
        raise ConversionError(f"{folder}/common.pt holds no 'args' (Megatron-LM writes them): "
                              "cannot tell the model's configuration")
    raw = read_dcp(folder)
    model_keys = {k: t for k, t in raw.items() if not k.startswith(("optimizer.", "rng_state"))}
    full = _unstack_experts(model_keys)
    padded = full["embedding.word_embeddings.weight"].shape[0]
    vocab, tok = vocab_of(args, tokenizer_kwargs(args, tokenizer_overrides), padded)
    model, moe = configs(args, full, vocab, padded)
    tensors = to_stored(_fc1_pairs(full, model.swiglu), model)
    check_tensors(tensors, model, moe, folder)
    iteration = int(common.get("iteration", 0) or 0)
    scheduler = common.get("opt_param_scheduler")
    run = megatron_args.run_state(args, iteration, scheduler)
    carried = {"weights": "yes", "optimizer": _optimizer_note(raw),
               "schedule": peer_optim.schedule_note(run),
               "RNG": "no (per-rank streams of another layout)"}
    return Imported(model, moe, tensors, run, tok, carried,
                    source_tp=megatron_args.get(args, "tensor_model_parallel_size", 1),
                    source_pp=megatron_args.get(args, "pipeline_model_parallel_size", 1),
                    source_ep=megatron_args.get(args, "expert_model_parallel_size", 1),
                    notes=megatron_args.notes(args, model))


def _optimizer_note(raw: dict) -> str:
    if any(k.startswith("optimizer.") for k in raw):
        return peer_optim.optimizer_note(
            "torch_dist optimizer state is not converted: Megatron-LM's distributed optimizer "
            "stores it as flat per-bucket ranges of its DP layout (dp_reshardable), which do not "
            "name parameters")
    return peer_optim.optimizer_note(None)


# ---- export: our stored tensors -> a torch_dist checkpoint megatron-core loads -----------------
def sharded_tensors(tensors: dict, model: ModelConfig, moe: MoEConfig,
                    dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """{sharded key: full tensor} as megatron-core's GPTModel (local or TE spec) expects them."""
    def cast(t):
        return t.to(dtype).contiguous()

    pad = model.padded_vocab_size - model.vocab_size

    def rows(t):
        return torch.cat([t, t.new_zeros(pad, t.shape[1])]) if pad else t

    out = {"embedding.word_embeddings.weight": rows(tensors["embedding.weight"])}
    if model.position_embedding_type == "learned_absolute":
        out["embedding.position_embeddings.weight"] = tensors["position_embedding.weight"]
    if model.untie_embeddings_and_output_weights:
        out["output_layer.weight"] = rows(tensors["output.weight"])
    for suffix in ("weight", "bias"):
        if f"final_norm.{suffix}" in tensors:
            out[f"decoder.final_layernorm.{suffix}"] = tensors[f"final_norm.{suffix}"]
    for i in range(model.num_layers):
        out.update(_layer_keys(tensors, f"layers.{i}.", f"decoder.layers.{i}.", model,
                               moe.experts_in(i) if i in moe.layers else 0))
    return {k: cast(t) for k, t in out.items()}


def _fused(tensors: dict, name: str):
    if name in tensors:
        return tensors[name]
    if name + ".gate" in tensors:
        return torch.cat([tensors[name + ".gate"], tensors[name + ".up"]])
    return None


def _transposed(tensors: dict, name: str) -> dict:
    """An expert's w1 (or its SwiGLU halves), [in, out] -> nn.Linear's [out, in]."""
    return {k: tensors[k].t() for k in (name, name + ".gate", name + ".up") if k in tensors}


def _layer_keys(tensors: dict, ours: str, theirs: str, model: ModelConfig, experts: int) -> dict:
    out = {}
    pairs = [("input_norm.weight", "self_attention.linear_qkv.layer_norm_weight"),
             ("input_norm.bias", "self_attention.linear_qkv.layer_norm_bias"),
             ("attention.qkv.weight", "self_attention.linear_qkv.weight"),
             ("attention.qkv.bias", "self_attention.linear_qkv.bias"),
             ("attention.proj.weight", "self_attention.linear_proj.weight"),
             ("attention.proj.bias", "self_attention.linear_proj.bias"),
             ("post_attention_norm.weight", "mlp.linear_fc1.layer_norm_weight"),
             ("post_attention_norm.bias", "mlp.linear_fc1.layer_norm_bias")]
    if not experts:
        pairs += [("mlp.fc1.weight", "mlp.linear_fc1.weight"), ("mlp.fc1.bias",
                                                                "mlp.linear_fc1.bias"),
                  ("mlp.fc2.weight", "mlp.linear_fc2.weight"), ("mlp.fc2.bias",
                                                                "mlp.linear_fc2.bias")]
    for a, b in pairs:
        t = _fused(tensors, ours + a)
        if t is not None:
            out[theirs + b] = t
    if experts:
        out[theirs + "mlp.router.weight"] = tensors[ours + "mlp.router.weight"]
        x = ours + "mlp.experts."
        stacks = {"linear_fc1.weight": [_fused(_transposed(tensors, f"{x}{e}.w1"), f"{x}{e}.w1")
                                        for e in range(experts)],
                  "linear_fc2.weight": [tensors[f"{x}{e}.w2"].t() for e in range(experts)]}
        if model.add_bias_linear:
            stacks["linear_fc1.bias"] = [_fused(tensors, f"{x}{e}.b1") for e in range(experts)]
            stacks["linear_fc2.bias"] = [tensors[f"{x}{e}.b2"] for e in range(experts)]
        for k, ts in stacks.items():
            out[f"{theirs}mlp.experts.experts.{k}"] = torch.stack(ts)
    return out


def extra_states(model: ModelConfig, moe: MoEConfig) -> dict:
    """The linear layers' `_extra_state` objects megatron-core's local spec saves and expects on
    load (None: no fp8 metadata), as its ShardedObjects name them (experts: one per expert)."""
    def none():  # DCP pickles the value as megatron-core packs its objects: a list of them
        return [None]

    out = {}
    for i in range(model.num_layers):
        p = f"decoder.layers.{i}."
        names = [p + "self_attention.linear_proj", p + "self_attention.linear_qkv"]
        if i in moe.layers:
            e = moe.experts_in(i)
            out.update({f"{p}mlp.experts.experts.{fc}._extra_state/shard_{j}_{e}": none()
                        for fc in ("linear_fc1", "linear_fc2") for j in range(e)})
        else:
            names += [p + "mlp.linear_fc1", p + "mlp.linear_fc2"]
        out.update({f"{name}._extra_state/shard_0_1": none() for name in names})
    return out


def megatron_lm_args(model: ModelConfig, moe: MoEConfig) -> argparse.Namespace:
    """The args Megatron-LM would have run this model with (common.pt's 'args')."""
    return argparse.Namespace(
        num_layers=model.num_layers, hidden_size=model.hidden_size,
        num_attention_heads=model.num_attention_heads, ffn_hidden_size=model.ffn_hidden_size,
        max_position_embeddings=model.max_position_embeddings,
        seq_length=model.max_position_embeddings, padded_vocab_size=model.padded_vocab_size,
        position_embedding_type=model.position_embedding_type, rotary_base=model.rotary_base,
        normalization=model.normalization, norm_epsilon=model.norm_epsilon, swiglu=model.swiglu,
        add_bias_linear=model.add_bias_linear,
        untie_embeddings_and_output_weights=model.untie_embeddings_and_output_weights,
        group_query_attention=model.num_query_groups != model.num_attention_heads,
        num_query_groups=model.num_query_groups, init_method_std=model.init_method_std,
        hidden_dropout=model.hidden_dropout, attention_dropout=model.attention_dropout,
        num_experts=moe.num_experts, moe_router_topk=moe.topk,
        moe_layer_freq=[int(i in moe.layers) for i in range(model.num_layers)],
        moe_ffn_hidden_size=moe.expert_ffn_hidden_size or model.ffn_hidden_size,
        moe_router_pre_softmax=moe.gate_normalization == "none",
        moe_aux_loss_coeff=moe.aux_loss_coeff, moe_z_loss_coeff=moe.z_loss_coeff or None,
        moe_expert_capacity_factor=moe.capacity_factor if moe.drop_tokens else None,
        moe_token_drop_policy=moe.drop_policy if moe.drop_policy != "choice" else "position",
        moe_router_load_balancing_type="none" if moe.aux_loss_type == "none" else "aux_loss",
        bf16=model.params_dtype == torch.bfloat16, fp16=model.params_dtype == torch.float16,
        tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
        expert_model_parallel_size=1, ckpt_format="torch_dist")


def write(out_dir: str, tensors: dict, model: ModelConfig, moe: MoEConfig, iteration: int,
          dtype: torch.dtype) -> str:
    """A Megatron-LM --save folder: latest_checkpointed_iteration.txt and iter_N/ with the DCP
    files, common.pt (args, iteration, checkpoint_version) and metadata.json."""
    import torch.distributed.checkpoint as dcp

    folder = os.path.join(out_dir, f"iter_{iteration:07d}")
    os.makedirs(folder)
    state = {**sharded_tensors(tensors, model, moe, dtype), **extra_states(model, moe)}
    dcp.save(state, storage_writer=dcp.FileSystemWriter(folder), no_dist=True)
    torch.save({"args": megatron_lm_args(model, moe), "iteration": iteration,
                "checkpoint_version": 3.0}, os.path.join(folder, "common.pt"))
    with open(os.path.join(folder, "metadata.json"), "w") as f:
        json.dump(BACKEND, f)
    with open(os.path.join(out_dir, TRACKER), "w") as f:
        f.write(f"{iteration}\n")
    return folder
