"""Checkpoints written by the peers' own libraries, for tests/test_convert_peers.py.

    python tests/peer_checkpoints.py OUT [deepspeed] [mcore] [legacy]

starts a 2-rank gloo world of its own (so DeepSpeed's and megatron-core's global state never
reaches the shared test workers) and writes, under OUT/<kind>/:
  deepspeed  DeepSpeed 0.19's engine (`deepspeed.initialize`, one AdamW step, `save_checkpoint`)
             of a GPT whose modules carry Megatron-DeepSpeed's names, its MoE layers
             deepspeed.moe.layer.MoE with ep_size 2 (residual MoE, top-2, capacity factor 1.0,
             tokens dropped) in layers 2 and 4 (--expert-interval 2); Megatron-DS's client state
             (args, iteration) as Megatron-DS passes it. Each rank holds 2 of the 4 experts.
  mcore      megatron-core 0.16's GPTModel (local spec, MoE in layers 1 and 3 by
             --moe-layer-freq, SwiGLU, RMSNorm, RoPE, no biases, untied output, top-2 dropless,
             expert parallel 2) saved by `dist_checkpointing.save` as Megatron-LM does (common
             state: args, iteration, opt_param_scheduler) under iter_0000005/.
  legacy     the same library's GPTModel at tensor parallel 2 (LayerNorm, learned positions,
             SwiGLU: each TP shard [gate_r; up_r], no biases, tied output, MoE in layers 0 and 2
             with its experts split over TP), each rank's
             `state_dict_for_save_checkpoint()` torch.saved as Megatron-LM's --ckpt-format torch
             does: iter_0000007/mp_rank_0T/model_optim_rng.pt.
and OUT/<kind>/reference.pt: {"tokens": [2, 16], "logits": [2, 16, padded vocab]} of the source
model (rank 0, eval mode) after its weights were saved. CUDA-only calls are shimmed here only.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
SEQ, VOCAB_IDS, PADDED, HIDDEN, HEADS, FFN, EXPERTS = 16, 96, 128, 32, 4, 64, 4
if os.environ.get("PEER_CHECKPOINT_SIZE") == "quickstart":  # examples/quickstart.sh's model
    SEQ, VOCAB_IDS, PADDED, HIDDEN, HEADS, FFN, EXPERTS = 128, 3999, 4096, 128, 4, 352, 8


def tokens(seed: int = 9) -> torch.Tensor:
    return torch.randint(0, VOCAB_IDS + 1, (2, SEQ),
                         generator=torch.Generator().manual_seed(seed))


def perturb(module: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    """Every parameter redrawn from `seed` and its name, so each one moves the logits."""
    import zlib

    with torch.no_grad():
        for name, p in module.named_parameters():
            gen = torch.Generator().manual_seed(seed * 7919 + zlib.crc32(name.encode()))
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + std * torch.randn(p.shape, generator=gen))


# ---- DeepSpeed engine, Megatron-DeepSpeed names -------------------------------------------------
class ParallelMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.dense_h_to_4h = torch.nn.Linear(HIDDEN, FFN)
        self.dense_4h_to_h = torch.nn.Linear(FFN, HIDDEN)

    def forward(self, x):
        return self.dense_4h_to_h(torch.nn.functional.gelu(self.dense_h_to_4h(x)))


class Attention(torch.nn.Module):
    """Megatron's ParallelAttention at TP 1: QKV rows [head, (q, k, v), head_dim]."""

    def __init__(self):
        super().__init__()
        self.query_key_value = torch.nn.Linear(HIDDEN, 3 * HIDDEN)
        self.dense = torch.nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x):
        b, s, _ = x.shape
        qkv = self.query_key_value(x).view(b, s, HEADS, 3, HIDDEN // HEADS)
        q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))
        ctx = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.dense(ctx.transpose(1, 2).reshape(b, s, HIDDEN))


class Layer(torch.nn.Module):
    def __init__(self, mlp):
        super().__init__()
        self.input_layernorm = torch.nn.LayerNorm(HIDDEN)
        self.self_attention = Attention()
        self.post_attention_layernorm = torch.nn.LayerNorm(HIDDEN)
        self.mlp = mlp

    def forward(self, x):
        x = x + self.self_attention(self.input_layernorm(x))
        out = self.mlp(self.post_attention_layernorm(x))
        aux = 0.0
        if isinstance(out, tuple):  # DeepSpeed's MoE: (output, l_aux, counts)
            out, aux = out[0], out[1]
        return x + out, aux


class Embedding(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.word_embeddings = torch.nn.Embedding(PADDED, HIDDEN)
        self.position_embeddings = torch.nn.Embedding(SEQ, HIDDEN)


class Encoder(torch.nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.layers = torch.nn.ModuleList(layers)
        self.final_layernorm = torch.nn.LayerNorm(HIDDEN)


class LanguageModel(torch.nn.Module):
    def __init__(self, layers):
        super().__init__()
        self.embedding = Embedding()
        self.encoder = Encoder(layers)


class MegatronDeepSpeedGPT(torch.nn.Module):
    """Megatron-DeepSpeed's GPTModel module tree (language_model.embedding / encoder), tied
    output; forward returns (logits [b, s, padded vocab], summed aux loss)."""

    def __init__(self, layers):
        super().__init__()
        self.language_model = LanguageModel(layers)

    def forward(self, tokens):
        lm = self.language_model
        pos = torch.arange(tokens.shape[1]).expand_as(tokens)
        x = lm.embedding.word_embeddings(tokens) + lm.embedding.position_embeddings(pos)
        aux = 0.0
        for layer in lm.encoder.layers:
            x, a = layer(x)
            aux = aux + a
        return lm.encoder.final_layernorm(x) @ lm.embedding.word_embeddings.weight.t(), aux


DS_ARGS = dict(num_layers=4, hidden_size=HIDDEN, num_attention_heads=HEADS, ffn_hidden_size=FFN,
               max_position_embeddings=SEQ, seq_length=SEQ, padded_vocab_size=PADDED,
               make_vocab_size_divisible_by=128, tokenizer_type="NullTokenizer",
               vocab_size=VOCAB_IDS, num_experts=[EXPERTS], expert_interval=2, topk=2,
               moe_train_capacity_factor=1.0, moe_eval_capacity_factor=1.0, moe_min_capacity=4,
               moe_token_dropping=True, mlp_type="residual", moe_loss_coeff=0.01,
               ep_world_size=2, tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
               normalization="layernorm", layernorm_epsilon=1e-5, swiglu=False,
               hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.02,
               bias_gelu_fusion=False, openai_gelu=False, untie_embeddings_and_output_weights=False,
               apply_residual_connection_post_layernorm=False, fp16=False, bf16=False,
               params_dtype=torch.float32, global_batch_size=4, micro_batch_size=2,
               consumed_train_samples=8, lr=1e-3, train_iters=100)


def write_deepspeed(out: str) -> None:
    import torch.distributed as dist

    sys.path.insert(0, HERE)
    import deepspeed_reference

    deepspeed, MoE = deepspeed_reference.import_deepspeed()
    deepspeed_reference.init_distributed()
    args = argparse.Namespace(**DS_ARGS)

    def mlp(i):
        if (i + 1) % args.expert_interval:
            return ParallelMLP()
        return MoE(hidden_size=HIDDEN, expert=ParallelMLP(), num_experts=EXPERTS, ep_size=2, k=2,
                   capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=4,
                   use_residual=True, noisy_gate_policy=None, drop_tokens=True, use_rts=False,
                   top2_2nd_expert_sampling=False)

    model = MegatronDeepSpeedGPT([Layer(mlp(i)) for i in range(args.num_layers)])
    perturb(model, seed=1)
    _globalize_experts(model, ep_rank=dist.get_rank())
    config = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
              "steps_per_print": 10**6, "zero_optimization": {"stage": 0}}
    optimizer, scheduler = _megatron_ds_optimizer(model)
    with contextlib.redirect_stdout(sys.stderr):
        engine, _, _, _ = deepspeed.initialize(model=model, config=config, optimizer=optimizer,
                                               lr_scheduler=scheduler)
        data = tokens()
        for step in range(2):
            engine.train()
            logits, aux = engine(data if step == 0 else tokens(seed=10))
            engine.backward(_ds_loss(logits, aux, data if step == 0 else tokens(seed=10)))
            engine.step(lr_kwargs={"increment": args.global_batch_size})
        engine.eval()
        with torch.no_grad():
            logits, _ = engine(data)
        engine.save_checkpoint(os.path.join(out, "ckpt"),
                               client_state={"args": args, "iteration": 2,
                                             "checkpoint_version": 3.0})
        _next_step(engine, model, out, lambda x: _ds_loss(*engine(x), x),
                   {"increment": args.global_batch_size})
    if dist.get_rank() == 0:
        torch.save({"tokens": data, "logits": logits}, os.path.join(out, "reference.pt"))


def _ds_loss(logits, aux, data):
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, PADDED),
                                             data[:, 1:].reshape(-1)) + 0.01 * aux


def _megatron_ds_optimizer(model):
    """AdamW over Megatron-DeepSpeed's param groups (weight decay on matrices; biases and norms
    without: wd_mult 0), split by DeepSpeed's own MoE helper, under megatron-core's
    OptimizerParamScheduler as Megatron-DS drives it (steps in samples)."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith(".bias") or p.dim() == 1 else decay).append(p)
    groups = [{"name": "wd", "params": decay, "wd_mult": 1.0, "lr_mult": 1.0},
              {"name": "no_wd", "params": no_decay, "wd_mult": 0.0, "lr_mult": 1.0}]
    optimizer = torch.optim.AdamW(split_params_into_different_moe_groups_for_optimizer(groups),
                                  lr=1e-3, weight_decay=0.01)
    return optimizer, OptimizerParamScheduler(optimizer, **SCHEDULE_KW)


def _next_step(engine, model, out, loss_of, step_kwargs) -> None:
    """After the save: one more step on other tokens; each rank writes the gradients its
    optimizer stepped with (after DeepSpeed's clipping: taken in a step pre-hook) and the
    parameters after the step (experts by global id), for the test to step our import with the
    same gradients and compare."""
    import torch.distributed as dist

    engine.train()
    grads = {}
    hook = engine.optimizer.register_step_pre_hook(lambda *_: grads.update(
        {_global_name(n): p.grad.detach().clone() for n, p in model.named_parameters()}))
    engine.backward(loss_of(tokens(seed=11)))
    engine.step(lr_kwargs=step_kwargs)
    hook.remove()
    after = {_global_name(n): p.detach().clone() for n, p in model.named_parameters()}
    torch.save({"grads": grads, "after": after},
               os.path.join(out, f"next_step_rank{dist.get_rank()}.pt"))


def _global_name(name: str) -> str:
    import re

    import torch.distributed as dist

    m = re.search(r"deepspeed_experts\.(\d+)\.", name)
    if not m:
        return name
    local = EXPERTS // 2
    return name.replace(m.group(0),
                        f"deepspeed_experts.{dist.get_rank() * local + int(m.group(1))}.")


def _globalize_experts(model, ep_rank: int) -> None:
    """DeepSpeed copies one expert module E_l times: give expert ep_rank * E_l + i its own
    weights (drawn from its global id), so every expert differs."""
    from deepspeed.moe.layer import MoE

    for name, module in model.named_modules():
        if isinstance(module, MoE):
            local = module.deepspeed_moe.experts.deepspeed_experts
            for i, expert in enumerate(local):
                perturb(expert, seed=1000 + 17 * (ep_rank * len(local) + i) + len(name))


# ---- megatron-core ----------------------------------------------------------------------------
def _shim_cuda() -> None:
    """megatron-core's CUDA-only calls on a CPU run (test-only)."""
    import megatron.core.tensor_parallel as tp_module
    import megatron.core.transformer.moe.moe_utils as moe_utils

    class _Tracker:
        def fork(self, *a, **k):
            return contextlib.nullcontext()

    torch.cuda.current_device = lambda: torch.device("cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    tp_module.get_cuda_rng_tracker = lambda *a, **k: _Tracker()
    moe_utils.te_general_gemm = None


def mcore_model(tp: int, ep: int, **kw):
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.transformer.transformer_config import TransformerConfig

    parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
                                             expert_model_parallel_size=ep)
    model_kw = {k: kw.pop(k) for k in ("position_embedding_type",
                                       "share_embeddings_and_output_weights") if k in kw}
    norm = kw.get("normalization", "LayerNorm")
    cfg = TransformerConfig(num_layers=4, hidden_size=HIDDEN, num_attention_heads=HEADS,
                            ffn_hidden_size=FFN, use_cpu_initialization=True,
                            num_moe_experts=EXPERTS,
                            moe_router_topk=2, moe_token_dispatcher_type="allgather",
                            hidden_dropout=0.0, attention_dropout=0.0, moe_aux_loss_coeff=0.01,
                            tensor_model_parallel_size=tp, expert_model_parallel_size=ep, **kw)
    spec = get_gpt_decoder_block_spec(cfg, use_transformer_engine=False, normalization=norm)
    model = GPTModel(config=cfg, transformer_layer_spec=spec, vocab_size=PADDED,
                     max_sequence_length=SEQ, **model_kw)
    return model, cfg


def _mcore_logits(model, data) -> torch.Tensor:
    """Rank 0's full logits (the output layer's vocabulary slices gathered over TP)."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    model.eval()
    pos = torch.arange(SEQ).expand_as(data)
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), 1)
    with torch.no_grad():
        logits = model(data, pos, attention_mask=mask)
    group = parallel_state.get_tensor_model_parallel_group()
    if dist.get_world_size(group) > 1:
        parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, logits.contiguous(), group=group)
        logits = torch.cat(parts, dim=-1)
    return logits


MCORE_ARGS = dict(num_layers=4, hidden_size=HIDDEN, num_attention_heads=HEADS,
                  ffn_hidden_size=FFN, max_position_embeddings=SEQ, seq_length=SEQ,
                  padded_vocab_size=PADDED, tokenizer_type="NullTokenizer", vocab_size=VOCAB_IDS,
                  hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.02,
                  num_experts=EXPERTS, moe_router_topk=2, moe_aux_loss_coeff=0.01,
                  moe_expert_capacity_factor=None, moe_router_load_balancing_type="aux_loss",
                  moe_token_dispatcher_type="allgather", fp16=False, bf16=False,
                  global_batch_size=8, consumed_train_samples=40, ckpt_format="torch_dist")
# Megatron's schedule as megatron-core's OptimizerParamScheduler takes it (steps in samples)
SCHEDULE_KW = dict(init_lr=0.0, max_lr=1e-3, min_lr=1e-4, lr_warmup_steps=4, lr_decay_steps=400,
                   lr_decay_style="cosine", start_wd=0.01, end_wd=0.01, wd_incr_steps=400,
                   wd_incr_style="constant")
SCHEDULER = {"max_lr": 1e-3, "lr_warmup_steps": 8, "num_steps": 40, "lr_decay_style": "cosine",
             "lr_decay_steps": 800, "min_lr": 1e-4, "start_wd": 0.01, "end_wd": 0.01,
             "wd_incr_style": "constant", "wd_incr_steps": 800}


def write_mcore(out: str) -> None:
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    _shim_cuda()
    freq = [0, 1, 0, 1]
    model, _ = mcore_model(1, 2, moe_layer_freq=freq, gated_linear_unit=True,
                           activation_func=torch.nn.functional.silu, normalization="RMSNorm",
                           add_bias_linear=False, position_embedding_type="rope",
                           share_embeddings_and_output_weights=False)
    perturb(model, seed=2 + 100 * dist.get_rank())  # experts differ per EP rank; the rest:
    _sync_non_experts(model)
    args = argparse.Namespace(**MCORE_ARGS, moe_layer_freq=freq, swiglu=True,
                              normalization="RMSNorm", add_bias_linear=False,
                              position_embedding_type="rope", rotary_base=10000,
                              untie_embeddings_and_output_weights=True,
                              tensor_model_parallel_size=1, pipeline_model_parallel_size=1,
                              expert_model_parallel_size=2)
    folder = os.path.join(out, "ckpt", "iter_0000005")
    os.makedirs(folder, exist_ok=True)
    dist.barrier()
    state = {"args": args, "iteration": 5, "checkpoint_version": 3.0,
             "opt_param_scheduler": SCHEDULER, "model": model.sharded_state_dict()}
    dist_checkpointing.save(state, folder)
    data = tokens()
    logits = _mcore_logits(model, data)
    if dist.get_rank() == 0:
        with open(os.path.join(out, "ckpt", "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("5")
        torch.save({"tokens": data, "logits": logits}, os.path.join(out, "reference.pt"))
    dist.barrier()


def _sync_non_experts(model) -> None:
    """Rank 0's copy of every parameter outside the experts (replicated over EP)."""
    import torch.distributed as dist

    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." not in name:
                dist.broadcast(p.data, src=0)


def write_legacy(out: str) -> None:
    import torch.distributed as dist

    _shim_cuda()
    # (megatron-core allows expert biases only with expert TP 1)
    model, _ = mcore_model(2, 1, moe_layer_freq=2, add_bias_linear=False,
                           gated_linear_unit=True, activation_func=torch.nn.functional.silu,
                           position_embedding_type="learned_absolute",
                           share_embeddings_and_output_weights=True)
    _perturb_tp(model)
    args = argparse.Namespace(**MCORE_ARGS, moe_layer_freq=2, swiglu=True,
                              normalization="LayerNorm", add_bias_linear=False,
                              position_embedding_type="learned_absolute",
                              untie_embeddings_and_output_weights=False,
                              tensor_model_parallel_size=2, pipeline_model_parallel_size=1,
                              expert_model_parallel_size=1, ckpt_format_="torch")
    optimizer, scheduler = _megatron_optimizer(model)
    for seed in (12, 13):  # two steps: moments with a history
        _mcore_step(model, optimizer, scheduler, tokens(seed=seed))
    rank = dist.get_rank()
    folder = os.path.join(out, "ckpt", "iter_0000007", f"mp_rank_{rank:02d}")
    os.makedirs(folder, exist_ok=True)
    # Megatron-LM's FP32Optimizer.state_dict() is its torch optimizer's
    torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 7,
                "model": model.state_dict_for_save_checkpoint(),
                "optimizer": optimizer.state_dict(),
                "opt_param_scheduler": scheduler.state_dict(),
                "rng_state": [{"random_rng_state": torch.random.get_rng_state()}]},
               os.path.join(folder, "model_optim_rng.pt"))
    data = tokens()
    logits = _mcore_logits(model, data)
    grads = _mcore_step(model, optimizer, scheduler, tokens(seed=11))
    torch.save({"grads": grads, "after": {n: p.detach().clone()
                                          for n, p in model.named_parameters()}},
               os.path.join(out, f"next_step_rank{rank}.pt"))
    if rank == 0:
        with open(os.path.join(out, "ckpt", "latest_checkpointed_iteration.txt"), "w") as f:
            f.write("7")
        torch.save({"tokens": data, "logits": logits}, os.path.join(out, "reference.pt"))
    dist.barrier()


def _megatron_optimizer(model):
    """torch AdamW over megatron-core's own param groups (`_get_param_groups`: biases and 1-D
    parameters without weight decay), stepped by its OptimizerParamScheduler: what Megatron-LM's
    FP32Optimizer holds."""
    from megatron.core.optimizer import OptimizerConfig, _get_param_groups
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    config = OptimizerConfig(optimizer="adam", lr=1e-3, min_lr=1e-4, weight_decay=0.01)
    optimizer = torch.optim.AdamW(_get_param_groups([model], config, None), lr=1e-3,
                                  weight_decay=0.01)
    return optimizer, OptimizerParamScheduler(optimizer, **SCHEDULE_KW)


def _mcore_step(model, optimizer, scheduler, data) -> dict:
    """One training step on the lm loss; returns the gradients it stepped with. In eval mode:
    megatron-core refuses MoE training at TP > 1 without sequence parallelism (whose buffers
    are CUDA-only), and eval mode only leaves the aux loss out (no dropout, dropless)."""
    model.eval()
    pos = torch.arange(SEQ).expand_as(data)
    mask = torch.triu(torch.ones(1, 1, SEQ, SEQ, dtype=torch.bool), 1)
    labels = torch.roll(data, -1, dims=1)
    optimizer.zero_grad()
    model(data, pos, attention_mask=mask, labels=labels).mean().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    optimizer.step()
    scheduler.step(increment=MCORE_ARGS["global_batch_size"])
    return grads


def _perturb_tp(model) -> None:
    """Full tensors drawn alike on both TP ranks, each rank keeping its slice as megatron-core's
    layers split it (partition_dim / partition_stride attributes)."""
    import zlib

    from megatron.core import parallel_state

    rank, size = (parallel_state.get_tensor_model_parallel_rank(),
                  parallel_state.get_tensor_model_parallel_world_size())
    with torch.no_grad():
        for name, p in model.named_parameters():
            gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            split = getattr(p, "tensor_model_parallel", False)
            dim = getattr(p, "partition_dim", -1)
            shape = list(p.shape)
            if split:
                shape[dim] *= size
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            full = base + 0.2 * torch.randn(shape, generator=gen)
            p.copy_(full.chunk(size, dim)[rank] if split else full)


def write_roundtrip(out: str) -> None:
    """tools/checkpoint_convert.py imports OUT/../mcore/ckpt, exports it --to mcore; megatron-core
    loads the export at another layout (TP 2, EP 1) with dist_checkpointing.load and computes
    the logits of the same tokens (OUT/reference.pt)."""
    import torch.distributed as dist
    from megatron.core import dist_checkpointing

    _shim_cuda()
    source = os.path.join(os.path.dirname(out), "mcore")
    imported, exported = os.path.join(out, "imported"), os.path.join(out, "exported")
    if dist.get_rank() == 0:
        from tools import checkpoint_convert

        with contextlib.redirect_stdout(sys.stderr):
            checkpoint_convert.main(["import", "--from", "mcore", os.path.join(source, "ckpt"),
                                     imported])
            checkpoint_convert.main(["export", "--load", imported, "--to", "mcore", "--output",
                                     exported])
    dist.barrier()
    model, _ = mcore_model(2, 1, moe_layer_freq=[0, 1, 0, 1], gated_linear_unit=True,
                           activation_func=torch.nn.functional.silu, normalization="RMSNorm",
                           add_bias_linear=False, position_embedding_type="rope",
                           share_embeddings_and_output_weights=False)
    sharded = {"model": model.sharded_state_dict()}  # as Megatron-LM's load_checkpoint asks
    # Megatron-LM allow-lists argparse.Namespace (common.pt's args) before it loads, as here
    with torch.serialization.safe_globals([argparse.Namespace]):
        state = dist_checkpointing.load(sharded, os.path.join(exported, "iter_0000005"))
    model.load_state_dict(state["model"])
    data = torch.load(os.path.join(source, "reference.pt"))["tokens"]
    logits = _mcore_logits(model, data)
    if dist.get_rank() == 0:
        torch.save({"tokens": data, "logits": logits}, os.path.join(out, "reference.pt"))
    dist.barrier()


def _worker(rank: int, port: int, out: str, kinds: list[str]) -> None:
    import torch.distributed as dist

    warnings.filterwarnings("ignore")
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank), RANK=str(rank), WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    sys.path.insert(0, os.path.dirname(HERE))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=2)
    torch.set_num_threads(1)
    writers = {"deepspeed": write_deepspeed, "mcore": write_mcore, "legacy": write_legacy,
               "roundtrip": write_roundtrip}
    for kind in kinds:
        path = os.path.join(out, kind)
        os.makedirs(path, exist_ok=True)
        writers[kind](path)
        dist.barrier()
    dist.destroy_process_group()


def main(argv=None) -> None:
    import socket

    import torch.multiprocessing as mp

    argv = sys.argv[1:] if argv is None else argv
    out, kinds = argv[0], argv[1:] or ["deepspeed", "mcore", "legacy", "roundtrip"]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, out, kinds), nprocs=2, join=True)


if __name__ == "__main__":
    main()
