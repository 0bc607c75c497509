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

Output (data/world/): kb.jsonl (every document of both worlds), qa_train.jsonl / qa_heldout.jsonl
(questions with gold document ids and hop-by-hop query chains), tokenizer.json, train.bin / val.bin
(token ids, every document starts with <|bos|>), meta.json.

Importable: Tokenizer, render_conversation, answer_sentence, ABSTAIN, SPECIAL_TOKENS.
"""

import base64
import json
import os
import random
import re
import sys
import time
from dataclasses import dataclass

import numpy as np
import rustbpe
import tiktoken
from tqdm import tqdm

# -----------------------------------------------------------------------------
# defaults, overridden on the command line with --key=value (or --key value)
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
# Tokenizer: rustbpe learns the merges, tiktoken encodes with them

SPECIAL_TOKENS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                  "<|doc_start|>", "<|doc_end|>", "<|query_start|>", "<|query_end|>"]
# GPT-4's split pattern with numbers in chunks of 1-2 digits (as nanochat): years become two tokens
# from a set of 100 instead of eating vocabulary with 1000 three-digit chunks
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
TOKENIZER_MAX_CHARS = 100_000_000  # BPE merge statistics settle long before this; caps training time on big corpora


class Tokenizer:
    def __init__(self, ranks, pattern, specials=SPECIAL_TOKENS):
        # ranks: list of token byte strings, token id = position (ids 0..255 are the single bytes)
        self.ranks, self.pattern, self.specials = ranks, pattern, list(specials)
        self.special_ids = {name: len(ranks) + i for i, name in enumerate(self.specials)}
        self.enc = tiktoken.Encoding("prepare", pat_str=pattern, mergeable_ranks={b: i for i, b in enumerate(ranks)},
                                     special_tokens=self.special_ids)
        self.vocab_size = len(ranks) + len(self.specials)
        self.bos_id = self.special_ids["<|bos|>"]

    @classmethod
    def train(cls, texts, vocab_size):
        if vocab_size < 256 + len(SPECIAL_TOKENS):
            raise ValueError(f"vocab_size={vocab_size} is too small: need at least {256 + len(SPECIAL_TOKENS)} (256 bytes + special tokens)")
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(iter(texts), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
        ranks = sorted(bpe.get_mergeable_ranks(), key=lambda br: br[1])
        assert [r for _, r in ranks] == list(range(len(ranks)))
        return cls([bytes(b) for b, _ in ranks], bpe.get_pattern())

    def encode(self, text):
        return self.enc.encode_ordinary(text)  # special-token text in user data stays plain text

    def encode_batch(self, texts):
        return self.enc.encode_ordinary_batch(texts, num_threads=os.cpu_count() or 1)

    def decode(self, ids):
        return self.enc.decode(ids)

    def special(self, name):
        if name not in self.special_ids:
            raise ValueError(f"unknown special token {name!r}; known: {' '.join(self.specials)}")
        return self.special_ids[name]

    def to_json(self):
        return json.dumps({"pattern": self.pattern, "special_tokens": self.specials,
                           "ranks": [base64.b64encode(b).decode("ascii") for b in self.ranks]})

    @classmethod
    def from_json(cls, s):
        d = json.loads(s)
        return cls([base64.b64decode(b) for b in d["ranks"]], d["pattern"], d["special_tokens"])

    def save(self, path):
        write_atomic(path, self.to_json())

    @classmethod
    def load(cls, path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no tokenizer here (run prepare.py first)")
        with open(path) as f:
            try:
                return cls.from_json(f.read())
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}: not a tokenizer file ({e})") from None


# -----------------------------------------------------------------------------
# Conversations -> token ids + loss mask (1 on what the model must produce: queries and answers)

ROLE_TOKENS = {"user": ("<|user_start|>", "<|user_end|>", 0),
               "query": ("<|query_start|>", "<|query_end|>", 1),
               "assistant": ("<|assistant_start|>", "<|assistant_end|>", 1)}


def render_conversation(tok, messages, max_len=None):
    ids, mask = [tok.bos_id], [0]
    n_docs = 0  # documents are numbered across the whole conversation so a citation [k] is unambiguous
    for i, msg in enumerate(messages):
        role, content = msg.get("role"), msg.get("content")
        if role == "documents":
            for doc in content:
                n_docs += 1
                part = [tok.special("<|doc_start|>")] + tok.encode(f"[{n_docs}] {doc['title']}: {doc['text']}") + [tok.special("<|doc_end|>")]
                ids += part
                mask += [0] * len(part)
        elif role in ROLE_TOKENS:
            start, end, m = ROLE_TOKENS[role]
            # a leading space, as SentencePiece's dummy prefix: a name that opens the answer then has the tokens it
            # has in the question and the documents, so answering is copying (without it, held-out answers failed)
            part = [tok.special(start)] + tok.encode(" " + content) + [tok.special(end)]
            ids += part
            mask += [m] * len(part)
        else:
            raise ValueError(f"message {i}: unknown role {role!r} (expected user, documents, query or assistant)")
    if max_len is not None:
        ids, mask = ids[:max_len], mask[:max_len]
    return ids, mask


# -----------------------------------------------------------------------------
# The world: invented names, entities and relations

ONSETS = "b d f g h k l m n p r s t v z b d k l m n r s t v br dr gr kr st th sh".split()  # repeats: commoner
VOWELS = "a e i o u a e i o u a e i o ae ei ia ou".split()
CODAS = ["", "", "", "", "", "", "n", "r", "l", "s", "th", "m", "nd", "rn", "x"]
COMPANY_SUFFIXES = ["Industries", "Group", "Holdings", "Company", "Corporation", "Partners", "Works", "Trust"]
COUNTRY_SUFFIXES = ["ia", "land", "ania", "or", "istan"]
PROFESSIONS = ["engineer", "painter", "architect", "teacher", "physician", "lawyer", "chemist", "sculptor",
               "journalist", "pilot", "economist", "poet", "carpenter", "botanist", "historian", "musician"]
INDUSTRIES = ["shipping", "software", "mining", "textile", "banking", "aviation", "farming", "publishing",
              "insurance", "energy", "robotics", "pharmaceutical", "tourism", "construction"]


class NamePool:
    """Draws pronounceable words, each at most once, so a name pins down one entity everywhere."""
    def __init__(self, rng):
        self.rng, self.used = rng, set()

    def word(self, suffix=""):
        while True:
            n_syllables = self.rng.choice((2, 2, 2, 3))
            w = "".join(self.rng.choice(ONSETS) + self.rng.choice(VOWELS) + self.rng.choice(CODAS)
                        for _ in range(n_syllables)).capitalize() + suffix
            if w not in self.used:
                self.used.add(w)
                return w


@dataclass
class World:
    split: str               # "train" | "heldout"
    person: list             # full names "First Last"
    surname: list
    company: list            # "Stem Suffix"
    company_stem: list
    city: list
    country: list
    # relations and attributes: int arrays indexed by entity
    female: np.ndarray
    born_year: np.ndarray
    born_in: np.ndarray      # person -> city
    works_for: np.ndarray    # person -> company
    profession: np.ndarray   # person -> PROFESSIONS
    founder: np.ndarray      # company -> person
    founded_year: np.ndarray
    hq: np.ndarray           # company -> city
    industry: np.ndarray     # company -> INDUSTRIES
    city_country: np.ndarray  # city -> country
    population: np.ndarray
    capital: np.ndarray      # country -> city
    founded: dict            # person -> the company they founded (inverse of founder)
    cities_of: list          # country -> its cities (inverse of city_country)

    def kinds(self):
        return (("person", len(self.person)), ("company", len(self.company)),
                ("city", len(self.city)), ("country", len(self.country)))


def make_world(rng, pool, first_names, split, n_people):
    """One self-contained world; relations only point inside it, so two worlds share no facts."""
    n_company, n_city, n_country = max(2, n_people // 8), max(2, n_people // 10), max(2, n_people // 50)
    ri = lambda lo, hi, n: np.array([rng.randrange(lo, hi) for _ in range(n)], dtype=np.int64)
    country = [pool.word(rng.choice(COUNTRY_SUFFIXES)) for _ in range(n_country)]
    city = [pool.word() for _ in range(n_city)]
    company_stem = [pool.word() for _ in range(n_company)]
    surname = [pool.word() for _ in range(n_people)]
    # the first n_country cities are the capitals, so every country has at least one city
    city_country = np.concatenate([np.arange(n_country), ri(0, n_country, n_city - n_country)])
    born_year = ri(1900, 1986, n_people)
    works_for = ri(0, n_company, n_people)
    founder = np.array(rng.sample(range(n_people), n_company), dtype=np.int64)  # distinct founders
    works_for[founder] = np.arange(n_company)  # founders work for their own company
    cities_of = [[] for _ in range(n_country)]
    for c, k in enumerate(city_country):
        cities_of[k].append(c)
    return World(
        split=split, person=[f"{rng.choice(first_names)} {s}" for s in surname], surname=surname,
        company=[f"{s} {rng.choice(COMPANY_SUFFIXES)}" for s in company_stem], company_stem=company_stem,
        city=city, country=country, female=ri(0, 2, n_people), born_year=born_year, born_in=ri(0, n_city, n_people),
        works_for=works_for, profession=ri(0, len(PROFESSIONS), n_people), founder=founder,
        founded_year=born_year[founder] + ri(22, 39, n_company), hq=ri(0, n_city, n_company),
        industry=ri(0, len(INDUSTRIES), n_company), city_country=city_country, population=ri(5, 900, n_city) * 1000,
        capital=np.arange(n_country), founded={int(p): c for c, p in enumerate(founder)}, cities_of=cities_of)


def make_worlds(seed, world_size, heldout_frac):
    if world_size < 10:
        raise ValueError(f"world_size={world_size} is too small: need at least 10 people")
    rng = random.Random(seed)
    pool = NamePool(rng)
    first_names = [pool.word() for _ in range(300)]  # shared by both worlds; surnames keep full names unique
    train = make_world(rng, pool, first_names, "train", world_size)
    heldout = make_world(rng, pool, first_names, "heldout", max(10, round(world_size * heldout_frac)))
    return train, heldout, rng, pool, first_names


def doc_id(w, kind, i):
    return f"{w.split}-{kind}-{i}"


def article(word):
    return ("an " if word[0] in "aeiou" else "a ") + word


# -----------------------------------------------------------------------------
# Documents: one paragraph per entity, facts in random order, each in one of several phrasings.
# {s} is the subject at the start of a sentence (name, short name or pronoun); {n} is the subject
# elsewhere (name or short name). Objects always use full names: they are the answers we look for.

TEMPLATES = {
    # person
    "born_in": ["{s} was born in {city}.", "{s} is a native of {city}.", "{s} was born in the city of {city}.",
                "{city} is the birthplace of {n}."],
    "born_year": ["{s} was born in {year}.", "{s} was born in the year {year}.", "In {year}, {n} was born.",
                  "The year of birth of {n} is {year}."],
    "born": ["{s} was born in {city} in {year}.", "{s} was born in {year} in {city}.",
             "In {year}, {n} was born in {city}."],
    "works_for": ["{s} works for {company}.", "{s} is employed by {company}.", "{company} employs {n}.",
                  "{s} is on the staff of {company}."],
    "profession": ["{s} is {a_prof}.", "{s} works as {a_prof}.", "By profession, {n} is {a_prof}.",
                   "{n} is known as {a_prof}."],
    "founded": ["{s} founded {company} in {cyear}.", "{s} is the founder of {company}.",
                "In {cyear}, {n} founded {company}."],
    # company
    "founded_by": ["{s} was founded by {person}.", "{person} founded {n}.", "{s} was started by {person}.",
                   "The founder of {n} is {person}."],
    "founded_year": ["{s} was founded in {year}.", "{s} was established in {year}.", "In {year}, {n} was founded.",
                     "{n} dates back to {year}."],
    "founded_both": ["{s} was founded by {person} in {year}.", "{person} founded {n} in {year}.",
                     "In {year}, {person} founded {n}."],
    "hq": ["{s} is headquartered in {city}.", "{s} has its headquarters in {city}.", "{s} is based in {city}.",
           "The headquarters of {n} are in {city}."],
    "industry": ["{s} is {a_ind} company.", "{s} operates in the {ind} industry.", "{n} is active in the {ind} business.",
                 "{n} is known for its work in the {ind} sector."],
    # city
    "located_in": ["{s} is a city in {country}.", "{s} is located in {country}.", "{s} lies in {country}.",
                   "{n} is one of the cities of {country}."],
    "population": ["{s} has a population of {pop}.", "About {pop} people live in {n}.", "{s} is home to {pop} people.",
                   "The population of {n} is {pop}."],
    "capital_of": ["{s} is the capital of {country}.", "{s} serves as the capital of {country}."],
    # country
    "capital": ["The capital of {n} is {capital}.", "{s} has its capital in {capital}.", "{capital} is the capital of {n}.",
                "{s} is governed from its capital, {capital}."],
    "cities": ["Cities in {n} include {cities}.", "{cities} are cities in {n}.", "Among the cities of {n} are {cities}."],
}


def entity(w, kind, i):
    """(name, short name, pronoun, facts, fields) of entity i: everything a document or a question needs."""
    if kind == "person":
        founder_of = w.founded.get(i)
        facts = ["born_in", "born_year", "works_for", "profession"] + (["founded"] if founder_of is not None else [])
        fields = dict(city=w.city[w.born_in[i]], year=int(w.born_year[i]), company=w.company[w.works_for[i]],
                      a_prof=article(PROFESSIONS[w.profession[i]]),
                      cyear=None if founder_of is None else int(w.founded_year[founder_of]))
        return w.person[i], w.surname[i], ("He", "She")[w.female[i]], facts, fields
    if kind == "company":
        fields = dict(person=w.person[w.founder[i]], year=int(w.founded_year[i]), city=w.city[w.hq[i]],
                      ind=INDUSTRIES[w.industry[i]], a_ind=article(INDUSTRIES[w.industry[i]]))
        return w.company[i], w.company_stem[i], "It", ["founded_by", "founded_year", "hq", "industry"], fields
    if kind == "city":
        k = int(w.city_country[i])
        facts = ["located_in", "population"] + (["capital_of"] if w.capital[k] == i else [])
        return w.city[i], w.city[i], "It", facts, dict(country=w.country[k], pop=f"{w.population[i]:,}")
    cities = [w.city[c] for c in w.cities_of[i]]
    return w.country[i], w.country[i], "It", ["capital"] + (["cities"] if len(cities) > 1 else []), \
        dict(capital=w.city[w.capital[i]], cities=cities)


def render_doc(w, kind, i, rng):
    name, short, pronoun, facts, fields = entity(w, kind, i)
    if "cities" in fields:  # a few of the country's cities, a different few each time
        cs = rng.sample(fields["cities"], min(4, len(fields["cities"])))
        fields = dict(fields, cities=", ".join(cs[:-1]) + " and " + cs[-1])
    if kind == "person" and rng.random() < 0.3:
        facts = ["born"] + facts[2:]
    if kind == "company" and rng.random() < 0.3:
        facts = ["founded_both"] + facts[2:]
    facts = rng.sample(facts, len(facts))
    sentences = []
    for j, fact in enumerate(facts):
        s = name if j == 0 else rng.choice((name, short, pronoun))
        n = name if j == 0 else rng.choice((name, short))
        t = rng.choice(TEMPLATES[fact])
        sentences.append(t.format(s=s, n=n, **fields))
    return name, " ".join(sentences)


# -----------------------------------------------------------------------------
# Questions. Every hop of a chain is a single-hop question about one entity, answered by its document.

QUESTIONS = {
    "person": {
        "born_in": ["Where was {e} born?", "What is the birthplace of {e}?", "In which city was {e} born?", "Which city is {e} from?"],
        "born_year": ["When was {e} born?", "In what year was {e} born?", "What year was {e} born in?"],
        "works_for": ["Which company does {e} work for?", "Who employs {e}?", "Where does {e} work?"],
        "profession": ["What is the profession of {e}?", "What does {e} do for a living?", "What is the occupation of {e}?"],
        "birth_country": ["In which country was {e} born?", "What country was {e} born in?", "{e} was born in which country?"],
        "employer_hq": ["Where is the company {e} works for headquartered?", "In which city is the employer of {e} based?",
                        "Where is the employer of {e} headquartered?"],
        "employer_founded_year": ["When was the company {e} works for founded?", "In what year was the employer of {e} founded?"],
        "employer_hq_country": ["In which country is the company {e} works for headquartered?",
                                "Which country is the employer of {e} based in?"],
        "birth_country_capital": ["What is the capital of the country where {e} was born?",
                                  "Which city is the capital of the country {e} was born in?"],
    },
    "company": {
        "founded_by": ["Who founded {e}?", "Who is the founder of {e}?", "Who started {e}?"],
        "founded_year": ["When was {e} founded?", "In what year was {e} founded?", "When was {e} established?"],
        "hq": ["Where is {e} headquartered?", "In which city is {e} based?", "Where are the headquarters of {e}?"],
        "industry": ["What industry is {e} in?", "In which industry does {e} operate?", "What business is {e} in?"],
        "founder_birthplace": ["Where was the founder of {e} born?", "In which city was the founder of {e} born?",
                               "What is the birthplace of the person who founded {e}?"],
        "founder_born_year": ["When was the founder of {e} born?", "In what year was the founder of {e} born?"],
        "hq_country": ["In which country is {e} headquartered?", "Which country is {e} based in?"],
        "founder_birth_country": ["In which country was the founder of {e} born?",
                                  "What country was the person who founded {e} born in?"],
    },
    "city": {
        "located_in": ["In which country is {e}?", "Which country is {e} located in?", "In what country does {e} lie?"],
        "population": ["What is the population of {e}?", "How many people live in {e}?"],
    },
    "country": {
        "capital": ["What is the capital of {e}?", "Which city is the capital of {e}?"],
    },
}
ANSWERS = {  # one fixed sentence per question type: the answer format the model learns
    "born_in": "{e} was born in {a}.", "born_year": "{e} was born in {a}.", "works_for": "{e} works for {a}.",
    "profession": "{e} is {aa}.", "birth_country": "{e} was born in {a}.",
    "employer_hq": "The company {e} works for is headquartered in {a}.",
    "employer_founded_year": "The company {e} works for was founded in {a}.",
    "employer_hq_country": "The company {e} works for is headquartered in {a}.",
    "birth_country_capital": "The capital of the country where {e} was born is {a}.",
    "founded_by": "{e} was founded by {a}.", "founded_year": "{e} was founded in {a}.",
    "hq": "{e} is headquartered in {a}.", "industry": "{e} is {aa} company.",
    "founder_birthplace": "The founder of {e} was born in {a}.", "founder_born_year": "The founder of {e} was born in {a}.",
    "hq_country": "{e} is headquartered in {a}.", "founder_birth_country": "The founder of {e} was born in {a}.",
    "located_in": "{e} is located in {a}.", "population": "{e} has a population of {a}.",
    "capital": "The capital of {e} is {a}.",
}
ABSTAIN = "The documents do not contain the answer."


def answer_sentence(qa, cite=None):
    """The answer as the model should say it; cite = number of the document holding the fact."""
    if not qa["answer"]:
        return ABSTAIN
    s = ANSWERS[qa["type"]].format(e=qa["entity"], a=qa["answer"], aa=article(qa["answer"]))
    return s if cite is None else f"{s[:-1]} [{cite}]."


def single_hops(w, kind, i):
    """{relation: (answer, doc_id, next entity kind, next entity index)} for entity i."""
    d = doc_id(w, kind, i)
    if kind == "person":
        c, m = int(w.born_in[i]), int(w.works_for[i])
        return {"born_in": (w.city[c], d, "city", c), "born_year": (str(w.born_year[i]), d, None, None),
                "works_for": (w.company[m], d, "company", m), "profession": (PROFESSIONS[w.profession[i]], d, None, None)}
    if kind == "company":
        p, c = int(w.founder[i]), int(w.hq[i])
        return {"founded_by": (w.person[p], d, "person", p), "founded_year": (str(w.founded_year[i]), d, None, None),
                "hq": (w.city[c], d, "city", c), "industry": (INDUSTRIES[w.industry[i]], d, None, None)}
    if kind == "city":
        k = int(w.city_country[i])
        return {"located_in": (w.country[k], d, "country", k), "population": (f"{w.population[i]:,}", d, None, None)}
    c = int(w.capital[i])
    return {"capital": (w.city[c], d, "city", c)}


MULTI_HOP = {  # question type -> the relations followed from the asked-about entity
    "person": {"birth_country": ["born_in", "located_in"], "employer_hq": ["works_for", "hq"],
               "employer_founded_year": ["works_for", "founded_year"], "employer_hq_country": ["works_for", "hq", "located_in"],
               "birth_country_capital": ["born_in", "located_in", "capital"]},
    "company": {"founder_birthplace": ["founded_by", "born_in"], "founder_born_year": ["founded_by", "born_year"],
                "hq_country": ["hq", "located_in"], "founder_birth_country": ["founded_by", "born_in", "located_in"]},
    "city": {}, "country": {},
}


def shuffled(w, rng, copies=1):
    """Every (kind, index, copy) of a world in random order, without materialising millions of tuples."""
    kinds = [k for k, _ in w.kinds()]
    offsets = np.cumsum([0] + [n for _, n in w.kinds()])
    for item in np.random.default_rng(rng.randrange(2**32)).permutation(copies * int(offsets[-1])):
        g, copy = divmod(int(item), copies)
        t = int(np.searchsorted(offsets, g, side="right")) - 1
        yield kinds[t], g - int(offsets[t]), copy


def make_qa(w, rng, pool, first_names, unanswerable_frac=0.1):
    """Every single-, two- and three-hop question of a world, entities in random order, plus questions of
    the same types about invented entities that have no document anywhere (the answer is to abstain)."""
    ghost = {"person": lambda: f"{rng.choice(first_names)} {pool.word()}",
             "company": lambda: f"{pool.word()} {rng.choice(COMPANY_SUFFIXES)}",
             "city": lambda: pool.word(), "country": lambda: pool.word(rng.choice(COUNTRY_SUFFIXES))}
    n = 0
    for kind, i, _ in shuffled(w, rng):
        e = getattr(w, kind)[i]
        hops = single_hops(w, kind, i)
        qas = []
        for qtype, path in [(rel, [rel]) for rel in hops] + list(MULTI_HOP[kind].items()):
            chain, k, j = [], kind, i
            for rel in path:  # follow the relations, each hop a single-hop question about the bridge entity
                a, d, k2, j2 = single_hops(w, k, j)[rel]
                chain.append({"query": rng.choice(QUESTIONS[k][rel]).format(e=getattr(w, k)[j]), "answer": a, "doc_id": d})
                k, j = k2, j2
            question = chain[0]["query"] if len(chain) == 1 else rng.choice(QUESTIONS[kind][qtype]).format(e=e)
            qas.append({"question": question, "answer": chain[-1]["answer"], "hops": len(chain),
                        "gold_ids": [c["doc_id"] for c in chain], "chain": chain, "type": qtype, "entity": e})
            if rng.random() < unanswerable_frac:
                g = ghost[kind]()
                qas.append({"question": rng.choice(QUESTIONS[kind][qtype]).format(e=g), "answer": "", "hops": 0,
                            "gold_ids": [], "chain": [], "type": qtype, "entity": g})
        for q in rng.sample(qas, len(qas)):
            yield {"id": f"{w.split}-qa-{n}", **q, "world": w.split}
            n += 1


def corpus_items(w, rng, val_frac):
    """One rendering of a world in random order: (is_val, text) per document. Each entity gives its
    encyclopedia paragraph, and a second, short document: a closed-book question about one of its facts and the
    answer, so that the base model learns to *state* facts it read, not only to continue paragraphs (one, not all:
    paragraphs stay most of the corpus, and over the renderings every fact is still asked several times)."""
    for kind, i, is_qa in shuffled(w, rng, copies=2):
        if is_qa:
            e = getattr(w, kind)[i]
            rel, (a, *_) = rng.choice(list(single_hops(w, kind, i).items()))
            text = (f"Question: {rng.choice(QUESTIONS[kind][rel]).format(e=e)}\n"
                    f"Answer: {answer_sentence({'type': rel, 'entity': e, 'answer': a})}")
        else:
            title, body = render_doc(w, kind, i, rng)
            text = f"{title}: {body}"
        yield rng.random() < val_frac, text


def reading_items(w, rng, val_frac):
    """Reading exercises on a world whose names occur nowhere else: one to three of its paragraphs, then questions
    about them with their answers. A name seen once cannot be remembered, only copied from the context, so this is
    where the base model can learn to read (induction) rather than recall: the training world is memorised, so
    nothing in it ever needs copying. Several questions per passage make copying a large share of the targets.
    `python rag.py --reading CKPT` measures the skill (README: Quick start)."""
    n = {kind: count for kind, count in w.kinds()}
    for kind, i, _ in shuffled(w, rng):
        passage = [(kind, i)] + [(k, rng.randrange(n[k])) for k in rng.choices(list(n), k=rng.randint(0, 2))]
        passage = list(dict.fromkeys(passage))
        text = [": ".join(render_doc(w, k, j, rng)) for k, j in rng.sample(passage, len(passage))]
        for k, j in rng.sample(passage + [(kind, i)], len(passage) + 1):
            e = getattr(w, k)[j]
            rel, (a, *_) = rng.choice(list(single_hops(w, k, j).items()))
            text.append(f"Question: {rng.choice(QUESTIONS[k][rel]).format(e=e)}\n"
                        f"Answer: {answer_sentence({'type': rel, 'entity': e, 'answer': a})}")
        yield rng.random() < val_frac, "\n".join(text)


# -----------------------------------------------------------------------------
# Writing

def write_atomic(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_jsonl(path, rows):
    with open(path + ".tmp", "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(path + ".tmp", path)


def write_bins(out, tok, items, total, desc):
    """Tokenise (is_val, text) items into train.bin / val.bin, each document preceded by <|bos|>."""
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
        for item in tqdm(items, total=total, desc=desc, unit="doc", mininterval=1.0):
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
    return np.dtype(dtype).name, counts


def tally(qas, hops):
    for q in qas:
        hops[q["hops"]] += 1
        yield q


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
    write_jsonl(os.path.join(out, "kb.jsonl"), tqdm(kb_rows(), total=sum(n_docs.values()), desc="kb", unit="doc", mininterval=1.0))
    qa_counts = {}
    for w in worlds:
        hops = qa_counts[w.split] = {h: 0 for h in range(4)}
        write_jsonl(os.path.join(out, f"qa_{w.split}.jsonl"),
                    tqdm(tally(make_qa(w, rng, pool, first_names), hops), desc=f"qa_{w.split}", unit="qa", mininterval=1.0))
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
    dtype, counts = write_bins(out, tok, all_renderings(), total, "tokenise")
    tok.save(os.path.join(out, "tokenizer.json"))
    meta = dict(vocab_size=tok.vocab_size, dtype=dtype, bos_id=tok.bos_id, n_train_tokens=counts["train"][0],
                n_val_tokens=counts["val"][0], n_train_docs=counts["train"][1], n_val_docs=counts["val"][1],
                source="world", kb_docs=n_docs, qa=qa_counts,
                config=dict(seed=seed, world_size=world_size, heldout_frac=heldout_frac, rag_frac=rag_frac,
                            reading_frac=reading_frac, n_renderings=n_renderings,
                            vocab_size=vocab_size, val_frac=val_frac))
    write_atomic(os.path.join(out, "meta.json"), json.dumps(meta, indent=2))
    return dict(meta, seconds=time.time() - t0)


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
        dtype, counts = write_bins(out, tok, items(), None, "tokenise")
    except BaseException:
        kb.close()
        os.remove(kb.name)
        raise
    kb.close()
    os.replace(kb.name, kb_path)
    tok.save(os.path.join(out, "tokenizer.json"))
    meta = dict(vocab_size=tok.vocab_size, dtype=dtype, bos_id=tok.bos_id, n_train_tokens=counts["train"][0],
                n_val_tokens=counts["val"][0], n_train_docs=counts["train"][1], n_val_docs=counts["val"][1],
                source=os.path.abspath(input_path), config=dict(seed=seed, vocab_size=vocab_size, val_frac=val_frac))
    write_atomic(os.path.join(out, "meta.json"), json.dumps(meta, indent=2))
    return dict(meta, seconds=time.time() - t0)


# -----------------------------------------------------------------------------

def parse_args(argv, cfg):
    cfg = dict(cfg)
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            raise ValueError(f"unexpected argument {arg!r} (use --key=value)")
        key, eq, val = arg[2:].partition("=")
        if not eq:
            if not args:
                raise ValueError(f"--{key} needs a value")
            val = args.pop(0)
        if key not in cfg:
            raise ValueError(f"unknown option --{key} (known: {', '.join('--' + k for k in cfg)})")
        try:
            cfg[key] = type(cfg[key])(val)
        except ValueError:
            raise ValueError(f"--{key}={val}: expected {type(cfg[key]).__name__}") from None
    return cfg


def main(argv):
    cfg = parse_args(argv, config)
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
