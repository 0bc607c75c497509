# The embedded default (train.py's own defaults, spelled out): a 4-layer hybrid that learns the tiny
# synthetic world on 2 CPU cores in minutes.  python prepare.py && python train.py configs/tiny_cpu.py
data_dir = "data/world"
out_dir = "out/tiny"
n_layer = 4
n_embd = 128
n_head = 4
n_kv_head = 2
block_size = 256
block_pattern = "TM"
total_batch_size = 8192
device_batch_size = 16
max_iters = 500
learning_rate = 1e-2
embedding_lr_mult = 10.0
warmup_iters = 20
