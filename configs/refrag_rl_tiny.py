# RL on top of the warm start of configs/refrag_tiny.py, sized for 2 CPU cores: ~15 minutes.
# python refrag_train.py configs/refrag_rl_tiny.py
phase = "rl"
init_from = "out/refrag_sft/ckpt.pt"
out_dir = "out/refrag"
rl_iters = 30
questions_per_step = 4
group_size = 4
rl_learning_rate = 1e-4
eval_interval = 10
curve_n = 20
eval_n = 40
top_k = 1                      # BM25 finds a chain step's document at rank 1 98-99% of the time: short contexts
