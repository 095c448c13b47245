"""Carriers: one PEFT folder per adaptation, the form in which vLLM receives an SVF adaptation's gains.

Torch only (no vllm). Contract:
- `gains_of(experts, adaptation, spectra)` gives, per adapted HF matrix, g = c·z' with z' = mix_z(...) and
  c = Σs / Σ(s ⊙ z') (fp32): W'_a = U·diag(s ⊙ g)·Vh, the same W' as experts.patch.svf_delta gives.
  Matrices no expert covers are absent (their gains stay 1).
- `write_carrier(root, gains)` writes `root/<digest>/` (content-addressed: the digest is over the gains'
  names and bytes): `adapter_config.json` (r = 1, lora_alpha = 1, so vLLM's scaling is 1) and
  `adapter_model.safetensors` with, per matrix, `lora_A` = g − 1 as [1, r] and a dummy [1, 1] `lora_B` (vLLM's
  loader wants a B; server/engines/vllm_layers.py reads only A). Writing the same gains twice is a no-op.
- `Carriers` maps adaptation keys to (LoRA int id, folder). An int id is never reused: vLLM's workers cache
  adapters by id, so new gains under an old key (an expert reloaded) get a new id. The base has no carrier.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file

from experts.expert import Expert
from experts.factored import gains_of as factored_gains
from experts.mix import Adaptation, mix_z

PREFIX = "t2:"            # LoRA names are "t2:<adaptation key>"


def gains_of(experts: Mapping[str, Expert], adaptation: Adaptation,
             spectra: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """{HF matrix name: g [r] fp32} for an adaptation (empty for the base): experts.factored's gains, the same
    g = c·z' (and the same check of c) as the embedded engine's gain slots."""
    return factored_gains(spectra, mix_z(experts, adaptation))


def digest(gains: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=12)
    for name in sorted(gains):
        h.update(name.encode())
        h.update(gains[name].contiguous().numpy().tobytes())
    return h.hexdigest()


def write_carrier(root: Path, gains: Mapping[str, torch.Tensor]) -> Path:
    """The carrier folder of these gains (written once; atomically renamed into place)."""
    d = Path(root) / digest(gains)
    if (d / "adapter_model.safetensors").exists():
        return d
    tmp = d.with_name(d.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tensors, leaves = {}, set()
    for name, g in gains.items():
        module = name.removesuffix(".weight")                         # model.layers.0.mlp.gate_proj
        leaves.add(module.rsplit(".", 1)[-1])
        tensors[f"base_model.model.{module}.lora_A.weight"] = (g.to(torch.float32) - 1).reshape(1, -1).contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = torch.zeros(1, 1)
    save_file(tensors, str(tmp / "adapter_model.safetensors"))
    (tmp / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": 1, "lora_alpha": 1, "bias": "none", "target_modules": sorted(leaves),
        "t2": "SVF gains: lora_A = g - 1 per matrix; lora_B unused"}))
    if d.exists():
        shutil.rmtree(d)
    tmp.rename(d)
    return d


@dataclass(frozen=True)
class Carrier:
    key: str
    int_id: int
    path: Path
    digest: str


class Carriers:
    """key → Carrier; int ids start at 1 and are never reused."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._by_key: dict[str, Carrier] = {}
        self._next_id = 1

    def get(self, key: str) -> Carrier | None:
        return self._by_key.get(key)

    def add(self, key: str, gains: Mapping[str, torch.Tensor]) -> Carrier:
        """The carrier of `key` with these gains (a new int id if the key had other gains before)."""
        path = write_carrier(self.root, gains)
        old = self._by_key.get(key)
        if old is not None and old.digest == path.name:
            return old
        c = Carrier(key, self._next_id, path, path.name)
        self._next_id += 1
        self._by_key[key] = c
        return c

    def drop(self, key: str) -> Carrier | None:
        """Forget a key; its folder is removed unless another key has the same gains."""
        c = self._by_key.pop(key, None)
        if c is not None and all(o.digest != c.digest for o in self._by_key.values()):
            shutil.rmtree(c.path, ignore_errors=True)
        return c

    def keys(self) -> list[str]:
        return list(self._by_key)
