"""Builder for a tiny random Llama checkpoint used by the test suite (a helper, not a test).

``build_tiny_llama(path)`` writes a complete Hugging Face folder that loads in milliseconds:

- a ``LlamaConfig`` with 2 layers, hidden size 64, 2 query heads / 1 KV head of head_dim 32
  (vLLM's CPU backend needs head_dim 32 or more), untied embeddings, float32 safetensors;
- a byte-level BPE tokenizer trained in code on a small built-in English corpus (a few hundred
  entries), so any ASCII/Unicode text round-trips through encode/decode; special tokens
  ``<|endoftext|>`` (bos/unk), ``<|im_start|>``, ``<|im_end|>`` (eos) and ``<|pad|>``; a ChatML
  chat template shaped like SmolLM2-Instruct's (default system turn, ``add_generation_prompt``);
- a ``generation_config.json`` whose eos is ``<|im_end|>``.

The weights are random, so answers are gibberish, but the build is deterministic for a given
``seed`` and the model is made *useful for tests*: the initializer is widened
(``initializer_range`` 0.3) so that greedy continuations differ from prompt to prompt and react
to small weight changes, and the ``lm_head`` rows of the special tokens and of the byte tokens
that are not printable ASCII are zeroed. Those tokens then score 0 while the others spread
over several units, so greedy decoding practically never picks them: it produces printable
ASCII text (always valid UTF-8, safe to stream) and does not stop at eos; it runs to
``max_tokens``, even under moderate weight patches.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|pad|>"
SPECIAL_TOKENS = [BOS_TOKEN, IM_START, EOS_TOKEN, PAD_TOKEN]
VOCAB_SIZE = 448  # 256 byte symbols + 4 specials + ~190 merges

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a tiny test assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CORPUS = """\
The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.
You are a helpful assistant. Please answer the question about math, science, history or code.
What is two plus three? Two plus three is five. What is the capital of France? It is Paris.
Explain why the sky is blue: sunlight is scattered by the air, and blue light scatters the most.
Write a short poem about the sea, the wind, the moon and the stars that shine at night.
def add(a, b): return a + b  # a small Python function that adds two numbers together
The model reads the prompt, thinks for a moment, and then writes an answer one token at a time.
Singular values scale the weights of every layer; an expert vector changes how the network
behaves on a task such as reasoning, coding, or answering questions about the world.
Numbers like 1, 2, 3, 10, 42, 100 and 2024 appear in text, as do dates, names and places.
She said: "Hello, world!" and he replied, "Good morning; how are you today?"
Students learn to read and write, to count and measure, and to ask good questions in class.
A server receives requests, schedules them in batches, runs the model and streams the tokens
back to each client until the answer is complete or the length limit is reached.
Water boils at one hundred degrees, ice melts in spring, and trees grow green leaves in summer.
"""


def _train_tokenizer() -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS.splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=BOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )


def _unwanted_ids(tokenizer: PreTrainedTokenizerFast) -> list[int]:
    """Specials, plus byte tokens that do not decode to printable ASCII on their own."""
    printable = set(string.printable) - set("\r\x0b\x0c")
    return [
        i
        for i in range(len(tokenizer))
        if tokenizer.convert_ids_to_tokens(i) in SPECIAL_TOKENS
        or not set(tokenizer.decode([i])) <= printable
    ]


def build_tiny_llama(path: Path, seed: int = 0, max_position_embeddings: int = 512) -> Path:
    """Write the tiny model, tokenizer and generation config into ``path``; return ``path``."""
    path = Path(path)
    tokenizer = _train_tokenizer()
    eos_id, bos_id, pad_id = tokenizer.convert_tokens_to_ids([EOS_TOKEN, BOS_TOKEN, PAD_TOKEN])
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=max_position_embeddings,
        initializer_range=0.3,
        tie_word_embeddings=False,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32).eval()
    with torch.no_grad():  # unwanted tokens score 0 while real logits spread widely around it
        model.lm_head.weight[_unwanted_ids(tokenizer)] = 0.0
    model.generation_config = GenerationConfig(
        bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id
    )
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    # Name a class every transformers release knows (v5 writes its new "TokenizersBackend").
    tokenizer_config_path = path / "tokenizer_config.json"
    tokenizer_config = json.loads(tokenizer_config_path.read_text())
    tokenizer_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tokenizer_config_path.write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return path
