"""Multi-hop retrieval: sft imitates gold query chains, rl is GRPO through the real retrieve-and-read loop (as `chat.py
--hops N`). Both end comparing single-shot RAG, the warm start and RL on qa_heldout.jsonl (eval.json; rl: curve.png).

    python refrag_train.py                      # sft: out/rag2/ckpt.pt -> out/refrag_sft/ckpt.pt
    python refrag_train.py --phase=rl           # rl:  out/refrag_sft/ckpt.pt -> out/refrag/ckpt.pt
"""
import json
import os
import random
import time

import torch
from tqdm import tqdm

import rag
import world
from common import (StepLog, accumulate, all_reduce_mean, die, load_model, lr_at, or_die, plot, print0,
                    save_checkpoint, setup, step_optimizers, teardown, wrap_ddp, write_atomic)
from configurator import configure
from retrieve import new_retriever
from tokenizer import render_conversation
from world import COMPANY_SUFFIXES

# -----------------------------------------------------------------------------
# I/O
data_dir = "data/world"        # kb.jsonl, qa_train.jsonl, qa_heldout.jsonl (prepare.py's layout)
phase = "sft"                  # "sft" (imitate the gold query chains) | "rl" (rewards)
init_from = ""                 # "" = the previous stage (sft: out/rag2/ckpt.pt, rl: out/refrag_sft/ckpt.pt) | path | "resume"
out_dir = ""                   # "" = out/refrag_sft (sft) | out/refrag (rl)
baseline_ckpt = "out/rag2/ckpt.pt"  # evaluated as single-shot RAG next to ours ("" = skip)
allow_transformer = False      # baseline override: train a pure-T checkpoint too
# the loop
retriever = "bm25"             # bm25 | dense | hybrid (retrieve.py)
stopwords = ""                 # "" | "en" | "en_plus": English stopwords the sparse retrievers ignore
top_k = 1                      # documents per retrieval, on the question and on each query: BM25 finds a chain
                               # step's document at rank 1 98-99% of the time, so contexts stay short
max_hops = 3                   # queries the model may write before it must answer
seq_len = 1024                 # context limit of one conversation (chat.py reads it from the checkpoint)
max_new_tokens = 40            # tokens per query or answer
# sft (~3 minutes of training on 2 CPU cores)
sft_iters = 400
sft_batch_size = 8             # conversations per step, across processes
sft_learning_rate = 3e-3
rename_p = 0.5                 # share of conversations (sft) and questions (rl) whose names are swapped for invented ones: the model
                               # pretrained on the training world, so only then must it read a bridge, not recall it
# rl (~22 minutes of training on 2 CPU cores)
rl_iters = 240
rl_learning_rate = 5e-4
questions_per_step = 4         # across processes
group_size = 8                 # rollouts per question
rl_hops = "2,3"                # the training questions RL practises on
w_em = 1.0                     # reward weights, as Search-R1: the outcome's EM,
w_f1 = 0.0                     # its token F1 (partial credit for long free-text answers), citation, format, hops
w_cite = 0.2
w_format = 0.5
w_hop = 0.05
kl_coef = 0.3                  # GRPO's beta: per-token KL to the warm start; without it RL wore down copying (3-hop 34 -> 25)
# optimisation
warmup_iters = 5
min_lr_frac = 0.1
weight_decay = 0.0
grad_clip = 1.0
# evaluation (qa_heldout.jsonl)
eval_n = 0                     # questions per set (0 = all: the world's 270 two-hop and 170 three-hop)
single_shot_k = 4              # documents the single-shot baseline retrieves on the question
eval_interval = 40             # steps between checkpoints and, for rl, held-out EM points of the curve
curve_n = 100                  # rl: held-out two-hop questions per curve point (~10 s each)
# system
device = "auto"
seed = 1337
# -----------------------------------------------------------------------------
config = or_die(configure, globals())
if phase not in ("sft", "rl"):
    die(f"--phase: must be 'sft' or 'rl', got {phase!r}")
or_die(new_retriever, retriever, stopwords)  # checks both before any work
init_from = init_from or {"sft": "out/rag2/ckpt.pt", "rl": "out/refrag_sft/ckpt.pt"}[phase]
out_dir = out_dir or {"sft": "out/refrag_sft", "rl": "out/refrag"}[phase]
config.update(init_from=init_from, out_dir=out_dir)


try:
    rl_hop_set = [int(v) for v in rl_hops.split(",")]
except ValueError:
    die(f"--rl_hops: expected comma-separated numbers, got {rl_hops!r}")
MIX = (0.1, 0.2, 0.4, 0.3)  # sft: shares of training questions with 0 (unanswerable), 1, 2, 3 hops
EVAL_HOPS = (2, 3)  # the held-out question sets evaluated at the end

ddp, rank, world_size, device = setup(device, seed)
master = rank == 0

# -----------------------------------------------------------------------------
# the model: the previous stage's checkpoint, or ours to resume


def load(path, what):
    try:
        return load_model(path, device, data_dir)
    except ValueError as e:
        die(f"{e} ({what})")


if baseline_ckpt and not os.path.isfile(baseline_ckpt):
    die(f"baseline_ckpt {baseline_ckpt} not found: train it with `python rag_train.py`, or pass --baseline_ckpt= to skip it")
resuming = init_from == "resume"
ckpt_path = os.path.join(out_dir, "ckpt.pt") if resuming else init_from
model, tok, ckpt = load(ckpt_path, "init_from: train one with `python rag_train.py`" if phase == "sft" else
                       "init_from: run the sft phase first, `python refrag_train.py`")
if "M" not in model.pattern and not allow_transformer:
    die(f"{ckpt_path} is a pure Transformer (pattern {model.pattern}): retrieval training here is for models with "
        "Mamba blocks; pass --allow_transformer=True to train the Transformer baseline anyway")
start_step = ckpt["step"] if resuming else 0
# a resumed run: the RL curve so far, and the warm start RL began from (its KL reference and final comparison)
state = (ckpt.get("data_state") or {}) if resuming else {"warm_start": init_from if phase == "rl" else None}
history, warm_start = state.get("history", []), state.get("warm_start")
print0(f"model: {model.pattern} pattern, {model.num_params():,} parameters, from {ckpt_path} (stage {ckpt.get('stage')})")
if phase == "rl" and kl_coef and not warm_start:
    die(f"{ckpt_path}: records no warm start, which kl_coef > 0 needs as its reference")
warm_model = load(warm_start, "the warm start")[0] if phase == "rl" and warm_start and (master or kl_coef) else None

# -----------------------------------------------------------------------------
# the data

kb_docs, by_id, qa_sets = or_die(rag.load_data, data_dir)
train_qa, heldout_qa = qa_sets["train"], qa_sets["heldout"]
heldout_docs = {g for q in heldout_qa for g in q.get("gold_ids", [])}
# the world's names, renamed in a share of training questions (its pretraining memorised them)
train_names = {w for d in kb_docs if d.id not in heldout_docs for w in d.title.split()} - set(COMPANY_SUFFIXES) \
    if any("entity" in q for q in train_qa) else set()
hops_of = lambda q: len(q["gold_ids"]) if "gold_ids" in q else None  # None: no gold chain, only the answers
# the world's chains are about the RAG world (in the KB, never pretrained on): a bridge can only come from a document
qa_by_hops = {h: [q for q in train_qa if hops_of(q) == h and (h < 2 or len(q.get("queries", [])) == h)] for h in range(4)}
rl_pool = [q for h in rl_hop_set for q in train_qa if hops_of(q) == h] + \
    [q for q in train_qa if hops_of(q) is None and q["golden_answers"]]
if phase == "sft" and any(not qa_by_hops[h] for h in range(4)) or phase == "rl" and not rl_pool:
    die(f"{data_dir}/qa_train.jsonl lacks questions of 0-3 hops with gold query chains (sft) or of --rl_hops hops (rl)")


def retriever_over(docs):
    r = new_retriever(retriever, stopwords)
    r.add_documents(docs)
    return lambda query, k: [d for d, _ in r.retrieve(query, k)]


# training retrieves from the training world only (as rag_train.py); evaluation from the whole KB
train_retrieve = retriever_over([d for d in kb_docs if d.id not in heldout_docs])
eval_retrieve = retriever_over(kb_docs) if master else None


def subsample(qas, name, n):
    return qas if not n or len(qas) <= n else random.Random(f"{seed}-{name}").sample(qas, n)


# held-out questions by hops; without gold_ids, every answerable one is in each set
eval_sets = {h: subsample([q for q in heldout_qa if hops_of(q) == h or (hops_of(q) is None and q["golden_answers"])],
                          f"hops{h}", eval_n) for h in EVAL_HOPS}
curve_set = subsample([q for q in heldout_qa if hops_of(q) in (2, None) and q["golden_answers"]], "curve", curve_n)

# -----------------------------------------------------------------------------
# evaluation on the held-out questions


def evaluate(model, qas, k, hops, desc="eval"):
    """Greedy rollouts -> rag.summarize's means, recall_i (the i-th gold document reached the context)."""
    rows = []
    for qa in tqdm(qas, desc=desc, unit="q", leave=False, mininterval=2, disable=not master):
        out = rag.rollout(model, tok, qa, eval_retrieve, k, hops, max_len=seq_len, max_new_tokens=max_new_tokens)
        r, parts = rag.reward(qa, out, w_em, w_f1, w_cite, w_format, w_hop)
        in_context = {d["id"] for d in out["docs"]}
        rows.append({**parts, "reward": r, **{f"recall_{i + 1}": float(s in in_context)
                                              for i, s in enumerate(qa.get("gold_ids", []))}})
    return {**rag.summarize(rows), "em_each": [r["em"] for r in rows]}


def final_eval(trained):
    """Single-shot RAG, the warm start and the trained model on the held-out sets: a table, and out_dir/eval.json."""
    t0 = time.time()
    variants = {"single_shot": (load(baseline_ckpt, "baseline_ckpt")[0], single_shot_k, 0)} if baseline_ckpt else {}
    if warm_model is not None:
        variants["warm_start"] = (warm_model, top_k, max_hops)
    variants["rl" if phase == "rl" else "warm_start"] = (trained, top_k, max_hops)
    res = {name: {h: evaluate(m, qas, k, hops, f"eval {name} {h}-hop") for h, qas in eval_sets.items()}
           for name, (m, k, hops) in variants.items()}
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
                   f"(two-sided sign test p = {rag.sign_test(fixed, broken):.3f})")
    path = os.path.join(out_dir, "eval.json")
    write_atomic(path, json.dumps({"checkpoint": os.path.join(out_dir, "ckpt.pt"), "pattern": trained.pattern,
                                   "params": trained.num_params(), "phase": phase, "config": config, "results": res,
                                   "history": history, "seconds": time.time() - t0}, indent=1))
    print0(f"wrote {path}")


# -----------------------------------------------------------------------------
# training: the phase picks the data and the loss; the loop is the same

os.makedirs(out_dir, exist_ok=True)
max_iters, learning_rate = (sft_iters, sft_learning_rate) if phase == "sft" else (rl_iters, rl_learning_rate)
batch_key = "sft_batch_size" if phase == "sft" else "questions_per_step"
per_rank = config[batch_key] // world_size
if per_rank < 1 or config[batch_key] % world_size:
    die(f"{batch_key} must be a multiple of the {world_size} processes")
optimizers = model.configure_optimizers(learning_rate, weight_decay, (0.9, 0.95), device.split(":")[0])
for opt, opt_state in zip(optimizers, ckpt["optimizer"] if resuming else []):
    opt.load_state_dict(opt_state)
raw_model = model
model = wrap_ddp(model, ddp, device)
ckpt_extra, ckpt = {"model_args": ckpt["model_args"], "tokenizer": ckpt["tokenizer"]}, None  # optimizer state freed
log = StepLog(max_iters, start_step, os.path.join(out_dir, "log.txt"), world_size=world_size)  # only rank 0 writes
log.write(f"config {json.dumps(config)}")


def sft_step(step):
    """This process's share of the step's gold-chain conversations; loss on the model's queries and answers."""
    rng = random.Random(f"{seed}-sft-{step}-{rank}")
    convs = []
    for _ in range(per_rank):
        msgs = rag.chain_messages(rng.choice(qa_by_hops[rng.choices(range(4), MIX)[0]]), train_retrieve, by_id, top_k)
        convs.append(render_conversation(tok, world.renamed(msgs, train_names, rng) if rng.random() < rename_p else msgs, seq_len))
    x, y = (t.to(device) for t in rag.padded(convs))
    return accumulate(model, x, y, 1, True, device), x.numel(), {"loss_tokens": int((y >= 0).sum())}


def rl_step(step):
    """group_size rollouts of each of this process's questions, rewarded; rag.pg_loss backpropagated per question."""
    rng = random.Random(f"{seed}-rl-{step}-{rank}")
    generator = torch.Generator(device=device).manual_seed(seed * 100_003 + step * 1_009 + rank)
    loss, n_tokens, parts = torch.zeros((), device=device), 0, []
    for i in range(per_rank):
        qa, retrieve = rng.choice(rl_pool), train_retrieve
        if rng.random() < rename_p and train_names:
            qa, retrieve = world.renamed_world(qa, retrieve, train_names, rng)
        # sampled at temperature 1: the policy whose log-probs the loss pushes
        outs = [rag.rollout(raw_model, tok, qa, retrieve, top_k, max_hops, temperature=1.0, generator=generator,
                            max_len=seq_len, max_new_tokens=max_new_tokens) for _ in range(group_size)]
        scored = [rag.reward(qa, o, w_em, w_f1, w_cite, w_format, w_hop) for o in outs]
        parts += [{**p, "reward": r} for r, p in scored]
        if ddp:
            model.require_backward_grad_sync = i == per_rank - 1  # gradients are averaged once, after the last question
        q_loss = rag.pg_loss(model, outs, [r for r, _ in scored], device, warm_model, kl_coef) / per_rank
        q_loss.backward()
        loss += q_loss.detach()
        n_tokens += sum(len(o["ids"]) for o in outs)
    means = torch.tensor([sum(p[k] for p in parts) / len(parts) for k in ("reward", "em", "hops", "format")], device=device)
    extra = dict(zip(("reward", "acc", "hops", "format"), all_reduce_mean(means, ddp).tolist()))
    history.append({"step": step + 1, **extra})
    return loss, n_tokens, extra


def heldout_point(step):
    """Held-out two-hop EM (greedy) of the current policy: the curve that says whether RL generalises."""
    if phase == "rl" and master and curve_n:
        s = evaluate(raw_model, curve_set, top_k, max_hops, desc=f"curve {step}")
        history.append({"step": step, "heldout_em": s["em"], "heldout_hops": s["hops"]})
        log.write(f"step {step}/{max_iters} | held-out 2-hop EM {s['em']:.4f} | queries {s['hops']:.2f} | format {s['format']:.4f}")


def plot_curve():
    curves = (("reward", "train reward", {"marker": ""}), ("acc", "train accuracy (EM)", {"marker": ""}),
              ("heldout_em", "held-out 2-hop EM", {}))
    series = {label: ([h["step"] for h in history if key in h], [h[key] for h in history if key in h], style)
              for key, label, style in curves if any(key in h for h in history)}
    plot(os.path.join(out_dir, "curve"), f"multi-hop RL, {out_dir}", "RL step", "reward / EM", series)


train_step = sft_step if phase == "sft" else rl_step
t_start = time.time()
if start_step == 0:
    heldout_point(0)
for step in range(start_step, max_iters):
    lr = lr_at(step, max_iters, learning_rate, warmup_iters, "cosine", min_lr_frac)
    loss, n_tokens, extra = train_step(step)
    step_optimizers(optimizers, raw_model, lr / learning_rate, grad_clip)
    log(step, all_reduce_mean(loss, ddp).item(), lr, n_tokens * world_size, **extra)
    if (step + 1) % eval_interval == 0 or step + 1 == max_iters:
        heldout_point(step + 1)
        if master:
            save_checkpoint(os.path.join(out_dir, "ckpt.pt"), {
                "model": raw_model.state_dict(), "step": step + 1, "val_loss": None, "config": config,
                "optimizer": [opt.state_dict() for opt in optimizers], "stage": "refrag", **ckpt_extra,
                "data_state": {"seed": seed, "phase": phase, "history": history, "warm_start": warm_start}})
            log.write(f"saved {out_dir}/ckpt.pt at step {step + 1}")
            if history:
                plot_curve()
print0(f"done: {max_iters - start_step} {phase} steps in {time.time() - t_start:.0f}s")
if master:
    final_eval(raw_model)
teardown(ddp)
