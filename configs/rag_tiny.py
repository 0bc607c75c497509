# RAG fine-tune of the tiny CPU hybrid (out/tiny/ckpt.pt from `python train.py`), as `run_pipeline.sh full` runs
# it (its default pipeline passes --max_iters=1500): 2000 steps of 4 rows x 1024 tokens (20 minutes on 2 CPU cores,
# 30 with one thread), then the held-out evaluation on every question (4 minutes).
init_from = "out/tiny/ckpt.pt"
out_dir = "out/rag"
seq_len = 1024
k_max = 4                      # up to 8 documents: the same 2000 steps read a single document worse
total_batch_size = 4096
device_batch_size = 4
max_iters = 2000
eval_interval = 500
learning_rate = 6e-3
rag_weight = 0.88
closed_book_weight = 0.1
text_weight = 0.02             # a 256-token text window is all loss tokens: at 0.1 it outweighed the answers
eval_n = 0                     # every held-out question: 378 single-hop and 89 unanswerable
