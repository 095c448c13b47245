"""`t2 serve` refuses to start on a bad model folder, experts folder or expert file: through the real CLI.

Each case runs `python -m server.cli serve` in a subprocess and expects exit code 1 and exactly one line on
stderr that names the file (and the tensor, where one is at fault), before any port is bound: the port given
is held open by the test, so a server that got as far as binding would fail with another message.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from experts.expert import FORMAT, FORMAT_VERSION, random_expert
from experts.svd import model_fingerprint, model_ranks

ROOT = Path(__file__).resolve().parents[1]


def serve(*args: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with socket.socket() as held:                 # a server that reached its bind would fail on this port
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        return subprocess.run([sys.executable, "-m", "server.cli", "serve", "--port", str(port),
                               *map(str, args)], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)


_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ (INFO|WARNING) ")   # the format `t2 serve` logs in


def one_line_error(r: subprocess.CompletedProcess, allow_logs: bool = False) -> str:
    """The one stderr line of a refused start (`allow_logs`: besides INFO/WARNING lines, e.g. vLLM's import)."""
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not (allow_logs and _LOG_LINE.match(ln))]
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "Uvicorn running" not in r.stderr
    return lines[0]


def _meta(model_dir: Path, **over: str) -> dict[str, str]:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "label": "math", "description": "",
            "base_model": model_dir.name, "base_fingerprint": model_fingerprint(model_dir), **over}


def _write_bad(kind: str, model_dir: Path, folder: Path) -> tuple[Path, str | None]:
    """One bad expert file in `folder` (beside a good one); returns it and the tensor at fault (or None)."""
    ranks = model_ranks(model_dir)
    first = next(iter(ranks))
    random_expert("good", ranks, 0.2, base_model=model_dir.name,
                  base_fingerprint=model_fingerprint(model_dir)).save(folder / "good.safetensors")
    path = folder / "bad.safetensors"
    z = {n: torch.ones(r) for n, r in ranks.items()}
    if kind == "corrupt":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
        return path, None
    if kind == "wrong-length":
        z[first] = torch.ones(ranks[first] - 1)
    elif kind == "unknown-tensor":
        first = "model.layers.0.mlp.nonexistent_proj.weight"
        z[first] = torch.ones(4)
    elif kind == "nan":
        z[first][3] = float("nan")
    elif kind == "inf":
        z[first][0] = float("inf")
    if kind == "other-base":
        save_file(z, str(path), metadata=_meta(model_dir, base_model="other-model", base_fingerprint="0" * 16))
        return path, None
    save_file(z, str(path), metadata=None if kind == "no-metadata" else _meta(model_dir))
    return path, None if kind == "no-metadata" else first


@pytest.mark.parametrize("kind", ["corrupt", "wrong-length", "other-base", "unknown-tensor", "nan", "inf",
                                  "no-metadata"])
def test_a_bad_expert_file_is_one_line_naming_it(kind, tiny_model_dir, tmp_path):
    folder = tmp_path / "experts"
    folder.mkdir()
    path, tensor = _write_bad(kind, tiny_model_dir, folder)
    line = one_line_error(serve("--model", tiny_model_dir, "--experts", folder, "--cache-dir", tmp_path / "c"))
    assert str(path) in line or path.name in line, line
    if tensor is not None:
        assert tensor in line, line


def test_a_model_folder_that_does_not_exist(tmp_path):
    line = one_line_error(serve("--model", tmp_path / "no-such-model", "--cache-dir", tmp_path / "c"))
    assert str(tmp_path / "no-such-model") in line and "no such folder" in line
    assert "Repo id" not in line


def test_a_folder_that_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    line = one_line_error(serve("--model", tmp_path / "empty", "--cache-dir", tmp_path / "c"))
    assert str(tmp_path / "empty") in line and "config.json" in line


def test_a_model_the_embedded_engine_cannot_run_is_one_line_naming_why(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, bos_token_id=0,
                               eos_token_id=0)).save_pretrained(tmp_path / "gpt2")
    line = one_line_error(serve("--model", tmp_path / "gpt2", "--cache-dir", tmp_path / "c"))
    assert "gpt2" in line and "embedded engine" in line and "--engine vllm" in line


def test_an_experts_folder_that_does_not_exist(tiny_model_dir, tmp_path):
    line = one_line_error(serve("--model", tiny_model_dir, "--experts", tmp_path / "no-such-experts",
                                "--cache-dir", tmp_path / "c"))
    assert str(tmp_path / "no-such-experts") in line and "no such folder" in line


def test_vllm_only_flags_are_refused_with_the_embedded_engine(tiny_model_dir, tmp_path):
    line = one_line_error(serve("--model", tiny_model_dir, "--tensor-parallel-size", "2",
                                "--cache-dir", tmp_path / "c"))
    assert "--tensor-parallel-size" in line and "--engine vllm" in line
