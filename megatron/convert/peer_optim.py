"""Adam's moments and the learning-rate schedule of a peer checkpoint, in our terms.

Where the peers keep a plain torch optimizer's state (DeepSpeed's engine without ZeRO: one
`expp_rank_E_mp_rank_TT_optim_states.pt` per EP and TP rank; Megatron-LM's legacy torch format
with the non-distributed optimizer: `model_optim_rng.pt`'s "optimizer"), that state is keyed by
the index of each parameter within the param groups, in the order the groups were built. The
tie to parameter names follows the rule the writing library builds its groups by, and is
accepted only when it accounts for every parameter, every stored state's shape matches the
parameter it is tied to and every parameter has taken the same number of steps:
  * one param group: the module's parameter order (`named_parameters`);
  * several: Megatron's grouping (Megatron-LM's `_get_param_groups`, Megatron-DeepSpeed's
    weight-decay split and DeepSpeed's MoE split): a parameter is without weight decay when it
    is a bias or 1-D, and expert-parallel when it is an expert's; each group says which it holds
    (`wd_mult` or `weight_decay` 0: no decay; `is_expert_parallel` or `moe`: experts), and holds
    its parameters in module order (groups of one kind, in turn).
Anything else (a group whose fields do not say, counts that do not add up, ZeRO or distributed
optimizer shards) is not guessed at: the import goes on with a fresh optimizer and says why.

Our checkpoint stores the moments as the Checkpointer does ("exp_avg.<name>", "exp_avg_sq.<name>"
beside "model.<name>", megatron/checkpoint/checkpointer.py), with the optimizer's step count, the
loss scaler and the scheduler's state in ted_checkpoint.json. Without moments but with a
schedule, the moments are zeros at step 0, which IS a fresh AdamW: the schedule is restored.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

NO_DECAY, EXPERT = "no weight decay", "expert"


class NotMapped(Exception):
    """The optimizer state does not tie to parameter names without guessing (the reason)."""


def optimizer_groups(state: dict, where: str) -> list[tuple[dict, dict]]:
    """[(param group, its torch state {index: {step, exp_avg, exp_avg_sq}})] of a torch
    optimizer's state_dict, of Megatron's wrappers around one (Float16Optimizer: "optimizer";
    ChainedOptimizer: a list of them, each with its own indices). Raises NotMapped."""
    if isinstance(state, (list, tuple)):
        return [pair for one in state for pair in optimizer_groups(one, where)]
    if not isinstance(state, dict):
        raise NotMapped(f"{where}: the optimizer state is a {type(state).__name__}")
    if "state" in state and "param_groups" in state:
        return [(group, state["state"]) for group in state["param_groups"]]
    if isinstance(state.get("optimizer"), dict):
        return optimizer_groups(state["optimizer"], where)
    if any("param_state" in str(k) or "distrib" in str(k) for k in state):
        raise NotMapped(f"{where}: the distributed optimizer's state (sharded over DP in "
                        "distrib_optim.pt) is not converted")
    raise NotMapped(f"{where}: an optimizer state with keys {sorted(map(str, state))[:4]}, not "
                    "torch's (state, param_groups)")


def _group_kind(group: dict) -> tuple[Optional[bool], bool]:
    if "wd_mult" in group:
        no_decay = group["wd_mult"] == 0
    elif "weight_decay" in group:
        no_decay = group["weight_decay"] == 0
    else:
        no_decay = None
    return no_decay, bool(group.get("is_expert_parallel") or group.get("moe"))


def param_kind(name: str, shape, experts: bool = True) -> tuple[bool, bool]:
    """(no weight decay, expert-parallel) by Megatron's rule; `experts`: whether the optimizer
    has groups of its own for experts."""
    no_decay = name.endswith(".bias") or len(shape) == 1
    expert = (".experts." in name or "deepspeed_experts" in name) and "shared_expert" not in name
    return no_decay, experts and expert


def _tie(groups: list[tuple[dict, dict]], params: list[tuple[str, tuple]], where: str):
    """[(name, shape, torch state of that parameter)] in the module's order."""
    if len(groups) == 1:
        ordered = [params]
    else:
        kinds = [_group_kind(g) for g, _ in groups]
        if any(k[0] is None for k in kinds):
            raise NotMapped(f"{where}: {len(groups)} param groups whose fields do not say which "
                            "parameters each holds (weight decay / experts)")
        # no group for experts (megatron-core at EP 1): they go by weight decay alone; groups
        # of one kind (DeepSpeed cuts a large MoE group in pieces) take its parameters in order
        experts = any(expert for _, expert in kinds)
        left = {kind: [p for p in params if param_kind(*p, experts) == kind]
                for kind in set(kinds)}
        ordered = []
        for (group, _), kind in zip(groups, kinds):
            n = len(group["params"])
            ordered.append(left[kind][:n])
            left[kind] = left[kind][n:]
        if any(left.values()):
            raise NotMapped(f"{where}: the param groups hold fewer parameters than the module "
                            "(by weight decay and experts): the order cannot be tied to names")
    out = []
    for (group, state), names in zip(groups, ordered):
        ids = list(group["params"])
        if len(ids) != len(names):
            raise NotMapped(f"{where}: a param group holds {len(ids)} parameters, the module "
                            f"{len(names)} of its kind: the order cannot be tied to names")
        out += [(name, shape, state.get(i)) for (name, shape), i in zip(names, ids)]
    if len(out) != len(params):
        raise NotMapped(f"{where}: the param groups hold {len(out)} parameters, the module "
                        f"{len(params)}")
    return out


def moments(optimizer_state, params: list[tuple[str, tuple]], where: str):
    """({name: exp_avg}, {name: exp_avg_sq}, step) of one rank's optimizer state, `params` being
    that rank's parameters (name, shape) in module order. Raises NotMapped."""
    avg, avg_sq, steps = {}, {}, set()
    for name, shape, state in _tie(optimizer_groups(optimizer_state, where), params, where):
        if not state or "exp_avg" not in state or "exp_avg_sq" not in state:
            raise NotMapped(f"{where}: no Adam state for {name} (not an Adam optimizer, or a "
                            "parameter that never took a step)")
        for key in ("exp_avg", "exp_avg_sq"):
            if tuple(state[key].shape) != tuple(shape):
                raise NotMapped(f"{where}: the state tied to {name} {tuple(shape)} has shape "
                                f"{tuple(state[key].shape)}: the order does not match")
        avg[name], avg_sq[name] = state["exp_avg"], state["exp_avg_sq"]
        steps.add(int(state.get("step", 0)))
    if len(steps) > 1:
        raise NotMapped(f"{where}: parameters took different numbers of steps {sorted(steps)}")
    return avg, avg_sq, steps.pop() if steps else 0


def loss_scaler(optimizer_state) -> dict:
    """Our LossScaler's state from Megatron's DynamicGradScaler's (fp16), else its defaults."""
    scaler = optimizer_state.get("grad_scaler") if isinstance(optimizer_state, dict) else None
    if isinstance(scaler, dict) and "scale" in scaler:
        return {"scale": float(scaler["scale"]), "clean": int(scaler.get("growth_tracker", 0)),
                "overflows_left": int(scaler.get("hysteresis_tracker", 2))}
    return {"scale": 2.0**32, "clean": 0, "overflows_left": 2}


def optimizer_note(found: Union[str, dict, None], step: int = 0) -> str:
    """The tool's 'optimizer' entry: `found` the moments (carried), a reason string, or None."""
    if isinstance(found, dict):
        return f"yes (Adam moments, step {step})"
    if found:
        return f"no ({found}: continue with a fresh optimizer)"
    return "no (none in the checkpoint)"


def schedule_note(run: dict) -> str:
    what = f"iteration {run['iteration']} and consumed samples {run['consumed_samples']}"
    if run["scheduler"]:
        what += f" and the lr scheduler (at step {run['scheduler'].get('num_steps')})"
    return what


def write_checkpoint(save_dir: str, imported, meta: dict) -> str:
    """One of our checkpoints from one process: the weights as "model.<name>" and Adam's moments
    as "exp_avg.<name>" / "exp_avg_sq.<name>" (zeros at step 0 when the source has a schedule
    but no moments to carry), with what the Checkpointer reads beside them (optimizer_step,
    loss_scaler, scheduler). Published as a save is: iter_N.tmp, renamed, then the tracker."""
    import os

    from megatron.checkpoint.files import FORMAT, META, iteration_dir, make_latest, write_json
    from megatron.checkpoint.storage import Parts, dcp_save

    states = {"model": imported.tensors}
    states.update(imported.moments or {key: {n: torch.zeros_like(t, dtype=torch.float32)
                                             for n, t in imported.tensors.items()}
                                       for key in ("exp_avg", "exp_avg_sq")})
    parts = {f"{state}.{name}": Parts(tuple(t.shape),
                                      {(0,) * t.dim(): t.detach().float().contiguous()})
             for state, tensors in states.items() for name, t in tensors.items()}
    iteration = imported.run["iteration"]
    meta = {**meta, "format": FORMAT, "iteration": iteration, "has_optimizer": True,
            "has_rng": False, "optimizer_step": imported.optimizer_step if imported.moments else 0,
            "loss_scaler": imported.loss_scaler or loss_scaler(None)}
    if imported.run["scheduler"]:
        meta["scheduler"] = imported.run["scheduler"]
    tmp = iteration_dir(save_dir, iteration) + ".tmp"
    os.makedirs(os.path.join(tmp, "rng"))
    dcp_save(parts, tmp, None)
    write_json(os.path.join(tmp, META), meta)
    make_latest(save_dir, iteration)
    return iteration_dir(save_dir, iteration)
