# RTX 4090 (24 GB): a 20-layer hybrid, 1280 wide (the d20 shape).
# Prepare a large world first:  python prepare.py --world_size=200000 --vocab_size=32768 --out=data/world_xl
data_dir = "data/world_xl"
out_dir = "out/rtx4090_d20"
n_layer = 20
n_embd = 1280
n_head = 10
n_kv_head = 5
block_size = 2048
block_pattern = "MMMT"
mamba_mlp = True
total_batch_size = 131072
device_batch_size = 8
max_iters = 10000
learning_rate = 1e-3
warmup_iters = 200
lr_schedule = "wsd"
compile = True
eval_interval = 500
