"""The speed and size tables the README quotes, and the RAG diagnostics.

    python bench.py [--what=decode --contexts=256,1024,4096 --plot=out/bench_decode]   # this CPU or one GPU
    python bench.py --reading out/tiny/ckpt.pt    # can a base model read? [--data_dir=data/world]
    python bench.py --vs_k out/rag_T/eval.json out/rag/eval.json --plot=acc_vs_k   # accuracy vs k: table and plot
"""
import argparse
import glob
import importlib.util
import json
import os
import platform
import random
import runpy
import statistics
import sys
import time
import types
from unittest import mock

import numpy as np
import torch

import model
from common import load_model, or_die, plot
from model import GPT, GPTConfig
from rag import load_data


def timed(fns, rounds=5, warmup=1):  # {name: median seconds of fn()} over rounds in which each fn takes a turn
    times = {name: [] for name in fns}
    for _ in range(warmup + rounds):  # the first warmup rounds are not counted
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_initialized():  # GPU work is asynchronous: wait for it before reading the clock
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t[warmup:]) for name, t in times.items()}


def table(title, header, rows):
    print(f"## {title}\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    print("".join("| " + " | ".join(map(str, r)) + " |\n" for r in rows), flush=True)


def mamba_ssm_mamba():  # mamba-ssm's Mamba-1 (source: $MAMBA_SSM_SRC or .gpu/mamba_ssm-*/) on selective_scan_ref
    src = os.environ.get("MAMBA_SSM_SRC") or min(glob.glob(".gpu/mamba_ssm-*/"), default=None)
    if src is None or importlib.util.find_spec("einops") is None:
        return None
    # empty modules in place of the CUDA scan, Triton's layer norm and the package __init__s (they import the CUDA
    # kernels); the packages whose modules load from the source get its folders as their __path__
    stubs = {name: types.ModuleType(name) for name in ("mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.triton",
             "mamba_ssm.utils", "mamba_ssm.modules", "mamba_ssm.ops.triton.layer_norm", "selective_scan_cuda")}
    stubs["mamba_ssm.ops.triton.layer_norm"]._layer_norm_fwd = None
    for name in ("mamba_ssm.ops", "mamba_ssm.utils", "mamba_ssm.modules"):
        stubs[name].__path__ = [os.path.join(src, *name.split("."))]
    with mock.patch.dict(sys.modules, stubs):  # and sys.modules as it was, afterwards
        simple = importlib.import_module("mamba_ssm.modules.mamba_simple")
        simple.selective_scan_fn = importlib.import_module("mamba_ssm.ops.selective_scan_interface").selective_scan_ref
    return simple.Mamba


# the same width and depth for every pattern: on CPU the tiny config's shape, on GPU the d20 shape
SHAPE_CPU = dict(n_layer=4, n_embd=128, n_head=4, n_kv_head=2, vocab_size=2048)
SHAPE_GPU = dict(n_layer=20, n_embd=1280, n_head=10, n_kv_head=10, vocab_size=32768, mamba_mlp=True)
PATTERNS = {"T": dict(block_pattern="T"), "M": dict(block_pattern="M"), "M2": dict(block_pattern="M", mamba_version=2),
            "M3": dict(block_pattern="M", mamba_version=3), "hybrid TM": dict(block_pattern="TM")}

# -----------------------------------------------------------------------------
# the benchmarks: one function per section, each printing its tables

def bench_decode(args):
    device, shape = args.device, SHAPE_GPU if args.on_gpu else SHAPE_CPU
    contexts = args.contexts or ([1024, 4096, 16384, 32768] if args.on_gpu else [256, 1024, 4096])
    steps = 100  # decode steps timed per context; each one grows the context by a token, which is negligible
    rows, ms = [], {}  # ms[name][ctx]: ms per decoded token
    for name, kw in PATTERNS.items():
        torch.manual_seed(0)
        m = GPT(GPTConfig(block_size=max(contexts), **shape, **kw)).to(device, torch.bfloat16 if args.on_gpu else None)
        prompts = {ctx: torch.randint(0, shape["vocab_size"], (1, ctx), device=device) for ctx in contexts}
        tok, caches = prompts[contexts[0]][:, -1:], {}

        def prefill(ctx):  # a fresh cache every time: an M state cannot be rewound to an earlier position
            caches[ctx] = m.init_cache(1, ctx + steps + 2)
            m(prompts[ctx], cache=caches[ctx])

        with torch.no_grad():
            t_prefill = timed({ctx: lambda ctx=ctx: prefill(ctx) for ctx in contexts}, 3)
            # the contexts take turns token by token, so that load changes hit them alike
            t_tok = timed({ctx: lambda ctx=ctx: m(tok, cache=caches[ctx]) for ctx in contexts}, steps)
        ms[name] = {ctx: 1000 * t_tok[ctx] for ctx in contexts}
        for ctx in contexts:
            cache_mb = sum(t.numel() * t.element_size() for layer in caches[ctx].layers for t in layer) / 2**20
            rows.append([name, ctx, f"{1000 * t_prefill[ctx]:.1f}", f"{ms[name][ctx]:.2f}", f"{1 / t_tok[ctx]:,.0f}",
                         f"{cache_mb:.2f}"])
        del m, caches
    size = f"{shape['n_layer']} layers x {shape['n_embd']}" + (" bf16" if args.on_gpu else " fp32")
    table(f"prefill and decode, batch 1, {size}; cache: the bytes of its tensors",
          ["pattern", "context", "prefill ms", "decode ms/token", "tokens/s", "cache MB/sequence"], rows)
    lo, hi = contexts[0], contexts[-1]
    table(f"decode per token as the context grows, and against T (target: pure M, M3 at {hi} within 1.3x of at {lo}; "
          "on GPU: hybrid decode tokens/s at 16k >= 3x T's)",
          ["pattern", f"ms/token at {hi} / at {lo}", f"tokens/s vs T at {hi}"],
          [[name, f"{ms[name][hi] / ms[name][lo]:.2f}", f"{ms['T'][hi] / ms[name][hi]:.2f}"] for name in PATTERNS])
    stem = args.plot or "out/bench_decode"
    plot(stem, f"decode, batch 1, {shape['n_layer']} x {shape['n_embd']}, {args.machine}", "tokens of context",
         "ms per token", {name: (contexts, list(ms[name].values())) for name in PATTERNS}, xlog=True, ylog=True)
    print(f"(plot: {stem}.png, {stem}.svg)\n")


def bench_mixer(args):
    device, reference_mamba = args.device, mamba_ssm_mamba()
    if reference_mamba is None:
        print("## Mamba-1 mixer: skipped, it needs mamba-ssm's source (README: Tests) and einops\n")
        return

    def fwd_bwd(mixer, x):
        mixer(x).square().mean().backward()

    def chunked():  # our mixer on the chunked PyTorch scan, not its own path
        with mock.patch.multiple(model, selective_scan=model.chunked_scan, cuda_kernels=lambda: None):
            fwd_bwd(ours, x)

    fast = model.cuda_kernels() if args.on_gpu else model.cpu_scan_available()
    ours_path = ("mamba-ssm kernels" if args.on_gpu else "C scan") if fast else "chunked scan"
    rows = []
    for B, L, d in [(2, 512, 128), (8, 512, 256)] + ([(8, 2048, 1024)] if args.on_gpu else []):
        torch.manual_seed(0)
        ours = model.Mamba(d).to(device)
        # use_fast_path=False: its fused path would call the CUDA scan (stubbed) where causal-conv1d is installed
        theirs = reference_mamba(d_model=d, use_fast_path=False).to(device)
        ours.load_state_dict(theirs.state_dict())
        x = torch.randn(B, L, d, device=device, requires_grad=True)
        t = timed({"ours": lambda: fwd_bwd(ours, x), "chunked": chunked}, 3)
        t |= timed({"ref": lambda: fwd_bwd(theirs, x)}, 1, warmup=0)  # 100 s a call here: once is enough
        rows.append([f"{B} x {L} x {d}", f"{1000 * t['ours']:.0f}", f"{1000 * t['chunked']:.0f}",
                     f"{1000 * t['ref']:.0f}", f"{t['ref'] / t['ours']:.0f}x", f"{t['ref'] / t['chunked']:.1f}x",
                     f"{t['chunked'] / t['ours']:.1f}x"])
    table(f"Mamba-1 mixer forward+backward, fp32: ours ({ours_path}) and our chunked PyTorch scan vs mamba-ssm Mamba + "
          "selective_scan_ref (target: ours >= 30x the reference)",
          ["B x L x d_model", "ours ms", "chunked ms", "reference ms", "ref / ours", "ref / chunked", "chunked / ours"],
          rows)


def bench_block(args):
    B, L, d = 8, 256, 256
    cfg = dict(block_size=L, vocab_size=256, n_layer=1, n_head=4, n_kv_head=4, n_embd=d)
    blocks = {"T": model.AttentionBlock(GPTConfig(**cfg))} | {
        f"Mamba-{v}": model.MambaBlock(GPTConfig(**cfg, mamba_version=v)) for v in (1, 2, 3)}
    cos, sin = model.rotary(0, L, d // cfg["n_head"], args.device)
    x = torch.randn(B, L, d, device=args.device, requires_grad=True)
    t = timed({name: lambda blk=blk.to(args.device): blk(x, cos, sin).square().mean().backward()
               for name, blk in blocks.items()}, 7)
    table(f"one block forward+backward, fp32, d_model {d}, batch {B} x {L} (targets: Mamba-2 <= 1.5x T, "
          "Mamba-1 <= 5x T, Mamba-3 <= 1.5x T)",
          ["block", "ms", "vs T"], [[name, f"{1000 * s:.1f}", f"{s / t['T']:.2f}"] for name, s in t.items()])


def bench_bm25(args):
    import bm25s
    from rank_bm25 import BM25Okapi
    from retrieve import BM25Retriever, Document, tokenize

    def words(rng, n):  # Zipf-distributed pseudo-words, like text: a few very common terms, a long tail
        return " ".join(f"w{w - 1}" for w in np.minimum(rng.zipf(1.1, n), 30_000).tolist())
    n_docs, n_queries, rng, qrng = 50_000, 100, np.random.default_rng(0), np.random.default_rng(1)
    docs = [Document(id=str(i), text=words(rng, n)) for i, n in enumerate(rng.integers(10, 150, n_docs))]
    queries = [words(qrng, qrng.integers(2, 6)) for _ in range(n_queries)]
    tokens, qtok = [tokenize(doc.text) for doc in docs], [tokenize(q) for q in queries]
    okapi, lucene = BM25Retriever(method="okapi"), BM25Retriever()
    okapi.add_documents(docs)
    lucene.add_documents(docs)
    rank = BM25Okapi(tokens)
    fast = bm25s.BM25(method="lucene")
    fast.index(tokens, show_progress=False)
    same, same_but_ties, err = 0, 0, 0.0
    for q, qt in zip(queries, qtok):
        expected = rank.get_scores(qt)
        want = np.argsort(-expected, kind="stable")[:10]
        got = [(int(doc.id), s) for doc, s in okapi.retrieve(q, 10)]
        err = max(err, *(abs(s - expected[i]) for i, s in got), *(abs(s - expected[j]) for (_, s), j in zip(got, want)))
        same += [i for i, _ in got] == want.tolist()
        tenth = expected[want[-1]] + 1e-9  # above the 10th score the ids must agree; ties at it may break differently
        same_but_ties += {i for i, _ in got if expected[i] > tenth} == {j for j in want.tolist() if expected[j] > tenth}
    t = timed({"ours (okapi)": lambda: [okapi.retrieve(q, 10) for q in queries],
               "ours (lucene)": lambda: [lucene.retrieve(q, 10) for q in queries],
               "rank_bm25 (okapi)": lambda: [np.argpartition(-rank.get_scores(qt), 9)[:10] for qt in qtok],
               "bm25s (lucene)": lambda: [fast.retrieve([qt], k=10, show_progress=False) for qt in qtok]}, 3)
    print(f"## BM25 okapi vs rank_bm25 BM25Okapi, {n_docs:,} synthetic documents, {n_queries} queries: top-10 ids "
          f"identical for {same}/{n_queries} ({same_but_ties}/{n_queries} up to ties at the 10th score), max |score "
          f"difference| {err:.1e} (target: same top-10, scores to 1e-6)\n")
    table(f"BM25 latency, top 10 of {n_docs:,} documents, one query at a time "
          "(target: >= 50x faster than rank_bm25, within 1.5x of bm25s)",
          ["retriever", "ms/query", "rank_bm25 / this", "this / bm25s"],
          [[name, f"{1000 * s / n_queries:.3f}", f"{t['rank_bm25 (okapi)'] / s:.0f}x", f"{s / t['bm25s (lucene)']:.2f}"]
           for name, s in t.items()])


def bench_memory(args):
    # An estimate: weights, grads and fp32 AdamW moments are 16 bytes a parameter; activations saved for backward in
    # bf16 ~34 bytes per token per unit of width per layer (Korthikanti et al. 2022, without the s^2 attention term
    # flash attention removes), fp32 logits and their gradient 8 per token per vocabulary entry; CUDA context on top.
    rows = []
    for name in sorted(glob.glob("*_d[0-9]*.py", root_dir="configs")):  # the pretraining configs, named by depth
        cfg = runpy.run_path(os.path.join("configs", name))  # a GPU config sets the whole model shape and the batch
        margs = {k: cfg[k] for k in GPTConfig.__dataclass_fields__ if k in cfg} | {"vocab_size": 32768}
        with torch.device("meta"):
            m = GPT(GPTConfig(**margs))
        params, tokens = m.num_params(), cfg["device_batch_size"] * cfg["block_size"]
        state, act = 16 * params, tokens * (34 * cfg["n_embd"] * cfg["n_layer"] + 8 * margs["vocab_size"])
        rows.append([name, m.pattern, f"{params / 1e6:.0f}M", f"{cfg['device_batch_size']} x {cfg['block_size']}",
                     f"{state / 2**30:.1f}", f"{act / 2**30:.1f}", f"{(state + act) / 2**30:.1f}"])
    table("estimated training memory per GPU (bf16 autocast, fp32 AdamW; vocab 32768)",
          ["config", "pattern", "params", "batch", "weights+grads+AdamW GiB", "activations GiB", "total GiB"], rows)


SECTIONS = {f.__name__[len("bench_"):]: f for f in (bench_decode, bench_mixer, bench_block, bench_bm25, bench_memory)}

# -----------------------------------------------------------------------------
# can a base model read? python bench.py --reading out/tiny/ckpt.pt

@torch.no_grad()
def reading_loss(model, tok, qas, by_id):
    """Loss per answer token of questions asked right after their gold document, in the pretraining format
    (world.reading_items): a model that ignores the document pays 10+ nats a name token, one that copies ~0."""
    losses = []
    for q in qas:
        d = by_id[q["gold_ids"][0]]
        lead = " " + q["entity"] if "entity" in q else ""
        rest = q["response"][len(q["entity"]):] if "entity" in q else " " + q["golden_answers"][0]
        prompt = tok.encode(f"{d.title}: {d.text}\nQuestion: {q['question']}\nAnswer:{lead}")
        answer = tok.encode(rest)
        x = torch.tensor([[tok.bos_id] + prompt + answer[:-1]])
        y = torch.tensor([[-1] * len(prompt) + answer])  # only the answer's tokens are scored
        losses.append(model(x, y, loss_reduction="none")[1][0, len(prompt):])
    return torch.cat(losses).mean().item()


def diagnose(args):
    m, tok, _ = or_die(load_model, args.reading, "cpu", args.data_dir)
    _, by_id, qa = or_die(load_data, args.data_dir)
    qas = [q for q in qa["heldout"] if len(q.get("gold_ids", [])) == 1 and q["golden_answers"] and
           q.get("response", "").startswith(q.get("entity", ""))]
    qas = random.Random(0).sample(qas, min(100, len(qas)))
    print(f"reading loss: {reading_loss(m, tok, qas, by_id):.3f} nats per answer token "
          f"({len(qas)} held-out questions, each right after its document)")

# -----------------------------------------------------------------------------
# accuracy vs documents in context, from rag_train.py's eval.json files:
#   python bench.py --vs_k out/rag_T/eval.json out/rag_M/eval.json out/rag/eval.json --plot=acc_vs_k

def curves(results):  # (eval.json's index, label, params, {k: value}, kind) per EM, reread EM, gold-citation curve
    for i, r in enumerate(results):
        # named by the pattern and the run (the checkpoint's directory), if known
        name = f"{r['pattern']} {os.path.basename(os.path.dirname(r.get('checkpoint', '')))}".rstrip()
        for key, label, field, kind in (("vs_k", name, "em", "em"), ("vs_k_reread", name + ", reread", "em", "reread"),
                                        ("vs_k", name + ", cites gold", "citation_gold", "cites")):
            values = {int(k): s[field] for k, s in r.get(key, {}).items() if field in s}
            if values:
                yield i, label, r["params"], values, kind


def vs_k_plot(stem, results):  # EM (%) vs k on a log2 axis: a colour per eval.json, dashed: cite, then read
    return plot(stem, "held-out exact match vs documents in context", "k (documents)", "exact match (%)",
                {label: (sorted(em), [100 * em[k] for k in sorted(em)],  # blue, red, green, purple, orange:
                         dict(color=f"C{(0, 3, 2, 4, 1)[i % 5]}", linestyle="--" if kind == "reread" else "-"))
                 for i, label, _, em, kind in curves(results) if kind != "cites"}, xlog=True, ylim=(0, 100))


def vs_k(args):
    results = []
    for path in args.vs_k:
        try:
            results.append(json.load(open(path)))
        except (OSError, ValueError) as e:
            sys.exit(f"error: {path}: {e}")
        if not isinstance(results[-1], dict) or not {"pattern", "params", "vs_k"} <= results[-1].keys():
            sys.exit(f"error: {path} is not an eval.json of rag_train.py (it needs pattern, params and vs_k)")
    ks = sorted({int(k) for r in results for k in r["vs_k"]})  # a markdown row per curve, % at each k
    print("| model | params | " + " | ".join(f"k={k}" for k in ks) + " |\n|---|---|" + "---|" * len(ks))
    for _, label, params, em, _ in curves(results):
        print(f"| {label} | {params:,} | " + " | ".join(f"{100 * em[k]:.1f}" if k in em else "" for k in ks) + " |")
    if args.plot:
        vs_k_plot(args.plot, results)
        print(f"wrote {args.plot}.png and {args.plot}.svg")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    parser.add_argument("--what", default=",".join(SECTIONS), type=lambda v: v.split(","), help="sections: %(default)s")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    # 1: tiny models gain nothing from a second thread, and on a loaded machine OpenMP threads spin-wait on each
    # other (10x slower with 2 threads than with 1 at load average 8 on 2 cores). 0: torch's default.
    parser.add_argument("--threads", type=int, default=1)
    # tokens of context, comma-separated (argparse names a bad one); default 256,1024,4096 on CPU, 1024 to 32768 on GPU
    parser.add_argument("--contexts", type=lambda v: sorted(int(c) for c in v.split(",")), help="decode: contexts")
    parser.add_argument("--plot", help="write STEM.png and STEM.svg (decode: default out/bench_decode)")
    task = parser.add_mutually_exclusive_group()
    task.add_argument("--reading", metavar="CKPT", help="a base model's loss per answer token after the gold document")
    task.add_argument("--vs_k", nargs="+", metavar="EVAL_JSON", help="rag_train.py's EM vs k: a table (and --plot)")
    parser.add_argument("--data_dir", default="data/world", help="--reading: the questions and documents")
    args = parser.parse_args()
    torch.set_num_threads(args.threads or torch.get_num_threads())
    if args.reading:
        return diagnose(args)
    if args.vs_k:
        return vs_k(args)
    if unknown := set(args.what) - set(SECTIONS):
        parser.error(f"--what: unknown section(s) {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    args.on_gpu = args.device.startswith("cuda")
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor() or platform.machine()) if os.path.exists("/proc/cpuinfo") else platform.machine()
    args.machine = torch.cuda.get_device_name() if args.on_gpu else f"{cpu}, {os.cpu_count()} cores"
    print(f"# bench on {args.machine}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}, "
          f"load average {os.getloadavg()[0]:.1f}\n", flush=True)
    for section in [section for name, section in SECTIONS.items() if name in args.what]:  # in SECTIONS' order
        section(args)


if __name__ == "__main__":
    main()
