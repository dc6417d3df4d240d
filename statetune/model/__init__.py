"""RWKV-7 and RWKV-6 models with an explicit recurrent state, loaded from official checkpoints."""
