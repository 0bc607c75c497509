# The README's RAG models: rag_train.py's defaults (run_pipeline.sh's 1,500 steps) run 2,000 steps, as
# `bash run_pipeline.sh full` and `compare` do: 20 minutes on 2 CPU cores (30 with one thread), then the held-out
# evaluation on every question (4 minutes).
max_iters = 2000
eval_ks = "1,2,4,8,16,32"       # to k = 32: how far past its 4 documents a model reads
