"""MoE blocks of issue 20: shared experts, layer patterns, upcycling, per-layer statistics.

- Shared experts (gated and ungated) keep the layout property: every (TP, EP, DP) of world 2 and
  4 equals one process within 1e-5 in outputs and DP-reduced gradients; and at one process the
  shared expert adds exactly an independently written dense MLP (x sigmoid gate).
- --moe-layer-freq: Megatron-Core's own layer-spec parser (get_gpt_decoder_block_spec) decides
  which layers are MoE for the same value; hand-worked tables for the list form and
  --first-k-dense-replace; bad patterns name the flag.
- Upcycling: step-0 logits of the upcycled model equal the dense model's (one process and TP 2 x
  EP 2), the router equals a fresh model's drawn from the same seed, and it trains on.
- Per-layer statistics: the reduced numbers against a hand computation over the ranks.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch
import torch.nn.functional as F

from harness import run, ted_groups
from megatron.model.params import stored_tensors
from megatron.training.optimizer import Optimizer, OptimizerConfig
from ted_patches.build import build_model
from ted_patches.config import MoEConfig, moe_layer_indices, parse_layer_freq
from util import MoEOnly, assert_close_dicts, full_tensors, rel_err, tiny_model_config

MBS, SEQ, H, SHARED = 4, 16, 32, 48
LAYOUTS = [(2, 1, 1), (1, 2, 2), (2, 2, 2), (1, 4, 4), (2, 1, 2)]  # (TP, EP, DP), world 2 and 4
VARIANTS = [(gate, drop, swiglu) for gate in (False, True)
            for drop, swiglu in ((True, False), (False, True))]


def shared_moe(gate: bool, drop: bool, **kw) -> MoEConfig:
    base = dict(num_experts=8, layers=(1,), topk=2, min_capacity=4, drop_tokens=drop,
                aux_loss_coeff=0.1, z_loss_coeff=0.01, check_tp_routing=1,
                shared_expert_intermediate_size=SHARED, shared_expert_gate=gate)
    return MoEConfig(**{**base, **kw})


def layer_input(index: int):
    gen = torch.Generator().manual_seed(500 + index)
    return torch.randn(MBS, SEQ, H, generator=gen), torch.randn(MBS, SEQ, H, generator=gen)


def run_layer(groups, model_cfg, moe_cfg, microbatches) -> dict:
    module = MoEOnly(model_cfg, moe_cfg, groups)
    opt = Optimizer(module, groups, OptimizerConfig())
    opt.zero_grad()
    outs = {}
    for index in microbatches:
        x, probe = layer_input(index)
        y, aux = module.moe(x)
        ((y * probe).sum() + aux.loss).div(len(microbatches)).backward()
        outs[index] = y.detach()
    opt.reduce_gradients()
    return dict(outs=outs, grads=full_tensors(module, groups, grads=True))


def shared_case(tp: int, ep: int) -> dict:
    groups = ted_groups(tp, ep)
    results = {}
    for gate, drop, swiglu in VARIANTS:
        res = run_layer(groups, tiny_model_config(swiglu=swiglu), shared_moe(gate, drop),
                        [groups.dp.rank])
        if torch.distributed.get_rank() != 0:
            res.pop("grads")
        results[(gate, drop, swiglu)] = res
    return results


@functools.cache
def shared_reference(dp: int) -> dict:
    groups = ted_groups(1, 1)
    return {(g, d, s): run_layer(groups, tiny_model_config(swiglu=s), shared_moe(g, d),
                                 list(range(dp)))
            for g, d, s in VARIANTS}


@pytest.mark.parametrize("tp,ep,dp", LAYOUTS)
def test_shared_expert_layouts_equal_one_process(tp, ep, dp):
    ranks = run(tp * dp, shared_case, tp, ep)
    ref = shared_reference(dp)
    for variant, res in ranks[0].items():
        want = ref[variant]
        for rank_result in ranks:
            for index, y in rank_result[variant]["outs"].items():
                assert rel_err(y, want["outs"][index]) <= 1e-5, f"{variant}: output {index}"
        assert any("shared_expert" in k for k in res["grads"])
        assert_close_dicts(res["grads"], want["grads"], 1e-5, f"{variant} grad")


def _reference_shared(mlp, x: torch.Tensor, swiglu: bool, gate) -> torch.Tensor:
    """The shared expert written out: W2 act(W1 x + b1) + b2, times sigmoid(g . x)."""
    h = x @ mlp.fc1.weight.t() + mlp.fc1.bias
    if swiglu:
        a, b = h.chunk(2, dim=-1)
        h = F.silu(a) * b
    else:
        h = F.gelu(h)
    y = h @ mlp.fc2.weight.t() + mlp.fc2.bias
    return y if gate is None else y * torch.sigmoid(x @ gate.t())


@pytest.mark.parametrize("gate,drop,swiglu", VARIANTS)
def test_shared_expert_adds_a_dense_mlp(gate, drop, swiglu):
    """At one process: the layer with a shared expert minus the same layer without one (the
    routed parameters are drawn alike: init is seeded by name) is the written-out MLP."""
    groups = ted_groups(1, 1)
    cfg = tiny_model_config(swiglu=swiglu)
    with_shared = MoEOnly(cfg, shared_moe(gate, drop), groups)
    without = MoEOnly(cfg, shared_moe(False, drop, shared_expert_intermediate_size=None), groups)
    for name, p in without.named_parameters():
        assert torch.equal(p, dict(with_shared.named_parameters())[name]), name
    x, _ = layer_input(0)
    with torch.no_grad():
        extra = with_shared.moe(x)[0] - without.moe(x)[0]
        se = with_shared.moe.shared_expert
        want = _reference_shared(se, x, swiglu, se.gate.weight if gate else None)
    assert se.fc1.weight.shape[0] == SHARED * (2 if swiglu else 1)
    assert rel_err(extra, want) <= 1e-5


def test_shared_expert_flags_and_errors():
    from megatron.cli.arguments import parse_args
    from megatron.cli.configs import build_config

    base = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "16", "--micro-batch-size", "1", "--lr", "1e-3", "--mock-data",
            "--train-iters", "1",
            "--vocab-size", "95", "--num-experts", "4"]
    args = parse_args(base + ["--moe-shared-expert-intermediate-size", "48",
                              "--moe-shared-expert-gate", "--moe-shared-expert-overlap"])
    moe = build_config(args, 1, 96).moe
    assert (moe.shared_expert_intermediate_size, moe.shared_expert_gate,
            moe.shared_expert_overlap) == (48, True, True)
    from megatron.cli.arguments import ConfigError

    with pytest.raises(ConfigError, match="--moe-shared-expert-gate needs "
                                          "--moe-shared-expert-intermediate-size"):
        build_config(parse_args(base + ["--moe-shared-expert-gate"]), 1, 96)
    with pytest.raises(ConfigError, match="--moe-shared-expert-intermediate-size must be >= 1"):
        build_config(parse_args(base + ["--moe-shared-expert-intermediate-size", "0"]), 1, 96)
    # split over TP like the dense MLP: 2 TP ranks need an even width
    with pytest.raises(ConfigError, match="--moe-shared-expert-intermediate-size"):
        build_config(parse_args(base + ["--moe-shared-expert-intermediate-size", "47",
                                        "--tensor-model-parallel-size", "2"]), 2, 96)


# ---- layer patterns -----------------------------------------------------------------------------
PATTERNS = {  # --moe-layer-freq value, num layers -> MoE layers (hand-worked)
    ("([0]*1+[1]*3)*2", 8): (1, 2, 3, 5, 6, 7),
    ("[0]*1+[1]*3", 4): (1, 2, 3),
    ("([1]*3+[0]*1)*3", 12): (0, 1, 2, 4, 5, 6, 8, 9, 10),
    ("'([1]*4)'", 4): (0, 1, 2, 3),  # quoted as some scripts pass it
    ("2", 6): (0, 2, 4),
    ("3", 7): (0, 3, 6),
    ("1", 3): (0, 1, 2),
}


@pytest.mark.parametrize("text,layers", list(PATTERNS))
def test_layer_freq_matches_hand_tables_and_megatron_core(text, layers):
    value = parse_layer_freq(text)
    assert moe_layer_indices(layers, layer_freq=value) == PATTERNS[(text, layers)]
    assert moe_layer_indices(layers, layer_freq=value) == _megatron_core_moe_layers(value, layers)


def _megatron_core_moe_layers(freq, num_layers: int) -> tuple[int, ...]:
    """Which layers megatron-core 0.16.1's decoder block spec makes MoE for this moe_layer_freq
    (the oracle: its own parser)."""
    from megatron.core.models.gpt import gpt_layer_specs
    from megatron.core.transformer.transformer_config import TransformerConfig

    cfg = TransformerConfig(num_layers=num_layers, hidden_size=32, num_attention_heads=4,
                            num_moe_experts=4, moe_layer_freq=list(freq)
                            if isinstance(freq, tuple) else freq, use_cpu_initialization=True,
                            add_bias_linear=False)
    spec = gpt_layer_specs.get_gpt_decoder_block_spec(cfg, use_transformer_engine=False)
    return tuple(i for i, layer in enumerate(spec.layer_specs)
                 if "MoELayer" in getattr(layer.submodules.mlp.module, "__name__", ""))


def test_first_k_dense_and_pattern_errors():
    assert moe_layer_indices(6, layer_freq=1, first_k_dense=2) == (2, 3, 4, 5)
    assert moe_layer_indices(6, expert_interval=2, first_k_dense=3) == (3, 5)
    from megatron.parallel.fields import FieldError

    with pytest.raises(FieldError, match="gives 4 layers"):
        moe_layer_indices(6, layer_freq=(0, 1, 1, 1))
    for bad, message in (("[2]*3", "each layer is 0"), ("0", ">= 1"),
                         ("__import__('os')", "neither an integer"), ("[1]*[2]", "not a list")):
        with pytest.raises(ValueError, match=message):
            parse_layer_freq(bad)


@pytest.mark.parametrize("flags,expected", [
    (["--moe-layer-freq", "([0]*1+[1]*3)*2"], "--moe-layer-freq gives 8 layers, --num-layers is 4"),
    (["--moe-layer-freq", "[1]*4", "--first-k-dense-replace", "5"],
     "--first-k-dense-replace must be in [0, --num-layers 4]"),
    (["--moe-layer-freq", "[0]*4"], "no layer of --num-layers 4 gets an MoE block"),
    (["--moe-layer-freq", "[1]*2+[2]*2"], "argument --moe-layer-freq"),
])
def test_layer_pattern_cli_errors_name_the_flag(flags, expected, capsys):
    from megatron.cli.arguments import ConfigError, parse_args
    from megatron.cli.configs import build_config

    argv = ["--num-layers", "4", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "16", "--micro-batch-size", "1", "--lr", "1e-3", "--mock-data",
            "--train-iters", "1",
            "--vocab-size", "95", "--num-experts", "4"] + flags
    try:
        build_config(parse_args(argv), 1, 96)
        message = None
    except ConfigError as e:
        message = str(e)
    except SystemExit:
        message = capsys.readouterr().err
    assert message is not None and expected in message, message


def test_layer_pattern_builds_those_layers():
    from megatron.cli.arguments import parse_args
    from megatron.cli.configs import build_config
    from ted_patches.moe_layer import MoELayer

    argv = ["--num-layers", "8", "--hidden-size", "32", "--num-attention-heads", "4",
            "--seq-length", "16", "--micro-batch-size", "1", "--lr", "1e-3", "--mock-data",
            "--train-iters", "1",
            "--vocab-size", "95", "--num-experts", "4", "--moe-layer-freq", "([0]*1+[1]*3)*2",
            "--first-k-dense-replace", "2"]
    cfg = build_config(parse_args(argv), 1, 96)
    assert cfg.moe.layers == (2, 3, 5, 6, 7)
    model = build_model(cfg.model, cfg.moe, ted_groups(1, 1), seed=1)
    assert [isinstance(layer.mlp, MoELayer) for layer in model.layers] == [
        i in (2, 3, 5, 6, 7) for i in range(8)]


# ---- upcycling ----------------------------------------------------------------------------------
ROPE = dict(swiglu=True, normalization="RMSNorm", position_embedding_type="rope",
            add_bias_linear=False)


def upcycle_moe(**kw) -> MoEConfig:
    return MoEConfig(**{"num_experts": 4, "layers": (0, 1), "topk": 2, "drop_tokens": False,
                        "gate_normalization": "topk", "use_upcycling": True, **kw})


def write_dense(path: str, model_kw: dict, seed: int = 5) -> tuple:
    """A trained-looking dense checkpoint (norms and biases perturbed) and its model."""
    from megatron.checkpoint import config_dict, write_model_checkpoint

    cfg = tiny_model_config(init_method_std=0.1, **model_kw)
    dense = build_model(cfg, None, ted_groups(1, 1), seed=seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in dense.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    meta = {"model": config_dict(cfg), "moe": None, "iteration": 7,
            "tokenizer": {"tokenizer_type": "NullTokenizer", "vocab_size": cfg.vocab_size - 1}}
    write_model_checkpoint(path, stored_tensors(dense, ted_groups(1, 1)), meta)
    return cfg, dense.eval()


def tokens_for(cfg, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (2, SEQ), generator=gen)
    return tokens, torch.arange(SEQ).expand_as(tokens)


def upcycled_case(path: str, model_kw: dict, tp: int, ep: int, seed: int) -> dict:
    """Every rank: the upcycled model's full logits and its router weights."""
    from megatron.checkpoint.upcycle import check_upcycling, upcycle

    groups = ted_groups(tp, ep)
    cfg = tiny_model_config(init_method_std=0.1, **model_kw)
    moe = upcycle_moe()
    model = build_model(cfg, moe, groups, seed=seed)
    kept = upcycle(model, moe, check_upcycling(cfg, moe, path, None), groups)
    tokens, positions = tokens_for(cfg)
    with torch.no_grad():
        logits = model.eval()(tokens, positions)
    pieces = [torch.empty_like(logits) for _ in range(groups.tp.size)]
    torch.distributed.all_gather(pieces, logits.contiguous(), group=groups.tp.pg)
    return dict(logits=torch.cat(pieces, dim=-1)[..., :cfg.vocab_size], kept=kept,
                routers={n: p.detach().clone() for n, p in model.named_parameters()
                         if "router" in n})


@pytest.mark.parametrize("model_kw", [ROPE, {}], ids=["swiglu-nobias", "gelu-bias"])
def test_upcycled_logits_equal_the_dense_model(model_kw, tmp_path):
    path = str(tmp_path / "dense")
    cfg, dense = write_dense(path, model_kw)
    tokens, positions = tokens_for(cfg)
    with torch.no_grad():
        want = dense(tokens, positions)[..., :cfg.vocab_size]
    got = upcycled_case(path, model_kw, 1, 1, seed=11)
    assert got["kept"] == 2  # the two routers, from the seed
    diff = (got["logits"] - want).abs().max().item()
    assert want.abs().max() > 0.5 and diff <= 1e-5, diff
    fresh = build_model(cfg, upcycle_moe(), ted_groups(1, 1), seed=11)
    for name, p in fresh.named_parameters():
        if "router" in name:
            assert torch.equal(got["routers"][name], p), f"{name} is not the seed's"
    other = build_model(cfg, upcycle_moe(), ted_groups(1, 1), seed=12)
    assert not torch.equal(other.layers[0].mlp.router.weight, fresh.layers[0].mlp.router.weight)


def test_upcycled_logits_equal_dense_at_tp2_ep2(tmp_path):
    path = str(tmp_path / "dense")
    cfg, dense = write_dense(path, ROPE)
    tokens, positions = tokens_for(cfg)
    with torch.no_grad():
        want = dense(tokens, positions)[..., :cfg.vocab_size]
    ranks = run(4, upcycled_case, path, ROPE, 2, 2, 11)
    for r in ranks:
        assert (r["logits"] - want).abs().max().item() <= 1e-5


def test_upcycled_model_trains_on(tmp_path):
    """A few optimizer steps: the loss falls and the experts of a layer move apart (the router
    sends them different tokens)."""
    from megatron.checkpoint.upcycle import check_upcycling, upcycle
    from megatron.training.forward_backward import train_step
    from util import synthetic_microbatch

    path = str(tmp_path / "dense")
    cfg, _ = write_dense(path, ROPE)
    groups = ted_groups(1, 1)
    moe = upcycle_moe()
    model = build_model(cfg, moe, groups, seed=11)
    upcycle(model, moe, check_upcycling(cfg, moe, path, None), groups)
    opt = Optimizer(model, groups, OptimizerConfig(lr=3e-3))
    batch = [synthetic_microbatch(0, 4, SEQ, cfg.vocab_size)]
    losses = [train_step(model, opt, batch, groups).lm_loss for _ in range(6)]
    assert losses[-1] < losses[0] - 0.05, losses
    w1 = model.layers[0].mlp.experts.w1.detach()
    assert not torch.equal(w1[0], w1[1])


def test_upcycling_refuses_what_cannot_start_as_the_dense_model(tmp_path):
    from megatron.checkpoint import CheckpointError
    from megatron.checkpoint.upcycle import check_upcycling

    path = str(tmp_path / "dense")
    cfg, _ = write_dense(path, ROPE)
    cases = [
        (upcycle_moe(), None, "needs --load"),
        (upcycle_moe(shared_expert_intermediate_size=16), path, "no shared expert"),
        (upcycle_moe(expert_ffn_hidden_size=32), path, "granularity 1"),
        (upcycle_moe(gate_normalization="none"), path, "do not sum to 1"),
        (upcycle_moe(), str(tmp_path / "nothing"), "no checkpoint in --load"),
    ]
    for moe, load, message in cases:
        with pytest.raises(CheckpointError, match=message):
            check_upcycling(cfg, moe, load, None)
    with pytest.raises(CheckpointError, match="already holds a checkpoint"):
        check_upcycling(cfg, upcycle_moe(), path, path)
    with pytest.raises(CheckpointError, match="num_layers"):
        check_upcycling(tiny_model_config(init_method_std=0.1, **ROPE, num_layers=3),
                        upcycle_moe(), path, None)
    os.makedirs(tmp_path / "moe")
    from megatron.checkpoint import config_dict, write_model_checkpoint

    moe_model = build_model(cfg, upcycle_moe(), ted_groups(1, 1), seed=1)
    write_model_checkpoint(str(tmp_path / "moe"), stored_tensors(moe_model, ted_groups(1, 1)),
                           {"model": config_dict(cfg), "moe": config_dict(upcycle_moe()),
                            "tokenizer": {"tokenizer_type": "NullTokenizer", "vocab_size": 95}})
    with pytest.raises(CheckpointError, match="holds an MoE model"):
        check_upcycling(cfg, upcycle_moe(), str(tmp_path / "moe"), None)


# ---- planner and FLOPs --------------------------------------------------------------------------
PLAN_ARGV = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
             "--ffn-hidden-size", "64", "--seq-length", "16", "--micro-batch-size", "2",
             "--lr", "1e-3", "--mock-data", "--train-iters", "1", "--vocab-size", "95",
             "--num-experts", "4", "--moe-layer-freq", "1", "--swiglu",
             "--moe-shared-expert-intermediate-size", "48", "--moe-shared-expert-gate"]


def _plan_config(tp: int, world: int):
    from megatron.cli.arguments import parse_args
    from megatron.cli.configs import build_config

    return build_config(parse_args(PLAN_ARGV + ["--tensor-model-parallel-size", str(tp),
                                                "--global-batch-size", str(2 * world // tp)]),
                        world, 96)


def local_parameters(tp: int) -> list:
    cfg = _plan_config(tp, torch.distributed.get_world_size())
    model = build_model(cfg.model, cfg.moe, ted_groups(tp, 1), seed=1)
    return [(n, p.numel()) for n, p in model.named_parameters()]


@pytest.mark.parametrize("tp", [1, 2])
def test_planner_parameters_equal_the_real_model_with_shared_experts(tp):
    from megatron import plan as planner

    cfg = _plan_config(tp, 2)
    table = [(p.name, p.numel) for p in planner.param_table(cfg)]
    assert any("shared_expert.gate" in n for n, _ in table)
    for rank in run(2, local_parameters, tp):
        assert rank == table


def test_flops_count_the_shared_expert_once_per_token():
    """The log's model FLOPs grow by 3 x (the shared expert's forward FLOPs, as torch's FLOP
    counter measures them) per token and MoE layer."""
    import dataclasses

    from torch.utils.flop_counter import FlopCounterMode

    from megatron.training.log import flops_per_iteration
    from ted_patches.shared_expert import SharedExpert

    cfg = _plan_config(1, 1)
    without = dataclasses.replace(cfg, moe=dataclasses.replace(
        cfg.moe, shared_expert_intermediate_size=None, shared_expert_gate=False))
    tokens = cfg.train.global_batch_size * cfg.train.seq_length
    per_token = ((flops_per_iteration(cfg) - flops_per_iteration(without))
                 / (3 * tokens * len(cfg.moe.layers)))
    module = SharedExpert(cfg.model, 48, True, ted_groups(1, 1))
    with FlopCounterMode(display=False) as counter:
        module(torch.randn(10, 32))
    assert per_token == counter.get_total_flops() / 10


# ---- per-layer statistics -----------------------------------------------------------------------
def layer_stats_case(steps: int = 2) -> tuple:
    """Every rank of a DP world: a GPT-MoE's train steps with --moe-per-layer-logging; the
    reduced per-layer statistics and this rank's raw MoEAux values."""
    from megatron.training.forward_backward import train_step
    from util import my_microbatches

    groups = ted_groups(1, 1)
    cfg = tiny_model_config()
    moe = MoEConfig(num_experts=4, layers=(0, 1), topk=2, capacity_factor=0.5,
                    z_loss_coeff=0.01, per_layer_logging=True)
    model = build_model(cfg, moe, groups, seed=3)
    opt = Optimizer(model, groups, OptimizerConfig(lr=1e-3))
    mbs = my_microbatches(0, groups, 4, mbs=2, seq=SEQ, vocab=cfg.vocab_size)
    raw = []
    with torch.no_grad():  # the same micro-batches, before the step changes the weights
        for mb in mbs:
            raw += [(a.layer, a.aux_loss.item(), a.z_loss.item(), a.kept_count.item(),
                     a.num_assignments, a.counts_E.clone()) for a in model(**mb).aux]
    metrics = train_step(model, opt, mbs, groups)
    return metrics.moe_layers, raw


def test_per_layer_statistics_reduce_over_data_parallel_ranks():
    ranks = run(2, layer_stats_case)
    raw = [r for _, mine in ranks for r in mine]
    for layer in (0, 1):
        rows = [r for r in raw if r[0] == layer]
        counts = sum(r[5] for r in rows).double()
        want = {"aux loss": sum(r[1] for r in rows) / len(rows),
                "z loss": sum(r[2] for r in rows) / len(rows),
                "dropped": 1 - sum(r[3] for r in rows) / sum(r[4] for r in rows),
                "load max": (counts.max() / counts.mean()).item(),
                "load min": (counts.min() / counts.mean()).item()}
        for got, _ in ranks:
            for k, v in want.items():
                assert abs(got[layer][k] - v) <= 1e-6 * max(1.0, abs(v)), (layer, k)
        assert want["dropped"] > 0 and want["load max"] > 1.0


def test_per_layer_statistics_in_the_log_line_and_tensorboard():
    from megatron.training.moe_stats import LayerLog, scalars

    log = LayerLog()
    for aux in (1.0, 3.0):
        log.add({1: {"aux loss": aux, "z loss": 0.5, "dropped": 0.25, "load max": 1.5,
                     "load min": 0.5}})
    assert log.line() == (" moe layer 1: aux loss 2.0000E+00 z loss 5.0000E-01 dropped 25.00% "
                          "load max 1.50 min 0.50 |")
    assert log.line() == ""
    tags = dict(scalars({3: {"aux loss": 1.0, "z loss": 2.0, "dropped": 0.0, "load max": 1.0,
                             "load min": 1.0}}))
    assert tags["moe/aux_loss_layer_3"] == 1.0 and tags["moe/load_max_layer_3"] == 1.0
    assert len(tags) == 5


def pipeline_layer_stats_case(pp: int) -> dict:
    """A GPT-MoE with an MoE layer on each of `pp` stages, one train step with
    --moe-per-layer-logging: the reduced per-layer statistics this rank holds."""
    from megatron.parallel.stages import StagePlan
    from megatron.training.forward_backward import train_step
    from megatron.training.pipeline import Pipeline
    from util import my_microbatches

    groups = ted_groups(1, 1, pp)
    cfg = tiny_model_config()
    moe = MoEConfig(num_experts=4, layers=(0, 1), topk=2, capacity_factor=0.5,
                    z_loss_coeff=0.01, per_layer_logging=True)
    plan = StagePlan(2, pp, 1, None, None, "1f1b") if pp > 1 else None
    model = build_model(cfg, moe, groups, seed=3, stages=plan)
    opt = Optimizer(model, groups, OptimizerConfig(lr=1e-3))
    pipe = (Pipeline(model, plan, groups, 4, 2, SEQ, torch.device("cpu")) if pp > 1 else None)
    mbs = my_microbatches(0, groups, 4, mbs=2, seq=SEQ, vocab=cfg.vocab_size)
    return train_step(model, opt, mbs, groups, pipe).moe_layers


def test_per_layer_statistics_reach_every_rank_under_a_pipeline():
    """Each stage measures its own MoE layer; every rank logs both, as one process does."""
    want = pipeline_layer_stats_case(1)
    assert sorted(want) == [0, 1]
    for got in run(2, pipeline_layer_stats_case, 2):
        assert sorted(got) == [0, 1]
        for layer in (0, 1):
            for k, v in want[layer].items():
                assert abs(got[layer][k] - v) <= 1e-6 * max(1.0, abs(v)), (layer, k, got, want)
