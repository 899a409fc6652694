"""DeepSpeed's MoE layer (`deepspeed.moe.layer.MoE`, the paper's reference code) as an oracle.

For the SAME gate and expert weights, our MoELayer (aux_loss_type "deepspeed", gate_normalization
"surviving", drop_policy "position") and DeepSpeed's MoE (use_rts=False, noisy_gate_policy=None,
top2_2nd_expert_sampling=False, eval capacity factor = training one) give the same output, aux
loss, expert counts, and the same raw per-rank gradients (input, gate, every local expert's
weights and biases; read from .grad right after backward: DeepSpeed does no DP all-reduce
itself, and ours is done by the Optimizer, which is not used here), within 1e-5 relative
(max|a - b| / max|b|):
  * top-2 with tokens dropped (cf 1.0) and without (drop_tokens False);
  * top-1 where nothing is dropped (cf = E, and drop_tokens False). Top-1 with an over-full
    expert is not compared: DeepSpeed keeps the tokens `torch.topk` picks among equal one-hot
    scores (no documented order), ours keeps them in token order;
  * also top-3 and top-4 with drops, which DeepSpeed routes through `topkgating` (l_aux counts
    all k choices divided by k, as our "deepspeed" aux loss does for k >= 3; gates renormalized
    over the survivors), with both of its drop policies: "probs" (per expert the most probable
    survive; the one its MoE layer uses) and "position" (capacity handed out in TOKEN order over
    all k choices; its layer is made to pass it), against our policies of the same names;
at EP = 1 (in this process, no DeepSpeed distributed state at all) and EP = 2 (a 2-rank gloo
world; each rank has its own input, expert ids r * E_l + i live on EP rank r in both), each on
both of our dispatch paths (padded and padding-free). And the gates alone, `topkgating` against
our router on random logits for k = 3, 4, both policies, several capacity factors: the same
kept (token, expert) pairs, weights, counts and aux loss, and for "position" the same slots.

DeepSpeed's tensor-parallel path (`groups.mpu` set, `deepspeed.moe.mappings` drop/gather) is not
compared: as shipped it cannot run on gloo. `_gather_tokens` all-gathers an N-D tensor into a 1-D
buffer, which NCCL accepts (numel check only) but ProcessGroupGloo::allgather rejects ("invalid
tensor size"); and with drop_tokens=True it never pads the capacity to a multiple of TP. Our TP
path is checked against one process in test_moe.py instead.

State hygiene (the pytest process and the harness workers are shared with every other test file):
see tests/deepspeed_reference.py. Only the EP = 2 workers call `deepspeed.init_distributed`, which
wraps the existing default group and creates DeepSpeed's own 'ep_size_2' groups on both ranks.
"""

import contextlib
import dataclasses
import functools

import pytest
import torch

import deepspeed_reference as ds_baseline

try:
    deepspeed, _ = ds_baseline.import_deepspeed()
except ImportError:
    pytest.skip("deepspeed is not installed (pip install deepspeed: the [test] extra)",
                allow_module_level=True)
from deepspeed.moe import sharded_moe  # noqa: E402
from deepspeed.moe.sharded_moe import _capacity as ds_capacity  # noqa: E402

import torch.nn.functional as F  # noqa: E402

from harness import run, ted_groups  # noqa: E402
from megatron.model import ModelConfig  # noqa: E402
from megatron.model.transformer import activation  # noqa: E402
from ted_patches.config import MoEConfig  # noqa: E402
from ted_patches.moe_layer import MoELayer  # noqa: E402
from ted_patches.router import Router, token_capacity  # noqa: E402
from util import rel_err  # noqa: E402

E, H, FFN = 8, 16, 32
B, S = 4, 16  # T = 64 tokens per rank
AUX = 0.1  # loss = <y, G> + AUX * aux
TOL = 1e-5
# name -> (top-k, capacity factor, drop tokens, drop policy of both: ours and DeepSpeed's
# topkgating)
CASES = {
    "top2-drop-cf1": (2, 1.0, True, "position"),
    "top2-nodrop": (2, 1.0, False, "position"),
    "top1-cfE-nodrop-by-capacity": (1, float(E), True, "position"),
    "top1-nodrop": (1, 1.0, False, "position"),
    "top3-probs-drop-cf1": (3, 1.0, True, "probs"),
    "top3-position-drop-cf1": (3, 1.0, True, "position"),
    "top4-probs-drop-cf1": (4, 1.0, True, "probs"),
    "top4-position-drop-cf1": (4, 1.0, True, "position"),
}
DROPPING = tuple(name for name in CASES if "drop-cf" in name)
GRADS = ("x", "gate", "w1", "b1", "w2", "b2")


def full_weights(seed: int = 1234) -> dict:
    """Global weights. Gate: logits = x @ wg.T;
    expert e: w2[e] @ gelu(w1[e] @ x + b1[e]) + b2[e]."""
    g = torch.Generator().manual_seed(seed)
    return dict(
        wg=torch.randn(E, H, generator=g) * 0.5,
        w1=torch.randn(E, FFN, H, generator=g) / H**0.5,
        b1=torch.randn(E, FFN, generator=g) * 0.1,
        w2=torch.randn(E, H, FFN, generator=g) / FFN**0.5,
        b2=torch.randn(E, H, generator=g) * 0.1,
    )


def rank_input(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(B, S, H, generator=g), torch.randn(B, S, H, generator=g)


def build_ds(ep: int, k: int, cf: float, drop: bool, w: dict, ep_rank: int):
    moe = ds_baseline.build_moe(hidden=H, ffn=FFN, experts=E, ep=ep, topk=k, capacity_factor=cf,
                                drop_tokens=drop)
    assert ds_baseline.ep_rank(moe) == ep_rank, "DeepSpeed's EP rank != ours"
    ds_baseline.load_weights(moe, w)
    return moe


@contextlib.contextmanager
def ds_topk_policy(policy: str):
    """DeepSpeed's TopKGate calls topkgating with its default drop policy ("probs"): pass
    `policy`."""
    original = sharded_moe.topkgating
    sharded_moe.topkgating = functools.partial(original, drop_policy=policy)
    try:
        yield
    finally:
        sharded_moe.topkgating = original


def build_ours(groups, k: int, cf: float, drop: bool, w: dict, overrides: dict) -> MoELayer:
    mcfg = ModelConfig(num_layers=1, hidden_size=H, num_attention_heads=1, ffn_hidden_size=FFN,
                       vocab_size=16, max_position_embeddings=S, hidden_dropout=0.0,
                       attention_dropout=0.0)
    cfg = MoEConfig(num_experts=E, layers=(0,), topk=k, capacity_factor=cf, eval_capacity_factor=cf,
                    min_capacity=4, drop_tokens=drop, drop_policy="position",
                    gate_normalization="surviving", aux_loss_type="deepspeed", aux_loss_coeff=AUX,
                    z_loss_coeff=0.0, jitter_eps=0.0)
    cfg = dataclasses.replace(cfg, **overrides)
    layer = MoELayer(mcfg, cfg, groups)
    ids = [groups.ep.rank * (E // groups.ep.size) + i for i in range(E // groups.ep.size)]
    with torch.no_grad():
        layer.router.weight.copy_(w["wg"])
        for name in ("b1", "b2"):
            getattr(layer.experts, name).copy_(w[name][ids])
        for name in ("w1", "w2"):  # ours are stored [in, out], nn.Linear's [out, in]
            getattr(layer.experts, name).copy_(w[name][ids].transpose(1, 2))
    return layer


def run_ds(moe, x, gy) -> dict:
    x = x.clone().requires_grad_(True)
    out, l_aux, counts = moe(x)
    ((out * gy).sum() + AUX * l_aux).backward()
    layer = moe.deepspeed_moe
    exs = layer.experts.deepspeed_experts
    return dict(out=out.detach(), aux=l_aux.detach(), counts=counts.long(), x=x.grad,
                gate=layer.gate.wg.weight.grad,
                w1=torch.stack([e[0].weight.grad for e in exs]),
                b1=torch.stack([e[0].bias.grad for e in exs]),
                w2=torch.stack([e[2].weight.grad for e in exs]),
                b2=torch.stack([e[2].bias.grad for e in exs]))


def run_ours(layer: MoELayer, x, gy) -> dict:
    x = x.clone().requires_grad_(True)
    y, aux = layer(x)
    ((y * gy).sum() + aux.loss).backward()
    ex = layer.experts
    return dict(out=y.detach(), aux=aux.aux_loss, counts=aux.counts_E.long(), x=x.grad,
                gate=layer.router.weight.grad, w1=ex.w1.grad.transpose(1, 2), b1=ex.b1.grad,
                w2=ex.w2.grad.transpose(1, 2), b2=ex.b2.grad, dropped=aux.dropped)


def oracle_case(ep: int, names: list[str]) -> dict:
    """On every rank: ours (both paths) vs DeepSpeed for each case; the relative errors and what
    was dropped."""
    groups = ted_groups(1, ep)
    torch.manual_seed(0)  # nothing random should be drawn; keep it deterministic regardless
    w = full_weights()
    x, gy = rank_input(groups.ep.rank if ep > 1 else 0)
    results = {}
    for name in names:
        k, cf, drop, policy = CASES[name]
        with ds_topk_policy(policy):
            ds = run_ds(build_ds(ep, k, cf, drop, w, groups.ep.rank), x, gy)
        for pad_free in (False, True):
            ours = run_ours(build_ours(groups, k, cf, drop, w,
                                       dict(drop_policy=policy, pad_free=pad_free)), x, gy)
            errs = {key: rel_err(ours[key], ds[key]) for key in ("out", "aux") + GRADS}
            errs["counts_equal"] = bool(torch.equal(ours["counts"], ds["counts"]))
            errs["dropped"] = ours["dropped"]
            errs["grad_norms"] = {key: ds[key].norm().item() for key in GRADS}
            results[(name, pad_free)] = errs
    return results


def check(results_by_rank: list[dict], names: list[str]) -> None:
    for rank, results in enumerate(results_by_rank):
        for (name, pad_free), errs in results.items():
            what = f"rank {rank} {name} pad_free={pad_free}"
            print(what, {k: f"{v:.2e}" for k, v in errs.items()
                         if isinstance(v, float) and k != "dropped"},
                  f"dropped={errs['dropped']:.4f}")
            assert errs["counts_equal"], f"{what}: expert counts differ"
            for key in ("out", "aux") + GRADS:
                assert errs[key] <= TOL, f"{what}: {key} relative error {errs[key]:.3e} > {TOL}"
            # every compared gradient is a real signal, not zeros agreeing with zeros
            assert all(v > 0 for v in errs["grad_norms"].values()), (
                f"{what}: a gradient is all zero")
            if name in DROPPING:
                assert errs["dropped"] > 0, f"{what}: the drop case dropped nothing"
            else:
                assert errs["dropped"] == 0, f"{what}: tokens were dropped"


def test_activation_is_exact_gelu_in_both():
    h = torch.linspace(-4, 4, 101)
    cfg = ModelConfig(num_layers=1, hidden_size=H, num_attention_heads=1, vocab_size=16,
                      max_position_embeddings=S)
    assert torch.equal(activation(cfg, h), F.gelu(h, approximate="none"))
    assert not torch.equal(activation(cfg, h), F.gelu(h, approximate="tanh"))
    moe = build_ds(1, 1, 1.0, True, full_weights(), 0)
    for ex in moe.deepspeed_moe.experts.deepspeed_experts:
        assert isinstance(ex[1], torch.nn.GELU) and ex[1].approximate == "none"


def test_capacity_formula_equals_deepspeed():
    """token_capacity == DeepSpeed's _capacity (fp32 ceil of T/E * (cf * k), at least min_capacity),
    including the rounding edges where a float64 formula would be one larger."""
    edges = [(10, 3, 3, 1.1), (5, 3, 3, 0.2), (10, 3, 3, 0.1)]  # float64 gives +1 on these
    grid = [(t, e, k, cf) for t in (1, 7, 10, 64, 100, 333, 1000, 4096) for e in (1, 3, 6, 8, 64)
            for k in (1, 2, 3) for cf in (0.1, 0.2, 0.3, 0.5, 1.0, 1.1, 1.25, 1.3, 2.0)]
    for t, e, k, cf in edges + grid:
        for m in (0, 4):
            want = int(ds_capacity(torch.empty(t, e), torch.tensor(cf * k), torch.tensor(m)))
            assert token_capacity(t, e, k, cf, m) == want, f"T={t} E={e} k={k} cf={cf} min={m}"


def test_oracle_ep1():
    names = list(CASES)
    check(run(1, oracle_case, 1, names), names)


def test_oracle_ep2():
    names = list(CASES)
    check(run(2, oracle_case, 2, names), names)


# ---- the gates alone: DeepSpeed's topkgating against our router, k >= 3, on random logits --------
def ours_on_logits(logits: torch.Tensor, k: int, cf: float, policy: str):
    """Our router fed `logits` exactly (identity gate weight over E input features)."""
    T, n = logits.shape
    cfg = MoEConfig(num_experts=n, layers=(0,), topk=k, capacity_factor=cf, eval_capacity_factor=cf,
                    min_capacity=4, drop_policy=policy, gate_normalization="surviving",
                    aux_loss_type="deepspeed")
    router = Router(n, cfg, ted_groups(1, 1), std=0.02)
    with torch.no_grad():
        router.weight.copy_(torch.eye(n))
    r = router(logits)
    kept_TE = torch.zeros(T, n, dtype=torch.bool)
    weight_TE, slot_TE = torch.zeros(T, n), torch.full((T, n), -1)
    t, e = r.token_N, r.expert_N
    kept_TE[t, e] = True
    weight_TE[t, e] = r.weight_N.detach()
    slot_TE[t, e] = r.slot_N
    return kept_TE, weight_TE, slot_TE, r.counts_E, r.aux_loss.detach()


@pytest.mark.parametrize("policy", ["position", "probs"])
@pytest.mark.parametrize("k", [3, 4])
def test_topk_gating_k3_k4_equals_deepspeed_on_random_logits(k, policy):
    n = 8
    for seed in range(4):
        for cf in (0.5, 1.0, 1.25):
            logits = torch.randn(48, n, generator=torch.Generator().manual_seed(seed)) * 2
            l_aux, combine_TEC, dispatch_TEC, counts = sharded_moe.topkgating(
                logits.clone(), k, cf, 4, drop_tokens=True, drop_policy=policy)
            kept, weight, slot, our_counts, our_aux = ours_on_logits(logits, k, cf, policy)
            what = f"k={k} {policy} cf={cf} seed={seed}"
            ds_kept = dispatch_TEC.any(-1)
            assert torch.equal(kept, ds_kept), what
            if cf < 1.0:
                assert ds_kept.sum() < k * 48, f"{what}: nothing dropped"
            assert rel_err(weight, combine_TEC.sum(-1)) <= 1e-6, what
            assert torch.equal(our_counts, counts.long()), what
            assert abs(our_aux.item() - l_aux.item()) <= 1e-6 * abs(l_aux.item()), what
            if policy == "position":  # slots in token order over all k choices, as DeepSpeed's
                assert torch.equal(torch.where(kept, slot, -1),
                                   torch.where(ds_kept, dispatch_TEC.int().argmax(-1), -1)), what
