"""
Data for every stage: a synthetic knowledge world (or your own text), its tokenizer, and token shards.

    python prepare.py                                   # the tiny world into data/world/ (seconds)
    python prepare.py --world_size=200000 --n_renderings=2 --out=data/world_big
    python prepare.py --input=my_docs/ --out=data/mytext # .txt / .jsonl ("text") / .parquet ("text")

The world is a set of invented people, companies, cities and countries tied together by relations
(born in, works for, founded by, headquartered in, located in, ...), written up as one short
encyclopedia paragraph per entity with the phrasing and fact order drawn at random. The entities are
split into a training world and a disjoint held-out world: the base model pretrains on training-world
text only, so held-out questions can only be answered by reading retrieved documents.

Output: a data directory, the layout every stage reads. Yours needs only the first three files:
  kb.jsonl          documents: {"id", "text" (or FlashRAG's "contents"), "title"?}
  qa_train.jsonl    questions to fine-tune on, FlashRAG's fields: {"id", "question", "golden_answers": [...],
  qa_heldout.jsonl    "gold_ids"?: supporting document ids in hop order, "queries"?: a gold query chain}
  tokenizer.json, train.bin / val.bin (token ids, every document starts with <|bos|>), meta.json
The world adds qa_closed.jsonl (questions about the pretraining world, for closed-book practice) and, per
question, its type, entity, hops and answer sentence ("response").
"""

import json
import os
import random
import re
import sys
import time

import numpy as np
from tqdm import tqdm

from common import write_atomic
from configurator import configure
from tokenizer import Tokenizer
from world import corpus_items, doc_id, make_qa, make_world, make_worlds, reading_items, render_doc

# -----------------------------------------------------------------------------
# defaults, overridden as in every stage: python prepare.py [config.py] --key=value
config = dict(
    out="",             # output directory; "" = data/world, or data/text with --input
    input="",           # your text: a .txt/.jsonl/.parquet file or a folder of them; "" = the synthetic world
    seed=1337,
    world_size=400,     # people in the training world; companies, cities, countries scale with it
    heldout_frac=0.2,   # size of the held-out world relative to the training world
    rag_frac=2.0,       # size of the RAG world: in the KB, never in pretraining text; rag_train.py learns to read on it
    n_renderings=30,    # how often the training world appears in the corpus, rephrased every time
    reading_frac=1.0,   # per rendering, a fresh world of this relative size as reading exercises (see reading_items)
    vocab_size=0,       # incl. special tokens; 0 = 2048 for the world, 8192 for your text
    val_frac=0.05,      # share of documents that go to val.bin
)

TOKENIZER_MAX_CHARS = 100_000_000  # BPE merge statistics settle long before this; caps training time on big corpora

# -----------------------------------------------------------------------------
# Writing


def jsonl(rows):
    return (json.dumps(r) + "\n" for r in rows)


def write_bins(out, tok, items, total=None):
    """Tokenise (is_val, text) items into train.bin / val.bin, each document preceded by <|bos|>; returns the
    first fields of meta.json."""
    dtype = np.uint16 if tok.vocab_size < 2**16 else np.uint32
    paths = {s: os.path.join(out, f"{s}.bin") for s in ("train", "val")}
    files = {s: open(p + ".tmp", "wb") for s, p in paths.items()}
    counts = {s: [0, 0] for s in paths}  # tokens, docs

    def flush(batch):
        for (is_val, _), ids in zip(batch, tok.encode_batch([t for _, t in batch])):
            s = "val" if is_val else "train"
            files[s].write(np.array([tok.bos_id] + ids, dtype=dtype).tobytes())
            counts[s][0] += len(ids) + 1
            counts[s][1] += 1

    try:
        batch = []
        for item in tqdm(items, total=total, desc="tokenise", unit="doc", mininterval=1.0):
            batch.append(item)
            if len(batch) == 4096:
                flush(batch)
                batch = []
        flush(batch)
        for f in files.values():
            f.close()
        if counts["train"][1] == 0:
            raise ValueError(f"no documents for train.bin ({counts['val'][1]} went to val.bin): need more text")
        for s in files:
            os.replace(paths[s] + ".tmp", paths[s])
    finally:  # a failed run leaves the previous output as it was, and no debris
        for s, f in files.items():
            f.close()
            if os.path.exists(paths[s] + ".tmp"):
                os.remove(paths[s] + ".tmp")
    return dict(vocab_size=tok.vocab_size, dtype=np.dtype(dtype).name, bos_id=tok.bos_id,
                n_train_tokens=counts["train"][0], n_val_tokens=counts["val"][0], n_train_docs=counts["train"][1],
                n_val_docs=counts["val"][1])


def write_meta(out, tok, meta, t0):
    """tokenizer.json and meta.json, the last files of a data directory; returns meta and the seconds taken."""
    write_atomic(os.path.join(out, "tokenizer.json"), [tok.to_json()])
    write_atomic(os.path.join(out, "meta.json"), [json.dumps(meta, indent=2)])
    return dict(meta, seconds=time.time() - t0)


def prepare_world(out, seed, world_size, heldout_frac, n_renderings, vocab_size, val_frac, rag_frac=2.0,
                  reading_frac=1.0):
    t0 = time.time()
    os.makedirs(out, exist_ok=True)
    train, heldout, rng, pool, first_names = make_worlds(seed, world_size, heldout_frac)
    # A third world for RAG fine-tuning: if the model only ever answered about entities it memorised, it could
    # answer from memory and learn "unfamiliar name => abstain" from the unanswerable questions. Facts it never
    # saw force it to read, and held-out evaluation stays on a world that no training stage touched.
    rag = make_world(rng, pool, first_names, "rag", max(10, round(world_size * rag_frac)))
    worlds = (train, heldout, rag)
    n_docs = {w.split: sum(n for _, n in w.kinds()) for w in worlds}
    print(f"world: {n_docs['train']:,} training-world, {n_docs['heldout']:,} held-out and {n_docs['rag']:,} RAG-world "
          f"entities ({time.time() - t0:.1f}s)")

    # the knowledge base: one rendering of every document of every world
    def kb_rows():
        kb_rng = random.Random(seed + 1)
        for w in worlds:
            for kind, n in w.kinds():
                for i in range(n):
                    title, text = render_doc(w, kind, i, kb_rng)
                    yield {"id": doc_id(w, kind, i), "title": title, "text": text, "metadata": {"world": w.split, "type": kind}}
    write_atomic(os.path.join(out, "kb.jsonl"),
                 jsonl(tqdm(kb_rows(), total=sum(n_docs.values()), desc="kb", unit="doc", mininterval=1.0)))
    qa_counts = {}
    for w, split in zip(worlds, ("closed", "heldout", "train")):  # RAG fine-tunes on the RAG world
        qas = list(tqdm(make_qa(w, rng, pool, first_names), desc=f"qa_{split}", unit="qa", mininterval=1.0))
        write_atomic(os.path.join(out, f"qa_{split}.jsonl"), jsonl(qas))
        qa_counts[split] = {h: sum(q["hops"] == h for q in qas) for h in range(4)}
    print("questions by hops (0 = unanswerable): " + ", ".join(f"{s} {c}" for s, c in qa_counts.items()))

    # BPE on the training world itself would give each training name its own token while held-out names fall
    # apart into syllables, so names in retrieved held-out documents would look unlike anything seen in training.
    # A throwaway world with two fresh people per vocabulary entry (same generator, names from the same pool, so
    # it shares no entity with either world) makes any one name too rare to earn a merge: merges learn syllables
    # and template words, and both worlds tokenise alike.
    t1 = time.time()
    tok_world = make_world(rng, pool, first_names, "tokenizer", 2 * vocab_size)
    tok = Tokenizer.train(capped(text for _, text in corpus_items(tok_world, random.Random(seed + 2), 0.0)), vocab_size)
    print(f"tokenizer: {tok.vocab_size} tokens ({time.time() - t1:.1f}s)")

    n_reading = round(world_size * reading_frac)
    reading = [make_world(random.Random(f"{seed}-reading-{r}"), pool, first_names, "reading", n_reading)
               for r in range(n_renderings if n_reading >= 10 else 0)]

    def all_renderings():
        for r in range(n_renderings):
            yield from corpus_items(train, random.Random(f"{seed}-rendering-{r}"), val_frac)
            if reading:
                yield from reading_items(reading[r], random.Random(f"{seed}-reading-{r}"), val_frac)
    total = n_renderings * (2 * n_docs["train"] + sum(sum(n for _, n in w.kinds()) for w in reading[:1]))
    meta = dict(write_bins(out, tok, all_renderings(), total), source="world", kb_docs=n_docs, qa=qa_counts,
                config=dict(seed=seed, world_size=world_size, heldout_frac=heldout_frac, rag_frac=rag_frac,
                            reading_frac=reading_frac, n_renderings=n_renderings, vocab_size=vocab_size,
                            val_frac=val_frac))
    return write_meta(out, tok, meta, t0)


# -----------------------------------------------------------------------------
# Your own text

TEXT_EXTENSIONS = (".txt", ".jsonl", ".parquet")


def text_files(path):
    if not os.path.exists(path):
        raise FileNotFoundError(f"--input {path}: no such file or folder")
    if os.path.isfile(path):
        if not path.endswith(TEXT_EXTENSIONS):
            raise ValueError(f"--input {path}: unsupported file type (expected {', '.join(TEXT_EXTENSIONS)})")
        return [path]
    files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.endswith(TEXT_EXTENSIONS))
    if not files:
        raise ValueError(f"--input {path}: folder holds no {', '.join(TEXT_EXTENSIONS)} files")
    return files


def read_documents(files):
    """Yields (source, text): a .txt gives one document per blank-line-separated paragraph."""
    for path in files:
        if path.endswith(".txt"):
            with open(path, encoding="utf-8", errors="replace") as f:
                for k, para in enumerate(re.split(r"\n\s*\n", f.read())):
                    if para.strip():
                        yield f"{path}#{k}", para.strip()
        elif path.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        text = json.loads(line)["text"]
                    except json.JSONDecodeError:
                        raise ValueError(f"{path}:{lineno}: not valid JSON") from None
                    except (KeyError, TypeError):
                        raise ValueError(f"{path}:{lineno}: no \"text\" field") from None
                    if not isinstance(text, str):
                        raise ValueError(f"{path}:{lineno}: \"text\" is not a string")
                    if text.strip():
                        yield f"{path}:{lineno}", text
        else:
            try:
                import pyarrow.parquet as pq
            except ImportError:
                raise ValueError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)") from None
            try:
                pf = pq.ParquetFile(path)
            except Exception as e:  # pyarrow raises several kinds for unreadable files
                raise ValueError(f"{path}: not a readable parquet file ({e})") from None
            if "text" not in pf.schema_arrow.names:
                raise ValueError(f"{path}: no \"text\" column (columns: {', '.join(pf.schema_arrow.names)})")
            row = 0
            for batch in pf.iter_batches(columns=["text"]):
                for text in batch.column(0).to_pylist():
                    row += 1
                    if text and text.strip():
                        yield f"{path}@{row}", text


def capped(texts):
    n = 0
    for t in texts:
        yield t
        n += len(t)
        if n > TOKENIZER_MAX_CHARS:
            return


def prepare_text(input_path, out, seed, vocab_size, val_frac):
    t0 = time.time()
    files = text_files(input_path)
    os.makedirs(out, exist_ok=True)
    tok = Tokenizer.train(capped(t for _, t in read_documents(files)), vocab_size)
    print(f"tokenizer: {tok.vocab_size} tokens from {len(files)} file(s) ({time.time() - t0:.1f}s)")
    kb_path = os.path.join(out, "kb.jsonl")
    kb = open(kb_path + ".tmp", "w")  # the same documents, as a knowledge base for retrieval

    def items():
        rng = random.Random(seed)
        for n, (source, text) in enumerate(read_documents(files)):
            kb.write(json.dumps({"id": str(n), "title": os.path.basename(source), "text": text,
                                 "metadata": {"source": source}}) + "\n")
            yield (n == 0 and val_frac > 0) or rng.random() < val_frac, text  # doc 0 to val: val.bin never empty
    try:
        meta = write_bins(out, tok, items())
    except BaseException:
        kb.close()
        os.remove(kb.name)
        raise
    kb.close()
    os.replace(kb.name, kb_path)
    meta = dict(meta, source=os.path.abspath(input_path), config=dict(seed=seed, vocab_size=vocab_size, val_frac=val_frac))
    return write_meta(out, tok, meta, t0)


# -----------------------------------------------------------------------------

def main(argv):
    cfg = dict(config)
    configure(cfg, argv)
    if cfg["input"]:
        out = cfg["out"] or "data/text"
        s = prepare_text(cfg["input"], out, cfg["seed"], cfg["vocab_size"] or 8192, cfg["val_frac"])
    else:
        out = cfg["out"] or "data/world"
        s = prepare_world(out, cfg["seed"], cfg["world_size"], cfg["heldout_frac"], cfg["n_renderings"],
                          cfg["vocab_size"] or 2048, cfg["val_frac"], cfg["rag_frac"], cfg["reading_frac"])
    print(f"wrote {out}/: {s['n_train_docs']:,} + {s['n_val_docs']:,} docs, {s['n_train_tokens']:,} train + "
          f"{s['n_val_tokens']:,} val tokens ({s['dtype']}), vocab {s['vocab_size']}, {s['seconds']:.1f}s")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
