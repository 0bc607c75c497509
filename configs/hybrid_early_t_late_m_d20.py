# d20 scale (nanochat's depth-20 shape: 20 layers x 1280 wide, ~0.5B parameters), pattern "TTTTMMMMMMMMMMMMMMMM".
# Prepare a large world first:  python prepare.py --world_size=200000 --vocab_size=32768 --out=data/world_xl
# 8 GPUs:  torchrun --standalone --nproc_per_node=8 train.py configs/hybrid_early_t_late_m_d20.py
data_dir = "data/world_xl"
out_dir = "out/hybrid_early_t_late_m_d20"
n_layer = 20
n_embd = 1280
n_head = 10
n_kv_head = 10
block_size = 2048
block_pattern = "TTTTMMMMMMMMMMMMMMMM"
mamba_mlp = True               # an MLP after each Mamba mixer (as Samba/Jamba), so M and T layers are the same size
total_batch_size = 524288      # 0.5M tokens per step
device_batch_size = 16         # per GPU: ~42 GiB estimated (`python bench.py --what=memory`); halve it on smaller GPUs
max_iters = 20000
learning_rate = 6e-4
warmup_iters = 500
lr_schedule = "wsd"
compile = True
eval_interval = 500
