# RL on top of the warm start of configs/refrag_tiny.py, sized for 2 CPU cores: ~22 minutes of training and ~3 of
# evaluation.  python refrag_train.py configs/refrag_rl_tiny.py
phase = "rl"
init_from = "out/refrag_sft/ckpt.pt"
out_dir = "out/refrag"
rl_iters = 240
questions_per_step = 4
group_size = 8
rl_learning_rate = 5e-4
eval_interval = 40
curve_n = 100                  # held-out two-hop questions per curve point (~10 s each)
eval_n = 0                     # all held-out two- and three-hop questions (270 + 170)
top_k = 1                      # BM25 finds a chain step's document at rank 1 98-99% of the time: short contexts
