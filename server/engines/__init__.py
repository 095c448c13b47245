"""Engines behind one interface (base.py): the embedded transformers engine (hf.py) and vLLM (vllm.py)."""
