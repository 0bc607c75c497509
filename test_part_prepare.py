# Tests for prepare.py: python test_part_prepare.py, or pytest test_part_prepare.py
import filecmp
import functools
import json
import os
import random
import re
import subprocess
import sys
import tempfile

import numpy as np

import prepare

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = dict(seed=7, world_size=40, heldout_frac=0.2, n_renderings=2, vocab_size=600, val_frac=0.1)
_tmpdirs = []  # keeps the cached world's directory alive for the whole run


@functools.lru_cache(maxsize=None)
def tiny_world():
    d = tempfile.TemporaryDirectory()
    _tmpdirs.append(d)
    prepare.prepare_world(d.name, **TINY)
    return d.name


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def read_bin(out, split):
    meta = json.load(open(os.path.join(out, "meta.json")))
    return np.memmap(os.path.join(out, f"{split}.bin"), dtype=meta["dtype"], mode="r"), meta


def bin_docs(out, split):
    tok = prepare.Tokenizer.load(os.path.join(out, "tokenizer.json"))
    ids, _ = read_bin(out, split)
    assert ids[0] == tok.bos_id
    cuts = np.flatnonzero(ids == tok.bos_id).tolist() + [len(ids)]
    return [tok.decode(ids[a + 1:b].tolist()) for a, b in zip(cuts, cuts[1:])]


def mentions(name, text):
    return re.search(r"\b" + re.escape(name) + r"\b", text) is not None


def test_world_deterministic():
    out = tiny_world()
    with tempfile.TemporaryDirectory() as d2, tempfile.TemporaryDirectory() as d3:
        prepare.prepare_world(d2, **TINY)
        names = sorted(os.listdir(out))
        assert names == sorted(["kb.jsonl", "qa_train.jsonl", "qa_heldout.jsonl", "qa_rag.jsonl", "tokenizer.json", "train.bin", "val.bin", "meta.json"])
        match, mismatch, errors = filecmp.cmpfiles(out, d2, names, shallow=False)
        assert mismatch == [] and errors == [] and len(match) == len(names)
        prepare.prepare_world(d3, **dict(TINY, seed=8))
        assert not filecmp.cmp(os.path.join(out, "kb.jsonl"), os.path.join(d3, "kb.jsonl"), shallow=False)


def test_heldout_world_absent_from_training_text():
    out = tiny_world()
    kb = read_jsonl(os.path.join(out, "kb.jsonl"))
    train_text = "\n".join(bin_docs(out, "train") + bin_docs(out, "val"))
    heldout_names = set()
    for split in ("heldout", "rag"):  # neither the held-out nor the RAG world may reach pretraining text
        heldout_names |= {d["title"] for d in kb if d["metadata"]["world"] == split}
        heldout_names |= {q["entity"] for q in read_jsonl(os.path.join(out, f"qa_{split}.jsonl"))}  # incl. invented ones
    train_names = {d["title"] for d in kb if d["metadata"]["world"] == "train"}
    assert len(heldout_names) > 20 and not heldout_names & train_names
    assert [n for n in heldout_names if mentions(n, train_text)] == []
    assert all(mentions(n, train_text) for n in train_names)  # the check above can see names at all
    # every held-out fact lives only in held-out documents, which never mention a training-world entity
    for d in kb:
        if d["metadata"]["world"] != "train":
            assert not any(mentions(n, d["text"]) for n in train_names), d


def test_qa_gold_docs_hold_answers_and_chains_connect():
    out = tiny_world()
    kb = {d["id"]: d for d in read_jsonl(os.path.join(out, "kb.jsonl"))}
    for world in ("train", "heldout"):
        qas = read_jsonl(os.path.join(out, f"qa_{world}.jsonl"))
        assert len({q["id"] for q in qas}) == len(qas)
        assert {q["hops"] for q in qas} == {0, 1, 2, 3}
        assert {q["type"] for q in qas if q["hops"] == 1} == {  # every relation is asked about
            "born_in", "born_year", "works_for", "profession", "founded_by", "founded_year", "hq", "industry",
            "located_in", "population", "capital"}
        for q in qas:
            assert q["world"] == world and q["entity"] in q["question"]
            if q["hops"] == 0:
                continue
            assert q["hops"] == len(q["chain"]) and q["gold_ids"] == [c["doc_id"] for c in q["chain"]]
            assert q["answer"] == q["chain"][-1]["answer"] and q["chain"][0]["query"].count(q["entity"]) == 1
            for k, step in enumerate(q["chain"]):
                doc = kb[step["doc_id"]]
                assert doc["metadata"]["world"] == world and step["answer"] in doc["text"], (q, doc)
                if k + 1 < len(q["chain"]):
                    assert mentions(step["answer"], q["chain"][k + 1]["query"]), q
                    assert q["chain"][k + 1]["doc_id"] != step["doc_id"]
    q = next(q for q in qas if q["type"] == "founder_birth_country")
    company, person, city = (kb[i] for i in q["gold_ids"])
    assert company["metadata"]["type"] == "company" and person["metadata"]["type"] == "person" and city["metadata"]["type"] == "city"


def test_unanswerable_questions_have_no_document():
    out = tiny_world()
    kb = read_jsonl(os.path.join(out, "kb.jsonl"))
    all_text = "\n".join(d["title"] + " " + d["text"] for d in kb)
    for world in ("train", "heldout"):
        ghosts = [q for q in read_jsonl(os.path.join(out, f"qa_{world}.jsonl")) if q["hops"] == 0]
        assert len(ghosts) > 0
        for q in ghosts:
            assert q["answer"] == "" and q["gold_ids"] == [] and q["chain"] == []
            assert not mentions(q["entity"], all_text), q
            assert prepare.answer_sentence(q, cite=2) == prepare.ABSTAIN


def test_documents_vary_but_keep_their_facts():
    train, _, _, _, _ = prepare.make_worlds(1, 20, 0.2)
    texts = {prepare.render_doc(train, "person", 3, random.Random(r))[1] for r in range(20)}
    assert len(texts) >= 10
    facts = [a for a, *_ in prepare.single_hops(train, "person", 3).values()]
    assert all(all(f in t for f in facts) for t in texts)
    # facts come in several orders, not always the same first sentence
    assert len({t.split(".")[0].split()[-1] for t in texts}) >= 3


def test_answer_sentence():
    qa = {"type": "born_in", "entity": "Kelmar Odrissi", "answer": "Velnor"}
    assert prepare.answer_sentence(qa) == "Kelmar Odrissi was born in Velnor."
    assert prepare.answer_sentence(qa, cite=2) == "Kelmar Odrissi was born in Velnor [2]."
    assert prepare.answer_sentence({"type": "industry", "entity": "Tova Group", "answer": "insurance"}) == "Tova Group is an insurance company."
    assert prepare.answer_sentence(dict(qa, answer="")) == prepare.ABSTAIN


def small_tokenizer():
    texts = ["Kelmar Odrissi was born in Velnor in 1962.", "The capital of Tessaria is Brun.", "naïve café — 東京 ✓"] * 30
    return prepare.Tokenizer.train(texts, 300)


def test_tokenizer_round_trip_and_json():
    tok = small_tokenizer()
    assert 256 + len(prepare.SPECIAL_TOKENS) <= tok.vocab_size <= 300
    for text in ["Kelmar Odrissi was born in Velnor.", "unseen wörds 123456 \n\t ok", "naïve café — 東京 ✓", ""]:
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("Kelmar Odrissi")) < len("Kelmar Odrissi".encode())  # merges were learned
    ids = [tok.bos_id] + tok.encode("hi") + [tok.special("<|assistant_end|>")]
    assert tok.decode(ids) == "<|bos|>hi<|assistant_end|>"
    assert tok.bos_id not in tok.encode("<|bos|>")  # special text in data stays plain text
    assert sorted(tok.special(s) for s in prepare.SPECIAL_TOKENS) == list(range(tok.vocab_size - 9, tok.vocab_size))
    tok2 = prepare.Tokenizer.from_json(tok.to_json())
    assert tok2.to_json() == tok.to_json() and tok2.vocab_size == tok.vocab_size
    text = "naïve Kelmar <|bos|> 1962"
    assert tok2.encode(text) == tok.encode(text)
    with tempfile.TemporaryDirectory() as d:
        tok.save(os.path.join(d, "t.json"))
        assert prepare.Tokenizer.load(os.path.join(d, "t.json")).encode(text) == tok.encode(text)
    try:
        tok.special("<|nope|>")
        assert False
    except ValueError as e:
        assert "<|nope|>" in str(e)


def test_render_conversation_mask():
    tok = small_tokenizer()
    S, E = tok.special, tok.encode
    messages = [
        {"role": "user", "content": "Where was Kelmar born?"},
        {"role": "documents", "content": [{"title": "A", "text": "x."}, {"title": "B", "text": "y."}]},
        {"role": "query", "content": "Velnor"},
        {"role": "documents", "content": [{"title": "C", "text": "z."}]},
        {"role": "assistant", "content": "In Velnor [3]."},
    ]
    ids, mask = prepare.render_conversation(tok, messages)
    parts = [([tok.bos_id], 0),
             ([S("<|user_start|>")] + E("Where was Kelmar born?") + [S("<|user_end|>")], 0),
             ([S("<|doc_start|>")] + E("[1] A: x.") + [S("<|doc_end|>")], 0),
             ([S("<|doc_start|>")] + E("[2] B: y.") + [S("<|doc_end|>")], 0),
             ([S("<|query_start|>")] + E("Velnor") + [S("<|query_end|>")], 1),
             ([S("<|doc_start|>")] + E("[3] C: z.") + [S("<|doc_end|>")], 0),  # numbering continues
             ([S("<|assistant_start|>")] + E("In Velnor [3].") + [S("<|assistant_end|>")], 1)]
    assert ids == [t for p, _ in parts for t in p]
    assert mask == [m for p, m in parts for _ in p]
    # the mask is 1 exactly on the query and the answer, their special tokens included
    ones = [i for i, m in enumerate(mask) if m]
    q0 = sum(len(p) for p, _ in parts[:4])
    a0 = sum(len(p) for p, _ in parts[:6])
    assert ones == list(range(q0, q0 + len(parts[4][0]))) + list(range(a0, len(ids)))
    assert ids[ones[0]] == S("<|query_start|>") and ids[ones[-1]] == S("<|assistant_end|>")
    ids8, mask8 = prepare.render_conversation(tok, messages, max_len=8)
    assert ids8 == ids[:8] and mask8 == mask[:8]
    try:
        prepare.render_conversation(tok, [{"role": "system", "content": "x"}])
        assert False
    except ValueError as e:
        assert "message 0" in str(e) and "system" in str(e)


def test_bins_decode_to_the_corpus():
    out = tiny_world()
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == TINY["vocab_size"]
    # regenerate the corpus the way prepare_world does and compare document by document
    train, _, _, _, _ = prepare.make_worlds(TINY["seed"], TINY["world_size"], TINY["heldout_frac"])
    expected = {"train": [], "val": []}
    for r in range(TINY["n_renderings"]):
        for is_val, text in prepare.corpus_items(train, random.Random(f"{TINY['seed']}-rendering-{r}"), TINY["val_frac"]):
            expected["val" if is_val else "train"].append(text)
    for split in ("train", "val"):
        docs = bin_docs(out, split)
        assert docs == expected[split]
        ids, _ = read_bin(out, split)
        assert len(ids) == meta[f"n_{split}_tokens"] and len(docs) == meta[f"n_{split}_docs"]
    n_val = len(expected["val"]) / (len(expected["val"]) + len(expected["train"]))
    assert 0.03 < n_val < 0.2
    assert any(t.startswith("Question: ") for t in expected["train"])


def test_user_text_input():
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "src")
        os.makedirs(os.path.join(src, "sub"))
        with open(os.path.join(src, "a.txt"), "w") as f:
            f.write("First paragraph\nstill first.\n\n\n  Second paragraph.  \n")
        with open(os.path.join(src, "sub", "b.jsonl"), "w") as f:
            f.write(json.dumps({"text": "Third document."}) + "\n\n" + json.dumps({"text": "Fourth. ✓", "x": 1}) + "\n")
        with open(os.path.join(src, "notes.md"), "w") as f:
            f.write("ignored")
        out = os.path.join(d, "out")
        s = prepare.prepare_text(src, out, seed=0, vocab_size=300, val_frac=0.0)
        expected = ["First paragraph\nstill first.", "Second paragraph.", "Third document.", "Fourth. ✓"]
        assert bin_docs(out, "train") == expected and s["n_train_docs"] == 4 and s["n_val_docs"] == 0
        assert [r["text"] for r in read_jsonl(os.path.join(out, "kb.jsonl"))] == expected
        with open(os.path.join(src, "sub", "b.jsonl"), "a") as f:
            f.write('{"txt": "oops"}\n')
        try:
            prepare.prepare_text(src, out, seed=0, vocab_size=300, val_frac=0.0)
            assert False
        except ValueError as e:
            assert str(e).endswith("b.jsonl:4: no \"text\" field")
        assert bin_docs(out, "train") == expected  # the failed run left the previous output intact
        one = os.path.join(d, "one.txt")
        with open(one, "w") as f:
            f.write("A single paragraph.\n")
        try:  # the only document goes to val, so nothing is left to train on
            prepare.prepare_text(one, out, seed=0, vocab_size=300, val_frac=0.5)
            assert False
        except ValueError as e:
            assert "no documents for train.bin" in str(e)
        assert bin_docs(out, "train") == expected and not [f for f in os.listdir(out) if f.endswith(".tmp")]


def run_cli(*args):
    r = subprocess.run([sys.executable, os.path.join(HERE, "prepare.py"), *args], capture_output=True, text=True, cwd=HERE)
    return r.returncode, r.stderr.strip()


def test_cli_bad_input_is_one_line_error():
    with tempfile.TemporaryDirectory() as d:
        rc, err = run_cli("--input", os.path.join(d, "missing.txt"), "--out", d)
        assert rc != 0 and err == f"error: --input {d}/missing.txt: no such file or folder"
        rc, err = run_cli("--bogus=1")
        assert rc != 0 and err.startswith("error: unknown option --bogus") and "\n" not in err
        rc, err = run_cli("--world_size=many")
        assert rc != 0 and err == "error: --world_size=many: expected int"
        with open(os.path.join(d, "x.parquet"), "wb") as f:
            f.write(b"not parquet")
        rc, err = run_cli(f"--input={d}/x.parquet", f"--out={d}/o")
        assert rc != 0 and err.startswith(f"error: {d}/x.parquet") and "\n" not in err
        assert not os.path.exists(os.path.join(d, "o", "train.bin"))


if __name__ == "__main__":
    import time
    t0 = time.time()
    for name, fn in list(globals().items()):
        if name.startswith("test_") and callable(fn):
            t = time.time()
            fn()
            print(f"ok {name} ({time.time() - t:.1f}s)")
    print(f"all passed in {time.time() - t0:.1f}s")
