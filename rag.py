"""
Retrieval-augmented generation on any data directory (prepare.py's layout), shared by rag_train.py,
refrag_train.py and chat.py:

- data: kb.jsonl and FlashRAG-style QA files ({"id", "question", "golden_answers", "gold_ids"?, "queries"?}),
  checked line by line before any training starts
- conversations: a question, the documents in context (numbered [1..k] across the whole conversation), and the
  answer the model should give: the short answer (or the record's "response" sentence) citing the document that
  holds it, or tokenizer.ABSTAIN
- RAFT-style examples (Zhang et al. 2024): the gold document at a random position among retrieved distractors,
  and a share of examples with the gold document removed, where the right answer is to abstain. The gold documents
  are the record's gold_ids or, when it names none, the retrieved documents that contain a golden answer.
- metrics: SQuAD exact match and token F1 against the best golden answer, hallucination, abstention, citations
- the generation loop: the model answers, or writes a query that the loop retrieves documents for, appends
  (chunked prefill into the same cache) and continues, until an answer, max_hops, or the context limit;
  then, optionally, cite-then-read: the answer is asked again with the one document it cites
- multi-hop RL (refrag_train.py): the gold query chains of the warm start, rollouts through the loop, their
  reward, and the policy-gradient loss

How an answer is read: citations "[n]" are taken out; what is left must be ABSTAIN (an abstention) or a definite
answer. When the record has a "response" (an answer sentence, as the world's), the short answer is the part of
the sentence where the response has its golden answer, if the rest matches; otherwise the whole text is the answer.
"""
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
            missing = [g for g in r["gold_ids"] if g not in by_id]
            if missing:
                raise ValueError(f"{where}: gold_ids entry {missing[0]!r} is not in the knowledge base")
        qas.append(r)
    return qas


def load_data(data_dir, splits=("train", "heldout")):
    """(kb documents, {id: document}, {split: QA records}) of a data directory; qa_closed.jsonl is optional (the
    world's closed-book questions). A missing, empty or malformed file is a ValueError naming it."""
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
        if split != "closed" or os.path.isfile(path):
            if not os.path.isfile(path):
                raise ValueError(f"{path} not found")
            qa[split] = load_qa(path, by_id)
            if not qa[split] and split != "closed":
                raise ValueError(f"{path}: no questions")
    if "heldout" in qa:  # a held-out set about other documents than these is a mix-up, not an evaluation
        answers = [q["golden_answers"] for q in qa["heldout"] if q["golden_answers"] and "gold_ids" not in q]
        if answers and len(answers) == len([q for q in qa["heldout"] if q["golden_answers"]]) and len(docs) <= 200_000:
            text = " " + " ".join(normalize(d.title + " " + d.text) for d in docs) + " "  # a Wikipedia is too big
            if not any(f" {normalize(a)} " in text for g in answers[:1000] for a in g):
                raise ValueError(f"{data_dir}/qa_heldout.jsonl: no golden answer occurs in {kb}: the held-out set "
                                 "shares no document with the knowledge base")
    return docs, by_id, qa


def doc_dict(d):
    """retrieve.Document or dict -> {"id", "title", "text"}."""
    if isinstance(d, dict):
        return {"id": str(d.get("id", "")), "title": d.get("title", ""), "text": d["text"]}
    return {"id": d.id, "title": d.title, "text": d.text}


def single_hop(qa):
    """Answerable from one document (or unanswerable): what single-shot RAG trains and is evaluated on."""
    return len(qa.get("gold_ids", [])) <= 1


def is_gold(qa, doc):
    """doc supports qa: one of its gold_ids, or, when the record names none, it contains a golden answer."""
    return doc_dict(doc)["id"] in qa["gold_ids"] if "gold_ids" in qa else doc_holds(doc, qa["golden_answers"])


def has_gold(qa, docs):
    """True when the documents hold qa's answer: every gold document is among them (single-shot can answer only
    then), or, without gold_ids, one of them contains a golden answer."""
    if "gold_ids" in qa:
        ids = {doc_dict(d)["id"] for d in docs}
        return bool(qa["gold_ids"]) and all(g in ids for g in qa["gold_ids"])
    return bool(qa["golden_answers"]) and any(is_gold(qa, d) for d in docs)


def with_citation(text, n):
    """'The answer.' -> 'The answer [n].'; 'answer' -> 'answer [n]'."""
    return f"{text[:-1]} [{n}]." if text.endswith(".") else f"{text} [{n}]"


def target_answer(qa, docs):
    """What the model should say: closed-book (docs None) the answer; with documents the answer citing the
    document that holds it (the last of the chain), or ABSTAIN when the documents do not hold it."""
    if not qa["golden_answers"] or (docs is not None and not has_gold(qa, docs)):
        return ABSTAIN
    answer = qa.get("response") or qa["golden_answers"][0]
    if docs is None:
        return answer
    gold = [i for i, d in enumerate(docs) if is_gold(qa, d)]
    if "gold_ids" in qa:
        gold = [[doc_dict(d)["id"] for d in docs].index(qa["gold_ids"][-1])]
    return with_citation(answer, gold[0] + 1)


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


def raft_docs(qa, retrieved, by_id, rng, k, p_no_gold, pool=()):
    """k documents for qa, RAFT-style: the gold ones (dropped with probability p_no_gold) and the best-ranked
    retrieved distractors, shuffled so the gold position varies. retrieved: ranked Documents; by_id: id -> Document.
    Without gold_ids the gold document is the best-ranked retrieved one that contains a golden answer. A sparse
    retriever ranks only documents sharing a word with the question, so a short ranking is topped up with random
    distractors from pool (the documents training may show)."""
    if "gold_ids" in qa:
        gold = [by_id[g] for g in qa["gold_ids"] if g in by_id]
    else:
        gold = [d for d in retrieved if is_gold(qa, d)][:1]
    gold = gold[:k] if rng.random() >= p_no_gold else []
    distractors = [d for d in retrieved if not is_gold(qa, d)][:k - len(gold)]
    if len(gold) + len(distractors) < k and pool:
        seen = {doc_dict(d)["id"] for d in retrieved + gold}
        drawn = rng.sample(pool, min(len(pool), k + len(seen)))  # enough that k - len(gold) are neither gold nor seen
        distractors += [d for d in drawn if not is_gold(qa, d) and doc_dict(d)["id"] not in seen][:k - len(gold) - len(distractors)]
    docs = gold + distractors
    rng.shuffle(docs)
    return docs


def draw_k(rng, k_max, k_power=0.0):
    """Documents for one example, k in 1..k_max with probability proportional to k ** -k_power: 0 is uniform; 1 gives
    every k the same share of tokens, so long contexts do not crowd out the one-document examples that teach reading."""
    if not k_power:
        return rng.randint(1, k_max)  # the uniform draw keeps the random stream of runs made before k_power existed
    return rng.choices(range(1, k_max + 1), [k ** -k_power for k in range(1, k_max + 1)])[0]


def out_of_world_example(tok, rng, qas, search, k_max, k_power=0.0):
    """(ids, mask) of a question of qas (world.out_of_world's: a real person, company, city, country or fact) over
    the world's KB, search(query) -> ranked Documents: the best hits share only its question words ("capital"), and
    the answer is to abstain."""
    qa = rng.choice(qas)
    return render_example(tok, qa, search(qa["question"])[:draw_k(rng, k_max, k_power)])


def pack(next_example, rows, seq_len):
    """(x, y), rows x seq_len: conversations (next_example() -> (ids, mask)) packed greedily, the rest padded;
    y is the next token where the mask is 1, else -1 (no loss). An example that does not fit is lost, not carried
    over, so that rows stay independent of each other."""
    x = torch.zeros(rows, seq_len, dtype=torch.long)
    y = torch.full((rows, seq_len), -1, dtype=torch.long)
    for row in range(rows):
        ids, mask = [], []
        while len(ids) < seq_len + 1:
            e_ids, e_mask = next_example()
            if ids and len(ids) + len(e_ids) > seq_len + 1:
                break
            ids, mask = ids + e_ids, mask + e_mask
        ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
        x[row, :len(ids) - 1] = torch.tensor(ids[:-1])
        y[row, :len(ids) - 1] = torch.tensor([t if m else -1 for t, m in zip(ids[1:], mask[1:])])
    return x, y

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
    """(short answer, cited numbers) of a model's answer; short answer None = abstained. With a record that has an
    answer sentence ("response"), the short answer is what stands where the response has its golden answer, when
    the rest of the sentence matches (any_name: whatever the sentence calls the record's "entity"); else the text."""
    cites = [int(c) for c in CITATION.findall(text)]
    sentence = CITATION.sub("", text).strip()
    if normalize(sentence) == normalize(ABSTAIN):
        return None, cites
    if qa is not None and qa.get("response") and qa["golden_answers"]:
        head, _, tail = qa["response"].rpartition(qa["golden_answers"][0])
        head, tail = re.escape(head), re.escape(tail)
        if any_name and qa.get("entity"):
            head = head.replace(re.escape(qa["entity"]), ".+?")
        m = re.fullmatch(f"{head}(.+){tail}", sentence)
        if m:
            return m.group(1), cites
    return sentence, cites


def doc_holds(doc, answers):
    """doc's title or text contains one of the answers (SQuAD-normalised, whole words)."""
    d = doc_dict(doc)
    text = f" {normalize(d['title'] + ' ' + d['text'])} "
    return any(normalize(a) and f" {normalize(a)} " in text for a in ([answers] if isinstance(answers, str) else answers))


def score(qa, text, docs=None):
    """Scores one answer (text None = the model gave none: counts as a wrong definite answer).
    docs: the documents that were in context, in numbering order (None = closed-book).
    The expected answer is one of qa's golden answers when it is knowable (closed-book, or its gold documents are in
    context), else abstaining. em / f1: the best over the golden answers. hallucinated = a definite answer that is
    wrong, or any definite answer where abstaining is right. em_answer = em of the answer slot alone, SQuAD's
    answer-span convention: the name the sentence restates may be misspelt. citation_ok = every cited number points
    to a document containing a golden answer; citation_gold = to a gold document. distracted = a hallucinated answer
    that some document in context states (a distractor's fact)."""
    text = text or "<no answer>"
    short, cites = read_answer(text, qa)
    gold = qa["golden_answers"] if docs is None or has_gold(qa, docs) else []
    best = lambda f, s: max(f(s, g) for g in gold)
    em_of = lambda s: float(s is None) if not gold else 0.0 if s is None else best(exact_match, s)  # None = abstained
    em = em_of(short)
    r = {"em": em, "em_answer": em_of(read_answer(text, qa, any_name=True)[0]),
         "f1": token_f1(short or "", "") if not gold else best(token_f1, short or ""), "abstained": float(short is None),
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
    exactly as tokenizer.render_conversation renders them."""
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

def knockout(model, tok, head, docs, group, **kw):
    """The number of the document the model cites when it reads docs `group` at a time, then the cited ones
    together, round after round until one is left; None if it cites none. head: the conversation up to the user
    turn. Each read is as long as the contexts the model reads best, whatever the number of documents."""
    left = list(range(len(docs)))
    while len(left) > 1:
        won = []
        for part in (left[i:i + group] for i in range(0, len(left), group)):
            o = generate(model, tok, head + [{"role": "documents", "content": [docs[j] for j in part]}], **kw)
            short, cites = read_answer(o["answer"] or "")
            if o["stop"] == "answer" and short is not None and len(set(cites)) == 1 and 1 <= cites[0] <= len(part):
                won.append(part[cites[0] - 1])
        left = won
    return left[0] + 1 if left else None


def reread(model, tok, out, group=4, **kw):
    """Cite, then read: a single-shot answer (out, from generate) that cites exactly one of several documents is
    asked again with that document alone, after the same earlier turns, and the new answer takes the old one's
    number. The model cites the document about the asked-about entity more often than it copies its fact from it
    (README: RAG), and it reads one document far better than several; when the cited document alone does not hold
    the answer, it abstains. With more than `group` documents the citation comes from knockout instead, as models
    trained on a few documents cite among many poorly. kw: generate's options. -> out with answer and messages
    replaced (and "reread": the document's number)."""
    msgs, docs = out["messages"], out["docs"]
    short, cites = read_answer(out["answer"] or "")
    if out["stop"] != "answer" or out["queries"] or len(docs) < 2:
        return out
    last = max(i for i, m in enumerate(msgs) if m["role"] == "user")
    if group > 1 and len(docs) > group:
        n = knockout(model, tok, msgs[:last + 1], docs, group, **kw)
    else:
        n = cites[0] if short is not None and len(set(cites)) == 1 and 1 <= cites[0] <= len(docs) else None
    if n is None:
        return out
    second = generate(model, tok, msgs[:last + 1] + [{"role": "documents", "content": [docs[n - 1]]}], **kw)
    if second["stop"] != "answer":
        return out
    answer = CITATION.sub(f" [{n}]", second["answer"])
    return {**out, "answer": answer, "messages": msgs[:-1] + [{"role": "assistant", "content": answer}], "reread": n}

# -----------------------------------------------------------------------------
# a conversation, as chat.py holds it and rag_train.py evaluates it

PRONOUN = re.compile(r"\b(he|she|it|they|him|her|his|its|them|their|there|that (company|city|country|person|one))\b", re.I)


def search_query(question, topic):
    """What is retrieved for a question: a follow-up that refers back with a pronoun is searched together with
    topic, the conversation's last question without one (its words name what "he" or "it" is)."""
    return f"{topic} {question}" if topic and PRONOUN.search(question) else question


def text_only(messages):
    """A conversation as the next turn sees it: questions and answers, without documents, queries and citations
    (a model trained on up to 4 documents cited stale ones numbered [5] and on)."""
    return [{"role": m["role"], "content": CITATION.sub("", m["content"])}
            for m in messages if m["role"] in ("user", "assistant")]


def ask(model, tok, question, history=(), topic=None, retrieve=None, top_k=4, check=True, max_hops=0, **kw):
    """One turn: retrieve for the question in its conversation, answer after the earlier turns (history, from
    text_only), then, if check, cite-then-read. kw: generate's. -> (first pass, final), generate outputs."""
    docs = retrieve(search_query(question, topic), top_k) if retrieve else None
    first = generate(model, tok, list(history) + messages_for(question, docs), retrieve=retrieve, top_k=top_k,
                     max_hops=max_hops, **kw)
    kw = {k: v for k, v in kw.items() if k not in ("on_token", "on_retrieve")}
    return first, reread(model, tok, first, **kw) if check else first

# -----------------------------------------------------------------------------
# multi-hop RL: rollout, reward, policy gradient
# (refrag_train.py; with the gold query chains its warm start imitates and the renamed worlds both phases train in)

def chain_messages(qa, retrieve, by_id, top_k):
    """The gold conversation of a training question, interleaved with retrieval as in IRCoT: the question and the
    documents retrieved for it, then for each chain step whose document is not in context yet its query and the
    documents retrieved for it (the gold one made sure of), then the answer citing the last gold document.
    retrieve(query, k) -> ranked docs; by_id: id -> doc."""
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
    """One pass of the loop on a question: the documents retrieved on it, then up to max_hops queries, then the
    answer. kw: generate's (max_len, max_new_tokens, temperature, generator)."""
    docs = retrieve(qa["question"], top_k)
    return generate(model, tok, messages_for(qa["question"], docs), retrieve=retrieve, top_k=top_k, max_hops=max_hops, **kw)


def reward(qa, out, w_em, w_f1, w_cite, w_format, w_hop):
    """(reward, parts) of one rollout, weighted as Search-R1: EM and token F1 of the outcome, citation, format (no
    well-formed answer), queries. EM is against the true answer (the KB holds it, whatever the model found; for an
    unanswerable question abstaining is the answer); citation: the cited documents hold the answer."""
    outcome = score(qa, out["answer"], None)  # closed-book scoring: the right answer, wherever it came from
    em, f1 = outcome["em"], outcome["f1"]
    cite = score(qa, out["answer"], out["docs"]).get("citation_ok", 0.0)
    fmt = float(out["stop"] != "answer")
    hops = len(out["queries"])
    return w_em * em + w_f1 * f1 + w_cite * cite - w_format * fmt - w_hop * hops, \
        {"em": em, "cite": cite, "format": fmt, "hops": hops}


def padded(convs):
    """(ids, mask) conversations -> inputs x and targets y, a row each: targets -1 where the mask is 0 (the prompt,
    the retrieved documents: context, never targets) and past each conversation's end."""
    T = max(len(ids) for ids, _ in convs) - 1
    x = torch.zeros(len(convs), T, dtype=torch.long)
    y = torch.full((len(convs), T), -1, dtype=torch.long)
    for i, (ids, mask) in enumerate(convs):
        x[i, :len(ids) - 1] = torch.tensor(ids[:-1])
        y[i, :len(ids) - 1] = torch.tensor([t if m else -1 for t, m in zip(ids[1:], mask[1:])])
    return x, y


def pg_loss(model, outs, rewards, device="cpu", ref=None, kl_coef=0.0):
    """The policy-gradient loss of one question's rollouts, as nanochat's chat_rl: -sum over rollouts of advantage
    (reward - the group's mean) * log p(each token the model sampled), over the number of such tokens. With a
    reference model (the warm start) and kl_coef > 0, plus kl_coef * KL(policy || ref) per sampled token (the k3
    estimator, as GRPO)."""
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
