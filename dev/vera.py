"""
A real data directory from V.E.R.A. (Virtual Entity of Relevant Acronyms, Debian's dict-vera): one document per
dictionary entry, "What does X stand for?" for every acronym with a single entry, answered by its expansion, and
questions about acronyms that are in no entry (the answer is to abstain). Split by document: held-out questions
ask about entries that no training stage sees (they are left out of pretrain.jsonl and of qa_train.jsonl).

    apt-get download dict-vera && dpkg -x dict-vera_*.deb /tmp/vera     # or: apt-get install dict-vera
    python dev/vera.py --dict=/tmp/vera/usr/share/dictd/vera --out=data/vera

Writes kb.jsonl, qa_train.jsonl, qa_heldout.jsonl (the data-directory layout of prepare.py) and pretrain.jsonl, the
training entries' text for `python prepare.py --input=data/vera/pretrain.jsonl`.
"""
import argparse
import gzip
import json
import os
import random
import re
import string

B64 = string.ascii_uppercase + string.ascii_lowercase + string.digits + "+/"  # dictd's numbers in the .index
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


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dict", default="/usr/share/dictd/vera", help="the dictionary, without .index / .dict.dz")
    p.add_argument("--out", default="data/vera")
    p.add_argument("--heldout", type=float, default=0.05, help="share of questions (and their entries) held out")
    p.add_argument("--unanswerable", type=float, default=0.1, help="questions about acronyms in no entry, per question")
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args()
    try:
        docs = [{"id": f"vera-{i}", "title": a, "text": t} for i, (a, t) in enumerate(entries(args.dict))]
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {args.dict}: not a readable dictd dictionary ({e})")
    rng = random.Random(args.seed)
    count = {}  # entries per acronym, case-insensitive
    for d in docs:
        count[d["title"].lower()] = count.get(d["title"].lower(), 0) + 1
    qas = []
    for d in docs:
        answer = expansion(d["text"])
        if count[d["title"].lower()] == 1 and len(answer.split()) >= 2:  # ambiguous acronyms stay in the KB as distractors
            qas.append({"id": f"vera-qa-{len(qas)}", "question": rng.choice(PHRASINGS).format(a=d["title"]),
                        "golden_answers": [answer], "gold_ids": [d["id"]]})
    rng.shuffle(qas)
    n_held = round(len(qas) * args.heldout)
    splits = {"heldout": qas[:n_held], "train": qas[n_held:]}
    for split, items in splits.items():  # unanswerable: a made-up acronym that no entry has
        for i in range(round(len(items) * args.unanswerable)):
            while (a := "".join(rng.choices(string.ascii_uppercase, k=rng.randint(3, 5)))).lower() in count:
                pass
            count[a.lower()] = 0
            items.append({"id": f"vera-{split}-none-{i}", "question": rng.choice(PHRASINGS).format(a=a),
                          "golden_answers": [], "gold_ids": []})
        rng.shuffle(items)
    held_docs = {g for q in splits["heldout"] for g in q["gold_ids"]}
    os.makedirs(args.out, exist_ok=True)
    files = {"kb": docs, "qa_train": splits["train"], "qa_heldout": splits["heldout"],
             "pretrain": [{"text": f"{d['title']}: {d['text']}"} for d in docs if d["id"] not in held_docs]}
    for name, rows in files.items():
        path = os.path.join(args.out, name + ".jsonl")
        with open(path + ".tmp", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        os.replace(path + ".tmp", path)
    print(f"wrote {args.out}/: {len(docs):,} documents, {len(splits['train']):,} training and "
          f"{len(splits['heldout']):,} held-out questions, {len(files['pretrain']):,} entries to pretrain on")


if __name__ == "__main__":
    main()
