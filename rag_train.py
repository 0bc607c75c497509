"""Fine-tune a train.py checkpoint to answer from retrieved documents, cite them, or abstain, on a task mixture (RAG QA
on qa_train, closed-book QA on qa_closed.jsonl, train.bin text); then evaluate on qa_heldout into out_dir/eval.json.

    python rag_train.py                                   # tiny CPU defaults: out/tiny/ckpt.pt -> out/rag/ckpt.pt
    python rag_train.py --data_dir=data/vera --init_from=out/vera/ckpt.pt --out_dir=out/vera_rag   # your data
    python rag_train.py --eval_only=True                  # evaluate out_dir/ckpt.pt again
"""
import functools
import json
import os
import random
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import rag
import world
from common import (StepLog, accumulate, all_reduce_mean, autocast, check_config, die, load_model, lr_at, or_die,
                    peak_flops, print0, save_checkpoint, setup, step_optimizers, teardown, wrap_ddp, write_atomic)
from configurator import ConfigError, configure
from retrieve import new_retriever

# -----------------------------------------------------------------------------
# I/O
data_dir = "data/world"        # kb.jsonl, qa_train.jsonl, qa_heldout.jsonl (prepare.py's layout)
init_from = "out/tiny/ckpt.pt" # a train.py checkpoint, or "resume" (out_dir/ckpt.pt)
out_dir = "out/rag"
eval_only = False              # evaluate out_dir/ckpt.pt and write out_dir/eval.json, no training
allow_transformer = False      # baseline override: fine-tune a pure-T checkpoint too
eval_interval = 500            # steps between held-out validation losses (and checkpoints)
# data
retriever = "bm25"             # bm25 | dense | hybrid (retrieve.py); training never retrieves held-out documents
stopwords = ""                 # "" | "en" | "en_plus": English stopwords the sparse retrievers ignore (retrieve.py)
retrieve_depth = 16            # ranked documents kept per question: the distractors come from these
seq_len = 1024                 # tokens per packed row
k_max = 4                      # documents per RAG example, 1..k_max
k_power = 0.0                  # P(k) ~ k ** -k_power (rag.draw_k): 0 uniform, 1 the same tokens for every k
p_no_gold = 0.2                # share of RAG examples whose gold document is removed (answer: abstain)
p_rename = 0.7                 # the world's RAG examples: share whose names are swapped for fresh ones (world.rename_names)
p_followup = 0.2               # the world's RAG examples: share that are a second turn referring back with a pronoun
p_out_of_world = 0.05          # the world's RAG examples: share asking about real-world things (answer: abstain)
rag_weight = 0.88              # task mixture, per example
closed_book_weight = 0.1
text_weight = 0.02             # a text window is all loss tokens: at 0.1 it outweighed the answers
text_len = 256                 # tokens per plain-text window
# optimisation
total_batch_size = 4096        # tokens per optimizer step (rows * seq_len), across processes and micro-steps
device_batch_size = 4          # rows per micro-step per process
max_iters = 1500               # run_pipeline.sh's; configs/rag_tiny.py: 2000, the README's models
learning_rate = 6e-3
warmup_iters = 10
# evaluation (qa_heldout.jsonl)
eval_n = 0                     # questions per evaluation set (0 = all: the world's 378 single-hop, 89 unanswerable)
eval_k = 4                     # documents retrieved for the main RAG numbers
eval_ks = "1,2,4,8,16"         # the accuracy-vs-k sweep
cite_group = 4                 # above this many documents cite-then-read cites by knockout (rag.knockout); 0: one pass
eval_max_len = 4096            # context limit when generating (the world at k=32 needs ~2,000 tokens)
# system
device = "auto"
seed = 1337
# -----------------------------------------------------------------------------
try:
    config = configure(globals())
    eval_retriever = new_retriever(retriever, stopwords)  # checks both before any work; filled with the KB below
except ConfigError as e:
    die(e)
except ValueError as e:  # new_retriever's, naming the option
    die(f"--{e}")
check_config(config, [
    ("eval_interval retrieve_depth seq_len k_max text_len total_batch_size device_batch_size max_iters eval_k "
     "rag_weight", lambda v: v > 0, "positive"),
    ("eval_n warmup_iters closed_book_weight text_weight", lambda v: v >= 0, "non-negative"),
    ("p_no_gold p_rename p_followup p_out_of_world", lambda v: 0 <= v <= 1, "in [0, 1]"),
    ("eval_ks", lambda v: all(k.strip().isdigit() and int(k) >= 1 for k in v.split(",")), "positive integers, comma-separated")])
if retrieve_depth <= k_max:  # k_max documents without the gold one are k_max distractors from these
    die(f"--retrieve_depth ({retrieve_depth}) must exceed --k_max ({k_max})")

ddp, rank, world_size, device = setup(device, seed)
master = rank == 0
print0(json.dumps(config, indent=1))

# the model, from a train.py checkpoint (or our own, to resume or evaluate)
ckpt_path = os.path.join(out_dir, "ckpt.pt") if eval_only or init_from == "resume" else init_from
try:
    model, tok, ckpt = load_model(ckpt_path, device, data_dir)
except ValueError as e:
    die(e if eval_only else f"{e} (init_from: train one with `python train.py`)")
if "M" not in model.pattern and not allow_transformer:
    die(f"{ckpt_path} is a pure Transformer (pattern {model.pattern}): RAG fine-tuning here is for models with Mamba "
        "blocks; pass --allow_transformer=True to train the Transformer baseline anyway")
pretrain_dir = (ckpt.get("config") or {}).get("data_dir", "")  # where its train.bin is, for the text windows
start_step = ckpt["step"] if init_from == "resume" and not eval_only else 0
print0(f"model: {model.pattern} pattern, {model.num_params():,} parameters, from {ckpt_path} (stage {ckpt.get('stage')})")

kb_docs, by_id, qa_sets = or_die(rag.load_data, data_dir, ("heldout",) if eval_only else ("train", "heldout"))
heldout_qa = qa_sets["heldout"]
# the world's RAG examples ask about the RAG world (in the KB, never pretrained on), so answers come from documents
rag_qa = [q for q in qa_sets.get("train", []) if rag.single_hop(q)]  # single-hop and unanswerable
closed_qa = [q for q in qa_sets.get("closed", []) if q["golden_answers"] and rag.single_hop(q)]  # pretrained facts
first_names = world.first_names(kb_docs) if any("entity" in q for q in rag_qa) else []
heldout_docs = {g for q in heldout_qa for g in q.get("gold_ids", [])}  # never in a training example
train_docs = [d for d in kb_docs if d.id not in heldout_docs]
eval_retriever.add_documents(kb_docs)  # the real KB, both worlds: the held-out val loss and the evaluation search it

# -----------------------------------------------------------------------------
# data: packed rows of conversations (rag.pack) of the examples below


@functools.cache
def train_search(query):  # over the training documents only
    return [d for d, _ in train_retriever.retrieve(query, retrieve_depth)]


text_dir = next((d for d in (data_dir, pretrain_dir) if d and os.path.isfile(os.path.join(d, "train.bin"))), None)
if not closed_qa and closed_book_weight:
    print0(f"no closed-book questions ({data_dir}/qa_closed.jsonl): closed_book_weight is 0")
if text_dir is None and text_weight:
    print0(f"no train.bin in {data_dir}/ or the checkpoint's data_dir {pretrain_dir!r}: text_weight is 0")
n_tasks = (rag_weight, closed_book_weight if closed_qa else 0, text_weight if text_dir else 0)
if not eval_only:
    if not rag_qa:
        die(f"{data_dir}/qa_train.jsonl has no single-hop or unanswerable question to fine-tune on")
    train_retriever = new_retriever(retriever, stopwords)  # an evaluation needs none
    train_retriever.add_documents(train_docs)
    if text_dir:
        meta = json.load(open(os.path.join(text_dir, "meta.json")))
        train_data = np.memmap(os.path.join(text_dir, "train.bin"), dtype=meta["dtype"], mode="r")

# conversations, on the world's records only (they name their entity and its kind; other KBs may well know France)
followup_about = world.by_entity(rag_qa)
kb_titles = {d.title for d in kb_docs}
out_of_world_qa = [q for q in world.out_of_world("train", random.Random(seed)) if q.get("entity") not in kb_titles] \
    if followup_about else []


def example(rng):  # (ids, mask) of one example of the task mixture
    task = rng.choices(("rag", "closed", "text"), weights=n_tasks)[0]
    if task == "rag":
        if followup_about and p_followup and rng.random() < p_followup:
            return world.followup_example(tok, rng, followup_about, train_search, by_id, k_max, p_no_gold, p_rename,
                                          first_names, k_power)
        if out_of_world_qa and p_out_of_world and rng.random() < p_out_of_world:
            return rag.out_of_world_example(tok, rng, out_of_world_qa, train_search, k_max, k_power)
        qa = rng.choice(rag_qa)
        k = rag.draw_k(rng, k_max, k_power)
        docs = rag.raft_docs(qa, train_search(qa["question"]), by_id, rng, k, p_no_gold, train_docs)
        if rng.random() < p_rename and "entity" in qa:
            qa, docs = world.rename_names(qa, docs, rng, first_names)
        return rag.render_example(tok, qa, docs)
    if task == "closed":
        return rag.render_example(tok, rng.choice(closed_qa))
    start = rng.randrange(len(train_data) - text_len)
    return train_data[start:start + text_len].astype(np.int64).tolist(), [1] * text_len


# -----------------------------------------------------------------------------
# evaluation on the held-out questions

def subsample(qas, name):
    return qas if not eval_n or len(qas) <= eval_n else random.Random(f"{seed}-{name}").sample(qas, eval_n)


def ranked(questions, k):  # the whole KB's k best documents for each question
    return [[d for d, _ in hits] for hits in eval_retriever.retrieve_batch(questions, k)]


@torch.no_grad()
def val_loss(model):  # assistant-token loss on a fixed set of held-out RAG conversations
    rng = random.Random(f"{seed}-val")
    qas = [q for q in heldout_qa if rag.single_hop(q)]
    qas = random.Random(f"{seed}-val").sample(qas, min(100, len(qas)))[:64]  # fixed whatever eval_n is
    model.eval()
    losses = []
    for q, hits in zip(qas, ranked([q["question"] for q in qas], retrieve_depth)):
        docs = rag.raft_docs(q, hits, by_id, rng, rag.draw_k(rng, k_max, k_power), p_no_gold, kb_docs)
        x, y = (t.to(device) for t in rag.padded([rag.render_example(tok, q, docs)]))
        with autocast(device):
            losses.append(model(x, y)[1])
    model.train()
    return torch.stack(losses).mean().item()


def run_set(model, name, items):
    """items: (qa, docs or None) -> summaries of the one-pass answers and of them after cite-then-read."""
    rows, rows_reread, dropped = [], [], 0
    for qa, docs in tqdm(items, desc=f"eval {name}", unit="q", leave=False, mininterval=2):
        out = rag.generate(model, tok, rag.messages_for(qa["question"], docs), max_len=eval_max_len)
        dropped += out["dropped"]["docs"]
        rows.append(rag.score(qa, out["answer"], None if docs is None else out["docs"]))
        out = rag.reread(model, tok, out, group=cite_group, max_len=eval_max_len)  # closed-book: the same answer
        rows_reread.append(rag.score(qa, out["answer"], None if docs is None else out["docs"]))
    types = sorted({qa.get("type", "") for qa, _ in items})
    summary = lambda rows: {**rag.summarize(rows), "dropped_docs": dropped, "em_by_type": {
        t: rag.summarize([r for r, (qa, _) in zip(rows, items) if qa.get("type", "") == t])["em"] for t in types}}
    return summary(rows), summary(rows_reread)


def evaluate_conversations(model):
    """Held-out entities' questions as chat.py asks them: fresh, after a first by name, with a pronoun; out-of-world."""
    rng = random.Random(f"{seed}-conversations")
    about = world.by_entity(heldout_qa)
    if not about:
        return {}
    pairs = subsample([tuple(rng.sample(about[e], 2)) for e in sorted(about)], "conversations")
    top = lambda q, k: ranked([q], k)[0]
    kw = dict(retrieve=top, top_k=eval_k, max_len=eval_max_len)
    rows = {"single": [], "second": [], "followup": []}
    for first, qa in tqdm(pairs, desc="eval conversations", unit="pair", leave=False, mininterval=2):
        followup = world.refer_back(qa["question"], qa["entity"], rng.choice(world.PRONOUNS[world.ENTITY_KIND[qa["type"]]]))
        _, out = rag.ask(model, tok, first["question"], **kw)
        history = rag.text_only(out["messages"]) if out["stop"] == "answer" else []
        for name, question, h in (("single", qa["question"], []), ("second", qa["question"], history),
                                  ("followup", followup, history)):
            _, out = rag.ask(model, tok, question, h, first["question"], **kw)
            rows[name].append(rag.score(qa, out["answer"], out["docs"]))
    oow = subsample([q for q in world.out_of_world("heldout", random.Random(seed)) if q.get("entity") not in kb_titles],
                    "out_of_world")
    one_pass, reread = run_set(model, "out-of-world", [(q, top(q["question"], eval_k)) for q in oow])
    return {"conversation": {name: rag.summarize(r) for name, r in rows.items()}, "out_of_world": one_pass,
            "out_of_world_reread": reread}


def evaluate_and_report(model):  # every model call is rag.generate's, without gradients; the run ends after it
    model.eval()
    t0 = time.time()
    ks = [int(k) for k in eval_ks.split(",")]
    single = subsample([q for q in heldout_qa if q["golden_answers"] and rag.single_hop(q)], "single")
    unanswerable = subsample([q for q in heldout_qa if not q["golden_answers"]], "unanswerable")
    hits = ranked([q["question"] for q in single], max(ks + [eval_k + 1, retrieve_depth]))
    no_gold = lambda q, h: [d for d in h if not rag.is_gold(q, d)]
    res = {"checkpoint": os.path.join(out_dir, "ckpt.pt"), "pattern": model.pattern, "params": model.num_params(),
           "retriever": retriever, "eval_k": eval_k, "n_single": len(single), "n_unanswerable": len(unanswerable),
           "recall": {k: sum(rag.has_gold(q, h[:k]) for q, h in zip(single, hits)) / len(single) for k in ks}}
    res["closed_book"], _ = run_set(model, "closed-book", [(q, None) for q in single])
    sets = {"rag": [(q, h[:eval_k]) for q, h in zip(single, hits)],
            "gold_removed": [(q, no_gold(q, h)[:eval_k]) for q, h in zip(single, hits)],
            "unanswerable": list(zip(unanswerable, ranked([q["question"] for q in unanswerable], eval_k)))}
    for name, items in sets.items():  # each answered in one pass, and in two (cite, then read: rag.reread)
        res[name], res[name + "_reread"] = run_set(model, name, items)
    # accuracy vs documents in context: the gold document among the k-1 best-ranked distractors, at a random
    # position, so the sweep measures reading, not retrieval (recall is reported above)
    golds = [[by_id[g] for g in q["gold_ids"][:1]] if "gold_ids" in q else [d for d in h if rag.is_gold(q, d)][:1]
             for q, h in zip(single, hits)]  # empty where no document found holds the answer: nothing to read
    res["vs_k"], res["vs_k_reread"] = {}, {}
    for k in ks:
        items = [(q, gold + no_gold(q, h)[:k - 1]) for q, h, gold in zip(single, hits, golds) if gold]
        for q, docs in items:
            random.Random(f"{seed}-{q['id']}-{k}").shuffle(docs)
        res["vs_k"][k], res["vs_k_reread"][k] = run_set(model, f"k={k}", items)
    res.update(evaluate_conversations(model))
    res["seconds"] = time.time() - t0
    # the summary, then eval.json
    pct = lambda v: "  -  " if v is None else f"{100 * v:5.1f}"
    print0(f"held-out: {res['n_single']} single-hop + {res['n_unanswerable']} unanswerable questions, "
           f"{res['pattern']} model, {res['retriever']} retriever, k={res['eval_k']}")
    print0("set                   EM   answer-EM  F1   halluc  abstain  cite  distracted (%)  (_reread: cite, then read;"
           " answer-EM: the answer slot alone, the restated name may be misspelt)")
    for name in "closed_book rag gold_removed unanswerable rag_reread gold_removed_reread unanswerable_reread".split():
        s = res[name]
        print0(f"{name:<20} {pct(s['em'])}  {pct(s.get('em_answer'))}  {pct(s['f1'])}  {pct(s['hallucinated'])}   "
               f"{pct(s['abstained'])}  {pct(s.get('citation_ok'))}  {pct(s.get('distracted'))}")
    print0("k                     " + "  ".join(f"{k:>5}" for k in res["vs_k"]))
    print0("EM vs k (%)           " + "  ".join(pct(s["em"]) for s in res["vs_k"].values()))
    print0("EM vs k, reread (%)   " + "  ".join(pct(s["em"]) for s in res["vs_k_reread"].values()))
    print0("recall@k (%)          " + "  ".join(pct(v) for v in res["recall"].values()))
    k, first = next(iter(res["vs_k"].items()))  # eval_ks's first k; at k=1 the gold document alone: reading
    p = lambda v: pct(v).strip()
    print0(f"EM by relation, gold document among k={k} (%): "
           + ", ".join(f"{t} {p(v)}" for t, v in first["em_by_type"].items()))
    if "conversation" in res:
        c, o = res["conversation"], res["out_of_world_reread"]
        print0(f"conversations on {c['single']['n']} held-out entities, cite then read, EM (%): single-turn "
               f"{p(c['single']['em'])}, second question of a session {p(c['second']['em'])}, pronoun follow-up "
               f"{p(c['followup']['em'])}")
        print0(f"out-of-world questions: {o['n']}, abstained (%) {p(o['abstained'])} "
               f"(one pass {p(res['out_of_world']['abstained'])})")
    path = os.path.join(out_dir, "eval.json")
    write_atomic(path, json.dumps(res, indent=1))
    print0(f"wrote {path} ({res['seconds']:.0f}s)")


# -----------------------------------------------------------------------------
# training, as train.py (unless eval_only)

raw_model = model
if not eval_only:
    rows_per_step = total_batch_size // seq_len
    if total_batch_size % (seq_len * device_batch_size * world_size):
        die(f"total_batch_size={total_batch_size} must be a multiple of seq_len*device_batch_size*world_size="
            f"{seq_len * device_batch_size * world_size}")
    grad_accum = rows_per_step // (device_batch_size * world_size)
    optimizers = model.configure_optimizers(learning_rate, 0.0, (0.9, 0.95), device.split(":")[0])  # no weight decay
    for opt, state in zip(optimizers, ckpt["optimizer"] if init_from == "resume" else []):
        opt.load_state_dict(state)
    model = wrap_ddp(model, ddp, device)
    model_args, tokenizer_json, ckpt = ckpt["model_args"], ckpt["tokenizer"], None  # the optimizer state freed
    os.makedirs(out_dir, exist_ok=True)
    log = StepLog(max_iters, start_step, os.path.join(out_dir, "log.txt"), raw_model.flops_per_token(seq_len),
                  peak_flops(device), world_size)
    log.write(f"config {json.dumps(config)}")  # rank 0's, as every line of the log

    for step in range(start_step, max_iters):
        lr = lr_at(step, max_iters, learning_rate, warmup_iters)
        loss_sum, n_tokens = torch.zeros((), device=device), 0
        for micro in range(grad_accum):
            rng = random.Random(f"{seed}-{step}-{rank}-{micro}")  # so a resumed run sees the same batches
            x, y = (t.to(device) for t in rag.pack(lambda: example(rng), device_batch_size, seq_len))
            n_tokens += int((y >= 0).sum())
            loss_sum += accumulate(model, x, y, grad_accum, micro == grad_accum - 1, device)
        step_optimizers(optimizers, raw_model, lr / learning_rate, 1.0)  # grad clip 1
        train_loss = all_reduce_mean(loss_sum / grad_accum, ddp).item()
        log(step, train_loss, lr, total_batch_size, loss_tokens=n_tokens * world_size)
        if (step + 1) % eval_interval == 0 or step + 1 == max_iters:
            if master:
                loss_val = val_loss(raw_model)
                log.write(f"step {step + 1}/{max_iters} | held-out RAG val loss {loss_val:.4f}")
                save_checkpoint(os.path.join(out_dir, "ckpt.pt"), {
                    "model": raw_model.state_dict(), "model_args": model_args, "step": step + 1, "val_loss": loss_val,
                    "optimizer": [opt.state_dict() for opt in optimizers], "config": config, "stage": "rag",
                    "data_state": {"seed": seed, "rows_consumed": (step + 1) * rows_per_step, "seq_len": seq_len},
                    "tokenizer": tokenizer_json})
                log.write(f"saved {out_dir}/ckpt.pt at step {step + 1}")
            if ddp:
                dist.barrier()
    print0(f"done: {max_iters - start_step} steps in {time.time() - log.t0:.0f}s")
if master:
    evaluate_and_report(raw_model)
teardown(ddp)
