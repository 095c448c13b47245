"""The embedded engine on the model families it promises (Llama, Mistral, Qwen2): load, patch, generate."""

import asyncio
import shutil

import pytest
import torch
from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from experts.expert import random_expert
from experts.mix import BASE, Adaptation
from experts.svd import model_fingerprint, model_ranks
from server.engines.base import GenerateRequest, SamplingParams
from server.engines.hf import HFEngine

FAMILIES = {"mistral": (MistralConfig, MistralForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}


@pytest.fixture(scope="module", params=sorted(FAMILIES) + ["llama"])
def family_dir(request, tiny_model_dir, tmp_path_factory):
    if request.param == "llama":
        return tiny_model_dir
    out = tmp_path_factory.mktemp(request.param) / f"tiny-{request.param}"
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    cfg_cls, model_cls = FAMILIES[request.param]
    cfg = cfg_cls(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=1, head_dim=32, max_position_embeddings=256,
                  initializer_range=0.3, tie_word_embeddings=False, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model_cls(cfg).save_pretrained(out)
    for f in tiny_model_dir.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, out / f.name)
    return out


def test_engine_loads_patches_and_generates(family_dir, tmp_path):
    ranks, fp = model_ranks(family_dir), model_fingerprint(family_dir)
    random_expert("e", ranks, 0.5, 1, label="math", base_fingerprint=fp).save(tmp_path / "experts" / "e.safetensors")
    eng = HFEngine(family_dir, experts_dir=tmp_path / "experts", cache_dir=tmp_path / "cache")

    async def main():
        await eng.start()
        try:
            text = eng.tokenizer.apply_chat_template([{"role": "user", "content": "hello there"}],
                                                     add_generation_prompt=True, tokenize=False)
            ids = eng.tokenizer(text, add_special_tokens=False)["input_ids"]
            out = {}
            for name, a in (("base", BASE), ("e", Adaptation.of({"e": 1})), ("base2", BASE)):
                req = GenerateRequest(name, ids, SamplingParams(max_tokens=8, temperature=0), a)
                out[name] = [c.token_ids async for c in eng.generate(req)]
            return out
        finally:
            await eng.stop()

    out = asyncio.run(main())
    assert len(eng.patcher.matrices) == 6
    assert sum(len(t) for t in out["base"]) == 8
    assert out["e"] != out["base"] and out["base2"] == out["base"]
