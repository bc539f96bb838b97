"""The reward model: the decoder (Llama / Qwen2 / InternLM2 math) with its reward and LM heads,
the attention kernels (XLA, splash on TPU, cuDNN on GPU, a C++ flash kernel on CPU) and matmuls.

Depends on config and sharding only: the model never sees strings, files or training state.
"""
