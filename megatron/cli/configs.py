"""Parsed flags -> the run's frozen configs (megatron.training.config.Config), checked.

One declaration per knob: a flag's `dest` is the name of the config field it sets, so
`fields_from` copies every such value by name; only what a flag does not hold as such (derived
defaults, a value spread over several flags) is written out below. Library code raises
`FieldError`s that name config fields; `build_config` shows them with the flags a user typed
(`flag_names`), so every message names a flag.
"""

from __future__ import annotations

import math

import dataclasses
import signal
from typing import Optional

import torch

from megatron.checkpoint import CheckpointConfig
from megatron.cli.arguments import ConfigError, build_parser
from megatron.cli.schedule import ScheduleError, schedule_from_args
from megatron.data.config import DataConfig
from megatron.model.config import ModelConfig, RecomputeConfig
from megatron.parallel.fields import FieldError
from megatron.parallel.stages import SCHEDULE_PLACEMENT, StagePlan
from megatron.parallel.topology import LayoutError, Topology, check_layout
from megatron.training.config import Config, TensorBoardConfig, TrainConfig
from megatron.training.exits import ExitConfig
from megatron.training.optimizer import OptimizerConfig
from megatron.training.options import LogConfig, RuntimeConfig
from ted_patches.config import MoEConfig, moe_layer_indices

# Megatron-LM's names for a sentencepiece model read through the same tokenizer
TOKENIZER_ALIASES = {"Llama2Tokenizer": "SentencePieceTokenizer",
                     "GPTSentencePieceTokenizer": "SentencePieceTokenizer"}
# Config fields no single flag holds under their own name: how a message names them.
DERIVED_NAMES = {
    "layers": "--expert-interval / --moe-layer-freq", "experts_per_layer": "--num-experts",
    "params_dtype": "--bf16 / --fp16", "padded_vocab_size": "the padded vocabulary",
    "world_size": "world size", "tensor_model_parallel_size": "--tensor-model-parallel-size",
    "expert_model_parallel_size": "--expert-model-parallel-size",
}
# Fields whose name another config shares: (config class, field) -> flag
QUALIFIED_NAMES = {("RecomputeConfig", "num_layers"): "--recompute-num-layers",
                   ("RecomputeConfig", "granularity"): "--recompute-granularity",
                   ("RecomputeConfig", "method"): "--recompute-method",
                   ("ModelConfig", "vocab_size"): "vocabulary size"}


def flag_names(owner: str | None = None) -> dict[str, str]:
    """{config field: the flag that sets it} (for `owner`'s fields where names are shared)."""
    names = {a.dest: a.option_strings[0] for a in build_parser()._actions if a.option_strings}
    names.update(DERIVED_NAMES)
    names.update({field: flag for (cls, field), flag in QUALIFIED_NAMES.items() if cls == owner})
    return names


def fields_from(cls, args, **given):
    """An instance of the config dataclass `cls`: each field from `given`, else from the flag of
    the same name, else its default."""
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
              if f.init and f.name not in given and hasattr(args, f.name)}
    return cls(**values, **given)


def tokenizer_kwargs(args) -> dict:
    kind = args.tokenizer_type or ("NullTokenizer" if args.mock else None)
    if kind is None:
        raise ConfigError("--tokenizer-type is required with --data-path "
                          "(SentencePieceTokenizer, GPT2BPETokenizer or NullTokenizer)")
    kind = TOKENIZER_ALIASES.get(kind, kind)
    return dict(tokenizer_type=kind, tokenizer_model=args.tokenizer_model,
                vocab_file=args.vocab_file, merge_file=args.merge_file,
                vocab_size=args.vocab_size)


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
    except FieldError as e:  # a library check naming config fields: show the flags
        raise ConfigError(e.render(flag_names(e.owner))) from None
    except ValueError as e:  # a config dataclass's own check: same contract
        raise ConfigError(str(e)) from None


def _build(args, world_size: int, vocab_size: int) -> Config:
    _check_unsupported(args)
    _check_batch_sizes(args)
    tp, ep = args.tensor_model_parallel_size, args.expert_model_parallel_size
    pp, etp = args.pipeline_model_parallel_size, args.expert_tensor_parallel_size or tp
    cp = args.context_parallel_size
    model = _model_config(args, tp, vocab_size)
    moe = _moe_config(args, ep)
    _check_sequence_split(args, tp, etp, cp, moe)
    # Every size split over TP or EP is known now: a bad layout's suggestions fit all of them.
    try:
        expert_ffn = {"{ffn_hidden_size}": model.ffn_hidden_size}
        check_layout(world_size, tp, ep, pp=pp, etp=etp, cp=cp,
                     tp_divides={**model.tp_split_sizes(),
                                 **(moe.tp_split_sizes() if moe else {})},
                     ep_divides=moe.ep_split_sizes() if moe else {},
                     etp_divides=(moe.etp_split_sizes() or expert_ffn) if moe else {})
    except LayoutError as e:
        if world_size != 1:
            raise
        # one process (plain `python pretrain_gpt_moe.py`): the launcher is what is missing
        ranks = math.lcm(tp * cp, etp * ep) * pp
        raise LayoutError(f"{e.template}; or, as this is one process, launch the layout's "
                          f"{ranks} ranks: torchrun --nproc-per-node {ranks} "
                          "pretrain_gpt_moe.py ... (or srun with that many tasks)",
                          e.owner) from None
    topology = Topology(world_size, tp, ep, pp, etp, sp=args.sequence_parallel, cp=cp)
    stages = _stage_plan(args, model.num_layers)
    train = _train_config(args, topology)
    if stages is not None:
        _check_microbatches(stages, train.num_microbatches(topology.dp))
    overlap = args.overlap_grad_reduce or args.overlap_param_gather
    optim = fields_from(
        OptimizerConfig, args,
        bucket_size=args.bucket_size or (max(40_000_000, 1_000_000 * topology.dp) if overlap
                                         else None),
        # Megatron-LM: bf16 accumulates and reduces gradients in fp32 unless told otherwise
        accumulate_grads_in_fp32=(args.accumulate_allreduce_grads_in_fp32
                                  or (args.bf16 and not args.grad_reduce_in_bf16)),
    )
    _check_optimizer_ranges(args)
    recompute = RecomputeConfig(args.recompute_granularity, args.recompute_method,
                                args.recompute_num_layers, cac=not args.disable_moe_cac)
    recompute.check(model.num_layers)
    return Config(topology, model, moe, recompute, optim, train, _data_config(args),
                  _checkpoint_config(args), _exit_config(args),
                  tuple(getattr(args, "notices", ())), stages,
                  log=fields_from(LogConfig, args), runtime=fields_from(RuntimeConfig, args))


def _stage_plan(args, num_layers: int) -> Optional[StagePlan]:
    """The pipeline's stages (None without one): Megatron's virtual-stage flags, either spelling."""
    pp = args.pipeline_model_parallel_size
    virtual, per_chunk = (args.num_virtual_stages_per_pipeline_rank,
                          args.num_layers_per_virtual_pipeline_stage)
    uneven = (args.decoder_first_pipeline_num_layers, args.decoder_last_pipeline_num_layers)
    if pp == 1:
        given = [f for f, v in (("--num-virtual-stages-per-pipeline-rank", virtual),
                                ("--num-layers-per-virtual-pipeline-stage", per_chunk),
                                ("--decoder-first-pipeline-num-layers", uneven[0]),
                                ("--decoder-last-pipeline-num-layers", uneven[1]))
                 if v is not None]
        if given:
            raise ConfigError(f"{given[0]} needs --pipeline-model-parallel-size > 1")
        return None
    if per_chunk is not None:
        if per_chunk < 1 or num_layers % (per_chunk * pp):
            raise ConfigError(f"--num-layers-per-virtual-pipeline-stage {per_chunk}: --num-layers "
                              f"{num_layers} must be a multiple of it x "
                              f"--pipeline-model-parallel-size {pp}")
        derived = num_layers // (per_chunk * pp)
        if virtual not in (None, derived):
            raise ConfigError(f"--num-virtual-stages-per-pipeline-rank {virtual} and "
                              f"--num-layers-per-virtual-pipeline-stage {per_chunk} disagree (that "
                              f"is {derived} virtual stages): give one")
        virtual = derived
    schedule = args.pipeline_schedule
    if schedule is None:
        schedule = "interleaved" if (virtual or 1) > 1 else "1f1b"
    if virtual is None:
        virtual = 2 if SCHEDULE_PLACEMENT[schedule] == "v" else 1
    return StagePlan(num_layers, pp, virtual, uneven[0], uneven[1], schedule)


def _check_microbatches(stages: StagePlan, n: int) -> None:
    """What each schedule needs of the micro-batches per step and DP rank (Megatron's rule for
    interleaving; torch.distributed.pipelining's for the others)."""
    P, S = stages.pp, stages.num_stages
    need = {"1f1b": (n >= P, f"at least {P} (one per stage)"),
            "gpipe": (True, ""),
            "interleaved": (n % P == 0, f"a multiple of --pipeline-model-parallel-size {P}"),
            "zbv": (n >= P, f"at least {P}"),
            "dualpipev": (n >= S, f"at least the {S} stages")}
    ok, what = need[stages.schedule]
    if not ok:
        raise ConfigError(f"--pipeline-schedule {stages.schedule} needs {what} micro-batches per "
                          f"step and data-parallel rank, but --global-batch-size / "
                          f"(--micro-batch-size x data-parallel size) is {n}: change the batch "
                          "sizes")


def _check_optimizer_ranges(args) -> None:
    checks = [
        (args.lr > 0, f"--lr must be > 0 (got {args.lr})"),
        (args.min_lr >= 0, f"--min-lr must be >= 0 (got {args.min_lr})"),
        (args.min_lr <= args.lr, f"--min-lr {args.min_lr} is above --lr {args.lr}"),
        (args.weight_decay >= 0, f"--weight-decay must be >= 0 (got {args.weight_decay})"),
        (0 <= args.adam_beta1 < 1, f"--adam-beta1 must be in [0, 1) (got {args.adam_beta1})"),
        (0 <= args.adam_beta2 < 1, f"--adam-beta2 must be in [0, 1) (got {args.adam_beta2})"),
        (args.adam_eps > 0, f"--adam-eps must be > 0 (got {args.adam_eps})"),
        (args.clip_grad >= 0,
         f"--clip-grad must be >= 0, 0 = no clipping (got {args.clip_grad})"),
        (args.tile_size >= 0, "--optimizer-tile-size must be >= 0 (0 = untiled)"),
        (args.loss_scale_window >= 1,
         f"--loss-scale-window must be >= 1 (got {args.loss_scale_window})"),
        (args.hysteresis >= 1, f"--hysteresis must be >= 1 (got {args.hysteresis})"),
        (args.min_loss_scale > 0 and args.initial_loss_scale >= args.min_loss_scale,
         "--initial-loss-scale must be >= --min-loss-scale > 0"),
        (args.loss_scale is None or args.loss_scale > 0,
         f"--loss-scale must be > 0 (got {args.loss_scale})"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def _check_batch_sizes(args) -> None:
    for flag, value in (("--micro-batch-size", args.micro_batch_size),
                        ("--global-batch-size", args.global_batch_size),
                        ("--seq-length", args.seq_length),
                        ("--lr-decay-iters", args.lr_decay_iters)):
        if value is not None and value < 1:
            raise ConfigError(f"{flag} must be >= 1 (got {value})")


def _check_sequence_split(args, tp: int, etp: int, cp: int, moe) -> None:
    """Context parallelism cuts the sequence into 2 x CP chunks, sequence parallelism each CP
    rank's part over TP; an expert grid apart from TP needs each TP rank to send its own tokens
    (DTD's slices or SP's sequence parts)."""
    if cp < 1:
        raise ConfigError(f"--context-parallel-size must be >= 1 (got {cp})")
    if cp > 1 and args.seq_length % (2 * cp):
        raise ConfigError(f"--context-parallel-size {cp} cuts --seq-length {args.seq_length} into "
                          f"2 x {cp} chunks: use a multiple of {2 * cp}")
    if args.sequence_parallel and (args.seq_length // cp) % tp:
        per = "" if cp == 1 else f" / --context-parallel-size {cp}"
        multiple = tp if cp == 1 else math.lcm(2 * cp, tp * cp)
        raise ConfigError(f"--sequence-parallel splits --seq-length {args.seq_length}{per} over "
                          f"--tensor-model-parallel-size {tp}: use a multiple of {multiple}")
    if cp > 1 and moe is not None and moe.pad_free is False:
        raise ConfigError(f"--context-parallel-size {cp}: each rank sends its own tokens to the "
                          "experts padding-free; drop --no-moe-pad-free")
    if etp < 1:
        raise ConfigError(f"--expert-tensor-parallel-size must be >= 1 (got {etp})")
    if moe is not None and etp != tp and tp > 1 and not (moe.dtd or args.sequence_parallel):
        raise ConfigError(f"--expert-tensor-parallel-size {etp} != --tensor-model-parallel-size "
                          f"{tp}: the TP ranks must send different tokens to the experts; drop "
                          "--disable-moe-dtd or add --sequence-parallel")


def _check_unsupported(args) -> None:
    if args.overlap_param_gather and not args.use_distributed_optimizer:
        raise ConfigError("--overlap-param-gather needs --use-distributed-optimizer (it overlaps "
                          "ZeRO-1's parameter all-gather)")
    if args.bucket_size is not None and args.bucket_size < 1:
        raise ConfigError(f"--ddp-bucket-size must be >= 1 (got {args.bucket_size})")
    if args.fp16 and args.bf16:
        raise ConfigError("--fp16 and --bf16 are both given: choose one")
    if args.expert_interval is not None and args.moe_layer_freq is not None:
        raise ConfigError("--expert-interval and --moe-layer-freq are both given: choose one")


def _model_config(args, tp: int, vocab_size: int) -> ModelConfig:
    max_pos = args.max_position_embeddings or args.seq_length
    if args.position_embedding_type == "learned_absolute" and args.seq_length > max_pos:
        raise ConfigError(f"--seq-length {args.seq_length} exceeds --max-position-embeddings "
                          f"{max_pos}")
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    return fields_from(
        ModelConfig, args, vocab_size=vocab_size, max_position_embeddings=max_pos,
        params_dtype=dtype,
        padded_vocab_size=padded_vocab_size(vocab_size, args.make_vocab_size_divisible_by,
                                            max(tp, 1)),
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
    )


def _moe_config(args, ep: int) -> Optional[MoEConfig]:
    counts = args.num_experts or [1]
    if counts == [1]:  # Megatron-DeepSpeed: --num-experts 1 means a dense model
        if ep > 1:
            raise ConfigError(f"--expert-model-parallel-size {ep} needs --num-experts")
        return None
    for flag, value in (("--expert-interval", args.expert_interval),
                        ("--moe-layer-freq", args.moe_layer_freq)):
        if isinstance(value, int) and value < 1:  # --moe-layer-freq may be a 0/1 pattern
            raise ConfigError(f"{flag} must be >= 1 (got {value})")
    first_k = getattr(args, "first_k_dense_replace", 0)
    if args.expert_interval is None and args.moe_layer_freq is None:
        layers = moe_layer_indices(args.num_layers, expert_interval=2, first_k_dense=first_k)
    else:
        layers = moe_layer_indices(args.num_layers, expert_interval=args.expert_interval,
                                   layer_freq=args.moe_layer_freq, first_k_dense=first_k)
    if not layers:
        raise ConfigError(f"no layer of --num-layers {args.num_layers} gets an MoE block with "
                          f"--expert-interval {args.expert_interval} / --moe-layer-freq "
                          f"{args.moe_layer_freq} / --first-k-dense-replace {first_k}: use an "
                          "interval <= --num-layers, a pattern with a 1, or fewer dense layers")
    return fields_from(MoEConfig, args, num_experts=counts[0], layers=layers,
                       experts_per_layer=tuple(counts) if len(counts) > 1 else None)


def _train_config(args, topology: Topology) -> TrainConfig:
    dp, mbs = topology.dp, args.micro_batch_size
    accumulation = getattr(args, "deepspeed_gradient_accumulation_steps", None)
    gbs = args.global_batch_size or mbs * dp * (accumulation or 1)
    if accumulation is not None and gbs != mbs * dp * accumulation:
        raise ConfigError(f"--global-batch-size {gbs} != --micro-batch-size {mbs} x data-parallel "
                          f"size {dp} x gradient_accumulation_steps {accumulation} of "
                          "--deepspeed_config: make them agree")
    if gbs % (mbs * dp):
        raise ConfigError(
            f"--global-batch-size {gbs} is not divisible by --micro-batch-size {mbs} x "
            f"data-parallel size {dp}; use a multiple of {mbs * dp}, e.g. "
            f"{mbs * dp * max(1, round(gbs / (mbs * dp)))}"
        )
    for flag, value in (("--log-interval", args.log_interval),
                        ("--eval-interval", args.eval_interval)):
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
    return fields_from(TrainConfig, args, global_batch_size=gbs, schedule=schedule,
                       tensorboard=_tensorboard_config(args))


def _tensorboard_config(args) -> TensorBoardConfig:
    for flag, value in (("--tensorboard-queue-size", args.tensorboard_queue_size),
                        ("--tensorboard-log-interval", args.tensorboard_log_interval)):
        if value < 1:
            raise ConfigError(f"{flag} must be >= 1 (got {value})")
    return TensorBoardConfig(args.tensorboard_queue_size, args.tensorboard_log_interval,
                             args.log_timers_to_tensorboard,
                             args.log_batch_size_to_tensorboard, args.log_memory_to_tensorboard,
                             args.log_validation_ppl_to_tensorboard)


def _checkpoint_config(args) -> CheckpointConfig:
    if args.save_interval is not None and args.save_interval < 1:
        raise ConfigError(f"--save-interval must be >= 1 (got {args.save_interval})")
    if args.async_save and not args.save:
        raise ConfigError("--async-save needs --save DIR")
    if args.save_retain_interval is not None and args.save_retain_interval < 1:
        raise ConfigError(f"--save-retain-interval must be >= 1 (got {args.save_retain_interval})")
    return fields_from(CheckpointConfig, args)


def _exit_config(args) -> ExitConfig:
    for flag, value in (("--exit-interval", args.interval),
                        ("--exit-duration-in-mins", args.duration_minutes)):
        if value is not None and value <= 0:
            raise ConfigError(f"{flag} must be > 0 (got {value})")
    name = args.signal_name if args.signal_name.startswith("SIG") else "SIG" + args.signal_name
    if (not isinstance(getattr(signal, name, None), signal.Signals)
            or name in ("SIGKILL", "SIGSTOP")):
        raise ConfigError(f"--exit-signal {args.signal_name}: use a catchable signal name such as "
                          "SIGTERM or SIGUSR1")
    return fields_from(ExitConfig, args, signal_name=name)


def _data_config(args) -> DataConfig:
    if not args.mock and not args.data_path:
        raise ConfigError("no training data: give --data-path PREFIX [...] (from "
                          "tools/preprocess_data.py) or --mock-data")
    if args.mock and args.data_path:
        raise ConfigError("--mock-data and --data-path both given: --mock-data trains on "
                          "synthetic data and would ignore the files; drop one of them")
    kw = tokenizer_kwargs(args)
    if args.num_workers < 0:
        raise ConfigError(f"--num-workers must be >= 0 (got {args.num_workers})")
    return fields_from(DataConfig, args, **kw)
