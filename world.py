"""
The synthetic world, this project's controlled laboratory (nanoGPT's shakespeare_char): invented people,
companies, cities and countries tied together by relations (born in, works for, founded by, headquartered in,
located in, ...), written up as one short encyclopedia paragraph per entity with the phrasing and fact order drawn
at random, and every single-, two- and three-hop question about them. Everything that knows the world's schema
lives here: question types, answer sentences, entity kinds and renaming. prepare.py writes a world as a data
directory; the RAG stages read it like any other.
"""
import json
import random
import re
from dataclasses import dataclass, replace

import numpy as np

from rag import doc_dict, draw_k, messages_for, raft_docs, search_query, single_hop, target_answer
from tokenizer import render_conversation

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
    both = {"person": "born", "company": "founded_both"}.get(kind)  # the first two facts in one sentence
    if both and rng.random() < 0.3:
        facts = [both] + facts[2:]
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


def answer_sentence(qtype, e, a):
    """The answer as the model learns to say it: the fixed sentence of the question type."""
    return ANSWERS[qtype].format(e=e, a=a, aa=article(a))


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
            qas.append({"question": question, "golden_answers": [chain[-1]["answer"]],
                        "gold_ids": [c["doc_id"] for c in chain], "queries": [c["query"] for c in chain],
                        "response": answer_sentence(qtype, e, chain[-1]["answer"]), "hops": len(chain),
                        "type": qtype, "entity": e})
            if rng.random() < unanswerable_frac:
                g = ghost[kind]()
                qas.append({"question": rng.choice(QUESTIONS[kind][qtype]).format(e=g), "golden_answers": [],
                            "gold_ids": [], "queries": [], "hops": 0, "type": qtype, "entity": g})
        for q in rng.sample(qas, len(qas)):
            yield {"id": f"{w.split}-qa-{n}", **q, "world": w.split}
            n += 1


def closed_book(w, kind, i, rng):
    """A question about one fact of entity i, drawn at random, and its answer sentence."""
    e = getattr(w, kind)[i]
    rel, (a, *_) = rng.choice(list(single_hops(w, kind, i).items()))
    return f"Question: {rng.choice(QUESTIONS[kind][rel]).format(e=e)}\nAnswer: {answer_sentence(rel, e, a)}"


def corpus_items(w, rng, val_frac):
    """One rendering of a world in random order: (is_val, text) per document. Each entity gives its
    encyclopedia paragraph, and a second, short document: a closed-book question about one of its facts and the
    answer, so that the base model learns to *state* facts it read, not only to continue paragraphs (one, not all:
    paragraphs stay most of the corpus, and over the renderings every fact is still asked several times)."""
    for kind, i, is_qa in shuffled(w, rng, copies=2):
        text = closed_book(w, kind, i, rng) if is_qa else ": ".join(render_doc(w, kind, i, rng))
        yield rng.random() < val_frac, text


def reading_items(w, rng, val_frac):
    """Reading exercises on a world whose names occur nowhere else: one to three of its paragraphs, then questions
    about them with their answers. A name seen once cannot be remembered, only copied from the context, so this is
    where the base model can learn to read (induction) rather than recall: the training world is memorised, so
    nothing in it ever needs copying. Several questions per passage make copying a large share of the targets.
    `python bench.py --reading CKPT` measures the skill (README: Quick start)."""
    n = {kind: count for kind, count in w.kinds()}
    for kind, i, _ in shuffled(w, rng):
        passage = [(kind, i)] + [(k, rng.randrange(n[k])) for k in rng.choices(list(n), k=rng.randint(0, 2))]
        passage = list(dict.fromkeys(passage))
        text = [": ".join(render_doc(w, k, j, rng)) for k, j in rng.sample(passage, len(passage))]
        text += [closed_book(w, k, j, rng) for k, j in rng.sample(passage + [(kind, i)], len(passage) + 1)]
        yield rng.random() < val_frac, "\n".join(text)


# -----------------------------------------------------------------------------
# Renaming: RAG training examples about fresh names, so that answers can only come from reading

# the kind of entity each single-hop question type asks about (an unanswerable question of a multi-hop type is left
# out, so every word of its name is invented)
ENTITY_KIND = {qtype: kind for kind, types in QUESTIONS.items() for qtype in types if qtype not in MULTI_HOP[kind]}
ANSWER_KIND = {"born_in": "city", "works_for": "company", "founded_by": "person", "hq": "city",
               "located_in": "country", "capital": "city"}  # single-hop relations whose answer is a name


def first_names(docs):
    """The shared first-name pool, as held-out people's first names: from the non-held-out person documents."""
    return sorted({d.title.split()[0] for d in docs
                   if d.metadata.get("world") != "heldout" and d.metadata.get("type") == "person"})


def rename_names(qa, docs, rng, first_names):
    """(qa, docs) with the asked-about entity, and the answer when it is a name, renamed everywhere (question,
    answer, every document) to fresh names from the world's own generator; a person gets a first name from the
    shared pool (first_names) and an invented surname, as held-out people have. Then the model can answer only
    by reading, which is the situation of every held-out question: without renaming, training-world questions
    are answered from memory and "unfamiliar name" becomes a cue to abstain; with the entity alone renamed, the
    few hundred answers come back so often that held-out answers are written as blends of them.
    docs: retrieve.Document objects."""
    pool, names = NamePool(rng), {}

    def rename(name, kind):
        words = name.split()
        if kind == "person" and len(words) == 2:
            names.setdefault(words[0], rng.choice(first_names))
            names.setdefault(words[1], pool.word())
        elif kind == "country":
            names.setdefault(name, pool.word(next((s for s in COUNTRY_SUFFIXES if name.endswith(s)), "")))
        else:  # a city, or a company's stem (its suffix stays)
            for w in words:
                if w not in COMPANY_SUFFIXES:
                    names.setdefault(w, pool.word())
    rename(qa["entity"], ENTITY_KIND.get(qa["type"]))
    if qa["type"] in ANSWER_KIND and qa["golden_answers"]:
        rename(qa["golden_answers"][0], ANSWER_KIND[qa["type"]])
    names = {k: v for k, v in names.items() if k != v}
    if not names:
        return qa, docs
    pattern = re.compile(r"\b(" + "|".join(map(re.escape, names)) + r")\b")
    sub = lambda s: pattern.sub(lambda m: names[m.group(1)], s)
    qa = {**qa, "question": sub(qa["question"]), "entity": sub(qa["entity"]),
          "golden_answers": [sub(a) for a in qa["golden_answers"]], "response": sub(qa.get("response", ""))}
    return qa, [replace(d, title=sub(d.title), text=sub(d.text)) for d in docs]


# -----------------------------------------------------------------------------
# Conversations: follow-ups that refer back with a pronoun, and questions about things outside the world

PRONOUNS = {"person": (("he", "him", "his"), ("she", "her", "her")),  # (subject, object, possessive)
            "company": (("it", "it", "its"), ("that company", "that company", "that company's")),
            "city": (("it", "it", "its"), ("that city", "that city", "that city's")),
            "country": (("it", "it", "its"), ("that country", "that country", "that country's"))}


def refer_back(question, entity, pronoun):
    """question with entity replaced by pronoun (a PRONOUNS triple), as a follow-up about the entity of the
    previous turn asks it: "What is the profession of Kel Odri?" -> "What is his profession?"."""
    subject, obj, possessive = pronoun
    e = re.escape(entity)
    q = re.sub(rf"\bthe (\w+) of {e}\b", rf"{possessive} \1", question)
    q = re.sub(rf"\b(of|employs|by|in) {e}\b", rf"\1 {obj}", q)
    q = re.sub(rf"\b{e}\b", subject, q)
    return q[:1].upper() + q[1:]


REAL = {  # real names, which no world generates: questions about them have no document in the KB
    "person": ["Albert Einstein", "Marie Curie", "Isaac Newton", "Charles Darwin", "Ada Lovelace", "Nikola Tesla",
               "Leonardo da Vinci", "William Shakespeare", "Jane Austen", "Pablo Picasso", "Frida Kahlo",
               "Wolfgang Amadeus Mozart", "Ludwig van Beethoven", "Napoleon Bonaparte", "Abraham Lincoln",
               "Winston Churchill", "Nelson Mandela", "Mahatma Gandhi", "Barack Obama", "Angela Merkel", "Steve Jobs",
               "Bill Gates", "Elon Musk", "Oprah Winfrey", "Taylor Swift", "Lionel Messi", "Serena Williams",
               "Alan Turing", "Galileo Galilei", "Sigmund Freud", "Vincent van Gogh", "Agatha Christie"],
    "company": ["Microsoft", "Apple", "Google", "Amazon", "Toyota", "Volkswagen", "Siemens", "Samsung", "Nestle",
                "IBM", "Intel", "Nokia", "Sony", "Ikea", "Coca-Cola", "Boeing", "Airbus", "Netflix", "Shell",
                "Unilever"],
    "city": ["Paris", "London", "Berlin", "Madrid", "Rome", "Tokyo", "New York", "Sydney", "Cairo", "Moscow",
             "Beijing", "Mumbai", "Toronto", "Chicago", "Istanbul", "Lagos", "Lima", "Vienna", "Prague", "Dublin",
             "Oslo", "Nairobi", "Seoul", "Bangkok"],
    "country": ["France", "Germany", "Spain", "Italy", "Japan", "China", "India", "Brazil", "Canada", "Mexico",
                "Egypt", "Kenya", "Nigeria", "Australia", "Argentina", "Peru", "Norway", "Sweden", "Poland", "Greece",
                "Turkey", "Vietnam", "Chile", "Portugal", "Ireland", "Austria", "Thailand", "Morocco"],
}
TRIVIA = ["Who wrote Hamlet?", "What is the boiling point of water?", "How tall is Mount Everest?",
          "Who painted the Mona Lisa?", "What is the largest ocean on Earth?", "How many planets are in the solar system?",
          "What is the speed of light?", "Who discovered penicillin?", "What is the chemical symbol for gold?",
          "When did the Second World War end?", "What is the longest river in the world?", "Who invented the telephone?",
          "What language is spoken in Brazil?", "How many legs does a spider have?", "What is the currency of Japan?",
          "When did humans first land on the Moon?", "What is the tallest building in the world?",
          "Who was the first president of the United States?", "What is the square root of 144?",
          "Which planet is known as the Red Planet?"]


def out_of_world(split, rng):
    """Questions about real people, companies, cities and countries (every question type of their kind) and
    trivia: nothing in the world answers them, so the answer is to abstain. Names alternate between the "train"
    and "heldout" splits, so the evaluation asks about names that training never showed."""
    half = int(split == "heldout")
    qas = [{"question": rng.choice(templates).format(e=name), "golden_answers": [], "type": qtype, "entity": name}
           for kind, names in REAL.items() for name in names[half::2] for qtype, templates in QUESTIONS[kind].items()]
    return qas + [{"question": q, "golden_answers": [], "type": "trivia"} for q in TRIVIA[half::2]]


# -----------------------------------------------------------------------------
# RAG training conversations about the world (rag_train.py's follow-ups, refrag_train.py's renamed worlds)

def by_entity(qas):
    """{entity: its answerable single-hop questions} of the world's records, for entities asked about in more than
    one relation: the pairs a conversation can ask about (a first question, then a follow-up)."""
    about = {}
    for q in qas:
        if q["golden_answers"] and single_hop(q) and q.get("type") in ENTITY_KIND and q.get("response"):
            about.setdefault(q["entity"], []).append(q)
    return {e: qs for e, qs in about.items() if len({q["type"] for q in qs}) > 1}


def followup_example(tok, rng, about, search, by_id, k_max, p_no_gold, p_rename, first_names, k_power=0.0):
    """(ids, mask) of a second turn about an entity of `about` (by_entity's): a question that refers back with a
    pronoun to the first turn's entity, about another of its relations, with RAFT documents from search(query) ->
    ranked Documents, for the query chat.py retrieves with (search_query). The first turn is text only, as chat.py
    keeps it, and carries no loss: without its documents it cannot be read. A share p_rename is renamed
    (rename_names, first_names: the pool of fresh first names)."""
    qa = rng.choice([q for qs in about.values() for q in qs])
    first = rng.choice([q for q in about[qa["entity"]] if q["type"] != qa["type"]])
    pronoun = rng.choice(PRONOUNS[ENTITY_KIND[qa["type"]]])
    query = search_query(refer_back(qa["question"], qa["entity"], pronoun), first["question"])
    docs = raft_docs(qa, search(query), by_id, rng, draw_k(rng, k_max, k_power), p_no_gold)
    qa = {**qa, "question": "\n".join((first["question"], first["response"], qa["question"]))}  # renamed alike
    if rng.random() < p_rename:
        qa, docs = rename_names(qa, docs, rng, first_names)
    q1, a1, q2 = qa["question"].split("\n")
    history = messages_for(q1, None, a1)
    turn = messages_for(refer_back(q2, qa["entity"], pronoun), docs, target_answer(qa, docs))
    ids, mask = render_conversation(tok, history + turn)
    n = len(render_conversation(tok, history)[0])
    return ids, [0] * n + mask[n:]


def renamer(names, rng):
    """(forward, back): forward swaps every word of `names` in a text for an invented word, the same one each
    time; back maps invented words to the real ones."""
    pool, fresh, real = NamePool(rng), {}, {}
    word = re.compile(r"\b[A-Z][a-z]+\b")

    def invent(w):
        if w not in fresh:
            fresh[w] = pool.word()
            real[fresh[w]] = w
        return fresh[w]
    forward = lambda text: word.sub(lambda m: invent(m[0]) if m[0] in names else m[0], text)
    back = lambda text: word.sub(lambda m: real.get(m[0], m[0]), text)
    return forward, back


def renamed(messages, names, rng):
    """messages with every word of the known entity names replaced by a fresh invented word, consistently: a model
    pretrained on the training world must then read a bridge, not recall it."""
    forward, _ = renamer(names, rng)
    return json.loads(forward(json.dumps(messages)))


def renamed_world(qa, retrieve, names, rng):
    """(qa, retrieve) of a world whose names are invented: the question and answer renamed, queries mapped back
    to the real names before retrieval and the documents found renamed forward. RL on recalled facts would
    teach recall; here, as on held-out questions, the answer can only come from what the loop retrieves."""
    forward, back = renamer(names, rng)
    qa = {**qa, "question": forward(qa["question"]), "entity": forward(qa.get("entity", "")),
          "response": forward(qa.get("response", "")), "golden_answers": [forward(a) for a in qa["golden_answers"]]}

    def retrieve_renamed(query, k):
        return [{**d, "title": forward(d["title"]), "text": forward(d["text"])}
                for d in map(doc_dict, retrieve(back(query), k))]
    return qa, retrieve_renamed
