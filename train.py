"""Pre-train (or continue training) a hybrid Transformer/Mamba language model on tokenised shards. Every global below
is a config key (the defaults: the tiny CPU run); the resolved config is logged and stored in every checkpoint.

    python prepare.py && python train.py                      # the embedded default: tiny world, CPU, minutes
    torchrun --standalone --nproc_per_node=8 train.py configs/hybrid_d20.py --max_iters=1000  # config, then overrides
"""
import functools
import json
import os
import time

import numpy as np
import torch

from common import (StepLog, accumulate, all_reduce_mean, check_config, die, load_checkpoint, lr_at, or_die,
                    peak_flops, print0, save_checkpoint, setup, step_optimizers, teardown, wrap_ddp)
from configurator import ConfigError, configure
from model import GPT, GPTConfig

# -----------------------------------------------------------------------------
# I/O
data_dir = "data/world"        # train.bin, val.bin, meta.json, tokenizer.json from prepare.py
out_dir = "out/tiny"
init_from = "scratch"          # "scratch" | "resume" (out_dir/ckpt.pt, exactly) | path to a checkpoint to continue from
overwrite = False              # True: a new run may replace the checkpoint already in out_dir
eval_interval = 100            # steps between val-loss evaluations (and checkpoints)
eval_tokens = 32768            # val tokens per evaluation
# model (any other GPTConfig field keeps its default)
n_layer = 4
n_embd = 128
n_head = 4
n_kv_head = 2
block_size = 256
block_pattern = "TM"           # tiled to n_layer: T M T M
mamba_version = 1
mamba_mlp = False              # an MLP after each Mamba mixer (hybrids at scale: Samba, Jamba)
# optimisation
total_batch_size = 8192        # tokens per optimizer step, across all processes and micro-steps
device_batch_size = 16         # sequences per micro-step per process
max_iters = 500
learning_rate = 1e-2
embedding_lr_mult = 10.0       # the embedding's lr / learning_rate: at 1 (and with weight decay) the tiny model
                               # never learned to copy a name from its context in 600 steps (see README, RAG)
min_lr_frac = 0.1
warmup_iters = 20
lr_schedule = "cosine"         # "cosine" | "wsd"
weight_decay = 0.1
grad_clip = 1.0
# system
device = "auto"                # "auto" | "cpu" | "cuda" | "cuda:1"
compile = False
seed = 1337
# -----------------------------------------------------------------------------
try:  # a statement, not an assignment: the config globals above are all the module's leading assignments
    config = configure(globals())
except ConfigError as e:
    die(e)
check_config(config, [
    ("eval_interval eval_tokens n_layer n_embd n_head n_kv_head block_size total_batch_size device_batch_size "
     "max_iters learning_rate embedding_lr_mult", lambda v: v > 0, "positive"),
    ("warmup_iters weight_decay grad_clip", lambda v: v >= 0, "non-negative"),
    ("min_lr_frac", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("lr_schedule", lambda v: v in ("cosine", "wsd"), "'cosine' or 'wsd'"),
    ("block_pattern", lambda v: v and set(v) <= set("TM"), "a non-empty string of T and M")])
if init_from != "resume" and os.path.exists(os.path.join(out_dir, "ckpt.pt")) and not overwrite:
    die(f"{out_dir}/ckpt.pt exists: continue it with --init_from=resume, or replace it with --overwrite=True")

ddp, rank, world_size, device = setup(device, seed)

# data: fixed-length windows of the token stream, visited in a seeded random order, epoch after epoch.
# The order depends only on (seed, step), so resuming at step s reproduces the batches exactly, and one
# process with grad accumulation sees the same global batch as N processes.
if not os.path.isfile(os.path.join(data_dir, "meta.json")):
    die(f"no prepared data in {data_dir}/ (meta.json missing): run `python prepare.py` first")
meta = json.load(open(os.path.join(data_dir, "meta.json")))
train_data = np.memmap(os.path.join(data_dir, "train.bin"), dtype=meta["dtype"], mode="r")
val_data = np.memmap(os.path.join(data_dir, "val.bin"), dtype=meta["dtype"], mode="r")
n_windows = (len(train_data) - 1) // block_size
seqs_per_step = total_batch_size // block_size
if total_batch_size % (block_size * device_batch_size * world_size):
    die(f"total_batch_size={total_batch_size} must be a multiple of block_size*device_batch_size*world_size="
        f"{block_size * device_batch_size * world_size}")
grad_accum = seqs_per_step // (device_batch_size * world_size)
if n_windows < seqs_per_step:
    die(f"{data_dir}/train.bin holds {n_windows} windows of {block_size} tokens, fewer than one batch ({seqs_per_step})")
if (len(val_data) - 1) // block_size < world_size:  # a small corpus: too little held out to measure a loss
    die(f"{data_dir}/val.bin holds {len(val_data):,} tokens, less than one window of {block_size + 1} per process: "
        f"prepare it with a larger --val_frac, or train with a smaller --block_size")


@functools.lru_cache(maxsize=1)
def epoch_order(epoch):  # the windows' shuffled order in this epoch
    return np.random.default_rng(seed + epoch).permutation(n_windows)


def windows(data, starts):  # -> inputs, next-token targets (len(starts), block_size) on the device
    xy = torch.from_numpy(np.stack([data[s:s + block_size + 1] for s in starts]).astype(np.int64))
    return xy[:, :-1].to(device), xy[:, 1:].to(device)


def get_batch(step, micro):
    first = step * seqs_per_step + (rank * grad_accum + micro) * device_batch_size
    return windows(train_data, [int(epoch_order(i // n_windows)[i % n_windows]) * block_size
                                for i in range(first, first + device_batch_size)])


@torch.no_grad()
def evaluate(model):
    n = min(eval_tokens // block_size, (len(val_data) - 1) // block_size) // world_size * world_size
    mine = [i * block_size for i in range(rank, n, world_size)]  # this process's share of the val windows
    losses = [model(*windows(val_data, mine[k:k + device_batch_size]))[1]
              for k in range(0, len(mine), device_batch_size)]
    return all_reduce_mean(torch.stack(losses).mean(), ddp).item()


# model, optimizer, and where we start from
model_args = {k: config[k] for k in GPTConfig.__dataclass_fields__ if k in config} | {"vocab_size": meta["vocab_size"]}
ckpt_path = os.path.join(out_dir, "ckpt.pt") if init_from == "resume" else init_from
ckpt = or_die(load_checkpoint, ckpt_path, device) if init_from != "scratch" else None
try:  # a checkpoint of another stage or model.py: its keys or shapes do not fit
    start_step = ckpt["step"] if init_from == "resume" else 0
    model_args = ckpt["model_args"] if ckpt else model_args  # the checkpoint's shape, whatever the config says
    model = (GPT.from_checkpoint(ckpt) if ckpt else GPT(GPTConfig(**model_args))).to(device)
    optimizers = model.configure_optimizers(learning_rate, weight_decay, (0.9, 0.95), device.split(":")[0],
                                            embedding_lr_mult)
    for opt, state in zip(optimizers, ckpt["optimizer"], strict=True) if init_from == "resume" else ():
        opt.load_state_dict(state)
except (KeyError, TypeError, ValueError, RuntimeError) as e:
    die(f"{ckpt_path}: does not fit this train.py / model.py ({type(e).__name__}: {' '.join(str(e).split())[:200]})"
        if ckpt else e)
print0(f"model: {model.pattern} pattern, "
       f"{model.num_params():,} parameters, {grad_accum} micro-steps of {device_batch_size}x{block_size} per process")
raw_model = model
if compile:
    model = torch.compile(model)
model = wrap_ddp(model, ddp, device)
ckpt = None  # free the loaded tensors

os.makedirs(out_dir, exist_ok=True)
log = StepLog(max_iters, start_step, os.path.join(out_dir, "log.txt"), raw_model.flops_per_token(block_size),
              peak_flops(device), world_size)  # only rank 0 writes
log.write(f"config {json.dumps(config)}")


# the loop
t_start, val_loss = time.time(), None
for step in range(start_step, max_iters):
    lr = lr_at(step, max_iters, learning_rate, warmup_iters, lr_schedule, min_lr_frac)
    loss_sum = torch.zeros((), device=device)
    for micro in range(grad_accum):
        x, y = get_batch(step, micro)
        loss_sum += accumulate(model, x, y, grad_accum, micro == grad_accum - 1, device)
    step_optimizers(optimizers, raw_model, lr / learning_rate, grad_clip)
    log(step, all_reduce_mean(loss_sum / grad_accum, ddp).item(), lr, total_batch_size)
    if (step + 1) % eval_interval == 0 or step + 1 == max_iters:
        val_loss = evaluate(model)
        log.write(f"step {step + 1}/{max_iters} | val loss {val_loss:.4f}")
        if rank == 0:
            save_checkpoint(os.path.join(out_dir, "ckpt.pt"), {
                "model": raw_model.state_dict(), "model_args": model_args, "step": step + 1, "val_loss": val_loss,
                "optimizer": [opt.state_dict() for opt in optimizers], "config": config, "stage": "train",
                "data_state": {"seed": seed, "windows_consumed": (step + 1) * seqs_per_step, "block_size": block_size},
                "tokenizer": open(os.path.join(data_dir, "tokenizer.json")).read()})
            log.write(f"saved {out_dir}/ckpt.pt at step {step + 1}")

print0(f"done: {max_iters - start_step} steps in {time.time() - t_start:.0f}s, final val loss {val_loss}")
teardown(ddp)
