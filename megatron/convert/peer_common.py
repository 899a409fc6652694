"""What the peers' formats share: Megatron's module names (the legacy GPTModel that Megatron-LM's
torch format and Megatron-DeepSpeed store), merging tensor-parallel shards, the stored tensors a
model of our configs must have, and the result of an import.

Megatron's TP shards (per mp_rank file) are merged by the module's split: column-parallel weights
and biases on dim 0 (a SwiGLU fc1 shard is [gate_r; up_r]: halves per shard), row-parallel
weights on dim 1, the rest replicated (rank 0's copy). Experts are stored per global id.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Optional

import torch

from megatron.convert.common import ConversionError, query_groups
from megatron.model.config import ModelConfig
from ted_patches.config import MoEConfig

# how one tensor is split over TP: "col" (dim 0), "col2" (dim 0 of [gate; up] halves), "row"
# (dim 1), "rep" (replicated)
COLUMN, SWIGLU_COLUMN, ROW, REPLICATED = "col", "col2", "row", "rep"


@dataclass
class Imported:
    """A peer checkpoint read into our terms."""

    model: ModelConfig
    moe: Optional[MoEConfig]
    tensors: dict[str, torch.Tensor]  # our stored tensors (fp32 or the source's dtype)
    run: dict  # iteration, consumed_samples, scheduler (None when absent)
    tokenizer: dict  # build_tokenizer kwargs
    carried: dict = field(default_factory=dict)  # weights / optimizer / schedule / RNG -> note
    source_tp: int = 1
    source_pp: int = 1
    source_ep: int = 1
    notes: list = field(default_factory=list)  # inexact but accepted (printed as warnings)
    # Adam's moments as stored tensors ({"exp_avg": {name: t}, "exp_avg_sq": ...}; empty: none),
    # the step they were taken at and the loss scaler's state (peer_optim.py)
    moments: dict = field(default_factory=dict)
    optimizer_step: int = 0
    loss_scaler: Optional[dict] = None


def flatten(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """Megatron-LM's legacy `state_dict_for_save_checkpoint` nests dicts (language_model ->
    embedding -> word_embeddings -> weight); DeepSpeed stores flat names. Both -> flat names;
    non-tensor entries (`_extra_state`) are left out."""
    out = {}
    for key, value in state.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, name + "."))
        elif isinstance(value, torch.Tensor):
            out[name] = value
    return out


def merge(shards: list[torch.Tensor], split: str, swiglu: bool = False):
    """The full tensor of one parameter's TP shards; for a SwiGLU column weight, (gate, up)."""
    if split == REPLICATED or len(shards) == 1 and split != SWIGLU_COLUMN:
        return shards[0]
    if split == ROW:
        return torch.cat(shards, dim=1)
    if split == SWIGLU_COLUMN:
        halves = [s.chunk(2, dim=0) for s in shards]
        return torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])
    return torch.cat(shards, dim=0)


def merge_all(per_rank: list[dict], split_of) -> dict:
    """{name: full tensor} of the TP ranks' flat state dicts. `split_of(name)` says how a name is
    split; every rank must hold the same names."""
    names = list(per_rank[0])
    for tp, sd in enumerate(per_rank[1:], 1):
        if set(sd) != set(names):
            odd = sorted(set(sd) ^ set(names))[:3]
            raise ConversionError(f"TP rank {tp} holds other tensors than rank 0 ({odd}): the "
                                  "shards are not of one model")
    return {name: merge([sd[name] for sd in per_rank], split_of(name)) for name in names}


def tracked_folder(src: str, tracker: str, missing: str) -> str:
    """The iteration folder (iter_N or release) Megatron-LM's tracker file in `src` names;
    FileNotFoundError(`missing`) without one."""
    path = os.path.join(src, tracker)
    if not os.path.isfile(path):
        raise FileNotFoundError(missing)
    with open(path) as f:
        text = f.read().strip()
    if text != "release" and not text.isdigit():
        raise ConversionError(f"{path} holds {text[:40]!r}, not an iteration")
    return os.path.join(src, "release" if text == "release" else f"iter_{int(text):07d}")


# ---- Megatron's legacy GPT names (language_model.*), as Megatron-LM and Megatron-DS store them --
_ALIASES = [(re.compile(r"^language_model\."), ""), (re.compile(r"^transformer\."), "encoder."),
            (re.compile(r"\.attention\."), ".self_attention.")]
_LAYER_MODULES = {
    "input_layernorm": ("input_norm", REPLICATED),
    "post_attention_layernorm": ("post_attention_norm", REPLICATED),
    "self_attention.query_key_value": ("attention.qkv", COLUMN),
    "self_attention.dense": ("attention.proj", ROW),
    "mlp.dense_h_to_4h": ("mlp.fc1", COLUMN),
    "mlp.dense_4h_to_h": ("mlp.fc2", ROW),
    "mlp.mlp.dense_h_to_4h": ("mlp.dense.fc1", COLUMN),  # residual MoE's dense MLP
    "mlp.mlp.dense_4h_to_h": ("mlp.dense.fc2", ROW),
    "mlp.coefficient": ("mlp.mix", REPLICATED),
    "mlp.deepspeed_moe.gate.wg": ("mlp.router", REPLICATED),
}
_ENDS = {"embedding.word_embeddings.weight": ("embedding.weight", COLUMN),
         "embedding.position_embeddings.weight": ("position_embedding.weight", REPLICATED),
         "encoder.final_layernorm.weight": ("final_norm.weight", REPLICATED),
         "encoder.final_layernorm.bias": ("final_norm.bias", REPLICATED),
         "output_layer.weight": ("output.weight", COLUMN)}


@dataclass(frozen=True)
class Names:
    """One family of Megatron's GPT state-dict names (canonical: global layer numbers, experts
    by global id): how each is split over TP and which of our stored tensors it is."""

    ends: dict  # name outside the layers -> (our name, split)
    modules: dict  # module within a layer -> (our module, split)
    layer: re.Pattern  # groups: layer, module, weight | bias
    expert: re.Pattern  # on the module: groups expert id, linear
    fc1: str  # the first linear's name (column-parallel; SwiGLU's [gate; up])
    unknown: str  # what a name it does not know is not (messages)
    skip: frozenset = frozenset()  # names with nothing to store

    def split(self, name: str, swiglu: bool, expert_tp: bool = True) -> str:
        """How a (canonical) name is split over TP."""
        if name in self.ends:
            return self.ends[name][1]
        m = self.layer.match(name)
        if not m:
            return REPLICATED
        module, param = m.group(2), m.group(3)
        e = self.expert.match(module)
        if e:
            if not expert_tp:
                return REPLICATED
            kind = COLUMN if e.group(2) == self.fc1 else ROW
        else:
            kind = self.modules.get(module, (None, REPLICATED))[1]
        if kind == ROW and param == "bias":
            return REPLICATED  # added after the reduction
        if kind == COLUMN and swiglu and module.endswith(self.fc1):
            return SWIGLU_COLUMN
        return kind

    def to_stored(self, full: dict, model: ModelConfig, layer_offset: int = 0) -> dict:
        """Our stored tensors of merged names (TP merged; SwiGLU fc1 as (gate, up) pairs).
        Raises ConversionError naming a tensor it does not know."""
        out, vocab = {}, model.vocab_size
        for name, t in full.items():
            if name in self.skip:
                continue
            if name in self.ends:
                ours = self.ends[name][0]
                out[ours] = t[:vocab] if ours in ("embedding.weight", "output.weight") else t
                continue
            m = self.layer.match(name)
            if not m:
                raise ConversionError(f"unknown tensor {name!r} ({self.unknown})")
            prefix = f"layers.{int(m.group(1)) + layer_offset}."
            module, param = m.group(2), m.group(3)
            e = self.expert.match(module)
            if e:
                ours = ("w" if param == "weight" else "b") + ("1" if e.group(2) == self.fc1
                                                              else "2")
                flip = (lambda x: x.t().contiguous()) if param == "weight" else (lambda x: x)
                _put(out, f"{prefix}mlp.experts.{e.group(1)}.{ours}",
                     tuple(map(flip, t)) if isinstance(t, tuple) else flip(t))
            elif module in self.modules:
                _put(out, f"{prefix}{self.modules[module][0]}.{param}", t)
            else:
                raise ConversionError(f"unknown tensor {name!r} (module {module!r})")
        return out


LEGACY = Names(_ENDS, _LAYER_MODULES,
               re.compile(r"^encoder\.layers\.(\d+)\.(.+)\.(weight|bias)$"),
               re.compile(r"^mlp\.deepspeed_moe\.experts\.deepspeed_experts\.(\d+)\."
                          r"(dense_h_to_4h|dense_4h_to_h)$"),
               "dense_h_to_4h", "not a GPT module Megatron writes",
               frozenset({"word_embeddings_for_head.weight"}))  # the last stage's tied copy


def canonical(name: str) -> str:
    for pattern, replacement in _ALIASES:
        name = pattern.sub(replacement, name)
    return name


def legacy_split(name: str, swiglu: bool, expert_tp: bool) -> str:
    """How a (canonical) legacy name is split over TP."""
    return LEGACY.split(name, swiglu, expert_tp)


def legacy_to_stored(full: dict, model: ModelConfig, layer_offset: int = 0) -> dict:
    """Our stored tensors of merged legacy names (canonical, TP merged; SwiGLU fc1 as pairs)."""
    return LEGACY.to_stored(full, model, layer_offset)


def _put(out: dict, name: str, t) -> None:
    if isinstance(t, tuple):  # SwiGLU's (gate, up)
        out[name + ".gate"], out[name + ".up"] = t
    else:
        out[name] = t


# ---- the stored tensors a model of these configs has ------------------------------------------
def expected_shapes(model: ModelConfig, moe: Optional[MoEConfig]) -> dict[str, tuple]:
    h, v, f = model.hidden_size, model.vocab_size, model.ffn_hidden_size
    bias, layer_norm = model.add_bias_linear, model.normalization == "LayerNorm"
    halves = (".gate", ".up") if model.swiglu else ("",)
    out = {"embedding.weight": (v, h), "final_norm.weight": (h,)}
    if layer_norm:
        out["final_norm.bias"] = (h,)
    if model.position_embedding_type == "learned_absolute":
        out["position_embedding.weight"] = (model.max_position_embeddings, h)
    if model.untie_embeddings_and_output_weights:
        out["output.weight"] = (v, h)

    def linear(name, rows, cols, fc1=False):
        for s in halves if fc1 else ("",):
            out[f"{name}.weight{s}"] = (rows, cols)
            if bias:
                out[f"{name}.bias{s}"] = (rows,)

    qkv = (model.num_attention_heads + 2 * query_groups(model)) * model.head_dim
    for i in range(model.num_layers):
        p = f"layers.{i}."
        for norm in ("input_norm", "post_attention_norm"):
            out[p + norm + ".weight"] = (h,)
            if layer_norm:
                out[p + norm + ".bias"] = (h,)
        linear(p + "attention.qkv", qkv, h)
        linear(p + "attention.proj", h, h)
        if moe is None or i not in moe.layers:
            linear(p + "mlp.fc1", f, h, fc1=True)
            linear(p + "mlp.fc2", h, f)
            continue
        fe, experts = moe.expert_ffn_hidden_size or f, moe.experts_in(i)
        out[p + "mlp.router.weight"] = (experts, h)
        for e in range(experts):
            x = f"{p}mlp.experts.{e}."
            for s in halves:
                out[x + "w1" + s] = (h, fe)
                if bias:
                    out[x + "b1" + s] = (fe,)
            out[x + "w2"] = (fe, h)
            if bias:
                out[x + "b2"] = (h,)
        if moe.mlp_type == "residual":
            linear(p + "mlp.dense.fc1", f, h, fc1=True)
            linear(p + "mlp.dense.fc2", h, f)
            out[p + "mlp.mix.weight"], out[p + "mlp.mix.bias"] = (2, h), (2,)
    return out


def check_tensors(tensors: dict, model: ModelConfig, moe: Optional[MoEConfig], where: str) -> None:
    """Every stored tensor the configs imply, with its shape, and nothing else."""
    want = expected_shapes(model, moe)
    missing, unexpected = sorted(want.keys() - tensors.keys()), sorted(tensors.keys() - want)
    if missing or unexpected:
        raise ConversionError(f"{where}: the tensors do not match the model its args describe: "
                              f"missing {_few(missing)}, unexpected {_few(unexpected)}")
    for name, shape in want.items():
        if tuple(tensors[name].shape) != shape:
            raise ConversionError(f"{where}: {name} has shape {tuple(tensors[name].shape)}, the "
                                  f"args imply {shape} (an incompatible model)")


def _few(names: list[str], n: int = 3) -> str:
    if not names:
        return "none"
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")


def vocab_of(args, tokenizer_kw: dict, padded: int) -> tuple[int, dict]:
    """The real vocabulary size (the tokenizer's) and its build_tokenizer kwargs."""
    from megatron.data.tokenizer import build_tokenizer

    try:
        tokenizer = build_tokenizer(**tokenizer_kw)
    except (ValueError, OSError) as e:
        raise ConversionError(f"the checkpoint's tokenizer cannot be built ({e}); give its files "
                              "(--tokenizer-type, --vocab-file / --merge-file, --tokenizer-model) "
                              "or --vocab-size") from None
    if tokenizer.vocab_size > padded:
        raise ConversionError(f"the tokenizer has {tokenizer.vocab_size} ids but the checkpoint's "
                              f"embedding only {padded} rows: give the run's own tokenizer")
    return tokenizer.vocab_size, tokenizer_kw


def tokenizer_kwargs(args, overrides: dict) -> dict:
    """build_tokenizer kwargs from the run's args, the tool's flags winning."""
    kw = {"tokenizer_type": getattr(args, "tokenizer_type", None),
          "tokenizer_model": getattr(args, "tokenizer_model", None),
          "vocab_file": getattr(args, "vocab_file", None),
          "merge_file": getattr(args, "merge_file", None),
          "vocab_size": getattr(args, "vocab_size", None)}
    kw.update({k: v for k, v in overrides.items() if v is not None})
    if overrides.get("vocab_size") is not None and not overrides.get("tokenizer_type"):
        kw["tokenizer_type"] = "NullTokenizer"
    if kw["tokenizer_type"] is None:
        raise ConversionError("the checkpoint's args name no tokenizer: give --tokenizer-type "
                              "(or --vocab-size for NullTokenizer)")
    return kw
