"""Chat over a knowledge base (--kb: a KB directory or a documents .jsonl), cite-then-read (rag.reread), sources listed;
earlier turns stay as text, a pronoun follow-up is retrieved with the question that named its entity. /clear, /quit.

    python chat.py --kb data/world/kb.jsonl -p "Where was Kelmar Odrissi born?"     # one question (no -p: a REPL)
    python chat.py --ckpt out/tiny/ckpt.pt -p "Kelmar Odrissi"                      # pre-trained: continues the text
"""
import argparse
import os
import sys

import torch

import rag
from common import first_line, load_model
from retrieve import load_documents, load_kb, new_retriever


def sources(docs, cites):
    """Each document once, with every number it had in context; * marks those the answer cites."""
    numbers = {}
    for i, d in enumerate(docs, 1):
        numbers.setdefault(d["id"], (d, []))[1].append(i)
    return [f"  {'*' if set(ns) & set(cites) else ' '}{''.join(f'[{n}]' for n in ns)} {i}: {d['title']}"
            for i, (d, ns) in numbers.items()]


def continue_text(model, tok, prompt, max_len, max_new_tokens, temperature):
    """nanoGPT's sample.py, for a pre-trained checkpoint: the prompt and its continuation, up to <|bos|>."""
    ids = [tok.bos_id] + tok.encode(prompt)
    ids = ids[max(0, len(ids) + max_new_tokens - max_len):]
    x = torch.tensor([ids], device=next(model.parameters()).device)
    new = model.generate(x, max_new_tokens, temperature)[0, len(ids):].tolist()
    return prompt + tok.decode(new[:new.index(tok.bos_id)] if tok.bos_id in new else new)


def load_retriever(path, stopwords=""):
    if os.path.isdir(path):
        return load_kb(path)
    if not (os.path.isfile(path) and path.endswith(".jsonl")):
        raise ValueError(f"--kb {path}: not a KB directory or a documents .jsonl file")
    retriever = new_retriever("bm25", stopwords)  # a KB directory may be of any type
    retriever.add_documents(load_documents(path))
    return retriever


def main():
    parser = argparse.ArgumentParser(description="Chat with a checkpoint, grounded in a knowledge base.")
    parser.add_argument("--ckpt", help="a checkpoint of any stage (default: out/rag2/ckpt.pt, else out/rag/ckpt.pt)",
                        default="out/rag2/ckpt.pt" if os.path.exists("out/rag2/ckpt.pt") else "out/rag/ckpt.pt")
    parser.add_argument("--kb", help="KB directory or documents .jsonl; without it, plain chat")
    parser.add_argument("-p", "--prompt", help="answer this one question and exit")
    parser.add_argument("--top_k", type=int, default=4, help="documents retrieved per question / query")
    parser.add_argument("--stopwords", default="", choices=["", "en", "en_plus"], help="BM25's, for a .jsonl --kb")
    parser.add_argument("--hops", type=int, default=0, help="queries the model may write to retrieve more")
    parser.add_argument("--verbose", action="store_true", help="show the first pass, the re-read and every hop")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--max_new_tokens", type=int, default=64)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.top_k < 1 or args.hops < 0 or args.max_new_tokens < 1:
        sys.exit("error: --top_k and --max_new_tokens must be >= 1 and --hops >= 0")
    try:
        model, tok, ckpt = load_model(args.ckpt, args.device)
        base = ckpt.get("stage") == "train"
        retriever = load_retriever(args.kb, args.stopwords) if args.kb and not base else None
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    max_len = (ckpt.get("config") or {}).get("seq_len") or model.config.block_size  # its fine-tuning's context
    if base:
        print(f"note: {args.ckpt} is pre-trained, not fine-tuned for chat (rag_train.py): it continues your text"
              + (", without the KB" if args.kb else ""), file=sys.stderr)
    retrieve = (lambda q, k: [d for d, _ in retriever.retrieve(q, k)]) if retriever else None
    warned, history, topic = False, [], None

    def turn(question):
        nonlocal history, topic, warned
        if base:
            print(continue_text(model, tok, question, max_len, args.max_new_tokens, args.temperature))
            return
        state = {"kind": None}

        def on_token(piece, kind):
            if kind != state["kind"]:
                print("\nquery: " if kind == "query" else "", end="")
                state["kind"] = kind
            print(piece, end="", flush=True)

        def on_retrieve(query, found):
            state["kind"] = None
            print("\n  found: " + ("; ".join(f"{d['id']} ({d['title']})" for d in found) or "nothing"))

        _, out = rag.ask(model, tok, question, history, topic, retrieve, args.top_k, max_hops=args.hops,
                         on_token=on_token if args.verbose else None, on_retrieve=on_retrieve if args.verbose else None,
                         max_len=max_len, max_new_tokens=args.max_new_tokens, temperature=args.temperature)
        if args.verbose:  # else the answer is known only after the re-read
            print()
            if out.get("reread"):
                print(f"read again with [{out['reread']}] alone: {out['answer']}")
        elif out["answer"] is not None:
            print(out["answer"])
        if (out["dropped"]["docs"] or out["dropped"]["turns"]) and not warned:
            print(f"(context limit {max_len} tokens: dropped the lowest-ranked documents / oldest turns to fit)")
            warned = True
        if out["stop"] != "answer":
            why = {"max_hops": f"asked for more than --hops={args.hops} retrievals", "format": "no well-formed answer",
                   "max_tokens": "cut at --max_new_tokens", "context": f"the context limit of {max_len} tokens"}
            print(f"(no complete answer: {why[out['stop']]})")
        if out["docs"]:
            print("sources (* = cited by the answer):")
            print("\n".join(sources(out["docs"], rag.read_answer(out["answer"] or "")[1])))
        if out["stop"] == "answer":
            history = rag.text_only(out["messages"])
        topic = topic if rag.PRONOUN.search(question) else question

    def safe_turn(question):
        try:
            turn(question)
        except KeyboardInterrupt:
            print("\n(interrupted)")
        except Exception as e:  # a chat session outlives a bad turn
            print(f"\nerror: {type(e).__name__}: {first_line(e)}")

    if args.prompt is not None:
        return safe_turn(args.prompt)
    print(f"{args.ckpt} ({ckpt.get('stage', '?')}), {'KB ' + args.kb if retriever else 'no KB'}; /clear, /quit")
    while True:
        try:
            line = input("> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return
        if line in ("/quit", "/exit"):
            return
        if line == "/clear":
            history, topic = [], None
        elif line:
            safe_turn(line)


if __name__ == "__main__":
    main()
