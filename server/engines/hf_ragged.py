"""The embedded engine's forward: one flat ragged batch over a transformers model's own modules.

Contract:
- `RaggedForward(model)` runs a Llama-family decoder (Llama, Mistral, Qwen2, Qwen3: pre-norm blocks of
  `self_attn` with q/k/v/o projections and an `mlp`, rotary positions) on a flat batch: the tokens of every
  sequence of a step side by side, `[T, hidden]`, whatever each sequence's length or phase. A newcomer's
  whole prompt (prefill) and a running sequence's one new token (decode) go through the same forward, so a
  step never pads its linears, never runs a separate prefill, and never copies a cache to merge batches.
- It calls the model's modules (embeddings, norms, projections, MLPs, rotary embedding, lm_head), so the
  ModelPatcher's weights and the factored layers (server/engines/hf_factored.py) apply unchanged: the
  factored path reads one gain row per *token* (`StepPath.factored(idx [T])`).
- Keys and values live in one pool `[layers, rows, 2, kv_heads, capacity, head_dim]` (`KVPool`); a sequence
  (`KV`) owns one row from `new_kv()` until `release()` (also on garbage collection) and writes in place.
  The pool grows by doubling (rows, and capacity in 64-token steps; a growth copies it once) and is
  dropped when no sequence holds a row (`trim`).
- Attention, SDPA in both cases: the step's decode tokens all at once (one call per layer over the pool's
  rows, each row masked to its own length; the heads sharing a KV head are that head's query rows, GQA
  without repeating K/V); each prefill on its own (causal). The layer's sliding window where the model has one.
- `forward(seqs, tokens)` appends `tokens[i]` to `seqs[i]` and returns the fp32 logits of each sequence's
  last new token `[B, vocab]`; `all_logits=True` returns every new token's logits instead (prompt
  log-probabilities), as a list of `[n_i, vocab]`.
- `check(model)` says why a model cannot run this way (None: it can); the engine refuses it at load.
Exactness: the model's own operations (SDPA attention), so fp32 logits agree with `model(...)` to rounding
(tests/server/test_ragged.py: within 1e-4 relative, greedy tokens equal).
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

_BLOCK = 64     # pool capacity grows in multiples of this many positions


def check(model: torch.nn.Module) -> str | None:
    """None if `model` has the layout this forward runs, else the reason it has not."""
    inner = getattr(model, "model", None)
    need = ("embed_tokens", "layers", "norm", "rotary_emb")
    if inner is None or not all(hasattr(inner, k) for k in need):
        return "no Llama-style decoder (model.model.{embed_tokens, layers, norm, rotary_emb})"
    for layer in inner.layers:
        attn = getattr(layer, "self_attn", None)
        if attn is None or not all(hasattr(attn, k) for k in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim")):
            return "a decoder layer without q/k/v/o projections"
        if not all(hasattr(layer, k) for k in ("input_layernorm", "post_attention_layernorm", "mlp")):
            return "a decoder layer that is not pre-norm attention + MLP"
    scaling = getattr(model.config, "rope_scaling", None) or {}
    if "dynamic" in str(scaling.get("rope_type", scaling.get("type", ""))):
        return "dynamic rotary scaling (depends on the batch's longest sequence)"
    return None


class KVPool:
    """Every live sequence's keys and values, one row each: buf [layers, rows, 2, kv_heads, capacity, d]."""

    def __init__(self, n_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
        self.shape = (n_layers, kv_heads, head_dim)
        self.dtype, self.device = dtype, device
        self.buf: torch.Tensor | None = None
        self.free: list[int] = []
        self.held = 0

    @property
    def rows(self) -> int:
        return 0 if self.buf is None else self.buf.shape[1]

    @property
    def capacity(self) -> int:
        return 0 if self.buf is None else self.buf.shape[4]

    def acquire(self) -> int:
        if not self.free:
            self._grow(max(4, 2 * self.rows), max(self.capacity, _BLOCK))
        self.held += 1
        return self.free.pop()

    def release(self, row: int) -> None:
        self.free.append(row)
        self.held -= 1

    def reserve(self, positions: int) -> None:
        """Room for `positions` positions in every row."""
        if positions > self.capacity:
            cap = -(-max(positions, 2 * self.capacity) // _BLOCK) * _BLOCK
            self._grow(self.rows, cap)

    def trim(self) -> None:
        """Drop the buffer when no sequence holds a row (a long request's capacity is not kept forever)."""
        if self.held == 0:
            self.buf, self.free = None, []

    def _grow(self, rows: int, cap: int) -> None:
        L, h, d = self.shape
        # zeros, not empty: a masked key still enters SDPA's products, and uninitialised memory may hold NaN
        buf = torch.zeros((L, rows, 2, h, cap, d), dtype=self.dtype, device=self.device)
        if self.buf is not None:
            r0, c0 = self.rows, self.capacity
            buf[:, :r0, :, :, :c0].copy_(self.buf)
        self.free += list(range(rows - 1, self.rows - 1, -1))     # new rows, lowest handed out first
        self.buf = buf


class KV:
    """One sequence's row of the pool and how many of its positions are filled."""

    def __init__(self, pool: KVPool):
        self.pool, self.row, self.length = pool, pool.acquire(), 0

    def release(self) -> None:
        if self.row is not None:
            self.pool.release(self.row)
            self.row = None

    def __del__(self) -> None:
        self.release()


class RaggedForward:
    def __init__(self, model: torch.nn.Module):
        why = check(model)
        assert why is None, why
        self.model, self.inner = model, model.model
        self.layers = list(self.inner.layers)
        cfg = model.config
        self.head_dim = int(self.layers[0].self_attn.head_dim)
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = int(getattr(cfg, "num_key_value_heads", None) or self.heads)
        p = next(model.parameters())
        self.device = p.device
        self.pool = KVPool(len(self.layers), self.kv_heads, self.head_dim, p.dtype, p.device)
        mistral_window = getattr(cfg, "sliding_window", None) if cfg.model_type == "mistral" else None
        self.windows = [getattr(l.self_attn, "sliding_window", mistral_window) for l in self.layers]
        self.scaling = [float(getattr(l.self_attn, "scaling", self.head_dim ** -0.5)) for l in self.layers]

    def new_kv(self) -> KV:
        return KV(self.pool)

    def forward(self, seqs: Sequence[KV], tokens: Sequence[Sequence[int]], all_logits: bool = False):
        """Append tokens[i] to seqs[i]; logits of the last new token per sequence [B, vocab] fp32 (or, with
        all_logits, a list of [n_i, vocab]). 1. the flat batch; 2. the decode tokens' attention masks;
        3. the layers; 4. the lm_head."""
        dev, hd = self.device, self.head_dim
        # 1. the flat batch: sequence i owns tokens [starts[i], starts[i] + n_i)
        lens = [len(t) for t in tokens]
        starts = [0]
        for n in lens[:-1]:
            starts.append(starts[-1] + n)
        T = sum(lens)
        ids = torch.tensor([t for ts in tokens for t in ts], dtype=torch.long, device=dev)          # [T]
        positions = torch.tensor([p for s, n in zip(seqs, lens) for p in range(s.length, s.length + n)],
                                 dtype=torch.long, device=dev)                                      # [T]
        self.pool.reserve(max(s.length + n for s, n in zip(seqs, lens)))
        buf = self.pool.buf
        x = self.inner.embed_tokens(ids)                                                            # [T, hidden]
        cos, sin = self.inner.rotary_emb(x, positions[None])                                        # [1, T, d] each
        cos, sin = cos[0, :, None, :].to(x.dtype), sin[0, :, None, :].to(x.dtype)                  # [T, 1, d]
        # 2. decode tokens (one new token after a cached prefix, or a 1-token prompt): attended together
        dec = [i for i, n in enumerate(lens) if n == 1]
        pre = [i for i, n in enumerate(lens) if n > 1]
        if dec:
            d_tok = torch.tensor([starts[i] for i in dec], device=dev)                             # [D] token index
            d_row = torch.tensor([seqs[i].row for i in dec], device=dev)                           # [D] pool row
            d_pos = torch.tensor([seqs[i].length for i in dec], device=dev)                        # [D] its position
            R = int(d_row.max()) + 1
            Lmax = max(seqs[i].length for i in dec) + 1
            q_len = torch.zeros(R, dtype=torch.long, device=dev)                                   # rows not in
            q_len[d_row] = d_pos                                                                   # the step see key 0
            j = torch.arange(Lmax, device=dev)
            d_masks = {None: (j[None, :] <= q_len[:, None])[:, None, None, :]}                     # [R, 1, 1, Lmax]
            for w in {w for w in self.windows if w is not None}:
                d_masks[w] = d_masks[None] & (j[None, :] > q_len[:, None] - w)[:, None, None, :]
        p_masks = {(i, w): self._prefill_mask(seqs[i].length, lens[i], w)                          # once per
                   for i in pre for w in set(self.windows)}                                        # forward
        # 3. the layers
        for li, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(T, -1, hd)                                                      # [T, heads, d]
            k = attn.k_proj(h).view(T, -1, hd)                                                      # [T, kv_heads, d]
            v = attn.v_proj(h).view(T, -1, hd)
            if hasattr(attn, "q_norm"):                                                             # Qwen3
                q, k = attn.q_norm(q), attn.k_norm(k)
            q = q * cos + _rotate_half(q) * sin
            k = k * cos + _rotate_half(k) * sin
            kv = buf[li]                                                                            # [rows, 2, kvh, cap, d]
            o = torch.empty_like(q) if pre else None                                               # [T, heads, d]
            if dec:
                kv[d_row, :, :, d_pos] = torch.stack((k[d_tok], v[d_tok]), 1)                       # [D, 2, kvh, d]
                qd = q.new_zeros((R, self.kv_heads, self.heads // self.kv_heads, hd))              # [R, kvh, groups, d]
                qd[d_row] = q[d_tok].view(len(dec), self.kv_heads, -1, hd)
                out = F.scaled_dot_product_attention(qd, kv[:R, 0, :, :Lmax], kv[:R, 1, :, :Lmax],
                                                     attn_mask=d_masks[self.windows[li]],
                                                     scale=self.scaling[li])                        # [R, kvh, groups, d]
                out = out[d_row].view(len(dec), -1, hd)                                             # [D, heads, d]
                if o is None:
                    o = out if len(dec) == T else q.new_empty(q.shape).index_copy_(0, d_tok, out)
                else:
                    o.index_copy_(0, d_tok, out)
            for i in pre:
                s, a, n = seqs[i], starts[i], lens[i]
                L0 = s.length
                kv[s.row, 0, :, L0:L0 + n] = k[a:a + n].transpose(0, 1)
                kv[s.row, 1, :, L0:L0 + n] = v[a:a + n].transpose(0, 1)
                keys, vals = kv[s.row, 0, :, :L0 + n], kv[s.row, 1, :, :L0 + n]                     # [kvh, L, d]
                if self.heads != self.kv_heads:
                    g = self.heads // self.kv_heads
                    keys, vals = keys.repeat_interleave(g, 0), vals.repeat_interleave(g, 0)       # [heads, L, d]
                mask = p_masks[i, self.windows[li]]
                out = F.scaled_dot_product_attention(
                    q[a:a + n].transpose(0, 1)[None], keys[None], vals[None], attn_mask=mask,
                    is_causal=mask is None, scale=self.scaling[li])                                 # [1, heads, n, d]
                o[a:a + n] = out[0].transpose(0, 1)
            x = x + attn.o_proj(o.reshape(T, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        for s, n in zip(seqs, lens):
            s.length += n
        # 4. logits: the last new token of each sequence (or all of them)
        x = self.inner.norm(x)
        if all_logits:
            return [self._logits(x[a:a + n]) for a, n in zip(starts, lens)]
        last = torch.tensor([a + n - 1 for a, n in zip(starts, lens)], device=dev)
        return self._logits(x.index_select(0, last))                                                # [B, vocab]

    def _prefill_mask(self, L0: int, n: int, window: int | None) -> torch.Tensor | None:
        """[n, L0 + n] True = attend, or None where SDPA's causal flag is exact (no cached prefix, no window
        that cuts in)."""
        if L0 == 0 and (window is None or window >= n):
            return None
        qpos = torch.arange(L0, L0 + n, device=self.device)[:, None]
        kpos = torch.arange(L0 + n, device=self.device)[None, :]
        ok = kpos <= qpos
        return ok if window is None else ok & (kpos > qpos - window)

    def _logits(self, h: torch.Tensor) -> torch.Tensor:
        """lm_head(h) [n, vocab] fp32. On a CPU as W·hᵀ: for a vocabulary-wide W and a few rows, oneDNN runs
        that about twice as fast as h·Wᵀ (F.linear) here (49152 × 576, 8 rows: 8 vs 16 ms)."""
        head = self.model.get_output_embeddings()
        if self.device.type != "cpu" or head.bias is not None or h.shape[0] > 32:
            return head(h).float()
        return (head.weight @ h.t()).t().float().contiguous()      # [n, vocab] row-major: rows go to xgrammar


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)
