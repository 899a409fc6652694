"""The seams the next features plug into, each used once here as a feature would use it:
a gate chosen by config, the hook after the optimizer step with the step's per-expert counts,
state buffers that checkpoints save and reshard, and errors that name config fields."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from harness import run, ted_groups
from megatron.model.params import set_buffer_spec, stored_tensors
from megatron.parallel.fields import FieldError
from megatron.training.optimizer import Optimizer, OptimizerConfig
from ted_patches.build import build_model
from ted_patches.config import MoEConfig
from ted_patches.gates import Gate, build_gate
from ted_patches.gates.softmax import SoftmaxGate
from ted_patches.moe_layer import MoELayer
from util import my_microbatches, tiny_model_config

MOE = dict(num_experts=4, layers=(0, 1), topk=2, drop_tokens=False, aux_loss_coeff=0.01)


# ---- gates ---------------------------------------------------------------------------------------
def test_the_gate_is_chosen_by_config_and_an_unknown_one_names_the_field():
    groups = ted_groups(1, 1)
    assert type(build_gate(MoEConfig(**MOE), groups)) is SoftmaxGate
    bad = dataclasses.replace(MoEConfig(**MOE))
    object.__setattr__(bad, "score_function", "relu")  # past MoEConfig's own check
    with pytest.raises(FieldError) as err:
        build_gate(bad, groups)
    assert str(err.value).startswith("score_function 'relu': use one of")
    with pytest.raises(FieldError, match="score_function 'relu'"):
        MoEConfig(**{**MOE, "score_function": "relu"})


class RecordingGate(SoftmaxGate):
    """The softmax gate, also keeping what the after-step hook hands it (a gate with a learned
    selection bias would update the bias there)."""

    def __init__(self, cfg, groups, optimizer_steps):
        super().__init__(cfg, groups)
        self.received, self.optimizer_steps = [], optimizer_steps

    def after_step(self, counts_E, skipped):
        self.received.append((counts_E.clone(), skipped, self.optimizer_steps()))


def test_after_the_optimizer_step_each_gate_gets_its_counts_over_the_whole_step():
    from megatron.training.forward_backward import train_step

    groups = ted_groups(1, 1)
    model = build_model(tiny_model_config(), MoEConfig(**MOE), groups, seed=5)
    opt = Optimizer(model, groups, OptimizerConfig(lr=1e-3))
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    for layer in layers:
        layer.router.gate = RecordingGate(layer.cfg, groups, lambda: opt.step_count)
    for step in range(2):
        micro = my_microbatches(step, groups, 3, mbs=2, seq=16, vocab=96)
        with torch.no_grad():  # the same routing the step will see (no dropout, no jitter)
            want = [sum(aux.counts_E for aux in model(**mb).aux[i:i + 1])
                    for i in range(2) for mb in micro]
        want = [sum(want[i * 3:(i + 1) * 3]) for i in range(2)]
        train_step(model, opt, micro, groups)
        for layer, counts in zip(layers, want):
            got, skipped, steps_then = layer.router.gate.received[-1]
            assert torch.equal(got, counts) and not skipped and steps_then == step + 1
            # every assignment of every micro-batch
            assert int(got.sum()) == 3 * 2 * 16 * MOE["topk"]
    assert all(len(layer.router.gate.received) == 2 for layer in layers)


# ---- state buffers in checkpoints ----------------------------------------------------------------
def with_state_buffers(model, groups) -> None:
    """Per router: a replicated [E] buffer; per expert group: an expert-split [E_local] buffer.
    Values are functions of the global expert id, so every layout holds the same model state."""
    for m in model.modules():
        if isinstance(m, MoELayer):
            E, local = m.cfg.num_experts, m.cfg.num_experts // groups.ep.size
            m.router.register_buffer("bias", torch.zeros(E))
            set_buffer_spec(m.router, "bias")
            m.experts.register_buffer("load", torch.zeros(local))
            set_buffer_spec(m.experts, "load", expert=True)


def fill(model, groups, scale: float) -> None:
    for name, buf in model.named_buffers():
        if name.endswith("router.bias"):
            buf.copy_(torch.arange(buf.numel()) * scale)
        elif name.endswith("experts.load"):
            buf.copy_((groups.ep.rank * buf.numel() + torch.arange(buf.numel())) * -scale)


def save_or_load_case(path: str, tp: int, ep: int, save: bool) -> dict:
    from megatron.checkpoint import Checkpointer, CheckpointConfig, config_dict
    from megatron.training.lr_schedule import ScheduleConfig, build_scheduler

    groups = ted_groups(tp, ep)
    mcfg = tiny_model_config()
    moe = MoEConfig(**MOE)
    model = build_model(mcfg, moe, groups, seed=5)
    with_state_buffers(model, groups)
    opt = Optimizer(model, groups, OptimizerConfig(lr=1e-3))
    sched = build_scheduler(opt, ScheduleConfig("samples", 8, 0, 80, 10), 1e-3, 0.0, 0.0)
    ck = Checkpointer(CheckpointConfig(save=path if save else None,
                                       load=None if save else path), groups)
    if save:
        fill(model, groups, 0.5)
        ck.save(3, {"model": config_dict(mcfg), "moe": config_dict(moe), "consumed_samples": 24},
                model, opt, sched)
    else:
        ck.load(model, opt, sched, lambda *_: None)
    return {name: buf.clone() for name, buf in model.named_buffers()} | {"ep_rank": groups.ep.rank}


def test_state_buffers_are_saved_resharded_and_loaded(tmp_path):
    """Saved at EP = 2 (each rank holding half of each expert-split buffer), loaded in one process
    and at TP = 2: every layout holds the saved values; stored as the one-process tensors."""
    import megatron.checkpoint as ckpt

    path = str(tmp_path / "ck")
    run(2, save_or_load_case, path, 1, 2, True)
    stored = ckpt.read_stored_tensors(path)
    assert torch.equal(stored["layers.1.mlp.router.bias"], torch.arange(4) * 0.5)
    assert ([stored[f"layers.0.mlp.experts.{e}.load"].item() for e in range(4)]
            == [0.0, -0.5, -1.0, -1.5])
    one = save_or_load_case(path, 1, 1, False)
    groups = ted_groups(1, 1)
    model = build_model(tiny_model_config(), MoEConfig(**MOE), groups, seed=5)
    with_state_buffers(model, groups)
    fill(model, groups, 0.5)
    want = {name: buf for name, buf in model.named_buffers()}
    assert one.pop("ep_rank") == 0 and one.keys() == want.keys()
    assert all(torch.equal(one[k], want[k]) for k in want)
    assert set(stored_tensors(model, groups)) >= {"layers.0.mlp.router.bias",
                                                  "layers.0.mlp.experts.3.load"}
    for out in run(2, save_or_load_case, path, 2, 1, False):
        out.pop("ep_rank")
        assert all(torch.equal(out[k], want[k]) for k in want)


# ---- errors name fields --------------------------------------------------------------------------
def test_library_errors_name_fields_and_the_command_line_shows_flags():
    from megatron.cli.configs import flag_names

    with pytest.raises(FieldError) as err:
        MoEConfig(**{**MOE, "topk": 5})
    assert str(err.value) == "topk 5 must be between 1 and num_experts 4"
    assert err.value.render(flag_names(err.value.owner)) == \
        "--moe-router-topk 5 must be between 1 and --num-experts 4"
    with pytest.raises(FieldError) as err:
        tiny_model_config(hidden_size=30)
    assert ("--" not in str(err.value)
            and "hidden_size 30 is not divisible by num_attention_heads 4" in str(err.value))


def test_a_gate_plugged_in_by_subclassing_routes_like_the_interface_says():
    """A minimal gate written against the interface alone (uniform scores: the first K experts)."""

    class FirstK(Gate):
        def scores(self, logits_TE):
            return torch.full_like(logits_TE, 1.0 / logits_TE.shape[1])

        def choose(self, logits_TE, scores_TE, k):
            return torch.arange(k).expand(logits_TE.shape[0], k)

        def normalize(self, score_A, keep_A, T, K):
            return score_A * keep_A * K

        def losses(self, logits_TE, scores_TE, idx_TK, first_E, counts_E):
            zero = logits_TE.new_zeros(())
            return zero, zero

    groups = ted_groups(1, 1)
    layer = MoELayer(tiny_model_config(), MoEConfig(**MOE), groups)
    layer.router.gate = FirstK(layer.cfg, groups)
    routing = layer.router(torch.randn(10, 32))
    assert (routing.counts_E.tolist() == [10, 10, 0, 0]
            and torch.equal(routing.weight_A, torch.full((20,), 0.5)))
