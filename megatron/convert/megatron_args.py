"""Megatron's `args` (the argparse.Namespace Megatron-LM, Megatron-DeepSpeed and Megatron-Core
runs store in their checkpoints) -> our ModelConfig and MoEConfig.

Each field the peer's args may set is either mapped, or checked to hold a value our model computes
alike, or refused with a ConversionError naming the peer's field (`args.<name>`) and why. The MoE
layers themselves come from the checkpoint's tensors (which layers hold experts, and how many), and
are checked against the args' own placement (Megatron-DeepSpeed's --expert-interval, 1-based;
Megatron-Core's --moe-layer-freq, 0-based).
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron.convert.common import ConversionError
from megatron.model.config import ModelConfig
from ted_patches.config import MoEConfig, moe_layer_indices

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def get(args, name: str, default=None):
    return getattr(args, name, default) if args is not None else default


def enum_name(value) -> Optional[str]:
    """A value of one of the peers' enums (or our stand-in for an enum we do not import), or a
    plain string, as a lower-case name."""
    if value is None:
        return None
    return str(getattr(value, "name", value)).lower()


# Megatron-DeepSpeed's PositionEmbeddingType enum values (megatron/model/enums.py)
_DS_POSITIONS = {1: "rotary", 2: "absolute", 3: "alibi"}


def _position_type(args) -> str:
    value = get(args, "position_embedding_type")
    name = enum_name(value)
    if name is not None and name.isdigit():
        name = _DS_POSITIONS.get(int(name), name)
    if get(args, "use_rotary_position_embeddings"):
        name = "rotary"
    found = {None: "learned_absolute", "learned_absolute": "learned_absolute",
             "absolute": "learned_absolute", "rope": "rope", "rotary": "rope", "none": "none"}
    if name not in found:
        raise ConversionError(f"args.position_embedding_type {name!r}: only learned absolute "
                              "positions, RoPE or none can be imported")
    return found[name]


def _refuse(args, checks) -> None:
    for name, ok, why in checks:
        if name is None or hasattr(args, name):
            if not ok(get(args, name) if name else None):
                raise ConversionError(f"args.{name} = {get(args, name)!r}: {why}")


def model_config(args, vocab_size: int, padded_vocab_size: int,
                 dtype: torch.dtype = torch.float32) -> ModelConfig:
    """Our ModelConfig of a Megatron run's args. `vocab_size` is the tokenizer's (the real rows),
    `padded_vocab_size` the rows the checkpoint's embedding holds."""
    _refuse(args, [
        ("apply_residual_connection_post_layernorm", lambda v: not v,
         "a post-norm residual; our layers are pre-norm"),
        ("openai_gelu", lambda v: not v, "the tanh GELU; ours is exact (erf) GELU"),
        ("onnx_safe", lambda v: not v, "an ONNX-safe GELU; ours is exact (erf) GELU"),
        ("squared_relu", lambda v: not v, "squared ReLU; ours is GELU or SwiGLU"),
        ("qk_layernorm", lambda v: not v, "QK layer norm is not in our attention"),
        ("apply_layernorm_1p", lambda v: not v, "zero-centred norm weights (layernorm 1p)"),
        ("rotary_percent", lambda v: v in (None, 1.0), "partial rotary is not supported"),
        ("rotary_interleaved", lambda v: not v, "interleaved RoPE; ours rotates halves"),
        ("use_rope_scaling", lambda v: not v, "RoPE scaling is not supported"),
        ("multi_latent_attention", lambda v: not v, "MLA is not supported"),
        ("num_experts_per_layer", lambda v: not v, "per-layer expert lists are read from tensors"),
        ("kv_channels", lambda v: v in (None, args.hidden_size // args.num_attention_heads),
         "kv_channels other than hidden_size / num_attention_heads"),
    ])
    normalization = enum_name(get(args, "normalization", "LayerNorm"))
    if normalization not in ("layernorm", "rmsnorm"):
        raise ConversionError(f"args.normalization {normalization!r}: only LayerNorm or RMSNorm")
    groups = (get(args, "num_query_groups") if get(args, "group_query_attention")
              else get(args, "num_key_value_heads"))
    return ModelConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads, vocab_size=vocab_size,
        max_position_embeddings=get(args, "max_position_embeddings") or args.seq_length,
        ffn_hidden_size=get(args, "ffn_hidden_size"),
        position_embedding_type=_position_type(args),
        rotary_base=float(get(args, "rotary_base", 10000) or 10000),
        normalization="RMSNorm" if normalization == "rmsnorm" else "LayerNorm",
        norm_epsilon=get(args, "norm_epsilon") or get(args, "layernorm_epsilon", 1e-5),
        swiglu=bool(get(args, "swiglu", False)),
        add_bias_linear=bool(get(args, "add_bias_linear", True)),
        untie_embeddings_and_output_weights=bool(get(args, "untie_embeddings_and_output_weights")),
        hidden_dropout=get(args, "hidden_dropout", 0.1), attention_dropout=get(
            args, "attention_dropout", 0.1),
        init_method_std=get(args, "init_method_std", 0.02), params_dtype=dtype,
        padded_vocab_size=vocab_size, num_query_groups=groups or None)


def _placement(args, num_layers: int, layers: tuple[int, ...]) -> None:
    """The MoE layers found in the tensors must be the ones the args place."""
    interval, freq = get(args, "expert_interval"), get(args, "moe_layer_freq")
    if interval is not None:
        flag, expected = "expert_interval", moe_layer_indices(num_layers, expert_interval=interval)
    elif isinstance(freq, int):
        flag, expected = "moe_layer_freq", moe_layer_indices(num_layers, layer_freq=freq)
    elif isinstance(freq, (list, tuple)):
        flag, expected = "moe_layer_freq", tuple(i for i, f in enumerate(freq) if f)
    else:
        return
    if tuple(expected) != tuple(layers):
        raise ConversionError(f"args.{flag} = {interval if flag == 'expert_interval' else freq} "
                              f"places MoE in layers {list(expected)}, the checkpoint's tensors in "
                              f"{list(layers)}: the file does not match its args")


def deepspeed_moe_config(args, num_layers: int, experts: dict[int, int]) -> MoEConfig:
    """Megatron-DeepSpeed's MoE (DeepSpeed's TopKGate) of its args; `experts`: MoE layer ->
    experts found in the checkpoint."""
    layers = tuple(sorted(experts))
    _placement(args, num_layers, layers)
    counts = tuple(experts[i] for i in layers)
    _refuse(args, [
        ("topk", lambda v: v in (None, 1, 2), "DeepSpeed's gate above top-2 is not imported"),
        ("moe_use_rts", lambda v: not v,
         "random token selection drops tokens at random; ours keeps them in order"),
    ])
    return MoEConfig(
        num_experts=max(counts), layers=layers, topk=get(args, "topk", 1) or 1,
        capacity_factor=get(args, "moe_train_capacity_factor", 1.0),
        eval_capacity_factor=get(args, "moe_eval_capacity_factor", 1.0),
        min_capacity=get(args, "moe_min_capacity", 4),
        drop_tokens=bool(get(args, "moe_token_dropping", True)),
        drop_policy="position", gate_normalization="surviving", aux_loss_type="deepspeed",
        aux_loss_coeff=get(args, "moe_loss_coeff", 0.1),
        mlp_type=get(args, "mlp_type", "standard") or "standard",
        experts_per_layer=None if len(set(counts)) == 1 else counts)


def mcore_moe_config(args, num_layers: int, experts: dict[int, int],
                     ffn: Optional[int]) -> MoEConfig:
    """Megatron-Core's MoE of Megatron-LM's args; `ffn`: the experts' hidden size found."""
    layers = tuple(sorted(experts))
    _placement(args, num_layers, layers)
    _refuse(args, [
        ("moe_router_score_function", lambda v: v in (None, "softmax"),
         "only a softmax router can be imported (--moe-router-score-function softmax)"),
        ("moe_shared_expert_intermediate_size", lambda v: not v, "shared experts"),
        ("moe_router_enable_expert_bias", lambda v: not v, "a router selection bias"),
        ("moe_router_num_groups", lambda v: not v, "group-limited routing"),
        ("moe_router_topk_scaling_factor", lambda v: v in (None, 1.0),
         "scaled top-k weights"),
        ("moe_router_load_balancing_type",
         lambda v: v in (None, "aux_loss", "none") or v == ["aux_loss"],
         "only the switch aux loss (aux_loss) or none"),
        ("moe_input_jitter_eps", lambda v: not v, "input jitter"),
    ])
    capacity = get(args, "moe_expert_capacity_factor")
    pre_softmax = bool(get(args, "moe_router_pre_softmax", False))
    balancing = get(args, "moe_router_load_balancing_type", "aux_loss")
    return MoEConfig(
        num_experts=args.num_experts, layers=layers, topk=get(args, "moe_router_topk", 2),
        capacity_factor=capacity or 1.0, eval_capacity_factor=capacity or 1.0, min_capacity=0,
        drop_tokens=capacity is not None,
        drop_policy=get(args, "moe_token_drop_policy", "probs") or "probs",
        gate_normalization="none" if pre_softmax else "topk",
        aux_loss_type="none" if balancing == "none" else "aux_loss",
        aux_loss_coeff=get(args, "moe_aux_loss_coeff", 0.0) or 0.0,
        z_loss_coeff=get(args, "moe_z_loss_coeff", 0.0) or 0.0,
        expert_ffn_hidden_size=ffn if ffn != args.ffn_hidden_size else None)


def notes(args, model: ModelConfig) -> list[str]:
    """What the import cannot make exact but does not refuse (printed by the tool)."""
    fused = get(args, "bias_gelu_fusion") or get(args, "bias_activation_fusion")
    if fused and not model.swiglu and model.add_bias_linear:
        return ["args.bias_gelu_fusion = True: Megatron's fused bias-GELU is the tanh "
                "approximation, ours the exact (erf) GELU; activations differ by up to ~1e-3"]
    return []


def params_dtype(args) -> torch.dtype:
    if get(args, "bf16"):
        return torch.bfloat16
    return torch.float16 if get(args, "fp16") else torch.float32


def run_state(args, iteration: int, scheduler: Optional[dict]) -> dict:
    """Iteration, consumed samples and the learning-rate schedule a resumed run continues from."""
    consumed = get(args, "consumed_train_samples")
    if consumed is None:
        consumed = iteration * (get(args, "global_batch_size") or 0)
    return {"iteration": int(iteration), "consumed_samples": int(consumed or 0),
            "scheduler": dict(scheduler) if scheduler else None}
