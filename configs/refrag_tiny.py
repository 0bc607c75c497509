# Multi-hop warm start on the tiny CPU hybrid (the chain train.py -> rag_train.py -> this), sized for 2 CPU cores:
# ~3 minutes of training and ~5 of evaluation.  python refrag_train.py configs/refrag_tiny.py, then configs/refrag_rl_tiny.py
phase = "sft"
init_from = "out/rag/ckpt.pt"
out_dir = "out/refrag_sft"
sft_iters = 400
sft_batch_size = 8
sft_learning_rate = 3e-3
eval_n = 100
top_k = 1                      # BM25 finds a chain step's document at rank 1 98-99% of the time: short contexts
