"""The flags of the peers' launch scripts (Megatron-DeepSpeed's and Megatron-LM's), so their
scripts run unchanged: what has a meaning here is mapped onto our flags; what only switches a
CUDA fusion or a framework we do not use is accepted and named once in a notice.

`add_peer_args` declares them; `resolve_peer_args(args, argv)` maps them after parsing and
returns the notices. A DeepSpeed config file (--deepspeed --deepspeed_config FILE) is read here
too: its values fill flags the command line left out, and contradict none of them.
"""

from __future__ import annotations

import json
import os

# Switches that select CUDA kernels or another implementation of the same math: no effect here.
NO_EFFECT = {
    "--use-mcore-models": "Megatron-LM", "--use-legacy-models": "Megatron-LM",
    "--no-masked-softmax-fusion": "Megatron-LM", "--no-bias-gelu-fusion": "Megatron-LM",
    "--no-bias-swiglu-fusion": "Megatron-LM", "--no-bias-dropout-fusion": "Megatron-LM",
    "--no-gradient-accumulation-fusion": "Megatron-LM", "--no-persist-layer-norm": "Megatron-LM",
    "--no-rope-fusion": "Megatron-LM", "--use-flash-attn": "Megatron-LM",
    "--no-async-tensor-model-parallel-allreduce": "Megatron-LM",
    "--attention-softmax-in-fp32": "Megatron-LM",
    "--moe-grouped-gemm": "Megatron-LM", "--moe-permute-fusion": "Megatron-LM",
    "--no-create-attention-mask-in-dataloader": "Megatron-LM",
    "--create-moe-param-group":
        "Megatron-DeepSpeed (expert parameters always form their own groups here)",
    "--no-pipeline-parallel": "Megatron-DeepSpeed (there is no pipeline parallelism here)",
}


def add_peer_args(p) -> None:
    g = p.add_argument_group("Megatron-DeepSpeed's flags")
    g.add_argument("--deepspeed", action="store_true",
                   help="read --deepspeed_config (Megatron-DeepSpeed)")
    g.add_argument("--deepspeed_config", "--deepspeed-config", dest="deepspeed_config",
                   default=None,
                   help="a DeepSpeed JSON config: batch sizes, gradient clipping, fp16/bf16, ZeRO "
                        "stage 0/1")
    g.add_argument("--checkpoint-activations", action="store_true",
                   help="the old name of --recompute-granularity full --recompute-method uniform")
    g.add_argument("--deepspeed-activation-checkpointing", action="store_true",
                   help="DeepSpeed's name for the same full, uniform recompute")
    g.add_argument("--checkpoint-num-layers", type=int, default=None,
                   help="layers per recompute chunk with --checkpoint-activations "
                        "(= --recompute-num-layers)")
    g.add_argument("--data-impl", default="mmap",
                   help="only mmap (Megatron's .bin/.idx); infer means mmap")
    g.add_argument("--log-validation-ppl-to-tensorboard", action="store_true",
                   help="write the validation perplexity to TensorBoard too")
    m = p.add_argument_group("Megatron-LM's flags")
    m.add_argument("--moe-token-dispatcher-type", default="alltoall",
                   help="alltoall only: TED's expert-parallel all-to-all (allgather and flex are "
                        "not built)")
    m.add_argument("--no-position-embedding", action="store_true",
                   help="no learned absolute position embedding (with rope: no effect; otherwise "
                        "no positions)")
    m.add_argument("--transformer-impl", default="local", help="local only (no Transformer Engine)")
    m.add_argument("--cp-comm-type", nargs="+", default=None,
                   choices=["p2p", "a2a", "allgather", "a2a+p2p"],
                   help="accepted: with --context-parallel-size > 1 keys and values are all-"
                        "gathered over CP here (allgather); the other types compute the same "
                        "attention, so they are a notice")
    m.add_argument("--fp8-format", default=None,
                   help="refused: FP8 training needs Transformer Engine, which is not used here "
                        "(train in --bf16)")
    m.add_argument("--fp8-recipe", default=None, help="refused, with --fp8-format")
    m.add_argument("--cross-entropy-fusion-impl", default="native",
                   help="accepted, no effect: the cross-entropy is megatron-core's vocab-parallel "
                        "one, unfused")
    m.add_argument("--recompute-modules", nargs="*", default=None,
                   help="with --recompute-granularity selective: recompute here covers the "
                        "attention core (core_attn) only; the other modules are named in a "
                        "notice and kept")
    m.add_argument("--fine-grained-activation-offloading", action="store_true",
                   help="accepted, no effect: activations stay where they are computed")
    m.add_argument("--offload-modules", nargs="*", default=None,
                   help="accepted with --fine-grained-activation-offloading, no effect")
    n = p.add_argument_group("accepted with no effect here (CUDA fusions, other frameworks)")
    for flag, family in NO_EFFECT.items():
        n.add_argument(flag, action="store_true", help=f"{family}: accepted, no effect")


def explicit_flags(parser, argv: list[str]) -> set[str]:
    """The destinations of the flags given on the command line (any alias, `--flag=value` too)."""
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    return {a.dest for a in parser._actions if given & set(a.option_strings)}


def resolve_peer_args(args, argv: list[str], parser) -> list[str]:
    """Map the peers' flags onto ours (in place); the notices to print once. Raises ValueError
    naming the flag for a value with no meaning here."""
    notices = []
    used = [f for f in NO_EFFECT if getattr(args, f.lstrip("-").replace("-", "_"))]
    if used:
        notices.append(f"accepted with no effect here: {' '.join(used)}")
    if args.data_impl not in ("mmap", "infer"):
        raise ValueError(f"--data-impl {args.data_impl}: only mmap (.bin/.idx) is read here; "
                         "preprocess with tools/preprocess_data.py")
    if args.moe_token_dispatcher_type != "alltoall":
        raise ValueError(f"--moe-token-dispatcher-type {args.moe_token_dispatcher_type}: only "
                         "alltoall (TED's expert-parallel all-to-all with DTD) is built; drop the "
                         "flag")
    if args.fp8_format is not None or args.fp8_recipe is not None:
        raise ValueError("--fp8-format / --fp8-recipe: FP8 training needs Transformer Engine, "
                         "which is not used here; drop them and train in --bf16")
    notices += _recipe_switches(args)
    if getattr(args, "multi_latent_attention", False) and args.kv_channels is not None:
        args.kv_channels = None  # as Megatron-Core: MLA's head dims are its own
        notices.append("--kv-channels has no effect with --multi-latent-attention (its head dims "
                       "are --qk-head-dim, --qk-pos-emb-head-dim and --v-head-dim)")
    if args.transformer_impl != "local":
        notices.append(f"--transformer-impl {args.transformer_impl}: Transformer Engine is not "
                       "used; local layers")
    if args.checkpoint_activations or args.deepspeed_activation_checkpointing:
        if (args.recompute_granularity not in (None, "full")
                or args.recompute_method not in (None, "uniform")):
            raise ValueError("--checkpoint-activations means --recompute-granularity full "
                             "--recompute-method uniform; it contradicts the recompute flags given")
        args.recompute_granularity, args.recompute_method = "full", "uniform"
        if args.checkpoint_num_layers is not None:
            args.recompute_num_layers = args.checkpoint_num_layers
    if args.no_position_embedding and args.position_embedding_type == "learned_absolute":
        args.position_embedding_type = "none"
    if args.sequence_parallel and args.tensor_model_parallel_size == 1:
        args.sequence_parallel = False  # as Megatron-LM: nothing to split without TP
        notices.append("--sequence-parallel has no effect with --tensor-model-parallel-size 1")
    if args.deepspeed or args.deepspeed_config:
        notices += apply_deepspeed_config(args, explicit_flags(parser, argv))
    return notices + _accepted_switches(args, argv)


def _recipe_switches(args) -> list[str]:
    """Megatron-Core recipes' kernel and memory switches: what each means here, one notice each."""
    notices = []
    if args.cross_entropy_fusion_impl != "native":
        notices.append(f"--cross-entropy-fusion-impl {args.cross_entropy_fusion_impl}: no effect "
                       "(megatron-core's vocab-parallel cross-entropy, unfused)")
    modules = [m.strip("[],") for m in (args.recompute_modules or [])]
    modules = [m for m in modules if m]
    others = [m for m in modules if m != "core_attn"]
    if modules and args.recompute_granularity != "selective":
        raise ValueError("--recompute-modules needs --recompute-granularity selective")
    if others:
        notices.append(f"--recompute-modules {' '.join(modules)}: selective recompute here "
                       "covers the attention core (core_attn) only; "
                       f"{', '.join(others)} keep their activations")
    kinds = sorted(set(args.cp_comm_type or []) - {"allgather"})
    if kinds:
        notices.append(f"--cp-comm-type {' '.join(kinds)}: keys and values are all-gathered over "
                       "the context-parallel group here (allgather); the attention is the same")
    if args.fine_grained_activation_offloading or args.offload_modules:
        notices.append("--fine-grained-activation-offloading / --offload-modules: no effect "
                       "(activations are not offloaded here)")
    return notices


# Megatron-LM's checkpoint switches whose behaviour is how ours always works
CHECKPOINT_SWITCHES = ("--use-persistent-ckpt-worker", "--ckpt-fully-parallel-save",
                       "--no-ckpt-fully-parallel-save", "--ckpt-fully-parallel-load",
                       "--auto-detect-ckpt-format", "--ckpt-assume-constant-structure",
                       "--dist-ckpt-optim-fully-reshardable")


def _accepted_switches(args, argv: list[str]) -> list[str]:
    """One notice each for Megatron-LM's kernel choice and checkpoint switches given."""
    given = {a.split("=", 1)[0] for a in argv if a.startswith("--")}
    notices = []
    if "--attention-backend" in given:
        notices.append(f"--attention-backend {args.attention_backend}: attention runs as torch's "
                       "scaled_dot_product_attention here (no kernel to choose)")
    switches = [f for f in CHECKPOINT_SWITCHES if f in given]
    if switches:
        notices.append(f"{' '.join(switches)}: accepted; checkpoints here are always saved and "
                       "loaded fully parallel (each rank writes its share once and reads only "
                       "its parts), --async-save writes from a background thread, and --load is "
                       "read by its own metadata")
    return notices


# ---- DeepSpeed's JSON config ---------------------------------------------------------------------
def _read_config(path: str) -> dict:
    if not path:
        raise ValueError("--deepspeed needs --deepspeed_config FILE")
    if os.path.isdir(path):
        raise ValueError(f"--deepspeed_config {path} is a directory; give the JSON file")
    try:
        with open(path) as f:
            config = json.load(f)
    except OSError as e:
        raise ValueError(f"--deepspeed_config {path}: {e.strerror}") from None
    except ValueError as e:
        raise ValueError(f"--deepspeed_config {path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"--deepspeed_config {path}: not a JSON object")
    return config


def _set(args, explicit: set, dest: str, flag: str, value, field: str) -> None:
    """Fill `dest` from the config, or check the command line's value agrees with it."""
    current = getattr(args, dest)
    if dest in explicit and current != value:
        raise ValueError(f"{flag} {current} contradicts {field} = {value} in --deepspeed_config: "
                         "make them agree or drop one")
    setattr(args, dest, value)


def apply_deepspeed_config(args, explicit: set) -> list[str]:
    """The fields with a meaning here, mapped onto flags; a notice listing the rest."""
    config = _read_config(args.deepspeed_config)
    path = args.deepspeed_config
    used = set()

    def take(field, dest, flag, convert=lambda v: v):
        if field in config and config[field] != "auto":
            _set(args, explicit, dest, flag, convert(config[field]), field)
        used.add(field)

    take("train_batch_size", "global_batch_size", "--global-batch-size", int)
    take("train_micro_batch_size_per_gpu", "micro_batch_size", "--micro-batch-size", int)
    take("gradient_clipping", "clip_grad", "--clip-grad", float)
    if "gradient_accumulation_steps" in config:
        used.add("gradient_accumulation_steps")
        args.deepspeed_gradient_accumulation_steps = int(config["gradient_accumulation_steps"])
    notices = _precision(config, args, explicit, used)
    zero = config.get("zero_optimization", {})
    used.add("zero_optimization")
    stage = int(zero.get("stage", 0)) if isinstance(zero, dict) else 0
    if stage > 1:
        raise ValueError(f"--deepspeed_config {path}: zero_optimization.stage {stage} is not "
                         "supported: TED shards optimizer states only (stage 1 = "
                         "--use-distributed-optimizer); use stage 0 or 1")
    _set(args, explicit, "use_distributed_optimizer", "--use-distributed-optimizer", stage == 1,
         "zero_optimization.stage")
    ignored = sorted(k for k in config if k not in used)
    if ignored:
        notices.append(f"--deepspeed_config {path}: fields with no meaning here, ignored: "
                       f"{', '.join(ignored)}")
    return notices


def _precision(config: dict, args, explicit: set, used: set) -> list[str]:
    fp16, bf16 = config.get("fp16", {}), config.get("bf16", config.get("bfloat16", {}))
    used.update({"fp16", "bf16", "bfloat16"})
    fp16_on = bool(isinstance(fp16, dict) and fp16.get("enabled", False) not in (False, "auto"))
    bf16_on = bool(isinstance(bf16, dict) and bf16.get("enabled", False) not in (False, "auto"))
    if "fp16" in config:
        _set(args, explicit, "fp16", "--fp16", fp16_on, "fp16.enabled")
    if "bf16" in config or "bfloat16" in config:
        _set(args, explicit, "bf16", "--bf16", bf16_on, "bf16.enabled")
    if fp16_on:
        scale = fp16.get("loss_scale", 0)
        if scale:  # 0 means dynamic
            _set(args, explicit, "loss_scale", "--loss-scale", float(scale), "fp16.loss_scale")
        for field, dest, flag, convert in (
                ("initial_scale_power", "initial_loss_scale", "--initial-loss-scale",
                 lambda v: 2.0 ** v),
                ("loss_scale_window", "loss_scale_window", "--loss-scale-window", int),
                ("hysteresis", "hysteresis", "--hysteresis", int),
                ("min_loss_scale", "min_loss_scale", "--min-loss-scale", float)):
            if field in fp16:
                _set(args, explicit, dest, flag, convert(fp16[field]), f"fp16.{field}")
    return []
