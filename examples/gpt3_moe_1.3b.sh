# shellcheck shell=bash disable=SC2034  # sourced: the batch script reads these arrays
# GPT-3 1.3B base (24 layers, hidden 2048, 16 heads) with 16 experts in every other layer: 12 MoE
# layers x 16 experts, 7.4B parameters, top-1 routing as in DeepSpeed-TED. A configuration for
# examples/pretrain_gpt_moe.sbatch (TED_CONFIG=examples/gpt3_moe_1.3b.sh), which sources it:
# it sets MODEL_ARGS, and `ted_layout WORLD` sets PARALLEL_ARGS.
#
# Layouts, for nodes of 8 GPUs with 40 GB each (A100-class). Memory is tools/ted_planner.py's
# estimate per GPU with these flags (bf16, ZeRO-1, full recompute, micro-batch 4, tiled optimizer
# step); rerun it for your GPUs:
#   python tools/ted_planner.py --preset 1.3b --cluster a100-40gb --gpus 32 --micro-batch-size 4 \
#       --global-batch-size 512 --bf16 --use-distributed-optimizer --optimizer-tile-size 178956971 \
#       --recompute-granularity full --recompute-method uniform --moe-router-topk 1
#  32 GPUs: TP=1, EP=8 (DP=32, expert-DP=4), ~18 GiB. The dense part (1.3B) fits one GPU whole, so
#           no TP: TP would add two all-reduces per layer forward and two backward for nothing.
#           An EP group is 8 consecutive ranks, one node: the all-to-all stays on NVLink; each
#           GPU holds 2 of the 16 experts of each MoE layer, whose gradients are then reduced
#           over expert-DP (4 ranks, one per node).
# 128 GPUs: TP=1, EP=16 (DP=128, expert-DP=8), ~14 GiB. One expert per GPU and layer; the
#           all-to-all spans two nodes, but it carries only the tokens routed away, while EP=8
#           would double the expert gradients to reduce over 16 nodes (the planner puts EP=16 first).

MODEL_ARGS=(
    --num-layers 24 --hidden-size 2048 --num-attention-heads 16 --seq-length 2048 --max-position-embeddings 2048
    --num-experts 16 --expert-interval 2 --moe-router-topk 1 --moe-expert-capacity-factor 1.0
    --moe-eval-capacity-factor 1.0 --moe-min-capacity 4 --moe-aux-loss-coeff 0.01
    --micro-batch-size 4 --global-batch-size 512 --train-iters 300000
    --lr 2e-4 --min-lr 2e-5 --lr-decay-style cosine --lr-warmup-iters 2000 --weight-decay 0.1 --clip-grad 1.0
    --bf16 --use-distributed-optimizer --optimizer-tile-size 178956971
    --recompute-granularity full --recompute-method uniform --recompute-num-layers 1
    --log-interval 10 --eval-interval 1000 --eval-iters 10
)

ted_layout() {  # WORLD -> PARALLEL_ARGS
    case "$1" in
        32) PARALLEL_ARGS=(--tensor-model-parallel-size 1 --expert-model-parallel-size 8) ;;
        128) PARALLEL_ARGS=(--tensor-model-parallel-size 1 --expert-model-parallel-size 16) ;;
        *) echo "gpt3_moe_1.3b.sh: layouts here are for 32 or 128 GPUs, not $1: add one to ted_layout" \
                "(python tools/ted_planner.py --preset 1.3b --gpus $1 ranks them)" >&2; return 2 ;;
    esac
}
