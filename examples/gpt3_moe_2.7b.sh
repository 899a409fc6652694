# shellcheck shell=bash disable=SC2034  # sourced: the batch script reads these arrays
# GPT-3 2.7B base (32 layers, hidden 2560, 32 heads) with 16 experts in every other layer: 16 MoE
# layers x 16 experts, 15.2B parameters, top-1 routing as in DeepSpeed-TED. A configuration for
# examples/pretrain_gpt_moe.sbatch (TED_CONFIG=examples/gpt3_moe_2.7b.sh), which sources it:
# it sets MODEL_ARGS, and `ted_layout WORLD` sets PARALLEL_ARGS.
#
# Layouts, for nodes of 8 GPUs with 40 GB each (A100-class). Memory is tools/ted_planner.py's
# estimate per GPU with these flags (bf16, ZeRO-1, full recompute, micro-batch 4, tiled optimizer
# step); rerun it for your GPUs (--preset 2.7b, the rest as in gpt3_moe_1.3b.sh).
#  32 GPUs: TP=2, EP=4 (DP=16, expert-DP=4), ~26 GiB. TP=1 would need ~31 GiB, too close to 40 GB
#           once the allocator fragments; TP=2 halves the dense weights, their gradients and most
#           activations, and its all-reduces stay between two GPUs of a node. The all-to-all runs
#           among ranks of the same TP rank (stride 2): EP=4 spans ranks 0,2,4,6, so a node holds
#           one whole TP x EP block and every MoE collective stays on NVLink; expert gradients
#           are reduced over expert-DP (4 ranks, one per node).
# 128 GPUs: TP=2, EP=16 (DP=64, expert-DP=4), ~15 GiB. One expert per EP rank and layer; the
#           all-to-all spans four nodes, and in exchange each GPU holds 1/16 of the experts, not
#           1/4, which is what brings the memory down (the planner puts it first).

MODEL_ARGS=(
    --num-layers 32 --hidden-size 2560 --num-attention-heads 32 --seq-length 2048 --max-position-embeddings 2048
    --num-experts 16 --expert-interval 2 --moe-router-topk 1 --moe-expert-capacity-factor 1.0
    --moe-eval-capacity-factor 1.0 --moe-min-capacity 4 --moe-aux-loss-coeff 0.01
    --micro-batch-size 4 --global-batch-size 512 --train-iters 300000
    --lr 1.6e-4 --min-lr 1.6e-5 --lr-decay-style cosine --lr-warmup-iters 2000 --weight-decay 0.1 --clip-grad 1.0
    --bf16 --use-distributed-optimizer --optimizer-tile-size 178956971
    --recompute-granularity full --recompute-method uniform --recompute-num-layers 1
    --log-interval 10 --eval-interval 1000 --eval-iters 10
)

ted_layout() {  # WORLD -> PARALLEL_ARGS
    case "$1" in
        32) PARALLEL_ARGS=(--tensor-model-parallel-size 2 --expert-model-parallel-size 4) ;;
        128) PARALLEL_ARGS=(--tensor-model-parallel-size 2 --expert-model-parallel-size 16) ;;
        *) echo "gpt3_moe_2.7b.sh: layouts here are for 32 or 128 GPUs, not $1: add one to ted_layout" \
                "(python tools/ted_planner.py --preset 2.7b --gpus $1 ranks them)" >&2; return 2 ;;
    esac
}
