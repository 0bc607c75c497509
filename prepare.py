"""A data directory for every stage: the synthetic world (world.py) or your own text as kb.jsonl, a BPE tokenizer.json,
token shards train.bin / val.bin (each document after <|bos|>) and meta.json; the world adds its QA sets.

    python prepare.py                                   # the tiny world into data/world/ (seconds)
    python prepare.py --input=my_docs/ --out=data/mytext # .txt / .jsonl ("text") / .parquet ("text")
"""

import contextlib
import itertools
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
from retrieve import read_jsonl
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

# -----------------------------------------------------------------------------
# Writing


def jsonl(rows):
    return (json.dumps(r) + "\n" for r in rows)


@contextlib.contextmanager
def staged(*paths, mode="w"):
    """Files at path.tmp, moved over their paths if the block succeeds, else removed: a failure changes nothing."""
    files = [open(p + ".tmp", mode) for p in paths]
    try:
        yield files
    except BaseException:
        for f in files:
            f.close()
            os.remove(f.name)
        raise
    for f, p in zip(files, paths):
        f.close()
        os.replace(f.name, p)


def write_data(out, tok, items, total=None, **info):
    """(is_val, text) items into train.bin / val.bin, each after <|bos|>; then tokenizer.json, meta.json (returned)."""
    dtype = np.uint16 if tok.vocab_size < 2**16 else np.uint32
    n_tokens, n_docs = [0, 0], [0, 0]  # train, val: indexed by is_val, as the files are
    with staged(os.path.join(out, "train.bin"), os.path.join(out, "val.bin"), mode="wb") as files:
        items = iter(tqdm(items, total=total, desc="tokenise", unit="doc", mininterval=1.0))
        while batch := list(itertools.islice(items, 4096)):
            for (is_val, _), ids in zip(batch, tok.encode_batch([t for _, t in batch])):
                files[is_val].write(np.array([tok.bos_id] + ids, dtype=dtype).tobytes())
                n_tokens[is_val] += len(ids) + 1
                n_docs[is_val] += 1
        if n_docs[0] == 0:
            raise ValueError(f"no documents for train.bin ({n_docs[1]} went to val.bin): need more text")
    meta = dict(vocab_size=tok.vocab_size, dtype=np.dtype(dtype).name, bos_id=tok.bos_id, n_train_tokens=n_tokens[0],
                n_val_tokens=n_tokens[1], n_train_docs=n_docs[0], n_val_docs=n_docs[1], **info)
    write_atomic(os.path.join(out, "tokenizer.json"), tok.to_json())
    write_atomic(os.path.join(out, "meta.json"), json.dumps(meta, indent=2))
    return meta


def prepare_world(out, seed, world_size, heldout_frac, n_renderings, vocab_size, val_frac, rag_frac=2.0,
                  reading_frac=1.0):
    t0 = time.time()
    train, heldout, rng, pool, first_names = make_worlds(seed, world_size, heldout_frac)
    # A third world for RAG fine-tuning: if the model only ever answered about entities it memorised, it could
    # answer from memory and learn "unfamiliar name => abstain" from the unanswerable questions. Facts it never
    # saw force it to read, and held-out evaluation stays on a world that no training stage touched.
    rag = make_world(rng, pool, first_names, "rag", max(10, round(world_size * rag_frac)))
    worlds = (train, heldout, rag)
    n_docs = {w.split: sum(n for _, n in w.kinds()) for w in worlds}
    print(f"world: {n_docs['train']:,} training-world, {n_docs['heldout']:,} held-out and {n_docs['rag']:,} RAG-world "
          f"entities ({time.time() - t0:.1f}s)")

    kb_rng = random.Random(seed + 1)  # the knowledge base: one rendering of every document of every world
    kb = ((w, k, i, *render_doc(w, k, i, kb_rng)) for w in worlds for k, n in w.kinds() for i in range(n))
    write_atomic(os.path.join(out, "kb.jsonl"), jsonl(
        {"id": doc_id(w, k, i), "title": title, "text": text, "metadata": {"world": w.split, "type": k}}
        for w, k, i, title, text in tqdm(kb, total=sum(n_docs.values()), desc="kb", unit="doc", mininterval=1.0)))
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
            yield from reading_items(reading[r], random.Random(f"{seed}-reading-{r}"), val_frac) if reading else ()
    total = n_renderings * (2 * n_docs["train"] + sum(sum(n for _, n in w.kinds()) for w in reading[:1]))
    cfg = dict(seed=seed, world_size=world_size, heldout_frac=heldout_frac, rag_frac=rag_frac,
               reading_frac=reading_frac, n_renderings=n_renderings, vocab_size=vocab_size, val_frac=val_frac)
    return write_data(out, tok, all_renderings(), total, source="world", kb_docs=n_docs, qa=qa_counts, config=cfg)


# -----------------------------------------------------------------------------
# Your own text

TEXT_EXTENSIONS = (".txt", ".jsonl", ".parquet")


def read_documents(path):
    """(source, text) per document of the .txt (one a paragraph) / .jsonl / .parquet file or folder of them at path."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"--input {path}: no such file or folder")
    files = [path] if os.path.isfile(path) else sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
    if not (files := [f for f in files if f.endswith(TEXT_EXTENSIONS)]):
        raise ValueError(f"--input {path}: not a {'/'.join(TEXT_EXTENSIONS)} file, nor a folder holding one")
    for file in files:
        if file.endswith(".txt"):
            with open(file, encoding="utf-8", errors="replace") as f:
                paras = re.split(r"\n\s*\n", f.read())
            yield from ((f"{file}#{k}", p.strip()) for k, p in enumerate(paras) if p.strip())
        elif file.endswith(".jsonl"):
            for lineno, r in read_jsonl(file):
                if not isinstance(r.get("text"), str):
                    raise ValueError(f"{file}:{lineno}: no \"text\" field")
                if r["text"].strip():
                    yield f"{file}:{lineno}", r["text"]
        else:
            import pyarrow.parquet as pq  # here: only parquet input pays for importing it
            try:
                pf = pq.ParquetFile(file)
            except Exception as e:  # pyarrow raises several kinds for unreadable files
                raise ValueError(f"{file}: not a readable parquet file ({e})") from None
            if "text" not in pf.schema_arrow.names:
                raise ValueError(f"{file}: no \"text\" column (columns: {', '.join(pf.schema_arrow.names)})")
            texts = (t for batch in pf.iter_batches(columns=["text"]) for t in batch.column(0).to_pylist())
            yield from ((f"{file}@{row}", t) for row, t in enumerate(texts, 1) if t and t.strip())


def capped(texts, n=0):
    for t in texts:
        yield t
        if (n := n + len(t)) > 100_000_000:  # BPE merge statistics settle long before; caps training time
            return


def prepare_text(input_path, out, seed, vocab_size, val_frac):
    t0 = time.time()
    tok = Tokenizer.train(capped(t for _, t in read_documents(input_path)), vocab_size)
    print(f"tokenizer: {tok.vocab_size} tokens ({time.time() - t0:.1f}s)")

    def items(kb):  # the documents, written to kb as a knowledge base for retrieval as they go
        rng = random.Random(seed)
        for n, (source, text) in enumerate(read_documents(input_path)):
            kb.write(json.dumps({"id": str(n), "title": os.path.basename(source), "text": text,
                                 "metadata": {"source": source}}) + "\n")
            yield (n == 0 and val_frac > 0) or rng.random() < val_frac, text  # doc 0 to val: val.bin never empty
    cfg = dict(seed=seed, vocab_size=vocab_size, val_frac=val_frac)
    os.makedirs(out, exist_ok=True)
    with staged(os.path.join(out, "kb.jsonl")) as (kb,):
        return write_data(out, tok, items(kb), source=os.path.abspath(input_path), config=cfg)


# -----------------------------------------------------------------------------

def main(argv):
    t0 = time.time()
    cfg = configure(dict(config), argv)
    text = cfg.pop("input")
    out = cfg.pop("out") or ("data/text" if text else "data/world")
    if text:
        s = prepare_text(text, out, cfg["seed"], cfg["vocab_size"] or 8192, cfg["val_frac"])
    else:
        s = prepare_world(out, **dict(cfg, vocab_size=cfg["vocab_size"] or 2048))
    print(f"wrote {out}/: {s['n_train_docs']:,} + {s['n_val_docs']:,} docs, {s['n_train_tokens']:,} train + "
          f"{s['n_val_tokens']:,} val tokens ({s['dtype']}), vocab {s['vocab_size']}, {time.time() - t0:.1f}s")


if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
