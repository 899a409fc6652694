"""Upcycling (Megatron-Core's --moe-use-upcycling at granularity 1; Komatsuzaki et al., "Sparse
Upcycling", and Megatron-Core's arXiv 2410.07524): an MoE run's first start from a DENSE
checkpoint in --load. Every expert of an MoE layer starts as a copy of that layer's dense MLP;
every other parameter is the dense model's; the router (and any gate state) is drawn from --seed
as in a fresh model. With the top-k gate weights summing to 1 and no token dropped, each MoE
layer then computes sum_k w_k MLP(x) = MLP(x): step 0's logits are the dense model's.

Each rank reads the dense checkpoint in full (one process's read, megatron.checkpoint.files) and
copies its own parts into the model before the optimizer is built; no collective runs. The run
then trains from iteration 0 and its first save is an ordinary MoE checkpoint: later runs resume
from --save without the flag (Megatron-LM's rule: --save must not yet hold a checkpoint).
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron.checkpoint.files import (
    check_compatible,
    find_checkpoint,
    read_checkpoint_meta,
    read_stored_tensors,
)
from megatron.checkpoint.storage import CheckpointError
from megatron.model.config import ModelConfig
from megatron.model.params import checkpoint_pieces, model_state
from megatron.parallel.topology import TEDGroups
from ted_patches.config import MoEConfig

# the dense MLP's stored names -> one expert's (our expert weights are [in, out], transposed)
_FC1 = ("fc1.weight", "fc1.weight.gate", "fc1.weight.up")


def check_upcycling(model: ModelConfig, moe: Optional[MoEConfig], load: Optional[str],
                    save: Optional[str]) -> str:
    """Every rank, before any collective: the dense checkpoint folder to upcycle from, or a
    CheckpointError naming the flag to change."""
    if moe is None:
        raise CheckpointError("--moe-use-upcycling needs an MoE model (--num-experts)")
    if not load:
        raise CheckpointError("--moe-use-upcycling needs --load DIR: the dense checkpoint to "
                              "upcycle")
    if save and find_checkpoint(save) is not None:
        raise CheckpointError(f"--moe-use-upcycling: --save {save} already holds a checkpoint; "
                              "upcycling is for the first run only: drop --moe-use-upcycling to "
                              "resume it")
    found = find_checkpoint(load)
    if found is None:
        raise CheckpointError(f"--moe-use-upcycling: no checkpoint in --load {load}")
    meta = read_checkpoint_meta(found)
    if meta.get("moe") is not None:
        raise CheckpointError(f"--moe-use-upcycling: --load {load} holds an MoE model; upcycle "
                              "from a dense one (or drop --moe-use-upcycling to resume it)")
    check_compatible(meta, model, None, f"--load {load}")
    blockers = [
        (moe.expert_ffn_hidden_size in (None, model.ffn_hidden_size),
         f"--moe-ffn-hidden-size {moe.expert_ffn_hidden_size} != --ffn-hidden-size "
         f"{model.ffn_hidden_size}: each expert is a copy of the dense MLP (granularity 1)"),
        (moe.shared_expert_intermediate_size is None,
         "--moe-shared-expert-intermediate-size: the dense checkpoint holds no shared expert"),
        (moe.mlp_type == "standard", "--mlp-type residual: only standard MoE layers upcycle"),
        (moe.gate_normalization != "none" or moe.topk == 1,
         f"--moe-gate-normalization none with top-{moe.topk}: the gate weights do not sum to 1, "
         "so the upcycled model would not start as the dense one"),
    ]
    for ok, message in blockers:
        if not ok:
            raise CheckpointError(f"--moe-use-upcycling: {message}")
    return found


def upcycled_tensors(dense: dict[str, torch.Tensor], moe: MoEConfig) -> dict[str, torch.Tensor]:
    """The dense model's stored tensors with each MoE layer's MLP copied into its experts."""
    out = {}
    for key, t in dense.items():
        parts = key.split(".")
        if parts[0] != "layers" or int(parts[1]) not in moe.layers or parts[2] != "mlp":
            out[key] = t
            continue
        prefix, rest = ".".join(parts[:3]) + ".", ".".join(parts[3:])
        for e in range(moe.experts_in(int(parts[1]))):
            out[f"{prefix}experts.{e}.{_expert_name(rest)}"] = (
                t.t().contiguous() if rest.startswith(("fc1.weight", "fc2.weight")) else t)
    return out


def _expert_name(dense_name: str) -> str:
    """fc1.weight[.gate|.up] -> w1[...], fc2.weight -> w2, fc1.bias[...] -> b1[...], fc2.bias
    -> b2."""
    layer, kind, *half = dense_name.split(".")
    name = ("w" if kind == "weight" else "b") + layer[-1]
    return ".".join([name, *half])


@torch.no_grad()
def upcycle(model: torch.nn.Module, moe: MoEConfig, found: str, groups: TEDGroups) -> int:
    """Copy this rank's parts of the upcycled dense checkpoint `found` into `model`; parameters
    the dense model lacks (the routers, replicated) keep their values drawn from the seed.
    Returns how many were kept so."""
    tensors = upcycled_tensors(read_stored_tensors(found), moe)
    kept = 0
    for name, p, spec in model_state(model):
        for piece in checkpoint_pieces(name, p.shape, spec, groups):
            if piece.key not in tensors:
                if ".mlp." not in piece.key or tuple(p.shape) != piece.global_shape:
                    raise CheckpointError(f"--moe-use-upcycling: the dense checkpoint {found} "
                                          f"has no {piece.key!r}")
                kept += 1
                continue
            full = tensors[piece.key]
            if tuple(full.shape) != piece.global_shape:
                raise CheckpointError(f"--moe-use-upcycling: {piece.key} has shape "
                                      f"{tuple(full.shape)} in {found}, the model "
                                      f"{piece.global_shape}")
            piece.local_view(p).copy_(full[piece.global_index()])
    return kept
