"""The synthetic world: invented people, companies, cities and countries tied by relations, a paragraph per entity
and every 1-, 2- and 3-hop question about them. All that knows the world's schema lives here; prepare.py writes it."""
import itertools
import json
import random
import re
from collections import defaultdict
from dataclasses import replace
from types import SimpleNamespace

import numpy as np

from rag import doc_dict, draw_k, messages_for, raft_docs, search_query, single_hop, target_answer
from tokenizer import render_conversation


def table(text):
    """{key: [item, ...]} from lines "key: item | item | ...", where an indented line goes on with the line above."""
    lines = re.sub(r" \|\n\s+", " | ", text.strip()).splitlines()
    return {key: items.split(" | ") for key, items in (line.split(": ", 1) for line in lines)}


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
            w = "".join(self.rng.choice(ONSETS) + self.rng.choice(VOWELS) + self.rng.choice(CODAS)
                        for _ in range(self.rng.choice((2, 2, 2, 3)))).capitalize() + suffix  # 2 or 3 syllables
            if w not in self.used:
                self.used.add(w)
                return w


class World(SimpleNamespace):
    # split: "train" | "heldout" | ...; names: person ("First Last"), surname, company ("Stem Suffix"), company_stem,
    # city, country. Relations and attributes, int arrays indexed by entity: female, born_year, born_in (person ->
    # city), works_for (-> company), profession (-> PROFESSIONS), founded_by (company -> person), founded_year,
    # hq (-> city), industry (-> INDUSTRIES), located_in (city -> country), population, capital (country -> city).
    # Inverses: founded {person: the company they founded}, cities_of [country -> its cities].
    def kinds(self):
        return tuple((kind, len(getattr(self, kind))) for kind in ("person", "company", "city", "country"))


def make_world(rng, pool, first_names, split, n_people):
    """One self-contained world; relations only point inside it, so two worlds share no facts."""
    n_company, n_city, n_country = max(2, n_people // 8), max(2, n_people // 10), max(2, n_people // 50)
    ri = lambda lo, hi, n: np.array([rng.randrange(lo, hi) for _ in range(n)], dtype=np.int64)
    country = [pool.word(rng.choice(COUNTRY_SUFFIXES)) for _ in range(n_country)]
    city, company_stem, surname = ([pool.word() for _ in range(n)] for n in (n_city, n_company, n_people))
    # the first n_country cities are the capitals, so every country has at least one city
    located_in = np.concatenate([np.arange(n_country), ri(0, n_country, n_city - n_country)])
    born_year = ri(1900, 1986, n_people)
    works_for = ri(0, n_company, n_people)
    founder = np.array(rng.sample(range(n_people), n_company), dtype=np.int64)  # distinct founders
    works_for[founder] = np.arange(n_company)  # founders work for their own company
    cities_of = [np.flatnonzero(located_in == k).tolist() for k in range(n_country)]
    return World(
        split=split, person=[f"{rng.choice(first_names)} {s}" for s in surname], surname=surname,
        company=[f"{s} {rng.choice(COMPANY_SUFFIXES)}" for s in company_stem], company_stem=company_stem,
        city=city, country=country, female=ri(0, 2, n_people), born_year=born_year, born_in=ri(0, n_city, n_people),
        works_for=works_for, profession=ri(0, len(PROFESSIONS), n_people), founded_by=founder,
        founded_year=born_year[founder] + ri(22, 39, n_company), hq=ri(0, n_city, n_company),
        industry=ri(0, len(INDUSTRIES), n_company), located_in=located_in, population=ri(5, 900, n_city) * 1000,
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

TEMPLATES = table("""
born_in: {s} was born in {born_in}. | {s} is a native of {born_in}. | {s} was born in the city of {born_in}. |
    {born_in} is the birthplace of {n}.
born_year: {s} was born in {born_year}. | {s} was born in the year {born_year}. | In {born_year}, {n} was born. |
    The year of birth of {n} is {born_year}.
born: {s} was born in {born_in} in {born_year}. | {s} was born in {born_year} in {born_in}. |
    In {born_year}, {n} was born in {born_in}.
works_for: {s} works for {works_for}. | {s} is employed by {works_for}. | {works_for} employs {n}. |
    {s} is on the staff of {works_for}.
profession: {s} is {a_prof}. | {s} works as {a_prof}. | By profession, {n} is {a_prof}. | {n} is known as {a_prof}.
founded: {s} founded {works_for} in {cyear}. | {s} is the founder of {works_for}. |
    In {cyear}, {n} founded {works_for}.
founded_by: {s} was founded by {founded_by}. | {founded_by} founded {n}. | {s} was started by {founded_by}. |
    The founder of {n} is {founded_by}.
founded_year: {s} was founded in {founded_year}. | {s} was established in {founded_year}. |
    In {founded_year}, {n} was founded. | {n} dates back to {founded_year}.
founded_both: {s} was founded by {founded_by} in {founded_year}. | {founded_by} founded {n} in {founded_year}. |
    In {founded_year}, {founded_by} founded {n}.
hq: {s} is headquartered in {hq}. | {s} has its headquarters in {hq}. | {s} is based in {hq}. |
    The headquarters of {n} are in {hq}.
industry: {s} is {a_ind} company. | {s} operates in the {industry} industry. |
    {n} is active in the {industry} business. | {n} is known for its work in the {industry} sector.
located_in: {s} is a city in {located_in}. | {s} is located in {located_in}. | {s} lies in {located_in}. |
    {n} is one of the cities of {located_in}.
population: {s} has a population of {population}. | About {population} people live in {n}. |
    {s} is home to {population} people. | The population of {n} is {population}.
capital_of: {s} is the capital of {located_in}. | {s} serves as the capital of {located_in}.
capital: The capital of {n} is {capital}. | {s} has its capital in {capital}. | {capital} is the capital of {n}. |
    {s} is governed from its capital, {capital}.
cities: Cities in {n} include {cities}. | {cities} are cities in {n}. | Among the cities of {n} are {cities}.
""")


def render_doc(w, kind, i, rng):
    """(title, paragraph) of entity i: its facts in random order, each phrased at random."""
    name = short = getattr(w, kind)[i]
    pronoun, fields = "It", {rel: a for rel, (a, *_) in single_hops(w, kind, i).items()}
    facts = list(fields)
    if kind == "person":
        short, pronoun, fields["a_prof"] = w.surname[i], ("He", "She")[w.female[i]], article(fields["profession"])
        if i in w.founded:
            fields["cyear"] = int(w.founded_year[w.founded[i]])
            facts.append("founded")
    elif kind == "company":
        short, fields["a_ind"] = w.company_stem[i], article(fields["industry"])
    elif kind == "city" and w.capital[w.located_in[i]] == i:
        facts.append("capital_of")
    elif kind == "country":  # a few of its cities, a different few each time
        cities = rng.sample([w.city[c] for c in w.cities_of[i]], min(4, len(w.cities_of[i])))
        fields["cities"] = ", ".join(cities[:-1]) + " and " + cities[-1]
        facts += ["cities"] if len(cities) > 1 else []
    both = {"person": "born", "company": "founded_both"}.get(kind)  # the first two facts in one sentence
    if both and rng.random() < 0.3:
        facts = [both] + facts[2:]
    sentences = []
    for j, fact in enumerate(rng.sample(facts, len(facts))):
        s, n = (name, name) if j == 0 else (rng.choice((name, short, pronoun)), rng.choice((name, short)))
        sentences.append(rng.choice(TEMPLATES[fact]).format(s=s, n=n, **fields))
    return name, " ".join(sentences)


# -----------------------------------------------------------------------------
# Questions. Every hop of a chain is a single-hop question about one entity, answered by its document.

# the single-hop relations of each kind, each a World array of that name. It points to an entity of the kind
# ANSWER_KIND says, or holds a value, written as VALUES says (str by default: the years).
RELATIONS = {"person": ["born_in", "born_year", "works_for", "profession"],
             "company": ["founded_by", "founded_year", "hq", "industry"], "city": ["located_in", "population"],
             "country": ["capital"]}
ENTITY_KIND = {rel: kind for kind, rels in RELATIONS.items() for rel in rels}  # the kind each relation is about
# the other question types: the relations followed from the asked-about entity
MULTI_HOP = {"birth_country": "born_in located_in", "employer_hq": "works_for hq",
             "employer_founded_year": "works_for founded_year", "employer_hq_country": "works_for hq located_in",
             "birth_country_capital": "born_in located_in capital", "founder_birthplace": "founded_by born_in",
             "founder_born_year": "founded_by born_year", "hq_country": "hq located_in",
             "founder_birth_country": "founded_by born_in located_in"}
ANSWER_KIND = {"born_in": "city", "works_for": "company", "founded_by": "person", "hq": "city",
               "located_in": "country", "capital": "city"}
VALUES = {"profession": PROFESSIONS.__getitem__, "industry": INDUSTRIES.__getitem__, "population": "{:,}".format}
# question type: the answer sentence (the answer format the model learns) | the question's phrasings
QA = table("""
born_in: {e} was born in {a}. | Where was {e} born? | What is the birthplace of {e}? | In which city was {e} born? |
    Which city is {e} from?
born_year: {e} was born in {a}. | When was {e} born? | In what year was {e} born? | What year was {e} born in?
works_for: {e} works for {a}. | Which company does {e} work for? | Who employs {e}? | Where does {e} work?
profession: {e} is {aa}. | What is the profession of {e}? | What does {e} do for a living? |
    What is the occupation of {e}?
birth_country: {e} was born in {a}. | In which country was {e} born? | What country was {e} born in? |
    {e} was born in which country?
employer_hq: The company {e} works for is headquartered in {a}. | Where is the company {e} works for headquartered? |
    In which city is the employer of {e} based? | Where is the employer of {e} headquartered?
employer_founded_year: The company {e} works for was founded in {a}. | When was the company {e} works for founded? |
    In what year was the employer of {e} founded?
employer_hq_country: The company {e} works for is headquartered in {a}. |
    In which country is the company {e} works for headquartered? | Which country is the employer of {e} based in?
birth_country_capital: The capital of the country where {e} was born is {a}. |
    What is the capital of the country where {e} was born? | Which city is the capital of the country {e} was born in?
founded_by: {e} was founded by {a}. | Who founded {e}? | Who is the founder of {e}? | Who started {e}?
founded_year: {e} was founded in {a}. | When was {e} founded? | In what year was {e} founded? |
    When was {e} established?
hq: {e} is headquartered in {a}. | Where is {e} headquartered? | In which city is {e} based? |
    Where are the headquarters of {e}?
industry: {e} is {aa} company. | What industry is {e} in? | In which industry does {e} operate? |
    What business is {e} in?
founder_birthplace: The founder of {e} was born in {a}. | Where was the founder of {e} born? |
    In which city was the founder of {e} born? | What is the birthplace of the person who founded {e}?
founder_born_year: The founder of {e} was born in {a}. | When was the founder of {e} born? |
    In what year was the founder of {e} born?
hq_country: {e} is headquartered in {a}. | In which country is {e} headquartered? | Which country is {e} based in?
founder_birth_country: The founder of {e} was born in {a}. | In which country was the founder of {e} born? |
    What country was the person who founded {e} born in?
located_in: {e} is located in {a}. | In which country is {e}? | Which country is {e} located in? |
    In what country does {e} lie?
population: {e} has a population of {a}. | What is the population of {e}? | How many people live in {e}?
capital: The capital of {e} is {a}. | What is the capital of {e}? | Which city is the capital of {e}?
""")
# the question types about each kind, in QA's order: its relations, then the multi-hop ones
TYPES = {kind: [q for q in QA if ENTITY_KIND[MULTI_HOP.get(q, q).split()[0]] == kind] for kind in RELATIONS}


def phrase(qtype, e, rng):
    return rng.choice(QA[qtype][1:]).format(e=e)


def answer_sentence(qtype, e, a):  # the answer as the model learns to say it
    return QA[qtype][0].format(e=e, a=a, aa=article(a))


def single_hops(w, kind, i):
    """{relation: (answer, doc_id, next entity kind, next entity index)} for entity i; a value's kind is None."""
    d, hops = doc_id(w, kind, i), ((rel, int(getattr(w, rel)[i]), ANSWER_KIND.get(rel)) for rel in RELATIONS[kind])
    return {rel: (getattr(w, to)[j] if to else VALUES.get(rel, str)(j), d, to, j) for rel, j, to in hops}


def shuffled(w, rng, copies=1):
    # every (kind, index, copy) of a world in random order, without materialising millions of tuples
    kinds, sizes = zip(*w.kinds())
    offsets = np.cumsum((0,) + sizes)
    for item in np.random.default_rng(rng.randrange(2**32)).permutation(copies * int(offsets[-1])):
        g, copy = divmod(int(item), copies)
        t = int(np.searchsorted(offsets, g, side="right")) - 1
        yield kinds[t], g - int(offsets[t]), copy


def make_qa(w, rng, pool, first_names, unanswerable_frac=0.1):
    """Every 1-, 2- and 3-hop question of a world, in random order, and some about invented entities (to abstain)."""
    ghost = {"person": lambda: f"{rng.choice(first_names)} {pool.word()}",
             "company": lambda: f"{pool.word()} {rng.choice(COMPANY_SUFFIXES)}",
             "city": lambda: pool.word(), "country": lambda: pool.word(rng.choice(COUNTRY_SUFFIXES))}
    n = itertools.count()
    for kind, i, _ in shuffled(w, rng):
        e, qas = getattr(w, kind)[i], []
        for qtype in TYPES[kind]:
            queries, gold_ids, k, j = [], [], kind, i
            for rel in MULTI_HOP.get(qtype, qtype).split():  # each hop a single-hop question about the bridge entity
                queries.append(phrase(rel, getattr(w, k)[j], rng))
                a, d, k, j = single_hops(w, k, j)[rel]
                gold_ids.append(d)
            qas.append({"question": queries[0] if len(queries) == 1 else phrase(qtype, e, rng), "golden_answers": [a],
                        "gold_ids": gold_ids, "queries": queries, "response": answer_sentence(qtype, e, a),
                        "hops": len(queries), "type": qtype, "entity": e})
            if rng.random() < unanswerable_frac:
                g = ghost[kind]()
                qas.append({"question": phrase(qtype, g, rng), "golden_answers": [], "gold_ids": [], "queries": [],
                            "hops": 0, "type": qtype, "entity": g})
        for q in rng.sample(qas, len(qas)):
            yield {"id": f"{w.split}-qa-{next(n)}", **q, "world": w.split}


def closed_book(w, kind, i, rng):
    e = getattr(w, kind)[i]
    rel, (a, *_) = rng.choice(list(single_hops(w, kind, i).items()))
    return f"Question: {phrase(rel, e, rng)}\nAnswer: {answer_sentence(rel, e, a)}"


def corpus_items(w, rng, val_frac):
    """(is_val, text): each entity's paragraph, and a question on one of its facts with the answer (to *state* it)."""
    for kind, i, is_qa in shuffled(w, rng, copies=2):
        text = closed_book(w, kind, i, rng) if is_qa else ": ".join(render_doc(w, kind, i, rng))
        yield rng.random() < val_frac, text


def reading_items(w, rng, val_frac):
    """(is_val, text): one to three paragraphs of an unseen world, then questions on them answered by copying."""
    n = dict(w.kinds())
    for kind, i, _ in shuffled(w, rng):
        passage = [(kind, i)] + [(k, rng.randrange(n[k])) for k in rng.choices(list(n), k=rng.randint(0, 2))]
        passage = list(dict.fromkeys(passage))
        text = [": ".join(render_doc(w, k, j, rng)) for k, j in rng.sample(passage, len(passage))]
        text += [closed_book(w, k, j, rng) for k, j in rng.sample(passage + [(kind, i)], len(passage) + 1)]
        yield rng.random() < val_frac, "\n".join(text)


# -----------------------------------------------------------------------------
# Renaming: RAG training examples about fresh names, so that answers can only come from reading

def first_names(docs):
    return sorted({d.title.split()[0] for d in docs
                   if d.metadata.get("world") != "heldout" and d.metadata.get("type") == "person"})


def rename_names(qa, docs, rng, first_names):
    """(qa, docs: retrieve.Documents) with the entity, and a name answer, renamed everywhere to fresh names (first
    names from first_names): the model can answer only by reading."""
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
    rename(qa["entity"], ENTITY_KIND.get(qa["type"]))  # None for a multi-hop type: every word is invented
    if qa["type"] in ANSWER_KIND and qa["golden_answers"]:
        rename(qa["golden_answers"][0], ANSWER_KIND[qa["type"]])
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
            **{k: (("it", "it", "its"), (f"that {k}",) * 2 + (f"that {k}'s",)) for k in ("company", "city", "country")}}


def refer_back(question, entity, pronoun):
    """question, entity replaced by pronoun (a PRONOUNS triple): "the profession of Kel Odri" -> "his profession"."""
    subject, obj, possessive = pronoun
    e = re.escape(entity)
    q = re.sub(rf"\bthe (\w+) of {e}\b", rf"{possessive} \1", question)
    q = re.sub(rf"\b(of|employs|by|in) {e}\b", rf"\1 {obj}", q)
    q = re.sub(rf"\b{e}\b", subject, q)
    return q[:1].upper() + q[1:]


# real names, which no world generates: questions about them have no document in the KB; and trivia
REAL = table("""
person: Albert Einstein | Marie Curie | Isaac Newton | Charles Darwin | Ada Lovelace | Nikola Tesla |
    Leonardo da Vinci | William Shakespeare | Jane Austen | Pablo Picasso | Frida Kahlo | Wolfgang Amadeus Mozart |
    Ludwig van Beethoven | Napoleon Bonaparte | Abraham Lincoln | Winston Churchill | Nelson Mandela |
    Mahatma Gandhi | Barack Obama | Angela Merkel | Steve Jobs | Bill Gates | Elon Musk | Oprah Winfrey |
    Taylor Swift | Lionel Messi | Serena Williams | Alan Turing | Galileo Galilei | Sigmund Freud | Vincent van Gogh |
    Agatha Christie
company: Microsoft | Apple | Google | Amazon | Toyota | Volkswagen | Siemens | Samsung | Nestle | IBM | Intel |
    Nokia | Sony | Ikea | Coca-Cola | Boeing | Airbus | Netflix | Shell | Unilever
city: Paris | London | Berlin | Madrid | Rome | Tokyo | New York | Sydney | Cairo | Moscow | Beijing | Mumbai |
    Toronto | Chicago | Istanbul | Lagos | Lima | Vienna | Prague | Dublin | Oslo | Nairobi | Seoul | Bangkok
country: France | Germany | Spain | Italy | Japan | China | India | Brazil | Canada | Mexico | Egypt | Kenya |
    Nigeria | Australia | Argentina | Peru | Norway | Sweden | Poland | Greece | Turkey | Vietnam | Chile | Portugal |
    Ireland | Austria | Thailand | Morocco
trivia: Who wrote Hamlet? | What is the boiling point of water? | How tall is Mount Everest? |
    Who painted the Mona Lisa? | What is the largest ocean on Earth? | How many planets are in the solar system? |
    What is the speed of light? | Who discovered penicillin? | What is the chemical symbol for gold? |
    When did the Second World War end? | What is the longest river in the world? | Who invented the telephone? |
    What language is spoken in Brazil? | How many legs does a spider have? | What is the currency of Japan? |
    When did humans first land on the Moon? | What is the tallest building in the world? |
    Who was the first president of the United States? | What is the square root of 144? |
    Which planet is known as the Red Planet?
""")
TRIVIA = REAL.pop("trivia")


def out_of_world(split, rng):
    """Questions about real entities and trivia, to abstain on; "train" and "heldout" get alternate names."""
    half = int(split == "heldout")
    qas = [{"question": phrase(qtype, name, rng), "golden_answers": [], "type": qtype, "entity": name}
           for kind, names in REAL.items() for name in names[half::2] for qtype in TYPES[kind]]
    return qas + [{"question": q, "golden_answers": [], "type": "trivia"} for q in TRIVIA[half::2]]


# -----------------------------------------------------------------------------
# RAG training conversations about the world (rag_train.py's follow-ups, refrag_train.py's renamed worlds)

def by_entity(qas):
    """{entity: its answerable single-hop questions}, for entities asked about in more than one relation."""
    about = {}
    for q in qas:
        if q["golden_answers"] and single_hop(q) and q.get("type") in ENTITY_KIND and q.get("response"):
            about.setdefault(q["entity"], []).append(q)
    return {e: qs for e, qs in about.items() if len({q["type"] for q in qs}) > 1}


def followup_example(tok, rng, about, search, by_id, k_max, p_no_gold, p_rename, first_names, k_power=0.0):
    """(ids, mask) of a follow-up about an entity of `about` (by_entity's) that refers back with a pronoun, with RAFT
    documents from search(query) -> ranked Documents; the first turn, text only as chat.py keeps it, has no loss."""
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
    """(forward, back): forward swaps each word of `names` in a text for a fixed invented one; back undoes it."""
    fresh, word = defaultdict(NamePool(rng).word), re.compile(r"\b[A-Z][a-z]+\b")
    forward = lambda text: word.sub(lambda m: fresh[m[0]] if m[0] in names else m[0], text)

    def back(text):
        real = {v: k for k, v in fresh.items()}
        return word.sub(lambda m: real.get(m[0], m[0]), text)
    return forward, back


def renamed(messages, names, rng):  # a bridge must then be read, not recalled
    forward, _ = renamer(names, rng)
    return json.loads(forward(json.dumps(messages)))


def renamed_world(qa, retrieve, names, rng):
    """(qa, retrieve) under invented names: queries go back to real names, found documents come out renamed."""
    forward, back = renamer(names, rng)
    qa = {**qa, "question": forward(qa["question"]), "entity": forward(qa.get("entity", "")),
          "response": forward(qa.get("response", "")), "golden_answers": [forward(a) for a in qa["golden_answers"]]}

    def retrieve_renamed(query, k):
        return [{**d, "title": forward(d["title"]), "text": forward(d["text"])}
                for d in map(doc_dict, retrieve(back(query), k))]
    return qa, retrieve_renamed
