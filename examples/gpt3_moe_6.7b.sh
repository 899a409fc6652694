# shellcheck shell=bash disable=SC2034  # sourced: the batch script reads these arrays
# GPT-3 6.7B base (32 layers, hidden 4096, 32 heads) with 16 experts in every other layer: 16 MoE
# layers x 16 experts, 38.9B parameters, top-1 routing: the paper's 40B model. A configuration for
# examples/pretrain_gpt_moe.sbatch (TED_CONFIG=examples/gpt3_moe_6.7b.sh, the default), which
# sources it: it sets MODEL_ARGS, and `ted_layout WORLD` sets PARALLEL_ARGS.
#
# Layouts, for nodes of 8 GPUs with 40 GB each (A100-class). Memory is tools/ted_planner.py's
# estimate per GPU with these flags (bf16, ZeRO-1, full recompute, micro-batch 4, tiled optimizer
# step); rerun it for your GPUs (--preset 6.7b, the rest as in gpt3_moe_1.3b.sh).
#  32 GPUs: TP=4, EP=8 (DP=8, expert-DP=1), ~33 GiB. The paper's tight case: every GPU holds 2
#           experts per layer, a quarter of each (expert TP = TP), and ZeRO-1 shards the dense
#           optimizer state over only 8 ranks, the experts' over none (expert-DP=1). TP=2 does not
#           fit (~40 GiB); TP=4 keeps its all-reduces inside half a node; TP=8 fits too but
#           doubles their bytes (~13% slower per step in the planner). The tiled optimizer step
#           (--optimizer-tile-size, the paper's 178,956,971 elements) is what makes it fit: the
#           untiled fp32 upcast of every gradient at once adds ~2 GiB at the step. The
#           all-to-all runs among ranks of one TP rank (stride 4): EP=8 spans all four nodes.
# 128 GPUs: TP=2, EP=16 (DP=64, expert-DP=4), ~30 GiB. One expert per EP rank and layer; TP=2 is
#           the smallest TP that fits, and the planner ranks it fastest (TP=4, EP=16 needs ~19 GiB:
#           use it on 16-32 GB GPUs, as the paper's 128 V100s). The all-to-all (stride 2) spans
#           four nodes; expert gradients are reduced over 4 ranks.

MODEL_ARGS=(
    --num-layers 32 --hidden-size 4096 --num-attention-heads 32 --seq-length 2048 --max-position-embeddings 2048
    --num-experts 16 --expert-interval 2 --moe-router-topk 1 --moe-expert-capacity-factor 1.0
    --moe-eval-capacity-factor 1.0 --moe-min-capacity 4 --moe-aux-loss-coeff 0.01
    --micro-batch-size 4 --global-batch-size 512 --train-iters 300000
    --lr 1.2e-4 --min-lr 1.2e-5 --lr-decay-style cosine --lr-warmup-iters 2000 --weight-decay 0.1 --clip-grad 1.0
    --bf16 --use-distributed-optimizer --optimizer-tile-size 178956971
    --recompute-granularity full --recompute-method uniform --recompute-num-layers 1
    --log-interval 10 --eval-interval 1000 --eval-iters 10
)

ted_layout() {  # WORLD -> PARALLEL_ARGS
    case "$1" in
        32) PARALLEL_ARGS=(--tensor-model-parallel-size 4 --expert-model-parallel-size 8) ;;
        128) PARALLEL_ARGS=(--tensor-model-parallel-size 2 --expert-model-parallel-size 16) ;;
        *) echo "gpt3_moe_6.7b.sh: layouts here are for 32 or 128 GPUs, not $1: add one to ted_layout" \
                "(python tools/ted_planner.py --preset 6.7b --gpus $1 ranks them)" >&2; return 2 ;;
    esac
}
