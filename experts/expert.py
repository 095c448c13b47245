"""Expert files: one z-vector per adapted matrix, stored as safetensors.

Contract:
- An expert is one `.safetensors` file: HF parameter name → z (fp32, 1-D, the multiplier after the sigmoid),
  plus string metadata: `format` (t2-expert), `format_version`, `base_model`, `base_fingerprint`, `label`
  (math, code, reasoning, classifier, ...) and `description`. The expert's name is the file's stem.
- `Expert.load` reads only safetensors and checks the file on its own (format, 1-D fp32-convertible, finite,
  non-negative, not all zero). `Expert.check_against` checks it against the loaded base: every name is an
  adapted matrix, every length equals that matrix's rank, the base fingerprint matches, and, given the
  matrices' singular values (`spectra`, as the engines pass them), the rescale c = Σs / Σ(s ⊙ z) of every
  matrix is finite and sane (`experts.mix.rescale`, range `experts.mix.C_RANGE`). Each failure is an
  ExpertFormatError / IncompatibleExpert naming the file and the tensor.
- `import_reference` converts the reference implementation's pickles (policy_params.pt,
  learnable_params.pt: raw parameters p, z = sigmoid(p)) with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from experts.errors import DegenerateZ, ExpertFormatError, IncompatibleExpert
from experts.svd import MLP_TARGETS, target_names

FORMAT = "t2-expert"
FORMAT_VERSION = "1"
BASE_NAME = "base"  # the key of the base weights (experts.mix re-exports it); no expert may be named so
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


@dataclass
class Expert:
    """A named set of z-vectors with the metadata that ties it to its base model."""

    name: str
    z: dict[str, torch.Tensor]            # HF parameter name → [rank] fp32
    label: str = ""
    description: str = ""
    base_model: str = ""
    base_fingerprint: str = ""
    path: Path | None = field(default=None, compare=False)

    # -- files -----------------------------------------------------------------------------------
    def save(self, path: Path) -> Path:
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_name(path.name + ".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "label": self.label,
                "description": self.description, "base_model": self.base_model,
                "base_fingerprint": self.base_fingerprint}
        save_file({k: v.detach().to(torch.float32).contiguous().cpu() for k, v in self.z.items()},
                  str(path), metadata=meta)
        path.chmod(0o644)       # safetensors writes 0600: a server running as another user could not read it
        self.path = path
        return path

    @classmethod
    def load(cls, path: Path) -> "Expert":
        """Read and self-check one expert file (no base model needed)."""
        path = Path(path)
        if path.suffix != ".safetensors":
            raise ExpertFormatError(path, "expert files must be .safetensors")
        if not NAME_RE.match(path.stem):
            raise ExpertFormatError(path, "the file name (the expert's name) must be 1-64 letters, digits, '_', '-', '.'")
        if path.stem == BASE_NAME:
            raise ExpertFormatError(path, f"{BASE_NAME!r} is reserved for the base weights; rename the file")
        try:
            with safe_open(str(path), framework="pt") as fh:
                meta = fh.metadata() or {}
                z = {k: fh.get_tensor(k) for k in fh.keys()}
        except (SafetensorError, OSError, ValueError) as e:
            raise ExpertFormatError(path, f"not a readable safetensors file ({e})") from None
        if meta.get("format") != FORMAT:
            raise ExpertFormatError(path, f"metadata 'format' is {meta.get('format')!r}, expected {FORMAT!r}")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ExpertFormatError(path, f"unsupported format_version {meta.get('format_version')!r}")
        if not z:
            raise ExpertFormatError(path, "holds no z-vectors")
        for name, t in z.items():
            if t.dim() != 1:
                raise ExpertFormatError(path, f"must be 1-D, has shape {list(t.shape)}", name)
            if not t.dtype.is_floating_point:
                raise ExpertFormatError(path, f"must be floating point, is {t.dtype}", name)
            t = z[name] = t.to(torch.float32)
            if not torch.isfinite(t).all():
                raise ExpertFormatError(path, "contains NaN or Inf", name)
            if (t < 0).any() or not (t > 0).any():
                raise ExpertFormatError(path, "z must be non-negative and not all zero", name)
        return cls(name=path.stem, z=z, label=meta.get("label", ""), description=meta.get("description", ""),
                   base_model=meta.get("base_model", ""), base_fingerprint=meta.get("base_fingerprint", ""),
                   path=path)

    def check_against(self, ranks: Mapping[str, int], fingerprint: str, base_model: str = "",
                      spectra: Mapping[str, torch.Tensor] | None = None) -> None:
        """Raise unless every z-vector fits an adapted matrix of the loaded base weights (and, given the
        singular values `spectra` {name: s [rank]}, its rescale c is sane)."""
        where = self.path or self.name
        if self.base_fingerprint and self.base_fingerprint != fingerprint:
            raise IncompatibleExpert(
                f"{where}: made for base model {self.base_model or '?'} (fingerprint {self.base_fingerprint}), "
                f"but the server runs {base_model or '?'} (fingerprint {fingerprint})")
        for name, t in self.z.items():
            if name not in ranks:
                raise ExpertFormatError(where, "is not an adapted matrix of the base model "
                                        "(is it decomposed? see --targets)", name)
            if t.numel() != ranks[name]:
                raise ExpertFormatError(where, f"has length {t.numel()}, the matrix has rank {ranks[name]}", name)
            if spectra is not None and name in spectra:
                from experts.mix import rescale     # mix.py imports this module
                try:
                    rescale(spectra[name].detach().cpu(), t)
                except DegenerateZ as e:
                    raise ExpertFormatError(where, str(e), name) from None

    @property
    def num_params(self) -> int:
        return sum(t.numel() for t in self.z.values())


def uniform_expert(name: str, ranks: Mapping[str, int], value: float = 1.0, **meta) -> Expert:
    """An expert with the same z everywhere (identity after the rescale): a starting point and a test aid."""
    return Expert(name=name, z={n: torch.full((r,), float(value)) for n, r in ranks.items()}, **meta)


def random_expert(name: str, ranks: Mapping[str, int], scale: float = 0.1, seed: int = 0, **meta) -> Expert:
    """z = 1 + scale·N(0,1), clamped to ≥ 0.01: a visible, reproducible perturbation for plumbing tests."""
    g = torch.Generator().manual_seed(seed)
    z = {n: (1 + scale * torch.randn(r, generator=g)).clamp_min(0.01) for n, r in ranks.items()}
    return Expert(name=name, z=z, **meta)


def import_reference(path: Path, param_names: Sequence[str], name: str, **meta) -> Expert:
    """Convert the reference's `policy_params.pt` or `learnable_params.pt` (raw p; z = sigmoid(p)).

    `param_names` are the checkpoint's parameter names (any order); they resolve the index form
    `learnable_params_module_list.{i}` (i over MLP matrices: layer i//3, [gate, up, down][i%3]).
    """
    path = Path(path)
    try:
        raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise ExpertFormatError(path, f"cannot be read with torch.load(weights_only=True): {e}") from None
    if not isinstance(raw, Mapping) or not all(isinstance(v, torch.Tensor) for v in raw.values()):
        raise ExpertFormatError(path, "expected a dict of tensors (policy_params.pt or learnable_params.pt)")
    mlp = target_names(param_names, MLP_TARGETS)
    known = set(param_names)
    z: dict[str, torch.Tensor] = {}
    for key, p in raw.items():
        m = re.fullmatch(r"learnable_params_module_list\.(\d+)", key)
        if m:
            i = int(m.group(1))
            if i >= len(mlp):
                raise ExpertFormatError(path, f"index {i} is beyond the model's {len(mlp)} MLP matrices", key)
            hf = mlp[i]
        else:
            hf = key if key in known else f"{key}.weight"
            if hf not in known:
                raise ExpertFormatError(path, "names no parameter of the base model", key)
        z[hf] = torch.sigmoid(p.detach().to(torch.float32).flatten())
    return Expert(name=name, z=z, **meta)
