"""What the stage scripts share: device and DDP set-up, lr schedule, atomic checkpoints and files, the step log."""
import glob
import math
import os
import socket
import sys
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from model import GPT
from tokenizer import Tokenizer


def die(msg):  # bad input ends the run with one line, not a traceback
    print0(f"error: {msg}", file=sys.stderr)
    sys.exit(1)


def or_die(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (ValueError, OSError) as e:
        die(e)


def first_line(e):  # str(e) can be empty: a 0-byte file's EOFError
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def check_config(config, rules):
    """Ends the run on the first value that breaks a rule, before any work: rules are (keys, test, what it must be)."""
    for keys, ok, what in rules:
        for k in keys.split():
            if not ok(config[k]):
                die(f"{k}={config[k]!r}: must be {what}")


def print0(*args, **kwargs):
    if int(os.environ.get("RANK", 0)) == 0:
        print(*args, **kwargs, flush=True)


# -----------------------------------------------------------------------------
# device and distributed

def setup(device="auto", seed=1337):
    """Returns (ddp, rank, world_size, device). Under torchrun: NCCL on GPUs, gloo on CPUs."""
    ddp = "RANK" in os.environ
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    rank, world_size = (int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])) if ddp else (0, 1)
    if ddp:
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
            torch.cuda.set_device(device)
        elif os.environ.get("LOCAL_WORLD_SIZE") == os.environ["WORLD_SIZE"]:
            # one machine: gloo needs only loopback, rather than whatever address the hostname resolves to (in some
            # containers, one that cannot be connected to)
            loopback = next((name for _, name in socket.if_nameindex() if name.startswith("lo")), None)
            if loopback:
                os.environ.setdefault("GLOO_SOCKET_IFNAME", loopback)
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    torch.manual_seed(seed)
    torch.backends.cuda.matmul.allow_tf32 = device.startswith("cuda")  # cuDNN's is on by default
    return ddp, rank, world_size, device


def teardown(ddp):
    """Ranks leave together: a gloo rank that exits while rank 0 still works can abort the whole run at exit."""
    if ddp:
        dist.barrier()
        dist.destroy_process_group()


def wrap_ddp(model, ddp, device):
    """model in DistributedDataParallel under torchrun (gradients averaged across ranks), else model itself."""
    return DDP(model, device_ids=[int(device.split(":")[1])] if device.startswith("cuda") else None) if ddp else model


def accumulate(model, x, y, grad_accum, last, device):
    """One micro-step: backpropagates loss(x, y) / grad_accum; under DDP the gradients sync only on the last.
    -> the loss, detached."""
    if isinstance(model, DDP):
        model.require_backward_grad_sync = last
    with autocast(device):
        _, loss = model(x, y)
    (loss / grad_accum).backward()
    return loss.detach()


def all_reduce_mean(x, ddp):
    if ddp:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.AVG)
    return x


def autocast(device):
    """bf16 autocast on CUDA; plain fp32 on CPU (bf16 matmuls are slow there and break exactness tests)."""
    return torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=device.startswith("cuda"))


def peak_flops(device):
    """Peak dense bf16 FLOP/s of a known GPU, for MFU; else None."""
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else ""
    peaks = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "4090": 165e12, "4070": 117e12, "3090": 71e12,
             "3070": 41e12, "L4": 121e12}
    return next((v for k, v in peaks.items() if k in name), None)


# -----------------------------------------------------------------------------
# learning-rate schedule

def lr_at(step, max_iters, lr, warmup_iters, schedule="cosine", min_lr_frac=0.1, cooldown_frac=0.2):
    """Linear warmup, then cosine decay to min_lr_frac*lr, or WSD: flat, then linear over the last cooldown_frac."""
    if step < warmup_iters:
        return lr * (step + 1) / warmup_iters
    min_lr = lr * min_lr_frac
    if schedule == "cosine":
        progress = (step - warmup_iters) / max(1, max_iters - warmup_iters)
        return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))
    cooldown_start = max_iters * (1 - cooldown_frac)  # wsd: flat (exactly lr) until the cool-down starts
    return lr - (lr - min_lr) * max(0, step - cooldown_start) / max(1, max_iters - cooldown_start)


def step_optimizers(optimizers, model, lr_scale, grad_clip):
    """Clip, step every optimizer with each param group's own peak lr times lr_scale, and clear the grads."""
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group.setdefault("base_lr", group["lr"]) * lr_scale  # base_lr is saved in checkpoints
        opt.step()
    model.zero_grad(set_to_none=True)


# -----------------------------------------------------------------------------
# files written to a temp file and renamed: a reader never sees half a file, and a crash mid-write leaves the previous
# one readable

def _atomically(path, write):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_atomic(path, data):
    """Writes data (a str, or an iterable of str lines, written as they come) atomically."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines([data] if isinstance(data, str) else data)
    _atomically(path, write)


def save_checkpoint(path, ckpt):
    for stale in glob.glob(glob.escape(path) + ".tmp*"):  # left by a save that was killed (one writer per path)
        os.remove(stale)
    _atomically(path, lambda tmp: torch.save(ckpt, tmp))


def load_checkpoint(path, device="cpu"):
    """weights_only=True: no code runs from a file someone sent you. A bad file is a ValueError that names it."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint {path} not found")
    if os.path.getsize(path) == 0:
        raise ValueError(f"checkpoint {path} is unreadable: the file is empty")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:
        # torch's weights-only message suggests weights_only=False, i.e. running the file's code: never say that
        why = type(e).__name__ if "weights only" in str(e).lower() else f"{type(e).__name__}: {first_line(e)[:120]}"
        raise ValueError(f"checkpoint {path} is unreadable: not a checkpoint of this project, or damaged ({why})") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt or "model_args" not in ckpt:
        raise ValueError(f"checkpoint {path} is not a checkpoint of this project (no model / model_args)")
    return ckpt


def load_model(path, device="cpu", data_dir=None):
    """(model, tokenizer, ckpt) from a stage's checkpoint, on device; a bad or mismatched file is a ValueError."""
    ckpt = load_checkpoint(path, device)
    if "tokenizer" not in ckpt:
        raise ValueError(f"checkpoint {path} has no tokenizer: not written by train.py / rag_train.py")
    try:
        model = GPT.from_checkpoint(ckpt).to(device)
    except (ValueError, RuntimeError, TypeError) as e:
        raise ValueError(f"checkpoint {path} does not fit this model.py ({first_line(e)[:160]})") from None
    tok = Tokenizer.from_json(ckpt["tokenizer"])
    if tok.vocab_size != model.config.vocab_size:
        raise ValueError(f"checkpoint {path}: its tokenizer has {tok.vocab_size} tokens, the model {model.config.vocab_size}")
    data_tok = data_dir and os.path.join(data_dir, "tokenizer.json")
    if data_tok and os.path.isfile(data_tok) and open(data_tok).read() != ckpt["tokenizer"]:
        raise ValueError(f"checkpoint {path}: its tokenizer is not {data_tok}'s: the checkpoint was trained on other data")
    return model, tok, ckpt


# -----------------------------------------------------------------------------
# logging

class StepLog:
    """One line per optimisation step: step/total, loss, lr, tokens/s, MFU (on GPU), the extras, ETA."""

    def __init__(self, max_iters, start_step, path=None, flops_per_token=None, peak=None, world_size=1):
        self.max_iters, self.start_step, self.path = max_iters, start_step, path
        self.mfu_per_tok_s = flops_per_token / (peak * world_size) if peak and flops_per_token else None
        self.t0 = self.t_last = time.time()

    def __call__(self, step, loss, lr, tokens, **extra):
        now = time.time()
        tok_s, self.t_last = tokens / max(now - self.t_last, 1e-9), now
        if self.mfu_per_tok_s:
            extra = {"mfu": f"{100 * tok_s * self.mfu_per_tok_s:.1f}%", **extra}
        eta = int((now - self.t0) / (step + 1 - self.start_step) * (self.max_iters - step - 1))
        self.write(f"step {step + 1}/{self.max_iters} | loss {loss:.6f} | lr {lr:.2e} | {tok_s:,.0f} tok/s"
                   + "".join(f" | {k} {v:.4f}" if isinstance(v, float) else f" | {k} {v}" for k, v in extra.items())
                   + f" | eta {eta // 3600}h{eta % 3600 // 60:02d}m{eta % 60:02d}s")

    def write(self, line):
        print0(line)
        if self.path and int(os.environ.get("RANK", 0)) == 0:
            with open(self.path, "a") as f:
                f.write(line + "\n")


# -----------------------------------------------------------------------------
# plots

def plot(stem, title, xlabel, ylabel, series, xlog=False, ylog=False, ylim=None):
    """A line plot as stem.png and .svg, log2 x (xlog) or log10 y (ylog) axes; series: {label: (xs, ys[, style])}."""
    import matplotlib  # here, not at the top: the scripts that never plot do not pay for importing it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (xs, ys, *style) in series.items():
        ax.plot(xs, ys, label=label, **{"marker": "o", "markersize": 4, **(style[0] if style else {})})
    if xlog:
        ticks = sorted({x for xs, *_ in series.values() for x in xs})
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(x) for x in ticks])
    if ylim:
        ax.set_ylim(*ylim)
    if ylog:  # five ticks evenly spaced on the log axis, as plain numbers: a decade can be wider than the data
        ax.set_yscale("log")
        lo, hi = ax.get_ylim()
        ticks = [lo * (hi / lo) ** (i / 4) for i in range(5)]
        ax.set_yticks(ticks, [f"{t:.3g}" for t in ticks])
    ax.minorticks_off()  # ticks only where set: at each x, and the five on a log y axis
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    drawn = {line.get_label(): (line.get_xdata().tolist(), line.get_ydata().tolist()) for line in ax.get_lines()}
    # SVG text as text, not glyph outlines; fixed ids and no date: the same data gives the same file, for git
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "plot"}):
        for ext in ("png", "svg"):
            _atomically(f"{stem}.{ext}", lambda tmp: fig.savefig(tmp, format=ext, dpi=150, bbox_inches="tight",
                                                                  metadata={"Date": None} if ext == "svg" else None))
    plt.close(fig)
    return drawn
