"""
Multi-hop retrieval trained with rewards (REFRAG here: recursive retrieval). The model reads the documents
retrieved for a question; when they do not hold the answer it writes a follow-up query, reads what that finds,
and answers citing the document that holds the fact, after at most max_hops queries. The loop is rag.generate,
the same one `chat.py --hops N` runs. Two phases, each its own run and checkpoint:

    python refrag_train.py                      # sft: out/rag2/ckpt.pt -> out/refrag_sft/ckpt.pt
    python refrag_train.py --phase=rl           # rl:  out/refrag_sft/ckpt.pt -> out/refrag/ckpt.pt
    python refrag_train.py --phase=rl --eval_only=True
    torchrun --standalone --nproc_per_node=8 refrag_train.py configs/refrag_tiny.py

Any data directory works (prepare.py's layout). sft needs gold query chains: the records' "queries", one per
gold document in gold_ids (the world has them); rl needs only each question and its golden answers.

sft: imitation of the gold query chains, interleaved with retrieval as in IRCoT: the question and the
  documents retrieved for it, then for each chain step whose document is not in context yet its query and the
  documents retrieved for it (the gold one made sure of), then the answer citing the last gold document. Single-hop
  questions are answered at once (the question's own retrieval holds their document, as in rag_train.py and in
  chat.py, which always retrieves on the question first), unanswerable ones abstain. Loss on queries and answer only.
rl: on-policy policy gradient as in nanochat's chat_rl and Search-R1: group_size rollouts per training question
  through the real loop, reward = w_em*EM + w_f1*F1 + w_cite*citation - w_format*(no well-formed answer) - w_hop*queries,
  advantage = reward - group mean, loss = -advantage * log-prob of the model's own tokens (retrieved text masked)
  + kl_coef * KL to the warm start on those tokens (GRPO), which keeps the updates from wearing down copying.
Evaluation (qa_heldout.jsonl): EM, citations, queries used and whether each chain step's document reached the
context, for single-shot RAG with baseline_ckpt (top-k on the question, no hops), the warm start and the RL model.
Writes out_dir/eval.json, and for rl the reward/accuracy curve out_dir/curve.svg.
"""
import json
import math
import os
import random
import re
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import rag
from common import (StepLog, all_reduce_mean, autocast, die, first_line, load_checkpoint, lr_at, print0,
                    raw_state_dict, save_checkpoint, setup, step_optimizers, teardown)
from configurator import ConfigError, configure
from model import GPT
from retrieve import new_retriever
from tokenizer import Tokenizer, render_conversation
from world import COMPANY_SUFFIXES, NamePool

# -----------------------------------------------------------------------------
# I/O
data_dir = "data/world"        # kb.jsonl, qa_train.jsonl, qa_heldout.jsonl (prepare.py's layout)
phase = "sft"                  # "sft" (imitate the gold query chains) | "rl" (rewards)
init_from = ""                 # "" = the previous stage (sft: out/rag2/ckpt.pt, rl: out/refrag_sft/ckpt.pt) | path | "resume"
out_dir = ""                   # "" = out/refrag_sft (sft) | out/refrag (rl)
baseline_ckpt = "out/rag2/ckpt.pt"  # evaluated as single-shot RAG next to ours ("" = skip)
eval_only = False              # evaluate out_dir/ckpt.pt again, no training
allow_transformer = False      # baseline override: train a pure-T checkpoint too
# the loop
retriever = "bm25"             # simple | bm25 | dense | hybrid (retrieve.py)
stopwords = ""                 # "" | "en" | "en_plus": English stopwords the sparse retrievers ignore
top_k = 2                      # documents per retrieval, on the question and on each query
max_hops = 3                   # queries the model may write before it must answer
seq_len = 1024                 # context limit of one conversation (chat.py reads it from the checkpoint)
max_new_tokens = 40            # tokens per query or answer
# sft
sft_iters = 150
sft_batch_size = 16            # conversations per step, across processes
sft_learning_rate = 1e-3
hop_mix = "0.1,0.2,0.4,0.3"    # shares of training questions with 0 (unanswerable), 1, 2, 3 hops
rename_p = 0.5                 # share of conversations (sft) and questions (rl) whose names are swapped for invented ones: the model
                               # pretrained on the training world, so only then must it read a bridge, not recall it
# rl
rl_iters = 40
rl_learning_rate = 1e-4
questions_per_step = 4         # across processes
group_size = 4                 # rollouts per question
rl_hops = "2,3"                # the training questions RL practises on
temperature = 1.0              # sampling temperature of the rollouts (1 = the policy whose log-probs we push)
w_em = 1.0                     # reward weights, as Search-R1: the outcome's EM,
w_f1 = 0.0                     # its token F1 (partial credit for long free-text answers), citation, format, hops
w_cite = 0.2
w_format = 0.5
w_hop = 0.05
adv_std = False                # also divide advantages by the group's std (GRPO); off = nanochat's reward - mean
kl_coef = 0.3                  # GRPO's beta: per-token KL to the warm start; without it RL wore down copying (3-hop 34 -> 25)
# optimisation
warmup_iters = 5
min_lr_frac = 0.1
weight_decay = 0.0
grad_clip = 1.0
# evaluation (qa_heldout.jsonl)
eval_hops = "2,3"              # question sets evaluated at the end, by hops
eval_n = 100                   # questions per set (0 = all)
single_shot_k = 4              # documents the single-shot baseline retrieves on the question
eval_interval = 10             # rl: steps between held-out EM points of the curve (and checkpoints)
curve_n = 30                   # rl: held-out two-hop questions per curve point
# system
device = "auto"
seed = 1337
# -----------------------------------------------------------------------------
# The pieces the tests exercise (configurator.script_defaults runs this file up to here): they read the config
# globals above when called.


def chain_messages(qa, retrieve, by_id):
    """The gold conversation of a training question. retrieve(query, k) -> ranked docs; by_id: id -> doc."""
    docs = [rag.doc_dict(d) for d in retrieve(qa["question"], top_k)]
    messages, seen = rag.messages_for(qa["question"], docs), list(docs)
    for query, doc_id in zip(qa.get("queries", []), qa.get("gold_ids", [])):
        if doc_id in {d["id"] for d in seen}:
            continue  # its document is already in context: read it, do not ask for it
        found = [rag.doc_dict(d) for d in retrieve(query, top_k)]
        if doc_id not in {d["id"] for d in found}:
            found[-1] = rag.doc_dict(by_id[doc_id])  # imitate queries that work: their document is found
        messages += [{"role": "query", "content": query}, {"role": "documents", "content": found}]
        seen += found
    return messages + [{"role": "assistant", "content": rag.target_answer(qa, seen)}]


def renamer(names, rng):
    """(forward, back): forward swaps every word of `names` in a text for an invented word, the same one each
    time; back maps invented words to the real ones."""
    pool, fresh, real = NamePool(rng), {}, {}
    word = re.compile(r"\b[A-Z][a-z]+\b")

    def invent(w):
        if w not in fresh:
            fresh[w] = pool.word()
            real[fresh[w]] = w
        return fresh[w]
    forward = lambda text: word.sub(lambda m: invent(m[0]) if m[0] in names else m[0], text)
    back = lambda text: word.sub(lambda m: real.get(m[0], m[0]), text)
    return forward, back


def renamed(messages, names, rng):
    """messages with every word of the known entity names replaced by a fresh invented word, consistently."""
    forward, _ = renamer(names, rng)
    return json.loads(forward(json.dumps(messages)))


def renamed_world(qa, retrieve, names, rng):
    """(qa, retrieve) of a world whose names are invented: the question and answer renamed, queries mapped back
    to the real names before retrieval and the documents found renamed forward. RL on recalled facts would
    teach recall; here, as on held-out questions, the answer can only come from what the loop retrieves."""
    forward, back = renamer(names, rng)
    qa = {**qa, "question": forward(qa["question"]), "entity": forward(qa.get("entity", "")),
          "response": forward(qa.get("response", "")), "golden_answers": [forward(a) for a in qa["golden_answers"]]}

    def retrieve_renamed(query, k):
        return [{**d, "title": forward(d["title"]), "text": forward(d["text"])}
                for d in map(rag.doc_dict, retrieve(back(query), k))]
    return qa, retrieve_renamed


def rollout(model, tok, qa, retrieve, k=None, hops=None, temp=0.0, generator=None):
    """One pass of the loop: documents retrieved on the question, then up to `hops` queries, then the answer."""
    k, hops = k or top_k, max_hops if hops is None else hops
    docs = retrieve(qa["question"], k)
    return rag.generate(model, tok, rag.messages_for(qa["question"], docs), retrieve=retrieve, top_k=k, max_hops=hops,
                        max_len=seq_len, max_new_tokens=max_new_tokens, temperature=temp, generator=generator)


def reward(qa, out):
    """(reward, parts) of one rollout. EM is against the true answer (the KB holds it, whatever the model found;
    for an unanswerable question abstaining is the answer); citation: the cited documents hold the answer."""
    outcome = rag.score(qa, out["answer"], None)  # closed-book scoring: the right answer, wherever it came from
    em, f1 = outcome["em"], outcome["f1"]
    cite = rag.score(qa, out["answer"], out["docs"]).get("citation_ok", 0.0)
    fmt = float(out["stop"] != "answer")
    hops = len(out["queries"])
    return w_em * em + w_f1 * f1 + w_cite * cite - w_format * fmt - w_hop * hops, \
        {"em": em, "cite": cite, "format": fmt, "hops": hops}


def advantages(rewards):
    r = torch.tensor(rewards, dtype=torch.float32)
    a = r - r.mean()
    return a / (r.std() + 1e-6) if adv_std and len(rewards) > 1 else a


def pg_loss(model, outs, adv, device="cpu", ref=None):
    """-sum over rollouts of advantage * log p(each token the model sampled), over the number of such tokens.
    The prompt and the retrieved documents (mask 0) are context, never targets. With a reference model (the warm
    start) and kl_coef > 0, plus kl_coef * KL(policy || ref) per sampled token (the k3 estimator, as GRPO)."""
    T = max(len(o["ids"]) for o in outs) - 1
    x = torch.zeros(len(outs), T, dtype=torch.long)
    y = torch.full((len(outs), T), -1, dtype=torch.long)
    for i, o in enumerate(outs):
        n = len(o["ids"]) - 1
        x[i, :n] = torch.tensor(o["ids"][:-1])
        y[i, :n] = torch.tensor([t if m else -1 for t, m in zip(o["ids"][1:], o["mask"][1:])])
    x, y = x.to(device), y.to(device)
    with autocast(device):
        _, nll = model(x, y, loss_reduction="none")  # (G, T) = -log p, 0 where y is -1
    loss = nll * adv.to(device)[:, None]
    if ref is not None and kl_coef:
        with torch.no_grad(), autocast(device):
            ref_nll = ref(x, y, loss_reduction="none")[1]
        log_ratio = nll - ref_nll  # log p_ref - log p on each sampled token, 0 elsewhere
        loss = loss + kl_coef * (torch.exp(log_ratio) - log_ratio - 1)
    return loss.sum() / (y >= 0).sum().clamp(min=1)


def sign_test(fixed, broken):
    """Two-sided exact sign test: how likely a split at least this uneven is if changes go either way at 50%."""
    n = fixed + broken
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(fixed, broken) + 1)) / 2 ** n) if n else 1.0


# -----------------------------------------------------------------------------
try:
    config = configure(globals())
except ConfigError as e:
    die(e)
if phase not in ("sft", "rl"):
    die(f"--phase: must be 'sft' or 'rl', got {phase!r}")
try:
    new_retriever(retriever, stopwords)  # checks both before any work
except ValueError as e:
    die(f"--{e}")
init_from = init_from or {"sft": "out/rag2/ckpt.pt", "rl": "out/refrag_sft/ckpt.pt"}[phase]
out_dir = out_dir or {"sft": "out/refrag_sft", "rl": "out/refrag"}[phase]
config.update(init_from=init_from, out_dir=out_dir)


def int_list(key, text):
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        die(f"--{key}: expected comma-separated integers, got {text!r}")


try:
    mix = [float(v) for v in hop_mix.split(",")]
except ValueError:
    mix = []
if len(mix) != 4 or min(mix) < 0 or sum(mix) <= 0:
    die(f"--hop_mix: expected 4 weights >= 0 for 0..3 hops, got {hop_mix!r}")
rl_hop_set, eval_hop_set = int_list("rl_hops", rl_hops), int_list("eval_hops", eval_hops)

ddp, rank, world_size, device = setup(device, seed)
master = rank == 0
print0(json.dumps(config, indent=1))


def load_model(path, what):
    try:
        ckpt = load_checkpoint(path, device)
        model = GPT.from_checkpoint(ckpt).to(device)
    except ValueError as e:
        die(f"{e} ({what})")
    except RuntimeError as e:
        die(f"{path}: incompatible with model.py ({first_line(e)[:200]})")
    if os.path.isfile(data_tok) and ckpt.get("tokenizer") != open(data_tok).read():
        die(f"{path}: its tokenizer is not {data_tok}'s: the checkpoint was trained on other data")
    return model, ckpt


data_tok = os.path.join(data_dir, "tokenizer.json")
if baseline_ckpt and not os.path.isfile(baseline_ckpt):
    die(f"baseline_ckpt {baseline_ckpt} not found: train it with `python rag_train.py`, or pass --baseline_ckpt= to skip it")
ckpt_path = os.path.join(out_dir, "ckpt.pt") if eval_only or init_from == "resume" else init_from
model, ckpt = load_model(ckpt_path, "init_from: train one with `python rag_train.py`" if phase == "sft" else
                         "init_from: run the sft phase first, `python refrag_train.py`")
if "M" not in model.pattern and not allow_transformer:
    die(f"{ckpt_path} is a pure Transformer (pattern {model.pattern}): retrieval training here is for models with "
        "Mamba blocks; pass --allow_transformer=True to train the Transformer baseline anyway")
tok = Tokenizer.from_json(ckpt["tokenizer"])
model_args, tokenizer_json = ckpt["model_args"], ckpt["tokenizer"]
resuming = init_from == "resume" and not eval_only
start_step = ckpt["step"] if resuming else 0
state = ckpt.get("data_state") or {}
history = state.get("history", []) if resuming or eval_only else []  # the RL curve so far
warm_start = state.get("warm_start") if resuming or eval_only else init_from  # what RL started from, to compare
print0(f"model: {model.pattern} pattern, {model.num_params():,} parameters, from {ckpt_path} (stage {ckpt.get('stage')})")


try:
    kb_docs, by_id, qa_sets = rag.load_data(data_dir, ("heldout",) if eval_only else ("train", "heldout"))
except (ValueError, OSError) as e:
    die(e)
heldout_qa = qa_sets["heldout"]
heldout_docs = {g for q in heldout_qa for g in q.get("gold_ids", [])}
# the world's names, renamed in a share of training questions (its pretraining memorised them)
world_data = any("entity" in q for q in qa_sets.get("train", []))
train_names = {w for d in kb_docs if d.id not in heldout_docs for w in d.title.split()} - set(COMPANY_SUFFIXES) \
    if world_data else set()
hops_of = lambda q: len(q["gold_ids"]) if "gold_ids" in q else None  # None: no gold chain, only the answers
# the world's chains are about the RAG world (in the KB, never pretrained on): a bridge can only come from a document
qa_by_hops = {h: [q for q in qa_sets.get("train", []) if hops_of(q) == h and (h < 2 or len(q.get("queries", [])) == h)]
              for h in range(4)}
rl_pool = [q for h in rl_hop_set for q in qa_sets.get("train", []) if hops_of(q) == h] + \
    [q for q in qa_sets.get("train", []) if hops_of(q) is None and q["golden_answers"]]
if not eval_only and (phase == "sft" and any(mix[h] > 0 and not qa_by_hops[h] for h in range(4)) or phase == "rl" and not rl_pool):
    die(f"{data_dir}/qa_train.jsonl lacks questions with the hops (and, for sft, the gold query chains) that "
        "--hop_mix / --rl_hops ask for")


def retriever_over(docs):
    r = new_retriever(retriever, stopwords)
    r.add_documents(docs)
    return lambda query, k: [d for d, _ in r.retrieve(query, k)]


# training retrieves from the training world only (as rag_train.py); evaluation from the whole KB
train_retrieve = retriever_over([d for d in kb_docs if d.id not in heldout_docs])
eval_retrieve = retriever_over(kb_docs) if master else None

# -----------------------------------------------------------------------------
# evaluation on the held-out questions


def subsample(qas, name, n):
    return qas if not n or len(qas) <= n else random.Random(f"{seed}-{name}").sample(qas, n)


# held-out questions by hops; without gold_ids, every answerable one is in each set
eval_sets = {h: subsample([q for q in heldout_qa if hops_of(q) == h or (hops_of(q) is None and q["golden_answers"])],
                          f"hops{h}", eval_n) for h in eval_hop_set}
curve_set = subsample([q for q in heldout_qa if hops_of(q) in (2, None) and q["golden_answers"]], "curve", curve_n)


@torch.no_grad()
def evaluate(model, qas, k=None, hops=None, desc="eval"):
    """Greedy rollouts on held-out questions -> means of em, cite, format, hops, reward and recall_i (the i-th chain
    step's document reached the context), plus n and one example conversation."""
    model.eval()
    rows, example = [], None
    for qa in tqdm(qas, desc=desc, unit="q", leave=False, mininterval=2, disable=not master):
        out = rollout(model, tok, qa, eval_retrieve, k, hops)
        r, parts = reward(qa, out)
        in_context = {d["id"] for d in out["docs"]}
        rows.append({**parts, "reward": r, **{f"recall_{i + 1}": float(s in in_context)
                                              for i, s in enumerate(qa.get("gold_ids", []))}})
        if example is None:
            example = {"question": qa["question"], "gold": qa["golden_answers"], "queries": out["queries"],
                       "docs": [d["id"] for d in out["docs"]], "answer": out["answer"], "stop": out["stop"]}
    model.train()
    return {**rag.summarize(rows), "example": example, "em_each": [r["em"] for r in rows]}


def evaluate_all(variants):
    """variants: {name: (model, k, hops)} -> {name: {hops: summary}}, printed as a table."""
    res, t0 = {}, time.time()
    for name, (m, k, hops) in variants.items():
        res[name] = {h: evaluate(m, qas, k, hops, f"eval {name} {h}-hop") for h, qas in eval_sets.items()}
    print0(f"held-out: retriever {retriever}, greedy; single-shot k={single_shot_k}, multi-hop top_k={top_k} "
           f"max_hops={max_hops}")
    print0("model          hops   n     EM    cite  format  queries  recall per chain step (%)")
    for name, by_h in res.items():
        for h, s in by_h.items():
            recall = " ".join(f"{100 * s[f'recall_{i + 1}']:5.1f}" for i in range(h) if s.get(f"recall_{i + 1}") is not None)
            print0(f"{name:<14} {h:>4} {s['n']:>4}  {100 * s['em']:5.1f}  {100 * s['cite']:5.1f}  {100 * s['format']:5.1f}"
                   f"   {s['hops']:5.2f}   {recall}")
    if "warm_start" in res and "rl" in res:  # paired on the same questions: a sign test on the ones that changed
        for h in eval_sets:
            pairs = list(zip(res["warm_start"][h]["em_each"], res["rl"][h]["em_each"]))
            fixed, broken = sum(a < b for a, b in pairs), sum(a > b for a, b in pairs)
            print0(f"RL vs warm start, {h}-hop: {fixed} questions fixed, {broken} broken "
                   f"(two-sided sign test p = {sign_test(fixed, broken):.3f})")
    for name, by_h in res.items():
        print0(f"example ({name}): {json.dumps(next(iter(by_h.values()))['example'])}")
    return res, time.time() - t0


def write_json(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)
    print0(f"wrote {path}")


def curve_svg(path, history):
    """Training reward and accuracy per step, held-out EM at the eval points: a hand-written SVG (no matplotlib)."""
    W, H, pad = 640, 320, 40
    steps = [h["step"] for h in history] or [0]
    x = lambda s: pad + (W - 2 * pad) * s / max(max(steps), 1)
    lo = min([0.0] + [h[k] for h in history for k in ("reward", "acc", "heldout_em") if k in h])
    y = lambda v: H - pad - (H - 2 * pad) * (v - lo) / (1.0 - lo)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
             f'<rect width="{W}" height="{H}" fill="white"/>',
             f'<line x1="{pad}" y1="{y(lo)}" x2="{W - pad}" y2="{y(lo)}" stroke="black"/>',
             f'<line x1="{pad}" y1="{y(lo)}" x2="{pad}" y2="{y(1)}" stroke="black"/>']
    for v in (lo, 0.0, 0.5, 1.0) if lo < 0 else (0.0, 0.5, 1.0):
        parts.append(f'<text x="{pad - 4}" y="{y(v) + 4}" text-anchor="end">{v:.2f}</text>')
    parts.append(f'<text x="{W - pad}" y="{H - pad + 16}" text-anchor="end">RL step {max(steps)}</text>')
    for i, (key, color) in enumerate((("reward", "#1f77b4"), ("acc", "#2ca02c"), ("heldout_em", "#d62728"))):
        pts = [(x(h["step"]), y(h[key])) for h in history if key in h]
        if pts:
            parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="'
                         + " ".join(f"{a:.1f},{b:.1f}" for a, b in pts) + '"/>')
            parts += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="2.5" fill="{color}"/>' for a, b in pts if key == "heldout_em"]
        label = {"reward": "train reward", "acc": "train accuracy (EM)", "heldout_em": "held-out 2-hop EM"}[key]
        parts.append(f'<text x="{pad + 10 + 170 * i}" y="{pad - 14}" fill="{color}">{label}</text>')
    parts.append("</svg>")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(parts) + "\n")
    os.replace(path + ".tmp", path)


def final_eval(trained):
    """The comparison the stage exists for, written to out_dir/eval.json."""
    variants = {}
    if baseline_ckpt:
        variants["single_shot"] = (load_model(baseline_ckpt, "baseline_ckpt")[0], single_shot_k, 0)
    if phase == "rl":
        if eval_only:
            variants["warm_start"] = (load_model(warm_start, "the warm start")[0], top_k, max_hops) if warm_start else None
        else:
            variants["warm_start"] = (init_model, top_k, max_hops) if init_model is not None else None
    variants[{"sft": "warm_start", "rl": "rl"}[phase]] = (trained, top_k, max_hops)
    res, seconds = evaluate_all({k: v for k, v in variants.items() if v is not None})
    write_json(os.path.join(out_dir, "eval.json"), {"checkpoint": os.path.join(out_dir, "ckpt.pt"), "pattern": trained.pattern,
               "params": trained.num_params(), "phase": phase, "config": config, "results": res, "history": history,
               "seconds": seconds})


os.makedirs(out_dir, exist_ok=True)
if eval_only:
    if master:
        final_eval(model)
    teardown(ddp)
    raise SystemExit(0)

# -----------------------------------------------------------------------------
# training

max_iters = {"sft": sft_iters, "rl": rl_iters}[phase]
learning_rate = {"sft": sft_learning_rate, "rl": rl_learning_rate}[phase]
per_rank = {"sft": sft_batch_size, "rl": questions_per_step}[phase] // world_size
if per_rank < 1 or {"sft": sft_batch_size, "rl": questions_per_step}[phase] % world_size:
    die(f"{'sft_batch_size' if phase == 'sft' else 'questions_per_step'} must be a multiple of the {world_size} processes")
init_model = None  # the warm start: compared with at the end, and RL's KL reference
if phase == "rl" and (master or kl_coef):
    if not resuming:
        init_model = GPT.from_checkpoint(ckpt).to(device).eval()
    elif warm_start:  # a resumed run reloads it from where RL started, so the KL term is the same as before
        init_model = load_model(warm_start, "the warm start")[0].eval()
    elif kl_coef:
        die(f"{ckpt_path}: records no warm start, which kl_coef > 0 needs as its reference")
optimizers = model.configure_optimizers(learning_rate, weight_decay, (0.9, 0.95), device.split(":")[0])
if resuming:
    for opt, state in zip(optimizers, ckpt["optimizer"]):
        opt.load_state_dict(state)
raw_model = model
if ddp:
    model = DDP(model, device_ids=[int(device.split(":")[1])] if device.startswith("cuda") else None)
ckpt = None
log = StepLog(max_iters, start_step, os.path.join(out_dir, "log.txt") if master else None, world_size=world_size)
if master:
    log.write(f"config {json.dumps(config)}")


def checkpoint(step):
    save_checkpoint(os.path.join(out_dir, "ckpt.pt"), {
        "model": raw_state_dict(raw_model), "model_args": model_args, "step": step, "val_loss": None,
        "optimizer": [opt.state_dict() for opt in optimizers], "config": config, "stage": "refrag",
        "data_state": {"seed": seed, "phase": phase, "history": history, "warm_start": warm_start if phase == "rl" else None}, "tokenizer": tokenizer_json})
    log.write(f"saved {out_dir}/ckpt.pt at step {step}")


def sft_batch(step):
    """The step's conversations for this process, one per row, padded: targets -1 where the mask is 0."""
    rng = random.Random(f"{seed}-sft-{step}-{rank}")
    convs = []
    for _ in range(per_rank):
        msgs = chain_messages(rng.choice(qa_by_hops[rng.choices(range(4), mix)[0]]), train_retrieve, by_id)
        convs.append(render_conversation(tok, renamed(msgs, train_names, rng) if rng.random() < rename_p else msgs, seq_len))
    T = max(len(ids) for ids, _ in convs) - 1
    x = torch.zeros(len(convs), T, dtype=torch.long)
    y = torch.full((len(convs), T), -1, dtype=torch.long)
    for i, (ids, mask) in enumerate(convs):
        x[i, :len(ids) - 1] = torch.tensor(ids[:-1])
        y[i, :len(ids) - 1] = torch.tensor([t if m else -1 for t, m in zip(ids[1:], mask[1:])])
    return x.to(device), y.to(device)


def heldout_point(step):
    """Held-out two-hop EM (greedy) of the current policy: the curve that says whether RL generalises."""
    if master and curve_n:
        s = evaluate(raw_model, curve_set, desc=f"curve {step}")
        history.append({"step": step, "heldout_em": s["em"], "heldout_hops": s["hops"]})
        log.write(f"step {step}/{max_iters} | held-out 2-hop EM {s['em']:.4f} | queries {s['hops']:.2f} | format {s['format']:.4f}")


generator = torch.Generator(device=device)
t_start = time.time()
if phase == "rl" and start_step == 0:
    heldout_point(0)
for step in range(start_step, max_iters):
    lr = lr_at(step, max_iters, learning_rate, warmup_iters, "cosine", min_lr_frac)
    if phase == "sft":
        x, y = sft_batch(step)
        with autocast(device):
            _, loss = model(x, y)
        loss.backward()
        n_tokens, extra = x.numel(), {"loss_tokens": int((y >= 0).sum())}
    else:
        rng = random.Random(f"{seed}-rl-{step}-{rank}")
        generator.manual_seed(seed * 100_003 + step * 1_009 + rank)
        loss, n_tokens, parts = torch.zeros((), device=device), 0, []
        for i in range(per_rank):
            qa, retrieve = rng.choice(rl_pool), train_retrieve
            if rng.random() < rename_p and world_data:
                qa, retrieve = renamed_world(qa, retrieve, train_names, rng)
            raw_model.eval()
            outs = [rollout(raw_model, tok, qa, retrieve, temp=temperature, generator=generator) for _ in range(group_size)]
            raw_model.train()
            scored = [reward(qa, o) for o in outs]
            parts += [{**p, "reward": r} for r, p in scored]
            if ddp:
                model.require_backward_grad_sync = i == per_rank - 1
            q_loss = pg_loss(model, outs, advantages([r for r, _ in scored]), device, init_model) / per_rank
            q_loss.backward()
            loss += q_loss.detach()
            n_tokens += sum(len(o["ids"]) for o in outs)
        means = torch.tensor([sum(p[k] for p in parts) / len(parts) for k in ("reward", "em", "hops", "format")], device=device)
        r_mean, acc, hops, fmt = all_reduce_mean(means, ddp).tolist()
        extra = {"reward": r_mean, "acc": acc, "hops": hops, "format": fmt}
        history.append({"step": step + 1, "reward": r_mean, "acc": acc, "hops": hops, "format": fmt})
    step_optimizers(optimizers, raw_model, lr / learning_rate, grad_clip)
    log(step, all_reduce_mean(loss.detach(), ddp).item(), lr, n_tokens * world_size, **extra)
    last = step + 1 == max_iters
    if phase == "rl" and ((step + 1) % eval_interval == 0 or last):
        heldout_point(step + 1)
    if master and ((step + 1) % eval_interval == 0 or last):
        checkpoint(step + 1)
        if phase == "rl":
            curve_svg(os.path.join(out_dir, "curve.svg"), history)
    if ddp:
        dist.barrier()
print0(f"done: {max_iters - start_step} {phase} steps in {time.time() - t_start:.0f}s")
if master:
    final_eval(raw_model)
teardown(ddp)
