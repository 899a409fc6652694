"""Edge cases of the TED MoE layer and hand-worked checks of its router.

  * one expert (softmax over one expert is exactly 1) equals the dense MLP with the same weights,
    at TP = 1 and TP = 2: forward, input gradient and the weight gradients;
  * a dropped token's output (and input gradient) is exactly zero, a kept token's is not;
  * a DP rank that sends every token to expert 0 (zero tokens to the others, very unequal counts
    over EP in no-drop mode) neither hangs nor changes the result: (TP, EP) = (1, 2) and (2, 2)
    equal one process running the same micro-batches in turn, outputs and DP-averaged grads;
  * bad flags raise a ValueError naming the flag, on every rank, before any collective;
  * the router: capacity table, TP padding, the position and probs drop policies, the three gate
    normalizations, both aux-loss forms and the z-loss, against hand-computed numbers.
"""

import functools
import math

import pytest
import torch

from harness import run, ted_groups
from megatron.model.params import shard
from megatron.model.transformer import MLP, megatron_parallel_config
from megatron.training.optimizer import Optimizer, OptimizerConfig
from ted_patches.config import MoEConfig
from ted_patches.moe_layer import MoELayer
from ted_patches.router import Router, keep_mask, token_capacity
from megatron.cli.configs import flag_names
from megatron.parallel.fields import FieldError
from megatron.parallel.topology import Group, TEDGroups, Topology
from util import MoEOnly, assert_close_dicts, full_tensors, rel_err, tiny_model_config

MBS, SEQ, H, FFN = 4, 16, 32, 64  # T = 64 tokens per micro-batch
TOL = 1e-5


model_config = tiny_model_config


def moe_config(**kw) -> MoEConfig:
    base = dict(num_experts=4, layers=(1,), topk=1, capacity_factor=1.0, min_capacity=4,
                drop_tokens=True)
    return MoEConfig(**{**base, **kw})


# ---- one expert == the dense MLP --------------------------------------------------------------
ONE_EXPERT_VARIANTS = [(norm, drop) for norm in ("surviving", "topk", "none")
                       for drop in (False, True)]


def one_expert_case(tp: int) -> dict:
    """Every variant: max relative error of MoE(E=1) vs MLP in output, input grad, weight grads."""
    groups = ted_groups(tp, 1)
    r, t = groups.tp.rank, groups.tp.size
    mcfg = model_config()
    gen = torch.Generator().manual_seed(5)
    w1, b1 = torch.randn(FFN, H, generator=gen) * 0.2, torch.randn(FFN, generator=gen) * 0.1
    w2, b2 = torch.randn(H, FFN, generator=gen) * 0.2, torch.randn(H, generator=gen) * 0.1
    x0, gy = torch.randn(MBS, SEQ, H, generator=gen), torch.randn(MBS, SEQ, H, generator=gen)

    mlp = MLP(mcfg, megatron_parallel_config(mcfg, groups), groups)
    with torch.no_grad():
        mlp.fc1.weight.copy_(shard(w1, 0, r, t))
        mlp.fc1.bias.copy_(shard(b1, 0, r, t))
        mlp.fc2.weight.copy_(shard(w2, 1, r, t))
        mlp.fc2.bias.copy_(b2)
    x = x0.clone().requires_grad_(True)
    y_mlp, _ = mlp(x)
    (y_mlp * gy).sum().backward()
    want = dict(y=y_mlp.detach(), x=x.grad, w1=mlp.fc1.weight.grad, b1=mlp.fc1.bias.grad,
                w2=mlp.fc2.weight.grad, b2=mlp.fc2.bias.grad)

    results = {}
    for norm, drop in ONE_EXPERT_VARIANTS:
        for dtd in ([True, False] if tp > 1 else [True]):
            # cf 1.0 with one expert and top-1 is room for every token
            cfg = MoEConfig(num_experts=1, layers=(0,), topk=1, capacity_factor=1.0, min_capacity=0,
                            drop_tokens=drop, gate_normalization=norm, aux_loss_coeff=0.0,
                            z_loss_coeff=0.0, dtd=dtd)
            moe = MoELayer(mcfg, cfg, groups)
            with torch.no_grad():
                moe.router.weight.copy_(torch.randn(1, H,
                                                    generator=torch.Generator().manual_seed(6)))
                moe.experts.w1[0].copy_(shard(w1, 0, r, t).t())  # experts store [in, out]
                moe.experts.b1[0].copy_(shard(b1, 0, r, t))
                moe.experts.w2[0].copy_(shard(w2, 1, r, t).t())
                moe.experts.b2[0].copy_(b2)
            routing = moe.router(x0.reshape(-1, H))
            assert torch.equal(routing.weight_N, torch.ones(MBS * SEQ)), (
                "gate weight of the one expert is not 1.0")
            x = x0.clone().requires_grad_(True)
            y, aux = moe(x)
            (y * gy).sum().backward()
            assert aux.dropped == 0
            got = dict(y=y.detach(), x=x.grad, w1=moe.experts.w1.grad[0].t(),
                       b1=moe.experts.b1.grad[0], w2=moe.experts.w2.grad[0].t(),
                       b2=moe.experts.b2.grad[0])
            results[(norm, drop, dtd)] = {k: rel_err(got[k], want[k]) for k in want}
    return results


@pytest.mark.parametrize("tp", [1, 2])
def test_one_expert_equals_dense_mlp(tp):
    for rank, results in enumerate(run(tp, one_expert_case, tp)):
        for variant, errs in results.items():
            for key, err in errs.items():
                assert err <= TOL, f"TP={tp} rank {rank} {variant}: {key} relative error {err:.3e}"


# ---- dropped tokens give exactly zero ---------------------------------------------------------
def expected_kept(logits_TE: torch.Tensor, k: int, capacity: int) -> list[set]:
    """Position policy by hand: per token, the set of choices kept (first choices in token order,
    then second choices), each expert taking at most `capacity`."""
    T, E = logits_TE.shape
    choices = []
    for t in range(T):
        order = sorted(range(E), key=lambda e: (-logits_TE[t, e].item(), e))
        choices.append(order[:k])
    filled = [0] * E
    kept = [set() for _ in range(T)]
    for j in range(k):
        for t in range(T):
            e = choices[t][j]
            if filled[e] < capacity:
                filled[e] += 1
                kept[t].add(e)
    return kept


@pytest.mark.parametrize("topk,cf", [(1, 0.25), (2, 0.25)])
def test_dropped_token_output_is_exactly_zero(topk, cf):
    groups = ted_groups(1, 1)
    cfg = MoEConfig(num_experts=4, layers=(0,), topk=topk, capacity_factor=cf, min_capacity=0,
                    aux_loss_coeff=0.0, z_loss_coeff=0.0)
    moe = MoEOnly(model_config(), cfg, groups, seed=3).moe
    gen = torch.Generator().manual_seed(11)
    with torch.no_grad():
        moe.router.weight.copy_(torch.randn(4, H, generator=gen))
    x = torch.randn(16, H, generator=gen, requires_grad=True)
    capacity = token_capacity(16, 4, topk, cf, 0)
    assert capacity == topk  # ceil(16 / 4 * 0.25 * k)
    kept = expected_kept(x.detach() @ moe.router.weight.detach().t(), topk, capacity)
    routing = moe.router(x.detach())
    assert sorted(zip(routing.token_N.tolist(), routing.expert_N.tolist())) == sorted(
        (t, e) for t, es in enumerate(kept) for e in es)
    y, aux = moe(x)
    y.pow(2).sum().backward()
    dropped = [t for t in range(16) if not kept[t]]
    alive = [t for t in range(16) if kept[t]]
    assert dropped and alive
    assert aux.dropped == 1 - len(routing.token_N) / (16 * topk)
    assert torch.equal(y[dropped], torch.zeros(len(dropped), H)), (
        "a dropped token's output is not exactly 0")
    assert torch.equal(x.grad[dropped], torch.zeros(len(dropped), H)), (
        "a dropped token has an input gradient")
    assert (y[alive].abs().sum(1) > 0).all(), "a kept token's output is zero"


# ---- a rank routing everything to one expert ---------------------------------------------------
SKEW_VARIANTS = [(1, False), (2, False), (1, True), (2, True)]  # (top-k, drop tokens)
E_SKEW = 4


def skewed_moe(cfg: MoEConfig, groups) -> MoEOnly:
    layer = MoEOnly(model_config(), cfg, groups)
    with torch.no_grad():  # replicated over TP: every rank copies the full weight
        layer.moe.router.weight.copy_(skew_router_weight())
    return layer


def skew_router_weight() -> torch.Tensor:
    w = torch.randn(E_SKEW, H, generator=torch.Generator().manual_seed(21)) * 0.3
    w[:, 0] = 0.0
    w[0, 0] = 1.0  # feature 0 speaks only to expert 0
    return w


def skew_input(index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch 0: feature 0 = 15 on every token, so every token's first choice is expert 0
    (margin 15 against logits of std ~1.7); other micro-batches: feature 0 = 0, normal routing."""
    gen = torch.Generator().manual_seed(2000 + index)
    x, probe = torch.randn(MBS, SEQ, H, generator=gen), torch.randn(MBS, SEQ, H, generator=gen)
    x[..., 0] = 15.0 if index == 0 else 0.0
    return x, probe


def run_skewed(groups, topk: int, drop: bool, microbatches: list[int]) -> dict:
    cfg = moe_config(num_experts=E_SKEW, topk=topk, drop_tokens=drop, aux_loss_coeff=0.1,
                     z_loss_coeff=0.01)
    module = skewed_moe(cfg, groups)
    opt = Optimizer(module, groups, OptimizerConfig())
    opt.zero_grad()
    outs = {}
    for index in microbatches:
        x, probe = skew_input(index)
        y, aux = module.moe(x)
        ((y * probe).sum() + aux.loss).div(len(microbatches)).backward()
        outs[index] = dict(y=y.detach(), aux=aux.aux_loss.item(), z=aux.z_loss.item(),
                           counts=aux.counts_E.tolist(), dropped=aux.dropped)
    opt.reduce_gradients()
    return dict(outs=outs, grads=full_tensors(module, groups, grads=True))


def skewed_case(tp: int, ep: int) -> dict:
    groups = ted_groups(tp, ep)
    results = {}
    for topk, drop in SKEW_VARIANTS:
        res = run_skewed(groups, topk, drop, [groups.dp.rank])
        if torch.distributed.get_rank() != 0:
            res.pop("grads")
        results[(topk, drop)] = res
    return results


@functools.cache
def skewed_reference() -> dict:
    groups = ted_groups(1, 1)
    return {v: run_skewed(groups, *v, [0, 1]) for v in SKEW_VARIANTS}


@pytest.mark.parametrize("tp,ep", [(1, 2), (2, 2)])
def test_rank_routing_all_tokens_to_one_expert(tp, ep):
    ranks = run(tp * 2, skewed_case, tp, ep, timeout=120.0)  # DP = 2: micro-batches 0 and 1
    ref = skewed_reference()
    for (topk, drop), want in ref.items():
        what = f"TP={tp} EP={ep} top-{topk} {'drop' if drop else 'no-drop'}"
        first0 = want["outs"][0]["counts"] if topk == 1 else None
        if first0 is not None:  # the skew is real: micro-batch 0 sends nothing to experts 1..E-1
            assert first0 == [MBS * SEQ] + [0] * (E_SKEW - 1), f"{what}: counts {first0}"
            assert min(want["outs"][1]["counts"]) > 0, (
                f"{what}: micro-batch 1 should use every expert")
        for rank_result in ranks:
            for index, got in rank_result[(topk, drop)]["outs"].items():
                w = want["outs"][index]
                assert rel_err(got["y"], w["y"]) <= TOL, f"{what}: output of micro-batch {index}"
                assert abs(got["aux"] - w["aux"]) <= TOL * abs(w["aux"]), f"{what}: aux loss"
                assert abs(got["z"] - w["z"]) <= TOL * abs(w["z"]), f"{what}: z loss"
                assert got["counts"] == w["counts"] and got["dropped"] == w["dropped"], what
        assert_close_dicts(ranks[0][(topk, drop)]["grads"], want["grads"], TOL, f"{what} grad")


# ---- bad flags: clear errors, on every rank, before any collective -------------------------------
BAD_FLAGS = {  # name -> (MoEConfig overrides, text the message must contain)
    "experts % EP": (dict(num_experts=3),
                     "--num-experts 3 is not divisible by --expert-model-parallel-size 2"),
    "topk > experts": (dict(num_experts=4, topk=5), "--moe-router-topk 5"),
    "topk 0": (dict(num_experts=4, topk=0), "--moe-router-topk 0"),
    "cf 0": (dict(capacity_factor=0.0), "--moe-expert-capacity-factor"),
    "cf < 0": (dict(capacity_factor=-1.0), "--moe-expert-capacity-factor"),
    "eval cf 0": (dict(eval_capacity_factor=0.0), "--moe-eval-capacity-factor"),
}


def bad_flags_case(only_rank=None) -> dict:
    """Each bad config built (MoEConfig, then MoELayer on EP = 2) on every rank, or on `only_rank`
    alone: a collective there would then hang, as its peer never joins."""
    groups = ted_groups(1, 2)
    if only_rank is not None and torch.distributed.get_rank() != only_rank:
        return {}
    out = {}
    for name, (kw, _) in BAD_FLAGS.items():
        try:
            MoELayer(model_config(), moe_config(**kw), groups)
            out[name] = None
        except FieldError as e:  # names config fields: shown as the command line shows it
            out[name] = e.render(flag_names(e.owner))
    out["collectives"] = groups.ledger.count()
    return out


@pytest.mark.parametrize("only_rank", [None, 0, 1])
def test_bad_flags_raise_before_any_collective(only_rank):
    results = run(2, bad_flags_case, only_rank, timeout=60.0)
    for rank, out in enumerate(results):
        if only_rank is not None and rank != only_rank:
            continue
        assert out.pop("collectives") == 0, f"rank {rank}: a collective was issued"
        for name, (_, text) in BAD_FLAGS.items():
            assert out[name] is not None, f"rank {rank}: {name} did not raise"
            assert text in out[name], f"rank {rank}: {name}: message {out[name]!r} lacks {text!r}"


# ---- the router, by hand ------------------------------------------------------------------------
def fake_groups(tp: int = 1) -> TEDGroups:
    """TEDGroups without processes: the router only reads the TP size (EP size 1 issues nothing)."""
    topo = Topology(tp, tp, 1)

    def group(name, size):
        return Group(name, None, tuple(range(size)), 0)

    return TEDGroups(topo, topo.coords(0), tp=group("tp", tp), dp=group("dp", 1), ep=group("ep", 1),
                     edp=group("edp", 1), world=group("world", tp))


@pytest.mark.parametrize("T,E,k,cf,min_cap,want", [
    (64, 8, 1, 1.0, 0, 8),      # 64 / 8 * 1
    (64, 8, 2, 1.0, 0, 16),     # 64 / 8 * 2
    (64, 8, 1, 1.25, 0, 10),    # 8 * 1.25
    (64, 8, 2, 1.25, 0, 20),    # 8 * 2.5
    (64, 8, 1, 1.125, 0, 9),    # 8 * 1.125
    (64, 8, 1, 1.0, 12, 12),    # min capacity wins
    (64, 8, 2, 1.25, 12, 20),   # formula wins
    (64, 8, 1, 0.1, 0, 1),      # ceil(0.8)
    (64, 8, 1, 0.1, 4, 4),
    (60, 8, 1, 1.0, 0, 8),      # ceil(7.5)
    (64, 6, 1, 1.0, 0, 11),     # ceil(10.67)
    (64, 6, 2, 1.0, 0, 22),     # ceil(21.33)
    (4, 8, 1, 1.0, 0, 1),       # ceil(0.5)
])
def test_token_capacity_table(T, E, k, cf, min_cap, want):
    assert token_capacity(T, E, k, cf, min_cap) == want


def _router(groups, **kw) -> Router:
    cfg = MoEConfig(**{**dict(num_experts=8, layers=(0,), topk=1, min_capacity=0), **kw})
    router = Router(H, cfg, groups, std=0.02)
    with torch.no_grad():
        router.weight.copy_(torch.randn(cfg.num_experts, H,
                                        generator=torch.Generator().manual_seed(31)))
    return router


@pytest.mark.parametrize("k,cf,drop", [
    (1, 1.125, True),
    (1, 1.25, True),
    (2, 1.0, True),
    (1, 1.0, False),
    (2, 1.0, False),
])
def test_capacity_padded_to_tp_and_routing_independent_of_tp(k, cf, drop):
    x = torch.randn(64, H, generator=torch.Generator().manual_seed(32))
    base = _router(fake_groups(1), topk=k, capacity_factor=cf, drop_tokens=drop)(x)
    unpadded = token_capacity(64, 8, k, cf, 0) if drop else int(base.counts_E.max())
    assert base.capacity == unpadded
    for tp in (2, 4):
        r = _router(fake_groups(tp), topk=k, capacity_factor=cf, drop_tokens=drop)(x)
        assert r.capacity % tp == 0 and r.capacity == -(-unpadded // tp) * tp, (
            tp, r.capacity, unpadded)
        # dropping uses the unpadded capacity: the same assignments, slots and weights at every TP
        for name in ("token_N", "expert_N", "slot_N", "weight_N"):
            assert torch.equal(getattr(r, name), getattr(base, name)), name
    assert int(base.slot_N.max()) < unpadded
    assert int(torch.bincount(base.expert_N, minlength=8).max()) <= unpadded


def test_keep_mask_position_and_probs_policies():
    # E = 3, K = 2, T = 4, capacity 2; assignments in choice-major order (4 first choices, 4 second)
    expert_A = torch.tensor([0, 0, 1, 0, 1, 2, 0, 1])
    prob_A = torch.tensor([0.5, 0.9, 0.6, 0.7, 0.3, 0.2, 0.4, 0.35])
    # position: expert 0 takes a0, a1 (a3, a6 dropped); expert 1 takes a2, then second choice a4 (a7
    # dropped); expert 2 takes a5
    keep, slot = keep_mask(expert_A, prob_A, 3, 2, "position")
    assert keep.tolist() == [True, True, True, False, True, True, False, False]
    assert {a: slot[a].item() for a in range(8) if keep[a]} == {0: 0, 1: 1, 2: 0, 4: 1, 5: 0}
    # probs: expert 0 keeps its 2 most probable a1 (0.9), a3 (0.7); expert 1 keeps a2 (0.6) and the
    # second choice a7 (0.35) over a4 (0.3); expert 2 keeps a5. Slots in assignment order.
    keep, slot = keep_mask(expert_A, prob_A, 3, 2, "probs")
    assert keep.tolist() == [False, True, True, True, False, True, False, True]
    assert {a: slot[a].item() for a in range(8) if keep[a]} == {1: 0, 2: 0, 3: 1, 5: 0, 7: 1}
    # probs ties: earlier assignment first
    keep, slot = keep_mask(torch.tensor([0, 0, 0]), torch.tensor([0.5, 0.5, 0.5]), 1, 2, "probs")
    assert keep.tolist() == [True, True, False] and slot[:2].tolist() == [0, 1]
    # capacity 0 keeps nothing
    for policy in ("position", "probs"):
        keep, _ = keep_mask(expert_A, prob_A, 3, 0, policy)
        assert not keep.any()


def test_keep_mask_k3_position_follows_token_order_and_choice_follows_choice_order():
    # E = 4, K = 3, T = 3, capacity 2. Choices: t0 (1, 2, 0), t1 (0, 1, 3), t2 (0, 2, 3);
    # assignments in choice-major order a = k * T + t: a0..a2 first choices, a3..a5 second, a6..a8
    # third.
    expert_A = torch.tensor([1, 0, 0, 2, 1, 2, 0, 3, 3])
    prob_A = torch.rand(9)
    # position (DeepSpeed's topkgating, k >= 3): token order over all choices: t0's a0 a3 a6, t1's
    # a1 a4 a7, t2's a2 a5 a8. Expert 0 takes t0's THIRD choice a6, then t1's first a1, and drops
    # t2's first a2.
    keep, slot = keep_mask(expert_A, prob_A, 4, 2, "position", topk=3)
    assert keep.tolist() == [True, True, False, True, True, True, True, True, True]
    assert ({a: slot[a].item() for a in range(9) if keep[a]}
            == {0: 0, 1: 1, 3: 0, 4: 1, 5: 1, 6: 0, 7: 0, 8: 1})
    # choice (ours before, now under its own name): first choices first: expert 0 takes a1, a2,
    # drops a6
    keep, slot = keep_mask(expert_A, prob_A, 4, 2, "choice", topk=3)
    assert keep.tolist() == [True, True, True, True, True, True, False, True, True]
    assert ({a: slot[a].item() for a in range(9) if keep[a]}
            == {0: 0, 1: 0, 2: 1, 3: 0, 4: 1, 5: 1, 7: 0, 8: 1})
    # for k <= 2 the two are one policy (DeepSpeed's top-1/top-2 gates hand out first choices first)
    two = torch.tensor([0, 0, 1, 0, 1, 2, 0, 1])
    for a, b in zip(keep_mask(two, prob_A[:8], 3, 2, "position", topk=2),
                    keep_mask(two, prob_A[:8], 3, 2, "choice", topk=2)):
        assert torch.equal(a, b)


# E = 3, H = 3, router weight = identity, so the logits are these rows. K = 2, T = 5, cf 0.5 ->
# capacity ceil(5 / 3 * 2 * 0.5) = 2. Choices (first, second): t0 (0,1) t1 (0,2) t2 (0,2) t3 (1,2)
# t4 (1,0).
# Assignments a0..a4 = first choices of t0..t4, a5..a9 = second choices.
# Position policy: e0 takes a0, a1 (a2 = t2's first and a9 = t4's second dropped); e1 takes a3, a4
# (a5 = t0's second dropped); e2 takes a6, a7 (a8 = t3's second dropped).
LOGITS = [[2.0, 1.0, 0.0], [3.0, 0.0, 1.0], [1.5, -1.0, 0.5], [0.0, 2.5, 1.0], [0.5, 1.0, -0.5]]
# (token, expert, slot) of a0 a1 a3 a4 a6 a7
KEPT = [(0, 0, 0), (1, 0, 1), (3, 1, 0), (4, 1, 1), (1, 2, 0), (2, 2, 1)]


def _probs(row):
    z = sum(math.exp(v) for v in row)
    return [math.exp(v) / z for v in row]


P = [_probs(r) for r in LOGITS]


def _tiny_router(**kw) -> Router:
    cfg = MoEConfig(**{**dict(num_experts=3, layers=(0,), topk=2, capacity_factor=0.5,
                              min_capacity=0), **kw})
    router = Router(3, cfg, fake_groups(1), std=0.02)
    with torch.no_grad():
        router.weight.copy_(torch.eye(3))
    return router


def _close(got, want, tol=1e-6):
    got = [float(v) for v in got]
    assert len(got) == len(want) and all(abs(a - b) <= tol * max(1.0, abs(b))
                                         for a, b in zip(got, want)), (got, want)


def test_gate_normalization_modes():
    x = torch.tensor(LOGITS)
    assert token_capacity(5, 3, 2, 0.5, 0) == 2
    want = {
        # over the surviving choices: t1 kept both, every other token kept one -> 1.0
        "surviving": [1.0, P[1][0] / (P[1][0] + P[1][2]), 1.0, 1.0, P[1][2] / (P[1][0] + P[1][2]),
                      1.0],
        # over the k choices before dropping
        "topk": [P[0][0] / (P[0][0] + P[0][1]), P[1][0] / (P[1][0] + P[1][2]),
                 P[3][1] / (P[3][1] + P[3][2]), P[4][1] / (P[4][1] + P[4][0]),
                 P[1][2] / (P[1][0] + P[1][2]), P[2][2] / (P[2][0] + P[2][2])],
        # raw probabilities
        "none": [P[0][0], P[1][0], P[3][1], P[4][1], P[1][2], P[2][2]],
    }
    for mode, weights in want.items():
        r = _tiny_router(gate_normalization=mode)(x)
        assert list(zip(r.token_N.tolist(), r.expert_N.tolist(), r.slot_N.tolist())) == KEPT, mode
        assert r.capacity == 2
        _close(r.weight_N, weights)
    # top-1, "surviving": the raw probability of the first choice (not renormalized to 1)
    r = _tiny_router(topk=1, capacity_factor=3.0, gate_normalization="surviving")(x)
    assert r.token_N.tolist() == [0, 1, 2, 3, 4] and r.expert_N.tolist() == [0, 0, 0, 1, 1]
    _close(r.weight_N, [P[0][0], P[1][0], P[2][0], P[3][1], P[4][1]])


def test_aux_losses_and_z_loss():
    x = torch.tensor(LOGITS)
    E, T = 3, 5
    me = [sum(P[t][e] for t in range(T)) / T for e in range(E)]
    first = [3 / 5, 2 / 5, 0.0]  # first choices: t0 t1 t2 -> e0, t3 t4 -> e1
    all_k = [4 / 10, 3 / 10, 3 / 10]  # plus second choices: t4 -> e0, t0 -> e1, t1 t2 t3 -> e2
    ds = E * sum(m * c for m, c in zip(me, first))
    mcore = E * sum(m * c for m, c in zip(me, all_k))
    z = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in LOGITS) / T
    r = _tiny_router(aux_loss_type="deepspeed")(x)
    _close([r.aux_loss], [ds])
    _close([r.z_loss], [z])
    assert r.counts_E.tolist() == [4, 3, 3]
    _close([_tiny_router(aux_loss_type="aux_loss")(x).aux_loss], [mcore])
    assert abs(ds - mcore) > 1e-2  # the two forms really differ at k = 2
    assert _tiny_router(aux_loss_type="none")(x).aux_loss.item() == 0.0
    # k = 1: the two forms agree (and equal E * sum(me * first-choice fraction))
    a = _tiny_router(topk=1, aux_loss_type="deepspeed")(x).aux_loss
    b = _tiny_router(topk=1, aux_loss_type="aux_loss")(x).aux_loss
    _close([a, b], [ds, ds])
