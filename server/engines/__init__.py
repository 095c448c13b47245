"""Engines behind one interface (base.py): the embedded transformers engine (hf.py) and vLLM (vllm.py).

What both share lives in common.py, scheduler.py and admission.py; factory.py builds an engine from a typed
`EngineConfig` (made from ServerConfig) with `make_engine`, after `check_startup` has checked its files.
"""
