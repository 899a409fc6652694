"""Context parallelism (--context-parallel-size): every layout equals one process; the chunking,
the attention over gathered keys and values and the whole-sequence routing each checked against
an independent reference; a checkpoint moves between CP and no CP; bad combinations refused.

A layout is (TP, SP, CP, ETP, EP, DP[, PP]); the one-process run is the same model, data (a loss
mask with holes, so the token count each CP rank holds differs) and steps. Options cycle over the
layouts: drop / no-drop, recompute with communication-aware checkpointing, ZeRO-1, SwiGLU,
grouped-query and multi-latent attention, group-limited routing, a shared expert.
"""

from __future__ import annotations

import functools
import os
import re

import pytest
import torch

from harness import run, ted_groups
from util import assert_records_equal, build_for_layout, tiny_model_config, train_and_record

SEQ, MBS = 16, 2


def microbatch(index: int, vocab: int) -> dict:
    """Micro-batch `index` of a fixed token stream; the loss mask drops every token whose id is
    a multiple of 5 (about a fifth, unevenly over the sequence)."""
    gen = torch.Generator().manual_seed(1_000 + index)
    data = torch.randint(0, vocab, (MBS, SEQ + 1), generator=gen)
    tokens = data[:, :-1].contiguous()
    return {"tokens": tokens, "labels": data[:, 1:].contiguous(),
            "position_ids": torch.arange(SEQ).expand(MBS, SEQ).contiguous(),
            "loss_mask": (tokens % 5 != 0).float()}


def model_config(**kw):
    extra = {}
    if kw.get("gqa"):
        extra = dict(num_query_groups=2)
    if kw.get("mla"):
        extra = dict(multi_latent_attention=True, q_lora_rank=16, kv_lora_rank=8,
                     qk_head_dim=8, qk_pos_emb_head_dim=4, v_head_dim=8, qk_layernorm=True,
                     position_embedding_type="rope")
    if kw.get("rope") and not kw.get("mla"):
        extra["position_embedding_type"] = "rope"
    return tiny_model_config(num_layers=4, swiglu=kw.get("swiglu", False),
                             add_bias_linear=kw.get("bias", True), **extra)


def layout_case(tp: int, ep: int, etp, sp: bool, cp: int, pp: int = 1, steps: int = 2,
                micro: int = 4, **kw) -> dict:
    """`steps` optimizer steps of a 4-layer GPT-MoE (4 experts, top-2, MoE in layers 1 and 3):
    the losses, the first step's reduced gradients and the parameters after, in full."""
    from megatron.data.loader import context_part
    from ted_patches.config import MoEConfig

    groups = ted_groups(tp, ep, pp, etp, sp, cp)
    mcfg = model_config(**kw)
    moe = MoEConfig(num_experts=4, layers=(1, 3), topk=2, drop_tokens=kw.get("drop", True),
                    capacity_factor=1.0, min_capacity=2, aux_loss_coeff=0.1, z_loss_coeff=0.01,
                    dtd=kw.get("dtd", True), expert_ffn_hidden_size=32,
                    shared_expert_intermediate_size=kw.get("shared"),
                    router_num_groups=2 if kw.get("limited") else None,
                    router_group_topk=1 if kw.get("limited") else None,
                    aux_loss_type=kw.get("balance", "deepspeed"))
    zero1 = kw.get("zero1", False)
    model, opt, pipe = build_for_layout(mcfg, moe, groups, pp=pp, micro=micro, mbs=MBS, seq=SEQ,
                                        recompute=kw.get("recompute", False), zero1=zero1)
    dp, r = groups.dp.size, groups.dp.rank

    def batches(step: int) -> list[dict]:  # this DP rank's micro-batches, its CP chunks
        return [context_part(microbatch(step * micro + j * dp + r, mcfg.vocab_size), groups.cp)
                for j in range(micro // dp)]

    return train_and_record(model, opt, groups, pipe, steps, micro, MBS, SEQ, mcfg.vocab_size,
                            zero1, batches)


MODEL_KEYS = ("drop", "swiglu", "bias", "gqa", "mla", "rope", "shared", "limited", "balance")


@functools.cache
def one_process(micro: int, **model) -> dict:
    return layout_case(1, 1, None, False, 1, micro=micro, **model)


def check_equal(tp, ep, etp, sp, cp, dp, pp=1, **kw) -> None:
    kw.setdefault("micro", max(4, dp))
    ref = one_process(kw["micro"], **{k: v for k, v in kw.items() if k in MODEL_KEYS})
    ranks = run(tp * cp * dp * pp, layout_case, tp, ep, etp, sp, cp, pp, **kw)
    assert_records_equal(ranks, ref, kw.get("zero1", False))


OPTIONS = [  # cycled over the matrix: each layout kind meets several
    {"drop": True},
    {"drop": False, "recompute": True, "rope": True},
    {"drop": True, "zero1": True, "gqa": True},
    {"drop": False, "swiglu": True, "rope": True},
    {"drop": True, "recompute": True, "mla": True},
    {"drop": False, "limited": True, "shared": 32},
]


def full_matrix() -> list[tuple]:
    """Every (TP, SP, CP, ETP, EP, DP) of world 2, 4 and 8 with CP > 1 the tiny model allows
    (TP divides its 4 heads, ETP its expert FFN, EP its 4 experts)."""
    out = []
    for world in (2, 4, 8):
        for cp in (2, 4, 8):
            for tp in (1, 2, 4):
                if world % (cp * tp) or SEQ % (2 * cp):
                    continue
                for etp in sorted({tp, 1}):
                    for ep in (1, 2, 4):
                        if world % (etp * ep) or (etp == tp and (world // tp) % ep):
                            continue
                        for sp in ((False, True) if tp > 1 else (False,)):
                            if sp and (SEQ // cp) % tp:
                                continue
                            n = len(out)
                            while OPTIONS[n % len(OPTIONS)].get("gqa") and tp > 2:
                                n += 1  # two query groups do not split over TP 4
                            opts = OPTIONS[n % len(OPTIONS)]
                            out.append((tp, ep, etp, sp, cp, world // (tp * cp), opts))
    return out


def sampled() -> list[tuple]:
    """Every layout of world 2; of worlds 4 and 8 a fixed set that differs in kind (EP within or
    over the CP ranks, TP with and without SP, the experts' own grid, CP 4 and 8), the options
    cycled over the sample so each kind meets several. TED_FULL_MATRIX=1: the whole matrix."""
    if os.environ.get("TED_FULL_MATRIX"):
        return full_matrix()
    keep = {(1, 1, 1, False, 2, 2), (1, 4, 1, False, 2, 2), (2, 2, 2, False, 2, 1),
            (2, 4, 1, True, 2, 1), (2, 1, 2, True, 2, 1), (2, 2, 1, False, 2, 1),
            (1, 2, 1, False, 4, 1), (1, 4, 1, False, 4, 1),
            (1, 4, 1, False, 8, 1), (1, 4, 1, False, 4, 2), (2, 2, 1, True, 2, 2),
            (2, 4, 2, False, 2, 2)}
    chosen = [c[:6] for c in full_matrix() if c[0] * c[4] * c[5] == 2 or c[:6] in keep]
    out = []
    for c in chosen:
        n = len(out)
        while OPTIONS[n % len(OPTIONS)].get("gqa") and c[0] > 2:
            n += 1
        out.append((*c, OPTIONS[n % len(OPTIONS)]))
    return out


@pytest.mark.parametrize("tp,ep,etp,sp,cp,dp,opts", sampled(),
                         ids=lambda v: str(v) if not isinstance(v, dict) else
                         "-".join(k for k, x in v.items() if x))
def test_layout_equals_one_process(tp, ep, etp, sp, cp, dp, opts):
    check_equal(tp, ep, etp, sp, cp, dp, **opts)


@pytest.mark.parametrize("tp,ep,etp,sp,cp,dp,pp,kw", [
    (1, 2, 1, False, 2, 1, 2, {"drop": True, "rope": True}),  # stages pass [b, s/CP, h]
    (2, 2, 1, True, 2, 1, 2, {"drop": False, "recompute": True}),  # and [b, s/(CP TP), h]
])
def test_context_parallelism_with_a_pipeline_equals_one_process(tp, ep, etp, sp, cp, dp, pp, kw):
    check_equal(tp, ep, etp, sp, cp, dp, pp=pp, micro=4, **kw)


# ---- the pieces, against plain references -------------------------------------------------------
def pieces_case(cp_size: int) -> dict:
    """On a world of CP ranks: this rank's chunks of a sequence, their global positions, the
    whole sequence gathered back, and causal attention of this rank's queries over the gathered
    keys (values and gradients), for comparison with one process's."""
    from megatron.parallel.context import (causal_attention, gather_context, positions,
                                           split_sequence)

    groups = ted_groups(1, 1, 1, None, False, cp_size)
    cp = groups.cp
    gen = torch.Generator().manual_seed(0)
    b, heads, kv, s, d = 2, 4, 2, 16, 8
    q = torch.randn(b, heads, s, d, generator=gen)
    k, v = torch.randn(b, kv, s, d, generator=gen), torch.randn(b, kv, s, d, generator=gen)
    seq = torch.arange(s).expand(b, s)
    mine = split_sequence(seq, cp)
    qkv = [split_sequence(t, cp, dim=2).clone().requires_grad_(True) for t in (q, k, v)]
    out = causal_attention(*qkv, cp, enable_gqa=True)
    out.backward(split_sequence(torch.ones_like(q).cumsum(2).sin(), cp, dim=2))
    return {"mine": mine, "positions": positions(s // cp.size, cp),
            "whole": gather_context(mine.unsqueeze(-1).float(), cp, replicated=True)[..., 0],
            "out": out.detach(), "grads": [t.grad for t in qkv]}


def test_chunks_positions_gather_and_attention_against_one_process():
    ref = pieces_case(1)
    for cp in (2, 4):
        ranks = run(cp, pieces_case, cp)
        c = 16 // (2 * cp)
        for r, got in enumerate(ranks):
            chunks = [r, 2 * cp - 1 - r]  # Megatron's load balance
            want = torch.cat([torch.arange(i * c, (i + 1) * c) for i in chunks])
            assert torch.equal(got["mine"][0], want) and torch.equal(got["positions"], want)
            assert torch.equal(got["whole"], torch.arange(16.0).expand(2, 16))
            assert torch.allclose(got["out"], ref["out"][:, :, want], atol=1e-6)
        # each key's / value's gradient comes from every rank's queries: summed to its owner
        for i in range(3):
            full = torch.zeros_like(ref["grads"][i])
            for r, got in enumerate(ranks):
                chunks = [r, 2 * cp - 1 - r]
                want = torch.cat([torch.arange(j * c, (j + 1) * c) for j in chunks])
                full[:, :, want] = got["grads"][i]
            assert torch.allclose(full, ref["grads"][i], atol=1e-5), (cp, i)


# ---- through the command line, with checkpoints --------------------------------------------------
def cli(world: int, layout: str, iters: int, *extra) -> dict:
    from test_training import MODEL, pretrain_case

    argv = (MODEL + "--num-experts 4 --moe-router-topk 2 --expert-interval 2 "
            "--moe-ffn-hidden-size 32 --micro-batch-size 2 --global-batch-size 8 "
            "--eval-interval 4 --position-embedding-type rope".split()
            + ["--train-iters", str(iters)] + layout.split() + list(extra))
    return run(world, pretrain_case, argv)[0]


CP2 = "--context-parallel-size 2 --tensor-model-parallel-size 2 --sequence-parallel " \
      "--expert-model-parallel-size 2 --use-distributed-optimizer"  # ZeRO-1 over DP x CP


def test_a_checkpoint_moves_between_context_parallel_layouts_and_goes_on_equal(tmp_path):
    """4 iterations at (TP 2, SP, CP 2, EP 2, ZeRO-1) == 2 + save + load + 2 at the same layout,
    bit for bit; loaded at one process and at (CP 2, EP 2, DP 2) it continues with the same
    losses within fp32 rounding (validation included)."""
    from test_training import logged

    first = cli(4, CP2, 4)
    straight = logged(first["printed"], "lm loss")
    cli(4, CP2, 4, "--save", str(tmp_path), "--exit-interval", "2")
    same = logged(cli(4, CP2, 4, "--load", str(tmp_path))["printed"], "lm loss")
    assert same == straight[2:]
    for world, layout in ((1, ""), (4, "--context-parallel-size 2 "
                                       "--expert-model-parallel-size 2")):
        other = cli(world, layout, 4, "--load", str(tmp_path))
        losses = logged(other["printed"], "lm loss")
        assert len(losses) == 2
        for a, b in zip(losses, straight[2:]):
            assert abs(a - b) <= 1e-5 * abs(b), (layout, losses, straight)
        valid, want = validation(other["printed"]), validation(first["printed"])
        assert valid and abs(valid[-1] - want[-1]) <= 1e-5 * abs(want[-1]), (valid, want)


def validation(printed: str) -> list[float]:
    return [float(v) for v in re.findall(r"validation loss at iteration \d+ \| lm loss value: "
                                         r"([-+0-9.E]+)", printed)]


BASE = ("--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
        "--micro-batch-size 2 --global-batch-size 8 --train-iters 10 --lr 1e-3 --mock-data "
        "--vocab-size 100 --num-experts 4 --moe-router-topk 2").split()


@pytest.mark.parametrize("world,flags,message", [
    (4, "--context-parallel-size 4 --seq-length 12",
     "--context-parallel-size 4 cuts --seq-length 12 into 2 x 4 chunks: use a multiple of 8"),
    (8, "--context-parallel-size 2 --tensor-model-parallel-size 4 --sequence-parallel "
        "--seq-length 20",
     "--sequence-parallel splits --seq-length 20 / --context-parallel-size 2 over "
     "--tensor-model-parallel-size 4: use a multiple of 8"),
    (6, "--context-parallel-size 4",
     "world size 6 is not divisible by --context-parallel-size 4; use one of [1, 2, 3, 6]"),
    (4, "--context-parallel-size 2 --tensor-model-parallel-size 4",
     "world size 4 is not divisible by --tensor-model-parallel-size 4 x --context-parallel-size "
     "2; use one of [1, 2]"),
    (4, "--context-parallel-size 2 --expert-model-parallel-size 8",
     "is not divisible by --expert-model-parallel-size 8"),
    (4, "--context-parallel-size 2 --no-moe-pad-free",
     "--context-parallel-size 2: each rank sends its own tokens to the experts padding-free; "
     "drop --no-moe-pad-free"),
    (8, "--context-parallel-size 2 --tensor-model-parallel-size 2 --expert-model-parallel-size 4",
     None),
])
def test_bad_context_parallel_layouts_name_the_flags_and_the_choices(world, flags, message):
    from megatron.cli.arguments import ConfigError, parse_args
    from megatron.cli.configs import build_config

    argv = BASE + flags.split()
    if message is None:  # EP 4 over the CP x DP ranks of each TP rank
        topo = build_config(parse_args(argv), world, 100).topology
        assert (topo.tp, topo.cp, topo.dp, topo.ep, topo.edp) == (2, 2, 2, 4, 1)
        return
    with pytest.raises(ConfigError) as err:
        build_config(parse_args(argv), world, 100)
    assert message in str(err.value), str(err.value)
