"""
Measures what the README claims, side by side in one run, and prints markdown tables.

    python bench.py                    # everything, on this machine (CPU or one GPU)
    python bench.py --what=train,decode --out=bench.json

  train:   training tokens/s (and MFU on GPU) of T, M (Mamba-1), M2 (Mamba-2) and hybrid models of equal width
  decode:  prefill time and per-token decode time, and cache memory per sequence, as the context grows
  memory:  training memory of every config in configs/ (weights, grads, AdamW state and measured activations)
"""
import argparse
import dataclasses
import glob
import json
import os
import platform
import time

import torch

from common import autocast, peak_flops
from configurator import configure, script_defaults
from model import GPT, GPTConfig

parser = argparse.ArgumentParser()
parser.add_argument("--what", default="train,decode,memory")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
parser.add_argument("--out", default="", help="also write the numbers as JSON here")
args = parser.parse_args()
device, on_gpu = args.device, args.device.startswith("cuda")
results = {"device": torch.cuda.get_device_name() if on_gpu else f"{platform.processor() or platform.machine()}, "
           f"{torch.get_num_threads()} threads", "torch": torch.__version__}
print(f"# bench on {results['device']}, torch {torch.__version__}\n")


def timed(fn, repeats=5):
    """Median wall time of fn() in seconds, after a warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if on_gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if on_gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def table(header, rows):
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")
    print()


# the same width and depth for every pattern: on CPU the tiny config's shape, on GPU the d20 shape
SHAPE = dict(n_layer=20, n_embd=1280, n_head=10, n_kv_head=10, vocab_size=32768, mamba_mlp=True) if on_gpu else \
    dict(n_layer=4, n_embd=128, n_head=4, n_kv_head=2, vocab_size=2048)
PATTERNS = {"T": dict(block_pattern="T"), "M": dict(block_pattern="M"), "M2": dict(block_pattern="M", mamba_version=2),
            "hybrid TM": dict(block_pattern="TM")}

if "train" in args.what:
    T, B = (2048, 8) if on_gpu else (256, 16)
    rows, base = [], None
    for name, kw in PATTERNS.items():
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=T, **SHAPE, **kw)).to(device)
        opts = model.configure_optimizers(1e-4, 0.0, (0.9, 0.95), device.split(":")[0])
        x = torch.randint(0, SHAPE["vocab_size"], (B, T + 1), device=device)

        def step():
            with autocast(device):
                _, loss = model(x[:, :-1], x[:, 1:])
            loss.backward()
            for opt in opts:
                opt.step()
            model.zero_grad(set_to_none=True)

        tok_s = B * T / timed(step, 3)
        base = base or tok_s
        peak = peak_flops(device)
        mfu = f"{100 * tok_s * model.flops_per_token(T) / peak:.1f}%" if peak else "-"
        rows.append([name, f"{model.num_params() / 1e6:.2f}M", f"{tok_s:,.0f}", f"{tok_s / base:.2f}", mfu])
        results.setdefault("train", {})[name] = dict(params=model.num_params(), tokens_per_s=tok_s)
        del model, opts
    print(f"## training step (forward + backward + AdamW), batch {B} x {T}, {SHAPE['n_layer']} layers x {SHAPE['n_embd']}")
    table(["pattern", "params", "tokens/s", "vs T", "MFU"], rows)

if "decode" in args.what:
    contexts = [1024, 4096, 16384, 32768] if on_gpu else [256, 1024, 4096]
    rows = []
    for name, kw in PATTERNS.items():
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=max(contexts), **SHAPE, **kw)).to(device).eval()
        if on_gpu:
            model = model.to(torch.bfloat16)
        for ctx in contexts:
            prompt = torch.randint(0, SHAPE["vocab_size"], (1, ctx), device=device)
            n_new = 16
            with torch.no_grad():
                cache = model.init_cache(1, ctx + n_new + 8)
                t_prefill = timed(lambda: (setattr(cache, "pos", 0), model(prompt, cache=cache)), 1)
                # cache now holds ctx tokens; time decode steps from there (pos rewound after each measurement)
                tok = prompt[:, -1:]

                def decode():
                    cache.pos = ctx
                    for _ in range(n_new):
                        model(tok, cache=cache)
                t_tok = timed(decode, 3) / n_new
            cache_mb = sum(t.numel() * t.element_size() for layer in cache.layers for t in layer) / 2**20
            rows.append([name, ctx, f"{1000 * t_prefill:.1f}", f"{1000 * t_tok:.2f}", f"{1 / t_tok:,.0f}", f"{cache_mb:.1f}"])
            results.setdefault("decode", {}).setdefault(name, {})[ctx] = dict(prefill_s=t_prefill, per_token_s=t_tok,
                                                                               cache_mb=cache_mb)
        del model
    print(f"## prefill and decode, batch 1, {SHAPE['n_layer']} layers x {SHAPE['n_embd']}" + (" bf16" if on_gpu else " fp32"))
    table(["pattern", "context", "prefill ms", "decode ms/token", "tokens/s", "cache MB/sequence"], rows)
    for name in PATTERNS:
        d = results["decode"][name]
        print(f"{name}: decode time at {contexts[-1]} tokens of context / at {contexts[0]}: "
              f"{d[contexts[-1]]['per_token_s'] / d[contexts[0]]['per_token_s']:.2f}x")
    print()

if "memory" in args.what:
    # Weights, grads and AdamW moments are fp32 (16 bytes a parameter). Activations are measured: the bytes
    # autograd saves for backward in a bf16-autocast forward, per token, scaled to the config's context and batch
    # (linear in both: flash attention keeps no T x T matrix, the scan keeps O(T) state). The pure-PyTorch Mamba
    # path saves more than mamba-ssm's fused kernels, so M layers are an upper bound. Not counted: allocator
    # fragmentation and temporaries that never reach autograd (a few GiB at most).
    train_defaults = script_defaults("train.py")
    rows = []
    for path in sorted(glob.glob("configs/*.py")):
        if os.path.basename(path).startswith(("rag_", "refrag_", "tiny")):
            continue
        cfg = configure(dict(train_defaults), [path])
        margs = {f.name: cfg[f.name] for f in dataclasses.fields(GPTConfig) if f.name in cfg} | {"vocab_size": 32768}
        model = GPT(GPTConfig(**{**margs, "block_size": 128}))

        def saved_bytes(T):
            saved = {}

            def pack(t):
                saved[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
                return t

            x = torch.randint(0, 32768, (1, T + 1))
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
                model(x[:, :-1], x[:, 1:])
            return sum(saved.values())

        # two lengths: the difference is what grows with tokens; the rest is autocast's bf16 copies of the weights
        small, large = saved_bytes(64), saved_bytes(128)
        per_token = (large - small) / 64
        act = per_token * cfg["block_size"] * cfg["device_batch_size"] + (small - 64 * per_token)
        params = model.num_params()
        state = 16 * params
        rows.append([os.path.basename(path), model.pattern, f"{params / 1e6:.0f}M", f"{cfg['device_batch_size']} x {cfg['block_size']}",
                     f"{state / 2**30:.1f}", f"{act / 2**30:.1f}", f"{(state + act) / 2**30:.1f}"])
        results.setdefault("memory", {})[os.path.basename(path)] = dict(params=params, state_bytes=state, activation_bytes=act)
        del model
    print("## training memory per GPU (bf16 autocast, fp32 AdamW; vocab 32768)")
    table(["config", "pattern", "params", "batch", "weights+grads+AdamW GiB", "activations GiB", "total GiB"], rows)

if args.out:
    json.dump(results, open(args.out, "w"), indent=1)
