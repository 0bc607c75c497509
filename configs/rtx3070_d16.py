# RTX 3070 (8 GB): a 16-layer hybrid, 768 wide.
# Prepare a large world first:  python prepare.py --world_size=200000 --vocab_size=32768 --out=data/world_xl
data_dir = "data/world_xl"
out_dir = "out/rtx3070_d16"
n_layer = 16
n_embd = 768
n_head = 6
n_kv_head = 2
block_size = 1024
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
