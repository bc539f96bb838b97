"""Hugging Face interop: HF configs <-> model configs, the weight-name layouts of Llama, Qwen2 and
InternLM2, safetensors / .bin files one tensor at a time, and whole-model import and export.
"""
