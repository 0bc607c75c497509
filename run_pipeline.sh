#!/usr/bin/env bash
# The whole tiny CPU pipeline in one command: synthetic world -> pre-train the hybrid -> RAG fine-tune (1,500
# steps) with its held-out evaluation on every question (out/rag/eval.json) -> one cited answer from chat.py.
# About half an hour on 2 CPU cores.
#
#   bash run_pipeline.sh            # the pipeline
#   bash run_pipeline.sh full       # the README's RAG model instead: the first RAG stage at 2,000 steps, then the
#                                   # second (the same 2,000 batches again at 3e-3, out/rag2); about 53 minutes
#   bash run_pipeline.sh compare    # then T, M and the hybrid at ~equal size (1.06M / 1.11M / 1.12M parameters):
#                                   # accuracy vs documents in context after the first RAG stage (k <= 4:
#                                   # acc_vs_k4.svg) and after a stage at k <= 16 (configs/rag_k16.py: acc_vs_k.svg,
#                                   # the README's plot); two more pre-trainings, five more RAG stages, about 2.5 hours
#   bash run_pipeline.sh vera       # real data instead: a dictionary of computing acronyms (Debian's dict-vera) as
#                                   # the knowledge base, pretraining text and questions (dev/vera.py)
# Extra arguments for train.py go in TRAIN_ARGS, e.g. TRAIN_ARGS="--max_iters=300" bash run_pipeline.sh
set -euo pipefail
cd "$(dirname "$0")"
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
TRAIN_ARGS=${TRAIN_ARGS:-}
mode=${1:-}
case "$mode" in
    ""|full|compare|vera) ;;
    *) echo "usage: bash run_pipeline.sh [full|compare|vera] (got '$mode')" >&2; exit 2 ;;
esac

if [ "$mode" = vera ]; then
    dict=${VERA_DICT:-/usr/share/dictd/vera}
    if [ ! -f "$dict.index" ]; then
        echo "error: $dict.index not found: apt-get install dict-vera, or set VERA_DICT to the dictionary's path" >&2; exit 2
    fi
    python dev/vera.py --dict="$dict" --out=data/vera
    python prepare.py --input=data/vera/pretrain.jsonl --out=data/vera_text --vocab_size=2048
    python train.py --data_dir=data/vera_text --out_dir=out/vera --max_iters=2000 --overwrite=True $TRAIN_ARGS
    python rag_train.py configs/rag_vera.py
    question=$(python -c "import json; print(next(q['question'] for q in map(json.loads, open('data/vera/qa_heldout.jsonl')) if q['golden_answers']))")
    echo "> $question"
    python chat.py --ckpt out/vera_rag/ckpt.pt --kb data/vera/kb.jsonl --stopwords=en_plus -p "$question"
    exit 0
fi

python prepare.py
python train.py --out_dir=out/tiny --overwrite=True $TRAIN_ARGS
# rag_train.py's 1,500 steps keep the pipeline within 30 minutes; full and compare run configs/rag_tiny.py's 2,000,
# the README's runs
rag_config=$([ -z "$mode" ] || echo configs/rag_tiny.py)
python rag_train.py $rag_config --init_from=out/tiny/ckpt.pt --out_dir=out/rag
ckpt=out/rag/ckpt.pt
if [ "$mode" = full ]; then
    python rag_train.py configs/rag_tiny.py --init_from=out/rag/ckpt.pt --out_dir=out/rag2 --learning_rate=3e-3
    ckpt=out/rag2/ckpt.pt
fi
question=$(python -c "import json; print(next(q['question'] for q in map(json.loads, open('data/world/qa_heldout.jsonl')) if q['hops'] == 1))")
echo "> $question"
python chat.py --ckpt $ckpt --kb data/world/kb.jsonl -p "$question"

if [ "$mode" = compare ]; then
    python train.py --out_dir=out/tiny_T --block_pattern=T --n_layer=3 --overwrite=True $TRAIN_ARGS
    python train.py --out_dir=out/tiny_M --block_pattern=M --n_layer=5 --overwrite=True $TRAIN_ARGS
    python rag_train.py configs/rag_tiny.py --init_from=out/tiny_T/ckpt.pt --out_dir=out/rag_T --allow_transformer=True
    python rag_train.py configs/rag_tiny.py --init_from=out/tiny_M/ckpt.pt --out_dir=out/rag_M
    python bench.py --vs_k out/rag_T/eval.json out/rag_M/eval.json out/rag/eval.json --plot=acc_vs_k4
    for m in _T _M ""; do
        python rag_train.py configs/rag_k16.py --init_from=out/rag$m/ckpt.pt --out_dir=out/rag${m}_k16 --allow_transformer=True
    done
    python bench.py --vs_k out/rag_T_k16/eval.json out/rag_M_k16/eval.json out/rag_k16/eval.json --plot=acc_vs_k
fi
