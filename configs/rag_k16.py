# A stage that reads up to 16 documents, after a RAG stage at k <= 4 (its checkpoint in init_from):
#   python rag_train.py configs/rag_k16.py --init_from=out/rag/ckpt.pt --out_dir=out/rag_k16
# k is drawn with P(k) ~ 1/k, so every k gets the same share of tokens and the one-document examples that teach
# reading are not crowded out by the long ones.
init_from = "out/rag/ckpt.pt"
out_dir = "out/rag_k16"
k_max = 16
k_power = 1.0
retrieve_depth = 32            # more than k_max: k documents without the gold one are k distractors
seq_len = 2048                 # a k = 16 example is ~900 tokens on the world
device_batch_size = 2
learning_rate = 3e-3
max_iters = 1200
eval_ks = "1,2,4,8,16,32"
