"""A tensor-parallel, data-parallel GPT equals one process (tier 2: multi-process gloo).

For TP in {1, 2, 4} x DP in {1, 2}: the same global batch (2 micro-batches), the loss, every
gathered gradient, the clipped global grad norm, and the parameters after 3 AdamW steps equal a
single-process run with gradient accumulation, within 1e-5 relative; initial parameters are
bitwise equal.
"""

import functools

import pytest
import torch

from harness import run, ted_groups
from megatron.training.optimizer import Optimizer, OptimizerConfig
from ted_patches.build import build_model
from megatron.training.forward_backward import train_step
from util import (PARAM_FLOOR, assert_close_dicts, full_tensors, my_microbatches, rel_err,
                  tiny_model_config)

SEQ, MBS, MICRO = 16, 2, 2
VARIANTS = {
    "gelu-learned-tied": dict(),
    "swiglu-rope-rms-untied-nobias": dict(swiglu=True, position_embedding_type="rope",
                                          normalization="RMSNorm",
                                          untie_embeddings_and_output_weights=True,
                                          add_bias_linear=False),
    # Mixtral's attention: 8 query heads in 4 key/value groups (grouped-query attention)
    "gqa-swiglu-rope-rms": dict(num_attention_heads=8, num_query_groups=4, swiglu=True,
                                position_embedding_type="rope", normalization="RMSNorm",
                                untie_embeddings_and_output_weights=True, add_bias_linear=False),
}


model_config = tiny_model_config


def train_case(tp: int, variant: str, steps: int = 3) -> dict | None:
    groups = ted_groups(tp=tp, ep=1)
    cfg = model_config(**VARIANTS[variant])
    model = build_model(cfg, None, groups, seed=1234)
    # Adam moves an element by ~lr * g / (|g| + eps) whatever its scale, so a gradient that is zero
    # in exact arithmetic (the key bias: softmax ignores a per-query constant) turns its ~1e-11
    # rounding noise, which differs between layouts, into updates of lr * 1e-11 / eps. eps = 1e-6
    # keeps that below the 1e-5 comparison; with eps = 1e-8 the key bias alone differs by 2e-5.
    # clip_grad is below the norm, so clipping is active and checked too.
    opt = Optimizer(model, groups, OptimizerConfig(lr=1e-3, adam_eps=1e-6, weight_decay=0.1,
                                                   clip_grad=0.05))
    out = {"init": full_tensors(model, groups), "loss": [], "norm": []}
    data = dict(mbs=MBS, seq=SEQ, vocab=cfg.vocab_size)
    for step in range(steps):
        mbs = my_microbatches(step, groups, MICRO, **data)
        if step == 0:  # the gradients of step 0, reduced over DP, before the update
            from megatron.training.forward_backward import forward_backward

            opt.zero_grad()
            forward_backward(model, mbs, 1.0)
            opt.reduce_gradients()
            out["grads"] = full_tensors(model, groups, grads=True)
        metrics = train_step(model, opt, mbs, groups)
        out["loss"].append(metrics.lm_loss)
        out["norm"].append(metrics.grad_norm)
    out["final"] = full_tensors(model, groups)
    return out if torch.distributed.get_rank() == 0 else None


@functools.cache
def reference(variant: str) -> dict:
    return train_case(1, variant)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("tp,dp", [(2, 1), (4, 1), (1, 2), (2, 2), (4, 2)])
def test_layout_equals_single_process(tp, dp, variant):
    ref = reference(variant)
    got = run(tp * dp, train_case, tp, variant)[0]
    for name in ref["init"]:  # layout-independent init: bitwise
        assert torch.equal(got["init"][name], ref["init"][name]), f"init of {name} differs"
    for a, b in zip(got["loss"], ref["loss"]):
        assert abs(a - b) <= 1e-5 * abs(b), f"loss {a} != {b}"
    for a, b in zip(got["norm"], ref["norm"]):
        assert abs(a - b) <= 1e-5 * abs(b), f"grad norm {a} != {b}"
    assert_close_dicts(got["grads"], ref["grads"], 1e-5, "grad")
    assert_close_dicts(got["final"], ref["final"], 1e-5, "param after 3 steps", PARAM_FLOOR)


def test_reference_clips_and_moves_every_weight():
    ref = reference("gelu-learned-tied")
    assert all(n > 0.05 for n in ref["norm"])  # clip_grad 0.05 was active on every step
    # the steps moved every weight matrix by far more than the comparison tolerance
    for name, w in ref["final"].items():
        if name.endswith("weight"):
            assert rel_err(w, ref["init"][name]) > 1e-3, name
