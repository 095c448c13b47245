"""SVD factors of the adaptable weight matrices, and their cache on disk.

Contract:
- `target_names` picks the adaptable matrices of a checkpoint by HF parameter name, in a fixed order
  (layer, then the order of `targets`). Default targets: the MLP matrices, as the reference.
- `fingerprint` ties anything derived from weights (factors, experts) to the exact base weights: a hash of
  the names, dtypes, shapes and bytes of every candidate matrix (MLP and attention projections), so it does
  not depend on which targets are decomposed.
- `decompose` computes W = U·diag(s)·Vᵀ in fp32 for each target (thin SVD, r = min(m, n)), with progress.
- `load_factors` returns the factors of a model directory, from the cache when its manifest matches the
  weights' fingerprint and covers the targets, and otherwise decomposes again (with a log line that says
  why) and rewrites the cache. Stale factors are never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from experts.errors import FactorCacheError

log = logging.getLogger("t2.svd")

MLP_TARGETS: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
ATTENTION_TARGETS: tuple[str, ...] = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
)
CANDIDATE_TARGETS: tuple[str, ...] = MLP_TARGETS + ATTENTION_TARGETS
MANIFEST_FORMAT = "t2-factors/1"

_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class Factors:
    """Thin SVD of one matrix W [m, n]: W = U·diag(s)·Vh, r = min(m, n)."""

    U: torch.Tensor   # [m, r] fp32
    s: torch.Tensor   # [r] fp32, descending
    Vh: torch.Tensor  # [r, n] fp32

    @property
    def rank(self) -> int:
        return self.s.numel()

    def to(self, device: torch.device | str) -> "Factors":
        return Factors(self.U.to(device), self.s.to(device), self.Vh.to(device))


def target_names(param_names: Iterable[str], targets: Sequence[str] = MLP_TARGETS) -> list[str]:
    """HF names of the 2-D weights whose module path ends with one of `targets`, ordered by layer then target."""
    order = {t: i for i, t in enumerate(targets)}
    picked = []
    for name in param_names:
        for t in targets:
            if name.endswith(f".{t}.weight"):
                layer = _LAYER.search(name)
                picked.append(((int(layer.group(1)) if layer else -1), order[t], name))
                break
    return [name for *_, name in sorted(picked)]


def safetensors_files(model_dir: Path) -> list[Path]:
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FactorCacheError(f"{model_dir}: no *.safetensors weights found (only safetensors checkpoints are loaded)")
    return files


def checkpoint_names(model_dir: Path) -> list[str]:
    names: list[str] = []
    for f in safetensors_files(model_dir):
        with safe_open(str(f), framework="pt") as fh:
            names.extend(fh.keys())
    return names


def read_weights(model_dir: Path, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Read the named tensors from a checkpoint's safetensors shards, in their stored dtype."""
    wanted, out = set(names), {}
    for f in safetensors_files(model_dir):
        with safe_open(str(f), framework="pt") as fh:
            for k in wanted.intersection(fh.keys()):
                out[k] = fh.get_tensor(k)
    missing = wanted - out.keys()
    if missing:
        raise FactorCacheError(f"{model_dir}: tensors not in the checkpoint: {sorted(missing)[:5]}")
    return out


def fingerprint(weights: Mapping[str, torch.Tensor]) -> str:
    """A 128-bit hash of names, dtypes, shapes and bytes of the given tensors (order-independent)."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(weights):
        t = weights[name].detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().data if t.numel() else b"")
    return h.hexdigest()


def model_fingerprint(model_dir: Path) -> str:
    """Fingerprint of a checkpoint: over all its candidate matrices (MLP + attention projections)."""
    names = target_names(checkpoint_names(model_dir), CANDIDATE_TARGETS)
    return fingerprint(read_weights(model_dir, names))


def decompose(weights: Mapping[str, torch.Tensor], device: str | torch.device = "cpu",
              progress: bool = True) -> dict[str, Factors]:
    """fp32 thin SVD of every given matrix. Runs on `device` (a GPU is much faster) and returns CPU tensors."""
    out: dict[str, Factors] = {}
    for name in tqdm(list(weights), desc="SVD", unit="matrix", disable=not progress):
        W = weights[name].to(device=device, dtype=torch.float32)  # [m, n]
        U, s, Vh = torch.linalg.svd(W, full_matrices=False)       # [m, r], [r], [r, n]
        out[name] = Factors(U.contiguous().cpu(), s.contiguous().cpu(), Vh.contiguous().cpu())
    return out


def _cache_paths(cache_dir: Path) -> tuple[Path, Path]:
    return cache_dir / "manifest.json", cache_dir / "factors.safetensors"


def _read_manifest(cache_dir: Path) -> dict | None:
    manifest, data = _cache_paths(cache_dir)
    if not manifest.exists() or not data.exists():
        return None
    try:
        m = json.loads(manifest.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return m if m.get("format") == MANIFEST_FORMAT else None


def save_factors(cache_dir: Path, factors: Mapping[str, Factors], meta: dict) -> None:
    """Write factors + manifest atomically (data first, manifest last: a manifest means a complete cache)."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    manifest, data = _cache_paths(cache_dir)
    manifest.unlink(missing_ok=True)
    tensors = {}
    for name, f in factors.items():
        tensors[f"{name}.U"], tensors[f"{name}.s"], tensors[f"{name}.Vh"] = f.U, f.s, f.Vh
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
    os.close(fd)
    save_file(tensors, tmp)
    os.replace(tmp, data)
    shapes = {n: [f.U.shape[0], f.Vh.shape[1]] for n, f in factors.items()}
    body = dict(meta, format=MANIFEST_FORMAT, names=list(factors), shapes=shapes, created=time.time())
    manifest.write_text(json.dumps(body, indent=1))


def load_factors(model_dir: Path, cache_dir: Path, targets: Sequence[str] = MLP_TARGETS,
                 device: str | torch.device = "cpu", progress: bool = True) -> tuple[dict[str, Factors], str]:
    """Factors of `targets` for the checkpoint in `model_dir`, cached under `cache_dir`; also the fingerprint.

    1. fingerprint the base weights (all candidate matrices);
    2. reuse the cache if its manifest has that fingerprint and holds every target matrix;
    3. otherwise decompose (on `device`) and rewrite the cache.
    """
    model_dir, cache_dir = Path(model_dir), Path(cache_dir)
    # 1. fingerprint
    all_names = checkpoint_names(model_dir)
    candidates = target_names(all_names, CANDIDATE_TARGETS)
    base = read_weights(model_dir, candidates)
    fp = fingerprint(base)
    names = target_names(all_names, targets)
    if not names:
        raise FactorCacheError(f"{model_dir}: no matrix matches the targets {list(targets)}")
    # 2. reuse
    m = _read_manifest(cache_dir)
    if m is not None and m.get("fingerprint") == fp and set(names) <= set(m.get("names", [])):
        _, data = _cache_paths(cache_dir)
        try:
            raw = load_file(str(data))
            log.info("factors: reusing %s (%d matrices)", cache_dir, len(names))
            return {n: Factors(raw[f"{n}.U"], raw[f"{n}.s"], raw[f"{n}.Vh"]) for n in names}, fp
        except Exception as e:  # a truncated or foreign file: rebuild rather than fail
            log.warning("factors: cache %s unreadable (%s); rebuilding", cache_dir, e)
    elif m is not None and m.get("fingerprint") != fp:
        log.warning("factors: cache %s was built for other weights (fingerprint %s, now %s); rebuilding",
                    cache_dir, m.get("fingerprint"), fp)
    elif m is not None:
        log.info("factors: cache %s lacks some targets; rebuilding", cache_dir)
    # 3. decompose
    t0 = time.perf_counter()
    factors = decompose({n: base[n] for n in names}, device=device, progress=progress)
    log.info("factors: decomposed %d matrices in %.1f s", len(names), time.perf_counter() - t0)
    save_factors(cache_dir, factors, {"fingerprint": fp, "model_dir": str(model_dir), "targets": list(targets)})
    return factors, fp


def model_ranks(model_dir: Path, targets: Sequence[str] = MLP_TARGETS) -> dict[str, int]:
    """{HF name: rank} of the target matrices of a checkpoint, read from the shapes alone."""
    out: dict[str, int] = {}
    for f in safetensors_files(Path(model_dir)):
        with safe_open(str(f), framework="pt") as fh:
            for name in target_names(fh.keys(), targets):
                out[name] = min(fh.get_slice(name).get_shape())
    return {n: out[n] for n in target_names(out, targets)}


def factors_path(cache_dir: Path) -> Path:
    """The safetensors file of a factor cache: tensors `{name}.U` [m, r], `{name}.s` [r], `{name}.Vh` [r, n]."""
    return _cache_paths(Path(cache_dir))[1]


def ensure_factors(model_dir: Path, cache_dir: Path, targets: Sequence[str] = MLP_TARGETS,
                   device: str | torch.device = "cpu", progress: bool = True) -> tuple[Path, str]:
    """Make sure the factor cache of `targets` is there and fresh, without keeping the factors in memory.

    For a process that only hands the cache on (vLLM's front process: its workers read the factors they
    need). Returns (the factors file, the fingerprint of the base weights).
    1. fingerprint the base weights; 2. a manifest with that fingerprint and every target: done;
    3. otherwise `load_factors` decomposes and rewrites the cache (and the factors are dropped).
    """
    model_dir, cache_dir = Path(model_dir), Path(cache_dir)
    # 1. fingerprint
    all_names = checkpoint_names(model_dir)
    fp = fingerprint(read_weights(model_dir, target_names(all_names, CANDIDATE_TARGETS)))
    names = target_names(all_names, targets)
    # 2. a fresh cache
    m = _read_manifest(cache_dir)
    if not (m is not None and m.get("fingerprint") == fp and set(names) <= set(m.get("names", []))):
        # 3. rebuild (load_factors says why in the log)
        factors, fp = load_factors(model_dir, cache_dir, targets, device=device, progress=progress)
        del factors
    return factors_path(cache_dir), fp


def read_spectra(factors_file: Path, names: Iterable[str]) -> dict[str, torch.Tensor]:
    """{name: s [r]} of a factors file (the singular values only: what the experts' rescale check needs)."""
    with safe_open(str(factors_file), framework="pt") as fh:
        return {n: fh.get_tensor(f"{n}.s") for n in names}


def read_factor_slice(fh, name: str, rows: tuple[int, int] | None = None,
                      cols: tuple[int, int] | None = None) -> Factors:
    """One matrix's factors from an open factors file (`safe_open`), sliced for one tensor-parallel rank.

    rows = (start, stop) keeps W[start:stop, :] (column-parallel layers: rows of U);
    cols = (start, stop) keeps W[:, start:stop] (row-parallel layers: columns of Vh, i.e. rows of V).
    s is always whole: the rescale c = Σs / Σ(s ⊙ z) is over the full spectrum. Only the slice is read.
    """
    U, Vh = fh.get_slice(f"{name}.U"), fh.get_slice(f"{name}.Vh")
    U = U[rows[0]:rows[1]] if rows else U[:]                  # [m_local, r]
    Vh = Vh[:, cols[0]:cols[1]] if cols else Vh[:]            # [r, n_local]
    return Factors(U.contiguous(), fh.get_tensor(f"{name}.s"), Vh.contiguous())
