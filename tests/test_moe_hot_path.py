"""The MoE hot path: padding-free dispatch, the sync-free router, and the guards for what only
GPUs break (tier 1 and tier 2).

  * host synchronizations in one MoE layer forward + backward, counted with a TorchDispatchMode:
    none in the padded drop path, exactly one (the count exchange) in the padding-free path;
  * the padding-free path equals the padded one within 1e-6 (both expert backends, every drop
    policy, top-1..4, drop and no-drop, SwiGLU, a router sending everything to one expert);
  * the variable-split all-to-all and its backward;
  * CAC replay checks what it replays: another kind, group, shape or dtype, or one collective too
    many, is an error;
  * --check-tp-routing stops every TP rank with a clear error when their routing differs.
"""

import dataclasses
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from harness import run, ted_groups
from megatron.parallel import comm
from ted_patches.config import DROP_POLICIES, MoEConfig
from util import MoEOnly, rel_err, tiny_model_config

MBS, SEQ, H = 4, 16, 32
TOL = 1e-6

# ops that make the host wait for the device (or, on CPUs, that would on an accelerator)
SYNC_OPS = {"aten._local_scalar_dense", "aten.item", "aten.nonzero", "aten.nonzero_numpy",
            "aten.argwhere", "aten.is_nonzero", "aten.equal", "aten.allclose", "aten.bincount",
            "aten.unique", "aten._unique", "aten._unique2", "aten.unique_dim",
            "aten.unique_consecutive", "aten.masked_select", "aten.histc"}


class HostSyncCounter(TorchDispatchMode):
    """Counts dispatched ops that force a host synchronization: the SYNC_OPS, repeat_interleave
    without output_size, boolean-mask indexing, and explicit copies to the CPU."""

    def __init__(self):
        super().__init__()
        self.syncs: Counter = Counter()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        self.ops[name] += 1
        if name in SYNC_OPS:
            self.syncs[name] += 1
        elif (name == "aten.repeat_interleave" and func._overloadname == "Tensor"
              and kwargs.get("output_size") is None):
            self.syncs[name] += 1
        elif name in ("aten.index", "aten.index_put", "aten.index_put_") and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])):
            self.syncs[name + "(bool mask)"] += 1
        elif (name in ("aten._to_copy", "aten.copy_", "aten.to")
              and str(kwargs.get("device", "")) == "cpu"):
            self.syncs["copy to host"] += 1
        return func(*args, **kwargs)


def moe_config(**kw) -> MoEConfig:
    base = dict(num_experts=8, layers=(1,), topk=2, capacity_factor=1.0, min_capacity=4,
                drop_tokens=True, aux_loss_coeff=0.1, z_loss_coeff=0.01)
    return MoEConfig(**{**base, **kw})


def layer_input(index: int):
    gen = torch.Generator().manual_seed(1000 + index)
    return torch.randn(MBS, SEQ, H, generator=gen), torch.randn(MBS, SEQ, H, generator=gen)


def forward_backward(module, x, probe):
    x = x.clone().requires_grad_(True)
    module.zero_grad()
    y, aux = module.moe(x)
    ((y * probe).sum() + aux.loss).backward()
    return y, aux, x


# ---- host synchronizations -----------------------------------------------------------------------
SYNC_VARIANTS = [  # (pad_free, drop tokens, syncs expected)
    (False, True, 0),  # padded drop: none at all
    (True, True, 1),  # padding-free: the count exchange, nothing else
    (True, False, 1),
    (False, False, 1),  # padded no-drop: the capacity (the largest count) sizes a buffer
]


def sync_case(tp: int, ep: int) -> dict:
    groups = ted_groups(tp, ep)
    out = {}
    for pad_free, drop, _ in SYNC_VARIANTS:
        for topk in (1, 2, 3):
            module = MoEOnly(tiny_model_config(),
                             moe_config(topk=topk, drop_tokens=drop, pad_free=pad_free), groups)
            x, probe = layer_input(groups.dp.rank)
            with HostSyncCounter() as counter:
                forward_backward(module, x, probe)
            out[(pad_free, drop, topk)] = (dict(counter.syncs), dict(counter.ops))
    return out


@pytest.mark.parametrize("tp,ep,dp", [(1, 1, 1), (2, 2, 2)])
def test_host_synchronizations_in_one_layer_forward_and_backward(tp, ep, dp):
    for rank, result in enumerate(run(tp * dp, sync_case, tp, ep)):
        for pad_free, drop, want in SYNC_VARIANTS:
            for topk in (1, 2, 3):
                syncs, ops = result[(pad_free, drop, topk)]
                what = f"rank {rank} pad_free={pad_free} drop={drop} top-{topk}"
                # the mode sees the whole layer, backward included
                assert {"aten._embedding_bag", "aten.gelu_backward",
                        "aten._softmax_backward_data"} <= set(ops), what
                assert sum(syncs.values()) == want, (
                    f"{what}: host synchronizations {syncs}, want {want}")
                if pad_free:
                    assert syncs == {"copy to host": 1}, f"{what}: {syncs}"


# ---- padding-free == padded ---------------------------------------------------------------------
EQUAL_VARIANTS = [
    dict(topk=1), dict(topk=2), dict(topk=3), dict(topk=4),
    dict(topk=2, drop_tokens=False), dict(topk=3, drop_tokens=False),
    dict(topk=2, drop_policy="probs"), dict(topk=3, drop_policy="probs"),
    dict(topk=3, drop_policy="choice"),
    dict(topk=2, capacity_factor=0.5), dict(topk=2, capacity_factor=2.0),
    dict(topk=1, gate_normalization="none"),
    dict(topk=2, mlp_type="residual"),
]


def _compare(module_cfg, cfg, groups, x, probe, backend=None, router_weight=None, layout="packed"):
    """Relative errors of the padding-free path (experts' `layout` and `backend` forced) against
    the padded one, output and every gradient."""
    results = []
    for pad_free in (False, True):
        module = MoEOnly(module_cfg, dataclasses.replace(cfg, pad_free=pad_free), groups)
        module.moe.experts.packed_backend = backend
        module.moe.dispatcher.layout = layout
        if router_weight is not None:
            with torch.no_grad():
                module.moe.router.weight.copy_(router_weight)
        y, aux, xx = forward_backward(module, x, probe)
        results.append(dict(y=y.detach(), x=xx.grad, dropped=aux.dropped, aux=aux.aux_loss,
                            **{n: p.grad.clone() for n, p in module.named_parameters()}))
    padded, packed = results
    assert padded["dropped"] == packed["dropped"]
    return {k: rel_err(packed[k], padded[k]) for k in padded if k != "dropped"}


@pytest.mark.parametrize("backend,layout", [
    ("loop", "packed"),
    ("grouped_mm", "packed"),
    (None, "tight"),
])
@pytest.mark.parametrize("variant", EQUAL_VARIANTS,
                         ids=lambda v: ",".join(f"{k}={v[k]}" for k in v))
def test_pad_free_equals_padded(variant, backend, layout):
    groups = ted_groups(1, 1)
    x, probe = layer_input(0)
    errs = _compare(tiny_model_config(), moe_config(**variant), groups, x, probe, backend,
                    layout=layout)
    assert max(errs.values()) <= TOL, errs


@pytest.mark.parametrize("backend,layout", [
    ("loop", "packed"),
    ("grouped_mm", "packed"),
    (None, "tight"),
])
@pytest.mark.parametrize("swiglu,bias", [(True, False), (False, False), (True, True)])
def test_pad_free_equals_padded_swiglu_and_no_bias(backend, layout, swiglu, bias):
    x, probe = layer_input(1)
    errs = _compare(tiny_model_config(swiglu=swiglu, add_bias_linear=bias), moe_config(),
                    ted_groups(1, 1), x, probe, backend, layout=layout)
    assert max(errs.values()) <= TOL, errs


def test_tight_layout_only_where_counts_are_nearly_equal():
    from ted_patches.dispatcher import Dispatcher

    d = Dispatcher(ted_groups(1, 1), 4, 2, True)
    cpu = torch.device("cpu")
    assert d._tight(cpu, [100, 100, 99, 98])  # 400 rows for 397: within 5%
    assert not d._tight(cpu, [100, 50, 100, 100])  # 400 rows for 350
    assert not d._tight(cpu, [0, 0, 0, 0]) and not d._tight(torch.device("meta"), [10, 10, 10, 10])


@pytest.mark.parametrize("drop", [True, False])
def test_pad_free_equals_padded_when_every_token_picks_one_expert(drop):
    """Experts with zero tokens (empty groups in the grouped GEMM) and one over-full expert."""
    w = torch.randn(8, H, generator=torch.Generator().manual_seed(3)) * 0.3
    w[:, 0], w[0, 0] = 0.0, 1.0
    x, probe = layer_input(2)
    x[..., 0] = 15.0  # every token's first choice is expert 0
    for backend, layout in (("loop", "packed"), ("grouped_mm", "packed"), (None, "tight")):
        errs = _compare(tiny_model_config(), moe_config(topk=1, drop_tokens=drop), ted_groups(1, 1),
                        x, probe, backend, router_weight=w, layout=layout)
        assert max(errs.values()) <= TOL, (backend, layout, errs)


def layouts_case(tp: int, ep: int) -> dict:
    """Padding-free with each experts' layout forced, against the padded path, on this rank."""
    groups = ted_groups(tp, ep)
    x, probe = layer_input(groups.dp.rank)
    out = {}
    for layout in ("packed", "tight"):
        for dtd in (True, False):
            for drop in (True, False):
                cfg = moe_config(drop_tokens=drop, dtd=dtd)
                out[(layout, dtd, drop)] = max(_compare(tiny_model_config(), cfg, groups, x, probe,
                                                        layout=layout).values())
    return out


@pytest.mark.parametrize("tp,ep,dp", [(1, 2, 2), (2, 1, 1), (2, 2, 2)])
def test_pad_free_layouts_equal_padded_across_ranks(tp, ep, dp):
    """The layer-level layout tests (test_moe.py) take whichever layout the counts pick; here both
    are forced at layouts with all-to-alls, DTD slicing and the TP gather."""
    for rank, errs in enumerate(run(tp * dp, layouts_case, tp, ep)):
        bad = {k: v for k, v in errs.items() if v > TOL}
        assert not bad, f"rank {rank}: {bad}"


# every drop policy x k at every (TP, EP) in {1, 2}^2 (DTD on, as by default): the probs policy's
# dropped assignments carry no meaningful slot, which the padding-free plan must not read
POLICY_MATRIX = [(policy, k) for policy in DROP_POLICIES for k in (1, 2, 3)]


def policies_case(layouts) -> dict:
    """{(tp, ep, policy, k): the worst relative error of padding-free against padded} on this
    rank, for each (tp, ep) of `layouts` (several layouts share one world)."""
    out = {}
    for tp, ep in layouts:
        groups = ted_groups(tp, ep)
        x, probe = layer_input(groups.dp.rank)
        for policy, k in POLICY_MATRIX:
            cfg = moe_config(topk=k, drop_policy=policy)
            out[(tp, ep, policy, k)] = max(_compare(tiny_model_config(), cfg, groups, x,
                                                    probe).values())
    return out


@pytest.mark.parametrize("world,layouts", [(1, [(1, 1)]), (2, [(1, 2), (2, 1)]), (4, [(2, 2)])])
def test_pad_free_equals_padded_for_every_drop_policy_and_layout(world, layouts):
    for rank, errs in enumerate(run(world, policies_case, layouts)):
        assert len(errs) == len(layouts) * len(POLICY_MATRIX)
        bad = {k: v for k, v in errs.items() if v > TOL}
        assert not bad, f"rank {rank}: {bad}"
        print(f"rank {rank}: worst {max(errs.values()):.2e} over {len(errs)} cases")


def packed_sends_case(tp: int, ep: int) -> dict:
    """Padding-free, DTD on and off: the all-to-all bytes this rank sent and the kept
    assignments."""
    groups = ted_groups(tp, ep)
    out = {}
    for dtd in (True, False):
        for drop in (True, False):
            module = MoEOnly(tiny_model_config(),
                             moe_config(drop_tokens=drop, dtd=dtd, pad_free=True), groups)
            groups.ledger.reset()
            _, aux, _ = forward_backward(module, *layer_input(groups.dp.rank))
            out[(dtd, drop)] = (groups.ledger.nbytes("all_to_all", "ep"), int(aux.kept_count))
    return out


@pytest.mark.parametrize("tp,ep,dp", [(1, 2, 2), (2, 2, 2)])
def test_pad_free_sends_only_kept_tokens(tp, ep, dp):
    """Each kept assignment's row crosses the all-to-all four times per forward + backward
    (dispatch, combine, and their backwards), once per TP group with DTD, once per TP rank
    without."""
    ranks = run(tp * dp, packed_sends_case, tp, ep)
    for drop in (True, False):
        kept = sum(r[(True, drop)][1] for r in ranks)  # each TP group counted TP times
        on = sum(r[(True, drop)][0] for r in ranks)
        off = sum(r[(False, drop)][0] for r in ranks)
        assert off == 4 * kept * H * 4, (drop, off, kept)
        assert on * tp == off, (drop, on, off)


# ---- the variable-split all-to-all --------------------------------------------------------------
def a2a_var_case() -> dict:
    groups = ted_groups(1, 2)
    r = groups.ep.rank
    # rank 0 sends 2 rows to itself, none to rank 1; rank 1 sends 3 to 0, 1 to itself
    send = [[2, 0], [3, 1]][r]
    recv = [[2, 3], [0, 1]][r]
    x = (torch.arange(sum(send) * 2, dtype=torch.float32).view(-1, 2)
         + 100 * r).requires_grad_(True)
    y = comm.all_to_all_var(x, groups.ep, send, recv, out_rows=6)
    (y * torch.arange(1, 7.0)[:, None]).sum().backward()
    return dict(y=y.detach(), grad=x.grad)


def test_variable_all_to_all_and_its_backward():
    r0, r1 = run(2, a2a_var_case)
    assert torch.equal(r0["y"], torch.tensor([[0, 1], [2, 3], [100, 101], [102, 103], [104, 105],
                                              [0, 0.0]]))
    assert torch.equal(r1["y"], torch.tensor([[106, 107.0]] + [[0, 0]] * 5))
    # gradient of y row i is (i + 1): it flows back to the row that was sent there
    assert torch.equal(r0["grad"], torch.tensor([[1, 1], [2, 2.0]]))
    assert torch.equal(r1["grad"], torch.tensor([[3, 3], [4, 4], [5, 5], [1, 1.0]]))


# ---- CAC replay checks ---------------------------------------------------------------------------
def stash_case() -> list[str]:
    groups = ted_groups(1, 2)
    stash = comm.CommStash()
    x = torch.ones(4, 3)
    with stash.active(replay=False):
        kept = comm.raw_all_to_all(x, groups.ep)
        comm.raw_all_gather(x, groups.ep)
    errors = []
    with stash.active(replay=True):  # the same calls: served from the stash
        assert comm.raw_all_to_all(x, groups.ep) is kept
        comm.raw_all_gather(x, groups.ep)
    cases = {
        "shape": lambda: comm.raw_all_to_all(torch.ones(6, 3), groups.ep),
        "dtype": lambda: comm.raw_all_to_all(x.double(), groups.ep),
        "kind": lambda: comm.raw_all_gather(x, groups.ep),
        "group": lambda: comm.raw_all_to_all(x, dataclasses.replace(groups.ep, name="tp")),
        "too many": lambda: [comm.raw_all_to_all(x, groups.ep), comm.raw_all_gather(x, groups.ep),
                             comm.raw_all_to_all(x, groups.ep)],
    }
    for name, call in cases.items():
        with stash.active(replay=True):
            try:
                call()
                errors.append(f"{name}: no error")
            except comm.CommStashMismatch as e:
                errors.append(f"{name}: {e}")
    return errors


def test_cac_replay_checks_kind_group_shape_and_dtype():
    for errors in run(2, stash_case):
        assert len(errors) == 5 and not any(e.endswith("no error") for e in errors), errors
        shape, dtype, kind, group, too_many = errors
        assert ("all_to_all over ep -> [6, 3] float32" in shape
                and "recorded all_to_all over ep -> [4, 3]" in shape)
        assert "float64" in dtype and "all_gather over ep" in kind and "over tp" in group
        assert "#2" in too_many and "recorded only 2" in too_many


# ---- --check-tp-routing --------------------------------------------------------------------------
def tp_routing_case(every: int, pad_free: bool) -> list:
    groups = ted_groups(2, 1)
    module = MoEOnly(tiny_model_config(), moe_config(check_tp_routing=every, pad_free=pad_free),
                     groups)
    x, probe = layer_input(0)
    forward_backward(module, x, probe)  # identical routing: passes
    if groups.tp.rank == 1:  # drift on one TP rank flips routing decisions
        with torch.no_grad():
            module.moe.router.weight.add_(torch.randn_like(module.moe.router.weight))
    outcomes = []
    for _ in range(2):
        try:
            forward_backward(module, x, probe)
            outcomes.append(None)
        except comm.ReplicaMismatch as e:
            outcomes.append(str(e))
    return outcomes


@pytest.mark.parametrize("pad_free", [False, True])
def test_check_tp_routing_stops_every_tp_rank_with_a_clear_error(pad_free):
    """The check runs right after routing, before any collective whose sizes the routing decides
    (the padding-free path's TP collectives would not even match in size)."""
    for outcomes in run(2, tp_routing_case, 1, pad_free):
        assert all(o is not None for o in outcomes), outcomes
        assert ("MoE routing" in outcomes[0] and "TP group [0, 1]" in outcomes[0]
                and "DTD" in outcomes[0])


def test_check_tp_routing_every_n_forwards():
    # every 2nd forward: the 2nd (unchecked, silently wrong on the padded path) passes, the 3rd
    # stops
    for outcomes in run(2, tp_routing_case, 2, False):
        assert outcomes[0] is None and outcomes[1] is not None, outcomes


# ---- the flags -----------------------------------------------------------------------------------
CLI = ("--num-layers 2 --hidden-size 64 --num-attention-heads 4 --seq-length 16 "
       "--micro-batch-size 2 --train-iters 2 --lr 1e-3 --mock-data --vocab-size 100 "
       "--num-experts 4").split()


@pytest.mark.parametrize("argv,want", [
    ([], dict(pad_free=None, check_tp_routing=0, drop_policy="position")),
    (["--moe-pad-free"], dict(pad_free=True)),
    (["--no-moe-pad-free"], dict(pad_free=False)),
    (["--check-tp-routing"], dict(check_tp_routing=1)),
    (["--check-tp-routing", "50"], dict(check_tp_routing=50)),
    (["--moe-token-drop-policy", "choice"], dict(drop_policy="choice")),
])
def test_flags_reach_the_moe_config(argv, want, monkeypatch):
    import pretrain_gpt_moe

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    cfg, _ = pretrain_gpt_moe.load_config(CLI + argv)
    assert {k: getattr(cfg.moe, k) for k in want} == want


def test_bad_check_tp_routing_is_a_clear_error(monkeypatch, capsys):
    import pretrain_gpt_moe

    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as exit_info:
        pretrain_gpt_moe.load_config(CLI + ["--check-tp-routing", "-1"])
    assert (exit_info.value.code == 2
            and "--check-tp-routing must be >= 0" in capsys.readouterr().err)
