"""experts: the Transformer² library (SVD factors, expert z-vectors, mixing, patching, dispatch).

Depends on torch and safetensors only; never imports the server. Both engines and the CLI build on it.
"""
