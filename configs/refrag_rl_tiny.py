# RL on top of the warm start of `python refrag_train.py` (out/refrag_sft -> out/refrag), sized for 2 CPU cores: ~22
# minutes of training and ~3 of evaluation; the rest of the recipe is refrag_train.py's defaults.
# python refrag_train.py configs/refrag_rl_tiny.py
phase = "rl"
