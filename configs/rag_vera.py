# RAG fine-tune on a real dictionary (V.E.R.A., dev/vera.py), from a hybrid pretrained on the rest of it:
#   python dev/vera.py --out=data/vera
#   python prepare.py --input=data/vera/pretrain.jsonl --out=data/vera_text --vocab_size=2048
#   python train.py --data_dir=data/vera_text --out_dir=out/vera --max_iters=2000   # copying emerges after ~500 steps
#   python rag_train.py configs/rag_vera.py
data_dir = "data/vera"
init_from = "out/vera/ckpt.pt"
out_dir = "out/vera_rag"
stopwords = "en_plus"          # questions are made of "what", "does", "is": without this BM25 ranks them first
max_iters = 800
