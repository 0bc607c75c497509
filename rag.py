"""
Retrieval-augmented generation, shared by rag_train.py, refrag_train.py and chat.py:

- conversations: a question, the documents in context (numbered [1..k] across the whole conversation), and the
  answer the model should give: the fact with the number of the document that holds it, or prepare.ABSTAIN
- RAFT-style examples (Zhang et al. 2024): the gold document at a random position among retrieved distractors,
  and a share of examples with the gold document removed, where the right answer is to abstain
- metrics: SQuAD exact match and token F1, hallucination, abstention and citation accuracy
- the generation loop: the model answers, or writes a query that the loop retrieves documents for, appends
  (chunked prefill into the same cache) and continues, until an answer, max_hops, or the context limit;
  then, optionally, cite-then-read: the answer is asked again with the one document it cites

How an answer is read (strictly): citations "[n]" are taken out; what is left must be ABSTAIN (an abstention) or
the question type's answer sentence (prepare.ANSWERS) about the asked-about entity, and the short answer is
what fills its answer slot. Any other sentence is a definite answer whose short answer is the whole sentence, so
it scores EM 0 unless it is the bare answer. Records without "type"/"entity" (your own QA) use the whole sentence.
"""
import os
import re
import string
from collections import Counter

import torch

from model import sample_next
from prepare import (ABSTAIN, ANSWERS, COMPANY_SUFFIXES, COUNTRY_SUFFIXES, MULTI_HOP, QUESTIONS, NamePool,
                     answer_sentence, render_conversation)
from retrieve import load_documents, read_jsonl

# -----------------------------------------------------------------------------
# conversations


def load_world(data_dir):
    """A prepared world: (kb documents, {id: document}, {"train"|"rag"|"heldout": QA records}).
    A missing or malformed file is a ValueError / OSError naming it."""
    def qa(split):
        path = os.path.join(data_dir, f"qa_{split}.jsonl")
        if not os.path.isfile(path):
            raise ValueError(f"{path} not found: run `python prepare.py` first")
        return [r for _, r in read_jsonl(path)]
    docs = load_documents(os.path.join(data_dir, "kb.jsonl"))
    return docs, {d.id: d for d in docs}, {split: qa(split) for split in ("train", "rag", "heldout")}


def doc_dict(d):
    """retrieve.Document or dict -> {"id", "title", "text"}."""
    if isinstance(d, dict):
        return {"id": str(d.get("id", "")), "title": d.get("title", ""), "text": d["text"]}
    return {"id": d.id, "title": d.title, "text": d.text}


def has_gold(qa, docs):
    """True when every gold document of qa is among docs (single-shot can answer only then)."""
    ids = {doc_dict(d)["id"] for d in docs}
    return bool(qa["gold_ids"]) and all(g in ids for g in qa["gold_ids"])


def target_answer(qa, docs):
    """What the model should say: closed-book (docs None) the plain fact; with documents the fact citing the
    document that holds it (the last of the chain), or ABSTAIN when the documents do not hold it."""
    if docs is None:
        return answer_sentence(qa)
    if not has_gold(qa, docs):
        return ABSTAIN
    ids = [doc_dict(d)["id"] for d in docs]
    return answer_sentence(qa, cite=ids.index(qa["gold_ids"][-1]) + 1)


def messages_for(question, docs=None, answer=None):
    """[user question, documents (if any), assistant answer (if any)]: the question comes first so that a
    recurrent model reads the documents already knowing what to look for."""
    msgs = [{"role": "user", "content": question}]
    if docs:
        msgs.append({"role": "documents", "content": [doc_dict(d) for d in docs]})
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return msgs


def render_example(tok, qa, docs=None):
    """(ids, mask) of a training conversation for qa with these documents (None = closed-book)."""
    return render_conversation(tok, messages_for(qa["question"], docs, target_answer(qa, docs)))


def raft_docs(qa, retrieved, by_id, rng, k, p_no_gold):
    """k documents for qa, RAFT-style: the gold ones (dropped with probability p_no_gold) and the best-ranked
    retrieved distractors, shuffled so the gold position varies. retrieved: ranked Documents; by_id: id -> Document."""
    gold = [by_id[g] for g in qa["gold_ids"] if g in by_id] if rng.random() >= p_no_gold else []
    gold = gold[:k]
    gold_ids = set(qa["gold_ids"])
    distractors = [d for d in retrieved if doc_dict(d)["id"] not in gold_ids][:k - len(gold)]
    docs = gold + distractors
    rng.shuffle(docs)
    return docs


# the kind of entity each single-hop question type asks about (an unanswerable question of a multi-hop type is left
# out, so every word of its name is invented)
ENTITY_KIND = {qtype: kind for kind, types in QUESTIONS.items() for qtype in types if qtype not in MULTI_HOP[kind]}
ANSWER_KIND = {"born_in": "city", "works_for": "company", "founded_by": "person", "hq": "city",
               "located_in": "country", "capital": "city"}  # single-hop relations whose answer is a name


def rename_names(qa, docs, rng, first_names):
    """(qa, docs) with the asked-about entity, and the answer when it is a name, renamed everywhere (question,
    answer, every document) to fresh names from the world's own generator; a person gets a first name from the
    shared pool (first_names) and an invented surname, as held-out people have. Then the model can answer only
    by reading, which is the situation of every held-out question: without renaming, training-world questions
    are answered from memory and "unfamiliar name" becomes a cue to abstain; with the entity alone renamed, the
    few hundred answers come back so often that held-out answers are written as blends of them."""
    pool, names = NamePool(rng), {}

    def rename(name, kind):
        words = name.split()
        if kind == "person" and len(words) == 2:
            names.setdefault(words[0], rng.choice(first_names))
            names.setdefault(words[1], pool.word())
        elif kind == "country":
            names.setdefault(name, pool.word(next((s for s in COUNTRY_SUFFIXES if name.endswith(s)), "")))
        else:  # a city, or a company's stem (its suffix stays)
            for w in words:
                if w not in COMPANY_SUFFIXES:
                    names.setdefault(w, pool.word())
    rename(qa["entity"], ENTITY_KIND.get(qa["type"]))
    if qa["type"] in ANSWER_KIND and qa["answer"]:
        rename(qa["answer"], ANSWER_KIND[qa["type"]])
    names = {k: v for k, v in names.items() if k != v}
    if not names:
        return qa, docs
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    sub = lambda s: pattern.sub(lambda m: names[m.group(1)], s)
    qa = {**qa, "question": sub(qa["question"]), "entity": sub(qa["entity"]), "answer": sub(qa["answer"])}
    return qa, [{**doc_dict(d), "title": sub(doc_dict(d)["title"]), "text": sub(doc_dict(d)["text"])} for d in docs]

# -----------------------------------------------------------------------------
# metrics

CITATION = re.compile(r"\s*\[(\d+)\]")


def normalize(s):
    """SQuAD: lower case, no punctuation, no articles, single spaces."""
    s = "".join(ch for ch in s.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", s).split())


def exact_match(pred, gold):
    return float(normalize(pred) == normalize(gold))


def token_f1(pred, gold):
    p, g = normalize(pred).split(), normalize(gold).split()
    if not p or not g:
        return float(p == g)  # SQuAD v2: abstaining on an unanswerable question is right
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def read_answer(text, qa=None, any_name=False):
    """(short answer, cited numbers) of a model's answer sentence; short answer None = abstained. The short answer
    is the template's answer slot when the sentence names qa's entity exactly (any_name: whatever name it gives),
    else the whole sentence."""
    cites = [int(c) for c in CITATION.findall(text)]
    sentence = CITATION.sub("", text).strip()
    if normalize(sentence) == normalize(ABSTAIN):
        return None, cites
    if qa is not None and qa.get("type") in ANSWERS and qa.get("entity"):
        slot = re.escape(ANSWERS[qa["type"]]).replace(re.escape("{e}"), ".+?" if any_name else re.escape(qa["entity"]))
        slot = slot.replace(re.escape("{a}"), "(.+)").replace(re.escape("{aa}"), "(.+)")
        m = re.fullmatch(slot, sentence)
        if m:
            return m.group(1), cites
    return sentence, cites


def doc_holds(doc, answer):
    d = doc_dict(doc)
    return bool(answer) and f" {normalize(answer)} " in f" {normalize(d['title'] + ' ' + d['text'])} "


def score(qa, text, docs=None):
    """Scores one answer (text None = the model gave none: counts as a wrong definite answer).
    docs: the documents that were in context, in numbering order (None = closed-book).
    The expected answer is qa's answer when it is knowable (closed-book, or its gold documents are in
    context), else abstaining. hallucinated = a definite answer that is wrong, or any definite answer where
    abstaining is right. em_answer = em of the answer slot alone, SQuAD's answer-span convention: the name the
    sentence restates (`Kelmar was born in`) may be misspelt. citation_ok = every cited number points to a document
    containing qa's answer. distracted = a hallucinated answer that some document in context states (a
    distractor's fact)."""
    text = text or "<no answer>"
    short, cites = read_answer(text, qa)
    gold = qa["answer"] if docs is None or has_gold(qa, docs) else ""
    em_of = lambda s: exact_match(s or "", gold) if (s is None) == (not gold) else 0.0  # None = abstained
    pred = short or ""
    em = em_of(short)
    r = {"em": em, "em_answer": em_of(read_answer(text, qa, any_name=True)[0]),
         "f1": token_f1(pred, gold), "abstained": float(short is None),
         "hallucinated": float(short is not None and (not gold or not em))}
    if docs is not None and short is not None:
        ok = [1 <= c <= len(docs) and doc_holds(docs[c - 1], qa["answer"]) for c in cites]
        gold_ids = set(qa["gold_ids"])
        r["citation_ok"] = float(bool(cites) and all(ok))
        r["citation_gold"] = float(bool(cites) and all(1 <= c <= len(docs) and doc_dict(docs[c - 1])["id"] in gold_ids for c in cites))
        # a wrong answer that another document in context states: read from the wrong document, not made up
        r["distracted"] = float(bool(r["hallucinated"]) and any(doc_holds(d, short) for d in docs))
    return r


def summarize(rows):
    """Means of every metric over the rows that have it, plus n."""
    keys = sorted({k for r in rows for k in r})
    out = {"n": len(rows)}
    for k in keys:
        vals = [r[k] for r in rows if k in r]
        out[k] = sum(vals) / len(vals) if vals else None
    return out

# -----------------------------------------------------------------------------
# the generation loop

def fit(tok, messages, max_len, reserve):
    """Drops the lowest-ranked documents of the last documents message, then the oldest turns, until the
    rendered conversation leaves `reserve` tokens free. -> (messages, ids, what was dropped) or None if even the
    last user turn alone does not fit."""
    messages = [dict(m) for m in messages]
    dropped = {"docs": 0, "turns": 0}
    while True:
        ids, _ = render_conversation(tok, messages)
        if len(ids) + reserve <= max_len:
            return messages, ids, dropped
        last_docs = next((m for m in reversed(messages) if m["role"] == "documents" and m["content"]), None)
        user_turns = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if len(user_turns) > 1:  # older turns go before this turn's documents
            messages = messages[user_turns[1]:]
            dropped["turns"] += 1
        elif last_docs is not None:
            last_docs["content"] = last_docs["content"][:-1]
            dropped["docs"] += 1
        else:
            return None


def docs_tokens(tok, before, docs):
    """Tokens of documents `docs` appended after the documents `before`: numbered on from len(before) + 1,
    exactly as prepare.render_conversation renders them."""
    head, _ = render_conversation(tok, [{"role": "documents", "content": before}])
    full, _ = render_conversation(tok, [{"role": "documents", "content": before + docs}])
    return full[len(head):]


@torch.no_grad()
def generate(model, tok, messages, retrieve=None, top_k=4, max_hops=0, max_len=1024, max_new_tokens=64,
             temperature=0.0, generator=None, on_token=None, on_retrieve=None):
    """Runs the model on a conversation that ends with a user turn (and its documents, for RAG).
    The model answers (<|assistant_start|> ... <|assistant_end|>) or writes a query (<|query_start|> ...
    <|query_end|>); a query gets retrieve(query, top_k) -> ranked documents, appended as a documents message
    (numbering continues) and prefilled into the same cache in one chunk, and the model goes on. Stops at an
    answer, at a query beyond max_hops (or with no retrieve), at a malformed turn, at max_new_tokens in one turn,
    or at the context limit max_len (documents that do not fit are dropped, lowest-ranked first).
    on_token(piece, kind) streams text (kind "answer" | "query"); on_retrieve(query, docs) reports each hop.
    Returns dict(answer (str or None), stop ("answer" | "max_hops" | "format" | "max_tokens" | "context"),
    queries, docs (every document in context, in numbering order), messages, ids (the whole sequence),
    mask (1 on the tokens the model sampled), dropped ({"docs", "turns"} left out to fit))."""
    special = {name: tok.special(name) for name in tok.specials}
    start_of = {special["<|assistant_start|>"]: "answer", special["<|query_start|>"]: "query"}
    end_of = {"answer": special["<|assistant_end|>"], "query": special["<|query_end|>"]}
    device = next(model.parameters()).device
    r = {"answer": None, "stop": "context", "queries": [], "docs": [], "messages": list(messages), "ids": [],
         "mask": [], "dropped": {"docs": 0, "turns": 0}}
    fitted = fit(tok, messages, max_len, reserve=max_new_tokens)
    if fitted is None:
        return r
    messages, pending, r["dropped"] = fitted
    r.update(messages=messages, ids=list(pending), mask=[0] * len(pending),
             docs=[d for m in messages if m["role"] == "documents" for d in m["content"]])
    cache = model.init_cache(1, max_len)
    kind, content = None, []
    while True:
        if cache.pos + len(pending) > max_len:
            r["stop"] = "context"
            return r
        logits = model(torch.tensor([pending], device=device), cache=cache)[0][:, -1]
        t = sample_next(logits, temperature, generator=generator).item()
        r["ids"].append(t)
        r["mask"].append(1)
        pending = [t]
        if kind is None:  # a turn's first token says what it is
            kind = start_of.get(t)
            if kind is None:
                r["stop"] = "format"
                return r
        elif t == end_of[kind]:
            text = tok.decode(content).strip()
            if kind == "answer":
                r.update(answer=text, stop="answer", messages=messages + [{"role": "assistant", "content": text}])
                return r
            r["queries"].append(text)
            messages = messages + [{"role": "query", "content": text}]
            r["messages"] = messages
            if retrieve is None or len(r["queries"]) > max_hops:
                r["stop"] = "max_hops"
                return r
            docs = [doc_dict(d) for d in retrieve(text, top_k)]
            chunk = docs_tokens(tok, r["docs"], docs)
            while docs and cache.pos + 1 + len(chunk) + max_new_tokens > max_len:
                docs.pop()
                r["dropped"]["docs"] += 1
                chunk = docs_tokens(tok, r["docs"], docs)
            if on_retrieve:
                on_retrieve(text, docs)
            if docs:
                messages = messages + [{"role": "documents", "content": docs}]
                r.update(messages=messages, docs=r["docs"] + docs, ids=r["ids"] + chunk, mask=r["mask"] + [0] * len(chunk))
            pending = [t] + chunk  # the query's end token and the new documents, in one chunked prefill
            kind, content = None, []
        elif t in special.values():  # a special token inside a turn
            r["stop"] = "format"
            return r
        else:
            before = tok.decode(content)
            content.append(t)
            if on_token:
                piece = tok.decode(content)[len(before):]
                on_token(piece if before else piece.lstrip(" "), kind)  # less the space every message opens with
            if len(content) >= max_new_tokens:
                r["stop"] = "max_tokens"
                return r

def reread(model, tok, out, **kw):
    """Cite, then read: a single-shot answer (out, from generate) that cites exactly one of several documents is
    asked again with that document alone, and the new answer takes the old one's number. The model cites the
    document about the asked-about entity more often than it copies its fact from it (README: RAG), and it reads
    one document far better than several; when the cited document alone does not hold the answer, it abstains.
    kw: generate's options. -> out with answer and messages replaced (and "reread": the document's number)."""
    short, cites = read_answer(out["answer"] or "")
    docs = out["docs"]
    if out["stop"] != "answer" or out["queries"] or short is None or len(set(cites)) != 1 or len(docs) < 2 \
            or not 1 <= cites[0] <= len(docs):
        return out
    n = cites[0]
    question = next(m["content"] for m in reversed(out["messages"]) if m["role"] == "user")
    second = generate(model, tok, messages_for(question, [docs[n - 1]]), **kw)
    if second["stop"] != "answer":
        return out
    answer = CITATION.sub(f" [{n}]", second["answer"])
    return {**out, "answer": answer, "messages": out["messages"][:-1] + [{"role": "assistant", "content": answer}],
            "reread": n}

# -----------------------------------------------------------------------------
# can a base model read? python rag.py --reading out/tiny/ckpt.pt [data/world]

@torch.no_grad()
def reading_loss(model, tok, qas, by_id):
    """Loss per token of the answer to a question asked right after its gold document, in the pretraining format
    (prepare.reading_items), the entity given: a model that ignores the document pays the full price of every
    name (10+ nats a token), one that copies pays almost nothing on them. Before any RAG fine-tuning."""
    device = next(model.parameters()).device
    total, n = 0.0, 0
    for q in qas:
        d = by_id[q["gold_ids"][0]]
        prompt = tok.encode(f"{d.title}: {d.text}\nQuestion: {q['question']}\nAnswer: {q['entity']}")
        answer = tok.encode(answer_sentence(q)[len(q["entity"]):])
        ids = torch.tensor([[tok.bos_id] + prompt + answer], device=device)
        y = ids[:, 1:].clone()
        y[:, :len(prompt)] = -1
        total += model(ids[:, :-1], y, loss_reduction="none")[1].sum().item()
        n += len(answer)
    return total / n

# -----------------------------------------------------------------------------
# does a model pick the right document? python rag.py --choice CKPT [DATA_DIR]

def choice_items(qas, candidates, by_id, answers):
    """(qa, gold document, distractor, the distractor's answer): for each single-hop qa the first of its candidate
    documents that is about another entity and answers the same question type differently.
    answers: {(document id, question type): answer}."""
    items = []
    for q, docs in zip(qas, candidates):
        for d in docs:
            a = answers.get((d.id, q["type"]))
            if d.id not in q["gold_ids"] and a is not None and a != q["answer"]:
                items.append((q, by_id[q["gold_ids"][0]], d, a))
                break
    return items


@torch.no_grad()
def choice_accuracy(model, tok, items):
    """-> (whole, fact): shares of trials in which the model finds its answer from the gold document likelier than
    the same sentence with the distractor's fact, with only those two documents in context, each item tried with
    the gold document first and second. whole: the sentences as the model should write them, each citing the
    document its fact comes from; fact: only the tokens before the citation. 50% = no better than a coin; neither
    depends on sampling or on copying the rest of the sentence right."""
    device = next(model.parameters()).device

    def logps(msgs):  # log-probability of each assistant token
        ids, mask = render_conversation(tok, msgs)
        x = torch.tensor([ids[:-1]], device=device)
        y = torch.tensor([[t if m else -1 for t, m in zip(ids[1:], mask[1:])]], device=device)
        return [-v for v, m in zip(model(x, y, loss_reduction="none")[1].view(-1).tolist(), mask[1:]) if m]
    whole, fact = [], []
    for q, gold, other, other_answer in items:
        for docs in ([gold, other], [other, gold]):
            msgs = messages_for(q["question"], docs)
            scores = []
            for qa, d in ((q, gold), ({**q, "answer": other_answer}, other)):
                lp = logps(msgs + [{"role": "assistant", "content": answer_sentence(qa, cite=docs.index(d) + 1)}])
                n_fact = 1 + len(tok.encode(" " + answer_sentence(qa)[:-1]))  # <|assistant_start|>, the sentence
                scores.append((sum(lp), sum(lp[:n_fact])))
            whole.append(scores[0][0] > scores[1][0])
            fact.append(scores[0][1] > scores[1][1])
    n = max(1, len(whole))
    return sum(whole) / n, sum(fact) / n

# -----------------------------------------------------------------------------
# the accuracy-vs-k table and plot from rag_train.py's eval.json files:
#   python rag.py out/rag_T/eval.json out/rag_M/eval.json out/rag/eval.json --svg out/acc_vs_k.svg

def curves(results):
    """(index of its eval.json, label, params, {k: EM}, reread?) for each eval.json: one pass, and cite-then-read
    where it was measured."""
    out = []
    for i, r in enumerate(results):
        for key, label in (("vs_k", r["pattern"]), ("vs_k_reread", r["pattern"] + ", reread")):
            if key in r:
                out.append((i, label, r["params"], {int(k): s["em"] for k, s in r[key].items()}, key == "vs_k_reread"))
    return out


def vs_k_table(results):
    """Markdown table: a row per eval.json (and its cite-then-read sweep), EM (%) with k documents in context."""
    ks = sorted({int(k) for r in results for k in r["vs_k"]})
    lines = ["| model | params | " + " | ".join(f"k={k}" for k in ks) + " |", "|---|---|" + "---|" * len(ks)]
    for _, label, params, em, _ in curves(results):
        cells = [f"{100 * em[k]:.1f}" if k in em else "" for k in ks]
        lines.append(f"| {label} | {params:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def vs_k_svg(results, width=600, height=300, pad=50, legend=130):
    """A line per model (dashed: cite, then read): EM against k on a log2 axis. Plain SVG: no plotting library."""
    ks = sorted({int(k) for r in results for k in r["vs_k"]})
    x = lambda k: pad + (width - pad - legend) * (ks.index(k) / max(1, len(ks) - 1))
    y = lambda v: height - pad - (height - 2 * pad) * v
    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{width / 2}" y="20" text-anchor="middle">held-out exact match vs documents in context</text>']
    for v in (0, 0.25, 0.5, 0.75, 1.0):
        out.append(f'<line x1="{pad}" x2="{width - legend}" y1="{y(v)}" y2="{y(v)}" stroke="#ddd"/>'
                   f'<text x="{pad - 6}" y="{y(v) + 4}" text-anchor="end">{100 * v:.0f}%</text>')
    for k in ks:
        out.append(f'<text x="{x(k)}" y="{height - pad + 16}" text-anchor="middle">{k}</text>')
    out.append(f'<text x="{(width - legend + pad) / 2}" y="{height - 12}" text-anchor="middle">k (documents)</text>')
    for line, (i, label, _, em, reread) in enumerate(curves(results)):
        c, dash = colors[i % len(colors)], ' stroke-dasharray="5,3"' if reread else ""
        pts = [(x(k), y(v)) for k, v in em.items() if k in ks]
        out.append(f'<polyline fill="none" stroke="{c}" stroke-width="2"{dash} points="{" ".join(f"{a:.1f},{b:.1f}" for a, b in pts)}"/>')
        out += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{c}"/>' for a, b in pts]
        out.append(f'<text x="{width - legend + 8}" y="{pad + 16 * line}" fill="{c}">{label}</text>')
    return "\n".join(out + ["</svg>"])


if __name__ == "__main__":
    import json
    import sys
    args = sys.argv[1:]
    if args[:1] in (["--reading"], ["--choice"]) and len(args) in (2, 3):
        import random
        from common import load_checkpoint
        from model import GPT
        from prepare import Tokenizer
        from retrieve import BM25Retriever
        torch.set_num_threads(1)
        try:
            ckpt = load_checkpoint(args[1], "cpu")
            docs, by_id, qa = load_world(args[2] if len(args) == 3 else "data/world")
        except (OSError, ValueError) as e:
            sys.exit(f"error: {e}")
        model, tok = GPT.from_checkpoint(ckpt).eval(), Tokenizer.from_json(ckpt["tokenizer"])
        if args[0] == "--reading":
            qas = [q for q in qa["heldout"] if q["hops"] == 1 and answer_sentence(q).startswith(q["entity"])]
            qas = random.Random(0).sample(qas, min(100, len(qas)))
            print(f"reading loss: {reading_loss(model, tok, qas, by_id):.3f} nats per answer token "
                  f"({len(qas)} held-out questions, each right after its document)")
            sys.exit(0)
        rng = random.Random(0)
        qas = [q for q in qa["heldout"] if q["hops"] == 1]
        qas = rng.sample(qas, min(300, len(qas)))
        answers = {(q["gold_ids"][0], q["type"]): q["answer"] for s in qa.values() for q in s if q["hops"] == 1}
        bm25 = BM25Retriever()
        bm25.add_documents(docs)
        ranked = [[d for d, _ in hits] for hits in bm25.retrieve_batch([q["question"] for q in qas], 16)]
        heldout = [d for d in docs if d.metadata.get("world") == "heldout"]
        strangers = [[d for d in heldout if not set(d.title.split()) & set(by_id[q["gold_ids"][0]].title.split())] for q in qas]
        unrelated = [rng.sample(s, len(s)) for s in strangers]
        for name, candidates in (("BM25's best distractor (mostly a namesake)", ranked), ("an unrelated entity", unrelated)):
            items = choice_items(qas, candidates, by_id, answers)
            whole, fact = choice_accuracy(model, tok, items)
            print(f"gold document vs {name}: the model prefers the gold answer in {100 * whole:.1f}% of "
                  f"{2 * len(items)} trials, its fact alone (the tokens before the citation) in {100 * fact:.1f}% "
                  "(chance 50%)")
        sys.exit(0)
    svg = args.pop(args.index("--svg") + 1) if "--svg" in args else None
    args = [a for a in args if a != "--svg"]
    if not args:
        sys.exit("usage: python rag.py EVAL_JSON [EVAL_JSON ...] [--svg OUT.svg] | python rag.py --reading|--choice CKPT [DATA_DIR]")
    try:
        results = [json.load(open(p)) for p in args]
        if any("vs_k" not in r for r in results):
            raise ValueError("not an eval.json of rag_train.py (no vs_k)")
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    print(vs_k_table(results))
    if svg:
        with open(svg + ".tmp", "w") as f:
            f.write(vs_k_svg(results))
        os.replace(svg + ".tmp", svg)
        print(f"wrote {svg}")
