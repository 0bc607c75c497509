"""
Chat with a checkpoint, optionally grounded in a knowledge base: it retrieves documents for every question,
streams the answer, and lists the sources under it. An answer that cites one of several documents is checked by
asking again with that document alone (rag.reread; --no-reread turns it off).

    python chat.py --kb data/world/kb.jsonl -p "Where was Kelmar Odrissi born?"     # one question
    python chat.py --kb kb/ --top_k 4                                               # a conversation (REPL)
    python chat.py --ckpt out/refrag/ckpt.pt --kb data/world/kb.jsonl --hops 3 --top_k 1 \
        -p "In which country was the founder of X born?"                            # multi-hop (refrag_train.py)
    python chat.py --ckpt out/tiny/ckpt.pt                                          # plain chat, no documents

--kb is a KB directory from retrieve.py (its own retriever) or a documents .jsonl (indexed now with --retriever).
In the REPL, /clear forgets the conversation and /quit (or Ctrl-D) leaves.
"""
import argparse
import os
import sys

import torch

import rag
from common import load_checkpoint
from model import GPT
from prepare import Tokenizer
from retrieve import RETRIEVERS, load_documents, load_kb


def load_model(path, device):
    ckpt = load_checkpoint(path, device)
    if "tokenizer" not in ckpt:
        raise ValueError(f"checkpoint {path} has no tokenizer: not written by train.py / rag_train.py")
    try:
        model = GPT.from_checkpoint(ckpt).to(device).eval()
    except (ValueError, RuntimeError, TypeError) as e:
        raise ValueError(f"checkpoint {path} does not fit this model.py ({str(e).splitlines()[0][:160]})") from None
    tok = Tokenizer.from_json(ckpt["tokenizer"])
    if tok.vocab_size != model.config.vocab_size:
        raise ValueError(f"checkpoint {path}: tokenizer has {tok.vocab_size} tokens, the model {model.config.vocab_size}")
    max_len = (ckpt.get("config") or {}).get("seq_len") or model.config.block_size
    return model, tok, max_len, ckpt.get("stage", "?")


def load_retriever(path, kind):
    if os.path.isdir(path):
        return load_kb(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--kb {path}: no such KB directory or documents file")
    if not path.endswith(".jsonl"):
        raise ValueError(f"--kb {path}: expected a KB directory or a .jsonl of documents")
    retriever = RETRIEVERS[kind]()
    retriever.add_documents(load_documents(path))
    return retriever


def main():
    parser = argparse.ArgumentParser(description="Chat with a checkpoint, grounded in a knowledge base.")
    parser.add_argument("--ckpt", help="train.py / rag_train.py / refrag_train.py checkpoint (default: the newest "
                        "RAG model run_pipeline.sh makes, out/rag2/ckpt.pt, else out/rag/ckpt.pt)")
    parser.add_argument("--kb", help="KB directory or documents .jsonl; without it, plain chat")
    parser.add_argument("-p", "--prompt", help="answer this one question and exit")
    parser.add_argument("--top_k", type=int, default=4, help="documents retrieved per question / query")
    parser.add_argument("--retriever", default="bm25", choices=list(RETRIEVERS), help="index for a .jsonl --kb")
    parser.add_argument("--hops", type=int, default=0, help="queries the model may write to retrieve more")
    parser.add_argument("--reread", action=argparse.BooleanOptionalAction, default=True,
                        help="single-shot RAG: ask again with the one document the answer cites (rag.reread)")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    args.ckpt = args.ckpt or ("out/rag2/ckpt.pt" if os.path.exists("out/rag2/ckpt.pt") else "out/rag/ckpt.pt")
    if args.top_k < 1 or args.hops < 0:
        sys.exit("error: --top_k must be >= 1 and --hops >= 0")
    try:
        model, tok, max_len, stage = load_model(args.ckpt, args.device)
        retriever = load_retriever(args.kb, args.retriever) if args.kb else None
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    if retriever is not None and stage == "train":
        print(f"note: {args.ckpt} is a pre-trained checkpoint, not fine-tuned for RAG (rag_train.py)", file=sys.stderr)
    retrieve = (lambda q, k: [d for d, _ in retriever.retrieve(q, k)]) if retriever else None
    warned = False
    history = []

    def turn(question):
        nonlocal history, warned
        docs = retrieve(question, args.top_k) if retrieve else None
        state = {"kind": None}

        def on_token(piece, kind):
            if kind != state["kind"]:
                print("\nquery: " if kind == "query" else "", end="")
                state["kind"] = kind
            print(piece, end="", flush=True)

        def on_retrieve(query, found):
            state["kind"] = None
            print("\n  found: " + ("; ".join(f"{d['id']} ({d['title']})" for d in found) or "nothing"))

        out = rag.generate(model, tok, history + rag.messages_for(question, docs), retrieve=retrieve,
                           top_k=args.top_k, max_hops=args.hops, max_len=max_len, max_new_tokens=args.max_new_tokens,
                           temperature=args.temperature, on_token=on_token, on_retrieve=on_retrieve)
        print()
        if args.reread:
            first = out["answer"]
            out = rag.reread(model, tok, out, max_len=max_len, max_new_tokens=args.max_new_tokens,
                             temperature=args.temperature)
            if out.get("reread") and out["answer"] != first:
                print(f"read again with [{out['reread']}] alone: {out['answer']}")
        if (out["dropped"]["docs"] or out["dropped"]["turns"]) and not warned:
            print(f"(context limit {max_len} tokens: dropped the lowest-ranked documents / oldest turns to fit)")
            warned = True
        if out["stop"] != "answer":
            why = {"max_hops": f"it asked for more than --hops={args.hops} retrievals",
                   "format": "the model produced no well-formed answer", "max_tokens": "the answer was cut at --max_new_tokens",
                   "context": f"the context limit of {max_len} tokens was reached"}[out["stop"]]
            print(f"(no complete answer: {why})")
        if out["docs"]:
            _, cites = rag.read_answer(out["answer"] or "")
            print("sources:")
            for i, d in enumerate(out["docs"], 1):
                print(f"  {'*' if i in cites else ' '}[{i}] {d['id']}: {d['title']}")
        history = out["messages"] if out["stop"] == "answer" else []

    def safe_turn(question):
        try:
            turn(question)
        except KeyboardInterrupt:
            print("\n(interrupted)")
        except Exception as e:  # a chat session outlives a bad turn
            print(f"\nerror: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")

    if args.prompt is not None:
        safe_turn(args.prompt)
        return
    print(f"{args.ckpt} ({stage}), {'KB ' + args.kb if args.kb else 'no KB'}; /clear, /quit")
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line in ("/quit", "/exit"):
            return
        if line == "/clear":
            history = []
            continue
        if line:
            safe_turn(line)


if __name__ == "__main__":
    main()
