"""Megatron-compatible command line -> typed configs. The only place argv is parsed.

`parse_args` reads flags (Megatron-LM names; Megatron-DeepSpeed's MoE names as aliases);
`build_config` turns them, with the world size and the tokenizer's vocabulary, into frozen
configs and checks every rule that can fail, so a bad launch dies on every rank with one clear
line before any process group exists.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

import torch

from megatron.model.config import ModelConfig, RecomputeConfig
from megatron.checkpoint import CheckpointConfig
from megatron.data.config import DataConfig
from megatron.training.exits import ExitConfig
from megatron.cli.peer_flags import add_peer_args, resolve_peer_args
from megatron.training.lr_schedule import ScheduleError, add_schedule_args, schedule_from_args
from megatron.training.config import Config, TensorBoardConfig, TrainConfig
from megatron.training.optimizer import OptimizerConfig
from ted_patches.config import AUX_LOSS_TYPES, DROP_POLICIES, GATE_NORMALIZATIONS, MLP_TYPES, MoEConfig, moe_layer_indices
from megatron.parallel.topology import Topology, check_layout


class ConfigError(ValueError):
    """A bad flag or flag combination; the message names the flag and a way out."""


# ---- the parser -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain_gpt_moe.py", allow_abbrev=False,
        description="Megatron-TED: GPT-MoE pretraining with tensor-expert-data parallelism.",
    )
    _model_args(p.add_argument_group("model"))
    _moe_args(p.add_argument_group("mixture of experts (Megatron-Core names; Megatron-DeepSpeed aliases)"))
    _parallel_args(p.add_argument_group("parallelism"))
    _train_args(p.add_argument_group("training"))
    _optim_args(p.add_argument_group("optimizer and precision"))
    _data_args(p.add_argument_group("data and tokenizer"))
    _log_args(p.add_argument_group("logging and evaluation"))
    _checkpoint_args(p.add_argument_group("checkpointing (Megatron-LM's flags)"))
    add_peer_args(p)
    return p


def _model_args(g):
    g.add_argument("--num-layers", type=int, required=True, help="transformer layers")
    g.add_argument("--hidden-size", type=int, required=True, help="model width")
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default: 4 x hidden size")
    g.add_argument("--num-attention-heads", type=int, required=True, help="attention heads (divisible by TP)")
    g.add_argument("--seq-length", type=int, required=True, help="tokens per sample")
    g.add_argument("--max-position-embeddings", type=int, default=None, help="default: --seq-length")
    g.add_argument("--position-embedding-type", choices=["learned_absolute", "rope"], default="learned_absolute", help="learned absolute positions or rotary")
    g.add_argument("--rotary-base", type=float, default=10000.0, help="RoPE base frequency")
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm", help="normalization layer")
    g.add_argument("--norm-epsilon", type=float, default=1e-5, help="epsilon of LayerNorm / RMSNorm")
    g.add_argument("--group-query-attention", action="store_true",
                   help="grouped-query attention with --num-query-groups key/value heads (Megatron-LM)")
    g.add_argument("--num-query-groups", type=int, default=1,
                   help="key/value heads with --group-query-attention (divisible by TP; divides the heads)")
    g.add_argument("--swiglu", action="store_true", help="SwiGLU instead of GELU in MLPs and experts")
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true", help="a separate output layer instead of the embedding's transpose")
    g.add_argument("--disable-bias-linear", action="store_true", help="no biases in linear layers")
    g.add_argument("--hidden-dropout", type=float, default=0.1, help="dropout on the residual branches and embeddings")
    g.add_argument("--attention-dropout", type=float, default=0.1, help="dropout on attention probabilities")
    g.add_argument("--init-method-std", type=float, default=0.02, help="std of the normal init (output layers: / sqrt(2 x layers))")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the vocabulary to a multiple of this x TP")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None,
                   help="activation checkpointing: full = whole layers; selective = the attention core")
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None,
                   help="full recompute: uniform = every --recompute-num-layers layers as one chunk; "
                        "block = only the first --recompute-num-layers layers")
    g.add_argument("--recompute-num-layers", type=int, default=1, help="layers per recompute chunk (uniform) or recomputed layers (block)")
    g.add_argument("--disable-moe-cac", action="store_true",
                   help="turn off communication-aware checkpointing (recompute then repeats the "
                        "MoE all-to-alls)")


def _moe_args(g):
    g.add_argument("--num-experts", type=int, nargs="+", default=None,
                   help="experts per MoE layer (none or 1: dense GPT); one count per MoE layer for a pyramid "
                        "(Megatron-DeepSpeed's PR-MoE with --mlp-type residual)")
    g.add_argument("--expert-interval", type=int, default=None,
                   help="MoE in layers N, 2N, ... (1-based, Megatron-DeepSpeed; default 2)")
    g.add_argument("--moe-layer-freq", type=int, default=None,
                   help="MoE in layers 0, N, 2N, ... (0-based, Megatron-Core)")
    g.add_argument("--moe-router-topk", "--topk", dest="topk", type=int, default=1, help="experts per token (default 1, as Megatron-DeepSpeed; Megatron-Core defaults to 2)")
    g.add_argument("--moe-expert-capacity-factor", "--moe-train-capacity-factor", dest="capacity_factor",
                   type=float, default=1.0, help="training capacity: ceil(tokens / experts x factor x top-k) slots per expert (default 1.0 with dropping, as DeepSpeed; Megatron-Core scripts that omit it mean dropless: add --disable-moe-token-dropping)")
    g.add_argument("--moe-eval-capacity-factor", dest="eval_capacity_factor", type=float, default=1.0, help="capacity factor in evaluation")
    g.add_argument("--moe-min-capacity", type=int, default=4, help="at least this many slots per expert")
    g.add_argument("--disable-moe-token-dropping", action="store_true",
                   help="no capacity limit: capacity = the fullest expert over the EP group")
    g.add_argument("--moe-token-drop-policy", choices=DROP_POLICIES, default="position", help="position: DeepSpeed's order (the default): for top-1/top-2 first choices in token order, then second choices; for top-k >= 3 token order over all k choices (its topkgating); choice: first choices, then second, ... for every k; probs: the most probable (Megatron-Core's default)")
    g.add_argument("--moe-gate-normalization", choices=GATE_NORMALIZATIONS, default="surviving",
                   help="surviving: renormalize top-k gates over kept choices (DeepSpeed); "
                        "topk: before dropping (Megatron-Core); none: raw probabilities")
    g.add_argument("--moe-router-load-balancing-type", choices=AUX_LOSS_TYPES, default="deepspeed",
                   help="deepspeed: first choices only; aux_loss: Megatron-Core's switch loss over k choices / k")
    g.add_argument("--moe-aux-loss-coeff", "--moe-loss-coeff", dest="aux_loss_coeff", type=float, default=0.01, help="weight of the load-balancing loss")
    g.add_argument("--moe-z-loss-coeff", type=float, default=0.0, help="weight of the router z-loss, mean(logsumexp(logits)^2)")
    g.add_argument("--moe-input-jitter-eps", type=float, default=0.0, help="multiplicative uniform noise on the router input in training")
    g.add_argument("--moe-ffn-hidden-size", type=int, default=None, help="expert FFN size (default: --ffn-hidden-size)")
    g.add_argument("--mlp-type", choices=MLP_TYPES, default="standard", help="residual: Megatron-DeepSpeed's residual MoE")
    g.add_argument("--disable-moe-dtd", action="store_true", help="turn off duplicate token dropping")
    g.add_argument("--moe-pad-free", action=argparse.BooleanOptionalAction, default=None,
                   help="padding-free dispatch: send and compute only kept tokens (variable all-to-all splits after one count exchange, grouped GEMMs over the real rows); the same kept tokens and numbers as the padded path. Default: on CPUs and in no-drop mode, off on accelerators in drop mode (where the padded path never synchronizes with the host)")
    g.add_argument("--check-tp-routing", type=int, nargs="?", const=1, default=0, metavar="N",
                   help="every N-th forward of each MoE layer (flag alone: every one), check that the TP ranks routed identically (one small all-reduce and a host read); stops with an error if not (DTD needs identical routing)")


def _parallel_args(g):
    g.add_argument("--tensor-model-parallel-size", type=int, default=1, help="TP: attention heads, MLPs and each expert split over this many ranks")
    g.add_argument("--expert-model-parallel-size", "--moe-expert-parallel-size", dest="expert_model_parallel_size",
                   type=int, default=1, help="EP: experts split over this many ranks (divides DP)")
    g.add_argument("--expert-tensor-parallel-size", type=int, default=None,
                   help="must equal --tensor-model-parallel-size (TED splits experts over TP)")
    g.add_argument("--enable-expert-tensor-parallelism", action="store_true",
                   help="accepted for Megatron-DeepSpeed scripts: experts are always split over TP here")
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1, help="only 1 is supported")
    g.add_argument("--sequence-parallel", action="store_true", help="not supported")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="reduce each gradient bucket while backward still runs (async collectives)")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="with --use-distributed-optimizer: each bucket's parameter all-gather overlaps the next "
                        "forward, which waits for a bucket just before using it")
    g.add_argument("--ddp-bucket-size", type=int, default=None,
                   help="elements per gradient bucket (default with overlap: max(40M, 1M x DP), Megatron's; "
                        "without: one bucket per parameter group)")
    g.add_argument("--use-distributed-optimizer", action="store_true",
                   help="ZeRO-1: shard fp32 master weights and Adam states over DP (experts: expert-DP)")
    g.add_argument("--distributed-backend", choices=["nccl", "gloo"], default=None,
                   help="default: nccl with GPUs, gloo without")
    g.add_argument("--distributed-timeout-minutes", type=int, default=10, help="collective timeout")


def _train_args(g):
    g.add_argument("--micro-batch-size", type=int, required=True, help="samples per micro-batch and DP rank")
    g.add_argument("--global-batch-size", type=int, default=None, help="default: micro batch x DP")
    add_schedule_args(g)
    g.add_argument("--seed", type=int, default=1234, help="seed of initialization, data order and dropout")


def _optim_args(g):
    g.add_argument("--lr", type=float, required=True, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=0.0, help="learning rate at the end of decay")
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine", "inverse-square-root"], default="linear", help="learning-rate decay after warmup")
    g.add_argument("--weight-decay", type=float, default=0.01, help="AdamW weight decay (not on biases and norms)")
    g.add_argument("--adam-beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--adam-beta2", type=float, default=0.999, help="AdamW beta2")
    g.add_argument("--adam-eps", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--clip-grad", type=float, default=1.0, help="global gradient-norm clip (0: off)")
    g.add_argument("--optimizer-tile-size", type=int, default=0,
                   help="tiled optimizer step: elements per tile (0 = untiled)")
    g.add_argument("--bf16", action="store_true", help="bf16 parameters and gradients, fp32 master weights")
    g.add_argument("--fp16", action="store_true", help="fp16 with dynamic loss scaling, fp32 master weights")
    g.add_argument("--loss-scale", type=float, default=None, help="fp16 static loss scale (default: dynamic)")
    g.add_argument("--initial-loss-scale", type=float, default=2.0**32, help="fp16 dynamic scale to start from")
    g.add_argument("--min-loss-scale", type=float, default=1.0, help="fp16 dynamic scale floor")
    g.add_argument("--loss-scale-window", type=int, default=1000, help="clean steps before the fp16 scale doubles")
    g.add_argument("--hysteresis", type=int, default=2, help="overflowing steps before the fp16 scale halves")
    g.add_argument("--accumulate-allreduce-grads-in-fp32", action="store_true",
                   help="fp32 gradient buffers for half-precision parameters (always on with --bf16)")
    g.add_argument("--check-for-nan-in-loss-and-grad", action=argparse.BooleanOptionalAction, default=True,
                   help="bf16 / fp32: stop at the first non-finite loss or gradient norm, before the update "
                        "(fp16 skips such steps and lowers the loss scale instead)")
    g.add_argument("--grad-reduce-in-bf16", action="store_true",
                   help="with --bf16: accumulate and reduce gradients in bf16 (half the buffer and bytes)")


def _data_args(g):
    g.add_argument("--data-path", nargs="*", default=None, help="PREFIX ... or WEIGHT PREFIX ...")
    g.add_argument("--split", default="969, 30, 1", help="train, valid, test weights of each --data-path prefix")
    g.add_argument("--mock-data", action="store_true", help="deterministic synthetic data")
    g.add_argument("--data-cache-path", default=None, help="where dataset index caches go (default: beside the data)")
    g.add_argument("--eod-mask-loss", action="store_true", help="no loss on end-of-document tokens")
    g.add_argument("--tokenizer-type", default=None,
                   help="SentencePieceTokenizer | GPT2BPETokenizer | NullTokenizer (default with --mock-data)")
    g.add_argument("--tokenizer-model", default=None, help="sentencepiece .model (SentencePieceTokenizer)")
    g.add_argument("--vocab-file", default=None, help="GPT-2 vocab.json / encoder.json (GPT2BPETokenizer)")
    g.add_argument("--merge-file", default=None, help="GPT-2 merges.txt / vocab.bpe (GPT2BPETokenizer)")
    g.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer vocabulary size")
    g.add_argument("--num-workers", type=int, default=2, help="data-loader worker processes per rank (0: in the "
                                                                "training process)")


def _log_args(g):
    g.add_argument("--log-interval", type=int, default=100, help="iterations per log line")
    g.add_argument("--eval-interval", type=int, default=1000, help="iterations between validation runs")
    g.add_argument("--eval-iters", type=int, default=100, help="global batches per validation / test run")
    g.add_argument("--tensorboard-dir", default=None, help="write TensorBoard scalars here (needs tensorboard)")
    g.add_argument("--tensorboard-queue-size", type=int, default=1000,
                   help="TensorBoard events kept in memory before a write to disk")
    g.add_argument("--tensorboard-log-interval", type=int, default=1, help="iterations between TensorBoard scalars")
    g.add_argument("--log-timers-to-tensorboard", action="store_true",
                   help="write the step's timers (forward-backward, optimizer, whole iteration) to TensorBoard")
    g.add_argument("--log-batch-size-to-tensorboard", action="store_true", help="write the global batch size too")
    g.add_argument("--log-memory-to-tensorboard", action="store_true",
                   help="write memory (peak CUDA allocation, or resident set size on CPU) too")


def _checkpoint_args(g):
    g.add_argument("--save", default=None, help="directory to save checkpoints to (iter_NNNNNNN/ folders)")
    g.add_argument("--save-interval", type=int, default=None,
                   help="iterations between checkpoints (and one at the end of training)")
    g.add_argument("--load", default=None,
                   help="resume from this directory's latest checkpoint (none there: start from scratch)")
    g.add_argument("--no-load-optim", action="store_true", help="load the weights only: fresh optimizer and schedule")
    g.add_argument("--no-load-rng", action="store_true", help="do not restore the random-number generators")
    g.add_argument("--finetune", action="store_true",
                   help="load the weights only and start at iteration 0 (no optimizer, schedule or RNG)")
    g.add_argument("--async-save", action="store_true",
                   help="write checkpoints in the background (a snapshot is taken, training goes on)")
    g.add_argument("--exit-interval", type=int, default=None,
                   help="save (with --save) and exit 0 once the iteration is a multiple of this")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="save (with --save) and exit 0 after this many minutes of training (rank 0's clock)")
    g.add_argument("--exit-signal-handler", action="store_true",
                   help="on --exit-signal, finish the iteration, save (with --save) and exit 0 on every rank")
    g.add_argument("--exit-signal", default="SIGTERM", help="the signal --exit-signal-handler acts on (e.g. SIGUSR1)")
    g.add_argument("--ckpt-format", choices=["torch_dist"], default="torch_dist",
                   help="torch.distributed.checkpoint, resumable at any TP/EP/DP (the only format)")


def parse_args(argv=None) -> argparse.Namespace:
    """Flags -> namespace, the peers' flags mapped onto ours; `args.notices`: lines to print once."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    try:
        args.notices = resolve_peer_args(args, argv, parser)
    except ValueError as e:
        parser.error(str(e))
    return args


# ---- namespace -> configs -----------------------------------------------------------------------
# Megatron-LM's names for a sentencepiece model read through the same tokenizer
TOKENIZER_ALIASES = {"Llama2Tokenizer": "SentencePieceTokenizer", "GPTSentencePieceTokenizer": "SentencePieceTokenizer"}


def tokenizer_kwargs(args) -> dict:
    kind = args.tokenizer_type or ("NullTokenizer" if args.mock_data else None)
    if kind is None:
        raise ConfigError("--tokenizer-type is required with --data-path "
                          "(SentencePieceTokenizer, GPT2BPETokenizer or NullTokenizer)")
    kind = TOKENIZER_ALIASES.get(kind, kind)
    return dict(tokenizer_type=kind, tokenizer_model=args.tokenizer_model, vocab_file=args.vocab_file,
                merge_file=args.merge_file, vocab_size=args.vocab_size)


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    if divisible_by < 1:
        raise ConfigError(f"--make-vocab-size-divisible-by must be >= 1 (got {divisible_by})")
    multiple = divisible_by * tp
    return -(-vocab_size // multiple) * multiple


def build_config(args, world_size: int, vocab_size: int) -> Config:
    """All checks that can fail, in the order a user would fix them. Raises ConfigError."""
    try:
        return _build(args, world_size, vocab_size)
    except ConfigError:
        raise
    except ValueError as e:  # a config dataclass's own check: same contract
        raise ConfigError(str(e)) from None


def _build(args, world_size: int, vocab_size: int) -> Config:
    _check_unsupported(args)
    _check_batch_sizes(args)
    tp, ep = args.tensor_model_parallel_size, args.expert_model_parallel_size
    model = _model_config(args, tp, vocab_size)
    moe = _moe_config(args, ep)
    # Every size split over TP or EP is known now: a bad layout's suggestions fit all of them.
    check_layout(world_size, tp, ep, tp_divides={**model.tp_split_sizes(), **(moe.tp_split_sizes() if moe else {})},
                 ep_divides=moe.ep_split_sizes() if moe else {})
    topology = Topology(world_size, tp, ep)
    train = _train_config(args, topology)
    optim = OptimizerConfig(
        lr=args.lr, min_lr=args.min_lr, weight_decay=args.weight_decay, adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2, adam_eps=args.adam_eps, clip_grad=args.clip_grad,
        use_distributed_optimizer=args.use_distributed_optimizer, tile_size=args.optimizer_tile_size,
        fp16=args.fp16, loss_scale=args.loss_scale, initial_loss_scale=args.initial_loss_scale,
        min_loss_scale=args.min_loss_scale, loss_scale_window=args.loss_scale_window,
        hysteresis=args.hysteresis, check_for_nan=args.check_for_nan_in_loss_and_grad,
        bucket_size=args.ddp_bucket_size or (max(40_000_000, 1_000_000 * topology.dp)
                                             if args.overlap_grad_reduce or args.overlap_param_gather else None),
        overlap_grad_reduce=args.overlap_grad_reduce, overlap_param_gather=args.overlap_param_gather,
        # Megatron-LM: bf16 accumulates and reduces gradients in fp32 unless told otherwise
        accumulate_grads_in_fp32=args.accumulate_allreduce_grads_in_fp32 or (args.bf16 and not args.grad_reduce_in_bf16),
    )
    _check_optimizer_ranges(args)
    recompute = RecomputeConfig(args.recompute_granularity, args.recompute_method, args.recompute_num_layers,
                                cac=not args.disable_moe_cac)
    recompute.check(model.num_layers)
    return Config(topology, model, moe, recompute, optim, train, _data_config(args), _checkpoint_config(args),
                  _exit_config(args), tuple(getattr(args, "notices", ())))


def _check_optimizer_ranges(args) -> None:
    checks = [
        (args.lr > 0, f"--lr must be > 0 (got {args.lr})"),
        (args.min_lr >= 0, f"--min-lr must be >= 0 (got {args.min_lr})"),
        (args.min_lr <= args.lr, f"--min-lr {args.min_lr} is above --lr {args.lr}"),
        (args.weight_decay >= 0, f"--weight-decay must be >= 0 (got {args.weight_decay})"),
        (0 <= args.adam_beta1 < 1, f"--adam-beta1 must be in [0, 1) (got {args.adam_beta1})"),
        (0 <= args.adam_beta2 < 1, f"--adam-beta2 must be in [0, 1) (got {args.adam_beta2})"),
        (args.adam_eps > 0, f"--adam-eps must be > 0 (got {args.adam_eps})"),
        (args.clip_grad >= 0, f"--clip-grad must be >= 0, 0 = no clipping (got {args.clip_grad})"),
        (args.optimizer_tile_size >= 0, "--optimizer-tile-size must be >= 0 (0 = untiled)"),
        (args.loss_scale_window >= 1, f"--loss-scale-window must be >= 1 (got {args.loss_scale_window})"),
        (args.hysteresis >= 1, f"--hysteresis must be >= 1 (got {args.hysteresis})"),
        (args.min_loss_scale > 0 and args.initial_loss_scale >= args.min_loss_scale,
         "--initial-loss-scale must be >= --min-loss-scale > 0"),
        (args.loss_scale is None or args.loss_scale > 0, f"--loss-scale must be > 0 (got {args.loss_scale})"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _check_batch_sizes(args) -> None:
    for flag, value in (("--micro-batch-size", args.micro_batch_size), ("--global-batch-size", args.global_batch_size),
                        ("--seq-length", args.seq_length), ("--lr-decay-iters", args.lr_decay_iters)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1 (got {value})")


def _check_unsupported(args) -> None:
    if args.pipeline_model_parallel_size != 1:
        raise ConfigError("--pipeline-model-parallel-size must be 1: pipeline parallelism is not supported; "
                          "use --tensor-model-parallel-size / --expert-model-parallel-size")
    if args.sequence_parallel:
        raise ConfigError("--sequence-parallel is not supported; drop the flag")
    if args.expert_tensor_parallel_size not in (None, args.tensor_model_parallel_size):
        raise ConfigError(f"--expert-tensor-parallel-size {args.expert_tensor_parallel_size} must equal "
                          f"--tensor-model-parallel-size {args.tensor_model_parallel_size} (TED splits "
                          "each expert over the TP group); drop the flag")
    if args.overlap_param_gather and not args.use_distributed_optimizer:
        raise ConfigError("--overlap-param-gather needs --use-distributed-optimizer (it overlaps ZeRO-1's "
                          "parameter all-gather)")
    if args.ddp_bucket_size is not None and args.ddp_bucket_size < 1:
        raise ConfigError(f"--ddp-bucket-size must be >= 1 (got {args.ddp_bucket_size})")
    if args.fp16 and args.bf16:
        raise ConfigError("--fp16 and --bf16 are both given: choose one")
    if args.expert_interval is not None and args.moe_layer_freq is not None:
        raise ConfigError("--expert-interval and --moe-layer-freq are both given: choose one")


def _model_config(args, tp: int, vocab_size: int) -> ModelConfig:
    max_pos = args.max_position_embeddings or args.seq_length
    if args.position_embedding_type == "learned_absolute" and args.seq_length > max_pos:
        raise ConfigError(f"--seq-length {args.seq_length} exceeds --max-position-embeddings {max_pos}")
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    model = ModelConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        vocab_size=vocab_size,
        padded_vocab_size=padded_vocab_size(vocab_size, args.make_vocab_size_divisible_by, max(tp, 1)),
        max_position_embeddings=max_pos, ffn_hidden_size=args.ffn_hidden_size,
        position_embedding_type=args.position_embedding_type, rotary_base=args.rotary_base,
        normalization=args.normalization, norm_epsilon=args.norm_epsilon, swiglu=args.swiglu,
        add_bias_linear=not args.disable_bias_linear,
        untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
        hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std, params_dtype=dtype,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
    )
    return model


def _moe_config(args, ep: int) -> Optional[MoEConfig]:
    counts = args.num_experts or [1]
    if counts == [1]:  # Megatron-DeepSpeed: --num-experts 1 means a dense model
        if ep > 1:
            raise ConfigError(f"--expert-model-parallel-size {ep} needs --num-experts")
        return None
    for flag, value in (("--expert-interval", args.expert_interval), ("--moe-layer-freq", args.moe_layer_freq)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1 (got {value})")
    if args.expert_interval is None and args.moe_layer_freq is None:
        layers = moe_layer_indices(args.num_layers, expert_interval=2)
    else:
        layers = moe_layer_indices(args.num_layers, expert_interval=args.expert_interval, layer_freq=args.moe_layer_freq)
    if not layers:
        raise ConfigError(f"no layer of --num-layers {args.num_layers} gets an MoE block with --expert-interval "
                          f"{args.expert_interval}: use an interval <= --num-layers")
    moe = MoEConfig(
        num_experts=counts[0], experts_per_layer=tuple(counts) if len(counts) > 1 else None, layers=layers, topk=args.topk, capacity_factor=args.capacity_factor,
        eval_capacity_factor=args.eval_capacity_factor, min_capacity=args.moe_min_capacity,
        drop_tokens=not args.disable_moe_token_dropping, drop_policy=args.moe_token_drop_policy,
        gate_normalization=args.moe_gate_normalization, aux_loss_type=args.moe_router_load_balancing_type,
        aux_loss_coeff=args.aux_loss_coeff, z_loss_coeff=args.moe_z_loss_coeff, jitter_eps=args.moe_input_jitter_eps,
        dtd=not args.disable_moe_dtd, mlp_type=args.mlp_type, expert_ffn_hidden_size=args.moe_ffn_hidden_size,
        pad_free=args.moe_pad_free, check_tp_routing=args.check_tp_routing,
    )
    return moe


def _train_config(args, topology: Topology) -> TrainConfig:
    dp, mbs = topology.dp, args.micro_batch_size
    accumulation = getattr(args, "deepspeed_gradient_accumulation_steps", None)
    gbs = args.global_batch_size or mbs * dp * (accumulation or 1)
    if accumulation is not None and gbs != mbs * dp * accumulation:
        raise ConfigError(f"--global-batch-size {gbs} != --micro-batch-size {mbs} x data-parallel size {dp} x "
                          f"gradient_accumulation_steps {accumulation} of --deepspeed_config: make them agree")
    if gbs % (mbs * dp):
        raise ConfigError(
            f"--global-batch-size {gbs} is not divisible by --micro-batch-size {mbs} x data-parallel size {dp}; "
            f"use a multiple of {mbs * dp}, e.g. {mbs * dp * max(1, round(gbs / (mbs * dp)))}"
        )
    for flag, value in (("--log-interval", args.log_interval), ("--eval-interval", args.eval_interval)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1 (got {value})")
    if args.eval_iters < 0:
        raise ConfigError(f"--eval-iters must be >= 0 (got {args.eval_iters})")
    if args.lr_warmup_iters < 0:
        raise ConfigError(f"--lr-warmup-iters must be >= 0 (got {args.lr_warmup_iters})")
    try:
        schedule = schedule_from_args(args, gbs, args.seq_length)
    except ScheduleError as e:
        raise ConfigError(str(e)) from None
    return TrainConfig(
        micro_batch_size=mbs, global_batch_size=gbs, seq_length=args.seq_length, seed=args.seed, schedule=schedule,
        eval_interval=args.eval_interval, eval_iters=args.eval_iters, log_interval=args.log_interval,
        tensorboard_dir=args.tensorboard_dir, tensorboard=_tensorboard_config(args), backend=args.distributed_backend, timeout_minutes=args.distributed_timeout_minutes,
    )


def _tensorboard_config(args) -> TensorBoardConfig:
    for flag, value in (("--tensorboard-queue-size", args.tensorboard_queue_size),
                        ("--tensorboard-log-interval", args.tensorboard_log_interval)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1 (got {value})")
    return TensorBoardConfig(args.tensorboard_queue_size, args.tensorboard_log_interval, args.log_timers_to_tensorboard,
                             args.log_batch_size_to_tensorboard, args.log_memory_to_tensorboard,
                             args.log_validation_ppl_to_tensorboard)


def _checkpoint_config(args) -> CheckpointConfig:
    if args.save_interval is not None and args.save_interval < 1:
        raise ConfigError(f"--save-interval must be >= 1 (got {args.save_interval})")
    if args.async_save and not args.save:
        raise ConfigError("--async-save needs --save DIR")
    return CheckpointConfig(save=args.save, save_interval=args.save_interval, load=args.load,
                            no_load_optim=args.no_load_optim, no_load_rng=args.no_load_rng, finetune=args.finetune,
                            async_save=args.async_save)


def _exit_config(args) -> ExitConfig:
    import signal

    for flag, value in (("--exit-interval", args.exit_interval), ("--exit-duration-in-mins", args.exit_duration_in_mins)):
        if value is not None and value <= 0:
            raise ConfigError(f"{flag} must be > 0 (got {value})")
    name = args.exit_signal if args.exit_signal.startswith("SIG") else "SIG" + args.exit_signal
    if not isinstance(getattr(signal, name, None), signal.Signals) or name in ("SIGKILL", "SIGSTOP"):
        raise ConfigError(f"--exit-signal {args.exit_signal}: use a catchable signal name such as SIGTERM or SIGUSR1")
    return ExitConfig(args.exit_interval, args.exit_duration_in_mins, args.exit_signal_handler, name)


def _data_config(args) -> DataConfig:
    if not args.mock_data and not args.data_path:
        raise ConfigError("no training data: give --data-path PREFIX [...] (from tools/preprocess_data.py) "
                          "or --mock-data")
    kw = tokenizer_kwargs(args)
    if args.num_workers < 0:
        raise ConfigError(f"--num-workers must be >= 0 (got {args.num_workers})")
    return DataConfig(num_workers=args.num_workers, data_path=args.data_path, split=args.split, mock=args.mock_data,
                      cache_dir=args.data_cache_path, eod_mask_loss=args.eod_mask_loss, **kw)
