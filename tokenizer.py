"""The BPE tokenizer, its special tokens delimiting turns and documents, and conversations as token ids + loss mask."""
import base64
import json
import os

import rustbpe
import tiktoken

# -----------------------------------------------------------------------------
# Tokenizer: rustbpe learns the merges, tiktoken encodes with them

SPECIAL_TOKENS = ["<|bos|>", "<|user_start|>", "<|user_end|>", "<|assistant_start|>", "<|assistant_end|>",
                  "<|doc_start|>", "<|doc_end|>", "<|query_start|>", "<|query_end|>"]
# GPT-4's split pattern with numbers in chunks of 1-2 digits (as nanochat): years become two tokens
# from a set of 100 instead of eating vocabulary with 1000 three-digit chunks
SPLIT_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""


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
        if vocab_size < 256 + len(SPECIAL_TOKENS):  # the 256 bytes and the special tokens
            raise ValueError(f"vocab_size={vocab_size} is too small: need at least {256 + len(SPECIAL_TOKENS)}")
        bpe = rustbpe.Tokenizer()
        bpe.train_from_iterator(iter(texts), vocab_size - len(SPECIAL_TOKENS), pattern=SPLIT_PATTERN)
        ranks = sorted(bpe.get_mergeable_ranks(), key=lambda br: br[1])  # ranks are 0..n-1
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


ABSTAIN = "The documents do not contain the answer."  # what the model says when no document holds the answer

# -----------------------------------------------------------------------------
# Conversations -> token ids + loss mask (1 on what the model must produce: queries and answers)

ROLES = {"user": ("user", 0), "documents": ("doc", 0), "query": ("query", 1), "assistant": ("assistant", 1)}


def render_conversation(tok, messages, max_len=None):
    ids, mask, n_docs = [tok.bos_id], [0], 0
    for i, msg in enumerate(messages):
        role, content = msg.get("role"), msg.get("content")
        if role not in ROLES:
            raise ValueError(f"message {i}: unknown role {role!r} (expected user, documents, query or assistant)")
        name, m = ROLES[role]
        if role == "documents":  # numbered across the whole conversation, so a citation [k] is unambiguous
            texts = [f"[{n_docs + j}] {doc['title']}: {doc['text']}" for j, doc in enumerate(content, 1)]
            n_docs += len(texts)
        else:
            # a leading space, as SentencePiece's dummy prefix: a name that opens the answer then has the tokens it
            # has in the question and the documents, so answering is copying (without it, held-out answers failed)
            texts = [" " + content]
        for text in texts:
            part = [tok.special(f"<|{name}_start|>")] + tok.encode(text) + [tok.special(f"<|{name}_end|>")]
            ids += part
            mask += [m] * len(part)
    return ids[:max_len], mask[:max_len]
