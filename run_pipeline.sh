#!/usr/bin/env bash
# The whole tiny CPU pipeline in one command: synthetic world -> pre-train the hybrid -> RAG fine-tune in two
# stages (2,000 steps at 6e-3, then the same 2,000 batches again at 3e-3), each with its held-out evaluation
# (out/rag/eval.json, out/rag2/eval.json) -> one cited answer from chat.py. About 1.5 hours on 2 CPU cores
# (measured with one torch thread: train.py 11 minutes, each rag_train.py 30-33 plus about 7 of evaluation on every
# held-out question); compare adds about 1.7 hours (two more pre-trainings and first RAG stages).
#
#   bash run_pipeline.sh            # the pipeline
#   bash run_pipeline.sh compare    # then T, M and the hybrid at ~equal size (1.06M / 1.11M / 1.12M parameters):
#                                   # accuracy vs documents in context, a markdown table and acc_vs_k.svg (the README's plot)
# Extra arguments for train.py go in TRAIN_ARGS, e.g. TRAIN_ARGS="--max_iters=300" bash run_pipeline.sh
set -euo pipefail
cd "$(dirname "$0")"
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
TRAIN_ARGS=${TRAIN_ARGS:-}

python prepare.py
python train.py --out_dir=out/tiny $TRAIN_ARGS
python rag_train.py configs/rag_tiny.py --init_from=out/tiny/ckpt.pt --out_dir=out/rag
python rag_train.py configs/rag_tiny.py --init_from=out/rag/ckpt.pt --out_dir=out/rag2 --learning_rate=3e-3
question=$(python -c "import json; print(next(q['question'] for q in map(json.loads, open('data/world/qa_heldout.jsonl')) if q['hops'] == 1))")
echo "> $question"
python chat.py --ckpt out/rag2/ckpt.pt --kb data/world/kb.jsonl -p "$question"

if [ "${1:-}" = "compare" ]; then
    python train.py --out_dir=out/tiny_T --block_pattern=T --n_layer=3 $TRAIN_ARGS
    python train.py --out_dir=out/tiny_M --block_pattern=M --n_layer=5 $TRAIN_ARGS
    python rag_train.py configs/rag_tiny.py --init_from=out/tiny_T/ckpt.pt --out_dir=out/rag_T --allow_transformer=True
    python rag_train.py configs/rag_tiny.py --init_from=out/tiny_M/ckpt.pt --out_dir=out/rag_M
    python rag.py out/rag_T/eval.json out/rag_M/eval.json out/rag/eval.json --svg acc_vs_k.svg
fi
