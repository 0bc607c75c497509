"""
All tests, grouped by the file they test. Tiny models and tiny corpora, so the whole suite runs in minutes on
two CPU cores.

    python test_all.py            # every test; ends with "N passed, N failed"
    python test_all.py resume     # only tests whose name contains "resume"
    python -m pytest test_all.py  # the same tests under pytest
"""
import ast
import collections
import contextlib
import dataclasses
import filecmp
import functools
import glob
import importlib.util
import inspect
import io
import json
import linecache
import math
import os
import random
import re
import runpy
import signal
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

# Without a GPU Triton can only interpret: say so before anything imports triton (torch._dynamo does, under model),
# and mamba-ssm's Triton kernels run on CPU tensors in the model tests (mamba_ssm_triton)
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
import bench
import cpu_scan
import model
import prepare
import rag
import tokenizer
import world
import retrieve
from common import save_checkpoint
from model import GPT, GPTConfig, Mamba, Mamba2, Mamba3, chunked_scan, sample_next, selective_scan, ssd_scan
from prepare import prepare_world
from tokenizer import ABSTAIN, Tokenizer, render_conversation
from world import COUNTRY_SUFFIXES
from retrieve import (BM25Retriever, DenseRetriever, Document, HybridRetriever, RETRIEVERS, evaluate,
                      load_documents, load_kb, mrr, ndcg_at_k, precision_at_k, recall_at_k, tokenize)

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# tiny models gain nothing from a second thread, and on a busy machine OpenMP threads spin-wait on each other;
# the scripts the tests start inherit the one thread
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
HERE = str(ROOT)


def run(*args, ok=True, env=None, timeout=300):
    """Runs a project script the way a user would; returns the finished process."""
    cmd = [sys.executable, *args] if args[0].endswith(".py") else list(args)
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout,
                       env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})
    if ok and p.returncode != 0:
        # stderr last and in full: CI shows the end of the log
        raise AssertionError(f"{' '.join(args)} failed (exit {p.returncode}):\n{p.stdout[-1500:]}\n{p.stderr[-4000:]}")
    return p


def run_here(script, *args):
    """Runs a project script's __main__ in this process (no interpreter start-up): (exit code, stdout, stderr).
    Any exception other than SystemExit escapes: that is the traceback a user would have seen."""
    out, err, argv, code = io.StringIO(), io.StringIO(), sys.argv, 0
    sys.argv = [script, *map(str, args)]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            runpy.run_path(str(ROOT / script), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
        err.write(f"{e.code}\n" if isinstance(e.code, str) else "")
    finally:
        sys.argv = argv
    return code, out.getvalue(), err.getvalue()


def ran(script, *args):
    """run_here as a finished process: returncode, stdout, stderr."""
    code, out, err = run_here(script, *args)
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


def one_line_error(p, *needles):
    """A bad-input run must fail with one 'error: ...' line naming the problem, not a traceback."""
    assert p.returncode != 0, p.stdout
    err = p.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1 and err.startswith("error:"), err
    for needle in needles:
        assert needle in err, (needle, err)


@functools.cache
def tiny_world():
    """A 20-person synthetic world, prepared once per test run."""
    out = Path(tempfile.mkdtemp(prefix="world_"))
    run("prepare.py", "--world_size=20", "--n_renderings=8", f"--out={out}")
    return out


# a model small enough that a training step takes milliseconds
TINY = ["--n_layer=2", "--n_embd=32", "--n_head=2", "--n_kv_head=1", "--block_size=32", "--device_batch_size=4",
        "--total_batch_size=256", "--warmup_iters=2", "--eval_tokens=512", "--device=cpu"]


def losses(stdout):
    return {int(s): float(l) for s, l in re.findall(r"^step (\d+)/\d+ \| loss ([\d.]+)", stdout, re.M)}


# -----------------------------------------------------------------------------
# prepare.py

WORLD_ARGS = dict(seed=7, world_size=40, heldout_frac=0.2, n_renderings=2, vocab_size=600, val_frac=0.1)
_tmpdirs = []  # keeps the cached world's directory alive for the whole run


@functools.lru_cache(maxsize=None)
def prepared_world():
    d = tempfile.TemporaryDirectory()
    _tmpdirs.append(d)
    prepare.prepare_world(d.name, **WORLD_ARGS)
    return d.name


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def read_bin(out, split):
    meta = json.load(open(os.path.join(out, "meta.json")))
    return np.memmap(os.path.join(out, f"{split}.bin"), dtype=meta["dtype"], mode="r"), meta


def bin_docs(out, split):
    tok = tokenizer.Tokenizer.from_json(open(os.path.join(out, "tokenizer.json")).read())
    ids, _ = read_bin(out, split)
    assert ids[0] == tok.bos_id
    cuts = np.flatnonzero(ids == tok.bos_id).tolist() + [len(ids)]
    return [tok.decode(ids[a + 1:b].tolist()) for a, b in zip(cuts, cuts[1:])]


def mentions(name, text):
    return re.search(r"\b" + re.escape(name) + r"\b", text) is not None


def test_world_deterministic():
    out = prepared_world()
    with tempfile.TemporaryDirectory() as d2, tempfile.TemporaryDirectory() as d3:
        prepare.prepare_world(d2, **WORLD_ARGS)
        names = sorted(os.listdir(out))
        assert names == sorted(["kb.jsonl", "qa_train.jsonl", "qa_heldout.jsonl", "qa_closed.jsonl", "tokenizer.json", "train.bin", "val.bin", "meta.json"])
        match, mismatch, errors = filecmp.cmpfiles(out, d2, names, shallow=False)
        assert mismatch == [] and errors == [] and len(match) == len(names)
        prepare.prepare_world(d3, **dict(WORLD_ARGS, seed=8))
        assert not filecmp.cmp(os.path.join(out, "kb.jsonl"), os.path.join(d3, "kb.jsonl"), shallow=False)


def test_heldout_world_absent_from_training_text():
    out = prepared_world()
    kb = read_jsonl(os.path.join(out, "kb.jsonl"))
    train_text = "\n".join(bin_docs(out, "train") + bin_docs(out, "val"))
    heldout_names = set()
    for name, split in (("heldout", "heldout"), ("rag", "train")):  # neither the held-out nor the RAG world (which
        heldout_names |= {d["title"] for d in kb if d["metadata"]["world"] == name}  # RAG trains on) reaches pretraining
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
    out = prepared_world()
    kb = {d["id"]: d for d in read_jsonl(os.path.join(out, "kb.jsonl"))}
    for split, name in (("closed", "train"), ("train", "rag"), ("heldout", "heldout")):
        qas = read_jsonl(os.path.join(out, f"qa_{split}.jsonl"))
        assert len({q["id"] for q in qas}) == len(qas)
        assert {q["hops"] for q in qas} == {0, 1, 2, 3}
        assert {q["type"] for q in qas if q["hops"] == 1} == {  # every relation is asked about
            "born_in", "born_year", "works_for", "profession", "founded_by", "founded_year", "hq", "industry",
            "located_in", "population", "capital"}
        for q in qas:
            assert q["world"] == name and q["entity"] in q["question"]
            if q["hops"] == 0:
                continue
            assert q["hops"] == len(q["gold_ids"]) == len(q["queries"]) and len(q["golden_answers"]) == 1
            assert q["queries"][0].count(q["entity"]) == 1 and q["response"].startswith(q["response"].split(q["golden_answers"][0])[0])
            assert mentions(q["golden_answers"][0], kb[q["gold_ids"][-1]]["text"]) and q["golden_answers"][0] in q["response"]
            for k, doc_id in enumerate(q["gold_ids"]):
                assert kb[doc_id]["metadata"]["world"] == name, (q, doc_id)
                if k + 1 < len(q["gold_ids"]):  # the next hop asks about an entity this document names
                    bridge = kb[q["gold_ids"][k + 1]]["title"]
                    assert mentions(bridge, q["queries"][k + 1]) and mentions(bridge, kb[doc_id]["text"]), q
                    assert q["gold_ids"][k + 1] != doc_id
    q = next(q for q in qas if q["type"] == "founder_birth_country")
    company, person, city = (kb[i] for i in q["gold_ids"])
    assert company["metadata"]["type"] == "company" and person["metadata"]["type"] == "person" and city["metadata"]["type"] == "city"


def test_unanswerable_questions_have_no_document():
    out = prepared_world()
    kb = read_jsonl(os.path.join(out, "kb.jsonl"))
    all_text = "\n".join(d["title"] + " " + d["text"] for d in kb)
    for split in ("closed", "train", "heldout"):
        ghosts = [q for q in read_jsonl(os.path.join(out, f"qa_{split}.jsonl")) if q["hops"] == 0]
        assert len(ghosts) > 0
        for q in ghosts:
            assert q["golden_answers"] == [] and q["gold_ids"] == [] and q["queries"] == []
            assert not mentions(q["entity"], all_text), q
            assert rag.target_answer(q, kb[:2]) == rag.target_answer(q, None) == ABSTAIN


def test_reading_exercises_answer_from_their_own_passage():
    """Every answer of a reading exercise is in the paragraphs before it, about an entity of the passage, and the
    reading worlds share no name with the worlds of the KB (so they cannot leak a held-out fact)."""
    train, heldout, rng, pool, first_names = world.make_worlds(3, 30, 0.2)
    reading = world.make_world(random.Random(4), pool, first_names, "reading", 30)
    items = [text for _, text in world.reading_items(reading, random.Random(5), 0.0)]
    assert len(items) == sum(n for _, n in reading.kinds())
    n_questions = 0
    for text in items:
        passage, *qas = text.split("\nQuestion: ")
        assert 1 <= len(qas) <= 4 and 1 <= len(passage.split("\n")) <= 3
        for qa in qas:
            question, answer = qa.split("\nAnswer: ")
            assert any(mentions(t.split(": ")[0], question) for t in passage.split("\n")), text
            facts = [w for w in re.findall(r"[\w,]+", answer) if w[0].isupper() or w[0].isdigit()]
            assert facts and all(mentions(w, passage) for w in facts if w != "The"), (facts, text)
            n_questions += 1
    assert n_questions > 1.5 * len(items)
    names = lambda w: set(w.person) | set(w.company) | set(w.city) | set(w.country)
    assert not names(reading) & (names(train) | names(heldout))


def test_documents_vary_but_keep_their_facts():
    train, _, _, _, _ = world.make_worlds(1, 20, 0.2)
    texts = {world.render_doc(train, "person", 3, random.Random(r))[1] for r in range(20)}
    assert len(texts) >= 10
    facts = [a for a, *_ in world.single_hops(train, "person", 3).values()]
    assert all(all(f in t for f in facts) for t in texts)
    # facts come in several orders, not always the same first sentence
    assert len({t.split(".")[0].split()[-1] for t in texts}) >= 3


def test_answer_sentence():
    assert world.answer_sentence("born_in", "Kelmar Odrissi", "Velnor") == "Kelmar Odrissi was born in Velnor."
    assert rag.with_citation("Kelmar Odrissi was born in Velnor.", 2) == "Kelmar Odrissi was born in Velnor [2]."
    assert rag.with_citation("Velnor", 2) == "Velnor [2]"
    assert world.answer_sentence("industry", "Tova Group", "insurance") == "Tova Group is an insurance company."


def small_tokenizer():
    texts = ["Kelmar Odrissi was born in Velnor in 1962.", "The capital of Tessaria is Brun.", "naïve café — 東京 ✓"] * 30
    return tokenizer.Tokenizer.train(texts, 300)


def test_tokenizer_round_trip_and_json():
    tok = small_tokenizer()
    assert 256 + len(tokenizer.SPECIAL_TOKENS) <= tok.vocab_size <= 300
    for text in ["Kelmar Odrissi was born in Velnor.", "unseen wörds 123456 \n\t ok", "naïve café — 東京 ✓", ""]:
        assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("Kelmar Odrissi")) < len("Kelmar Odrissi".encode())  # merges were learned
    ids = [tok.bos_id] + tok.encode("hi") + [tok.special("<|assistant_end|>")]
    assert tok.decode(ids) == "<|bos|>hi<|assistant_end|>"
    assert tok.bos_id not in tok.encode("<|bos|>")  # special text in data stays plain text
    assert sorted(tok.special(s) for s in tokenizer.SPECIAL_TOKENS) == list(range(tok.vocab_size - 9, tok.vocab_size))
    tok2 = tokenizer.Tokenizer.from_json(tok.to_json())
    assert tok2.to_json() == tok.to_json() and tok2.vocab_size == tok.vocab_size
    text = "naïve Kelmar <|bos|> 1962"
    assert tok2.encode(text) == tok.encode(text)
    with tempfile.TemporaryDirectory() as d:
        prepare.write_atomic(os.path.join(d, "t.json"), [tok.to_json()])
        assert tokenizer.Tokenizer.from_json(open(os.path.join(d, "t.json")).read()).encode(text) == tok.encode(text)
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
    ids, mask = tokenizer.render_conversation(tok, messages)
    parts = [([tok.bos_id], 0),
             ([S("<|user_start|>")] + E(" Where was Kelmar born?") + [S("<|user_end|>")], 0),  # + dummy prefix
             ([S("<|doc_start|>")] + E("[1] A: x.") + [S("<|doc_end|>")], 0),
             ([S("<|doc_start|>")] + E("[2] B: y.") + [S("<|doc_end|>")], 0),
             ([S("<|query_start|>")] + E(" Velnor") + [S("<|query_end|>")], 1),
             ([S("<|doc_start|>")] + E("[3] C: z.") + [S("<|doc_end|>")], 0),  # numbering continues
             ([S("<|assistant_start|>")] + E(" In Velnor [3].") + [S("<|assistant_end|>")], 1)]
    assert ids == [t for p, _ in parts for t in p]
    assert mask == [m for p, m in parts for _ in p]
    # the mask is 1 exactly on the query and the answer, their special tokens included
    ones = [i for i, m in enumerate(mask) if m]
    q0 = sum(len(p) for p, _ in parts[:4])
    a0 = sum(len(p) for p, _ in parts[:6])
    assert ones == list(range(q0, q0 + len(parts[4][0]))) + list(range(a0, len(ids)))
    assert ids[ones[0]] == S("<|query_start|>") and ids[ones[-1]] == S("<|assistant_end|>")
    ids8, mask8 = tokenizer.render_conversation(tok, messages, max_len=8)
    assert ids8 == ids[:8] and mask8 == mask[:8]
    try:
        tokenizer.render_conversation(tok, [{"role": "system", "content": "x"}])
        assert False
    except ValueError as e:
        assert "message 0" in str(e) and "system" in str(e)


def test_bins_decode_to_the_corpus():
    out = prepared_world()
    meta = json.load(open(os.path.join(out, "meta.json")))
    assert meta["dtype"] == "uint16" and meta["vocab_size"] == WORLD_ARGS["vocab_size"]
    # regenerate the corpus the way prepare_world does and compare document by document
    train, _, _, _, _ = world.make_worlds(WORLD_ARGS["seed"], WORLD_ARGS["world_size"], WORLD_ARGS["heldout_frac"])
    expected = {"train": [], "val": []}
    for r in range(WORLD_ARGS["n_renderings"]):
        for is_val, text in world.corpus_items(train, random.Random(f"{WORLD_ARGS['seed']}-rendering-{r}"), WORLD_ARGS["val_frac"]):
            expected["val" if is_val else "train"].append(text)
    n_reading = 0
    for split in ("train", "val"):
        docs = bin_docs(out, split)
        reading = [d for d in docs if not d.startswith("Question: ") and "\nQuestion: " in d]  # see reading_items
        n_reading += len(reading)
        assert [d for d in docs if d not in reading] == expected[split]
        ids, _ = read_bin(out, split)
        assert len(ids) == meta[f"n_{split}_tokens"] and len(docs) == meta[f"n_{split}_docs"]
    reading_world = world.make_world(random.Random(0), world.NamePool(random.Random(0)), ["A"], "x",
                                       round(WORLD_ARGS["world_size"] * prepare.config["reading_frac"]))
    assert n_reading == WORLD_ARGS["n_renderings"] * sum(n for _, n in reading_world.kinds())
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


def test_fineweb_parquet_shards_are_read(tmp_path):
    """nanochat's FineWeb-edu shards: parquet files with a "text" column among others, read in row order."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = {"text": ["Photosynthesis makes sugar.", "", "Rivers carve valleys."], "id": ["<urn:1>", "<urn:2>", "<urn:3>"],
            "url": ["a", "b", "c"], "score": [3.1, 2.9, 4.0]}
    os.makedirs(tmp_path / "fw")
    for i in range(2):
        pq.write_table(pa.table({k: v[i:] for k, v in rows.items()}), tmp_path / "fw" / f"shard_{i:05d}.parquet")
    s = prepare.prepare_text(str(tmp_path / "fw"), str(tmp_path / "out"), seed=0, vocab_size=300, val_frac=0.0)
    assert bin_docs(str(tmp_path / "out"), "train") == [rows["text"][0], rows["text"][2], rows["text"][2]]
    assert s["n_train_docs"] == 3  # the empty row is skipped


def run_cli(*args):
    code, _, err = run_here("prepare.py", *args)
    return code, err.strip()


def test_cli_bad_input_is_one_line_error():
    with tempfile.TemporaryDirectory() as d:
        rc, err = run_cli(f"--input={d}/missing.txt", f"--out={d}")
        assert rc != 0 and err == f"error: --input {d}/missing.txt: no such file or folder"
        rc, err = run_cli("--bogus=1")
        assert rc != 0 and err == "error: --bogus: unknown config key 'bogus'"
        rc, err = run_cli("--world_size=many")
        assert rc != 0 and err == "error: --world_size: world_size must be int, got 'many'"
        with open(os.path.join(d, "x.parquet"), "wb") as f:
            f.write(b"not parquet")
        rc, err = run_cli(f"--input={d}/x.parquet", f"--out={d}/o")
        assert rc != 0 and err.startswith(f"error: {d}/x.parquet") and "\n" not in err
        assert not os.path.exists(os.path.join(d, "o", "train.bin"))


# -----------------------------------------------------------------------------
# model.py

def tiny_config(pattern, **kw):
    kw = dict(block_size=64, vocab_size=101, n_layer=4, n_head=4, n_kv_head=2, n_embd=64, block_pattern=pattern) | kw
    return GPTConfig(**kw)


@torch.no_grad()
def randomize(model, seed=0):
    """Init leaves c_proj at 0 and lm_head near 0 (near-uniform logits); give every matrix real values so that
    equivalence tests compare something. A_log, D and the dt bias keep their init."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim == 2 and "A_log" not in name:
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))
    return model


def scan_ref(x, dt, A, B, C, h0=None):
    """The definition, one time step at a time: h_t = exp(dt_t A) h_{t-1} + dt_t B_t x_t, y_t = C_t . h_t."""
    h = torch.zeros(x.shape[0], *A.shape, dtype=x.dtype) if h0 is None else h0
    ys = []
    for t in range(x.shape[1]):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * x[:, t])[..., None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    return torch.stack(ys, 1), h


def skip(msg):
    try:
        import pytest
    except ImportError:
        print(f"SKIP: {msg}")
        return
    pytest.skip(msg)


# mamba-ssm's own Python source (the sdist, unpacked under .gpu/ or at $MAMBA_SSM_SRC), loaded on CPU with its
# CUDA/Triton-only imports stubbed and its selective_scan_ref in place of the CUDA scan: the reference module.
SRC = os.environ.get("MAMBA_SSM_SRC") or next(iter(sorted(glob.glob(os.path.join(HERE, ".gpu", "mamba_ssm-*")))), None)


@functools.cache
def mamba_ssm_reference():
    if SRC is None or importlib.util.find_spec("einops") is None:
        return None
    before = set(sys.modules)

    def stub(name, **attrs):
        sys.modules[name] = mod = types.ModuleType(name)
        mod.__dict__.update(attrs)
        return mod

    def load(name, rel):
        spec = importlib.util.spec_from_file_location(name, os.path.join(SRC, "mamba_ssm", rel))
        sys.modules[name] = mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    def source_functions(rel, names, namespace):  # reference functions out of a file that needs Triton to import
        tree = ast.parse(open(os.path.join(SRC, "mamba_ssm", rel)).read())
        tree.body = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in names]
        exec(compile(tree, rel, "exec"), namespace)
        return namespace

    import einops
    refs = source_functions("ops/triton/layernorm_gated.py", {"rms_norm_ref"},
                            dict(torch=torch, F=F, rearrange=einops.rearrange))
    refs["repeat"] = einops.repeat
    source_functions("modules/ssd_minimal.py", {"segsum", "ssd_minimal_discrete"}, refs)

    class RMSNormGated(torch.nn.Module):  # mamba-ssm's module around its own rms_norm_ref
        def __init__(self, hidden_size, eps=1e-5, group_size=None, norm_before_gate=True, device=None, dtype=None):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(hidden_size))
            self.eps, self.group_size, self.norm_before_gate = eps, group_size, norm_before_gate

        def forward(self, x, z=None):
            return refs["rms_norm_ref"](x, self.weight, None, z=z, eps=self.eps, group_size=self.group_size,
                                        norm_before_gate=self.norm_before_gate)

    def mamba_chunk_scan_combined(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                                  seq_idx=None, cu_seqlens=None, dt_softplus=False, return_final_states=False,
                                  return_varlen_states=False):  # the kernel's contract, on ssd_minimal_discrete
        assert z is None and seq_idx is None and cu_seqlens is None and B.shape[2] == 1
        dt = dt.float() + dt_bias
        dt = F.softplus(dt) if dt_softplus else dt
        h = x.shape[2]
        B, C = B.expand(-1, -1, h, -1).float(), C.expand(-1, -1, h, -1).float()
        y, final = refs["ssd_minimal_discrete"](x.float() * dt.unsqueeze(-1), A * dt, B, C, chunk_size,
                                                None if initial_states is None else initial_states.unsqueeze(1))
        y = y + x * D.unsqueeze(-1)
        return (y, final) if return_final_states else y

    try:
        for pkg in ("mamba_ssm", "mamba_ssm.ops", "mamba_ssm.ops.triton", "mamba_ssm.utils", "mamba_ssm.modules",
                    "mamba_ssm.distributed"):
            stub(pkg)
        stub("selective_scan_cuda")
        stub("mamba_ssm.ops.triton.layer_norm", _layer_norm_fwd=None)
        stub("mamba_ssm.ops.triton.layernorm_gated", RMSNorm=RMSNormGated)
        stub("mamba_ssm.ops.triton.ssd_combined", mamba_chunk_scan_combined=mamba_chunk_scan_combined,
             mamba_split_conv1d_scan_combined=None)
        stub("mamba_ssm.distributed.tensor_parallel", ColumnParallelLinear=None, RowParallelLinear=None)
        stub("mamba_ssm.distributed.distributed_utils", all_reduce=None, reduce_scatter=None)
        load("mamba_ssm.utils.torch", "utils/torch.py")
        ssi = load("mamba_ssm.ops.selective_scan_interface", "ops/selective_scan_interface.py")
        simple = load("mamba_ssm.modules.mamba_simple", "modules/mamba_simple.py")
        mamba2 = load("mamba_ssm.modules.mamba2", "modules/mamba2.py")
    finally:
        for name in set(sys.modules) - before:
            del sys.modules[name]
    assert simple.causal_conv1d_fn is None and simple.selective_state_update is None  # the pure-PyTorch paths
    assert mamba2.causal_conv1d_fn is None and mamba2.selective_state_update is None
    simple.selective_scan_fn = ssi.selective_scan_ref
    return types.SimpleNamespace(Mamba=simple.Mamba, Mamba2=mamba2.Mamba2, selective_scan_ref=ssi.selective_scan_ref,
                                 ssd_minimal_discrete=refs["ssd_minimal_discrete"])


_interpreted = {}


@contextlib.contextmanager
def mamba_ssm_triton():
    """mamba-ssm's own package with its Triton kernels run on CPU tensors by Triton's interpreter, or None without
    triton, einops, the sources or TRITON_INTERPRET=1 (set above on a machine without CUDA). Stand-ins:
    - a stub selective_scan_cuda (Mamba-1's CUDA extension), so that mamba_ssm imports;
    - causal-conv1d's CUDA functions as torch code;
    - Mamba-3's kernel modules re-run from their source with tl.cos / tl.sin / a tanh for their inline-PTX
      approximations, without their is_cuda asserts, and with bfloat16 read as float32 (kernel vs model in fp32);
    - while in the block: torch.cuda.device as a no-op (CPU torch refuses torch.cuda.device(None)), an SM count of
      1, and an autotuner that takes the first config without timing it."""
    if SRC is None or any(importlib.util.find_spec(m) is None for m in ("einops", "triton")) \
            or os.environ.get("TRITON_INTERPRET") != "1":
        yield None
        return
    if not _interpreted:
        before, path = set(sys.modules), list(sys.path)
        sys.modules["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")
        sys.path.insert(0, SRC)
        try:
            import mamba_ssm.ops.triton.ssd_combined as ssd
            from mamba_ssm.ops.triton.selective_state_update import selective_state_update

            class ForCPU(ast.NodeTransformer):
                def visit_Call(self, node):  # "cos.approx.f32 $0, $1;" on args=[x] -> tl.cos(x)
                    if ast.unparse(node.func) != "tl.inline_asm_elementwise":
                        return self.generic_visit(node)
                    x = ast.unparse(next(k.value for k in node.keywords if k.arg == "args").elts[0])
                    op = node.args[0].value.split(".")[0]
                    return ast.parse(f"2 * tl.sigmoid(2 * {x}) - 1" if op == "tanh" else f"tl.{op}({x})").body[0].value

                def visit_Assert(self, node):
                    return None if "is_cuda" in ast.unparse(node.test) else node

                def visit_Attribute(self, node):
                    return ast.Attribute(node.value, "float32", node.ctx) if node.attr == "bfloat16" else node

            m3 = "mamba_ssm.ops.triton.mamba3."
            for name in ("utils", "angle_dt", "mamba3_siso_fwd", "mamba3_siso_bwd", "mamba3_siso_step",
                         "mamba3_siso_combined"):  # in place, in order: each imports the new code of those before
                mod = importlib.import_module(m3 + name)
                src, file = ast.unparse(ForCPU().visit(ast.parse(open(mod.__file__).read()))), mod.__file__ + ".cpu"
                linecache.cache[file] = len(src), None, src.splitlines(True), file  # the interpreter reads it back
                exec(compile(src, file, "exec"), mod.__dict__)
            mamba3 = importlib.import_module("mamba_ssm.modules.mamba3")
            mamba3.mamba3_siso_combined = sys.modules[m3 + "mamba3_siso_combined"].mamba3_siso_combined

            def conv_fwd(x, weight, bias, seq_idx, initial_states, final_states_out, silu):
                assert seq_idx is None and initial_states is None and final_states_out is None
                y = F.conv1d(F.pad(x, (weight.shape[1] - 1, 0)), weight.unsqueeze(1), bias, groups=x.shape[1])
                return F.silu(y) if silu else y

            def conv_bwd(x, weight, bias, dout, seq_idx, initial_states, dfinal_states, dx, return_dinitial, silu):
                with torch.enable_grad():
                    x, weight, bias = (t.detach().requires_grad_() for t in (x, weight, bias))
                    y = conv_fwd(x, weight, bias, None, None, None, silu)
                return (*torch.autograd.grad(y, (x, weight, bias), dout), None)

            def conv_update(x, conv_state, weight, bias, activation):
                conv_state.copy_(torch.cat([conv_state[..., 1:], x.unsqueeze(-1)], -1))
                return F.silu((conv_state * weight).sum(-1) + bias)

            ssd.causal_conv1d_fwd_function, ssd.causal_conv1d_bwd_function = conv_fwd, conv_bwd
            _interpreted.update(
                Mamba3=mamba3.Mamba3, causal_conv1d_update=conv_update, selective_state_update=selective_state_update,
                mamba_chunk_scan_combined=ssd.mamba_chunk_scan_combined,
                mamba_split_conv1d_scan_combined=ssd.mamba_split_conv1d_scan_combined,
                mamba3_siso_combined=mamba3.mamba3_siso_combined,
                mamba3_siso_step=sys.modules[m3 + "mamba3_siso_step"].mamba3_siso_step)
        finally:  # what imports mamba_ssm later gets the real package
            for name in set(sys.modules) - before - {n for n in sys.modules if n.split(".")[0] == "triton"}:
                del sys.modules[name]
            sys.path[:] = path
    from triton.runtime.autotuner import Autotuner
    saved = torch.cuda.device, torch.cuda.get_device_properties, Autotuner._bench
    torch.cuda.device = lambda index: contextlib.nullcontext()
    torch.cuda.get_device_properties = lambda device: SimpleNamespace(multi_processor_count=1)
    Autotuner._bench = lambda self, *args, config, **meta: self.configs.index(config)
    try:
        yield types.SimpleNamespace(**_interpreted)
    finally:
        torch.cuda.device, torch.cuda.get_device_properties, Autotuner._bench = saved


# -----------------------------------------------------------------------------

def test_block_pattern_tiling_and_errors():
    assert GPT(tiny_config("TMM", n_layer=7)).pattern == "TMMTMMT"
    assert GPT(tiny_config("TM")).pattern == "TMTM"
    for bad in ("", "TX", "tm", "TMTMT"):  # bad char, lowercase, longer than n_layer=4
        try:
            GPT(tiny_config(bad))
        except ValueError as e:
            assert repr(bad) in str(e)
        else:
            raise AssertionError(f"block_pattern={bad!r} accepted")
    for kw in (dict(n_kv_head=3), dict(mamba_version=4)):
        try:
            GPT(tiny_config("M", **kw))
        except ValueError:
            pass
        else:
            raise AssertionError(f"{kw} accepted")


def check_scan(scan, dtype, atol, shapes=((2, 37, 8, 4), (1, 64, 16, 16), (3, 1, 4, 2), (2, 130, 40, 16))):
    """scan(x, dt, A, B, C, h0) against scan_ref in float64: outputs, final state, and all six gradients."""
    torch.manual_seed(0)
    for b, L, D, N in shapes:
        x, B, C = torch.randn(b, L, D), torch.randn(b, L, N), torch.randn(b, L, N)
        dt = F.softplus(torch.randn(b, L, D) - 1)
        A = -torch.exp(torch.randn(D, N))
        h0 = torch.randn(b, D, N)
        inputs = [t.to(dtype).requires_grad_() for t in (x, dt, A, B, C, h0)]
        inputs_ref = [t.double().requires_grad_() for t in (x, dt, A, B, C, h0)]
        y, h = scan(*inputs)
        y_ref, h_ref = scan_ref(*inputs_ref)
        assert y.dtype == dtype and torch.allclose(y.double(), y_ref, atol=atol)
        assert torch.allclose(h.double(), h_ref, atol=atol)
        gy, gh = torch.randn_like(y_ref), torch.randn_like(h_ref)
        grads = torch.autograd.grad((y * gy.to(dtype)).sum() + (h * gh.to(dtype)).sum(), inputs)
        grads_ref = torch.autograd.grad((y_ref * gy).sum() + (h_ref * gh).sum(), inputs_ref)
        for name, g, g_ref in zip("x dt A B C h0".split(), grads, grads_ref):
            scale = g_ref.abs().max().item()
            assert torch.allclose(g.double(), g_ref, atol=atol * max(1, scale)), f"grad {name} at {(b, L, D, N)}"


def test_chunked_scan_matches_sequential_reference():
    check_scan(chunked_scan, torch.float64, 1e-10)
    check_scan(selective_scan, torch.float64, 1e-10, shapes=((3, 1, 4, 2),))  # one step from a state: decode


def test_cpu_scan_kernel_matches_sequential_reference():
    if cpu_scan.cpu_scan_kernel() is None:
        return skip("no C compiler: the CPU kernel is not built (the chunked scan runs instead)")
    assert (torch.tensor([1e-39]) * 1.0).item() > 0, "loading the kernel switched the process to flush-to-zero"
    kernel = lambda *inputs: cpu_scan.cpu_scan(*inputs)[:2]  # selective_scan takes one step (L = 1) itself
    check_scan(kernel, torch.float32, 2e-5)
    check_scan(kernel, torch.float32, 2e-5, shapes=((1, 300, 70, 3),))  # several checkpoints, ragged blocks
    check_scan(selective_scan, torch.float32, 2e-5, shapes=((2, 37, 8, 4),))  # on CPU in fp32 it runs the kernel


def test_mamba_falls_back_to_the_pytorch_scan():
    """Without a C compiler the mixer runs chunked_scan: same outputs and gradients."""
    torch.manual_seed(0)
    m = Mamba(d_model=32, d_state=8)
    u = torch.randn(2, 40, 32, requires_grad=True)
    y = m(u)
    g = torch.autograd.grad(y.square().sum(), [u, m.A_log, m.dt_proj.bias])
    kernel = cpu_scan.cpu_scan_kernel
    cpu_scan.cpu_scan_kernel = lambda: None
    try:
        y_fallback = m(u)
        g_fallback = torch.autograd.grad(y_fallback.square().sum(), [u, m.A_log, m.dt_proj.bias])
    finally:
        cpu_scan.cpu_scan_kernel = kernel
    assert torch.allclose(y, y_fallback, atol=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-5) for a, b in zip(g, g_fallback))


def test_cpu_scan_cache_trusts_only_a_private_hashed_library(tmp_path):
    """A planted library (wrong hash) is never loaded, a truncated one is rebuilt, a group-writable cache is refused
    in one line, and a library that never loads falls back to the chunked scan. Each case has its own cache
    directory: dlopen would hand back an already loaded path without reading the new file."""
    import contextlib, io
    def kernel(case, cc="cc"):
        os.environ["XDG_CACHE_HOME"], os.environ["CC"] = str(tmp_path / case), cc
        cpu_scan.cpu_scan_kernel.cache_clear()
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            lib = cpu_scan.cpu_scan_kernel()
        return lib, err.getvalue().strip()
    env = {k: os.environ.get(k) for k in ("XDG_CACHE_HOME", "CC")}
    try:
        lib, err = kernel("fresh")
        if lib is None:
            return skip("no C compiler")
        good = next((tmp_path / "fresh/hybrid-gpt").glob("scan-*.so"))
        assert err == "" and good.parent.stat().st_mode & 0o777 == 0o700 and not good.stat().st_mode & 0o077
        for case in ("planted", "truncated"):
            (tmp_path / case / "hybrid-gpt").mkdir(mode=0o700, parents=True)
            Path(f"{tmp_path / case / 'hybrid-gpt' / good.name}.sha256").write_text(Path(f"{good}.sha256").read_text())
        marker, planted = tmp_path / "constructor_ran", tmp_path / "planted/hybrid-gpt" / good.name
        (tmp_path / "evil.c").write_text(f'#include <stdio.h>\n__attribute__((constructor)) static void f(void) '
                                         f'{{ fclose(fopen("{marker}", "w")); }}\n')
        subprocess.run(["cc", "-shared", "-fPIC", str(tmp_path / "evil.c"), "-o", str(planted)], check=True)
        (tmp_path / "truncated/hybrid-gpt" / good.name).write_bytes(good.read_bytes()[:4096])
        for case in ("planted", "truncated"):  # both rebuilt over, then loaded
            lib, err = kernel(case)
            rebuilt = tmp_path / case / "hybrid-gpt" / good.name
            assert lib is not None and err == "" and cpu_scan.sha256(rebuilt) == Path(f"{rebuilt}.sha256").read_text()
        assert not marker.exists()
        (tmp_path / "shared/hybrid-gpt").mkdir(parents=True)
        (tmp_path / "shared/hybrid-gpt").chmod(0o770)
        lib, err = kernel("shared")
        assert lib is not None and len(err.splitlines()) == 1 and "not using the kernel cache" in err
        assert str(tmp_path / "shared/hybrid-gpt") in err and os.listdir(tmp_path / "shared/hybrid-gpt") == []
        junk = tmp_path / "junk_cc"  # "compiles" to a file that is no library
        junk.write_text('#!/bin/sh\nwhile [ "$1" != -o ]; do shift; done; echo junk > "$2"\n')
        junk.chmod(0o755)
        lib, err = kernel("junk", str(junk))
        assert lib is None and len(err.splitlines()) == 1 and "using the chunked PyTorch scan" in err
    finally:
        for k, v in env.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        cpu_scan.cpu_scan_kernel.cache_clear()


def test_ssd_scan_matches_sequential_reference():
    """Mamba-2's chunked SSD form == the Mamba-1 recurrence with A constant within a head."""
    torch.manual_seed(0)
    for b, L, H, P, N, Q in ((2, 37, 3, 4, 5, 8), (1, 16, 2, 2, 3, 16), (2, 5, 1, 3, 2, 64), (2, 1, 2, 3, 4, 8)):
        x, B, C = torch.randn(b, L, H, P, dtype=torch.float64), torch.randn(b, L, N, dtype=torch.float64), \
            torch.randn(b, L, N, dtype=torch.float64)
        dt = F.softplus(torch.randn(b, L, H, dtype=torch.float64) - 1)
        A = -torch.exp(torch.randn(H, dtype=torch.float64))
        h0 = torch.randn(b, H, P, N, dtype=torch.float64)
        inputs = [t.requires_grad_() for t in (x, dt, A, B, C, h0)]
        y, h = ssd_scan(x * dt.unsqueeze(-1), dt * A, B, C, Q, h0)
        y_ref, h_ref = scan_ref(x.reshape(b, L, H * P), dt.repeat_interleave(P, -1),
                                A.repeat_interleave(P).unsqueeze(-1).expand(H * P, N), B, C, h0.reshape(b, H * P, N))
        assert torch.allclose(y.reshape(b, L, H * P), y_ref) and torch.allclose(h.reshape(b, H * P, N), h_ref)
        gy, gh = torch.randn_like(y), torch.randn_like(h)
        grads = torch.autograd.grad((y * gy).sum() + (h * gh).sum(), inputs)
        loss_ref = (y_ref * gy.reshape(b, L, H * P)).sum() + (h_ref * gh.reshape(b, H * P, N)).sum()
        grads_ref = torch.autograd.grad(loss_ref, inputs)
        for name, g, g_ref in zip("x dt A B C h0".split(), grads, grads_ref):
            assert torch.allclose(g, g_ref), f"grad {name} at {(b, L, H, P, N, Q)}"
    ref = mamba_ssm_reference()
    if ref is None:
        return skip("mamba-ssm sources or einops not found: ssd_minimal_discrete not compared")
    x, a, B, C = torch.randn(2, 64, 3, 4), -torch.rand(2, 64, 3), torch.randn(2, 64, 5), torch.randn(2, 64, 5)
    y, h = ssd_scan(x, a, B, C, 16)
    per_head = lambda t: t.unsqueeze(2).expand(-1, -1, 3, -1)
    y_ref, h_ref = ref.ssd_minimal_discrete(x, a, per_head(B), per_head(C), 16)
    assert torch.allclose(y, y_ref, atol=1e-5) and torch.allclose(h, h_ref, atol=1e-5)


def test_mamba_state_dict_matches_mamba_ssm():
    # from mamba_ssm/modules/mamba_simple.py: d_inner = expand * d_model, dt_rank = ceil(d_model / 16)
    m = Mamba(d_model=64, d_state=16, d_conv=4, expand=2)
    expected = {"A_log": (128, 16), "D": (128,), "in_proj.weight": (256, 64), "conv1d.weight": (128, 1, 4),
                "conv1d.bias": (128,), "x_proj.weight": (4 + 32, 128), "dt_proj.weight": (128, 4),
                "dt_proj.bias": (128,), "out_proj.weight": (64, 128)}
    assert {k: tuple(v.shape) for k, v in m.state_dict().items()} == expected
    assert torch.equal(m.A_log, torch.log(torch.arange(1, 17.0)).repeat(128, 1)) and torch.all(m.D == 1)
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001 and dt.std() > 0.01  # log-uniform in [dt_min, dt_max]
    ref = mamba_ssm_reference()
    if ref is None:
        return skip("mamba-ssm sources or einops not found: compared with the hard-coded list only")
    theirs = ref.Mamba(d_model=64, d_state=16, d_conv=4, expand=2)
    assert {k: v.shape for k, v in theirs.state_dict().items()} == {k: v.shape for k, v in m.state_dict().items()}


def test_mamba_matches_mamba_ssm_module():
    """Their module (run on CPU with selective_scan_ref) and ours, same weights: outputs, gradients, decode steps."""
    ref = mamba_ssm_reference()
    if ref is None:
        return skip("mamba-ssm sources or einops not found")
    torch.manual_seed(0)
    theirs = ref.Mamba(d_model=32, d_state=8, d_conv=4, expand=2, layer_idx=0)
    ours = Mamba(d_model=32, d_state=8, d_conv=4, expand=2)
    ours.load_state_dict(theirs.state_dict())
    u = torch.randn(2, 50, 32, requires_grad=True)
    y_theirs, y_ours = theirs(u), ours(u)
    assert torch.allclose(y_ours, y_theirs, rtol=1e-5, atol=1e-5), (y_ours - y_theirs).abs().max()
    g = torch.randn_like(y_ours)
    gu_theirs, *gp_theirs = torch.autograd.grad((y_theirs * g).sum(), [u, *theirs.parameters()])
    gu_ours, *gp_ours = torch.autograd.grad((y_ours * g).sum(), [u, *ours.parameters()])
    assert torch.allclose(gu_ours, gu_theirs, rtol=1e-4, atol=1e-5)
    for (name, _), a, b in zip(theirs.named_parameters(), gp_ours, gp_theirs):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), f"grad {name}: {(a - b).abs().max()}"
    # decoding: their step() (pure-PyTorch branch) vs ours, token by token after a prefill
    params = types.SimpleNamespace(key_value_memory_dict={}, seqlen_offset=0)
    state = ours.allocate_state(2)
    with torch.no_grad():
        theirs(u[:, :20], inference_params=params)
        ours(u[:, :20], state)
        steps = []
        for t in range(20, 30):
            params.seqlen_offset = t
            a, b = theirs(u[:, t:t + 1], inference_params=params), ours(u[:, t:t + 1], state)
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
            steps.append(b)
    assert torch.allclose(torch.cat(steps, 1), y_ours[:, 20:30], rtol=1e-5, atol=1e-5)


def test_mamba2_matches_mamba_ssm_module():
    ref = mamba_ssm_reference()
    if ref is None:
        return skip("mamba-ssm sources or einops not found")
    torch.manual_seed(0)
    theirs = ref.Mamba2(d_model=32, d_state=8, headdim=16, chunk_size=16, use_mem_eff_path=False, layer_idx=0)
    ours = Mamba2(d_model=32, d_state=8, headdim=16, chunk_size=16)
    assert {k: v.shape for k, v in theirs.state_dict().items()} == {k: v.shape for k, v in ours.state_dict().items()}
    theirs = randomize(theirs)  # norm weight and all matrices away from their init
    theirs.norm.weight.data.uniform_(0.5, 1.5)
    ours.load_state_dict(theirs.state_dict())
    u = torch.randn(2, 48, 32, requires_grad=True)  # 3 chunks
    y_theirs, y_ours = theirs(u), ours(u)
    assert torch.allclose(y_ours, y_theirs, rtol=1e-4, atol=1e-5), (y_ours - y_theirs).abs().max()
    g = torch.randn_like(y_ours)
    gu_theirs, *gp_theirs = torch.autograd.grad((y_theirs * g).sum(), [u, *theirs.parameters()])
    gu_ours, *gp_ours = torch.autograd.grad((y_ours * g).sum(), [u, *ours.parameters()])
    assert torch.allclose(gu_ours, gu_theirs, rtol=1e-4, atol=1e-5)
    ours_grads = dict(zip([n for n, _ in ours.named_parameters()], gp_ours))
    for (name, _), b in zip(theirs.named_parameters(), gp_theirs):
        assert torch.allclose(ours_grads[name], b, rtol=1e-4, atol=1e-4), f"grad {name}"
    params = types.SimpleNamespace(key_value_memory_dict={}, seqlen_offset=0)
    state = ours.allocate_state(2)
    with torch.no_grad():
        theirs(u[:, :32], inference_params=params)  # ssd_minimal_discrete takes whole chunks only
        ours(u[:, :32], state)
        for t in range(32, 42):
            params.seqlen_offset = t
            assert torch.allclose(theirs(u[:, t:t + 1], inference_params=params), ours(u[:, t:t + 1], state),
                                  rtol=1e-4, atol=1e-5)


def test_mamba2_init_matches_mamba_ssm():
    m = Mamba2(d_model=64, d_state=16, headdim=16)
    A = -torch.exp(m.A_log)
    assert A.shape == (8,) and (A <= -1).all() and (A >= -16).all() and torch.all(m.D == 1)
    dt = F.softplus(m.dt_bias)
    assert 1e-3 * 0.999 <= dt.min() and dt.max() <= 0.1 * 1.001 and torch.all(m.norm.weight == 1)


@contextlib.contextmanager
def kernels_on_cpu(kernels):
    """model.py's kernel branches, fed mamba-ssm's interpreted kernels for CPU tensors; yields the names called."""
    called = set()
    counted = {name: functools.partial(lambda name, f, *a, **kw: called.add(name) or f(*a, **kw), name, f)
               for name, f in (kernels or {}).items()}
    saved, model.kernels_for = model.kernels_for, lambda x: counted if kernels else None
    try:
        yield called
    finally:
        model.kernels_for = saved


@torch.no_grad()
def perturbed(m):
    """randomize(m), and every other parameter moved off its init too, so that each one matters."""
    for p in randomize(m).parameters():
        if p.ndim != 2:
            p.add_(0.2 * torch.randn_like(p))
    return m


def forward_and_grads(m, u, g):
    y = m(u)
    return y, torch.autograd.grad((y * g).sum(), [u, *m.parameters()])


def test_mamba3_matches_mamba_ssm_triton_kernel():
    """mamba-ssm's Mamba3 module on its fused SISO Triton kernel (forward and backward, run by the interpreter in
    fp32) vs ours, same weights: state dicts both ways, outputs, gradients, the states a prefill leaves; then our
    decode steps vs mamba-ssm's Triton step kernel, and our kernel branch continuing a prefill."""
    with mamba_ssm_triton() as kernels:
        if kernels is None:
            return skip("triton (interpreting), einops or the mamba-ssm sources not found")
        torch.manual_seed(0)
        theirs = kernels.Mamba3(d_model=16, d_state=16, headdim=16, chunk_size=16, layer_idx=0)
        ours = Mamba3(d_model=16, d_state=16, headdim=16, chunk_size=16)
        shapes = lambda m: [(k, v.shape) for k, v in m.state_dict().items()]
        assert shapes(theirs) == shapes(ours)
        for name in ("B_bias", "C_bias", "B_norm.weight", "C_norm.weight", "D"):  # the deterministic init
            assert torch.equal(theirs.state_dict()[name], ours.state_dict()[name]), name
        theirs.load_state_dict(perturbed(ours).state_dict())
        ours.load_state_dict(theirs.state_dict())
        u, g = torch.randn(2, 28, 16, requires_grad=True), torch.randn(2, 28, 16)  # a chunk and a partial one
        (y_theirs, grads_theirs), (y_ours, grads_ours) = (forward_and_grads(m, u, g) for m in (theirs, ours))
        assert torch.allclose(y_ours, y_theirs, rtol=1e-3, atol=1e-4), (y_ours - y_theirs).abs().max()
        for name, a, b in zip(["u", *dict(ours.named_parameters())], grads_ours, grads_theirs):
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-4), f"grad {name}: {(a - b).abs().max()}"
        params, state = SimpleNamespace(key_value_memory_dict={}, seqlen_offset=0), ours.allocate_state(2)
        with torch.no_grad():
            theirs(u[:, :16], inference_params=params), ours(u[:, :16], state)
            for name, a, b in zip(("angle", "ssm", "k", "v"), state, params.key_value_memory_dict[0]):  # layouts too
                assert torch.allclose(a, b, rtol=1e-3, atol=1e-4), f"prefill state {name}"
            cache = params.key_value_memory_dict[0]
            for t in range(16, 18):  # their Triton step on their states, from our projections
                z, x, BC, dt, adt, trap, angle = ours.project(u[:, t])
                y, new = kernels.mamba3_siso_step(
                    BC[:, 1], BC[:, 0], x, adt, dt, trap, ours.C_bias.squeeze(1), ours.B_bias.squeeze(1),
                    angle.unsqueeze(1).expand(-1, 2, -1), ours.D, z, [s.squeeze(1) for s in cache])
                for s, n in zip(cache, new):
                    s.copy_(n.view(s.shape))
                y_ours_t = ours(u[:, t:t + 1], state)[:, 0]
                assert torch.allclose(y_ours_t, ours.out_proj(y.flatten(1)), rtol=1e-3, atol=1e-4)
            with kernels_on_cpu(dict(mamba3_siso_combined=kernels.mamba3_siso_combined)) as called:
                y_kernel, y_kernel_continued = ours(u), ours(u[:, 18:], state)
            assert called == {"mamba3_siso_combined"}
            assert torch.allclose(y_kernel, y_ours, rtol=1e-3, atol=1e-4)
            assert torch.allclose(y_kernel_continued, y_ours[:, 18:], rtol=1e-3, atol=1e-4)


def test_mamba3_decode_and_chunked_prefill_match_full_forward():
    """Decoding token by token (the recurrence, one step of ssd_scan) and chunked prefills vs the chunked forward;
    init as mamba-ssm's."""
    torch.manual_seed(0)
    m = Mamba3(d_model=32, d_state=8, headdim=8, chunk_size=8)
    dt = F.softplus(m.dt_bias)
    assert 1e-3 * 0.999 <= dt.min() and dt.max() <= 0.1 * 1.001 and torch.all(m.B_bias == 1) and torch.all(m.D == 1)
    perturbed(m)
    with torch.no_grad():
        u = torch.randn(2, 30, 32)
        y = m(u)
        state = m.allocate_state(2)
        steps = torch.cat([m(u[:, t:t + 1], state) for t in range(30)], 1)
        assert torch.allclose(steps, y, rtol=1e-4, atol=1e-5), (steps - y).abs().max()
        state = m.allocate_state(2)
        parts = torch.cat([m(u[:, a:b], state) for a, b in ((0, 5), (5, 6), (6, 23), (23, 30))], 1)
        assert torch.allclose(parts, y, rtol=1e-4, atol=1e-5), (parts - y).abs().max()
    for bad in (dict(d_state=2), dict(headdim=24)):
        try:
            Mamba3(d_model=32, **bad)
        except ValueError:
            pass
        else:
            raise AssertionError(f"{bad} accepted")


def test_mamba2_kernel_branch_matches_pytorch_under_triton_interpreter():
    """model.py's Mamba-2 fused-kernel branch (mamba_split_conv1d_scan_combined; mamba_chunk_scan_combined from a
    state; selective_state_update decode), run on CPU by Triton's interpreter, vs its PyTorch path."""
    with mamba_ssm_triton() as kernels:
        if kernels is None:
            return skip("triton (interpreting), einops or the mamba-ssm sources not found")
        torch.manual_seed(0)
        m = randomize(Mamba2(d_model=16, d_state=16, headdim=16, chunk_size=16))
        m.norm.weight.data.uniform_(0.5, 1.5)
        u, g = torch.randn(2, 24, 16, requires_grad=True), torch.randn(2, 24, 16)
        runs = []
        for k in (None, vars(kernels)):
            with kernels_on_cpu(k) as called:
                with torch.no_grad():
                    state = m.allocate_state(2)
                    decode = [m(u[:, :20], state)] + [m(u[:, t:t + 1], state) for t in range(20, 22)]
                runs.append((*forward_and_grads(m, u, g), torch.cat(decode, 1)))
        assert called == {"mamba_split_conv1d_scan_combined", "mamba_chunk_scan_combined", "causal_conv1d_update",
                          "selective_state_update"}, called
        (y, grads, decode), (y_k, grads_k, decode_k) = runs
        assert torch.allclose(y_k, y, rtol=1e-3, atol=1e-4), (y_k - y).abs().max()
        for name, a, b in zip(["u", *dict(m.named_parameters())], grads_k, grads):
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-4), f"grad {name}: {(a - b).abs().max()}"
        assert torch.allclose(decode_k, decode, rtol=1e-3, atol=1e-4) and torch.allclose(decode, y[:, :22], atol=1e-4)


def test_decode_matches_full_recompute():
    for pattern, version in (("T", 1), ("M", 1), ("TM", 1), ("MMT", 1), ("M", 2), ("MMT", 2), ("MMT", 3)):
        torch.manual_seed(0)
        model = randomize(GPT(tiny_config(pattern, mamba_version=version, headdim=16))).eval()
        prompt = torch.randint(0, 101, (2, 9))
        out = model.generate(prompt, 12)
        seq = prompt
        cache = model.init_cache(2, 9 + 12)
        logits_step, _ = model(prompt, cache=cache)
        with torch.no_grad():
            for i in range(12):
                logits_full, _ = model(seq)  # recompute everything
                assert (logits_full[:, -1] - logits_step[:, -1]).abs().max() < 1e-4, (pattern, version, i)
                seq = torch.cat([seq, logits_full[:, -1].argmax(-1, keepdim=True)], 1)
                logits_step, _ = model(seq[:, -1:], cache=cache)
        assert torch.equal(out, seq), (pattern, version)
        assert len(set(seq[:, 9:].flatten().tolist())) > 3, "degenerate model: the test would prove nothing"


@torch.no_grad()
def test_chunked_prefill_continues_a_cache():
    """Prefill 7 tokens, then chunks of 9, 1, 3 (multi-hop RAG appends documents mid-conversation)."""
    for pattern, version in (("T", 1), ("M", 1), ("TM", 1), ("MMT", 1), ("MMT", 2), ("MMT", 3)):
        torch.manual_seed(1)
        model = randomize(GPT(tiny_config(pattern, mamba_version=version, headdim=16))).eval()
        idx = torch.randint(0, 101, (2, 20))
        full, _ = model(idx)
        cache = model.init_cache(2, 20)
        parts = [model(idx[:, a:b], cache=cache)[0] for a, b in ((0, 7), (7, 16), (16, 17), (17, 20))]
        assert cache.pos == 20
        assert (torch.cat(parts, 1) - full).abs().max() < 1e-4, (pattern, version)
        try:
            model(idx[:, :1], cache=cache)
        except ValueError as e:
            assert "max_len=20" in str(e)
        else:
            raise AssertionError("overflowing the cache was accepted")


@torch.no_grad()
def test_kv_position_advances_when_last_layer_is_mamba():
    model = randomize(GPT(tiny_config("TM", n_layer=2))).eval()
    idx = torch.randint(0, 101, (1, 6))
    cache = model.init_cache(1, 6)
    for t in range(6):
        logits, _ = model(idx[:, t:t + 1], cache=cache)
    assert cache.pos == 6
    assert (logits[:, -1] - model(idx)[0][:, -1]).abs().max() < 1e-4


def test_dt_bias_survives_gpt_init():
    model = GPT(tiny_config("M"))
    for block in model.transformer.h:
        dt = F.softplus(block.mixer.dt_proj.bias)
        assert 1e-3 * 0.999 <= dt.min() and dt.max() <= 0.1 * 1.001 and dt.std() > 0.01
        assert torch.all(block.mixer.D == 1) and block.mixer.A_log[0, -1] == math.log(16)


def test_meta_device_init_leaves_nothing_uninitialised():
    with torch.device("meta"):
        model = GPT(tiny_config("TM"))
    model.to_empty(device="cpu")
    for p in model.parameters():  # fill with garbage: init_weights must overwrite every parameter
        p.data.fill_(float("nan"))
    model.init_weights()
    for name, p in model.named_parameters():
        assert torch.isfinite(p).all(), name
    dt = F.softplus(model.transformer.h[1].mixer.dt_proj.bias)
    assert 1e-3 * 0.999 <= dt.min() and dt.max() <= 0.1 * 1.001
    logits, loss = model(torch.randint(0, 101, (1, 8)), torch.randint(0, 101, (1, 8)))
    assert torch.isfinite(loss) and abs(loss.item() - math.log(101)) < 0.1


def test_optimizer_groups():
    for version in (1, 2):
        check_optimizer_groups(GPT(tiny_config("TM", mamba_mlp=True, mamba_version=version, headdim=16)))
    with torch.device("meta"):  # to_empty() drops parameter attributes: the groups must not depend on them
        model = GPT(tiny_config("TM", mamba_mlp=True))
    model.to_empty(device="cpu")
    model.init_weights()
    check_optimizer_groups(model)


def check_optimizer_groups(model):
    (adamw,) = model.configure_optimizers(1e-3, 0.1, (0.9, 0.95), "cpu")
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for g in adamw.param_groups for p in g["params"]) == sorted(names.values())
    no_decay = {names[id(p)] for g in adamw.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    mixer = {n for n in names.values()
             if n.startswith("transformer.h.1.mixer.") and not n.endswith(("proj.weight", "conv1d.weight"))}
    assert mixer <= no_decay and {"transformer.h.1.mixer.A_log", "transformer.h.1.mixer.D"} <= mixer  # + dt/conv biases
    assert "transformer.h.1.mixer.in_proj.weight" not in no_decay and "transformer.h.0.attn.c_q.weight" not in no_decay
    x = torch.randint(0, 101, (2, 16))  # one step changes every parameter that gets a gradient
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(x, x)[1].backward()
    adamw.step()
    # (attention's c_proj starts at zero, so q_gain's first gradient is exactly zero)
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters() if p.grad is not None and p.grad.any())
    wte = next(g for g in adamw.param_groups if any(p is model.transformer.wte.weight for p in g["params"]))
    assert len(wte["params"]) == 1 and wte["weight_decay"] == 0 and wte["lr"] == 1e-3  # embedding_lr_mult=1
    (emb_fast,) = model.configure_optimizers(1e-3, 0.1, (0.9, 0.95), "cpu", embedding_lr_mult=10)
    assert emb_fast.param_groups[-1]["params"][0] is model.transformer.wte.weight and emb_fast.param_groups[-1]["lr"] == 1e-2


def test_pure_transformer_state_dict_is_a_plain_gpt():
    sd = GPT(tiny_config("T", n_layer=2)).state_dict()
    per_layer = ["attn.q_gain", "attn.c_q.weight", "attn.c_k.weight", "attn.c_v.weight", "attn.c_proj.weight",
                 "mlp.c_fc.weight", "mlp.c_proj.weight"]
    assert list(sd) == ["transformer.wte.weight"] + [f"transformer.h.{i}.{k}" for i in range(2) for k in per_layer] \
        + ["lm_head.weight"]


def test_loss_mask_reduction_and_dtypes():
    torch.manual_seed(0)
    model = randomize(GPT(tiny_config("TM")))
    idx = torch.randint(0, 101, (2, 10))
    targets = idx.clone()
    targets[:, :4] = -1
    logits, loss = model(idx, targets)
    _, losses = model(idx, targets, loss_reduction="none")
    assert logits.shape == (2, 10, 101) and logits.dtype == torch.float32 and losses.shape == (2, 10)
    assert torch.all(losses[:, :4] == 0)
    assert torch.allclose(loss, losses[:, 4:].mean())
    assert torch.allclose(loss, F.cross_entropy(logits[:, 4:].reshape(-1, 101), idx[:, 4:].reshape(-1)))
    for dtype in (torch.bfloat16, torch.float64):  # nothing hard-codes a dtype
        logits_d, loss_d = model.to(dtype)(idx, targets)
        assert logits_d.dtype == torch.float32 and abs(loss_d.item() - loss.item()) < 0.05 * loss.item()
        assert model.generate(idx[:, :3], 4).shape == (2, 7)


def test_from_checkpoint_round_trip():
    import dataclasses
    model = randomize(GPT(tiny_config("MMT", mamba_mlp=True)))
    with tempfile.TemporaryDirectory() as d:
        torch.save({"model": model.state_dict(), "model_args": dataclasses.asdict(model.config)}, f"{d}/ckpt.pt")
        loaded = GPT.from_checkpoint(torch.load(f"{d}/ckpt.pt", weights_only=True))
    idx = torch.randint(0, 101, (1, 12))
    assert loaded.pattern == "MMTM" and torch.equal(model(idx)[0], loaded(idx)[0])
    try:
        GPT.from_checkpoint({"model": {}, "model_args": dataclasses.asdict(model.config) | {"n_lyer": 3}})
    except TypeError as e:  # GPTConfig's own error; load_model and train.py turn it into one line naming the file
        assert "n_lyer" in str(e)
    else:
        raise AssertionError("unknown model_args key accepted")


def test_checkpoints_and_kbs_written_by_format_1_still_load_identically():
    """dev/compat holds tiny checkpoints (Mamba-1/2/3 hybrids, from train.py, optimizer state dropped) and KBs
    (retrieve.py --type bm25 / dense / hybrid), written by the code of the first stable layout, with their logits
    and search results: later code must read them and give the same numbers."""
    from common import load_checkpoint
    from retrieve import load_kb
    fx = os.path.join(HERE, "dev", "compat")
    expected = json.load(open(os.path.join(fx, "expected.json")))
    for name, e in expected["logits"].items():
        ckpt = load_checkpoint(os.path.join(fx, name))
        m = GPT.from_checkpoint(ckpt).eval()
        assert Tokenizer.from_json(ckpt["tokenizer"]).vocab_size == m.config.vocab_size
        with torch.no_grad():
            logits = m(torch.tensor([e["ids"]]))[0][0]
        assert logits.argmax(-1).tolist() == e["argmax"], name
        assert torch.allclose(logits[-1, :32], torch.tensor(e["last"]), atol=1e-5), name
    for name, queries in expected["retrieval"].items():
        kb = load_kb(os.path.join(fx, name))
        for q, hits in queries.items():
            got = kb.retrieve(q, 5)
            assert [d.id for d, _ in got] == [i for i, _ in hits], (name, q)
            assert np.allclose([s for _, s in got], [s for _, s in hits], atol=1e-4), (name, q)


def test_sample_next():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0]])
    assert sample_next(logits).item() == 1
    g = torch.Generator().manual_seed(0)
    draws = [sample_next(logits, temperature=1.0, generator=g).item() for _ in range(200)]
    assert {1, 3} <= set(draws) and draws.count(1) > draws.count(3) > draws.count(2)  # softmax: 72%, 26%, 1.3%
    assert {sample_next(logits, temperature=0.05, generator=g).item() for _ in range(50)} == {1}


def test_flops_per_token():
    model = GPT(tiny_config("TM", n_layer=2))
    matmul = model.num_params() - model.transformer.wte.weight.numel()
    f256, f512 = model.flops_per_token(256), model.flops_per_token(512)
    assert f512 - f256 == 12 * 64 * 256  # one attention layer's score/value term grows with the context
    assert 6 * matmul < f256 - 12 * 64 * 256 < 7 * matmul  # + scan and conv terms of the M layer


# -----------------------------------------------------------------------------
# retrieve.py

def make_docs(n, seed=0, start=0):
    """Short encyclopedia-like documents over a small vocabulary: many shared terms, some repeated."""
    rng = np.random.default_rng(seed)
    names = ["kelmar", "odrissi", "velnor", "tarsi", "ombra", "quill", "brenna", "solvak", "ithra", "dunmere"]
    words = ["born", "city", "river", "works", "as", "a", "the", "smith", "painter", "in", "of", "north", "old"]
    docs = []
    for i in range(start, start + n):
        toks = rng.choice(names + words, size=rng.integers(3, 15)).tolist()
        docs.append(Document(id=f"d{i}", title=f"{names[i % 10].title()} {i}", text=" ".join(toks)))
    return docs

QUERIES = ["kelmar born velnor", "the the city", "painter of the north", "Quill? QUILL! quill", "zzz unknown", "old smith"]

def test_tokenize():
    assert tokenize("Kelmar's 2nd-born, in VELNOR.") == ["kelmar", "s", "2nd", "born", "in", "velnor"]
    assert tokenize("  ?! ") == []

def test_bm25_okapi_equals_rank_bm25():
    from rank_bm25 import BM25Okapi
    # the 3-document corpus has negative idfs ("a" is in all three), so rank_bm25's epsilon floor is exercised
    for docs in (make_docs(200), [Document("a", "a b c"), Document("b", "a b"), Document("c", "a d d")]):
        ours = BM25Retriever(method="okapi", k1=1.2, b=0.7)
        ours.add_documents(docs)
        ref = BM25Okapi([tokenize(retrieve.doc_text(d)) for d in docs], k1=1.2, b=0.7)
        for q in QUERIES + ["a", "d d b"]:
            expected = ref.get_scores(tokenize(q))
            assert np.allclose(ours.scores(q), expected, rtol=0, atol=1e-9), q
            hits = ours.retrieve(q, top_k=10)  # the best 10 of the documents with a nonzero score
            assert np.allclose([s for _, s in hits], np.sort(expected[expected != 0])[::-1][:10], rtol=0, atol=1e-9)
            position = {d.id: i for i, d in enumerate(docs)}
            assert np.allclose([expected[position[d.id]] for d, _ in hits], [s for _, s in hits], rtol=0, atol=1e-9)

def test_bm25_lucene_equals_bm25s():
    import bm25s
    docs = make_docs(200)
    ours = BM25Retriever()  # lucene is the default
    ours.add_documents(docs)
    ref = bm25s.BM25(method="lucene", k1=1.5, b=0.75)
    ref.index([tokenize(retrieve.doc_text(d)) for d in docs], show_progress=False)
    for q in QUERIES[:4] + QUERIES[5:]:
        assert np.allclose(ours.scores(q), ref.get_scores(tokenize(q)), rtol=1e-6, atol=1e-6), q  # bm25s is float32

def test_bm25_stopwords_equal_bm25s_on_filtered_tokens(tmp_path):
    """stopwords="en_plus" scores as bm25s does on the same tokens less NLTK's stopwords; a KB keeps the option,
    and a question made of stopwords and one rare term finds that term's document first."""
    import bm25s
    from bm25s.stopwords import STOPWORDS_EN_PLUS
    docs = make_docs(200) + [Document("w", "What You See Is What You Get", "WYSIWYG"), Document("n", "Network", "NISC")]
    ours = BM25Retriever(stopwords="en_plus")
    ours.add_documents(docs)
    keep = lambda text: [t for t in tokenize(text) if t not in STOPWORDS_EN_PLUS]
    ref = bm25s.BM25(method="lucene", k1=1.5, b=0.75)
    ref.index([keep(retrieve.doc_text(d)) for d in docs], show_progress=False)
    for q in QUERIES[:4] + QUERIES[5:] + ["What is NISC short for?"]:
        assert np.allclose(ours.scores(q), ref.get_scores(keep(q)), rtol=1e-6, atol=1e-6), q
    plain = BM25Retriever()
    plain.add_documents(docs)
    assert plain.retrieve("What is NISC short for?", 1)[0][0].id == "w" and ours.retrieve("What is NISC short for?", 1)[0][0].id == "n"
    ours.save(str(tmp_path / "kb"))
    assert retrieve.load_kb(str(tmp_path / "kb")).retrieve("What is NISC short for?", 1)[0][0].id == "n"
    assert ours.retrieve("what is it", 3) == []  # nothing left to search for


def test_dense_exact_equals_brute_force():
    docs = make_docs(40)
    encoder = retrieve.load_encoder(retrieve.DEFAULT_MODEL)
    E = encoder.encode([retrieve.doc_text(d) for d in docs], normalize_embeddings=True)
    for index in ("flat", "hnsw"):  # HNSW on 40 vectors visits them all: it must be exact too
        r = DenseRetriever(index=index)
        r.add_documents(docs)
        for q in QUERIES:
            sims = E @ encoder.encode(q, normalize_embeddings=True)
            hits = r.retrieve(q, 7)
            assert [d.id for d, _ in hits] == [docs[i].id for i in np.argsort(-sims)[:7]]
            assert np.allclose([s for _, s in hits], np.sort(sims)[::-1][:7], atol=1e-5)

def build_retriever(kind, docs, **options):
    r = RETRIEVERS[kind](**options)
    r.add_documents(docs)
    return r

def retrieve_all(r, queries=QUERIES, k=8):
    return [[(d.id, s) for d, s in hits] for hits in r.retrieve_batch(queries, k)]

def same_results(a, b, atol):
    return all([i for i, _ in x] == [i for i, _ in y] and np.allclose([s for _, s in x], [s for _, s in y], rtol=0, atol=atol)
               for x, y in zip(a, b))

def test_save_load_and_add_documents_every_type():
    docs = make_docs(60)
    for kind in RETRIEVERS:
        with tempfile.TemporaryDirectory() as tmp:
            full = build_retriever(kind, docs)
            part = build_retriever(kind, docs[:35])
            part.save(os.path.join(tmp, "kb"))
            loaded = load_kb(os.path.join(tmp, "kb"))
            assert type(loaded) is type(full) and loaded.options == part.options
            assert retrieve_all(loaded) == retrieve_all(part)  # save -> load: bit-identical
            loaded.add_documents(docs[35:])
            # sparse indexes are rebuilt from exact counts: identical; dense embeddings depend (1e-7) on batch padding
            exact = kind == "bm25"
            assert same_results(retrieve_all(loaded), retrieve_all(full), atol=0 if exact else 1e-5), kind
            if exact:
                for name in ("indptr", "post_doc", "post_tf", "doc_len", "weights"):
                    assert np.array_equal(getattr(loaded, name), getattr(full, name)), name
            loaded.save(os.path.join(tmp, "kb"))  # overwriting a KB swaps it atomically
            assert retrieve_all(load_kb(os.path.join(tmp, "kb"))) == retrieve_all(loaded)
            assert sorted(os.listdir(tmp)) == [".kb.lock", "kb"]  # no temp or old directories left behind

def test_dense_auto_switches_to_hnsw_without_reencoding():
    old = retrieve.HNSW_MIN_SIZE
    retrieve.HNSW_MIN_SIZE = 30
    try:
        docs = make_docs(40)
        r = build_retriever("dense", docs[:20])
        assert r.index.__class__.__name__ == "IndexFlatIP"
        r.add_documents(docs[20:])
        assert r.index.__class__.__name__ == "IndexHNSWFlat" and r.index.ntotal == 40
        flat = build_retriever("dense", docs, index="flat")
        assert same_results(retrieve_all(r), retrieve_all(flat), atol=1e-5)
        with tempfile.TemporaryDirectory() as tmp:
            r.save(tmp + "/kb")
            assert sorted(os.listdir(tmp + "/kb")) == ["documents.jsonl", "embeddings.npy", "index.faiss", "manifest.json"]
            assert retrieve_all(load_kb(tmp + "/kb")) == retrieve_all(r)
    finally:
        retrieve.HNSW_MIN_SIZE = old

def test_top_k_and_empty_cases():
    docs = [Document("a", "red fox"), Document("b", "red hen"), Document("c", "red ox")]
    for kind in RETRIEVERS:
        empty = RETRIEVERS[kind]()
        assert empty.retrieve("red fox", 5) == [] and empty.retrieve_batch(["red", ""], 3) == [[], []]
        r = build_retriever(kind, docs)
        assert [d.id for d, _ in r.retrieve("red", 100)] == ["a", "b", "c"] or kind in ("dense", "hybrid")
        assert len(r.retrieve("red fox", 100)) == 3  # top_k > N: the whole collection, no error
        assert r.retrieve("", 5) == [] and r.retrieve("   ", 5) == [] and r.retrieve("?!", 5) == []
        assert r.retrieve("\U0001F98A", 5) == []  # no word to search for: nothing, not noise scored 0.5 (hybrid)
        assert r.retrieve_batch(["fox", "", "hen"], 1)[1] == []
        for k in (0, -1, 2.5):
            raises(lambda: r.retrieve("red", k), ValueError, "top_k", repr(k))
    r = build_retriever("bm25", docs)
    assert r.retrieve("zebra", 5) == []  # no shared term: nothing to return
    assert [d.id for d, _ in r.retrieve("fox", 5)] == ["a"]  # only documents that share a term score

def test_bm25_lucene_scores_tiny_corpora():
    docs = [Document("a", "kelmar velnor"), Document("b", "kelmar ombra")]
    assert build_retriever("bm25", docs, method="okapi").retrieve("velnor", 2) == []  # idf ln(1.5 / 1.5) = 0: no evidence
    assert [d.id for d, _ in build_retriever("bm25", docs).retrieve("velnor", 2)] == ["a"]  # lucene idf ln(1 + 1.5 / 1.5)

def write_lines(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path

def raises(fn, exc, *fragments):
    try:
        fn()
    except exc as e:
        assert all(f in str(e) for f in fragments), str(e)
        return
    raise AssertionError(f"{fn} did not raise {exc.__name__}")

def test_document_errors():
    with tempfile.TemporaryDirectory() as tmp:
        good = '{"id": "a", "text": "x"}'
        path = write_lines(f"{tmp}/d.jsonl", [good, "", '{"id": 7, "text": "y", "title": "T", "metadata": {"k": 1}}'])
        assert load_documents(path) == [Document("a", "x"), Document("7", "y", "T", {"k": 1})]
        raises(lambda: load_documents(write_lines(f"{tmp}/d.jsonl", [good, good[:-3]])), ValueError, "d.jsonl line 2", "invalid JSON")
        raises(lambda: load_documents(write_lines(f"{tmp}/d.jsonl", [good, '{"id": "b"}'])), ValueError, "line 2", "'text'")
        raises(lambda: load_documents(write_lines(f"{tmp}/d.jsonl", [good, "[1]"])), ValueError, "line 2", "JSON object")
        raises(lambda: load_documents(write_lines(f"{tmp}/d.jsonl", [good, '{"id": "b", "text": 3}'])), ValueError, "line 2", "'text'")
        raises(lambda: load_documents(write_lines(f"{tmp}/d.jsonl", [good, "", good])), ValueError, "line 3", "duplicate", "'a'", "line 1")
        r = build_retriever("bm25", [Document("a", "x")])
        raises(lambda: r.add_documents([Document("b", "y"), Document("a", "z")]), ValueError, "duplicate document id 'a'")
        raises(lambda: r.add_documents([Document("c", "y"), Document("c", "z")]), ValueError, "'c'")
        raises(lambda: r.add_documents([Document("d", "y"), Document("e", None)]), ValueError, "'e'", "strings")
        assert len(r.docs) == 1 and r.retrieve("y") == [] and list(r.vocab) == ["x"]  # a refused batch changes nothing

def test_kb_errors_and_versions():
    with tempfile.TemporaryDirectory() as tmp:
        raises(lambda: load_kb(f"{tmp}/nothing"), FileNotFoundError, "no KB at", "nothing")
        build_retriever("bm25", make_docs(5)).save(f"{tmp}/kb")
        manifest = json.load(open(f"{tmp}/kb/manifest.json"))
        assert manifest["format_version"] == retrieve.FORMAT_VERSION and manifest["n_documents"] == 5
        assert manifest["type"] == "bm25" and manifest["options"]["method"] == "lucene"
        json.dump(dict(manifest, format_version=retrieve.FORMAT_VERSION + 1), open(f"{tmp}/kb/manifest.json", "w"))
        raises(lambda: load_kb(f"{tmp}/kb"), ValueError, "format_version 2", "not supported")
        json.dump(dict(manifest, type="magic"), open(f"{tmp}/kb/manifest.json", "w"))
        raises(lambda: load_kb(f"{tmp}/kb"), ValueError, "unknown type 'magic'")
        write_lines(f"{tmp}/kb/manifest.json", ["{"])
        raises(lambda: load_kb(f"{tmp}/kb"), ValueError, "kb/manifest.json: not valid JSON")
        json.dump(manifest, open(f"{tmp}/kb/manifest.json", "w"))
        assert load_kb(f"{tmp}/kb").type == "bm25"
        os.makedirs(f"{tmp}/home")
        write_lines(f"{tmp}/home/precious.txt", ["do not delete"])
        raises(lambda: build_retriever("bm25", make_docs(5)).save(f"{tmp}/home"), ValueError, "refusing to replace")
        assert os.listdir(f"{tmp}/home") == ["precious.txt"]

def test_atomic_save():
    with tempfile.TemporaryDirectory() as tmp:
        kb = f"{tmp}/kb"
        old = build_retriever("bm25", make_docs(30))
        old.save(kb)
        new = build_retriever("bm25", make_docs(50, seed=1))
        real_save = np.save
        def crash(path, arr, *a, **k):
            if "doc_len" in str(path):
                raise OSError("disk full")
            real_save(path, arr, *a, **k)
        np.save = crash
        try:
            raises(lambda: new.save(kb), OSError, "disk full")
        finally:
            np.save = real_save
        assert retrieve_all(load_kb(kb)) == retrieve_all(old)  # the crash left the previous KB whole
        os.rename(kb, kb + ".old")  # as if we died between the two renames of the swap
        assert retrieve_all(load_kb(kb)) == retrieve_all(old)
        new.save(kb)
        assert retrieve_all(load_kb(kb)) == retrieve_all(new) and sorted(os.listdir(tmp)) == [".kb.lock", "kb"]

def test_hybrid_fusion():
    h = HybridRetriever(fusion="rrf")
    dense = (np.array([2, 0, 1]), np.array([0.9, 0.5, 0.1]))
    sparse = (np.array([0, 3]), np.array([7.0, 1.0]))
    idx, scores = h.fuse(dense, sparse)
    assert idx.tolist() == [0, 2, 3, 1]  # doc 0 is in both lists; doc 2 (dense #1) beats doc 3 (sparse #2)
    assert np.allclose(scores, [1 / 62 + 1 / 61, 1 / 61, 1 / 62, 1 / 63])
    h = HybridRetriever(fusion="convex", alpha=0.25)
    idx, scores = h.fuse(dense, sparse)
    assert idx.tolist() == [0, 2, 1, 3] and np.allclose(scores, [0.25 * 0.5 + 0.75, 0.25, 0.25 * 0.0, 0.0])
    docs = make_docs(30)
    h = build_retriever("hybrid", docs, depth=10)
    d, s = build_retriever("dense", docs), build_retriever("bm25", docs)
    for q in QUERIES:  # the hybrid's order is the fusion of its parts' top `depth` lists
        parts = [r._search([q], 10)[0] for r in (d, s)] if q.strip() else None
        assert [x.id for x, _ in h.retrieve(q, 5)] == [docs[i].id for i in h.fuse(*parts)[0][:5]]

def test_metrics():
    ranked = ["a", "b", "c", "d"]
    assert recall_at_k(ranked, ["b", "z"], 1) == 0 and recall_at_k(ranked, ["b", "z"], 2) == 0.5
    assert precision_at_k(ranked, ["a", "c"], 4) == 0.5 and precision_at_k(ranked, ["a"], 1) == 1
    assert mrr(ranked, ["c", "d"]) == 1 / 3 and mrr(ranked, ["z"]) == 0
    assert abs(ndcg_at_k(ranked, ["b"], 3) - 1 / np.log2(3)) < 1e-12
    assert abs(ndcg_at_k(ranked, ["a", "c"], 3) - (1 + 1 / np.log2(4)) / (1 + 1 / np.log2(3))) < 1e-12
    assert ndcg_at_k(ranked, ["a", "b"], 10) == 1.0
    with tempfile.TemporaryDirectory() as tmp:
        r = build_retriever("bm25", [Document("a", "red fox"), Document("b", "blue hen"), Document("c", "red hen")])
        qa = write_lines(f"{tmp}/qa.jsonl", ['{"question": "blue hen", "gold_ids": ["b"]}',
                                       '{"question": "red", "gold_ids": ["c"]}',  # a, c tie: a first
                                       '{"question": "who?", "gold_ids": []}'])   # unanswerable: skipped
        m = evaluate(r, qa, ks=(1, 2))
        assert m["n"] == 2 and m["recall@1"] == 0.5 and m["recall@2"] == 1 and m["mrr"] == 0.75
        assert m["precision@2"] == 0.5 and abs(m["ndcg@2"] - (1 + 1 / np.log2(3)) / 2) < 1e-12
        raises(lambda: evaluate(r, write_lines(f"{tmp}/qa.jsonl", ['{"q": 1}'])), ValueError, "qa.jsonl line 1", "question")

def test_save_documents_and_new_retriever():
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/docs.jsonl"
        retrieve.save_documents(make_docs(20), path)
        assert load_documents(path) == make_docs(20)
        r = retrieve.new_retriever("bm25", "en")
        r.add_documents(load_documents(path))
        r.save(f"{tmp}/kb")
        loaded = load_kb(f"{tmp}/kb")
        assert loaded.options == {"k1": 1.5, "b": 0.75, "method": "lucene", "epsilon": 0.25, "stopwords": "en"}
        assert loaded.retrieve("velnor") == r.retrieve("velnor")
        assert loaded.retrieve_batch(["tarsi", "old"], 2) == [loaded.retrieve("tarsi", 2), loaded.retrieve("old", 2)]
        raises(lambda: retrieve.new_retriever("magic"), ValueError, "retriever: must be one of", "'magic'")
        raises(lambda: retrieve.new_retriever("dense", "en"), ValueError, "stopwords", "with dense")

def test_cli():
    run = lambda *a: ran("retrieve.py", *a)  # in this process: no interpreter start-up per call
    with tempfile.TemporaryDirectory() as tmp:
        docs = [json.dumps({"id": f"d{i}", "title": t, "text": x}) for i, (t, x) in
                enumerate([("Velnor", "a city on the river"), ("Kelmar", "born in Velnor, a painter"), ("Ombra", "old mill")])]
        write_lines(f"{tmp}/docs.jsonl", docs[:2])
        assert run("--documents", f"{tmp}/docs.jsonl", "--output", f"{tmp}/kb", "--type", "bm25").returncode == 0
        write_lines(f"{tmp}/more.jsonl", docs[2:])
        assert run("--documents", f"{tmp}/more.jsonl", "--kb", f"{tmp}/kb").returncode == 0
        out = run("--kb", f"{tmp}/kb", "--query", "where in Velnor was Kelmar born", "--top_k", "5").stdout.splitlines()
        assert len(out) == 2 and "[d1] Kelmar: born in Velnor" in out[0] and "[d0]" in out[1]
        write_lines(f"{tmp}/qa.jsonl", ['{"question": "old mill", "gold_ids": ["d2"]}'])
        assert "recall" in run("--kb", f"{tmp}/kb", "--eval", f"{tmp}/qa.jsonl").stdout
        write_lines(f"{tmp}/bad.jsonl", [docs[0], "{oops"])
        p = run("--documents", f"{tmp}/bad.jsonl", "--output", f"{tmp}/kb2")
        assert p.returncode == 1 and p.stderr.strip().splitlines() == [f"error: {tmp}/bad.jsonl line 2: invalid JSON (Expecting property name enclosed in double quotes at column 2)"]
        p = run("--kb", f"{tmp}/nope", "--query", "x")
        assert p.returncode == 1 and p.stderr.startswith("error: no KB at") and len(p.stderr.strip().splitlines()) == 1

def test_two_writers_grow_one_kb_at_once(tmp_path):
    """Two processes each add to one KB in 10 rounds, at the same time: the KB lock makes them take turns, so the
    KB ends with the union (or a round printed a clear error), and each document's own text finds it top-1."""
    kb = str(tmp_path / "kb")
    build_retriever("bm25", make_docs(1000)).save(kb)  # big enough that load + add + save overlap
    files = {w: [] for w in (0, 1)}
    for w, r in ((w, r) for w in (0, 1) for r in range(10)):
        docs = [Document(f"w{w}r{r}d{i}", f"unique_{w}_{r}_{i} kelmar born", f"W{w} {r} {i}") for i in range(3)]
        files[w].append(retrieve.save_documents(docs, str(tmp_path / f"w{w}r{r}.jsonl")) or str(tmp_path / f"w{w}r{r}.jsonl"))
    worker = """if 1:  # each round is `python retrieve.py --documents f --kb kb`, run in one interpreter
        import contextlib, io, runpy, sys
        kb, files = sys.argv[1], sys.argv[2:]
        for f in files:
            sys.argv, out = ["retrieve.py", "--documents", f, "--kb", kb], io.StringIO()
            try:
                with contextlib.redirect_stdout(out):
                    runpy.run_path("retrieve.py", run_name="__main__")
                code = 0
            except SystemExit as e:
                code, out = 1, io.StringIO(str(e.code))
            print(f, code, out.getvalue().strip().replace(chr(10), " | "), flush=True)"""
    procs = [subprocess.Popen([sys.executable, "-c", worker, kb, *files[w]], cwd=ROOT, stdout=subprocess.PIPE, text=True)
             for w in (0, 1)]
    rounds = [line.split(" ", 2) for p in procs for line in p.communicate()[0].splitlines()]
    assert len(rounds) == 20
    added = set()
    for f, code, out in rounds:
        assert (code == "0" and "now holds" in out) or (out.startswith("error:") and "|" not in out), out
        added |= {d.id for d in load_documents(f)} if code == "0" else set()
    loaded = load_kb(kb)
    assert {d.id for d in loaded.docs} == {d.id for d in make_docs(1000)} | added and len(added) >= 30
    for d in loaded.docs[1000:]:
        assert loaded.retrieve(d.text, 1)[0][0].id == d.id

def test_empty_dense_and_hybrid_kbs_load_and_grow(tmp_path):
    """An empty dense or hybrid KB is saved without an object array (np.save(None) pickles), loads, and grows."""
    docs = make_docs(6)
    for kind in ("dense", "hybrid"):
        path = str(tmp_path / kind)
        RETRIEVERS[kind]().save(path)
        kb = load_kb(path)  # every array is read with allow_pickle=False
        assert kb.docs == [] and kb.retrieve("kelmar", 3) == []
        kb.add_documents(docs)
        kb.save(path)
        kb = load_kb(path)
        assert [[d.id for d, _ in kb.retrieve(retrieve.doc_text(d), 1)] for d in docs] == [[d.id] for d in docs]

def kill_while_saving(save_forever, delay):
    """Forks a child that runs save_forever() and kill -9s it `delay` seconds after it starts."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(w, b"go")
            save_forever()
        finally:
            os._exit(1)
    os.read(r, 2)
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    assert os.waitpid(pid, 0)[1] == signal.SIGKILL
    os.close(r), os.close(w)


def test_kill_during_kb_save_leaves_the_previous_kb(tmp_path):
    """kill -9 a process while it saves a KB, 10 times: the KB always loads as one of the two states it was saving,
    and the next save leaves no temp or old directory behind."""
    kb, rng = str(tmp_path / "kb"), random.Random(0)
    states = [build_retriever("bm25", make_docs(n, seed=n)) for n in (2000, 2100)]
    states[0].save(kb)
    expected, left_behind = [retrieve_all(s) for s in states], 0
    def save_forever():  # the two states in turn, until killed
        while True:
            for s in states:
                s.save(kb)
    for i in range(10):
        kill_while_saving(save_forever, rng.uniform(0, 0.1))
        assert retrieve_all(load_kb(kb)) in expected
        left_behind += len(glob.glob(kb + ".*")) > 0
        states[i % 2].save(kb)
        assert sorted(os.listdir(tmp_path)) == [".kb.lock", "kb"] and retrieve_all(load_kb(kb)) == expected[i % 2]
    assert left_behind  # some kills did land mid-save


# -----------------------------------------------------------------------------
# configurator.py, common.py, train.py

def test_configurator_files_and_overrides(tmp_path):
    from configurator import ConfigError, configure
    cfg = tmp_path / "c.py"
    cfg.write_text("import math\nn_layer = 8\nlearning_rate = 1  # an int where a float is expected widens\n")
    g = dict(n_layer=4, learning_rate=3e-3, block_pattern="T", compile=False, out_dir="out")
    resolved = configure(g, [str(cfg), "--block_pattern=TMM", "--compile=True", "--out_dir=123"])
    assert resolved == dict(n_layer=8, learning_rate=1.0, block_pattern="TMM", compile=True, out_dir="123")
    assert isinstance(g["learning_rate"], float)
    for argv, needle in [(["--nope=1"], "--nope: unknown config key 'nope'"),
                         (["--n_layer=2.5"], "--n_layer: n_layer must be int, got 2.5"),
                         (["--n_layer"], "--key=value"),
                         (["missing.py"], "config file missing.py not found")]:
        try:
            configure(dict(g), argv)
            raise AssertionError(f"{argv} was accepted")
        except ConfigError as e:
            assert needle in str(e), (needle, str(e))
    cfg.write_text("n_layer = 8\n\nbad_key = 3\n")
    try:
        configure(dict(g), [str(cfg)])
        raise AssertionError("unknown key in a config file was accepted")
    except ConfigError as e:
        assert str(e) == f"{cfg}:3: unknown config key 'bad_key'"


# -----------------------------------------------------------------------------
# common.py

def test_lr_schedules():
    from common import lr_at
    assert lr_at(0, 100, 1.0, 10) == 0.1 and lr_at(9, 100, 1.0, 10) == 1.0
    assert abs(lr_at(100, 100, 1.0, 10, "cosine", 0.1) - 0.1) < 1e-12
    assert lr_at(50, 100, 1.0, 10, "wsd", 0.0, 0.2) == 1.0  # stable phase
    assert abs(lr_at(90, 100, 1.0, 10, "wsd", 0.0, 0.2) - 0.5) < 1e-12  # halfway through the cool-down


def test_checkpoint_write_is_atomic(tmp_path):
    from common import load_checkpoint, save_checkpoint
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, {"model": {"w": torch.ones(3)}, "model_args": {}, "step": 1})
    try:  # a write that dies half-way (here: an unpicklable object after a large tensor) ...
        save_checkpoint(path, {"model": {"w": torch.zeros(100_000)}, "model_args": {}, "step": 2, "bad": lambda: 0})
        raise AssertionError("the broken write succeeded")
    except Exception:
        pass
    ckpt = load_checkpoint(path)  # ... leaves the previous checkpoint whole, and no temp file behind
    assert ckpt["step"] == 1 and torch.equal(ckpt["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    try:
        load_checkpoint(str(tmp_path / "bad.pt"))
        raise AssertionError("a corrupt checkpoint loaded")
    except ValueError as e:
        assert "bad.pt is unreadable" in str(e)


def test_kill_during_checkpoint_save_leaves_the_previous_one(tmp_path):
    """kill -9 a process while it writes checkpoints, 10 times: ckpt.pt always loads as one of the two it was writing,
    and the next save removes the killed one's ckpt.pt.tmp<pid>."""
    from common import load_checkpoint
    path, rng = str(tmp_path / "ckpt.pt"), random.Random(0)
    states = [{"model": {"w": torch.full((1_000_000,), float(s))}, "model_args": {}, "step": s} for s in (0, 1)]
    save_checkpoint(path, states[0])
    left_behind = 0
    def save_forever():
        while True:
            for s in states:
                save_checkpoint(path, s)
    for i in range(10):
        kill_while_saving(save_forever, rng.uniform(0, 0.05))
        ckpt = load_checkpoint(path)
        assert torch.equal(ckpt["model"]["w"], states[ckpt["step"]]["model"]["w"])
        left_behind += len(os.listdir(tmp_path)) > 1
        save_checkpoint(path, states[i % 2])
        assert os.listdir(tmp_path) == ["ckpt.pt"] and load_checkpoint(path)["step"] == i % 2
    assert left_behind  # some kills did land mid-write


# -----------------------------------------------------------------------------
# train.py

def test_train_learns_and_checkpoint_is_complete(tmp_path):
    world = tiny_world()
    p = ran("train.py", f"--data_dir={world}", f"--out_dir={tmp_path}", *TINY, "--max_iters=30",
            "--eval_interval=30", "--learning_rate=1e-2", "--block_pattern=TM")
    curve = losses(p.stdout)
    assert len(curve) == 30 and curve[30] < curve[1] - 1.0, curve
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)  # no pickled code in a checkpoint
    assert ckpt["step"] == 30 and ckpt["stage"] == "train" and ckpt["model_args"]["block_pattern"] == "TM"
    assert ckpt["config"]["max_iters"] == 30 and ckpt["data_state"]["windows_consumed"] == 30 * 8
    from model import GPT
    from tokenizer import Tokenizer
    model = GPT.from_checkpoint(ckpt)  # the checkpoint alone rebuilds model and tokenizer
    tok = Tokenizer.from_json(ckpt["tokenizer"])
    assert model.pattern == "TM" and tok.vocab_size == ckpt["model_args"]["vocab_size"]
    assert "val loss" in (tmp_path / "log.txt").read_text()


def test_train_resume_after_kill_continues_exactly(tmp_path):
    """Kill a run right after a checkpoint, resume it, and the losses match an uninterrupted run bit for bit."""
    world = tiny_world()
    # enough steps after the kill point that SIGKILL always lands mid-run, however fast the machine
    args = [f"--data_dir={world}", *TINY, "--max_iters=60", "--eval_interval=3", "--block_pattern=MT"]
    full = losses(ran("train.py", *args, f"--out_dir={tmp_path / 'a'}").stdout)
    proc = subprocess.Popen([sys.executable, "train.py", *args, f"--out_dir={tmp_path / 'b'}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})  # as this process
    for line in proc.stdout:
        if line.startswith("saved") and "at step 6" in line:
            proc.send_signal(signal.SIGKILL)
            break
    assert proc.wait() == -signal.SIGKILL  # killed, not finished
    resumed = losses(ran("train.py", *args, f"--out_dir={tmp_path / 'b'}", "--init_from=resume").stdout)
    assert resumed and min(resumed) > 6 and resumed == {s: full[s] for s in resumed}, (resumed, full)
    assert set(resumed) == set(range(min(resumed), 61))


def test_train_ddp_two_processes_match_one(tmp_path):
    """torchrun with 2 gloo processes sees the same global batches as 1 process with grad accumulation."""
    world = tiny_world()
    args = ["train.py", f"--data_dir={world}", *TINY, "--max_iters=6", "--eval_interval=6", "--block_pattern=TM"]
    one = losses(ran(*args, f"--out_dir={tmp_path / 'one'}").stdout)
    two = losses(run(sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args,
                     f"--out_dir={tmp_path / 'two'}").stdout)
    assert one.keys() == two.keys() == set(range(1, 7))
    assert all(abs(one[s] - two[s]) < 1e-4 for s in one), (one, two)


def test_every_config_builds_what_it_says(tmp_path):
    """Each config's settings are all known keys, its pattern is the built model's, and it trains a step
    (width, context and batch scaled down to CPU size; depth and pattern kept)."""
    from configurator import configure
    from model import GPT, GPTConfig
    world = tiny_world()
    train_defaults = {}  # train.py's config globals: its assignments after the imports, up to configure()
    for node in ast.parse((ROOT / "train.py").read_text()).body:
        if not isinstance(node, (ast.Expr, ast.Import, ast.ImportFrom)):
            if not isinstance(node, ast.Assign):
                break
            train_defaults[node.targets[0].id] = ast.literal_eval(node.value)
    configs = sorted((ROOT / "configs").glob("*.py"))
    assert len(configs) >= 8
    for path in configs:
        if path.name.startswith(("rag_", "refrag_")):
            continue  # the fine-tuning stages test their own configs
        cfg = configure(dict(train_defaults), [str(path)])
        args = {k: cfg[k] for k in GPTConfig.__dataclass_fields__ if k in cfg} | {"vocab_size": 512}
        with torch.device("meta"):  # full size, no memory: the pattern and the parameter count it describes
            full = GPT(GPTConfig(**args))
        expected = (cfg["block_pattern"] * cfg["n_layer"])[:cfg["n_layer"]]
        assert full.pattern == expected, path
        code, out, err = run_here("train.py", str(path), f"--data_dir={world}", f"--out_dir={tmp_path / path.stem}",
                                  "--max_iters=1", "--n_embd=32", "--n_head=2", "--n_kv_head=1", "--block_size=16",
                                  "--device_batch_size=2", "--total_batch_size=32", "--eval_tokens=32", "--device=cpu",
                                  "--compile=False")
        assert code == 0 and f"model: {expected} pattern" in out, (path, out[-500:], err[-2000:])
        assert len(losses(out)) == 1


# -----------------------------------------------------------------------------
# retrieve.py, train.py, configurator.py, common.py: every bad input is one line, and changes nothing on disk

def test_every_bad_input_is_one_line_and_changes_nothing(tmp_path):
    import hashlib
    from common import first_line
    assert first_line(EOFError()) == "EOFError" and first_line(ValueError("a\nb")) == "a"
    t = tmp_path
    docs = make_docs(20)
    retrieve.save_documents(docs, str(t / "docs.jsonl"))
    (t / "latin1.jsonl").write_bytes(b'{"id": "a", "text": "caf\xe9"}\n')
    (t / "empty.jsonl").write_bytes(b"")
    build_retriever("bm25", docs).save(str(t / "kb"))
    for name, damage in (("npy0", lambda p: (p / "post_tf.npy").write_bytes(b"")),
                         ("npycut", lambda p: (p / "doc_len.npy").write_bytes((p / "doc_len.npy").read_bytes()[:-9])),
                         ("vocabcut", lambda p: (p / "vocab.json").write_bytes((p / "vocab.json").read_bytes()[:9]))):
        build_retriever("bm25", docs).save(str(t / name))
        damage(t / name)
    import faiss
    vectors = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
    for name in ("hnsw_more", "hnsw_garbage"):
        d = DenseRetriever(index="hnsw")  # an HNSW KB without the encoder: vectors set by hand
        d.docs, d.index = docs[:5], d._new_index("hnsw", vectors[:5])
        d.save(str(t / name))
    faiss.write_index(d._new_index("hnsw", vectors), str(t / "hnsw_more/index.faiss"))  # 6 vectors, 5 documents
    (t / "hnsw_garbage/index.faiss").write_bytes(os.urandom(4096))
    assert run_here("retrieve.py", "--documents", t / "empty.jsonl", "--output", t / "empty_kb", "--type", "hybrid")[0] == 0
    (t / "data").mkdir()  # a tokenised corpus just big enough for TINY
    json.dump({"vocab_size": 64, "dtype": "uint16"}, open(t / "data/meta.json", "w"))
    for split in ("train", "val"):
        (np.arange(2000) % 64).astype(np.uint16).tofile(t / f"data/{split}.bin")
    tiny_args = dict(vocab_size=64, n_layer=1, n_embd=32, n_head=2, n_kv_head=1, block_size=32, block_pattern="T")
    for run_dir, content in (("zero", b""), ("trained", None)):
        (t / run_dir).mkdir()
        (t / run_dir / "ckpt.pt").write_bytes(content) if content is not None else \
            save_checkpoint(str(t / run_dir / "ckpt.pt"), {"model": {}, "model_args": tiny_args, "step": 1})
    (t / "random.pt").write_bytes(os.urandom(1000))
    save_checkpoint(str(t / "wrong_keys.pt"), {"model": {"nope": torch.zeros(2)}, "model_args": tiny_args, "step": 1})
    (t / "raises.py").write_text("n_layer = 2\nmax_iters = 10 // 0\n")
    train = ["train.py", f"--data_dir={t / 'data'}", f"--out_dir={t / 'new'}", *TINY]
    cases = [  # (script and args, what the one error line must name, what it must not say)
        (["retrieve.py", "--documents", t / "latin1.jsonl", "--kb", t / "kb"], ["latin1.jsonl", "UTF-8"]),
        (["retrieve.py", "--kb", t / "npy0", "--query", "kelmar"], ["npy0/post_tf.npy"]),
        (["retrieve.py", "--kb", t / "npycut", "--query", "kelmar"], ["npycut/doc_len.npy"]),
        (["retrieve.py", "--kb", t / "vocabcut", "--query", "kelmar"], ["vocabcut/vocab.json"]),
        (["retrieve.py", "--kb", t / "hnsw_more", "--query", "kelmar"], ["hnsw_more/index.faiss", "5"]),
        (["retrieve.py", "--kb", t / "hnsw_garbage", "--query", "kelmar"], ["hnsw_garbage/index.faiss"]),
        (["retrieve.py", "--documents", t / "docs.jsonl", "--output", t / "kb"], [f"{t / 'kb'} already", "--overwrite"]),
        (["retrieve.py", "--kb", t / "kb", "--query", ""], ["--query ''"]),
        (["retrieve.py", "--kb", t / "kb", "--query", "?! ..."], ["'?! ...'"]),
        (["retrieve.py", "--kb", t / "kb", "--query", "\U0001F98A"], ["\U0001F98A"]),
        (["retrieve.py", "--kb", t / "kb", "--query", "kelmar", "--top_k", "0"], ["--top_k", "got 0"]),
        (["retrieve.py", "--kb", t / "kb", "--query", "kelmar", "--top_k", "-1"], ["--top_k", "got -1"]),
        (["retrieve.py", "--kb", t / "empty_kb", "--query", "kelmar"], None),  # an empty KB: no hits, said so
        ([*train, f"--out_dir={t / 'zero'}", "--init_from=resume"], ["zero/ckpt.pt", "empty"]),
        ([*train, f"--init_from={t / 'random.pt'}"], ["random.pt", "not a checkpoint of this project"]),
        ([*train, f"--init_from={t / 'wrong_keys.pt'}"], ["wrong_keys.pt", "does not fit"]),
        ([*train, "--eval_interval=0"], ["eval_interval=0", "positive"]),
        ([*train, "--device_batch_size=0"], ["device_batch_size=0", "positive"]),
        ([*train, "--min_lr_frac=1.5"], ["min_lr_frac=1.5", "[0, 1]"]),
        ([*train, "--block_pattern=TX"], ["block_pattern='TX'"]),
        ([train[0], t / "raises.py", *train[1:]], [f"{t / 'raises.py'}:2", "ZeroDivisionError"]),
        ([*train, f"--out_dir={t / 'trained'}"], ["trained/ckpt.pt exists", "--init_from=resume", "--overwrite=True"]),
        (["train.py", "--data_dir=/nonexistent", f"--out_dir={t / 'new'}"], ["/nonexistent", "prepare.py"]),
        (["train.py", str(t / "nope.py")], ["nope.py not found"]),
        (["train.py", "--unknown=1"], ["unknown config key 'unknown'"]),
    ]
    checksums = lambda: {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in t.rglob("*") if p.is_file()}
    before = checksums()
    for args, needles in cases:
        code, out, err = run_here(*args)
        if needles is None:
            assert code == 0 and out.strip() == f"no document in {t / 'empty_kb'} matches 'kelmar'" and not err, (out, err)
            continue
        lines = err.strip().splitlines()
        assert code == 1 and len(lines) == 1 and lines[0].startswith("error: "), (args, err)
        assert all(n in lines[0] for n in needles) and "weights_only" not in lines[0], (args, lines[0])
    assert checksums() == before and not (t / "new").exists()


# -----------------------------------------------------------------------------
# rag.py, rag_train.py, chat.py

TMP = tempfile.TemporaryDirectory()


@functools.cache
def rag_world():
    """A tiny prepared world (shared by the tests): its directory, tokenizer, documents by id, QA records."""
    out = os.path.join(TMP.name, "world")
    prepare_world(out, seed=7, world_size=20, heldout_frac=0.5, n_renderings=2, vocab_size=600, val_frac=0.1)
    tok = Tokenizer.from_json(open(os.path.join(out, "tokenizer.json")).read())
    docs = {d["id"]: d for d in map(json.loads, open(os.path.join(out, "kb.jsonl")))}
    qa = [json.loads(l) for l in open(os.path.join(out, "qa_train.jsonl"))]
    return out, tok, docs, qa


def checkpoint(pattern, path, stage="train", **model):
    _, tok, _, _ = rag_world()
    cfg = GPTConfig(**{**dict(n_layer=2, n_embd=32, n_head=2, n_kv_head=1, block_size=64, vocab_size=tok.vocab_size,
                              block_pattern=pattern), **model})
    torch.manual_seed(0)
    save_checkpoint(path, {"model": GPT(cfg).state_dict(), "model_args": dataclasses.asdict(cfg), "step": 0,
                           "optimizer": [], "config": {}, "tokenizer": tok.to_json(), "val_loss": 0.0, "stage": stage})
    return path


def rag_train(*args):
    return ran("rag_train.py", *args)


# -----------------------------------------------------------------------------
# conversations and RAFT examples

def test_rag_example_rendering_and_mask():
    _, tok, docs, qa = rag_world()
    q = next(q for q in qa if q["hops"] == 1)
    gold = docs[q["gold_ids"][0]]
    distractors = [d for i, d in docs.items() if i != gold["id"]][:5]
    picked = rag.raft_docs(q, distractors, docs, random.Random(3), 3, p_no_gold=0.0)
    assert len(picked) == 3 and gold in picked
    pos = picked.index(gold) + 1
    ids, mask = rag.render_example(tok, q, picked)
    text = tok.decode(ids)
    assert text.startswith("<|bos|><|user_start|> " + q["question"] + "<|user_end|><|doc_start|>[1] ")
    assert f"<|doc_start|>[{pos}] {gold['title']}: {gold['text']}<|doc_end|>" in text and "[4]" not in text
    answer = tok.decode([t for t, m in zip(ids, mask) if m])
    assert answer == f"<|assistant_start|> {rag.target_answer(q, picked)}<|assistant_end|>"
    assert answer.endswith(f" [{pos}].<|assistant_end|>") and q["golden_answers"][0] in answer
    assert ids[-len(tok.encode(answer)) - 10:] and mask.index(1) == len(ids) - mask.count(1)  # mask is one final span
    # closed-book: no documents, no citation
    ids, mask = rag.render_example(tok, q)
    assert "<|doc_start|>" not in tok.decode(ids) and not tok.decode(ids).endswith("].<|assistant_end|>")


def test_raft_gold_position_varies_and_abstains_without_gold():
    _, _, docs, qa = rag_world()
    q = next(q for q in qa if q["hops"] == 1)
    pool = [d for i, d in docs.items() if i not in q["gold_ids"]]
    positions = {[d["id"] for d in rag.raft_docs(q, pool, docs, random.Random(s), 4, 0.0)].index(q["gold_ids"][0])
                 for s in range(40)}
    assert positions == {0, 1, 2, 3}
    no_gold = rag.raft_docs(q, pool, docs, random.Random(0), 4, p_no_gold=1.0)
    assert len(no_gold) == 4 and not rag.has_gold(q, no_gold) and rag.target_answer(q, no_gold) == ABSTAIN
    unanswerable = next(q for q in qa if q["hops"] == 0)
    assert rag.target_answer(unanswerable, pool[:3]) == ABSTAIN


# -----------------------------------------------------------------------------
# metrics on hand-made cases

QA = {"question": "Where was Kel Odri born?", "golden_answers": ["Velnor"], "response": "Kel Odri was born in Velnor.",
      "type": "born_in", "entity": "Kel Odri", "gold_ids": ["d1"], "hops": 1}
D0 = {"id": "d0", "title": "Ama Pesk", "text": "Ama Pesk was born in Durn."}
D1 = {"id": "d1", "title": "Kel Odri", "text": "Kel Odri was born in Velnor. He is a poet."}
D2 = {"id": "d2", "title": "Velnor", "text": "Velnor is a city in Tarsia."}


def test_squad_normalisation_em_f1():
    assert rag.normalize("The  Velnor-City!") == "velnorcity"
    assert rag.exact_match("an Engineer.", "engineer") == 1.0 and rag.exact_match("Velnor", "Velmor") == 0.0
    assert abs(rag.token_f1("Velnor City", "Velnor") - 2 / 3) < 1e-9
    assert rag.token_f1("", "") == 1.0 and rag.token_f1("Velnor", "") == 0.0


def test_read_answer_is_strict():
    assert rag.read_answer("Kel Odri was born in Velnor [2].", QA) == ("Velnor", [2])
    assert rag.read_answer("Kel Odri was born in Velnor [2][3].", QA) == ("Velnor", [2, 3])
    assert rag.read_answer(ABSTAIN, QA) == (None, [])
    # another entity's sentence is not read as an answer about Kel Odri: the whole sentence is the answer
    assert rag.read_answer("Ama Pesk was born in Velnor [1].", QA) == ("Ama Pesk was born in Velnor.", [1])
    prof = {**QA, "type": "profession", "golden_answers": ["engineer"], "response": "Kel Odri is an engineer."}
    assert rag.read_answer("Kel Odri is an engineer [1].", prof)[0] == "engineer"
    # a record without a response (your own QA): the whole text, citations out, is the answer
    assert rag.read_answer("Velnor [2]", {"question": "q", "golden_answers": ["Velnor"]}) == ("Velnor", [2])


def test_reading_loss_scores_only_the_answer():
    """An untrained model (near-zero logits) pays ln(vocab) on every answer token; a model that is handed the
    right next token (logits from the sequence itself) pays nothing: only answer tokens are counted."""
    out, tok, _, _ = rag_world()
    _, by_id, qa = rag.load_data(out)
    qas = [q for q in qa["heldout"] if q["hops"] == 1 and q["response"].startswith(q["entity"])][:10]
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_embd=32, n_head=2, n_kv_head=1, block_size=256, vocab_size=tok.vocab_size))
    assert abs(bench.reading_loss(model, tok, qas, by_id) - math.log(tok.vocab_size)) < 0.02

    class Oracle(torch.nn.Module):  # knows every sequence it is asked about: logits peak on the true next token
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x, y, loss_reduction):
            full = torch.cat([x, y[:, -1:]], 1)  # y's last target is the sequence's last token
            logits = torch.full((1, x.shape[1], tok.vocab_size), -30.0)
            logits[0, torch.arange(x.shape[1]), full[0, 1:]] = 30.0
            return logits, F.cross_entropy(logits.view(-1, tok.vocab_size), y.view(-1), ignore_index=-1,
                                           reduction="none").view(y.shape)
    assert bench.reading_loss(Oracle(), tok, qas, by_id) < 1e-6


def test_plot_writes_a_png_and_an_svg_of_the_series(tmp_path):
    """common.plot draws each series as given, on log axes too, and writes stem.png and stem.svg (its text kept as
    text: the labels are in it), through temp files that it does not leave behind."""
    from common import plot
    series = {"T": ([256, 1024, 4096], [0.9, 1.2, 1.7]), "M, reread": ([256, 1024], [1.0, 1.01], {"linestyle": "--"})}
    drawn = plot(str(tmp_path / "p"), "decode", "tokens of context", "ms per token", series, xlog=True, ylog=True)
    assert drawn == {label: (xs, ys) for label, (xs, ys, *_) in series.items()}
    assert sorted(os.listdir(tmp_path)) == ["p.png", "p.svg"]
    assert (tmp_path / "p.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    svg = (tmp_path / "p.svg").read_text()
    assert "<svg" in svg and all(f">{text}</text>" in svg for text in ["T", "M, reread", "decode", "4096"])


def test_raft_sampler_gives_every_k_to_16_and_32_documents_fit_the_eval_context():
    """RAFT examples of every size k = 1..16 from a ranking one deeper than k (with the gold document or without
    it), rag_train.py refusing a ranking too shallow for k_max, and the held-out contexts of the accuracy-vs-k sweep
    at k = 16 and 32 fitting rag_train.py's eval_max_len with the answer's tokens to spare: no document silently
    dropped."""
    data, tok, _, qa = rag_world()
    kb = load_documents(os.path.join(data, "kb.jsonl"))
    docs, r = {d.id: d for d in kb}, BM25Retriever()
    r.add_documents(kb)
    short = 0
    for q in [q for q in qa if q["hops"] == 1][:20]:
        ranked = [d for d, _ in r.retrieve(q["question"], 16)]
        short += len(ranked) < 16  # BM25 ranks only the documents that share a word with the question
        for k in range(1, 17):
            for p_no_gold in (0.0, 1.0):
                picked = rag.raft_docs(q, ranked, docs, random.Random(k), k, p_no_gold, pool=kb)
                assert len(picked) == k and len({d.id for d in picked}) == k
                assert rag.has_gold(q, picked) == (p_no_gold == 0.0)
                assert [d for d in ranked if d in picked and not rag.is_gold(q, d)] == \
                       [d for d in ranked if not rag.is_gold(q, d)][:k - (p_no_gold == 0.0)]  # the best-ranked first
    assert short  # the top-up from the pool was exercised
    rng, ref = random.Random(0), random.Random(0)
    assert [rag.draw_k(rng, 16) for _ in range(50)] == [ref.randint(1, 16) for _ in range(50)]  # k_power 0: uniform
    counts = collections.Counter(rag.draw_k(rng, 16, 1.0) for _ in range(60000))
    assert sorted(counts) == list(range(1, 17))
    assert all(abs(k * counts[k] / counts[1] - 1) < 0.15 for k in counts)  # k_power 1: k * P(k) the same for every k
    one_line_error(rag_train("--k_max=16", "--retrieve_depth=16"), "--retrieve_depth (16) must exceed --k_max (16)")
    eval_max_len = ast.literal_eval(re.search(r"^eval_max_len = (\d+)", open(ROOT / "rag_train.py").read(), re.M)[1])
    heldout = [json.loads(l) for l in open(os.path.join(data, "qa_heldout.jsonl"))]
    assert len(kb) >= 32
    for k in (16, 32):
        longest = max(len(render_conversation(tok, rag.messages_for(q["question"], [d for d, _ in r.retrieve(q["question"], k)]))[0])
                      for q in heldout)
        assert longest + 64 <= eval_max_len, (k, longest)  # 64: rag.generate's max_new_tokens


def test_bench_vs_k_prints_the_table_and_plots_the_curves(tmp_path):
    """python bench.py --vs_k A B --plot STEM: a markdown row per eval.json (named by pattern and run), per
    cite-then-read sweep and per citation sweep, % in a column per k (blank where a model was not measured at that
    k), and the EM rows plotted with the same numbers; a file that is not rag_train.py's eval.json is a one-line
    error."""
    evals = [{"pattern": "TTT", "params": 1060000, "vs_k": {"1": {"em": 0.844}, "4": {"em": 0.5}},
              "vs_k_reread": {"1": {"em": 0.844}, "4": {"em": 0.6}}},
             {"pattern": "TMTM", "params": 1120000, "checkpoint": "out/k16/ckpt.pt",
              "vs_k": {"1": {"em": 0.881, "citation_gold": 1.0}, "2": {"em": 0.8, "citation_gold": 0.5}, "4": {"em": 0.7}}}]
    paths = [str(tmp_path / f"eval{i}.json") for i in range(2)]
    for path, r in zip(paths, evals):
        json.dump(r, open(path, "w"))

    def bench_main(*argv):
        out, argv_before = io.StringIO(), sys.argv
        sys.argv = ["bench.py", *argv]
        try:
            with contextlib.redirect_stdout(out):
                runpy.run_path(os.path.join(HERE, "bench.py"), run_name="__main__")
        finally:
            sys.argv = argv_before
        return out.getvalue()
    stem = str(tmp_path / "acc_vs_k")
    assert bench_main("--vs_k", *paths, "--plot", stem).splitlines() == [
        "| model | params | k=1 | k=2 | k=4 |", "|---|---|---|---|---|",
        "| TTT | 1,060,000 | 84.4 |  | 50.0 |", "| TTT, reread | 1,060,000 | 84.4 |  | 60.0 |",
        "| TMTM k16 | 1,120,000 | 88.1 | 80.0 | 70.0 |", "| TMTM k16, cites gold | 1,120,000 | 100.0 | 50.0 |  |",
        f"wrote {stem}.png and {stem}.svg"]
    assert os.path.getsize(stem + ".png") > 0 and ">TTT, reread</text>" in open(stem + ".svg").read()
    drawn = bench.vs_k_plot(str(tmp_path / "again"), evals)
    assert {label: (xs, [round(y, 6) for y in ys]) for label, (xs, ys) in drawn.items()} == {
        "TTT": ([1, 4], [84.4, 50.0]), "TTT, reread": ([1, 4], [84.4, 60.0]),
        "TMTM k16": ([1, 2, 4], [88.1, 80.0, 70.0])}  # the citation rows are in the table only
    json.dump({"pattern": "T"}, open(paths[1], "w"))
    raises(lambda: bench_main("--vs_k", *paths), SystemExit, f"error: {paths[1]} is not an eval.json of rag_train.py")


def test_reread_asks_again_with_the_cited_document_alone():
    """rag.reread re-asks the question with only the document the answer cites and renumbers the new answer's
    citation to it; abstentions, several citations, a citation out of range, a single document, a multi-hop
    answer and an unfinished second pass leave the first answer as it was."""
    asked, second = [], {"stop": "answer", "answer": "Kel Odri was born in Velnor [1]."}

    def fake_generate(model, tok, messages, **kw):  # the second pass, without a model
        asked.append(messages)
        return second
    real_generate, rag.generate = rag.generate, fake_generate
    try:
        docs = [D0, D1, D2]
        first = {"stop": "answer", "answer": "Kel Odri was born in Durn [2].", "queries": [], "docs": docs,
                 "messages": rag.messages_for(QA["question"], docs, "Kel Odri was born in Durn [2].")}
        out = rag.reread(None, None, first, max_len=64)
        assert asked == [rag.messages_for(QA["question"], [D1])]
        assert out["answer"] == "Kel Odri was born in Velnor [2]." and out["reread"] == 2
        assert out["messages"] == rag.messages_for(QA["question"], docs, "Kel Odri was born in Velnor [2].")
        for answer, changes in [(ABSTAIN, {}), ("Kel Odri was born in Durn [1][2].", {}),
                                ("Kel Odri was born in Durn [4].", {}), ("Kel Odri was born in Durn [1].", {"docs": [D0]}),
                                ("Kel Odri was born in Durn [1].", {"queries": ["q"]}),
                                ("Kel Odri was born in Durn", {"stop": "max_tokens"})]:
            case = {**first, "answer": answer, **changes}
            assert rag.reread(None, None, case) is case
        assert len(asked) == 1
        second = {"stop": "max_tokens", "answer": None}
        assert rag.reread(None, None, first) is first
    finally:
        rag.generate = real_generate


def test_knockout_cites_among_many_documents_a_few_at_a_time():
    """With more documents than `group`, rag.reread takes its citation from rag.knockout: the model reads them
    `group` at a time, then the cited ones together, until one is left; it never reads more than `group` at once,
    and a knockout in which nothing is cited leaves the first answer as it was."""
    docs = [{"id": f"d{i}", "title": f"T{i}", "text": f"text {i}"} for i in range(10)]
    reads = []

    def fake_generate(model, tok, messages, **kw):  # cites the gold document d6 when shown, else the first one
        shown = messages[-1]["content"]
        reads.append([d["id"] for d in shown])
        if len(shown) == 1:
            return {"stop": "answer", "answer": "Kel Odri was born in Velnor [1]."}
        n = next((i for i, d in enumerate(shown) if d["id"] == "d6"), 0) + 1
        return {"stop": "answer", "answer": f"Kel Odri was born in Velnor [{n}]." if cite else ABSTAIN}
    real_generate, rag.generate = rag.generate, fake_generate
    try:
        cite = True
        first = {"stop": "answer", "answer": ABSTAIN, "queries": [], "docs": docs,
                 "messages": rag.messages_for(QA["question"], docs, ABSTAIN)}
        out = rag.reread(None, None, first, group=4)
        assert reads == [["d0", "d1", "d2", "d3"], ["d4", "d5", "d6", "d7"], ["d8", "d9"], ["d0", "d6", "d8"], ["d6"]]
        assert out["answer"] == "Kel Odri was born in Velnor [7]." and out["reread"] == 7
        assert rag.knockout(None, None, [], docs[:5], group=2) == 1  # d0 wins its rounds when d6 is absent
        cite, reads[:] = False, []
        assert rag.reread(None, None, first, group=4) is first and len(reads) == 3
    finally:
        rag.generate = real_generate


def test_score_hand_made_cases():
    docs = [D0, D1, D2]
    right = rag.score(QA, "Kel Odri was born in Velnor [2].", docs)
    assert right == {"em": 1.0, "em_answer": 1.0, "f1": 1.0, "abstained": 0.0, "hallucinated": 0.0, "citation_ok": 1.0,
                     "citation_gold": 1.0, "distracted": 0.0}
    misnamed = rag.score(QA, "Kel Odro was born in Velnor [2].", docs)  # the right fact, the person misspelt
    assert misnamed["em"] == 0.0 and misnamed["em_answer"] == 1.0 and misnamed["hallucinated"] == 1.0
    cites_city_doc = rag.score(QA, "Kel Odri was born in Velnor [3].", docs)  # holds the answer, but is not gold
    assert cites_city_doc["citation_ok"] == 1.0 and cites_city_doc["citation_gold"] == 0.0
    wrong_cite = rag.score(QA, "Kel Odri was born in Velnor [1].", docs)
    assert wrong_cite["em"] == 1.0 and wrong_cite["citation_ok"] == 0.0
    assert rag.score(QA, "Kel Odri was born in Velnor [9].", docs)["citation_ok"] == 0.0  # out of range
    assert rag.score(QA, "Kel Odri was born in Velnor.", docs)["citation_ok"] == 0.0       # no citation
    wrong = rag.score(QA, "Kel Odri was born in Durn [1].", docs)
    assert wrong["em"] == wrong["em_answer"] == 0.0 and wrong["f1"] == 0.0 and wrong["hallucinated"] == 1.0
    assert wrong["distracted"] == 1.0  # Durn is Ama Pesk's birthplace, in D0
    assert rag.score(QA, "Kel Odri was born in Pelmar [1].", docs)["distracted"] == 0.0  # in no document
    partial = rag.score(QA, "Kel Odri was born in Velnor City [2].", docs)
    assert partial["em"] == 0.0 and abs(partial["f1"] - 2 / 3) < 1e-9 and partial["hallucinated"] == 1.0
    timid = rag.score(QA, ABSTAIN, docs)  # the answer was there
    assert timid["abstained"] == 1.0 and timid["em"] == 0.0 and timid["hallucinated"] == 0.0 and "citation_ok" not in timid
    # gold document absent: abstaining is right, any definite answer (even the true one) is a hallucination
    assert rag.score(QA, ABSTAIN, [D0, D2]) == {"em": 1.0, "em_answer": 1.0, "f1": 1.0, "abstained": 1.0, "hallucinated": 0.0}
    lucky = rag.score(QA, "Kel Odri was born in Velnor [2].", [D0, D2])
    assert lucky["hallucinated"] == 1.0 and lucky["em"] == lucky["em_answer"] == 0.0
    # closed-book: no citations expected; no answer at all counts as a wrong definite answer
    assert rag.score(QA, "Kel Odri was born in Velnor.", None) == {"em": 1.0, "em_answer": 1.0, "f1": 1.0, "abstained": 0.0,
                                                               "hallucinated": 0.0}
    assert rag.score(QA, None, None)["hallucinated"] == 1.0
    s = rag.summarize([right, timid, lucky])
    assert s["n"] == 3 and abs(s["em"] - 1 / 3) < 1e-9 and s["citation_ok"] == 1.0 and abs(s["hallucinated"] - 1 / 3) < 1e-9


# -----------------------------------------------------------------------------
# your own data: a hand-made data directory, FlashRAG's formats, free-text answers

OWN_KB = [{"id": "a", "title": "ALU", "text": "Arithmetic Logic Unit (CPU)"},
          {"id": "b", "title": "ASCII", "text": "American Standard Code for Information Interchange"},
          {"id": "c", "title": "BIOS", "text": "Basic Input Output System (PC)"},
          {"id": "d", "title": "CPU", "text": "Central Processing Unit, the part with the ALU"},
          {"id": "e", "title": "DMA", "text": "Direct Memory Access"}]
OWN_QA = {"question": "What does BIOS stand for?", "golden_answers": ["Basic Input Output System", "Basic I/O System"]}


def own_docs():
    return {d["id"]: retrieve.Document(**d) for d in OWN_KB}


def test_own_data_free_text_answers_em_f1_and_masks():
    """A record without gold_ids or a response sentence: the target is the first golden answer citing the document
    that contains one; EM and F1 take the best golden answer; only the answer carries loss."""
    tok, docs = small_tokenizer(), own_docs()
    picked = [docs["a"], docs["c"], docs["e"]]
    assert rag.has_gold(OWN_QA, picked) and not rag.has_gold(OWN_QA, [docs["a"], docs["e"]])
    assert rag.target_answer(OWN_QA, picked) == "Basic Input Output System [2]"
    assert rag.target_answer(OWN_QA, None) == "Basic Input Output System"
    assert rag.target_answer(OWN_QA, [docs["a"]]) == ABSTAIN
    ids, mask = rag.render_example(tok, OWN_QA, picked)
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == "<|assistant_start|> Basic Input Output System [2]<|assistant_end|>"
    second = rag.score(OWN_QA, "basic I/O system [2]", picked)  # the second golden answer, SQuAD-normalised
    assert second["em"] == 1.0 and second["f1"] == 1.0 and second["citation_ok"] == 1.0 and second["citation_gold"] == 1.0
    partial = rag.score(OWN_QA, "Basic Output System [1]", picked)  # best F1: 3 of 3 predicted in 4 gold tokens
    assert partial["em"] == 0.0 and abs(partial["f1"] - 2 * 0.75 / 1.75) < 1e-9 and partial["citation_ok"] == 0.0
    assert rag.score(OWN_QA, ABSTAIN, [docs["a"]])["em"] == 1.0  # nothing holds it: abstaining is right
    assert rag.score({**OWN_QA, "golden_answers": []}, ABSTAIN, picked)["em"] == 1.0  # unanswerable


def test_own_data_raft_sampler_on_a_hand_made_kb():
    """Without gold_ids the gold is the best-ranked retrieved document holding an answer; a distractor never holds
    one (else 'gold removed' would still hold the answer); gold_ids, when given, decide instead."""
    docs = own_docs()
    ranked = [docs["d"], docs["c"], docs["a"], docs["e"], docs["b"]]
    qa = {"question": "What does ALU stand for?", "golden_answers": ["Arithmetic Logic Unit"]}
    seen = set()
    for s in range(30):
        picked = rag.raft_docs(qa, ranked, docs, random.Random(s), 3, p_no_gold=0.0)
        assert [d.id for d in picked if rag.is_gold(qa, d)] == ["a"] and len(picked) == 3
        seen.add([d.id for d in picked].index("a"))
    assert seen == {0, 1, 2}
    none = rag.raft_docs(qa, ranked, docs, random.Random(0), 3, p_no_gold=1.0)
    assert [d.id for d in none] != [] and not rag.has_gold(qa, none) and rag.target_answer(qa, none) == ABSTAIN
    by_id = rag.raft_docs({**qa, "gold_ids": ["d"]}, ranked, docs, random.Random(0), 2, p_no_gold=0.0)
    assert "d" in [d.id for d in by_id]  # gold_ids name the gold, whatever the text holds


def write_data_dir(d, kb=OWN_KB, train=None, heldout=None):
    os.makedirs(d, exist_ok=True)
    for name, rows in (("kb", kb), ("qa_train", train or [OWN_QA]), ("qa_heldout", heldout or [OWN_QA])):
        with open(os.path.join(d, f"{name}.jsonl"), "w") as f:
            f.writelines((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    return d


def test_flashrag_files_load_without_conversion(tmp_path):
    corpus = [{"id": "0", "contents": '"Basic Input Output System"\nBIOS is the firmware that starts a PC.'},
              {"id": "1", "contents": '"Direct Memory Access"\nDMA lets devices write memory directly.'}]
    qa = [{"id": "test_0", "question": "What starts a PC?", "golden_answers": ["BIOS", "the BIOS"]}]
    docs, by_id, sets = rag.load_data(write_data_dir(tmp_path, corpus, qa, qa))
    assert by_id["0"].title == "Basic Input Output System" and by_id["0"].text.startswith("BIOS is the firmware")
    assert sets["heldout"][0]["golden_answers"] == ["BIOS", "the BIOS"] and rag.has_gold(sets["heldout"][0], docs)


def test_own_data_bad_input_is_one_line_naming_file_and_line(tmp_path):
    good = json.dumps(OWN_QA)
    cases = {"no_question": ([OWN_KB, [good, json.dumps({"golden_answers": ["x"]})]], "qa_train.jsonl line 2", "question"),
             "no_answers": ([OWN_KB, [json.dumps({"question": "q?"})]], "qa_train.jsonl line 1", "golden_answers"),
             "bad_gold": ([OWN_KB, [good, good, json.dumps({**OWN_QA, "gold_ids": ["zz"]})]], "line 3", "'zz'"),
             "empty_kb": ([[], [good]], "kb.jsonl", "empty"),
             "foreign_heldout": ([OWN_KB, [good], [json.dumps({"question": "q?", "golden_answers": ["Zanzibar"]})]],
                                 "qa_heldout.jsonl", "shares no document")}
    for name, (files, where, what) in cases.items():
        d = write_data_dir(tmp_path / name, *files)
        try:
            rag.load_data(d)
            assert False, name
        except ValueError as e:
            assert where in str(e) and what in str(e) and len(str(e).splitlines()) == 1, (name, e)
    # the stage itself: one line, and nothing written
    out = tmp_path / "out"
    p = rag_train(f"--data_dir={tmp_path / 'bad_gold'}", f"--init_from={checkpoint('TM', str(tmp_path / 'm.pt'))}",
                  f"--out_dir={out}")
    assert p.returncode != 0 and "Traceback" not in p.stderr and p.stderr.strip().count("\n") == 0, p.stderr
    assert "qa_train.jsonl line 3" in p.stderr and not out.exists()


def test_own_data_end_to_end_prepare_train_rag_train_eval(tmp_path):
    """Your own documents and questions, end to end: prepare.py on the text, train.py, rag_train.py on the data
    directory, and its evaluation (EM, F1, recall, accuracy vs k) in eval.json."""
    words = "alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega".split()
    kb = [{"id": f"t{i}", "title": f"T{i}X", "text": f"{words[i % 11].title()} {words[(3 * i) % 11].title()} Terminal"}
          for i in range(40)]
    qa = lambda i: {"id": f"q{i}", "question": f"What does T{i}X stand for?", "golden_answers": [kb[i]["text"]]}
    d = write_data_dir(tmp_path / "d", kb, [qa(i) for i in range(30)],
                       [qa(i) for i in range(30, 40)] + [{"question": "What does ZZZ stand for?", "golden_answers": []}])
    with open(tmp_path / "text.jsonl", "w") as f:
        f.writelines(json.dumps({"text": f"{r['title']}: {r['text']}"}) + "\n" for r in kb * 3)
    assert ran("prepare.py", f"--input={tmp_path / 'text.jsonl'}", f"--out={tmp_path / 'text'}", "--vocab_size=300",
               "--val_frac=0.3").returncode == 0
    assert ran("train.py", f"--data_dir={tmp_path / 'text'}", f"--out_dir={tmp_path / 'base'}", *TINY, "--max_iters=2",
               "--eval_interval=2", "--block_pattern=TM").returncode == 0
    p = rag_train(f"--data_dir={d}", f"--init_from={tmp_path / 'base' / 'ckpt.pt'}", f"--out_dir={tmp_path / 'rag'}",
                  *TINY_RAG, "--eval_n=0")
    assert p.returncode == 0, p.stderr[-2000:]
    res = json.load(open(tmp_path / "rag" / "eval.json"))
    assert res["n_single"] == 10 and res["n_unanswerable"] == 1 and set(res["recall"]) == {"1"}
    assert {"em", "f1", "abstained", "hallucinated"} <= set(res["rag"]) and res["vs_k"]["1"]["n"] == 10
    assert "no closed-book questions" in p.stdout and "text_weight is 0" not in p.stdout  # text: the base's train.bin


# -----------------------------------------------------------------------------
# the generation loop, with a model that plays back a script

class Scripted(torch.nn.Module):
    """The GPT interface, playing back `script`: each forward call's last logits pick the next script token.
    Records every token it was fed, so the test can check what went through the cache."""

    def __init__(self, script, vocab_size):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.script, self.vocab_size, self.fed = list(script), vocab_size, []

    def init_cache(self, batch_size, max_len):
        return SimpleNamespace(pos=0, max_len=max_len)

    def forward(self, idx, cache=None):
        assert cache.pos + idx.shape[1] <= cache.max_len
        self.fed += idx[0].tolist()
        cache.pos += idx.shape[1]
        logits = torch.zeros(1, idx.shape[1], self.vocab_size)
        logits[0, -1, self.script.pop(0) if self.script else 0] = 1.0
        return logits, None


def hop_script(tok, query, answer):
    return turn(tok, "query", query) + turn(tok, "answer", answer)


def test_multi_hop_loop_retrieves_appends_and_answers():
    _, tok, _, _ = rag_world()
    calls = []
    retrieve = lambda q, k: calls.append((q, k)) or [D1, D2, D0][:k]
    script = hop_script(tok, "Where was Kel Odri born?", "Kel Odri was born in Velnor [2].")
    model = Scripted(script, tok.vocab_size)
    streamed = []
    out = rag.generate(model, tok, rag.messages_for("Where is the birthplace of Kel?", [D0]), retrieve=retrieve,
                       top_k=2, max_hops=1, on_token=lambda piece, kind: streamed.append((kind, piece)))
    assert out["stop"] == "answer" and out["answer"] == "Kel Odri was born in Velnor [2]."
    assert calls == [("Where was Kel Odri born?", 2)] and out["queries"] == ["Where was Kel Odri born?"]
    assert [d["id"] for d in out["docs"]] == ["d0", "d1", "d2"]  # numbering continues: the hop's docs are [2], [3]
    ids, mask = render_conversation(tok, out["messages"])
    assert out["ids"] == ids and out["mask"] == mask  # exactly the training rendering, masks included
    assert "[2] Kel Odri:" in tok.decode(ids) and "[3] Velnor:" in tok.decode(ids)
    assert model.fed == out["ids"][:-1]  # every token went through the cache once (the last one is not needed)
    assert "".join(p for k, p in streamed if k == "answer") == out["answer"]
    assert "".join(p for k, p in streamed if k == "query") == "Where was Kel Odri born?"


def test_loop_stopping_rules():
    _, tok, _, _ = rag_world()
    script = hop_script(tok, "Where was Kel Odri born?", "Kel Odri was born in Velnor [2].")
    msgs = rag.messages_for("Where is the birthplace of Kel?", [D0])
    never = lambda q, k: (_ for _ in ()).throw(AssertionError("retrieved beyond max_hops"))
    out = rag.generate(Scripted(script, tok.vocab_size), tok, msgs, retrieve=never, max_hops=0)
    assert out["stop"] == "max_hops" and out["answer"] is None and out["queries"] == ["Where was Kel Odri born?"]
    out = rag.generate(Scripted(tok.encode("Velnor"), tok.vocab_size), tok, msgs)
    assert out["stop"] == "format" and out["answer"] is None and sum(out["mask"]) == 1
    out = rag.generate(Scripted(script[-10:-1] * 5, tok.vocab_size), tok, msgs, max_new_tokens=4)
    assert out["stop"] in ("format", "max_tokens")
    long = [tok.special("<|assistant_start|>")] + tok.encode("Kel Odri was born in Velnor and Durn and more") * 3
    out = rag.generate(Scripted(long, tok.vocab_size), tok, msgs, max_new_tokens=6)
    assert out["stop"] == "max_tokens" and sum(out["mask"]) == 7
    # context limit: the hop's documents do not fit and are dropped, then the answer runs out of room
    prompt = len(render_conversation(tok, msgs)[0])
    model = Scripted(script, tok.vocab_size)  # asserts that it is never fed beyond the cache
    out = rag.generate(model, tok, msgs, retrieve=lambda q, k: [D1, D2], max_hops=2, max_len=prompt + 14, max_new_tokens=14)
    assert out["stop"] == "context" and out["dropped"]["docs"] == 2 and len(model.fed) == prompt + 14
    # the first prompt itself is cut to fit: lowest-ranked documents go first
    two = rag.messages_for("Where is the birthplace of Kel?", [D1, D0])
    room = len(render_conversation(tok, rag.messages_for("Where is the birthplace of Kel?", [D1]))[0]) + 8
    out = rag.generate(Scripted(script[-12:], tok.vocab_size), tok, two, max_len=room, max_new_tokens=8)
    assert out["dropped"]["docs"] == 1 and [d["id"] for d in out["docs"]] == ["d1"]
    # an earlier turn goes before this turn's documents do
    history = rag.messages_for("Who is Ama Pesk?", [D0], "Ama Pesk was born in Durn [1].")
    room = len(render_conversation(tok, two)[0]) + 8
    out = rag.generate(Scripted(script[-12:], tok.vocab_size), tok, history + two, max_len=room, max_new_tokens=8)
    assert out["dropped"] == {"docs": 0, "turns": 1} and out["messages"][0]["content"] == "Where is the birthplace of Kel?"


def test_loop_with_a_real_model_matches_full_forward():
    """Cached prefill, one-token decode and a chunked prefill of appended documents give the tokens a full forward
    over the final sequence would pick."""
    _, tok, _, _ = rag_world()
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_embd=32, n_head=2, n_kv_head=1, vocab_size=tok.vocab_size, block_pattern="TM")).eval()
    s = tok.special
    with torch.no_grad():  # make the model open a query at once, and close it after 3 tokens, so the loop retrieves
        model.lm_head.weight.zero_()
        model.lm_head.weight[s("<|query_start|>")] += 1.0
    out = rag.generate(model, tok, rag.messages_for("Where was Kel Odri born?", [D0]), retrieve=lambda q, k: [D1, D2],
                       max_hops=1, max_new_tokens=3)
    assert out["stop"] == "max_tokens" or out["stop"] == "format"
    seq = torch.tensor([out["ids"]])
    with torch.no_grad():
        full = model(seq)[0][0]
    sampled = [i for i, m in enumerate(out["mask"]) if m]
    assert all(full[i - 1].argmax().item() == out["ids"][i] for i in sampled)


# -----------------------------------------------------------------------------
# rag_train.py: the Transformer refusal, both data modes, and a fine-tune that learns

def test_pure_transformer_is_refused_with_one_line():
    data, *_ = rag_world()
    ckpt = checkpoint("T", os.path.join(TMP.name, "t.pt"))
    r = ran("rag_train.py", f"--init_from={ckpt}", f"--data_dir={data}", f"--out_dir={TMP.name}/t_rag")
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "pure Transformer" in r.stderr and "--allow_transformer=True" in r.stderr
    assert not os.path.exists(f"{TMP.name}/t_rag/ckpt.pt")


TINY_RAG = ["--seq_len=256", "--total_batch_size=1024", "--device_batch_size=2", "--max_iters=2", "--eval_interval=2",
        "--k_max=3", "--eval_n=1", "--eval_ks=1", "--warmup_iters=1"]


def test_chat_lists_the_sources_it_read_and_fails_in_one_line():
    """chat.py -p retrieves, answers (or says why it could not) and lists the documents it read, numbered as the
    model saw them; when the context is too small it drops the lowest-ranked documents and says so once; a
    missing KB or checkpoint is one line on stderr, no traceback."""
    data, _, _, _ = rag_world()
    kb = os.path.join(data, "kb.jsonl")
    question = next(q for q in map(json.loads, open(os.path.join(data, "qa_heldout.jsonl"))) if q["hops"] == 1)["question"]
    bm25 = retrieve.BM25Retriever()
    bm25.add_documents(retrieve.load_documents(kb))
    top3 = [d.id for d, _ in bm25.retrieve(question, 3)]
    for block_size, n_read in ((512, 3), (128, 1)):
        ckpt = checkpoint("TM", os.path.join(TMP.name, f"chat{block_size}.pt"), "rag", block_size=block_size)
        lines = ran("chat.py", "--ckpt", ckpt, "--kb", kb, "-p", question, "--top_k", "3", "--max_new_tokens", "4").stdout.splitlines()
        sources = [l.split("] ")[1].split(":")[0] for l in lines[lines.index("sources (* = cited by the answer):") + 1:]]
        assert sources == top3[:n_read]  # the best-ranked first, the rest dropped to fit
        assert sum("context limit" in l for l in lines) == (n_read < 3)
    for bad in (["--ckpt", ckpt, "--kb", "/nonexistent/kb"], ["--ckpt", "/nonexistent/ckpt.pt", "--kb", kb]):
        p = ran("chat.py", *bad, "-p", question)
        assert p.returncode != 0 and "/nonexistent/" in p.stderr and len(p.stderr.strip().splitlines()) == 1


def test_chat_turns_keep_earlier_text_not_documents():
    """A turn sees the earlier turns as text (questions, answers without citations) and none of their documents,
    so this turn's are numbered from [1]; a pronoun follow-up is retrieved with the last question that named its
    entity, and the re-read keeps the earlier text too (only it says who "his" is)."""
    _, tok, _, _ = rag_world()
    model = Scripted(turn(tok, "answer", "Kel Odri was born in Velnor [2].") + turn(tok, "answer", "Kel Odri was born in Velnor [1]."), tok.vocab_size)
    _, out = rag.ask(model, tok, "Where was Kel Odri born?", retrieve=lambda q, k: [D0, D1], top_k=2, max_len=512)
    assert out["answer"] == "Kel Odri was born in Velnor [2]." and out["reread"] == 2
    history = rag.text_only(out["messages"])
    assert history == rag.messages_for("Where was Kel Odri born?", None, "Kel Odri was born in Velnor.")
    asked = []
    model = Scripted(turn(tok, "answer", "Kel Odri is a poet [2].") + turn(tok, "answer", "Kel Odri is a poet [1]."), tok.vocab_size)
    first, out = rag.ask(model, tok, "What is his profession?", history, "Where was Kel Odri born?",
                          retrieve=lambda q, k: asked.append(q) or [D2, D1], top_k=2, max_len=512)
    assert asked == ["Where was Kel Odri born? What is his profession?"] and out["answer"] == "Kel Odri is a poet [2]."
    text = tok.decode(first["ids"])
    assert text.startswith("<|bos|><|user_start|> Where was Kel Odri born?<|user_end|><|assistant_start|> Kel Odri was "
                           "born in Velnor.<|assistant_end|><|user_start|> What is his profession?<|user_end|><|doc_start|>[1] Velnor:")
    assert text.count("<|doc_start|>") == 2 and "Ama Pesk" not in text
    fed = tok.decode(model.fed)  # both passes: the re-read has the history and the cited document alone
    assert fed.count("born in Velnor.<|assistant_end|><|user_start|> What is his profession?<|user_end|>") == 2
    assert fed.count("<|doc_start|>") == 3
    assert f"What is his profession?<|user_end|><|doc_start|>[1] Kel Odri: {D1['text']}<|doc_end|><|assistant_start|>" in fed


def test_followup_query_finds_the_entity_a_pronoun_refers_to():
    """A question with a pronoun is searched together with the last question that named its entity; others as
    they are. On the world, the pronoun follow-up's words alone rarely retrieve its entity's document; with the
    previous question, BM25 ranks it first."""
    topic = "Who employs Kel Odri?"
    for q in ("Where was he born?", "What is her profession?", "When was it founded?", "Who founded that company?",
              "What is its population?"):
        assert rag.search_query(q, topic) == f"{topic} {q}"
    for q in ("Where was Ama Pesk born?", "Which item is the heaviest?", "Where is the company Kel Odri works for?"):
        assert rag.search_query(q, topic) == q
    assert rag.search_query("Where was he born?", None) == "Where was he born?"
    data, *_ = rag_world()
    kb, _, qa = rag.load_data(data, ("heldout",))
    bm25 = retrieve.BM25Retriever()
    bm25.add_documents(kb)
    top = lambda q, k: [d for d, _ in bm25.retrieve(q, k)]
    about = {}
    for q in qa["heldout"]:
        if q["hops"] == 1 and q["type"] in world.ENTITY_KIND:
            about.setdefault(q["entity"], []).append(q)
    found, literal = [], []
    for e, qs in about.items():
        for first, q in zip(qs, qs[1:]):
            followup = world.refer_back(q["question"], e, world.PRONOUNS[world.ENTITY_KIND[q["type"]]][0])
            assert e not in followup and rag.PRONOUN.search(followup), followup
            found.append(rag.has_gold(q, top(rag.search_query(followup, first["question"]), 1)))
            literal.append(rag.has_gold(q, top(followup, 4)))
    assert len(found) > 20 and sum(found) / len(found) > 0.9 and sum(literal) / len(literal) < 0.3


def test_chat_sources_once_each_and_base_model_continues_the_prompt():
    """The sources list names each document once, with every number it had, * on the cited ones. A pre-trained
    checkpoint gets sample.py's behaviour: the prompt and the model's own continuation, with a one-line note."""
    import chat
    assert chat.sources([D0, D1, D0, D2], [3]) == ["  *[1][3] d0: Ama Pesk", "   [2] d1: Kel Odri", "   [4] d2: Velnor"]
    data, tok, _, _ = rag_world()
    ckpt = checkpoint("TM", os.path.join(TMP.name, "base.pt"), block_size=128)
    prompt = "Question: Where was Kel Odri born?"
    p = ran("chat.py", "--ckpt", ckpt, "--kb", os.path.join(data, "kb.jsonl"), "-p", prompt, "--max_new_tokens", "6")
    model = GPT.from_checkpoint(torch.load(ckpt, weights_only=True)).eval()
    ids = [tok.bos_id] + tok.encode(prompt)
    new = model.generate(torch.tensor([ids]), 6)[0, len(ids):].tolist()
    assert p.stdout == prompt + tok.decode(new[:new.index(tok.bos_id)] if tok.bos_id in new else new) + "\n"
    assert len(p.stderr.strip().splitlines()) == 1 and "not fine-tuned for chat" in p.stderr


def test_rag_train_followup_and_out_of_world_examples():
    """A follow-up example: the first turn as text only and without loss, then a question that refers back with
    a pronoun and its documents (gold among them), the answer naming the entity as the first turn does, renamed
    alike in both turns. An out-of-world example asks about a real thing over the world's KB and abstains."""
    data, tok, _, _ = rag_world()
    kb, by_id, qa = rag.load_data(data, ("train",))
    about = {e: qs for e, qs in world.by_entity(qa["train"]).items() if qs[0]["gold_ids"][0].startswith("rag-person")}
    entity = sorted(about)[0]
    bm25 = retrieve.BM25Retriever()
    bm25.add_documents(kb)
    search = lambda q: [d for d, _ in bm25.retrieve(q, 8)]
    out_of_world_qa = world.out_of_world("train", random.Random(0))
    for seed, p_rename in ((0, 0.0), (1, 0.0), (2, 1.0), (3, 1.0)):
        ids, mask = world.followup_example(tok, random.Random(seed), {entity: about[entity]}, search, by_id, 3, 0.0,
                                           p_rename, world.first_names(kb))
        text = tok.decode(ids)
        first, second = text.split("<|assistant_end|><|user_start|>")
        assert "<|doc_start|>" not in first and first.count("<|user_start|>") == 1 and "<|doc_start|>[1] " in second
        q2, answer = second.split("<|user_end|>")[0], tok.decode([t for t, m in zip(ids, mask) if m])
        assert rag.PRONOUN.search(q2) and answer == "<|assistant_start|> " + second.split("<|assistant_start|> ")[1]
        name = first.split("<|assistant_start|> ")[1].split(" ")[:2]  # the first answer starts with the entity
        assert answer.split(" ")[1:3] == name and "[" in answer and ABSTAIN not in answer
        assert (entity.split()[1] in text) == (p_rename == 0.0)
    ids, mask = rag.out_of_world_example(tok, random.Random(0), out_of_world_qa, search, 3)
    assert tok.decode([t for t, m in zip(ids, mask) if m]) == f"<|assistant_start|> {ABSTAIN}<|assistant_end|>"
    assert "<|doc_start|>[1] " in tok.decode(ids)
    heldout = world.out_of_world("heldout", random.Random(0))
    assert len(heldout) >= 100 and not {q.get("entity") for q in heldout} & {q.get("entity") for q in out_of_world_qa} - {None}


def test_rag_train_pack_drops_what_does_not_fit():
    """rag.pack: conversations packed greedily, targets only where the mask is 1, the rest padded with -1; an
    example that does not fit is lost, not carried into the next row, and one longer than a row is cut."""
    examples = iter([([1, 2, 3], [0, 1, 1]), ([4, 5, 6, 7, 8], [1] * 5), (list(range(9, 17)), [0, 0] + [1] * 6)])
    x, y = rag.pack(lambda: next(examples), 2, 6)
    assert x.tolist() == [[1, 2, 0, 0, 0, 0], [9, 10, 11, 12, 13, 14]]
    assert y.tolist() == [[2, 3, -1, -1, -1, -1], [-1, 11, 12, 13, 14, 15]]


def test_same_seed_same_run():
    """Two rag_train.py runs with the same seed and threads: the same weights and the same eval.json (a run is a
    function of its seed), and no training row shows a held-out document."""
    data, tok, docs, qa = rag_world()
    ckpt = checkpoint("TM", os.path.join(TMP.name, "tm.pt"))
    outs, evals, packed, pack = {}, {}, [], rag.pack

    def recording_pack(next_example, rows, seq_len):  # rag_train.py's batches, as the text of each example
        def recorded():
            ids, mask = next_example()
            packed.append(tok.decode(ids))
            return ids, mask
        return pack(recorded, rows, seq_len)
    for run in ("a", "b"):
        rag.pack = recording_pack
        try:
            r = rag_train(f"--init_from={ckpt}", f"--data_dir={data}", f"--out_dir={TMP.name}/{run}", *TINY_RAG)
        finally:
            rag.pack = pack
        assert r.returncode == 0, r.stderr[-2000:]
        outs[run] = torch.load(f"{TMP.name}/{run}/ckpt.pt", weights_only=True)
        res = json.load(open(f"{TMP.name}/{run}/eval.json"))
        evals[run] = {k: v for k, v in res.items() if k not in ("seconds", "config", "checkpoint")}
        assert res["rag"]["n"] == 1 and set(res["vs_k"]) == {"1"}
        assert res["rag_reread"]["n"] == 1 and set(res["vs_k_reread"]) == {"1"}  # cite-then-read beside one pass
    assert outs["b"]["stage"] == "rag" and outs["b"]["step"] == 2
    a, b = outs["a"]["model"], outs["b"]["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same batches, so the same weights
    assert evals["a"] == evals["b"]
    heldout = [d["text"] for i, d in docs.items() if i.startswith("heldout")]
    assert heldout and sum("<|doc_start|>" in p for p in packed) >= 4  # RAG examples were drawn, each with documents
    assert any(d["text"] in p for i, d in docs.items() if i.startswith("rag") for p in packed)  # documents match as text
    assert not [h for h in heldout for p in packed if h in p]  # the held-out world stays unseen
    base = torch.load(ckpt, weights_only=True)["model"]
    assert not all(torch.equal(a[k], base[k]) for k in a)  # and it did train


def test_rename_names_hides_the_names_everywhere():
    """The asked-about person gets a fresh name shaped like a held-out one (a pool first name, an invented
    surname) in the question and every document, and a name answer is renamed the same way; a year is kept."""
    _, tok, docs, qa = rag_world()
    first_names = sorted({d["title"].split()[0] for d in docs.values() if d["metadata"]["type"] == "person"})
    for qtype in ("born_in", "born_year"):
        q = next(q for q in qa if q["type"] == qtype and q["gold_ids"][0].startswith("rag-person"))
        gold = retrieve.Document(**docs[q["gold_ids"][0]])
        q2, (g2,) = world.rename_names(q, [gold], random.Random(0), first_names)
        surname = q["entity"].split()[-1]
        assert surname not in q2["question"] + g2.title + g2.text and q2["entity"] in q2["question"]
        assert q2["entity"].split()[0] in first_names and q2["entity"] in g2.title and q2["entity"] in q2["response"]
        a, a2 = q["golden_answers"][0], q2["golden_answers"][0]
        assert (a2 != a) == (qtype == "born_in") and a2 in g2.text and a2 in q2["response"]
        assert (a in g2.text) == (qtype == "born_year")
        assert rag.score(q2, rag.target_answer(q2, [g2]), [g2])["em"] == 1.0
    q = next(q for q in qa if q["type"] == "capital")  # a country keeps its suffix
    q2, _ = world.rename_names(q, [retrieve.Document(**docs[q["gold_ids"][0]])], random.Random(0), first_names)
    assert q2["entity"] != q["entity"]
    assert any(q["entity"].endswith(s) and q2["entity"].endswith(s) for s in COUNTRY_SUFFIXES)


def test_tiny_finetune_beats_chance():
    """End to end on the tiny world: RAFT conversations -> a few seconds of fine-tuning a random tiny hybrid ->
    held-out conversations. Accuracy here is teacher-forced next-token accuracy on what the assistant says: it must
    beat chance (always the most frequent answer token) and the untrained model. (Exact match needs far more
    training than a unit test has: see rag_train.py's evaluation.)"""
    data, tok, docs, qa = rag_world()
    heldout = [json.loads(l) for l in open(os.path.join(data, "qa_heldout.jsonl"))]
    pool = list(docs.values())
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_embd=64, n_head=2, n_kv_head=1, vocab_size=tok.vocab_size, block_pattern="TM"))

    def batch(qs, rng):
        rows = [rag.render_example(tok, q, rag.raft_docs(q, rng.sample(pool, 3), docs, rng, 2, p_no_gold=0.3)) for q in qs]
        n = max(len(ids) for ids, _ in rows)
        x = torch.tensor([ids[:-1] + [0] * (n - len(ids)) for ids, _ in rows])
        y = torch.tensor([[t if m else -1 for t, m in zip(ids[1:], mask[1:])] + [-1] * (n - len(ids)) for ids, mask in rows])
        return x, y

    x_test, y_test = batch([q for q in heldout if q["hops"] <= 1][:48], random.Random(1))
    answer_tokens = y_test[y_test >= 0]
    chance = torch.bincount(answer_tokens).max().item() / len(answer_tokens)

    def accuracy():
        with torch.no_grad():
            pred = model(x_test)[0].argmax(-1)
        return (pred[y_test >= 0] == answer_tokens).float().mean().item()

    before = accuracy()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rng = random.Random(0)
    train = [q for q in qa if q["hops"] <= 1]
    for _ in range(STEPS):
        _, loss = model(*batch(rng.sample(train, 8), rng))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    after = accuracy()
    print(f"answer-token accuracy: untrained {before:.3f}, chance {chance:.3f}, after {STEPS} steps {after:.3f}")
    assert after > chance + 0.1 and after > before + 0.1, (before, chance, after)


STEPS = 20  # fine-tuning steps of the end-to-end test


# -----------------------------------------------------------------------------
# refrag_train.py

TMP_REFRAG = tempfile.TemporaryDirectory()


W = dict(w_em=1.0, w_f1=0.0, w_cite=0.2, w_format=0.5, w_hop=0.05)  # reward weights (refrag_train.py's)


def tiny_gpt(tok, pattern="TM"):
    torch.manual_seed(0)
    return GPT(GPTConfig(n_layer=2, n_embd=32, n_head=2, n_kv_head=1, block_size=64, vocab_size=tok.vocab_size,
                         block_pattern=pattern))


class ScriptedRefrag(torch.nn.Module):
    """A stand-in for GPT that emits a fixed token script, one token per forward call."""

    def __init__(self, script, vocab_size):
        super().__init__()
        self.script, self.vocab_size, self.dummy = list(script), vocab_size, torch.nn.Parameter(torch.zeros(1))

    def init_cache(self, batch_size, max_len):
        return type("Cache", (), {"pos": 0, "max_len": max_len})()

    def forward(self, idx, cache=None):
        cache.pos += idx.size(1)
        logits = torch.zeros(1, idx.size(1), self.vocab_size)
        logits[0, -1, self.script.pop(0) if self.script else 0] = 1.0
        return logits, None


def turn(tok, kind, text):
    start, end = {"query": ("<|query_start|>", "<|query_end|>"), "answer": ("<|assistant_start|>", "<|assistant_end|>")}[kind]
    return [tok.special(start)] + tok.encode(" " + text) + [tok.special(end)]  # messages open with a space


def two_hop():
    _, _, docs, qa = rag_world()
    return next(q for q in qa if q["hops"] == 2), docs


# -----------------------------------------------------------------------------
# the gold conversations of the warm start

def test_chain_conversation_queries_what_is_missing_and_masks_only_model_text():
    _, tok, docs, qa = rag_world()
    q = next(q for q in qa if q["hops"] == 3)
    distractors = [d for d in docs.values() if d["id"] not in q["gold_ids"]][:2]
    first = docs[q["gold_ids"][0]]
    # the question's retrieval finds step 1's document; the queries' retrievals miss theirs: the gold goes in
    retrieve = lambda query, k: ([first] if query == q["question"] else []) + distractors[:k - (query == q["question"])]
    msgs = rag.chain_messages(q, retrieve, docs, 2)
    assert [m["role"] for m in msgs] == ["user", "documents", "query", "documents", "query", "documents", "assistant"]
    assert [m["content"] for m in msgs if m["role"] == "query"] == q["queries"][1:]
    seen = [d["id"] for m in msgs if m["role"] == "documents" for d in m["content"]]
    assert seen[0] == first["id"] and seen[3] == q["gold_ids"][1] and seen[5] == q["gold_ids"][2]
    assert msgs[-1]["content"] == prepare_answer(q, cite=6)  # the last gold document is [6]
    ids, mask = render_conversation(tok, msgs)
    learned = [t for t, m in zip(ids, mask) if m]
    expected = sum((turn(tok, "query", query) for query in q["queries"][1:]), []) + turn(tok, "answer", msgs[-1]["content"])
    assert learned == expected  # queries and the answer, never the question or a document


def prepare_answer(qa, cite):
    return rag.with_citation(qa["response"], cite)


def test_chain_conversation_single_hop_answers_at_once_unanswerable_abstains():
    _, tok, docs, qa = rag_world()
    one = next(q for q in qa if q["hops"] == 1)
    none = next(q for q in qa if q["hops"] == 0)
    gold, other = docs[one["gold_ids"][0]], next(d for d in docs.values() if d["id"] not in one["gold_ids"])
    msgs = rag.chain_messages(one, lambda query, k: [other, gold], docs, 2)
    assert [m["role"] for m in msgs] == ["user", "documents", "assistant"] and msgs[-1]["content"] == prepare_answer(one, 2)
    msgs = rag.chain_messages(none, lambda query, k: [other, gold], docs, 2)
    assert [m["role"] for m in msgs] == ["user", "documents", "assistant"] and msgs[-1]["content"] == ABSTAIN


def test_sign_test_on_hand_made_splits():
    sign_test = rag.sign_test
    assert sign_test(8, 0) == sign_test(0, 8) == 2 / 256  # all eight changes one way
    assert abs(sign_test(7, 3) - 2 * (1 + 10 + 45 + 120) / 1024) < 1e-12
    assert sign_test(5, 5) == sign_test(0, 0) == 1.0


def test_renamed_swaps_entity_names_consistently():
    msgs = [{"role": "user", "content": "In what year was the employer of Kel Odri founded?"},
            {"role": "documents", "content": [{"id": "p1", "title": "Kel Odri", "text": "Kel Odri works for Velnor Group."}]},
            {"role": "query", "content": "When was Velnor Group founded?"},
            {"role": "assistant", "content": "The company Kel Odri works for was founded in 1971 [2]."}]
    import random
    out = world.renamed(msgs, {"Kel", "Odri", "Velnor"}, random.Random(0))
    kel, odri = out[1]["content"][0]["title"].split()
    velnor = out[2]["content"].split()[2]
    assert {kel, odri, velnor}.isdisjoint({"Kel", "Odri", "Velnor"}) and out[1]["content"][0]["id"] == "p1"
    assert out[0]["content"] == f"In what year was the employer of {kel} {odri} founded?"
    assert out[1]["content"][0]["text"] == f"{kel} {odri} works for {velnor} Group."
    assert out[3]["content"] == f"The company {kel} {odri} works for was founded in 1971 [2]."  # facts stay
    assert world.renamed(msgs, set(), random.Random(0)) == msgs


def test_renamed_world_retrieves_real_documents_under_invented_names():
    """RL on invented names: queries written with the invented names find the real documents, which come back
    renamed the same way, so the question is answerable only from what is retrieved."""
    import random
    kb = {"Kel Odri": {"id": "p1", "title": "Kel Odri", "text": "Kel Odri works for Velnor Group."},
          "Velnor Group": {"id": "c1", "title": "Velnor Group", "text": "Velnor Group was founded in 1971."}}
    asked = []
    retrieve = lambda query, k: asked.append(query) or [d for t, d in kb.items() if t in query][:k]
    qa = {"question": "When was the employer of Kel Odri founded?", "golden_answers": ["1971"], "entity": "Kel Odri"}
    qa2, retrieve2 = world.renamed_world(qa, retrieve, {"Kel", "Odri", "Velnor"}, random.Random(0))
    kel, odri = qa2["entity"].split()
    assert {kel, odri}.isdisjoint({"Kel", "Odri"}) and qa2["question"] == f"When was the employer of {kel} {odri} founded?"
    [person] = retrieve2(f"Where does {kel} {odri} work?", 1)
    assert asked[-1] == "Where does Kel Odri work?" and person["id"] == "p1"
    velnor = person["text"].split()[4]
    assert person["text"] == f"{kel} {odri} works for {velnor} Group." and velnor != "Velnor"
    [company] = retrieve2(f"When was {velnor} Group founded?", 1)
    assert company["id"] == "c1" and company["title"] == f"{velnor} Group" and qa2["golden_answers"] == ["1971"]


# -----------------------------------------------------------------------------
# the loop as RL drives it: stopping rules and masks

def test_rollout_hops_then_answers_mask_is_exactly_the_sampled_tokens():
    _, tok, _, _ = rag_world()
    q, docs = two_hop()
    step0, step1 = (docs[g] for g in q["gold_ids"])
    answer = prepare_answer(q, cite=2)
    script = turn(tok, "query", q["queries"][1]) + turn(tok, "answer", answer)
    calls = []
    retrieve = lambda query, k: calls.append(query) or ([step0] if query == q["question"] else [step1])
    out = rag.rollout(ScriptedRefrag(script, tok.vocab_size), tok, q, retrieve, 1, 3, max_new_tokens=40)
    assert out["stop"] == "answer" and out["answer"] == answer and out["queries"] == [q["queries"][1]]
    assert calls == [q["question"], q["queries"][1]]
    assert [d["id"] for d in out["docs"]] == [step0["id"], step1["id"]]
    assert [t for t, m in zip(out["ids"], out["mask"]) if m] == script  # the model's tokens, nothing else
    ids, mask = render_conversation(tok, out["messages"])
    assert out["ids"] == ids and out["mask"] == mask  # what RL pushes is what the warm start imitated
    r, parts = rag.reward(q, out, **W)
    assert parts == {"em": 1.0, "cite": 1.0, "format": 0.0, "hops": 1}


def test_rollout_stops_at_max_hops_and_on_format():
    _, tok, _, _ = rag_world()
    q, docs = two_hop()
    retrieve = lambda query, k: [docs[q["gold_ids"][0]]]
    queries = turn(tok, "query", "Where is it?") * 3
    out = rag.rollout(ScriptedRefrag(queries, tok.vocab_size), tok, q, retrieve, 1, 2, max_new_tokens=40)
    assert out["stop"] == "max_hops" and len(out["queries"]) == 3 and out["answer"] is None
    assert len(out["docs"]) == 3  # the question's document and two hops; the third query is not served
    out = rag.rollout(ScriptedRefrag(tok.encode("Velnor"), tok.vocab_size), tok, q, retrieve, 1, 2, max_new_tokens=40)
    assert out["stop"] == "format" and sum(out["mask"]) == 1
    assert rag.reward(q, out, **W)[0] == -W["w_format"]


# -----------------------------------------------------------------------------
# the reward and the advantages

def test_reward_hand_made_cases():
    q, docs = two_hop()
    d0, d1 = docs[q["gold_ids"][0]], docs[q["gold_ids"][1]]
    run = lambda answer, stop="answer", n_queries=1: {"answer": answer, "stop": stop, "queries": ["q"] * n_queries,
                                                       "docs": [rag.doc_dict(d0), rag.doc_dict(d1)]}
    reward = lambda qa, out: rag.reward(qa, out, **W)
    right, wrong_cite = prepare_answer(q, cite=2), prepare_answer(q, cite=1)
    assert reward(q, run(right)) == (W["w_em"] + W["w_cite"] - W["w_hop"], {"em": 1.0, "cite": 1.0, "format": 0.0, "hops": 1})
    assert reward(q, run(wrong_cite))[0] == W["w_em"] - W["w_hop"]  # [1] does not hold the answer
    assert reward(q, run(right, n_queries=3))[0] == W["w_em"] + W["w_cite"] - 3 * W["w_hop"]
    wrong = right.replace(q["golden_answers"][0], "Nowhere")
    assert reward(q, run(wrong)) == (W["w_cite"] - W["w_hop"], {"em": 0.0, "cite": 1.0, "format": 0.0, "hops": 1})
    assert reward(q, run(ABSTAIN))[0] == -W["w_hop"]  # the KB holds the answer: abstaining is wrong
    assert reward(q, run(None, "max_hops", 4))[0] == -W["w_format"] - 4 * W["w_hop"]
    none = {**q, "golden_answers": [], "gold_ids": [], "queries": []}
    assert reward(none, run(ABSTAIN, n_queries=0))[0] == W["w_em"]
    assert reward(none, run(right, n_queries=0))[0] == 0.0


# -----------------------------------------------------------------------------
# one policy-gradient step moves the rewarded rollout up and the punished one down

def sampled_logp(model, out):
    ids = torch.tensor([out["ids"]])
    logp = torch.log_softmax(model(ids[:, :-1])[0][0], -1)
    return sum(logp[i - 1, out["ids"][i]] for i, m in enumerate(out["mask"]) if m and i > 0)


def test_policy_gradient_step_raises_rewarded_and_lowers_punished_rollout():
    _, tok, _, _ = rag_world()
    q, docs = two_hop()
    retrieve = lambda query, k: [docs[g] for g in q["gold_ids"]][:k]
    good = rag.rollout(ScriptedRefrag(turn(tok, "answer", prepare_answer(q, 2)), tok.vocab_size), tok, q, retrieve, 2, 3)
    bad = rag.rollout(ScriptedRefrag(turn(tok, "answer", ABSTAIN), tok.vocab_size), tok, q, retrieve, 2, 3)
    model = tiny_gpt(tok)
    rewards = [rag.reward(q, good, **W)[0], rag.reward(q, bad, **W)[0]]
    adv = [r - sum(rewards) / 2 for r in rewards]  # the advantage: reward - the group's mean
    assert adv[0] > 0 > adv[1]
    with torch.no_grad():
        before = [sampled_logp(model, o).item() for o in (good, bad)]
    loss = rag.pg_loss(model, [good, bad], rewards)
    n = sum(good["mask"][1:]) + sum(bad["mask"][1:])
    assert abs(loss.item() + (adv[0] * before[0] + adv[1] * before[1]) / n) < 1e-4  # -sum(A * log p) / tokens
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * p.grad
        after = [sampled_logp(model, o).item() for o in (good, bad)]
    assert after[0] > before[0] + 1e-3 and after[1] < before[1] - 1e-3


def test_kl_penalty_is_zero_at_the_warm_start_and_pulls_back_to_it():
    _, tok, _, _ = rag_world()
    q, docs = two_hop()
    retrieve = lambda query, k: [docs[g] for g in q["gold_ids"]][:k]
    out = rag.rollout(ScriptedRefrag(turn(tok, "answer", prepare_answer(q, 2)), tok.vocab_size), tok, q, retrieve, 2, 3)
    ref, model = tiny_gpt(tok), tiny_gpt(tok)
    kl_loss = lambda kl_coef=0.5: rag.pg_loss(model, [out], [1.0], ref=ref, kl_coef=kl_coef)  # one rollout: advantage 0
    assert kl_loss().item() == 0.0  # the policy is its reference
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    loss = kl_loss()
    assert loss.item() > 1e-4
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.5 * p.grad
    assert kl_loss().item() < loss.item()  # the step moved back toward ref
    assert kl_loss(kl_coef=0.0).item() == 0.0


# -----------------------------------------------------------------------------
# the stage end to end: refusal, sft -> rl, checkpoints, eval.json and the curve

def refrag_checkpoint(pattern, path):
    _, tok, _, _ = rag_world()
    model = tiny_gpt(tok, pattern)
    save_checkpoint(path, {"model": model.state_dict(), "model_args": dataclasses.asdict(model.config), "step": 0,
                           "optimizer": [], "config": {}, "tokenizer": tok.to_json(), "val_loss": 0.0, "stage": "rag"})
    return path


def refrag_train(*args):
    return ran("refrag_train.py", *args)


def test_refrag_refuses_pure_transformer():
    data, *_ = rag_world()
    r = ran("refrag_train.py", f"--init_from={refrag_checkpoint('T', os.path.join(TMP_REFRAG.name, 't.pt'))}",
            f"--data_dir={data}", f"--out_dir={TMP_REFRAG.name}/t", "--baseline_ckpt=")
    assert r.returncode == 1 and "pure Transformer" in r.stderr and "allow_transformer" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_sft_then_rl_end_to_end():
    data, *_ = rag_world()
    base = refrag_checkpoint("TM", os.path.join(TMP_REFRAG.name, "hybrid.pt"))
    small = [f"--data_dir={data}", "--eval_n=2", "--max_new_tokens=8", "--device=cpu", f"--baseline_ckpt={base}"]
    r = refrag_train(f"--init_from={base}", f"--out_dir={TMP_REFRAG.name}/sft", "--sft_iters=2", "--sft_batch_size=2", *small)
    assert r.returncode == 0, r.stderr[-800:]
    r = refrag_train("--phase=rl", f"--init_from={TMP_REFRAG.name}/sft/ckpt.pt", f"--out_dir={TMP_REFRAG.name}/rl", "--rl_iters=2",
                     "--questions_per_step=1", "--group_size=2", "--eval_interval=1", "--curve_n=1", *small)
    assert r.returncode == 0, r.stderr[-800:]
    steps = [l for l in r.stdout.splitlines() if l.startswith("step ") and "reward" in l]
    assert len(steps) == 2 and all(f" | {k} " in steps[0] for k in ("reward", "acc", "hops", "format"))
    ckpt = torch.load(f"{TMP_REFRAG.name}/rl/ckpt.pt", weights_only=True)
    assert ckpt["stage"] == "refrag" and ckpt["step"] == 2 and len(ckpt["data_state"]["history"]) == 2 + 3
    res = json.load(open(f"{TMP_REFRAG.name}/rl/eval.json"))["results"]
    assert set(res) == {"single_shot", "warm_start", "rl"} and set(res["rl"]) == {"2", "3"}
    assert res["single_shot"]["2"]["hops"] == 0.0 and res["rl"]["3"]["n"] == 2
    assert "<svg" in open(f"{TMP_REFRAG.name}/rl/curve.svg").read() and os.path.getsize(f"{TMP_REFRAG.name}/rl/curve.png")


def test_rl_resume_after_kill_continues_exactly():
    """RL killed right after a checkpoint and resumed ends with the same weights and logs as an uninterrupted run:
    the KL reference is the warm start again, not the checkpoint resumed from."""
    data, *_ = rag_world()
    base = refrag_checkpoint("TM", os.path.join(TMP_REFRAG.name, "hybrid.pt"))
    # the random tiny model's rollouts all fail alike (advantage 0); weight decay moves it off the warm start, so
    # the KL term is live and a wrong reference after the resume changes the updates
    args = ["refrag_train.py", "--phase=rl", f"--init_from={base}", f"--data_dir={data}", "--baseline_ckpt=", "--device=cpu",
            "--rl_iters=30", "--eval_interval=2", "--curve_n=0", "--eval_n=1", "--questions_per_step=1", "--group_size=2",
            "--max_new_tokens=8", "--rl_learning_rate=1e-2", "--warmup_iters=1", "--weight_decay=0.1", "--kl_coef=1.0"]
    # a step's line without its timings: loss, lr, reward, accuracy, hops, format failures
    steps = lambda out: {int(m[1]): m[2] + m[3] for m in re.finditer(r"^step (\d+)/\d+ \| (loss .*?) \| [\d,]+ tok/s(.*?)\| eta", out, re.M)}
    full = steps(refrag_train(*args[1:], f"--out_dir={TMP_REFRAG.name}/resume_a").stdout)
    proc = subprocess.Popen([sys.executable, *args, f"--out_dir={TMP_REFRAG.name}/resume_b"], cwd=HERE, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})  # as this process
    for line in proc.stdout:
        if line.startswith("saved") and "at step 2" in line:
            proc.send_signal(signal.SIGKILL)
            break
    assert proc.wait() == -signal.SIGKILL
    r = refrag_train(*args[1:], f"--out_dir={TMP_REFRAG.name}/resume_b", "--init_from=resume")
    assert r.returncode == 0, r.stderr[-800:]
    resumed = steps(r.stdout)
    assert len(full) == 30 and resumed and min(resumed) > 2 and resumed == {s: full[s] for s in resumed}, (resumed, full)
    a, b = (torch.load(f"{TMP_REFRAG.name}/resume_{x}/ckpt.pt", weights_only=True)["model"] for x in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)


# -----------------------------------------------------------------------------
# test runner: python test_all.py [substring ...]

if __name__ == "__main__":
    chosen = sys.argv[1:]
    tests = [(n, f) for n, f in list(globals().items()) if n.startswith("test_") and callable(f)
             and (not chosen or any(c in n for c in chosen))]
    passed, failed, skipped, t_all = 0, [], 0, time.time()
    for name, fn in tests:
        t0 = time.time()
        try:
            with tempfile.TemporaryDirectory() as tmp:
                fn(**({"tmp_path": Path(tmp)} if "tmp_path" in inspect.signature(fn).parameters else {}))
            passed += 1
            print(f"PASS {name} ({time.time() - t0:.1f}s)", flush=True)
        except KeyboardInterrupt:
            raise
        except BaseException as e:  # pytest.skip raises a BaseException
            if type(e).__name__ == "Skipped":
                skipped += 1
                print(f"SKIP {name}: {e}", flush=True)
                continue
            import traceback
            failed.append(name)
            print(f"FAIL {name} ({time.time() - t0:.1f}s)\n{traceback.format_exc()}", flush=True)
    print(f"\n{len(tests)} tests in {time.time() - t_all:.0f}s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    print(f"{passed} passed, {len(failed)} failed" + (f", {skipped} skipped" if skipped else ""))
    sys.exit(1 if failed else 0)
