"""
Measures every speed and size figure the README quotes, side by side in one run, and prints markdown tables.
Speeds are medians over rounds in which the contenders take turns, so that changes in machine load hit them alike.

    python bench.py                               # the default sections, on this machine (CPU or one GPU)
    python bench.py --what=train,decode --out=out/bench.json --plot=out/bench_decode.svg
    python bench.py --what=ann,build              # the expensive ones: minutes each on 2 CPU cores

  train:     training tokens/s (and MFU on GPU) of T, M (Mamba-1), M2, M3 (Mamba-2, -3) and hybrid models, equal width
  decode:    prefill time, per-token decode time and cache memory per sequence as the context grows (and a plot)
  mixer:     Mamba-1 mixer forward+backward: ours vs mamba-ssm's own module on its sequential selective_scan_ref,
             and our chunked PyTorch scan (the path without the C scan or mamba-ssm's kernels)
  block:     one block's forward+backward, T vs Mamba-1 vs Mamba-2 vs Mamba-3 at equal width
  bm25:      our BM25 vs rank_bm25 (same top-10 and scores) and bm25s (latency), 50k synthetic documents
  retrieval: recall@1/5 and MRR on data/world's held-out single-hop questions, and latency per query, per retriever
  memory:    training memory of every config in configs/ (weights, grads, AdamW state and measured activations)
  ann:       (not in the default) HNSW vs exact search at 100k random unit vectors: recall@10 and speed-up
  build:     (not in the default) build time and memory per retriever type at 10k and 100k documents, BM25 at 1M,
             each in a fresh process (--what=build_one --kind=bm25 --n=100000) so that peak memory is its own
"""
import argparse
import contextlib
import dataclasses
import glob
import io
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

import model
from common import autocast, peak_flops
from configurator import configure, script_defaults
from model import GPT, GPTConfig

parser = argparse.ArgumentParser()
parser.add_argument("--what", default="train,decode,mixer,block,bm25,retrieval,memory")
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
# Tiny models gain nothing from a second CPU thread, and on a loaded machine OpenMP threads spin-wait on each
# other (10x slower with 2 threads than with 1 at load average 8 on 2 cores). 0: torch's default.
parser.add_argument("--threads", type=int, default=1)
parser.add_argument("--out", default="", help="also write the numbers as JSON here")
parser.add_argument("--plot", default="out/bench_decode.svg", help="decode time vs context plot ('' for none)")
parser.add_argument("--kind", default="bm25", help="build_one: simple, bm25, bm25s, encode, flat, hnsw")
parser.add_argument("--n", type=int, default=10_000, help="build_one: number of documents")
args = parser.parse_args()
what = set(args.what.split(","))
device, on_gpu = args.device, args.device.startswith("cuda")
if args.threads:
    torch.set_num_threads(args.threads)
cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
           platform.processor() or platform.machine()) if os.path.exists("/proc/cpuinfo") else platform.machine()
results = {"device": torch.cuda.get_device_name() if on_gpu else f"{cpu}, {os.cpu_count()} cores",
           "threads": torch.get_num_threads(), "torch": torch.__version__, "load_average": os.getloadavg()[0]}
if what != {"build_one"}:
    print(f"# bench on {results['device']}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}, "
          f"load average {results['load_average']:.1f}\n", flush=True)


def timed(fns, rounds=5, warmup=True):
    """{name: median seconds of one call of fn()} over rounds in which every fn is called once, in turn."""
    times = {name: [] for name in fns}
    for r in range(-1 if warmup else 0, rounds):
        for name, fn in fns.items():
            if on_gpu:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            if on_gpu:
                torch.cuda.synchronize()
            if r >= 0:
                times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(t) for name, t in times.items()}


def table(title, header, rows):
    print(f"## {title}\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")
    print(flush=True)


def write_atomic(path, text):
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def svg_plot(path, title, xlabel, ylabel, series):
    """Log-log line plot of series {name: [(x, y), ...]} as a hand-written SVG."""
    W, H, m = 640, 420, 70
    xs, ys = [x for s in series.values() for x, _ in s], [y for s in series.values() for _, y in s]
    def scale(v, lo, hi, a, b):
        return a + (b - a) * (math.log(v / lo) / math.log(hi / lo) if hi > lo else 0.5)
    px = lambda x: scale(x, min(xs), max(xs), m, W - m)
    py = lambda y: scale(y, min(ys) / 1.2, max(ys) * 1.2, H - m, m)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>',
           f'<text x="{W / 2}" y="24" text-anchor="middle" font-size="14">{title}</text>',
           f'<path d="M{m},{m} V{H - m} H{W - m}" stroke="black" fill="none"/>',
           f'<text x="{W / 2}" y="{H - 20}" text-anchor="middle">{xlabel}</text>',
           f'<text transform="translate(18,{H / 2}) rotate(-90)" text-anchor="middle">{ylabel}</text>']
    out += [f'<text x="{px(x):.1f}" y="{H - m + 16}" text-anchor="middle">{x}</text>' for x in sorted(set(xs))]
    lo, hi = math.log10(min(ys) / 1.2), math.log10(max(ys) * 1.2)
    out += [f'<text x="{m - 6}" y="{py(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>'
            for y in (10 ** (lo + (hi - lo) * i / 4) for i in range(5))]
    for i, (name, pts) in enumerate(series.items()):
        color = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"][i % 5]
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="'
                   + " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts) + '"/>')
        out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"/>' for x, y in pts]
        out.append(f'<text x="{W - m + 6}" y="{py(pts[-1][1]) + 4:.1f}" fill="{color}">{name}</text>')
    write_atomic(path, "\n".join(out + ["</svg>\n"]))


@contextlib.contextmanager
def patched(module, **attrs):
    """Temporarily replace module-level names, e.g. to force model.py down its fallback path."""
    saved = {k: getattr(module, k) for k in attrs}
    vars(module).update(attrs)
    try:
        yield
    finally:
        vars(module).update(saved)


def synthetic_docs(n, vocab=30_000, seed=0):
    """Zipf-distributed pseudo-words (like text: a few very common terms, a long tail), 10 to 150 words each."""
    from retrieve import Document
    rng = np.random.default_rng(seed)
    lens = rng.integers(10, 150, n)
    words = np.minimum(rng.zipf(1.1, lens.sum()), vocab) - 1
    starts, names = np.concatenate([[0], np.cumsum(lens)]), [f"w{i}" for i in range(vocab)]
    return [Document(id=str(i), text=" ".join(names[w] for w in words[starts[i]:starts[i + 1]])) for i in range(n)]


def synthetic_queries(n, vocab=30_000, seed=1):
    rng = np.random.default_rng(seed)
    return [" ".join(f"w{min(w, vocab) - 1}" for w in rng.zipf(1.1, rng.integers(2, 6))) for _ in range(n)]


# the same width and depth for every pattern: on CPU the tiny config's shape, on GPU the d20 shape
SHAPE = dict(n_layer=20, n_embd=1280, n_head=10, n_kv_head=10, vocab_size=32768, mamba_mlp=True) if on_gpu else \
    dict(n_layer=4, n_embd=128, n_head=4, n_kv_head=2, vocab_size=2048)
PATTERNS = {"T": dict(block_pattern="T"), "M": dict(block_pattern="M"), "M2": dict(block_pattern="M", mamba_version=2),
            "M3": dict(block_pattern="M", mamba_version=3), "hybrid TM": dict(block_pattern="TM")}

if "train" in what:
    T, B = (2048, 8) if on_gpu else (256, 16)

    def train_step(kw):
        torch.manual_seed(0)
        m = GPT(GPTConfig(block_size=T, **SHAPE, **kw)).to(device)
        opts = m.configure_optimizers(1e-4, 0.0, (0.9, 0.95), device.split(":")[0])
        x = torch.randint(0, SHAPE["vocab_size"], (B, T + 1), device=device)

        def step():
            with autocast(device):
                _, loss = m(x[:, :-1], x[:, 1:])
            loss.backward()
            for opt in opts:
                opt.step()
            m.zero_grad(set_to_none=True)
        return step, m.num_params(), m.flops_per_token(T)

    if on_gpu:  # a dedicated device needs no turns, and four d20 models with AdamW state may not fit at once
        t, info = {}, {}
        for name, kw in PATTERNS.items():
            step, *info[name] = train_step(kw)
            t |= timed({name: step}, 3)
            del step
    else:
        built = {name: train_step(kw) for name, kw in PATTERNS.items()}
        t, info = timed({name: b[0] for name, b in built.items()}, 7), {name: b[1:] for name, b in built.items()}
        del built
    rows, peak = [], peak_flops(device)
    for name, (params, flops) in info.items():
        tok_s = B * T / t[name]
        mfu = f"{100 * tok_s * flops / peak:.1f}%" if peak else "-"
        rows.append([name, f"{params / 1e6:.2f}M", f"{tok_s:,.0f}", f"{t['T'] / t[name]:.2f}", mfu])
        results.setdefault("train", {})[name] = dict(params=params, tokens_per_s=tok_s, vs_T=t["T"] / t[name])
    table(f"training step (forward + backward + AdamW), batch {B} x {T}, {SHAPE['n_layer']} layers x {SHAPE['n_embd']}",
          ["pattern", "params", "tokens/s", "vs T", "MFU"], rows)

if "decode" in what:
    contexts = [1024, 4096, 16384, 32768] if on_gpu else [256, 1024, 4096]
    steps = 100  # decode steps timed per context; each one grows the context by a token, which is negligible
    rows = []
    for name, kw in PATTERNS.items():
        torch.manual_seed(0)
        m = GPT(GPTConfig(block_size=max(contexts), **SHAPE, **kw)).to(device).eval()
        if on_gpu:
            m = m.to(torch.bfloat16)
        prompts = {ctx: torch.randint(0, SHAPE["vocab_size"], (1, ctx), device=device) for ctx in contexts}
        tok, caches = prompts[contexts[0]][:, -1:], {}

        def prefill(ctx):  # a fresh cache every time: an M state cannot be rewound to an earlier position
            caches[ctx] = m.init_cache(1, ctx + steps + 2)
            m(prompts[ctx], cache=caches[ctx])

        with torch.no_grad():
            t_prefill = timed({ctx: lambda ctx=ctx: prefill(ctx) for ctx in contexts}, 3)
            # the contexts take turns token by token, so that load changes hit them alike
            t_tok = timed({ctx: lambda ctx=ctx: m(tok, cache=caches[ctx]) for ctx in contexts}, steps)
        for ctx in contexts:
            cache_mb = sum(t.numel() * t.element_size() for layer in caches[ctx].layers for t in layer) / 2**20
            rows.append([name, ctx, f"{1000 * t_prefill[ctx]:.1f}", f"{1000 * t_tok[ctx]:.2f}", f"{1 / t_tok[ctx]:,.0f}",
                         f"{cache_mb:.2f}"])
            results.setdefault("decode", {}).setdefault(name, {})[ctx] = dict(
                prefill_s=t_prefill[ctx], per_token_s=t_tok[ctx], cache_mb=cache_mb)
        del m, caches
    table(f"prefill and decode, batch 1, {SHAPE['n_layer']} layers x {SHAPE['n_embd']}" + (" bf16" if on_gpu else " fp32"),
          ["pattern", "context", "prefill ms", "decode ms/token", "tokens/s", "cache MB/sequence"], rows)
    d = results["decode"]
    lo, hi = contexts[0], contexts[-1]
    table(f"decode per token as the context grows, and against T (target: pure M, M3 at {hi} within 1.3x of at {lo}; "
          "on GPU: hybrid decode tokens/s at 16k >= 3x T's)", ["pattern", f"ms/token at {hi} / at {lo}",
          f"tokens/s vs T at {hi}"], [[name, f"{d[name][hi]['per_token_s'] / d[name][lo]['per_token_s']:.2f}",
                                       f"{d['T'][hi]['per_token_s'] / d[name][hi]['per_token_s']:.2f}"] for name in PATTERNS])
    if args.plot:
        svg_plot(args.plot, f"decode, batch 1, {SHAPE['n_layer']} x {SHAPE['n_embd']}, {results['device']}",
                 "tokens of context", "ms per token",
                 {name: [(ctx, 1000 * d[name][ctx]["per_token_s"]) for ctx in contexts] for name in PATTERNS})
        print(f"(plot: {args.plot})\n")

if "mixer" in what:
    try:
        from test_all import mamba_ssm_reference
    except ImportError:
        from test_part_model import mamba_ssm_reference
    if args.threads:
        torch.set_num_threads(args.threads)  # the test files set their own thread count on import
    ref = mamba_ssm_reference()

    def loop_scan(x, dt, A, B, C, h0=None):
        """The definition one time step at a time, as selective_scan_ref: when mamba-ssm's source is not here."""
        h = x.new_zeros(x.shape[0], *A.shape) if h0 is None else h0
        ys = []
        for t in range(x.shape[1]):
            h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * x[:, t])[..., None] * B[:, t, None, :]
            ys.append((h * C[:, t, None, :]).sum(-1))
        return torch.stack(ys, 1), h

    def fwd_bwd(mixer, x):
        mixer(x).square().mean().backward()

    ref_name = "mamba-ssm Mamba + selective_scan_ref" if ref else "sequential loop (no mamba-ssm source in .gpu/)"
    ours_path = ("mamba-ssm kernels" if model.cuda_kernels() else "chunked scan") if on_gpu else \
        ("C scan" if model.cpu_scan_available() else "chunked scan")
    sizes = [(2, 512, 128), (8, 512, 256)] + ([(8, 2048, 1024)] if on_gpu else [])  # the fallback at L=2048
    rows = []
    for B, L, d in sizes:
        torch.manual_seed(0)
        ours = model.Mamba(d).to(device)
        theirs = ref.Mamba(d_model=d).to(device) if ref else None
        if theirs is not None:
            ours.load_state_dict(theirs.state_dict())
        x = torch.randn(B, L, d, device=device, requires_grad=True)

        def chunked():
            with patched(model, selective_scan=model.chunked_scan, cuda_kernels=lambda: None):
                fwd_bwd(ours, x)

        def reference():
            if theirs is not None:
                return fwd_bwd(theirs, x)
            with patched(model, selective_scan=loop_scan, cuda_kernels=lambda: None):
                fwd_bwd(ours, x)

        t = timed({"ours": lambda: fwd_bwd(ours, x), "chunked": chunked}, 3)
        t |= timed({"ref": reference}, 1, warmup=False)  # 100 s a call here: once is enough
        rows.append([f"{B} x {L} x {d}", f"{1000 * t['ours']:.0f}", f"{1000 * t['chunked']:.0f}", f"{1000 * t['ref']:.0f}",
                     f"{t['ref'] / t['ours']:.0f}x", f"{t['ref'] / t['chunked']:.1f}x", f"{t['chunked'] / t['ours']:.1f}x"])
        results.setdefault("mixer", {})[f"{B}x{L}x{d}"] = dict(ours_s=t["ours"], chunked_s=t["chunked"], ref_s=t["ref"],
                                                               ours_path=ours_path, reference=ref_name)
    table(f"Mamba-1 mixer forward+backward, fp32: ours ({ours_path}) and our chunked PyTorch scan vs {ref_name} "
          "(target: ours >= 30x the reference)",
          ["B x L x d_model", "ours ms", "chunked ms", "reference ms", "ref / ours", "ref / chunked", "chunked / ours"],
          rows)

if "block" in what:
    B, L, d = 8, 256, 256
    cfg = dict(block_size=L, vocab_size=256, n_layer=1, n_head=4, n_kv_head=4, n_embd=d)
    blocks = {"T": model.AttentionBlock(GPTConfig(**cfg)), "Mamba-1": model.MambaBlock(GPTConfig(**cfg, mamba_version=1)),
              "Mamba-2": model.MambaBlock(GPTConfig(**cfg, mamba_version=2)),
              "Mamba-3": model.MambaBlock(GPTConfig(**cfg, mamba_version=3))}
    cos, sin = model.rotary(0, L, d // cfg["n_head"], device)
    x = torch.randn(B, L, d, device=device, requires_grad=True)
    t = timed({name: lambda blk=blk.to(device): blk(x, cos, sin).square().mean().backward() for name, blk in blocks.items()}, 7)
    table(f"one block forward+backward, fp32, d_model {d}, batch {B} x {L} (targets: Mamba-2 <= 1.5x T, Mamba-1 <= 5x T, "
          "Mamba-3 <= 1.5x T)",
          ["block", "ms", "vs T"], [[name, f"{1000 * s:.1f}", f"{s / t['T']:.2f}"] for name, s in t.items()])
    results["block"] = {name: dict(seconds=s, vs_T=s / t["T"]) for name, s in t.items()}

if "bm25" in what:
    import bm25s
    from rank_bm25 import BM25Okapi
    from retrieve import BM25Retriever, tokenize
    n_docs, n_queries = 50_000, 100
    docs, queries = synthetic_docs(n_docs), synthetic_queries(n_queries)
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
    print(f"## BM25 okapi vs rank_bm25 BM25Okapi, {n_docs:,} synthetic documents, {n_queries} queries: top-10 ids identical "
          f"for {same}/{n_queries} ({same_but_ties}/{n_queries} up to ties at the 10th score), max |score difference| "
          f"{err:.1e} (target: same top-10, scores to 1e-6)\n")
    table(f"BM25 latency, top 10 of {n_docs:,} documents, one query at a time "
          "(target: >= 50x faster than rank_bm25, within 1.5x of bm25s)",
          ["retriever", "ms/query", "rank_bm25 / this", "this / bm25s"],
          [[name, f"{1000 * s / n_queries:.3f}", f"{t['rank_bm25 (okapi)'] / s:.0f}x", f"{s / t['bm25s (lucene)']:.2f}"]
           for name, s in t.items()])
    results["bm25"] = dict(top10_identical=same, top10_identical_up_to_ties=same_but_ties, max_score_diff=err,
                           ms_per_query={name: 1000 * s / n_queries for name, s in t.items()})

if "retrieval" in what:
    from retrieve import RETRIEVERS, evaluate, load_documents, read_jsonl
    docs = load_documents("data/world/kb.jsonl")
    single = [r for _, r in read_jsonl("data/world/qa_heldout.jsonl") if r["hops"] == 1]
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:  # evaluate() reads a file
        f.writelines(json.dumps(r) + "\n" for r in single)
    retrievers, rows = {}, []
    for label, kind, options in [("TF-IDF", "simple", {}), ("BM25 (lucene)", "bm25", {}), ("BM25 (okapi)", "bm25", {"method": "okapi"}),
                                 ("dense MiniLM (exact)", "dense", {}), ("hybrid (convex 0.5)", "hybrid", {}),
                                 ("hybrid (RRF 60)", "hybrid", {"fusion": "rrf"})]:
        retrievers[label] = r = RETRIEVERS[kind](**options)
        r.add_documents(docs)
        with contextlib.redirect_stdout(io.StringIO()):
            results.setdefault("retrieval", {})[label] = evaluate(r, f.name)
    os.remove(f.name)
    questions = [r["question"] for r in single[:50]]
    t = timed({label: lambda r=r: [r.retrieve(q, 5) for q in questions] for label, r in retrievers.items()}, 3)
    for label, m in results["retrieval"].items():
        m["ms_per_query"] = 1000 * t[label] / len(questions)
        rows.append([label, f"{m['recall@1']:.3f}", f"{m['recall@5']:.3f}", f"{m['mrr']:.3f}", f"{m['ms_per_query']:.2f}"])
    table(f"retrieval on data/world: {len(docs)} documents, {len(single)} held-out single-hop questions; latency is one "
          "query at a time, top 5 (target: hybrid at least as good as the better of its parts)",
          ["retriever", "recall@1", "recall@5", "MRR@10", "ms/query"], rows)

if "ann" in what:
    import faiss
    from retrieve import HNSW_EF_CONSTRUCTION, HNSW_M, DenseRetriever
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    n, dim, n_queries = 100_000, 384, 200
    rng = np.random.default_rng(0)
    W = rng.standard_normal((32, dim), dtype=np.float32)
    unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)
    datasets = {  # sentence embeddings have a low intrinsic dimension; uniform vectors are the worst case
        "low-rank (32-d latent + noise)": lambda k: unit(rng.standard_normal((k, 32), dtype=np.float32) @ W
                                                         + 1.7 * rng.standard_normal((k, dim), dtype=np.float32)),
        "uniform on the sphere": lambda k: unit(rng.standard_normal((k, dim), dtype=np.float32))}
    rows = []
    for name, gen in datasets.items():
        v, q = gen(n), gen(n_queries)
        flat = DenseRetriever()._new_index("flat", v)
        t1 = time.perf_counter()
        hnsw = DenseRetriever()._new_index("hnsw", v)
        t_build = time.perf_counter() - t1
        exact = flat.search(q, 10)[1]
        for ef in (64, 128, 256, 512, 1024):
            hnsw.hnsw.efSearch = ef
            recall = np.mean([len(set(a) & set(e)) / 10 for a, e in zip(hnsw.search(q, 10)[1], exact)])
            t = timed({kind: lambda i=i: [i.search(q[j:j + 1], 10) for j in range(n_queries)]
                       for kind, i in (("flat", flat), ("hnsw", hnsw))}, 3)
            rows.append([name, ef, f"{recall:.3f}", f"{1000 * t['hnsw'] / n_queries:.2f}",
                         f"{1000 * t['flat'] / n_queries:.2f}", f"{t['flat'] / t['hnsw']:.1f}x", f"{t_build:.0f}"])
            results.setdefault("ann", {}).setdefault(name, {})[ef] = dict(recall10=recall, hnsw_s=t["hnsw"] / n_queries,
                                                                           flat_s=t["flat"] / n_queries, hnsw_build_s=t_build)
    table(f"HNSW (M={HNSW_M}, efConstruction={HNSW_EF_CONSTRUCTION}) vs exact inner product, {n:,} x {dim} unit vectors, "
          f"{n_queries} single queries, k=10, {faiss.omp_get_max_threads()} faiss thread(s) (target: recall@10 >= 0.95, faster)",
          ["vectors", "efSearch", "recall@10", "HNSW ms/query", "exact ms/query", "speed-up", "HNSW build s"], rows)

if "build_one" in what:  # one (type, size), alone in this process, so that peak memory is this build's own
    import retrieve
    # VmHWM, not ru_maxrss: a child's ru_maxrss starts at its parent's RSS (kept across fork and exec)
    status_mb = lambda key: int(open("/proc/self/status").read().split(key + ":")[1].split()[0]) / 1024
    docs = synthetic_docs(args.n) if args.kind in ("simple", "bm25", "bm25s") else None
    if args.kind == "encode":  # a dense build is its encoding: world sentences, repeated to n
        texts = [retrieve.doc_text(d) for d in retrieve.load_documents("data/world/kb.jsonl")]
        texts = (texts * (args.n // len(texts) + 1))[:args.n]
        retrieve.load_encoder(retrieve.DEFAULT_MODEL).encode(texts[:64])  # load and warm up outside the timing
    if args.kind in ("flat", "hnsw"):
        import faiss
        if args.threads:
            faiss.omp_set_num_threads(args.threads)
        vectors = np.random.default_rng(0).standard_normal((args.n, 384), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    before, t0 = status_mb("VmRSS"), time.perf_counter()
    if args.kind == "bm25s":
        import bm25s
        r = bm25s.BM25(method="lucene")
        r.index([retrieve.tokenize(d.text) for d in docs], show_progress=False)
        nbytes = sum(r.scores[k].nbytes for k in ("data", "indices", "indptr"))
    elif args.kind == "encode":
        nbytes = retrieve.DenseRetriever().encode(texts).nbytes
    elif args.kind in ("flat", "hnsw"):
        index = retrieve.DenseRetriever()._new_index(args.kind, vectors)
        nbytes = vectors.nbytes + (index.hnsw.neighbors.size() * 4 if args.kind == "hnsw" else 0)
    else:
        r = retrieve.RETRIEVERS[args.kind]()
        r.add_documents(docs)
        nbytes = sum(getattr(r, a).nbytes for a in ("indptr", "post_doc", "post_tf", "doc_len", "weights"))
    seconds = time.perf_counter() - t0
    peak = status_mb("VmHWM")
    print(json.dumps(dict(kind=args.kind, n=args.n, seconds=seconds, index_mb=nbytes / 2**20, peak_rss_mb=peak,
                          rss_before_mb=before)))

if "build" in what:
    rows = []
    for kind, n in [("simple", 10_000), ("bm25", 10_000), ("bm25s", 10_000), ("simple", 100_000), ("bm25", 100_000),
                    ("bm25s", 100_000), ("bm25", 1_000_000), ("bm25s", 1_000_000), ("encode", 10_000),
                    ("flat", 100_000), ("hnsw", 100_000)]:
        p = subprocess.run([sys.executable, __file__, "--what=build_one", f"--kind={kind}", f"--n={n}",
                            f"--threads={args.threads}"], capture_output=True, text=True)
        if p.returncode:
            rows.append([kind, f"{n:,}", "failed: " + (p.stderr.strip().splitlines() or ["?"])[-1], "", "", "", ""])
            continue
        b = json.loads(p.stdout.strip().splitlines()[-1])
        rows.append([kind, f"{n:,}", f"{b['seconds']:.1f}", f"{n / b['seconds']:,.0f}", f"{b['index_mb']:.1f}",
                     f"{b['peak_rss_mb'] - b['rss_before_mb']:.0f}", f"{b['peak_rss_mb']:.0f}"])
        results.setdefault("build", {}).setdefault(kind, {})[n] = b
    table("index build, each in a fresh process: synthetic Zipf documents (simple = TF-IDF); encode = dense build's "
          "MiniLM encoding of world documents; flat / hnsw = FAISS on random 384-d unit vectors",
          ["type", "documents", "seconds", "documents/s", "index MB", "peak RSS - RSS before MB", "peak RSS MB"], rows)

if "memory" in what:
    # An estimate, not a measurement (no GPU here): weights, grads and AdamW moments in fp32 are 16 bytes a
    # parameter (exact count, model built on the meta device); activations saved for backward in bf16 are ~34 bytes
    # per token per unit of width per layer (Korthikanti et al. 2022, without the s^2 attention term that flash
    # attention removes; a Mamba mixer + MLP block saves about as much), plus fp32 logits and their gradient
    # (8 bytes per token per vocabulary entry). Allocator slack and CUDA context (~1-2 GiB) come on top.
    train_defaults = script_defaults("train.py")
    rows = []
    for path in sorted(glob.glob("configs/*.py")):
        if os.path.basename(path).startswith(("rag_", "refrag_", "tiny")):
            continue
        cfg = configure(dict(train_defaults), [path])
        margs = {f.name: cfg[f.name] for f in dataclasses.fields(GPTConfig) if f.name in cfg} | {"vocab_size": 32768}
        with torch.device("meta"):
            m = GPT(GPTConfig(**margs))
        params, tokens = m.num_params(), cfg["device_batch_size"] * cfg["block_size"]
        state = 16 * params
        act = tokens * (34 * cfg["n_embd"] * cfg["n_layer"] + 8 * margs["vocab_size"])
        rows.append([os.path.basename(path), m.pattern, f"{params / 1e6:.0f}M", f"{cfg['device_batch_size']} x {cfg['block_size']}",
                     f"{state / 2**30:.1f}", f"{act / 2**30:.1f}", f"{(state + act) / 2**30:.1f}"])
        results.setdefault("memory", {})[os.path.basename(path)] = dict(params=params, state_bytes=state, activation_bytes=act)
    table("estimated training memory per GPU (bf16 autocast, fp32 AdamW; vocab 32768)",
          ["config", "pattern", "params", "batch", "weights+grads+AdamW GiB", "activations GiB", "total GiB"], rows)

if args.out:
    write_atomic(args.out, json.dumps(results, indent=1))
