"""Tests for rag.py, rag_train.py and chat.py. Run: python test_part_rag.py (or pytest test_part_rag.py)."""
import dataclasses
import functools
import json
import os
import random
import subprocess
import sys
import tempfile
from types import SimpleNamespace

import torch

import rag
from common import save_checkpoint
from model import GPT, GPTConfig
from prepare import ABSTAIN, Tokenizer, prepare_world, render_conversation

HERE = os.path.dirname(os.path.abspath(__file__))
TMP = tempfile.TemporaryDirectory()


@functools.cache
def world():
    """A tiny prepared world (shared by the tests): its directory, tokenizer, documents by id, QA records."""
    out = os.path.join(TMP.name, "world")
    prepare_world(out, seed=7, world_size=20, heldout_frac=0.5, n_renderings=2, vocab_size=600, val_frac=0.1)
    tok = Tokenizer.load(os.path.join(out, "tokenizer.json"))
    docs = {d["id"]: d for d in map(json.loads, open(os.path.join(out, "kb.jsonl")))}
    qa = [json.loads(l) for l in open(os.path.join(out, "qa_train.jsonl"))]
    return out, tok, docs, qa


def checkpoint(pattern, path, **model):
    _, tok, _, _ = world()
    cfg = GPTConfig(**{**dict(n_layer=2, n_embd=32, n_head=2, n_kv_head=1, block_size=64, vocab_size=tok.vocab_size,
                              block_pattern=pattern), **model})
    torch.manual_seed(0)
    save_checkpoint(path, {"model": GPT(cfg).state_dict(), "model_args": dataclasses.asdict(cfg), "step": 0,
                           "optimizer": [], "config": {}, "tokenizer": tok.to_json(), "val_loss": 0.0, "stage": "train"})
    return path


def rag_train(*args):
    return subprocess.run([sys.executable, os.path.join(HERE, "rag_train.py"), *args], capture_output=True, text=True,
                          cwd=HERE, timeout=300)


# -----------------------------------------------------------------------------
# conversations and RAFT examples

def test_rag_example_rendering_and_mask():
    _, tok, docs, qa = world()
    q = next(q for q in qa if q["hops"] == 1)
    gold = docs[q["gold_ids"][0]]
    distractors = [d for i, d in docs.items() if i != gold["id"]][:5]
    picked = rag.raft_docs(q, distractors, docs, random.Random(3), 3, p_no_gold=0.0)
    assert len(picked) == 3 and gold in picked
    pos = picked.index(gold) + 1
    ids, mask = rag.render_example(tok, q, picked)
    text = tok.decode(ids)
    assert text.startswith("<|bos|><|user_start|>" + q["question"] + "<|user_end|><|doc_start|>[1] ")
    assert f"<|doc_start|>[{pos}] {gold['title']}: {gold['text']}<|doc_end|>" in text and "[4]" not in text
    answer = tok.decode([t for t, m in zip(ids, mask) if m])
    assert answer == f"<|assistant_start|>{rag.target_answer(q, picked)}<|assistant_end|>"
    assert answer.endswith(f" [{pos}].<|assistant_end|>") and q["answer"] in answer
    assert ids[-len(tok.encode(answer)) - 10:] and mask.index(1) == len(ids) - mask.count(1)  # mask is one final span
    # closed-book: no documents, no citation
    ids, mask = rag.render_example(tok, q)
    assert "<|doc_start|>" not in tok.decode(ids) and not tok.decode(ids).endswith("].<|assistant_end|>")


def test_raft_gold_position_varies_and_abstains_without_gold():
    _, _, docs, qa = world()
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

QA = {"question": "Where was Kel Odri born?", "answer": "Velnor", "type": "born_in", "entity": "Kel Odri",
      "gold_ids": ["d1"], "hops": 1}
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
    prof = {**QA, "type": "profession", "answer": "engineer"}
    assert rag.read_answer("Kel Odri is an engineer [1].", prof)[0] == "an engineer"


def test_score_hand_made_cases():
    docs = [D0, D1, D2]
    right = rag.score(QA, "Kel Odri was born in Velnor [2].", docs)
    assert right == {"em": 1.0, "f1": 1.0, "abstained": 0.0, "hallucinated": 0.0, "citation_ok": 1.0, "citation_gold": 1.0}
    cites_city_doc = rag.score(QA, "Kel Odri was born in Velnor [3].", docs)  # holds the answer, but is not gold
    assert cites_city_doc["citation_ok"] == 1.0 and cites_city_doc["citation_gold"] == 0.0
    wrong_cite = rag.score(QA, "Kel Odri was born in Velnor [1].", docs)
    assert wrong_cite["em"] == 1.0 and wrong_cite["citation_ok"] == 0.0
    assert rag.score(QA, "Kel Odri was born in Velnor [9].", docs)["citation_ok"] == 0.0  # out of range
    assert rag.score(QA, "Kel Odri was born in Velnor.", docs)["citation_ok"] == 0.0       # no citation
    wrong = rag.score(QA, "Kel Odri was born in Durn [1].", docs)
    assert wrong["em"] == 0.0 and wrong["f1"] == 0.0 and wrong["hallucinated"] == 1.0
    partial = rag.score(QA, "Kel Odri was born in Velnor City [2].", docs)
    assert partial["em"] == 0.0 and abs(partial["f1"] - 2 / 3) < 1e-9 and partial["hallucinated"] == 1.0
    timid = rag.score(QA, ABSTAIN, docs)  # the answer was there
    assert timid["abstained"] == 1.0 and timid["em"] == 0.0 and timid["hallucinated"] == 0.0 and "citation_ok" not in timid
    # gold document absent: abstaining is right, any definite answer (even the true one) is a hallucination
    assert rag.score(QA, ABSTAIN, [D0, D2]) == {"em": 1.0, "f1": 1.0, "abstained": 1.0, "hallucinated": 0.0}
    lucky = rag.score(QA, "Kel Odri was born in Velnor [2].", [D0, D2])
    assert lucky["hallucinated"] == 1.0 and lucky["em"] == 0.0
    # closed-book: no citations expected; no answer at all counts as a wrong definite answer
    assert rag.score(QA, "Kel Odri was born in Velnor.", None) == {"em": 1.0, "f1": 1.0, "abstained": 0.0, "hallucinated": 0.0}
    assert rag.score(QA, None, None)["hallucinated"] == 1.0
    s = rag.summarize([right, timid, lucky])
    assert s["n"] == 3 and abs(s["em"] - 1 / 3) < 1e-9 and s["citation_ok"] == 1.0 and abs(s["hallucinated"] - 1 / 3) < 1e-9


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
    s = tok.special
    return ([s("<|query_start|>")] + tok.encode(query) + [s("<|query_end|>")] +
            [s("<|assistant_start|>")] + tok.encode(answer) + [s("<|assistant_end|>")])


def test_multi_hop_loop_retrieves_appends_and_answers():
    _, tok, _, _ = world()
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
    _, tok, _, _ = world()
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
    _, tok, _, _ = world()
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
    data, *_ = world()
    ckpt = checkpoint("T", os.path.join(TMP.name, "t.pt"))
    r = rag_train(f"--init_from={ckpt}", f"--data_dir={data}", f"--out_dir={TMP.name}/t_rag")
    assert r.returncode == 1 and r.stderr.count("\n") == 1
    assert "pure Transformer" in r.stderr and "--allow_transformer=True" in r.stderr
    assert not os.path.exists(f"{TMP.name}/t_rag/ckpt.pt")


TINY = ["--seq_len=256", "--total_batch_size=1024", "--device_batch_size=2", "--max_iters=2", "--eval_interval=2",
        "--k_max=3", "--eval_n=1", "--eval_ks=1", "--warmup_iters=1"]


def test_dynamic_and_static_data_modes_train_identically():
    data, tok, docs, qa = world()
    ckpt = checkpoint("TM", os.path.join(TMP.name, "tm.pt"))
    outs = {}
    for mode in ("dynamic", "static"):
        r = rag_train(f"--init_from={ckpt}", f"--data_dir={data}", f"--out_dir={TMP.name}/{mode}", f"--data_mode={mode}", *TINY)
        assert r.returncode == 0, r.stderr[-2000:]
        outs[mode] = torch.load(f"{TMP.name}/{mode}/ckpt.pt", weights_only=True)
        res = json.load(open(f"{TMP.name}/{mode}/eval.json"))
        assert res["rag"]["n"] == 1 and set(res["vs_k"]) == {"1"}
    static = [json.loads(l) for l in open(os.path.join(data, "retrieved_bm25_top16.jsonl"))]
    rag_world_qa = [json.loads(l) for l in open(os.path.join(data, "qa_rag.jsonl"))]
    assert len(static) == sum(q["hops"] <= 1 for q in rag_world_qa)  # RAG examples come from the RAG world
    assert all(not i.startswith("heldout") for r in static for i in r["retrieved"])  # the held-out world stays unseen
    assert outs["static"]["stage"] == "rag" and outs["static"]["step"] == 2
    a, b = outs["dynamic"]["model"], outs["static"]["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same batches, so the same weights
    base = torch.load(ckpt, weights_only=True)["model"]
    assert not all(torch.equal(a[k], base[k]) for k in a)  # and it did train


def test_rename_entity_hides_the_name_everywhere():
    _, tok, docs, qa = world()
    q = next(q for q in qa if q["hops"] == 1 and q["gold_ids"][0].startswith("train-person"))
    gold = docs[q["gold_ids"][0]]
    words = sorted({w for d in docs.values() for w in d["title"].split()})
    q2, (g2,) = rag.rename_entity(q, [gold], random.Random(0), words)
    surname = q["entity"].split()[-1]
    assert surname not in q2["question"] + g2["title"] + g2["text"] and q2["entity"] in q2["question"]
    assert q2["answer"] == q["answer"] and q2["entity"] in g2["title"] and q["answer"] in g2["text"]
    assert rag.score(q2, rag.target_answer(q2, [g2]), [g2])["em"] == 1.0


def test_tiny_finetune_beats_chance():
    """End to end on the tiny world: RAFT conversations -> a few seconds of fine-tuning a random tiny hybrid ->
    held-out conversations. Accuracy here is teacher-forced next-token accuracy on what the assistant says: it must
    beat chance (always the most frequent answer token) and the untrained model. (Exact match needs far more
    training than a unit test has: see rag_train.py's evaluation.)"""
    data, tok, docs, qa = world()
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


if __name__ == "__main__":
    import time
    for name, fn in list(globals().items()):
        if name.startswith("test_") and callable(fn):
            t0 = time.time()
            fn()
            print(f"{name}: ok ({time.time() - t0:.1f}s)")
