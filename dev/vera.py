"""
A data directory from V.E.R.A. (Debian's dict-vera, computing acronyms): a document per entry, "What does X stand
for?" on one-entry and on made-up acronyms (abstain), split by entry as the world is; the other entries, with their
questions and reading exercises on made-up acronyms, are the pretraining text (pretrain.jsonl).

    apt-get download dict-vera && dpkg -x dict-vera_*.deb /tmp/vera     # or: apt-get install dict-vera
    python dev/vera.py --dict=/tmp/vera/usr/share/dictd/vera --out=data/vera
"""
import argparse
import gzip
import json
import os
import random
import re
import string
import sys
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root
from common import write_atomic  # noqa: E402

B64 = string.ascii_uppercase + string.ascii_lowercase + string.digits + "+/"  # dictd's numbers in the .index
READING = 20000  # reading exercises in pretrain.jsonl
QA_SHARES = {"heldout": 0.05, "train": 0.45}  # of the answerable questions; the rest pretrain
PHRASINGS = ["What does {a} stand for?", "What is {a} short for?", "What is the expansion of {a}?",
             "{a} is an abbreviation of what?"]


def entries(path):
    """(acronym, entry text) for every entry of a dictd dictionary (path without .index / .dict.dz)."""
    data = gzip.open(path + ".dict.dz").read()
    num = lambda s: sum(B64.index(c) * 64 ** i for i, c in enumerate(reversed(s)))
    for line in open(path + ".index", encoding="utf-8"):
        word, offset, length = line.rstrip("\n").split("\t")
        head, body = (data[num(offset):num(offset) + num(length)].decode("utf-8") + "\n").split("\n", 1)
        if not word.startswith("00") and body.strip():  # 00...: dictd's own header entries
            yield head.strip(), " ".join(body.split())  # the entry's headword keeps its case; the index's is lowered


def expansion(text):
    """The expansion alone: the entry less its trailing (topics) and "spelling variants"."""
    text = re.sub(r'(,\s*"[^"]*")+$', "", text).strip()
    return re.sub(r"\s*\([^()]*\)$", "", text).strip()


def new_acronym(rng, taken, a=""):
    """An acronym no entry has (a itself when free), marked taken."""
    while not a or a.lower() in taken:
        a = "".join(rng.choices(string.ascii_uppercase, k=rng.randint(3, 5)))
    taken[a.lower()] = 0
    return a


def asked(question, answer):
    return f"\nQuestion: {question}\nAnswer: {answer}"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dict", default="/usr/share/dictd/vera", help="the dictionary, without .index / .dict.dz")
    p.add_argument("--out", default="data/vera")
    args = p.parse_args()
    try:
        docs = [{"id": f"vera-{i}", "title": a, "text": t} for i, (a, t) in enumerate(entries(args.dict))]
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {args.dict}: not a readable dictd dictionary ({e})")
    rng = random.Random(1337)
    count = Counter(d["title"].lower() for d in docs)  # entries per acronym, case-insensitive
    # ambiguous acronyms stay in the KB as distractors
    one = [(d, a) for d in docs if count[d["title"].lower()] == 1 and len((a := expansion(d["text"])).split()) >= 2]
    qas = [{"id": f"vera-qa-{n}", "question": rng.choice(PHRASINGS).format(a=d["title"]), "golden_answers": [a],
            "gold_ids": [d["id"]]} for n, (d, a) in enumerate(one)]
    rng.shuffle(qas)
    n_held, n_train = (round(len(qas) * share) for share in QA_SHARES.values())
    splits = {"heldout": qas[:n_held], "train": qas[n_held:n_held + n_train]}
    for split, items in splits.items():  # unanswerable: a made-up acronym that no entry has
        for i in range(round(len(items) * 0.1)):  # 1 per 10 questions
            question = rng.choice(PHRASINGS).format(a=new_acronym(rng, count))
            items.append({"id": f"vera-{split}-none-{i}", "question": question, "golden_answers": [], "gold_ids": []})
        rng.shuffle(items)
    unseen = {q["gold_ids"][0] for q in qas[:n_held + n_train]}
    seen = [d for d in docs if d["id"] not in unseen]
    by_id = {q["gold_ids"][0]: (q["question"], q["golden_answers"][0]) for q in qas[n_held + n_train:]}
    pretrain = [f"{d['title']}: {d['text']}" + (asked(*by_id[d["id"]]) if d["id"] in by_id else "") for d in seen]
    words = sorted({w for d in seen for w in expansion(d["text"]).split() if w[:1].isupper() and w.isalpha()})
    for _ in range(READING):  # one to three made-up entries, then questions about them
        made = [(new_acronym(rng, count, "".join(w[0] for w in ws).upper()), " ".join(ws))
                for ws in (rng.sample(words, rng.randint(2, 5)) for _ in range(rng.randint(1, 3)))]
        pretrain.append("\n".join(f"{a}: {e}" for a, e in made) + "".join(
            asked(rng.choice(PHRASINGS).format(a=a), e) for a, e in rng.sample(made, len(made))))
    rng.shuffle(pretrain)
    for name, rows in (("kb", docs), ("qa_train", splits["train"]), ("qa_heldout", splits["heldout"]),
                       ("pretrain", [{"text": t} for t in pretrain])):
        write_atomic(os.path.join(args.out, name + ".jsonl"), (json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {args.out}/: {len(docs):,} documents, {len(splits['train']):,} training and "
          f"{len(splits['heldout']):,} held-out questions, {len(seen):,} entries and {READING:,} "
          "reading exercises to pretrain on")


if __name__ == "__main__":
    main()
