"""The TED MoE layer equals one process at every layout (tier 2: multi-process gloo).

Each DP rank feeds its own micro-batch; the single-process reference runs the same micro-batches
one after another (capacity, dropping and the aux loss are per micro-batch in both) and averages.
Outputs, aux and z losses, and every gathered, DP-reduced gradient must agree within 1e-5
relative; DTD on and off within 1e-6, with exactly 1/TP of the all-to-all bytes. Both dispatch
paths run everywhere (padded and padding-free, against the padded one-process reference), the
padding-free one within 1e-6 of the padded one at the same layout, and every forward checks that
the TP ranks routed identically (--check-tp-routing 1).
"""

import functools

import pytest
import torch

from harness import run, ted_groups
from megatron.model.params import init_parameters, spec_of
from megatron.training.optimizer import Optimizer, OptimizerConfig
from megatron.training.forward_backward import train_step
from ted_patches.config import moe_layer_indices
from ted_patches.build import build_model
from util import (FULL_MATRIX, MoEOnly, PARAM_FLOOR, assert_close_dicts, full_tensors,
                  my_microbatches, reference_expert_loop, rel_err, tiny_model_config,
                  tiny_moe_config)

LAYOUTS = [(1, 2, 2), (2, 1, 1), (2, 2, 2), (1, 4, 4), (2, 2, 4), (2, 4, 4)]  # (TP, EP, DP)
VARIANTS = [(1, True), (2, True), (1, False), (2, False)]  # (top-k, drop tokens)
MBS, SEQ, H = 4, 16, 32


model_config = tiny_model_config
PATHS = (False, True)  # pad_free


def moe_config(topk: int, drop: bool, **kw):
    return tiny_moe_config(topk, drop, **{"check_tp_routing": 1, **kw})


def layer_input(index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Micro-batch `index`: the layer input and a fixed probe G (loss = <y, G> + aux)."""
    gen = torch.Generator().manual_seed(1000 + index)
    return torch.randn(MBS, SEQ, H, generator=gen), torch.randn(MBS, SEQ, H, generator=gen)


def run_layer(groups, cfg, microbatches: list[int]) -> dict:
    """Forward + backward of the listed micro-batches (loss averaged over them, as gradient
    accumulation does), gradients averaged over DP by the optimizer's own path."""
    module = MoEOnly(model_config(), cfg, groups)
    opt = Optimizer(module, groups, OptimizerConfig())
    opt.zero_grad()
    groups.ledger.reset()
    outs = {}
    for index in microbatches:
        x, probe = layer_input(index)
        y, aux = module.moe(x)
        ((y * probe).sum() + aux.loss).div(len(microbatches)).backward()
        outs[index] = dict(y=y.detach(), aux=aux.aux_loss.item(), z=aux.z_loss.item(),
                           dropped=aux.dropped)
    a2a = groups.ledger.nbytes("all_to_all", "ep")
    opt.reduce_gradients()
    return dict(outs=outs, grads=full_tensors(module, groups, grads=True), a2a_bytes=a2a)


def layer_case(tp: int, ep: int) -> list:
    """Every variant on this rank's micro-batch, on both dispatch paths; with TP > 1 also DTD
    off."""
    groups = ted_groups(tp, ep)
    results = {}
    for topk, drop in VARIANTS:
        for dtd in ([True, False] if tp > 1 else [True]):
            for pad_free in PATHS:
                res = run_layer(groups, moe_config(topk, drop, dtd=dtd, pad_free=pad_free),
                                [groups.dp.rank])
                if torch.distributed.get_rank() != 0:
                    res.pop("grads")
                results[(topk, drop, dtd, pad_free)] = res
    return results


@functools.cache
def layer_reference(dp: int) -> dict:
    groups = ted_groups(1, 1)
    return {(k, d): run_layer(groups, moe_config(k, d, pad_free=False), list(range(dp)))
            for k, d in VARIANTS}


@pytest.mark.parametrize("tp,ep,dp", LAYOUTS)
def test_moe_layer_equals_single_process(tp, ep, dp):
    ranks = run(tp * dp, layer_case, tp, ep)
    ref = layer_reference(dp)
    for (topk, drop, dtd, pad_free), res in ranks[0].items():
        want = ref[(topk, drop)]
        what = f"top-{topk} {'drop' if drop else 'no-drop'} dtd={dtd} pad_free={pad_free}"
        for rank_result in ranks:  # every rank's micro-batch output (TP ranks hold copies)
            for index, got in rank_result[(topk, drop, dtd, pad_free)]["outs"].items():
                w = want["outs"][index]
                assert rel_err(got["y"], w["y"]) <= 1e-5, f"{what}: output of micro-batch {index}"
                assert abs(got["aux"] - w["aux"]) <= 1e-5 * abs(w["aux"]), f"{what}: aux loss"
                assert abs(got["z"] - w["z"]) <= 1e-5 * abs(w["z"]), f"{what}: z loss"
                assert got["dropped"] == w["dropped"], f"{what}: dropped fraction"
                if pad_free:  # the same layout's padded path, within 1e-6
                    padded = rank_result[(topk, drop, dtd, False)]["outs"][index]
                    assert rel_err(got["y"], padded["y"]) <= 1e-6, f"{what}: output vs padded"
        assert_close_dicts(res["grads"], want["grads"], 1e-5, f"{what} grad")
        if pad_free:
            assert_close_dicts(res["grads"], ranks[0][(topk, drop, dtd, False)]["grads"], 1e-6,
                               f"{what} grad vs padded")
    for topk, drop in VARIANTS:
        for pad_free in PATHS:
            if tp > 1:  # DTD is neutral
                on, off = (ranks[0][(topk, drop, True, pad_free)],
                           ranks[0][(topk, drop, False, pad_free)])
                for index in on["outs"]:
                    assert rel_err(on["outs"][index]["y"], off["outs"][index]["y"]) <= 1e-6
                assert_close_dicts(on["grads"], off["grads"], 1e-6, "DTD on vs off grad")
            # DTD sends 1/TP of the all-to-all bytes: exactly per rank when padded, in sum
            # padding-free
            if ep > 1:
                on = [r[(topk, drop, True, pad_free)]["a2a_bytes"] for r in ranks]
                off = [r[(topk, drop, tp == 1, pad_free)]["a2a_bytes"] for r in ranks]
                padded = [r[(topk, drop, True, False)]["a2a_bytes"] for r in ranks]
                assert all(b > 0 for b in on)
                if pad_free:
                    assert sum(on) * tp == sum(off) and sum(on) <= sum(padded)
                else:
                    assert all(a * tp == b for a, b in zip(on, off))


def test_drop_mode_really_drops_and_no_drop_mode_does_not():
    ref = layer_reference(2)
    for k in (1, 2):
        assert all(o["dropped"] > 0 for o in ref[(k, True)]["outs"].values())
        assert all(o["dropped"] == 0 for o in ref[(k, False)]["outs"].values())


# ---- a whole GPT-MoE, 3 optimizer steps --------------------------------------------------------
GPT_MICRO, GPT_MBS = 4, 2


def gpt_case(tp: int, ep: int, topk: int, drop: bool, steps: int = 3,
             pad_free: bool = False) -> dict | None:
    groups = ted_groups(tp, ep)
    mcfg = model_config()
    moe = moe_config(topk, drop, layers=moe_layer_indices(2, expert_interval=2), pad_free=pad_free)
    model = build_model(mcfg, moe, groups, seed=99)
    opt = Optimizer(model, groups, OptimizerConfig(lr=1e-3, adam_eps=1e-6, clip_grad=1.0))
    out = {"loss": [], "aux": [], "norm": []}
    data = dict(mbs=GPT_MBS, seq=SEQ, vocab=mcfg.vocab_size)
    for step in range(steps):
        metrics = train_step(model, opt, my_microbatches(step, groups, GPT_MICRO, **data), groups)
        out["loss"].append(metrics.lm_loss)
        out["aux"].append(metrics.aux_loss)
        out["norm"].append(metrics.grad_norm)
    out["final"] = full_tensors(model, groups)
    if torch.distributed.get_rank() != 0:
        out = {}
    out["coords"] = groups.coords
    out["local"] = {name: p.detach().clone() for name, p in model.named_parameters()}
    out["specs"] = {name: spec_of(p) for name, p in model.named_parameters()}
    return out


@functools.cache
def gpt_reference(topk: int, drop: bool) -> dict:
    return gpt_case(1, 1, topk, drop)


def assert_replicas_identical(ranks: list[dict]) -> None:
    """Every copy of a parameter piece is bitwise the same on every rank that holds it: TP-
    replicated pieces on the TP ranks, dense pieces on the DP ranks, experts on expert-DP."""
    for name, spec in ranks[0]["specs"].items():
        def key(c):
            return (c.tp if spec.tp_dim is not None else None, c.ep if spec.expert else None)
        holders: dict = {}
        for r in ranks:
            holders.setdefault(key(r["coords"]), []).append(r["local"][name])
        for copies in holders.values():
            assert all(torch.equal(c, copies[0]) for c in copies), f"replicas of {name} differ"


GPT_VARIANTS = [(2, True, False), (1, False, True), (2, True, True), (1, False, False)]


def gpt_matrix() -> list[tuple]:
    """(TP, EP, DP, top-k, drop, pad_free): every layout x variant with TED_FULL_MATRIX=1. In CI
    each layout runs the two variants of its half (alternating), which differ in top-k, dropping
    and dispatch path, so every variant still runs at world 2, 4 and 8, with TP > 1 and EP > 1."""
    return [(*layout, *v) for i, layout in enumerate(LAYOUTS)
            for j, v in enumerate(GPT_VARIANTS) if FULL_MATRIX or j // 2 == i % 2]


@pytest.mark.parametrize("tp,ep,dp,topk,drop,pad_free", gpt_matrix())
def test_gpt_moe_three_steps_equal_single_process(tp, ep, dp, topk, drop, pad_free):
    ranks, ref = (run(tp * dp, gpt_case, tp, ep, topk, drop, pad_free=pad_free),
                  gpt_reference(topk, drop))
    got = ranks[0]
    assert_replicas_identical(ranks)
    for key in ("loss", "aux", "norm"):
        for a, b in zip(got[key], ref[key]):
            assert abs(a - b) <= 1e-5 * abs(b), f"{key}: {got[key]} != {ref[key]}"
    assert_close_dicts(got["final"], ref["final"], 1e-5, "param after 3 steps", PARAM_FLOOR)


@pytest.mark.parametrize("swiglu,bias", [(False, True), (True, False)])
def test_experts_in_cpu_cache_chunks_equal_one_batch_and_the_per_expert_loop(
        monkeypatch, swiglu, bias):
    """The CPU path computes a few experts at a time (cache locality); forward and every gradient
    must equal one batched product and the plain per-expert loop."""
    from ted_patches import experts as experts_mod

    groups = ted_groups(1, 1)
    mcfg = model_config(swiglu=swiglu, add_bias_linear=bias)
    holder = torch.nn.Module()
    holder.experts = experts_mod.GroupedExperts(mcfg, 5, 64, groups)
    init_parameters(holder, 3, groups)
    x = torch.randn(5, 12, H)
    probe = torch.randn(5, 12, H)

    def run_once():
        xx = x.clone().requires_grad_(True)
        holder.zero_grad()
        y = holder.experts(xx, holder.experts.b2)  # the fc2 bias inside fc2, as the layer runs it
        (y * probe).sum().backward()
        return y.detach(), [xx.grad] + [p.grad.clone() for p in holder.parameters()]

    whole = run_once()
    monkeypatch.setattr(experts_mod, "_CPU_ACTIVATION_BUDGET", 2 * 12 * 64 * (2 if swiglu else 1))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert experts_mod._experts_per_chunk(x.device, 5, 12 * holder.experts.w1.shape[-1]) == 2
    chunked = run_once()
    assert rel_err(chunked[0], whole[0]) <= 1e-6
    for a, b in zip(chunked[1], whole[1]):
        assert rel_err(a, b) <= 1e-6
    loop = reference_expert_loop(holder.experts, x)
    if bias:
        loop = loop + holder.experts.b2[:, None, :]
    assert rel_err(loop.detach(), whole[0]) <= 1e-6


# ---- residual MoE, jitter, eval capacity ---------------------------------------------------------
def residual_case(tp: int, ep: int) -> dict | None:
    """Megatron-DeepSpeed's residual MoE (dense MLP beside the experts, learned 2-way mix)."""
    groups = ted_groups(tp, ep)
    res = run_layer(groups, moe_config(2, True, mlp_type="residual"), [groups.dp.rank])
    return res if torch.distributed.get_rank() == 0 else {"outs": res["outs"]}


def test_residual_moe_equals_single_process():
    ranks = run(4, residual_case, 2, 2)
    want = run_layer(ted_groups(1, 1), moe_config(2, True, mlp_type="residual"), [0, 1])
    for rank_result in ranks:
        for index, got in rank_result["outs"].items():
            assert rel_err(got["y"], want["outs"][index]["y"]) <= 1e-5
    assert (any(k.startswith("moe.dense.") for k in want["grads"])
            and "moe.mix.weight" in want["grads"])
    assert_close_dicts(ranks[0]["grads"], want["grads"], 1e-5, "residual MoE grad")


def jitter_case(tp: int) -> tuple:
    """Routing of the same micro-batch with input jitter, in training and in eval mode."""
    groups = ted_groups(tp, 1)
    torch.manual_seed(42)  # the default stream: seeded alike on every rank, as in training
    module = MoEOnly(model_config(), moe_config(2, True, jitter_eps=0.1), groups)
    x, _ = layer_input(0)
    train = module.moe.router(x.view(-1, H))
    module.eval()
    evaluation = module.moe.router(x.view(-1, H))
    return ((train.expert_N, train.slot_N, train.weight_N.detach()),
            (evaluation.expert_N, evaluation.weight_N.detach()))


def test_jitter_draws_from_the_stream_the_tp_ranks_share_and_only_in_training():
    results = run(2, jitter_case, 2)
    for a, b in zip(results[0][0], results[1][0]):
        assert torch.equal(a, b)  # TP ranks must agree exactly, noise included
    plain = MoEOnly(model_config(), moe_config(2, True), ted_groups(1, 1)).moe.router
    x, _ = layer_input(0)
    clean = plain(x.view(-1, H))
    assert not torch.equal(results[0][0][2], clean.weight_N)  # training: noise changed the gates
    assert torch.equal(results[0][1][1], clean.weight_N.detach())  # eval: no noise


def test_eval_mode_uses_the_eval_capacity_factor():
    module = MoEOnly(model_config(),
                     moe_config(2, True, capacity_factor=1.0, eval_capacity_factor=2.0),
                     ted_groups(1, 1))
    x, _ = layer_input(0)
    train_routing = module.moe.router(x.view(-1, H))
    module.eval()
    eval_routing = module.moe.router(x.view(-1, H))
    T = MBS * SEQ
    assert train_routing.capacity == 2 * T // 8 and eval_routing.capacity == 2 * 2 * T // 8
    assert eval_routing.token_N.numel() > train_routing.token_N.numel()
