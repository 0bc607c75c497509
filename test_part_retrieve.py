# tests for retrieve.py (plain asserts; run with `python test_part_retrieve.py` or pytest)
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

import retrieve
from retrieve import (RETRIEVERS, BM25Retriever, DenseRetriever, Document, HybridRetriever, SimpleRetriever,
                      evaluate, load_documents, load_kb, mrr, ndcg_at_k, precision_at_k, recall_at_k, tokenize)

torch.set_num_threads(1)  # the dense tests encode a few short texts: a second thread only adds sync cost

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

def test_tfidf_equals_brute_force():
    docs = make_docs(120)
    r = SimpleRetriever()
    r.add_documents(docs)
    vocab = sorted({t for d in docs for t in tokenize(retrieve.doc_text(d))})
    tf = np.array([[tokenize(retrieve.doc_text(d)).count(t) for t in vocab] for d in docs], float)  # (N, V)
    idf = np.log((1 + len(docs)) / (1 + (tf > 0).sum(0))) + 1
    X = tf * idf
    X /= np.linalg.norm(X, axis=1, keepdims=True)
    for q in QUERIES:
        qv = np.array([tokenize(q).count(t) for t in vocab], float) * idf
        if not qv.any():
            assert r.retrieve(q, 5) == []
            continue
        expected = X @ (qv / np.linalg.norm(qv))
        assert np.allclose(r.scores(q), expected, atol=1e-12)
        hits = r.retrieve(q, 5)
        assert np.allclose([s for _, s in hits], np.sort(expected)[::-1][:5], atol=1e-12)
        assert [d.id for d, _ in hits][0] == docs[int(np.argmax(expected))].id

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

def build(kind, docs, **options):
    r = RETRIEVERS[kind](**options)
    r.add_documents(docs)
    return r

def results(r, queries=QUERIES, k=8):
    return [[(d.id, s) for d, s in hits] for hits in r.retrieve_batch(queries, k)]

def same_results(a, b, atol):
    return all([i for i, _ in x] == [i for i, _ in y] and np.allclose([s for _, s in x], [s for _, s in y], rtol=0, atol=atol)
               for x, y in zip(a, b))

def test_save_load_and_add_documents_every_type():
    docs = make_docs(60)
    for kind in RETRIEVERS:
        with tempfile.TemporaryDirectory() as tmp:
            full = build(kind, docs)
            part = build(kind, docs[:35])
            part.save(os.path.join(tmp, "kb"))
            loaded = load_kb(os.path.join(tmp, "kb"))
            assert type(loaded) is type(full) and loaded.options == part.options
            assert results(loaded) == results(part)  # save -> load: bit-identical
            loaded.add_documents(docs[35:])
            # sparse indexes are rebuilt from exact counts: identical; dense embeddings depend (1e-7) on batch padding
            exact = kind in ("simple", "bm25")
            assert same_results(results(loaded), results(full), atol=0 if exact else 1e-5), kind
            if exact:
                for name in ("indptr", "post_doc", "post_tf", "doc_len", "weights"):
                    assert np.array_equal(getattr(loaded, name), getattr(full, name)), name
            loaded.save(os.path.join(tmp, "kb"))  # overwriting a KB swaps it atomically
            assert results(RETRIEVERS[kind].load(os.path.join(tmp, "kb"))) == results(loaded)
            assert sorted(os.listdir(tmp)) == ["kb"]  # no temp or old directories left behind

def test_dense_auto_switches_to_hnsw_without_reencoding():
    old = retrieve.HNSW_MIN_SIZE
    retrieve.HNSW_MIN_SIZE = 30
    try:
        docs = make_docs(40)
        r = build("dense", docs[:20])
        assert r.index.__class__.__name__ == "IndexFlatIP"
        r.add_documents(docs[20:])
        assert r.index.__class__.__name__ == "IndexHNSWFlat" and r.index.ntotal == 40
        flat = build("dense", docs, index="flat")
        assert same_results(results(r), results(flat), atol=1e-5)
        with tempfile.TemporaryDirectory() as tmp:
            r.save(tmp + "/kb")
            assert sorted(os.listdir(tmp + "/kb")) == ["documents.jsonl", "embeddings.npy", "index.faiss", "manifest.json"]
            assert results(load_kb(tmp + "/kb")) == results(r)
    finally:
        retrieve.HNSW_MIN_SIZE = old

def test_top_k_and_empty_cases():
    docs = [Document("a", "red fox"), Document("b", "red hen"), Document("c", "red ox")]
    for kind in RETRIEVERS:
        empty = RETRIEVERS[kind]()
        assert empty.retrieve("red fox", 5) == [] and empty.retrieve_batch(["red", ""], 3) == [[], []]
        r = build(kind, docs)
        assert [d.id for d, _ in r.retrieve("red", 100)] == ["a", "b", "c"] or kind in ("dense", "hybrid")
        assert len(r.retrieve("red fox", 100)) == 3  # top_k > N: the whole collection, no error
        assert r.retrieve("", 5) == [] and r.retrieve("   ", 5) == [] and r.retrieve("red", 0) == []
        assert r.retrieve_batch(["fox", "", "hen"], 1)[1] == []
    for kind in ("simple", "bm25"):
        r = build(kind, docs)
        assert r.retrieve("zebra", 5) == []  # no shared term: nothing to return
        assert [d.id for d, _ in r.retrieve("fox", 5)] == ["a"]  # only documents that share a term score

def test_bm25_lucene_scores_tiny_corpora():
    docs = [Document("a", "kelmar velnor"), Document("b", "kelmar ombra")]
    assert build("bm25", docs, method="okapi").retrieve("velnor", 2) == []  # idf ln(1.5 / 1.5) = 0: no evidence
    assert [d.id for d, _ in build("bm25", docs).retrieve("velnor", 2)] == ["a"]  # lucene idf ln(1 + 1.5 / 1.5)

def write(path, lines):
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
        path = write(f"{tmp}/d.jsonl", [good, "", '{"id": 7, "text": "y", "title": "T", "metadata": {"k": 1}}'])
        assert load_documents(path) == [Document("a", "x"), Document("7", "y", "T", {"k": 1})]
        raises(lambda: load_documents(write(f"{tmp}/d.jsonl", [good, good[:-3]])), ValueError, "d.jsonl line 2", "invalid JSON")
        raises(lambda: load_documents(write(f"{tmp}/d.jsonl", [good, '{"id": "b"}'])), ValueError, "line 2", "'text'")
        raises(lambda: load_documents(write(f"{tmp}/d.jsonl", [good, "[1]"])), ValueError, "line 2", "JSON object")
        raises(lambda: load_documents(write(f"{tmp}/d.jsonl", [good, '{"id": "b", "text": 3}'])), ValueError, "line 2", "'text'")
        raises(lambda: load_documents(write(f"{tmp}/d.jsonl", [good, "", good])), ValueError, "line 3", "duplicate", "'a'", "line 1")
        r = build("bm25", [Document("a", "x")])
        raises(lambda: r.add_documents([Document("b", "y"), Document("a", "z")]), ValueError, "duplicate document id 'a'")
        raises(lambda: r.add_documents([Document("c", "y"), Document("c", "z")]), ValueError, "'c'")
        raises(lambda: r.add_documents([Document("d", "y"), Document("e", None)]), ValueError, "'e'", "strings")
        assert len(r.docs) == 1 and r.retrieve("y") == [] and list(r.vocab) == ["x"]  # a refused batch changes nothing

def test_kb_errors_and_versions():
    with tempfile.TemporaryDirectory() as tmp:
        raises(lambda: load_kb(f"{tmp}/nothing"), FileNotFoundError, "no KB at", "nothing")
        build("bm25", make_docs(5)).save(f"{tmp}/kb")
        manifest = json.load(open(f"{tmp}/kb/manifest.json"))
        assert manifest["format_version"] == retrieve.FORMAT_VERSION and manifest["n_documents"] == 5
        assert manifest["type"] == "bm25" and manifest["options"]["method"] == "lucene"
        json.dump(dict(manifest, format_version=retrieve.FORMAT_VERSION + 1), open(f"{tmp}/kb/manifest.json", "w"))
        raises(lambda: load_kb(f"{tmp}/kb"), ValueError, "format_version 2", "not supported")
        json.dump(dict(manifest, type="magic"), open(f"{tmp}/kb/manifest.json", "w"))
        raises(lambda: load_kb(f"{tmp}/kb"), ValueError, "unknown type 'magic'")
        json.dump(manifest, open(f"{tmp}/kb/manifest.json", "w"))
        raises(lambda: SimpleRetriever.load(f"{tmp}/kb"), ValueError, "'bm25' KB")
        os.makedirs(f"{tmp}/home")
        write(f"{tmp}/home/precious.txt", ["do not delete"])
        raises(lambda: build("bm25", make_docs(5)).save(f"{tmp}/home"), ValueError, "refusing to replace")
        assert os.listdir(f"{tmp}/home") == ["precious.txt"]

def test_atomic_save():
    with tempfile.TemporaryDirectory() as tmp:
        kb = f"{tmp}/kb"
        old = build("bm25", make_docs(30))
        old.save(kb)
        new = build("bm25", make_docs(50, seed=1))
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
        assert results(load_kb(kb)) == results(old)  # the crash left the previous KB whole
        os.rename(kb, kb + ".old")  # as if we died between the two renames of the swap
        assert results(load_kb(kb)) == results(old)
        new.save(kb)
        assert results(load_kb(kb)) == results(new) and sorted(os.listdir(tmp)) == ["kb"]

def test_hybrid_fusion_and_reranker():
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
    h = build("hybrid", docs, depth=10)
    d, s = build("dense", docs), build("bm25", docs)
    for q in QUERIES:  # the hybrid's order is the fusion of its parts' top `depth` lists
        parts = [r._search([q], 10)[0] for r in (d, s)] if q.strip() else None
        assert [x.id for x, _ in h.retrieve(q, 5)] == [docs[i].id for i in h.fuse(*parts)[0][:5]]
    class LengthCrossEncoder:  # no cross-encoder ships offline: a stand-in that prefers long documents
        def predict(self, pairs):
            return [len(text) for _, text in pairs]
    real = retrieve.load_encoder
    retrieve.load_encoder = lambda name, cross=False: LengthCrossEncoder() if cross else real(name)
    try:
        h = build("hybrid", docs, reranker="any/cross-encoder", depth=10)
        hits = h.retrieve("kelmar born velnor", 5)
        fused = h.fuse(*[r._search(["kelmar born velnor"], 10)[0] for r in (d, s)])[0][:10]
        assert [x.id for x, _ in hits] == [x.id for x in sorted((docs[i] for i in fused), key=lambda x: -len(retrieve.doc_text(x)))][:5]
    finally:
        retrieve.load_encoder = real

def test_metrics():
    ranked = ["a", "b", "c", "d"]
    assert recall_at_k(ranked, ["b", "z"], 1) == 0 and recall_at_k(ranked, ["b", "z"], 2) == 0.5
    assert precision_at_k(ranked, ["a", "c"], 4) == 0.5 and precision_at_k(ranked, ["a"], 1) == 1
    assert mrr(ranked, ["c", "d"]) == 1 / 3 and mrr(ranked, ["z"]) == 0
    assert abs(ndcg_at_k(ranked, ["b"], 3) - 1 / np.log2(3)) < 1e-12
    assert abs(ndcg_at_k(ranked, ["a", "c"], 3) - (1 + 1 / np.log2(4)) / (1 + 1 / np.log2(3))) < 1e-12
    assert ndcg_at_k(ranked, ["a", "b"], 10) == 1.0
    with tempfile.TemporaryDirectory() as tmp:
        r = build("bm25", [Document("a", "red fox"), Document("b", "blue hen"), Document("c", "red hen")])
        qa = write(f"{tmp}/qa.jsonl", ['{"question": "blue hen", "gold_ids": ["b"]}',
                                       '{"question": "red", "gold_ids": ["c"]}',  # a, c tie: a first
                                       '{"question": "who?", "gold_ids": []}'])   # unanswerable: skipped
        m = evaluate(r, qa, ks=(1, 2))
        assert m["n"] == 2 and m["recall@1"] == 0.5 and m["recall@2"] == 1 and m["mrr"] == 0.75
        assert m["precision@2"] == 0.5 and abs(m["ndcg@2"] - (1 + 1 / np.log2(3)) / 2) < 1e-12
        raises(lambda: evaluate(r, write(f"{tmp}/qa.jsonl", ['{"q": 1}'])), ValueError, "qa.jsonl line 1", "question")

def test_retrieval_manager():
    with tempfile.TemporaryDirectory() as tmp:
        path = f"{tmp}/docs.jsonl"
        retrieve.save_documents(make_docs(20), path)
        assert load_documents(path) == make_docs(20)
        m = retrieve.RetrievalManager.build(path, "simple")
        m.save(f"{tmp}/kb")
        loaded = retrieve.RetrievalManager.load(f"{tmp}/kb")
        assert results(loaded.retriever) == results(m.retriever) and loaded.retrieve("velnor") == m.retrieve("velnor")
        loaded.add_documents(make_docs(5, start=20))
        assert len(loaded.retriever.docs) == 25 and loaded.retrieve_batch(["tarsi"], 2)[0] == loaded.retrieve("tarsi", 2)
        raises(lambda: retrieve.RetrievalManager.build(path, "magic"), ValueError, "unknown retriever type 'magic'")

def test_cli():
    here = os.path.dirname(os.path.abspath(__file__))
    run = lambda *a: subprocess.run([sys.executable, os.path.join(here, "retrieve.py"), *a], capture_output=True, text=True)
    with tempfile.TemporaryDirectory() as tmp:
        docs = [json.dumps({"id": f"d{i}", "title": t, "text": x}) for i, (t, x) in
                enumerate([("Velnor", "a city on the river"), ("Kelmar", "born in Velnor, a painter"), ("Ombra", "old mill")])]
        write(f"{tmp}/docs.jsonl", docs[:2])
        assert run("--documents", f"{tmp}/docs.jsonl", "--output", f"{tmp}/kb", "--type", "bm25").returncode == 0
        write(f"{tmp}/more.jsonl", docs[2:])
        assert run("--documents", f"{tmp}/more.jsonl", "--kb", f"{tmp}/kb").returncode == 0
        out = run("--kb", f"{tmp}/kb", "--query", "where in Velnor was Kelmar born", "--top_k", "5").stdout.splitlines()
        assert len(out) == 2 and "[d1] Kelmar: born in Velnor" in out[0] and "[d0]" in out[1]
        write(f"{tmp}/qa.jsonl", ['{"question": "old mill", "gold_ids": ["d2"]}'])
        assert "recall" in run("--kb", f"{tmp}/kb", "--eval", f"{tmp}/qa.jsonl").stdout
        write(f"{tmp}/bad.jsonl", [docs[0], "{oops"])
        p = run("--documents", f"{tmp}/bad.jsonl", "--output", f"{tmp}/kb2")
        assert p.returncode == 1 and p.stderr.strip().splitlines() == [f"error: {tmp}/bad.jsonl line 2: invalid JSON (Expecting property name enclosed in double quotes at column 2)"]
        p = run("--kb", f"{tmp}/nope", "--query", "x")
        assert p.returncode == 1 and p.stderr.startswith("error: no KB at") and len(p.stderr.strip().splitlines()) == 1

if __name__ == "__main__":
    import time
    for name, fn in list(globals().items()):
        if name.startswith("test_"):
            t = time.time()
            fn()
            print(f"{name}: ok ({time.time() - t:.1f}s)")
