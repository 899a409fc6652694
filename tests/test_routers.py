"""The router variants of issue 20 (ted_patches/gates): sigmoid scores, pre-softmax, the top-k
scaling factor, fp64 routing, aux-loss-free expert bias, Megatron-Core's load-balancing types
(aux_loss, seq_aux_loss, sinkhorn, none) and group-limited routing.

Each is checked against an independent reference: hand-worked tables for small cases, and
Megatron-Core 0.16.1's own router functions (megatron/core/transformer/moe/moe_utils.py) on
random inputs; then a GPT-MoE with each variant trained for several steps at TP x EP x DP layouts
of worlds 2 and 4 equals one process (losses, gradients, parameters, and the expert bias), and a
run resumed from a checkpoint equals an uninterrupted one, bias included."""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch
from megatron.core.transformer.moe import moe_utils as mcore

from harness import run, ted_groups
from megatron.parallel.fields import FieldError
from ted_patches.config import MoEConfig
from ted_patches.router import Router
from util import FULL_MATRIX, assert_close_dicts, full_tensors, my_microbatches, tiny_model_config

T, H, E = 48, 16, 8


def router(**kw) -> Router:
    """A router with a fixed random weight, no dropping (Megatron-Core's dropless routing)."""
    cfg = MoEConfig(**{**dict(num_experts=E, layers=(0,), topk=2, drop_tokens=False,
                              aux_loss_coeff=0.01), **kw})
    r = Router(H, cfg, ted_groups(1, 1), std=0.5)
    with torch.no_grad():
        r.weight.copy_(torch.randn(cfg.num_experts, H, generator=torch.Generator().manual_seed(3)))
    return r


def inputs(seed: int = 0, t: int = T) -> torch.Tensor:
    return torch.randn(t, H, generator=torch.Generator().manual_seed(seed))


def dense(routing, e: int = E) -> tuple[torch.Tensor, torch.Tensor]:
    """Our Routing as Megatron-Core's (probs [T, E], routing_map [T, E])."""
    t = routing.num_tokens
    token_A = torch.arange(routing.expert_A.numel()) % t
    probs = torch.zeros(t, e, dtype=torch.float64)
    probs[token_A, routing.expert_A] = routing.weight_A.double()
    chosen = torch.zeros(t, e, dtype=torch.bool)
    chosen[token_A, routing.expert_A] = True
    return probs, chosen


def logits_of(r: Router, x: torch.Tensor) -> torch.Tensor:
    return x.to(r.dtype) @ r.weight.detach().to(r.dtype).t()


# ---- hand-worked tables -------------------------------------------------------------------------
def gate_with_logits(logits: list[list[float]], **kw):
    """A router whose logits are exactly `logits` (identity weight on one-hot-free inputs)."""
    lg = torch.tensor(logits)
    cfg = MoEConfig(**{**dict(num_experts=lg.shape[1], layers=(0,), drop_tokens=False,
                              aux_loss_coeff=0.0), **kw})
    r = Router(lg.shape[1], cfg, ted_groups(1, 1), std=0.1)
    with torch.no_grad():
        r.weight.copy_(torch.eye(lg.shape[1]))
    return r, lg


def test_group_limited_selection_hand_table():
    """4 experts in 2 groups {0,1} {2,3}, top-2 from 1 group: a group scores the sum of its best
    topk / group_topk = 2 experts. Token 0: group {2,3} (0.8 + 0.85) beats {0,1} (0.9 + 0.1) though
    expert 0 is the best one; token 1: {2,3} (0.6 + 0.2) beats {0,1} (0.0 + 0.5)."""
    r, x = gate_with_logits([[0.9, 0.1, 0.8, 0.85], [0.0, 0.5, 0.6, 0.2]], topk=2,
                            router_num_groups=2, router_group_topk=1, gate_normalization="none")
    got = r(x, pad_free=True)
    assert got.expert_A.view(2, 2).t().tolist() == [[3, 2], [2, 3]]
    torch.testing.assert_close(got.weight_A.view(2, 2).t(),
                               torch.softmax(x, -1).gather(1, torch.tensor([[3, 2], [2, 3]])))
    # unlimited: each token takes experts from both groups
    r2, _ = gate_with_logits(x.tolist(), topk=2, gate_normalization="none")
    assert r2(x, pad_free=True).expert_A.view(2, 2).t().tolist() == [[0, 3], [2, 1]]


def test_sigmoid_bias_selects_but_does_not_weigh_hand_table():
    """Sigmoid scores; a bias of +1 on expert 3 makes it chosen by both tokens, while the weights
    are the unbiased sigmoid scores, normalized over the 2 chosen (+1e-20) and scaled by 2.5."""
    r, x = gate_with_logits([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 1.0, -2.0]], topk=2,
                            score_function="sigmoid", enable_expert_bias=True,
                            gate_normalization="topk", topk_scaling_factor=2.5)
    with torch.no_grad():
        r.gate.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 1.0]))
    got = r(x, pad_free=True)
    assert got.expert_A.view(2, 2).t().tolist() == [[3, 0], [3, 1]]  # best (biased) first
    s = torch.sigmoid(x)
    want = torch.stack([s[0, [3, 0]] / s[0, [3, 0]].sum(), s[1, [3, 1]] / s[1, [3, 1]].sum()])
    torch.testing.assert_close(got.weight_A.view(2, 2).t(), 2.5 * want)
    # top-1 keeps the raw sigmoid score (Megatron-Core), and 'none' keeps raw scores for any k
    r1, _ = gate_with_logits(x.tolist(), topk=1, score_function="sigmoid",
                             gate_normalization="topk")
    torch.testing.assert_close(r1(x, pad_free=True).weight_A, torch.sigmoid(torch.tensor([2., 3.])))


def test_expert_bias_update_hand_table():
    """Loads [5, 1, 3, 3] (mean 3): the overloaded expert's bias goes down by the rate, the
    underloaded one's up, the balanced ones stay; a skipped step changes nothing; fp32 after
    the model is cast to bf16."""
    r, _ = gate_with_logits([[0.0] * 4], topk=1, score_function="sigmoid",
                            enable_expert_bias=True, bias_update_rate=0.25)
    r.after_step(torch.tensor([5, 1, 3, 3]), skipped=False)
    assert r.gate.expert_bias.tolist() == [-0.25, 0.25, 0.0, 0.0]
    r.after_step(torch.tensor([9, 0, 0, 0]), skipped=True)
    assert r.gate.expert_bias.tolist() == [-0.25, 0.25, 0.0, 0.0]
    r.to(torch.bfloat16)
    assert r.gate.expert_bias.dtype == torch.float32 and r.weight.dtype == torch.bfloat16


def test_seq_aux_loss_hand_table():
    """2 sequences of 2 tokens, top-1, 2 experts. Sequence 0 sends both tokens to expert 0
    (probs .8/.2 and .6/.4): E * (0.7 * 1 + 0.3 * 0) = 1.4; sequence 1 splits (probs .9/.1 to
    expert 0, .3/.7 to expert 1): 2 * (0.6 * .5 + 0.4 * .5) = 1.0. Mean 1.2; the micro-batch
    loss would be 2 * (0.65 * .75 + 0.35 * .25) = 1.15."""
    p = torch.tensor([[.8, .2], [.6, .4], [.9, .1], [.3, .7]])
    r, x = gate_with_logits(p.log().tolist(), topk=1, aux_loss_type="seq_aux_loss",
                            pre_softmax=True)
    assert abs(r(x, pad_free=True, num_sequences=2).aux_loss.item() - 1.2) < 1e-6
    r2, _ = gate_with_logits(p.log().tolist(), topk=1, aux_loss_type="aux_loss", pre_softmax=True)
    assert abs(r2(x, pad_free=True).aux_loss.item() - 1.15) < 1e-6


# ---- Megatron-Core's router functions on random inputs ------------------------------------------
MCORE_CASES = {
    "sigmoid": dict(score_function="sigmoid", topk=4, gate_normalization="topk"),
    "sigmoid bias groups scaled": dict(score_function="sigmoid", topk=4, enable_expert_bias=True,
                                       router_num_groups=4, router_group_topk=2,
                                       gate_normalization="topk", topk_scaling_factor=2.5),
    "sigmoid groups fp64": dict(score_function="sigmoid", topk=3, router_num_groups=2,
                                router_group_topk=1, gate_normalization="topk",
                                router_dtype="fp64"),
    "softmax groups": dict(topk=4, router_num_groups=4, router_group_topk=2,
                           gate_normalization="topk"),
    "softmax pre-softmax groups scaled": dict(topk=3, router_num_groups=4, router_group_topk=3,
                                              pre_softmax=True, topk_scaling_factor=1.5),
    "softmax top-1 pre-softmax": dict(topk=1, pre_softmax=True),
}


@pytest.mark.parametrize("case", MCORE_CASES)
def test_selection_and_weights_equal_megatron_core(case):
    kw = MCORE_CASES[case]
    r = router(**kw)
    if r.cfg.enable_expert_bias:
        with torch.no_grad():
            r.gate.expert_bias.copy_(torch.linspace(-0.3, 0.3, E))
    for seed in range(3):
        x = inputs(seed)
        got_probs, got_map = dense(r(x, pad_free=True))
        want_probs, want_map = mcore.topk_routing_with_score_function(
            logits_of(r, x), r.cfg.topk, use_pre_softmax=r.cfg.pre_softmax,
            num_groups=r.cfg.router_num_groups, group_topk=r.cfg.router_group_topk,
            scaling_factor=r.cfg.topk_scaling_factor, score_function=r.cfg.score_function,
            expert_bias=r.gate.expert_bias if r.cfg.enable_expert_bias else None)
        assert torch.equal(got_map, want_map), f"{case}: different experts chosen"
        torch.testing.assert_close(got_probs, want_probs.double(), atol=1e-6, rtol=1e-6)
        if r.cfg.router_num_groups:  # and group-limited really limits: at most g groups per token
            groups_used = got_map.view(T, r.cfg.router_num_groups, -1).any(-1).sum(-1)
            assert int(groups_used.max()) <= r.cfg.router_group_topk


def mcore_aux_loss(logits: torch.Tensor, topk: int, score_function: str,
                   num_sequences: int | None) -> float:
    """Megatron-Core's aux_loss / seq_aux_loss (TopKRouter._apply_aux_loss / _apply_seq_aux_loss on
    one rank, coefficient 1): its own scores and plain top-k map for the loss, its own reshape of
    [S, B] tokens to per-sequence experts. Our tokens are [B, S]: transposed first."""
    routing_map, scores = mcore.compute_routing_scores_for_aux_loss(logits, topk, score_function)
    num_experts = logits.shape[1]
    if num_sequences is None:
        return mcore.switch_load_balancing_loss_func(
            scores, routing_map.sum(0), logits.shape[0], topk, num_experts, 1.0).item()
    b = num_sequences
    sb = lambda t: t.view(b, -1, t.shape[1]).transpose(0, 1).reshape(-1, b * t.shape[1])  # noqa: E731
    scores, routing_map = sb(scores), sb(routing_map)
    return (mcore.switch_load_balancing_loss_func(
        scores, routing_map.sum(0), scores.shape[0], topk, num_experts, 1.0) / b).item()


@pytest.mark.parametrize("score_function", ["softmax", "sigmoid"])
@pytest.mark.parametrize("kind", ["aux_loss", "seq_aux_loss"])
@pytest.mark.parametrize("limited", [False, True])
def test_load_balancing_losses_equal_megatron_core(score_function, kind, limited):
    extra = dict(router_num_groups=4, router_group_topk=2) if limited else {}
    if score_function == "sigmoid" and limited:
        extra["enable_expert_bias"] = True
    r = router(topk=3, score_function=score_function, aux_loss_type=kind,
               gate_normalization="topk", **extra)
    if r.cfg.enable_expert_bias:
        with torch.no_grad():
            r.gate.expert_bias.copy_(torch.linspace(0.5, -0.5, E))
    x = inputs(5)
    seqs = 4 if kind == "seq_aux_loss" else None
    got = r(x, pad_free=True, num_sequences=seqs).aux_loss.item()
    want = mcore_aux_loss(logits_of(r, x), 3, score_function, seqs)
    assert abs(got - want) <= 1e-6 * abs(want), (got, want)
    # the gradient flows into the router weight through the scores
    r.weight.grad = None
    r(x, pad_free=True, num_sequences=seqs).aux_loss.backward()
    assert r.weight.grad is not None and r.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("topk", [1, 2])
def test_sinkhorn_equals_megatron_core(topk):
    """Training: the top-k of Megatron-Core's sinkhorn(logits); weights its activation's scores
    (sigmoid for top-1, softmax otherwise), not renormalized; no aux loss. Eval: the top-k of the
    activation. Selections differ between the two (the balancing is real)."""
    r = router(topk=topk, aux_loss_type="sinkhorn")
    x = inputs(7)
    lg = logits_of(r, x)
    act = torch.sigmoid(lg) if topk == 1 else torch.softmax(lg, -1)
    got_probs, got_map = dense(r(x, pad_free=True))
    idx = mcore.sinkhorn(lg.float()).topk(topk, dim=1).indices
    want_map = torch.zeros_like(lg, dtype=torch.bool).scatter(1, idx, True)
    assert torch.equal(got_map, want_map)
    torch.testing.assert_close(got_probs, (act * want_map).double())
    assert r(x, pad_free=True).aux_loss.item() == 0.0
    r.eval()
    eval_probs, eval_map = dense(r(x, pad_free=True))
    want_eval = torch.zeros_like(want_map).scatter(1, act.topk(topk, dim=1).indices, True)
    assert torch.equal(eval_map, want_eval) and not torch.equal(eval_map, want_map)


def test_fp64_router_computes_in_fp64():
    """--moe-router-dtype fp64: the selection sees fp64 logits (a near tie that fp32 rounds away
    is decided right), the weights come back fp32 with their gradient."""
    r = router(router_dtype="fp64", topk=2, gate_normalization="topk")
    x = inputs(9).requires_grad_()
    got = r(x, pad_free=True)
    assert got.weight_A.dtype == torch.float32 and got.aux_loss.dtype == torch.float32
    want_probs, want_map = mcore.topk_routing_with_score_function(logits_of(r, x.detach()), 2)
    assert want_probs.dtype == torch.float64
    probs, chosen = dense(got)
    assert torch.equal(chosen, want_map)
    torch.testing.assert_close(probs, want_probs, atol=1e-7, rtol=1e-7)
    got.weight_A.sum().backward()
    assert x.grad is not None and r.weight.grad.dtype == torch.float32


# ---- configuration errors ----------------------------------------------------------------------
BAD = {
    "bias without sigmoid": (dict(enable_expert_bias=True),
                             "--moe-router-enable-expert-bias needs --moe-router-score-function "
                             "sigmoid"),
    "groups alone": (dict(router_num_groups=4), "--moe-router-num-groups and "
                                                "--moe-router-group-topk go together"),
    "groups do not divide": (dict(router_num_groups=3, router_group_topk=1),
                             "--moe-router-num-groups 3 must divide --num-experts (8,)"),
    "too many groups picked": (dict(router_num_groups=4, router_group_topk=3),
                               "--moe-router-group-topk 3 must be between 1 and min("),
    "too few experts": (dict(topk=2, router_num_groups=8, router_group_topk=1),
                        "--moe-router-group-topk 1 groups of"),
    "pre-softmax with topk": (dict(pre_softmax=True, gate_normalization="topk"),
                              "--moe-router-pre-softmax keeps the softmax probabilities"),
    "scale": (dict(topk_scaling_factor=0.0), "--moe-router-topk-scaling-factor must be > 0"),
    "dtype": (dict(router_dtype="bf16"), "--moe-router-dtype 'bf16': use one of"),
    "sinkhorn sigmoid": (dict(aux_loss_type="sinkhorn", score_function="sigmoid"),
                         "--moe-router-load-balancing-type 'sinkhorn' picks its own activation"),
    "sinkhorn groups": (dict(aux_loss_type="sinkhorn", router_num_groups=2, router_group_topk=1),
                        "'sinkhorn' selects by its balanced assignment alone"),
    "rate": (dict(bias_update_rate=-1.0), "--moe-router-bias-update-rate must be >= 0"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_router_settings_name_the_flag(case):
    from megatron.cli.configs import flag_names

    kw, message = BAD[case]
    with pytest.raises(FieldError) as err:
        MoEConfig(**{**dict(num_experts=8, layers=(0,), topk=2), **kw})
    assert message in err.value.render(flag_names(err.value.owner)), err.value


def test_the_flags_fill_the_config():
    from megatron.cli.arguments import build_parser

    args = build_parser().parse_args(
        "--num-layers 2 --hidden-size 32 --num-attention-heads 4 --seq-length 16 "
        "--micro-batch-size 2 --lr 1e-3 --moe-router-score-function sigmoid "
        "--moe-router-enable-expert-bias "
        "--moe-router-bias-update-rate 0.01 --moe-router-num-groups 4 --moe-router-group-topk 2 "
        "--moe-router-topk-scaling-factor 2.5 --moe-router-dtype fp64 --moe-router-pre-softmax "
        "--moe-router-load-balancing-type seq_aux_loss".split())
    assert (args.score_function, args.enable_expert_bias, args.bias_update_rate,
            args.router_num_groups, args.router_group_topk, args.topk_scaling_factor,
            args.router_dtype, args.pre_softmax, args.aux_loss_type) == (
        "sigmoid", True, 0.01, 4, 2, 2.5, "fp64", True, "seq_aux_loss")


# ---- every layout equals one process, bias updates included ------------------------------------
LAYOUTS = [(2, 1, 1), (1, 2, 2), (2, 2, 2), (1, 4, 4)]  # (TP, EP, DP)
VARIANTS = {
    "sigmoid bias groups=EP seq-aux": dict(
        score_function="sigmoid", enable_expert_bias=True, bias_update_rate=0.02, topk=2,
        router_num_groups=2, router_group_topk=1, gate_normalization="topk",
        topk_scaling_factor=2.5, aux_loss_type="seq_aux_loss", drop_tokens=False),
    "softmax pre-softmax groups fp64 drop": dict(
        pre_softmax=True, topk=2, router_num_groups=4, router_group_topk=2, router_dtype="fp64",
        aux_loss_type="aux_loss", drop_tokens=True, drop_policy="probs"),
    "sinkhorn drop": dict(aux_loss_type="sinkhorn", topk=2, drop_tokens=True),
}
# global_aux_loss is defined over the data-parallel ranks of each micro-batch round: layouts of
# the same DP size agree, a DP of 1 equals one process (test below)
GLOBAL = {"global-aux": dict(aux_loss_type="global_aux_loss", topk=2, drop_tokens=True)}
STEPS, MICRO, MBS, SEQ = 3, 4, 2, 16


def train_case(tp: int, ep: int, variant: str) -> dict:
    from megatron.training.forward_backward import train_step
    from megatron.training.optimizer import Optimizer, OptimizerConfig
    from ted_patches.build import build_model

    groups = ted_groups(tp, ep)
    mcfg = tiny_model_config()
    moe = MoEConfig(**{**dict(num_experts=8, layers=(1,), capacity_factor=1.0, min_capacity=2,
                              aux_loss_coeff=0.05, z_loss_coeff=0.01),
                       **{**VARIANTS, **GLOBAL}[variant]})
    model = build_model(mcfg, moe, groups, seed=11)
    opt = Optimizer(model, groups, OptimizerConfig(lr=1e-3, adam_eps=1e-6, clip_grad=1.0))
    out = {"loss": [], "aux": [], "bias": []}
    data = dict(mbs=MBS, seq=SEQ, vocab=mcfg.vocab_size)
    for step in range(STEPS):
        m = train_step(model, opt, my_microbatches(step, groups, MICRO, **data), groups)
        out["loss"].append(m.lm_loss)
        out["aux"].append(m.aux_loss)
        out["bias"] += [b.clone() for n, b in model.named_buffers() if n.endswith("expert_bias")]
    out["grads"] = full_tensors(model, groups, grads=True)
    out["final"] = full_tensors(model, groups)
    return out


@functools.cache
def reference(variant: str) -> dict:
    return train_case(1, 1, variant)


# In CI every variant runs at TP x EP x DP (2, 2, 2) and at one layout of world 2 or EP 4,
# rotating, so every layout still runs (6 of the 12; TED_FULL_MATRIX=1 for all)
SAMPLED = {(LAYOUTS[(1, 0, 3)[i]], v) for i, v in enumerate(VARIANTS)}


def variant_matrix() -> list[tuple]:
    return [(*layout, v) for layout in LAYOUTS for v in VARIANTS
            if FULL_MATRIX or layout == (2, 2, 2) or (layout, v) in SAMPLED]


@pytest.mark.parametrize("tp,ep,dp,variant", variant_matrix())
def test_every_variant_at_every_layout_equals_one_process(tp, ep, dp, variant):
    ranks, ref = run(tp * dp, train_case, tp, ep, variant), reference(variant)
    for got in ranks:  # the bias is identical on every rank, after every step
        assert len(got["bias"]) == len(ref["bias"])
        assert all(torch.equal(a, b) for a, b in zip(got["bias"], ranks[0]["bias"]))
    got = ranks[0]
    for key in ("loss", "aux"):
        for a, b in zip(got[key], ref[key]):
            assert abs(a - b) <= 1e-5 * max(abs(b), 1e-3), f"{key}: {got[key]} != {ref[key]}"
    for a, b in zip(got["bias"], ref["bias"]):
        assert torch.equal(a, b), f"bias {a} != {b}"
    assert_close_dicts(got["grads"], ref["grads"], 1e-5, "gradient", 1e-6)
    # parameters after 3 AdamW steps: Adam's normalized update magnifies fp32 rounding in the
    # gradients (the default softmax router measured 1.06e-5 here at TP=2); gradients hold 1e-5
    assert_close_dicts(got["final"], ref["final"], 5e-5, "param after steps", 0.02)
    if VARIANTS[variant].get("enable_expert_bias"):  # the bias really moved, step after step
        assert not torch.equal(ref["bias"][0], ref["bias"][-1]) and ref["bias"][0].abs().sum() > 0


def assert_same_run(got: dict, want: dict) -> None:
    for key in ("loss", "aux"):
        for a, b in zip(got[key], want[key]):
            assert abs(a - b) <= 1e-5 * max(abs(b), 1e-3), f"{key}: {got[key]} != {want[key]}"
    assert_close_dicts(got["grads"], want["grads"], 1e-5, "gradient", 1e-6)


def test_global_aux_loss_layouts_of_one_dp_size_agree():
    """TP 2 at DP 1 equals one process; TP 2 x EP 2 at DP 2 equals TP 1 x EP 2 at DP 2; and the
    DP 2 loss is not the DP 1 one (the global batch is real)."""
    assert_same_run(run(2, train_case, 2, 1, "global-aux")[0], reference("global-aux"))
    dp2 = run(2, train_case, 1, 2, "global-aux")[0]
    assert_same_run(run(4, train_case, 2, 2, "global-aux")[0], dp2)
    assert dp2["aux"] != reference("global-aux")["aux"]


def test_global_aux_loss_runs_over_the_steps_micro_batches_as_megatron_core():
    """One rank, 3 micro-batches: micro-batch i's loss is Megatron-Core's switch loss of its own
    scores against the mean of the loads of micro-batches 0..i; an evaluation forward and a
    recompute (checkpointing, inside backward) add nothing; after the step it starts afresh."""
    from torch.utils.checkpoint import checkpoint

    r = router(topk=3, aux_loss_type="global_aux_loss", gate_normalization="topk")
    loads = []
    for i in range(3):
        x = inputs(20 + i)
        routing_map, scores = mcore.compute_routing_scores_for_aux_loss(logits_of(r, x), 3,
                                                                        "softmax")
        loads.append(routing_map.sum(0).float())
        want = mcore.switch_load_balancing_loss_func(scores, torch.stack(loads).mean(0), T, 3, E,
                                                     1.0).item()
        got = checkpoint(lambda t: r(t, pad_free=True).aux_loss, x, use_reentrant=False)
        assert abs(got.item() - want) <= 1e-6 * want
        got.backward()  # the recompute routes again, inside backward
        assert r.gate.step_load[1] == i + 1
    r.eval()
    r(inputs(30), pad_free=True)
    r.train()
    assert r.gate.step_load[1] == 3
    r.after_step(torch.zeros(E, dtype=torch.int64), skipped=False)
    x = inputs(31)
    assert abs(r(x, pad_free=True).aux_loss.item()
               - router(topk=3, aux_loss_type="aux_loss", gate_normalization="topk")(
                   x, pad_free=True).aux_loss.item()) < 1e-6


# ---- exact resume with the bias ----------------------------------------------------------------
def resume_case(path: str, tp: int, ep: int, steps: range, save_at: int | None,
                load: bool) -> dict:
    from megatron.checkpoint import Checkpointer, CheckpointConfig, config_dict
    from megatron.training.forward_backward import train_step
    from megatron.training.lr_schedule import ScheduleConfig, build_scheduler
    from megatron.training.optimizer import Optimizer, OptimizerConfig
    from ted_patches.build import build_model

    groups = ted_groups(tp, ep)
    mcfg = tiny_model_config()
    moe = MoEConfig(num_experts=8, layers=(0, 1), capacity_factor=1.0, min_capacity=2,
                    **VARIANTS["sigmoid bias groups=EP seq-aux"])
    model = build_model(mcfg, moe, groups, seed=11)
    opt = Optimizer(model, groups, OptimizerConfig(lr=3e-3, adam_eps=1e-6))
    sched = build_scheduler(opt, ScheduleConfig("samples", 8, 0, 80, 10), 3e-3, 0.0, 0.0)
    ck = Checkpointer(CheckpointConfig(save=path, load=path if load else None), groups)
    if load:
        ck.load(model, opt, sched, lambda *_: None)
    losses, biases = [], []
    data = dict(mbs=MBS, seq=SEQ, vocab=mcfg.vocab_size)
    for step in steps:
        losses.append(train_step(model, opt, my_microbatches(step, groups, MICRO, **data),
                                 groups).lm_loss)
        sched.step(MICRO * MBS)
        biases.append([b.clone() for n, b in model.named_buffers() if n.endswith("expert_bias")])
        if save_at == step + 1:
            ck.save(step + 1, {"model": config_dict(mcfg), "moe": config_dict(moe),
                               "consumed_samples": (step + 1) * MICRO * MBS}, model, opt, sched)
    ck.close()
    return {"loss": losses, "bias": biases}


def test_resume_with_the_bias_equals_an_uninterrupted_run(tmp_path):
    """6 steps straight vs 3 steps, a checkpoint at TP=2 EP=2, and 3 more after loading it: at
    the same layout the same losses and bias after every step, bitwise; at TP=1 EP=2 (the bias
    resharded from its stored one-process tensor) the same bias and losses within 1e-6."""
    straight = run(4, resume_case, str(tmp_path / "a"), 2, 2, range(6), None, False)[0]
    run(4, resume_case, str(tmp_path / "b"), 2, 2, range(3), 3, False)
    same = run(4, resume_case, str(tmp_path / "b"), 2, 2, range(3, 6), None, True)[0]
    other = run(2, resume_case, str(tmp_path / "b"), 1, 2, range(3, 6), None, True)[0]
    assert same["loss"] == straight["loss"][3:]
    for a, b in zip(other["loss"], straight["loss"][3:]):
        assert abs(a - b) <= 1e-6 * b
    for resumed in (same, other):
        for got, want in zip(resumed["bias"], straight["bias"][3:]):
            assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert not all(torch.equal(a, b) for a, b in zip(straight["bias"][2], straight["bias"][5]))


def test_bias_is_stored_as_one_tensor_per_layer(tmp_path):
    import megatron.checkpoint as ckpt

    out = run(2, resume_case, str(tmp_path / "c"), 1, 2, range(2), 2, False)[0]
    stored = ckpt.read_stored_tensors(str(tmp_path / "c"))
    names = sorted(n for n in stored if "expert_bias" in n)
    assert names == ["layers.0.mlp.router.gate.expert_bias", "layers.1.mlp.router.gate.expert_bias"]
    assert all(torch.equal(stored[n], b) for n, b in zip(names, out["bias"][-1]))
    assert stored[names[0]].dtype == torch.float32


def test_the_seams_config_rejects_unknown_score_functions_by_name():
    bad = dataclasses.replace(MoEConfig(num_experts=4, layers=(0,)))
    object.__setattr__(bad, "score_function", "relu")
    from ted_patches.gates import build_gate

    with pytest.raises(FieldError, match="score_function 'relu': use one of"):
        build_gate(bad, ted_groups(1, 1))
    with pytest.raises(FieldError, match="score_function 'relu': use one of"):
        MoEConfig(num_experts=4, layers=(0,), score_function="relu")


# ---- exports refuse what their format cannot express, by name ----------------------------------
REFUSED = {
    "sinkhorn": (dict(aux_loss_type="sinkhorn"), "--moe-router-load-balancing-type sinkhorn"),
    "pre-softmax": (dict(pre_softmax=True), "--moe-gate-normalization none"),
    "scaled": (dict(topk_scaling_factor=2.0), "--moe-router-topk-scaling-factor"),
    "bias": (dict(score_function="sigmoid", enable_expert_bias=True),
             "--moe-router-enable-expert-bias"),
    "groups": (dict(router_num_groups=2, router_group_topk=1), "--moe-router-num-groups"),
}


@pytest.mark.parametrize("fmt", ["mixtral", "qwen2_moe"])
@pytest.mark.parametrize("case", REFUSED)
def test_softmax_formats_refuse_the_variants_by_name(fmt, case):
    from megatron import convert

    model = tiny_model_config(swiglu=True, normalization="RMSNorm", position_embedding_type="rope",
                              add_bias_linear=False)
    kw, flag = REFUSED[case]
    plain = MoEConfig(num_experts=4, layers=(0, 1), topk=2)
    assert convert.blockers(fmt, model, plain) == []
    found = convert.blockers(fmt, model, dataclasses.replace(plain, **kw))
    assert found and all(flag in b or "sigmoid" in b for b in found), found
    assert any(flag in b for b in found)
    # fp64 routing and the bias's update rate change nothing an export computes
    assert convert.blockers(fmt, model, dataclasses.replace(plain, router_dtype="fp64",
                                                            bias_update_rate=0.5)) == []


# ---- the benchmark's group-limited rows ----------------------------------------------------------
def test_group_limited_bench_rows():
    """bench/moe_layer.py --group-limited 1 at EP = 4 (its rows' function, on the world of 4 the
    layout tests started): every token reaches one EP rank (4 without
    the limit); the all-to-all's bytes are those of one row per (token, expert) assignment, so
    they do not drop, while one row per (token, destination rank) would."""
    import argparse

    from bench.moe_layer import measure

    opts = argparse.Namespace(group_limited=1, cfs=[None], skews=[False], hidden=32, ffn=64,
                              experts=16, topk=4, tokens=64, iters=1, warmup=0, raw_malloc=True)
    out = run(4, measure, 1, 4, opts)[0]
    rows = {(r["routing"], r["pad_free"]): r for r in out}
    assert set(rows) == {(k, p) for k in ("unlimited", "group-limited g=1") for p in (False, True)}
    free, limited = rows["unlimited", True], rows["group-limited g=1", True]
    assert limited["max_ep_ranks_per_token"] == 1 < free["max_ep_ranks_per_token"]
    assert limited["assignments_sent"] == free["assignments_sent"] == 4 * 64  # no drops
    assert limited["token_rank_pairs"] == 64 < free["token_rank_pairs"]
    # 4 all-to-alls (dispatch, combine, and their backward) of one fp32 row per assignment, up
    # to the padding-free path's padding of nearly equal experts (<= 5%)
    exact = 4 * 4 * 64 * 32 * 4
    for r in (free, limited):
        assert exact <= r["a2a_bytes_per_rank"] <= 1.05 * exact
    assert (limited["a2a_bytes_per_rank_one_row_per_destination"]
            == round(limited["a2a_bytes_per_rank"] / 4))
    assert rows["unlimited", False]["a2a_bytes_per_rank"] == (
        rows["group-limited g=1", False]["a2a_bytes_per_rank"])
