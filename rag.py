"""Retrieval-augmented generation on a data directory (prepare.py's layout), for rag_train.py, refrag_train.py and
chat.py: data, RAFT-style conversations (Zhang et al. 2024), SQuAD metrics, the generation loop, multi-hop RL."""
import math
import os
import re
import string
from collections import Counter

import torch

from common import autocast
from model import sample_next
from retrieve import load_documents, read_jsonl
from tokenizer import ABSTAIN, render_conversation

# -----------------------------------------------------------------------------
# data


def load_qa(path, by_id):
    """QA records of a JSONL file; every malformed line is a ValueError naming the file and line."""
    qas = []
    for lineno, r in read_jsonl(path):
        where = f"{path} line {lineno}"
        if not isinstance(r.get("question"), str) or not r["question"].strip():
            raise ValueError(f"{where}: missing or empty 'question'")
        if not isinstance(r.get("golden_answers"), list) or not all(isinstance(a, (str, int, float)) for a in r["golden_answers"]):
            raise ValueError(f"{where}: 'golden_answers' must be a list of answers ([] = unanswerable)")
        for key in ("gold_ids", "queries"):
            if key in r and (not isinstance(r[key], list) or not all(isinstance(v, (str, int)) for v in r[key])):
                raise ValueError(f"{where}: '{key}' must be a list of strings")
        r = {**r, "id": str(r.get("id", lineno)), "golden_answers": [str(a) for a in r["golden_answers"]]}
        if "gold_ids" in r:
            r["gold_ids"] = [str(g) for g in r["gold_ids"]]
            if missing := [g for g in r["gold_ids"] if g not in by_id]:
                raise ValueError(f"{where}: gold_ids entry {missing[0]!r} is not in the knowledge base")
        qas.append(r)
    return qas


def load_data(data_dir, splits=("train", "heldout")):
    """(kb documents, {id: document}, {split: QA records}); a missing, empty or malformed file is a ValueError."""
    kb = os.path.join(data_dir, "kb.jsonl")
    if not os.path.isfile(kb):
        raise ValueError(f"{kb} not found: a data directory holds kb.jsonl, qa_train.jsonl and qa_heldout.jsonl "
                         "(`python prepare.py` writes the synthetic world's)")
    docs = load_documents(kb)
    if not docs:
        raise ValueError(f"{kb}: the knowledge base is empty")
    by_id, qa = {d.id: d for d in docs}, {}
    for split in splits + ("closed",):
        path = os.path.join(data_dir, f"qa_{split}.jsonl")
        if split != "closed" or os.path.isfile(path):  # qa_closed.jsonl is optional
            qa[split] = load_qa(path, by_id)
        if split != "closed" and not qa[split]:
            raise ValueError(f"{path}: no questions")
    # a held-out set about other documents than these is a mix-up, not an evaluation
    answerable = [q for q in qa.get("heldout", []) if q["golden_answers"]]
    if answerable and not any("gold_ids" in q for q in answerable) and len(docs) <= 200_000:  # a Wikipedia is too big
        text = " " + " ".join(normalize(d.title + " " + d.text) for d in docs) + " "
        if not any(f" {normalize(a)} " in text for q in answerable[:1000] for a in q["golden_answers"]):
            raise ValueError(f"{data_dir}/qa_heldout.jsonl: no golden answer occurs in {kb}: the held-out set "
                             "shares no document with the knowledge base")
    return docs, by_id, qa


def doc_dict(d):
    """retrieve.Document or dict -> {"id", "title", "text"}."""
    d = d if isinstance(d, dict) else vars(d)
    return {"id": str(d.get("id", "")), "title": d.get("title", ""), "text": d["text"]}


def single_hop(qa):
    """Answerable from one document (or unanswerable): what single-shot RAG trains and is evaluated on."""
    return len(qa.get("gold_ids", [])) <= 1


def is_gold(qa, doc):
    """doc supports qa: one of its gold_ids, or, when the record names none, it contains a golden answer."""
    return doc_dict(doc)["id"] in qa["gold_ids"] if "gold_ids" in qa else doc_holds(doc, qa["golden_answers"])


def has_gold(qa, docs):
    """The documents hold qa's answer: all its gold documents, or (without gold_ids) one containing a golden answer."""
    if "gold_ids" in qa:
        return bool(qa["gold_ids"]) and set(qa["gold_ids"]) <= {doc_dict(d)["id"] for d in docs}
    return bool(qa["golden_answers"]) and any(is_gold(qa, d) for d in docs)


def with_citation(text, n):
    """'The answer.' -> 'The answer [n].'; 'answer' -> 'answer [n]'."""
    return f"{text[:-1]} [{n}]." if text.endswith(".") else f"{text} [{n}]"


def target_answer(qa, docs):
    """The answer (citing the gold document, the chain's last, unless docs is None), or ABSTAIN if docs lack it."""
    if not qa["golden_answers"] or (docs is not None and not has_gold(qa, docs)):
        return ABSTAIN
    answer = qa.get("response") or qa["golden_answers"][0]
    if docs is None:
        return answer
    if "gold_ids" in qa:
        return with_citation(answer, [doc_dict(d)["id"] for d in docs].index(qa["gold_ids"][-1]) + 1)
    return with_citation(answer, next(i for i, d in enumerate(docs) if is_gold(qa, d)) + 1)


def messages_for(question, docs=None, answer=None):
    """[user question, documents, answer]: the question first, so a recurrent model reads knowing what to look for."""
    msgs = [{"role": "user", "content": question}]
    if docs:
        msgs.append({"role": "documents", "content": [doc_dict(d) for d in docs]})
    if answer is not None:
        msgs.append({"role": "assistant", "content": answer})
    return msgs


def render_example(tok, qa, docs=None):
    """(ids, mask) of a training conversation for qa with these documents (None = closed-book)."""
    return render_conversation(tok, messages_for(qa["question"], docs, target_answer(qa, docs)))


def raft_docs(qa, retrieved, by_id, rng, k, p_no_gold, pool=()):
    """k shuffled documents, RAFT-style: the gold ones (dropped with probability p_no_gold) and the best distractors."""
    if "gold_ids" in qa:
        gold = [by_id[g] for g in qa["gold_ids"] if g in by_id]
    else:
        gold = [d for d in retrieved if is_gold(qa, d)][:1]
    gold = gold[:k] if rng.random() >= p_no_gold else []
    distractors = [d for d in retrieved if not is_gold(qa, d)][:k - len(gold)]
    if len(gold) + len(distractors) < k and pool:  # a sparse retriever ranks only documents sharing a word: top up
        seen = {doc_dict(d)["id"] for d in retrieved + gold}
        drawn = rng.sample(pool, min(len(pool), k + len(seen)))  # enough that k - len(gold) are neither gold nor seen
        distractors += [d for d in drawn if not is_gold(qa, d) and doc_dict(d)["id"] not in seen][:k - len(gold) - len(distractors)]
    docs = gold + distractors
    rng.shuffle(docs)
    return docs


def draw_k(rng, k_max, k_power=0.0):
    """k in 1..k_max with P(k) ~ k ** -k_power: 0 is uniform; 1 gives every k the same share of tokens."""
    if not k_power:
        return rng.randint(1, k_max)  # the uniform draw keeps the random stream of runs made before k_power existed
    return rng.choices(range(1, k_max + 1), [k ** -k_power for k in range(1, k_max + 1)])[0]


def out_of_world_example(tok, rng, qas, search, k_max, k_power=0.0):
    """(ids, mask) of a real-world question of qas (world.out_of_world's) over the world's KB: it abstains."""
    qa = rng.choice(qas)
    return render_example(tok, qa, search(qa["question"])[:draw_k(rng, k_max, k_power)])


def pack(next_example, rows, seq_len):
    """(x, y), rows x seq_len, of next_example()'s (ids, mask) packed greedily; one that does not fit is dropped."""
    convs = []
    for _ in range(rows):
        ids, mask = [], []
        while len(ids) < seq_len + 1:
            e_ids, e_mask = next_example()
            if ids and len(ids) + len(e_ids) > seq_len + 1:
                break
            ids, mask = ids + e_ids, mask + e_mask
        convs.append((ids[:seq_len + 1], mask[:seq_len + 1]))
    return padded(convs, seq_len)

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
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall) if common else 0.0


def read_answer(text, qa=None, any_name=False):
    """(short answer or None = abstained, cited numbers): where qa's "response" has its golden answer, if the rest
    matches (any_name: whatever it calls the "entity"), else the text without citations."""
    cites = [int(c) for c in CITATION.findall(text)]
    sentence = CITATION.sub("", text).strip()
    if normalize(sentence) == normalize(ABSTAIN):
        return None, cites
    if qa is not None and qa.get("response") and qa["golden_answers"]:
        head, _, tail = map(re.escape, qa["response"].rpartition(qa["golden_answers"][0]))
        if any_name and qa.get("entity"):
            head = head.replace(re.escape(qa["entity"]), ".+?")
        if m := re.fullmatch(f"{head}(.+){tail}", sentence):
            return m.group(1), cites
    return sentence, cites


def doc_holds(doc, answers):
    """doc's title or text contains one of the answers (SQuAD-normalised, whole words)."""
    d = doc_dict(doc)
    text = f" {normalize(d['title'] + ' ' + d['text'])} "
    return any(normalize(a) and f" {normalize(a)} " in text for a in ([answers] if isinstance(answers, str) else answers))


def score(qa, text, docs=None):
    """Metrics of one answer (None: a wrong one), docs in context (None = closed-book): right is a golden answer when
    knowable, else abstaining; em_answer: the answer slot alone; citation_ok/_gold: cited documents hold it/are gold."""
    text = text or "<no answer>"
    short, cites = read_answer(text, qa)
    gold = qa["golden_answers"] if docs is None or has_gold(qa, docs) else []
    # s None = abstained: right only when nothing in context answers it
    em_of = lambda s: float(s is None and not gold) if s is None or not gold else max(exact_match(s, g) for g in gold)
    em = em_of(short)
    r = {"em": em, "em_answer": em_of(read_answer(text, qa, any_name=True)[0]),
         "f1": max(token_f1(short or "", g) for g in gold or [""]), "abstained": float(short is None),
         "hallucinated": float(short is not None and (not gold or not em))}
    if docs is not None and short is not None:
        inside = lambda c: 1 <= c <= len(docs)
        r["citation_ok"] = float(bool(cites) and all(inside(c) and doc_holds(docs[c - 1], qa["golden_answers"]) for c in cites))
        r["citation_gold"] = float(bool(cites) and all(inside(c) and is_gold(qa, docs[c - 1]) for c in cites))
        # a wrong answer that another document in context states: read from the wrong document, not made up
        r["distracted"] = float(bool(r["hallucinated"]) and any(doc_holds(d, short) for d in docs))
    return r


def summarize(rows):
    """Means of every metric over the rows that have it, plus n."""
    vals = {k: [r[k] for r in rows if k in r] for k in sorted({k for r in rows for k in r})}
    return {"n": len(rows), **{k: sum(v) / len(v) for k, v in vals.items()}}

# -----------------------------------------------------------------------------
# the generation loop

def fit(tok, messages, max_len, reserve):
    """Drops old turns, then the last documents' worst, to free `reserve` tokens: (messages, ids, dropped) or None."""
    messages, dropped = [dict(m) for m in messages], {"docs": 0, "turns": 0}
    while len(ids := render_conversation(tok, messages)[0]) + reserve > max_len:
        user_turns = [i for i, m in enumerate(messages) if m["role"] == "user"]
        if len(user_turns) > 1:  # older turns go before this turn's documents
            messages = messages[user_turns[1]:]
            dropped["turns"] += 1
        elif last_docs := next((m for m in reversed(messages) if m["role"] == "documents" and m["content"]), None):
            last_docs["content"] = last_docs["content"][:-1]
            dropped["docs"] += 1
        else:
            return None
    return messages, ids, dropped


def docs_tokens(tok, before, docs):
    """Tokens of `docs` rendered after the documents `before`, numbered on from len(before) + 1."""
    head, _ = render_conversation(tok, [{"role": "documents", "content": before}])
    full, _ = render_conversation(tok, [{"role": "documents", "content": before + docs}])
    return full[len(head):]


@torch.no_grad()
def generate(model, tok, messages, retrieve=None, top_k=4, max_hops=0, max_len=1024, max_new_tokens=64,
             temperature=0.0, generator=None, on_token=None, on_retrieve=None):
    """Answers a conversation ending with a user turn, prefilling a query's retrieve(query, top_k) documents as it goes.
    -> dict(answer, stop (answer|max_hops|format|max_tokens|context), queries, docs, messages, ids, mask, dropped)."""
    start_of = {tok.special("<|assistant_start|>"): "answer", tok.special("<|query_start|>"): "query"}
    end_of = {"answer": tok.special("<|assistant_end|>"), "query": tok.special("<|query_end|>")}
    device = next(model.parameters()).device
    r = {"answer": None, "stop": "context", "queries": [], "docs": [], "messages": list(messages), "ids": [],
         "mask": [], "dropped": {"docs": 0, "turns": 0}}
    if (fitted := fit(tok, messages, max_len, reserve=max_new_tokens)) is None:
        return r
    r["messages"], pending, r["dropped"] = fitted
    r.update(ids=list(pending), mask=[0] * len(pending),
             docs=[d for m in r["messages"] if m["role"] == "documents" for d in m["content"]])
    cache = model.init_cache(1, max_len)
    kind, content = None, []
    while cache.pos + len(pending) <= max_len:  # else stop: "context"
        logits = model(torch.tensor([pending], device=device), cache=cache)[0][:, -1]
        t = sample_next(logits, temperature, generator=generator).item()
        r["ids"].append(t)
        r["mask"].append(1)
        pending = [t]
        if kind is None:  # a turn's first token says what it is
            kind = start_of.get(t)
            if kind is None:
                return {**r, "stop": "format"}
        elif t == end_of[kind]:
            text = tok.decode(content).strip()
            r["messages"] = r["messages"] + [{"role": "assistant" if kind == "answer" else "query", "content": text}]
            if kind == "answer":
                return {**r, "answer": text, "stop": "answer"}
            r["queries"].append(text)
            if retrieve is None or len(r["queries"]) > max_hops:
                return {**r, "stop": "max_hops"}
            docs = [doc_dict(d) for d in retrieve(text, top_k)]
            while docs and cache.pos + 1 + len(docs_tokens(tok, r["docs"], docs)) + max_new_tokens > max_len:
                docs.pop()
                r["dropped"]["docs"] += 1
            chunk = docs_tokens(tok, r["docs"], docs)
            if on_retrieve:
                on_retrieve(text, docs)
            if docs:
                r.update(messages=r["messages"] + [{"role": "documents", "content": docs}], docs=r["docs"] + docs,
                         ids=r["ids"] + chunk, mask=r["mask"] + [0] * len(chunk))
            pending = [t] + chunk  # the query's end token and the new documents, in one chunked prefill
            kind, content = None, []
        elif t in tok.special_ids.values():  # a special token inside a turn
            return {**r, "stop": "format"}
        else:
            before = tok.decode(content)
            content.append(t)
            if on_token:
                piece = tok.decode(content)[len(before):]
                on_token(piece if before else piece.lstrip(" "), kind)  # less the space every message opens with
            if len(content) >= max_new_tokens:
                return {**r, "stop": "max_tokens"}
    return r


def cited(answer, n):  # the one number in 1..n the answer cites; None if it abstains or cites none, several, or others
    short, cites = read_answer(answer or "")
    return cites[0] if short is not None and len(set(cites)) == 1 and 1 <= cites[0] <= n else None


def knockout(model, tok, head, docs, group, **kw):
    """The document the model cites (or None) reading docs `group` at a time after head, then the cited ones, and on."""
    left = list(range(len(docs)))  # each read no longer than the contexts the model was trained on
    while len(left) > 1:
        won = []
        for part in (left[i:i + group] for i in range(0, len(left), group)):
            o = generate(model, tok, head + [{"role": "documents", "content": [docs[j] for j in part]}], **kw)
            if o["stop"] == "answer" and (n := cited(o["answer"], len(part))):
                won.append(part[n - 1])
        left = won
    return left[0] + 1 if left else None


def reread(model, tok, out, group=4, **kw):
    """Cite, then read: an answer (generate's out) citing one of several documents (knockout's, past `group`) is asked
    again with that document alone, which a model reads far better, and takes its number ("reread"). kw: generate's."""
    msgs, docs = out["messages"], out["docs"]
    if out["stop"] != "answer" or out["queries"] or len(docs) < 2:
        return out
    head = msgs[:max(i for i, m in enumerate(msgs) if m["role"] == "user") + 1]
    n = knockout(model, tok, head, docs, group, **kw) if 1 < group < len(docs) else cited(out["answer"], len(docs))
    if n is None:
        return out
    second = generate(model, tok, head + [{"role": "documents", "content": [docs[n - 1]]}], **kw)
    if second["stop"] != "answer":
        return out
    answer = CITATION.sub(f" [{n}]", second["answer"])
    return {**out, "answer": answer, "messages": msgs[:-1] + [{"role": "assistant", "content": answer}], "reread": n}

# -----------------------------------------------------------------------------
# a conversation, as chat.py holds it and rag_train.py evaluates it

PRONOUN = re.compile(r"\b(he|she|it|they|him|her|his|its|them|their|there|that (company|city|country|person|one))\b", re.I)


def search_query(question, topic):
    """What is retrieved: a pronoun follow-up together with topic, the last question that named what "he" is."""
    return f"{topic} {question}" if topic and PRONOUN.search(question) else question


def text_only(messages):
    """A conversation as the next turn sees it: questions and answers, without documents, queries and citations."""
    # without citations: a model trained on up to 4 documents cited stale ones numbered [5] and on
    return [{"role": m["role"], "content": CITATION.sub("", m["content"])}
            for m in messages if m["role"] in ("user", "assistant")]


def ask(model, tok, question, history=(), topic=None, retrieve=None, top_k=4, check=True, max_hops=0, **kw):
    """One turn after history (text_only's), then if check cite-then-read. kw: generate's. -> (first pass, final)."""
    docs = retrieve(search_query(question, topic), top_k) if retrieve else None
    first = generate(model, tok, list(history) + messages_for(question, docs), retrieve=retrieve, top_k=top_k,
                     max_hops=max_hops, **kw)
    kw = {k: v for k, v in kw.items() if k not in ("on_token", "on_retrieve")}
    return first, reread(model, tok, first, **kw) if check else first

# -----------------------------------------------------------------------------
# multi-hop RL: rollout, reward, policy gradient
# (refrag_train.py; with the gold query chains its warm start imitates and the renamed worlds both phases train in)

def chain_messages(qa, retrieve, by_id, top_k):
    """The gold conversation, IRCoT-style: the question, its documents, each missing step's query and documents."""
    docs = [doc_dict(d) for d in retrieve(qa["question"], top_k)]
    messages, seen = messages_for(qa["question"], docs), list(docs)
    for query, doc_id in zip(qa.get("queries", []), qa.get("gold_ids", [])):
        if doc_id in {d["id"] for d in seen}:
            continue  # its document is already in context: read it, do not ask for it
        found = [doc_dict(d) for d in retrieve(query, top_k)]
        if doc_id not in {d["id"] for d in found}:
            found[-1] = doc_dict(by_id[doc_id])  # imitate queries that work: their document is found
        messages += [{"role": "query", "content": query}, {"role": "documents", "content": found}]
        seen += found
    return messages + [{"role": "assistant", "content": target_answer(qa, seen)}]


def rollout(model, tok, qa, retrieve, top_k, max_hops, **kw):
    """One pass of the loop: the question's documents, up to max_hops queries, the answer. kw: generate's."""
    return ask(model, tok, qa["question"], retrieve=retrieve, top_k=top_k, check=False, max_hops=max_hops, **kw)[0]


def reward(qa, out, w_em, w_f1, w_cite, w_format, w_hop):
    """(reward, parts) of a rollout as Search-R1: EM, F1 of the true answer, citation, malformed answer, queries."""
    outcome = score(qa, out["answer"], None)  # closed-book scoring: the right answer, wherever it came from
    parts = {"em": outcome["em"], "cite": score(qa, out["answer"], out["docs"]).get("citation_ok", 0.0),
             "format": float(out["stop"] != "answer"), "hops": len(out["queries"])}
    return w_em * parts["em"] + w_f1 * outcome["f1"] + w_cite * parts["cite"] - w_format * parts["format"] \
        - w_hop * parts["hops"], parts


def padded(convs, width=None):
    """(ids, mask) conversations -> x, y, `width` (or the longest) columns; y is -1 where mask is 0 and past the end."""
    T = width or max(len(ids) for ids, _ in convs) - 1
    x = torch.zeros(len(convs), T, dtype=torch.long)
    y = torch.full((len(convs), T), -1, dtype=torch.long)
    for i, (ids, mask) in enumerate(convs):
        x[i, :len(ids) - 1] = torch.tensor(ids[:-1])
        y[i, :len(ids) - 1] = torch.tensor([t if m else -1 for t, m in zip(ids[1:], mask[1:])])
    return x, y


def pg_loss(model, outs, rewards, device="cpu", ref=None, kl_coef=0.0):
    """-mean over sampled tokens of (reward - group mean) * log p, as nanochat's chat_rl; + kl_coef * KL to ref (k3)."""
    x, y = (t.to(device) for t in padded([(o["ids"], o["mask"]) for o in outs]))
    r = torch.tensor(rewards, dtype=torch.float32)
    with autocast(device):
        _, nll = model(x, y, loss_reduction="none")  # (G, T) = -log p, 0 where y is -1
    loss = nll * (r - r.mean()).to(device)[:, None]
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
