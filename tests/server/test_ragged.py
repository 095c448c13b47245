"""The embedded engine's flat ragged forward (server/engines/hf_ragged.py) against the model's own forward.

Sequences join and leave a running batch at different steps, prefills and decodes share a step, and each
sequence's next-token logits must equal those of the model's own forward over that sequence alone (fp32,
1e-4 relative; greedy tokens equal), on every family the engine serves, with a sliding window that cuts in.
"""

import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config,
                          Qwen2ForCausalLM, Qwen3Config, Qwen3ForCausalLM)

from server.engines.hf_ragged import RaggedForward, check

SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16, max_position_embeddings=512, initializer_range=0.3,
             tie_word_embeddings=False)
FAMILIES = {
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral-window": (MistralConfig, MistralForCausalLM, {"sliding_window": 12}),   # shorter than the prompts
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, {}),
}


@pytest.fixture(params=sorted(FAMILIES))
def model(request):
    cfg_cls, model_cls, extra = FAMILIES[request.param]
    torch.manual_seed(0)
    return model_cls(cfg_cls(**SMALL, **extra)).eval()


def reference(model, prompt: list[int], steps: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy tokens and each step's next-token logits from the model's own forward, the sequence alone."""
    ids, logits = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):
            lg = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
            logits.append(lg)
            ids.append(int(lg.argmax()))
    return ids[len(prompt):], logits


def test_a_running_batch_that_sequences_join_and_leave_equals_each_sequence_alone(model):
    torch.manual_seed(1)
    steps = 6
    prompts = [torch.randint(3, 290, (n,)).tolist() for n in (5, 17, 1, 30, 9, 2, 21)]
    refs = [reference(model, p, steps) for p in prompts]
    rf = RaggedForward(model)
    kvs = [None] * len(prompts)
    got: list[list[int]] = [[] for _ in prompts]
    worst = 0.0
    pending, logits, live = list(range(len(prompts))), {}, []
    with torch.no_grad():
        while pending or live:
            seqs, tokens, who = [], [], []
            for i in live:                                   # 1. each running sequence samples its next token
                j = len(got[i])
                worst = max(worst, float((logits[i] - refs[i][1][j]).norm() / refs[i][1][j].norm()))
                got[i].append(int(logits[i].argmax()))
                if len(got[i]) < steps:
                    seqs.append(kvs[i]); tokens.append([got[i][-1]]); who.append(i)
                else:
                    kvs[i].release()                         # it leaves; its pool row goes to the next one
            for _ in range(2 if pending else 0):             # 2. up to two newcomers join this step
                if pending:
                    i = pending.pop(0)
                    kvs[i] = rf.new_kv()
                    seqs.append(kvs[i]); tokens.append(prompts[i]); who.append(i)
            live = who
            if seqs:
                out = rf.forward(seqs, tokens)               # 3. one forward: prefills and decodes together
                logits = {i: out[b] for b, i in enumerate(who)}
    print(f"\nragged vs alone: max relative error {worst:.2e}")
    assert worst < 1e-4
    assert got == [r[0] for r in refs]
    assert rf.pool.held == 0 and rf.pool.rows <= 8          # rows were recycled, not one per sequence


def test_all_logits_are_the_models_logits_at_every_position(model):
    prompt = list(range(3, 40))
    rf = RaggedForward(model)
    with torch.no_grad():
        full = rf.forward([rf.new_kv()], [prompt], all_logits=True)[0]            # [n, vocab]
        ref = model(input_ids=torch.tensor([prompt])).logits[0].float()
    assert full.shape == ref.shape
    assert float((full - ref).norm() / ref.norm()) < 1e-4


def test_the_pool_grows_past_its_capacity_and_is_dropped_when_idle(model):
    rf = RaggedForward(model)
    a, b = rf.new_kv(), rf.new_kv()
    with torch.no_grad():
        rf.forward([a, b], [[5] * 70, [6] * 3])          # a needs more than one 64-position block
        assert rf.pool.capacity == 128
        rf.forward([a, b], [[7], [8]])
        c = rf.new_kv()
        rf.forward([c], [[9] * 200])                    # a third sequence grows capacity again: a and b are copied
        assert rf.pool.capacity >= 201
        again = rf.forward([a, b], [[7], [8]])          # a and b read the keys they wrote before the growth
        ref = [model(input_ids=torch.tensor([[5] * 70 + [7, 7]])).logits[0, -1],
               model(input_ids=torch.tensor([[6] * 3 + [8, 8]])).logits[0, -1]]
    for got, want in zip(again, ref):
        assert float((got - want).norm() / want.norm()) < 1e-4
    for kv in (a, b, c):
        kv.release()
    rf.pool.trim()
    assert rf.pool.buf is None and rf.pool.held == 0


def test_a_model_of_another_layout_is_refused_with_the_reason():
    from transformers import GPT2Config, GPT2LMHeadModel
    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, bos_token_id=0, eos_token_id=0))
    assert "Llama-style" in check(m)
