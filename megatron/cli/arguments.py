"""Megatron-compatible command line: the flags (Megatron-LM names; Megatron-DeepSpeed's MoE names
as aliases). The only place argv is parsed; megatron.cli.configs turns the flags into configs.

A flag that sets one config field has that field's name as its `dest` (--moe-router-topk ->
`topk`), so the configs are filled by matching names and errors map back to flags.
"""

from __future__ import annotations

import argparse
import sys

from megatron.cli.logging_flags import (add_checkpoint_switches, add_logging_flags,
                                        add_runtime_flags)
from megatron.cli.peer_flags import add_peer_args, resolve_peer_args
from megatron.cli.schedule import add_schedule_args
from megatron.parallel.stages import SCHEDULE_PLACEMENT
from ted_patches.config import (AUX_LOSS_TYPES, DROP_POLICIES, GATE_NORMALIZATIONS, MLP_TYPES,
                                ROUTER_DTYPES, SCORE_FUNCTIONS)
from ted_patches.config import parse_layer_freq


class ConfigError(ValueError):
    """A bad flag or flag combination; the message names the flag and a way out."""


# ---- the parser -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain_gpt_moe.py", allow_abbrev=False,
        description="Megatron-TED: GPT-MoE pretraining with tensor-expert-data parallelism.",
    )
    _model_args(p.add_argument_group("model"))
    _moe_args(p.add_argument_group("mixture of experts (Megatron-Core names; "
                                   "Megatron-DeepSpeed aliases)"))
    _parallel_args(p.add_argument_group("parallelism"))
    _train_args(p.add_argument_group("training"))
    _optim_args(p.add_argument_group("optimizer and precision"))
    _data_args(p.add_argument_group("data and tokenizer"))
    _log_args(p.add_argument_group("logging and evaluation"))
    _checkpoint_args(p.add_argument_group("checkpointing (Megatron-LM's flags)"))
    add_runtime_flags(p.add_argument_group("run time (Megatron-LM's flags)"))
    add_peer_args(p)
    return p


def _model_args(g):
    g.add_argument("--num-layers", type=int, required=True, help="transformer layers")
    g.add_argument("--hidden-size", type=int, required=True, help="model width")
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default: 4 x hidden size")
    g.add_argument("--num-attention-heads", type=int, required=True,
                   help="attention heads (divisible by TP)")
    g.add_argument("--seq-length", type=int, required=True, help="tokens per sample")
    g.add_argument("--max-position-embeddings", type=int, default=None,
                   help="default: --seq-length")
    g.add_argument("--position-embedding-type", choices=["learned_absolute", "rope"],
                   default="learned_absolute", help="learned absolute positions or rotary")
    g.add_argument("--rotary-base", type=float, default=10000.0, help="RoPE base frequency")
    _attention_args(g)
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm",
                   help="normalization layer")
    g.add_argument("--norm-epsilon", type=float, default=1e-5,
                   help="epsilon of LayerNorm / RMSNorm")
    g.add_argument("--group-query-attention", action="store_true",
                   help="grouped-query attention with --num-query-groups key/value heads "
                        "(Megatron-LM)")
    g.add_argument("--num-query-groups", type=int, default=1,
                   help="key/value heads with --group-query-attention (divisible by TP; divides "
                        "the heads)")
    g.add_argument("--swiglu", action="store_true",
                   help="SwiGLU instead of GELU in MLPs and experts")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true",
                   help="a separate output layer instead of the embedding's transpose")
    g.add_argument("--disable-bias-linear", dest="add_bias_linear", action="store_false",
                   help="no biases in linear layers")
    g.add_argument("--hidden-dropout", type=float, default=0.1,
                   help="dropout on the residual branches and embeddings")
    g.add_argument("--attention-dropout", type=float, default=0.1,
                   help="dropout on attention probabilities")
    g.add_argument("--init-method-std", type=float, default=0.02,
                   help="std of the normal init (output layers: / sqrt(2 x layers))")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the vocabulary to a multiple of this x TP")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None,
                   help="activation checkpointing: full = whole layers; selective = the attention "
                        "core")
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None,
                   help="full recompute: uniform = every --recompute-num-layers layers as one "
                        "chunk; block = only the first --recompute-num-layers layers")
    g.add_argument("--recompute-num-layers", type=int, default=1,
                   help="layers per recompute chunk (uniform) or recomputed layers (block)")
    g.add_argument("--disable-moe-cac", action="store_true",
                   help="turn off communication-aware checkpointing (recompute then repeats the "
                        "MoE all-to-alls)")


def _attention_args(g):
    """Attention variants, with Megatron-LM's flags (dest = the ModelConfig field)."""
    g.add_argument("--kv-channels", type=int, default=None,
                   help="head dim of q, k, v (default --hidden-size / --num-attention-heads)")
    g.add_argument("--rotary-percent", type=float, default=1.0,
                   help="rotary on the first int(head dim x this) dims of each head (partial "
                        "rotary); the rest carry no position")
    g.add_argument("--rope-type", choices=["rope", "yarn"], default=None,
                   help="yarn: YaRN-scaled rotary (default with --multi-latent-attention); rope: "
                        "plain (default otherwise)")
    g.add_argument("--rotary-scaling-factor", type=float, default=1.0,
                   help="YaRN: the context extension factor (1: plain rotary)")
    g.add_argument("--original-max-position-embeddings", type=int, default=4096,
                   help="YaRN: the context the frequencies were trained for (Megatron-Core's "
                        "original_max_position_embeddings)")
    g.add_argument("--beta-fast", type=float, default=32.0,
                   help="YaRN: dims turning more often than this over the original context keep "
                        "their frequency (Megatron-Core's beta_fast)")
    g.add_argument("--beta-slow", type=float, default=1.0,
                   help="YaRN: dims turning less often than this are interpolated (beta_slow)")
    g.add_argument("--mscale", type=float, default=1.0,
                   help="YaRN: mscale of the cos/sin concentration factor")
    g.add_argument("--mscale-all-dim", type=float, default=0.0,
                   help="YaRN: mscale_all_dim (divides the concentration; squared into MLA's "
                        "softmax scale)")
    g.add_argument("--qk-layernorm", action="store_true",
                   help="normalize each head's q and k (--normalization's type) before rotary; "
                        "with --multi-latent-attention, the q and kv latents")
    g.add_argument("--multi-latent-attention", action="store_true",
                   help="multi-latent attention (DeepSeek-V2/V3): low-rank q and kv, a rope key "
                        "shared by the heads")
    g.add_argument("--q-lora-rank", type=int, default=None,
                   help="MLA: rank of the query's latent (default: no query compression)")
    g.add_argument("--kv-lora-rank", type=int, default=32,
                   help="MLA: rank of the key/value latent")
    g.add_argument("--qk-head-dim", type=int, default=128,
                   help="MLA: per-head q/k dims without position")
    g.add_argument("--qk-pos-emb-head-dim", type=int, default=64,
                   help="MLA: per-head q/k rotary dims (the key's shared by all heads)")
    g.add_argument("--v-head-dim", type=int, default=128, help="MLA: per-head value dims")


def _moe_args(g):
    g.add_argument("--num-experts", type=int, nargs="+", default=None,
                   help="experts per MoE layer (none or 1: dense GPT); one count per MoE layer for "
                        "a pyramid (Megatron-DeepSpeed's PR-MoE with --mlp-type residual)")
    g.add_argument("--expert-interval", type=int, default=None,
                   help="MoE in layers N, 2N, ... (1-based, Megatron-DeepSpeed; default 2)")
    g.add_argument("--moe-layer-freq", type=_layer_freq, default=None,
                   help="MoE in layers 0, N, 2N, ... (0-based, Megatron-Core); or Megatron-Core's "
                        "list form, one 1 (MoE) or 0 (dense) per layer, e.g. \"([0]*1+[1]*3)*2\"")
    g.add_argument("--first-k-dense-replace", type=int, default=0, metavar="K",
                   help="the first K layers dense whatever the MoE pattern (DeepSeek's "
                        "first_k_dense_replace)")
    g.add_argument("--moe-router-topk", "--topk", dest="topk", type=int, default=1,
                   help="experts per token (default 1, as Megatron-DeepSpeed; Megatron-Core "
                        "defaults to 2)")
    g.add_argument("--moe-expert-capacity-factor", "--moe-train-capacity-factor",
                   dest="capacity_factor", type=float, default=1.0,
                   help="training capacity: ceil(tokens / experts x factor x top-k) slots per "
                        "expert (default 1.0 with dropping, as DeepSpeed; Megatron-Core scripts "
                        "that omit it mean dropless: add --disable-moe-token-dropping)")
    g.add_argument("--moe-eval-capacity-factor", dest="eval_capacity_factor", type=float,
                   default=1.0, help="capacity factor in evaluation")
    g.add_argument("--moe-min-capacity", dest="min_capacity", type=int, default=4,
                   help="at least this many slots per expert")
    g.add_argument("--disable-moe-token-dropping", dest="drop_tokens", action="store_false",
                   help="no capacity limit: capacity = the fullest expert over the EP group")
    g.add_argument("--moe-token-drop-policy", dest="drop_policy", choices=DROP_POLICIES,
                   default="position",
                   help="position: DeepSpeed's order (the default): for top-1/top-2 first choices "
                        "in token order, then second choices; for top-k >= 3 token order over all "
                        "k choices (its topkgating); choice: first choices, then second, ... for "
                        "every k; probs: the most probable (Megatron-Core's default)")
    g.add_argument("--moe-router-score-function", dest="score_function", choices=SCORE_FUNCTIONS,
                   default="softmax", help="the gate's score function (Megatron-Core)")
    g.add_argument("--moe-gate-normalization", dest="gate_normalization",
                   choices=GATE_NORMALIZATIONS, default="surviving",
                   help="surviving: renormalize top-k gates over kept choices (DeepSpeed); "
                        "topk: before dropping (Megatron-Core); none: raw probabilities")
    g.add_argument("--moe-router-load-balancing-type", dest="aux_loss_type",
                   choices=AUX_LOSS_TYPES, default="deepspeed",
                   help="deepspeed: first choices only; aux_loss: Megatron-Core's switch loss over "
                        "k choices / k; seq_aux_loss: that loss per sequence, averaged "
                        "(DeepSeek-V2/V3); global_aux_loss: against the loads of the step's "
                        "micro-batches so far over the data-parallel ranks; sinkhorn: S-BASE's "
                        "balanced assignment selects (no loss); none")
    _router_variant_args(g)
    g.add_argument("--moe-aux-loss-coeff", "--moe-loss-coeff", dest="aux_loss_coeff", type=float,
                   default=0.01, help="weight of the load-balancing loss")
    g.add_argument("--moe-z-loss-coeff", dest="z_loss_coeff", type=float, default=0.0,
                   help="weight of the router z-loss, mean(logsumexp(logits)^2)")
    g.add_argument("--moe-input-jitter-eps", dest="jitter_eps", type=float, default=0.0,
                   help="multiplicative uniform noise on the router input in training")
    g.add_argument("--moe-ffn-hidden-size", dest="expert_ffn_hidden_size", type=int, default=None,
                   help="expert FFN size (default: --ffn-hidden-size)")
    g.add_argument("--mlp-type", choices=MLP_TYPES, default="standard",
                   help="residual: Megatron-DeepSpeed's residual MoE")
    g.add_argument("--disable-moe-dtd", dest="dtd", action="store_false",
                   help="turn off duplicate token dropping")
    g.add_argument("--moe-pad-free", dest="pad_free", action=argparse.BooleanOptionalAction,
                   default=None,
                   help="padding-free dispatch: send and compute only kept tokens (variable "
                        "all-to-all splits after one count exchange, grouped GEMMs over the real "
                        "rows); the same kept tokens and numbers as the padded path. Default: on "
                        "CPUs and in no-drop mode, off on accelerators in drop mode (where the "
                        "padded path never synchronizes with the host)")
    g.add_argument("--check-tp-routing", type=int, nargs="?", const=1, default=0, metavar="N",
                   help="every N-th forward of each MoE layer (flag alone: every one), check that "
                        "the TP ranks routed identically (one small all-reduce and a host read); "
                        "stops with an error if not (DTD needs identical routing)")
    g.add_argument("--moe-shared-expert-intermediate-size", dest="shared_expert_intermediate_size",
                   type=int, default=None,
                   help="shared experts: a dense MLP of this width (all shared experts together) "
                        "beside the routed experts of every MoE layer, split over TP like the "
                        "dense MLP (Megatron-Core)")
    g.add_argument("--moe-shared-expert-gate", dest="shared_expert_gate", action="store_true",
                   help="scale the shared expert's output by sigmoid(x . w) per token (Qwen2-MoE's "
                        "shared_expert_gate)")
    g.add_argument("--moe-shared-expert-overlap", dest="shared_expert_overlap",
                   action="store_true",
                   help="accepted for Megatron-Core scripts; our collectives are synchronous, so "
                        "there is nothing to overlap with and the numbers are the same")
    g.add_argument("--moe-use-upcycling", dest="use_upcycling", action="store_true",
                   help="start from the dense checkpoint in --load: every expert a copy of the "
                        "dense MLP, the router from --seed (Megatron-Core's granularity 1); "
                        "a first run only: --save must hold no checkpoint")
    g.add_argument("--moe-per-layer-logging", dest="per_layer_logging", action="store_true",
                   help="each MoE layer's aux and z loss, dropped fraction and max/min expert "
                        "load (over the mean: 1.00 is balanced) in the log line and TensorBoard")


def _layer_freq(text: str):
    try:
        return parse_layer_freq(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _router_variant_args(g):
    """Megatron-Core's router flags beyond softmax top-k (ted_patches/gates)."""
    g.add_argument("--moe-router-pre-softmax", dest="pre_softmax", action="store_true",
                   help="softmax gate: the weights are the softmax probabilities over all experts, "
                        "not renormalized over the top-k (the sigmoid gate ignores it, as in "
                        "Megatron-Core)")
    g.add_argument("--moe-router-topk-scaling-factor", dest="topk_scaling_factor", type=float,
                   default=None, help="multiply the gate weights by this (after normalization)")
    g.add_argument("--moe-router-dtype", dest="router_dtype", choices=ROUTER_DTYPES,
                   default="fp32", help="logits, scores, selection and gate weights in fp32 "
                                        "(default) or fp64")
    g.add_argument("--moe-router-enable-expert-bias", dest="enable_expert_bias",
                   action="store_true",
                   help="aux-loss-free balancing (DeepSeek-V3; sigmoid scores): a per-expert bias "
                        "added to the scores for selection only, moved after each optimizer step "
                        "by the update rate towards equal loads over the data-parallel world; "
                        "saved in checkpoints")
    g.add_argument("--moe-router-bias-update-rate", dest="bias_update_rate", type=float,
                   default=1e-3, help="the expert bias's step (default 1e-3, DeepSeek-V3's)")
    g.add_argument("--moe-router-num-groups", dest="router_num_groups", type=int, default=None,
                   help="group-limited routing: experts in this many equal groups (e.g. the EP "
                        "size: device-limited routing)")
    g.add_argument("--moe-router-group-topk", dest="router_group_topk", type=int, default=None,
                   help="group-limited routing: groups each token may use (each group scored by "
                        "the sum of its best topk / group-topk scores)")


def _parallel_args(g):
    g.add_argument("--tensor-model-parallel-size", type=int, default=1,
                   help="TP: attention heads, MLPs and each expert split over this many ranks")
    g.add_argument("--expert-model-parallel-size", "--moe-expert-parallel-size",
                   dest="expert_model_parallel_size", type=int, default=1,
                   help="EP: experts split over this many ranks (divides DP)")
    g.add_argument("--expert-tensor-parallel-size", type=int, default=None,
                   help="ETP: each expert split over this many ranks, a grid of its own (Megatron-"
                        "Core's MoE parallel folding: ETP x EP x expert-DP = world / PP; ETP need "
                        "not divide TP, and the EP group may span TP ranks). Default: TP")
    g.add_argument("--enable-expert-tensor-parallelism", action="store_true",
                   help="accepted for Megatron-DeepSpeed scripts: experts are split over TP here "
                        "unless --expert-tensor-parallel-size says otherwise")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1,
                   help="PP: the layers split into this many pipeline stages (world = TP x CP x "
                        "PP x DP)")
    g.add_argument("--pipeline-schedule", choices=sorted(SCHEDULE_PLACEMENT), default=None,
                   help="1f1b (default), interleaved (default with virtual stages), gpipe, or "
                        "the zero-bubble zbv / dualpipev (two stages per rank in a V), all run by "
                        "torch.distributed.pipelining")
    g.add_argument("--num-virtual-stages-per-pipeline-rank", type=int, default=None,
                   help="model chunks per pipeline rank (interleaved 1F1B; 2 for zbv/dualpipev)")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", type=int, default=None,
                   help="layers per model chunk (another way to give the virtual stages)")
    g.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None,
                   help="layers of the first pipeline stage (default: an even split)")
    g.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None,
                   help="layers of the last pipeline stage (default: an even split)")
    g.add_argument("--sequence-parallel", action="store_true",
                   help="Megatron's sequence parallelism: outside attention and the MLPs each TP "
                        "rank holds 1/TP of the sequence (norms, dropout, residuals); all-gather "
                        "/ reduce-scatter around the TP linears instead of all-reduces; each TP "
                        "rank routes and dispatches its own tokens in the MoE layers (no DTD "
                        "slicing needed). No effect at TP 1")
    g.add_argument("--context-parallel-size", type=int, default=1,
                   help="CP: each sequence split over this many ranks in 2 x CP chunks (rank r "
                        "holds chunks r and 2CP-1-r, Megatron's causal load balance); attention "
                        "all-gathers keys and values over CP, the MoE router decides over the "
                        "whole sequence and each rank sends its own tokens (world = TP x CP x PP "
                        "x DP; the experts' EP x expert-DP spans DP x CP)")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="reduce each gradient bucket while backward still runs (async collectives)")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="with --use-distributed-optimizer: each bucket's parameter all-gather "
                        "overlaps the next forward, which waits for a bucket just before using it")
    g.add_argument("--ddp-bucket-size", dest="bucket_size", type=int, default=None,
                   help="elements per gradient bucket (default with overlap: max(40M, 1M x DP), "
                        "Megatron's; without: one bucket per parameter group)")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="ZeRO-1: shard fp32 master weights and Adam states over DP (experts: "
                        "expert-DP)")
    g.add_argument("--distributed-backend", dest="backend", choices=["nccl", "gloo"], default=None,
                   help="default: nccl with GPUs, gloo without")
    g.add_argument("--distributed-timeout-minutes", dest="timeout_minutes", type=int, default=10,
                   help="collective timeout")


def _train_args(g):
    g.add_argument("--micro-batch-size", type=int, required=True,
                   help="samples per micro-batch and DP rank")
    g.add_argument("--global-batch-size", type=int, default=None, help="default: micro batch x DP")
    add_schedule_args(g)
    g.add_argument("--seed", type=int, default=1234,
                   help="seed of initialization, data order and dropout")


def _optim_args(g):
    g.add_argument("--lr", type=float, required=True, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of decay")
    g.add_argument("--lr-decay-style",
                   choices=["constant", "linear", "cosine", "inverse-square-root"],
                   default="linear", help="learning-rate decay after warmup")
    g.add_argument("--weight-decay", type=float, default=0.01,
                   help="AdamW weight decay (not on biases and norms)")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--adam-beta2", type=float, default=0.999, help="AdamW beta2")
    g.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--clip-grad", type=float, default=1.0,
                   help="global gradient-norm clip (0: off)")
    g.add_argument("--optimizer-tile-size", dest="tile_size", type=int, default=0,
                   help="tiled optimizer step: elements per tile (0 = untiled)")
    g.add_argument("--bf16", action="store_true",
                   help="bf16 parameters and gradients, fp32 master weights")
    g.add_argument("--fp16", action="store_true",
                   help="fp16 with dynamic loss scaling, fp32 master weights")
    g.add_argument("--loss-scale", type=float, default=None,
                   help="fp16 static loss scale (default: dynamic)")
    g.add_argument("--initial-loss-scale", type=float, default=2.0**32,
                   help="fp16 dynamic scale to start from")
    g.add_argument("--min-loss-scale", type=float, default=1.0, help="fp16 dynamic scale floor")
    g.add_argument("--loss-scale-window", type=int, default=1000,
                   help="clean steps before the fp16 scale doubles")
    g.add_argument("--hysteresis", type=int, default=2,
                   help="overflowing steps before the fp16 scale halves")
    g.add_argument("--accumulate-allreduce-grads-in-fp32", action="store_true",
                   help="fp32 gradient buffers for half-precision parameters (always on with "
                        "--bf16)")
    g.add_argument("--check-for-nan-in-loss-and-grad", dest="check_for_nan",
                   action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 / fp32: stop at the first non-finite loss or gradient norm, before "
                        "the update (fp16 skips such steps and lowers the loss scale instead)")
    g.add_argument("--grad-reduce-in-bf16", action="store_true",
                   help="with --bf16: accumulate and reduce gradients in bf16 (half the buffer "
                        "and bytes)")


def _data_args(g):
    g.add_argument("--data-path", nargs="*", default=None, help="PREFIX ... or WEIGHT PREFIX ...")
    g.add_argument("--split", default="969, 30, 1",
                   help="train, valid, test weights of each --data-path prefix")
    g.add_argument("--mock-data", dest="mock", action="store_true",
                   help="deterministic synthetic data")
    g.add_argument("--data-cache-path", dest="cache_dir", default=None,
                   help="where dataset index caches go (default: beside the data)")
    g.add_argument("--eod-mask-loss", action="store_true", help="no loss on end-of-document tokens")
    g.add_argument("--tokenizer-type", default=None,
                   help="SentencePieceTokenizer | GPT2BPETokenizer | NullTokenizer (default with "
                        "--mock-data)")
    g.add_argument("--tokenizer-model", default=None,
                   help="sentencepiece .model (SentencePieceTokenizer)")
    g.add_argument("--vocab-file", default=None,
                   help="GPT-2 vocab.json / encoder.json (GPT2BPETokenizer)")
    g.add_argument("--merge-file", default=None,
                   help="GPT-2 merges.txt / vocab.bpe (GPT2BPETokenizer)")
    g.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer vocabulary size")
    g.add_argument("--num-workers", type=int, default=2,
                   help="data-loader worker processes per rank (0: in the training process)")


def _log_args(g):
    g.add_argument("--log-interval", type=int, default=100, help="iterations per log line")
    g.add_argument("--eval-interval", type=int, default=1000,
                   help="iterations between validation runs")
    g.add_argument("--eval-iters", type=int, default=100,
                   help="global batches per validation / test run")
    g.add_argument("--tensorboard-dir", default=None,
                   help="write TensorBoard scalars here (needs tensorboard)")
    g.add_argument("--tensorboard-queue-size", type=int, default=1000,
                   help="TensorBoard events kept in memory before a write to disk")
    g.add_argument("--tensorboard-log-interval", type=int, default=1,
                   help="iterations between TensorBoard scalars")
    g.add_argument("--log-timers-to-tensorboard", action="store_true",
                   help="write the step's timers (forward-backward, optimizer, whole iteration) to "
                        "TensorBoard")
    g.add_argument("--log-batch-size-to-tensorboard", action="store_true",
                   help="write the global batch size too")
    g.add_argument("--log-memory-to-tensorboard", action="store_true",
                   help="write memory too: Megatron's mem-reserved-bytes, mem-allocated-bytes, "
                        "mem-max-allocated-bytes (the CUDA allocator's; on CPU the resident set, "
                        "current and peak)")
    add_logging_flags(g)


def _checkpoint_args(g):
    g.add_argument("--save", default=None,
                   help="directory to save checkpoints to (iter_NNNNNNN/ folders)")
    g.add_argument("--save-interval", type=int, default=None,
                   help="iterations between checkpoints (and one at the end of training)")
    g.add_argument("--load", default=None,
                   help="resume from this directory's latest checkpoint (none there: start from "
                        "scratch)")
    g.add_argument("--no-load-optim", action="store_true",
                   help="load the weights only: fresh optimizer and schedule")
    g.add_argument("--no-load-rng", action="store_true",
                   help="do not restore the random-number generators")
    g.add_argument("--finetune", action="store_true",
                   help="load the weights only and start at iteration 0 (no optimizer, schedule "
                        "or RNG)")
    g.add_argument("--async-save", action="store_true",
                   help="write checkpoints in the background (a snapshot is taken, training goes "
                        "on)")
    g.add_argument("--exit-interval", dest="interval", type=int, default=None,
                   help="save (with --save) and exit 0 once the iteration is a multiple of this")
    g.add_argument("--exit-duration-in-mins", dest="duration_minutes", type=float, default=None,
                   help="save (with --save) and exit 0 after this many minutes of training (rank "
                        "0's clock)")
    g.add_argument("--exit-signal-handler", dest="signal_handler", action="store_true",
                   help="on --exit-signal, finish the iteration, save (with --save) and exit 0 on "
                        "every rank")
    g.add_argument("--exit-signal", dest="signal_name", default="SIGTERM",
                   help="the signal --exit-signal-handler acts on (e.g. SIGUSR1)")
    g.add_argument("--ckpt-format", choices=["torch_dist", "torch", "fsdp_dtensor"],
                   default="torch_dist",
                   help="torch_dist: torch.distributed.checkpoint, resumable at any TP/EP/DP (the "
                        "only format written). torch (Megatron-LM's legacy format) is accepted "
                        "with one notice and also writes torch_dist; --load does not read a "
                        "legacy torch folder: convert it first with tools/checkpoint_convert.py "
                        "import --from megatron-legacy SRC DST")
    g.add_argument("--save-retain-interval", type=int, default=None,
                   help="after each save, delete older checkpoints whose iteration is not a "
                        "multiple of this (the latest is always kept)")
    g.add_argument("--no-verify-checkpoint", dest="verify", action="store_false",
                   help="load without comparing every stored chunk with its checksum")
    g.add_argument("--verify-integrity", dest="verify", action="store_true",
                   help="compare every stored chunk with its checksum on load (the default)")
    add_checkpoint_switches(g)


def parse_args(argv=None) -> argparse.Namespace:
    """Flags -> namespace, the peers' flags mapped onto ours; `args.notices`: lines to print
    once."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    try:
        args.notices = resolve_peer_args(args, argv, parser)
    except ValueError as e:
        parser.error(str(e))
    args.notices += _ckpt_format_notice(args, parser)
    return args


def _ckpt_format_notice(args, parser) -> list[str]:
    """Megatron-LM's scripts say --ckpt-format torch: we write torch_dist, which loads at any
    layout; fsdp_dtensor is Megatron-FSDP's, which has no counterpart here."""
    if args.ckpt_format == "fsdp_dtensor":
        parser.error("--ckpt-format fsdp_dtensor is Megatron-FSDP's format, not written here: use "
                     "--ckpt-format torch_dist (the default; loadable at any TP/EP/DP)")
    if args.ckpt_format == "torch":
        args.ckpt_format = "torch_dist"
        return ["--ckpt-format torch: checkpoints are written as torch_dist "
                "(torch.distributed.checkpoint, layout-free: loadable at any TP/EP/DP)"]
    return []
