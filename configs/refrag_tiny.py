# Multi-hop warm start on the tiny CPU hybrid (the chain train.py -> rag_train.py x 2 -> this), sized for 2 CPU cores:
# ~3 minutes of training and ~2 of evaluation.  python refrag_train.py configs/refrag_tiny.py, then configs/refrag_rl_tiny.py
phase = "sft"
init_from = "out/rag2/ckpt.pt"        # the two-stage RAG model (run_pipeline.sh)
out_dir = "out/refrag_sft"
sft_iters = 400
sft_batch_size = 8
sft_learning_rate = 3e-3
eval_n = 0                     # all held-out two- and three-hop questions (270 + 170)
top_k = 1                      # BM25 finds a chain step's document at rank 1 98-99% of the time: short contexts
