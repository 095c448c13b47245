"""The `t2` command line on real files: decompose, experts create / list / inspect, import-expert, serve --help."""

import json

import torch
from typer.testing import CliRunner

from experts.expert import Expert
from experts.svd import MLP_TARGETS, model_fingerprint, model_ranks, target_names
from server.cli import app

runner = CliRunner()


def run(*args):
    r = runner.invoke(app, [str(a) for a in args])
    return r.exit_code, r.output


def test_serve_flags_come_from_the_config_with_env_vars():
    code, out = run("serve", "--help")
    assert code == 0
    for flag in ("--model", "--experts", "--engine", "--dtype", "--dispatch", "--host", "--port", "T2_MODEL",
                 "T2_DISPATCH"):
        assert flag in out


def test_serve_rejects_a_bad_value_without_a_stack_trace(tmp_path):
    code, out = run("serve", "--model", tmp_path, "--dispatch", "sometimes")
    assert code == 1 and "dispatch" in out and "Traceback" not in out


def test_decompose_builds_then_reuses_the_cache(tiny_model_dir, tmp_path):
    code, out = run("decompose", "--model", tiny_model_dir, "--cache-dir", tmp_path)
    assert code == 0 and "6 matrices" in out and model_fingerprint(tiny_model_dir) in out
    data = tmp_path / "factors" / tiny_model_dir.name / "factors.safetensors"
    before = data.stat().st_mtime_ns
    assert run("decompose", "--model", tiny_model_dir, "--cache-dir", tmp_path)[0] == 0
    assert data.stat().st_mtime_ns == before


def test_experts_create_list_inspect(tiny_model_dir, tmp_path):
    code, out = run("experts", "create", "rnd", "--label", "math", "--random", "0.2", "--model", tiny_model_dir,
                    "--out", tmp_path)
    assert code == 0, out
    e = Expert.load(tmp_path / "rnd.safetensors")
    assert e.label == "math" and e.base_fingerprint == model_fingerprint(tiny_model_dir)
    assert {n: t.numel() for n, t in e.z.items()} == model_ranks(tiny_model_dir)
    # from given z-vectors
    from safetensors.torch import save_file
    ranks = model_ranks(tiny_model_dir)
    name = next(iter(ranks))
    save_file({name: torch.full((ranks[name],), 0.5)}, str(tmp_path / "z.safetensors"))
    assert run("experts", "create", "given", "--z", tmp_path / "z.safetensors", "--model", tiny_model_dir,
               "--out", tmp_path)[0] == 0
    assert torch.equal(Expert.load(tmp_path / "given.safetensors").z[name], torch.full((ranks[name],), 0.5))
    # a z of the wrong length is refused with the tensor named
    save_file({name: torch.ones(3)}, str(tmp_path / "bad.safetensors"))
    code, out = run("experts", "create", "bad", "--z", tmp_path / "bad.safetensors", "--model", tiny_model_dir,
                    "--out", tmp_path / "o")
    assert code == 1 and name in out and not (tmp_path / "o" / "bad.safetensors").exists()
    code, out = run("experts", "list", tmp_path)
    assert code == 0 and "rnd" in out and "math" in out and "given" in out
    code, out = run("experts", "inspect", tmp_path / "rnd.safetensors")
    assert code == 0 and "label: math" in out and name in out


def test_import_reference_expert(tiny_model_dir, tmp_path):
    from experts.svd import checkpoint_names
    mlp = target_names(checkpoint_names(tiny_model_dir), MLP_TARGETS)
    ranks = model_ranks(tiny_model_dir)
    p = {f"learnable_params_module_list.{i}": torch.randn(ranks[n]) for i, n in enumerate(mlp)}
    torch.save(p, tmp_path / "policy_params.pt")
    code, out = run("import-expert", tmp_path / "policy_params.pt", "--name", "ref", "--label", "code",
                    "--model", tiny_model_dir, "--out", tmp_path)
    assert code == 0, out
    e = Expert.load(tmp_path / "ref.safetensors")
    for i, n in enumerate(mlp):
        assert torch.allclose(e.z[n], torch.sigmoid(p[f"learnable_params_module_list.{i}"]))
    code, out = run("import-expert", tmp_path / "nothing.pt", "--name", "x", "--model", tiny_model_dir)
    assert code == 1 and "nothing.pt" in out


def test_train_and_fewshot_commands_end_to_end(tiny_model_dir, tmp_path):
    """`t2 train` on a generated GSM8K-format file, then `t2 fewshot` over the result: files, logs, profile."""
    from experts.tasks.generate import write
    write("arithmetic", tmp_path / "math.jsonl", 12, seed=0)
    code, out = run("train", "m1", "--task", "gsm8k", "--data", tmp_path / "math.jsonl", "--label", "math",
                    "--model", tiny_model_dir, "--out", tmp_path / "experts", "--run-dir", tmp_path / "run",
                    "--steps", "2", "--batch-size", "2", "--max-new-tokens", "4", "--val-every", "1",
                    "--val-size", "2", "--valid-size", "4", "--device", "cpu")
    assert code == 0, out
    e = Expert.load(tmp_path / "experts" / "m1.safetensors")
    assert e.label == "math" and e.base_fingerprint == model_fingerprint(tiny_model_dir)
    assert (tmp_path / "run" / "recipe.json").exists()
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 3
    # validation from a file of its own: every row of --data trains
    write("arithmetic", tmp_path / "valid.jsonl", 3, seed=5)
    code, out = run("train", "m1v", "--task", "gsm8k", "--data", tmp_path / "math.jsonl", "--valid-data",
                    tmp_path / "valid.jsonl", "--valid-size", "2", "--label", "math", "--model", tiny_model_dir,
                    "--out", tmp_path / "experts-v", "--run-dir", tmp_path / "run-v", "--steps", "1",
                    "--batch-size", "2", "--max-new-tokens", "2", "--val-every", "1", "--val-size", "2",
                    "--device", "cpu")
    assert code == 0, out
    recipe = json.loads((tmp_path / "run-v" / "recipe.json").read_text())
    assert recipe["examples"] == 12 and recipe["valid"] == {"examples": 2, "own_file": True}
    from experts.expert import random_expert
    random_expert("m2", model_ranks(tiny_model_dir), 0.3, 5, label="code",
                  base_fingerprint=model_fingerprint(tiny_model_dir)).save(tmp_path / "experts" / "m2.safetensors")
    code, out = run("fewshot", "prof", "--task", "gsm8k", "--data", tmp_path / "math.jsonl", "--shots", "3",
                    "--experts", tmp_path / "experts", "--population", "3", "--iterations", "1",
                    "--max-new-tokens", "3", "--model", tiny_model_dir, "--out", tmp_path / "experts",
                    "--device", "cpu")
    assert code == 0, out
    prof = Expert.load(tmp_path / "experts" / "prof.safetensors")
    assert prof.label == "profile" and set(prof.z) == set(model_ranks(tiny_model_dir))
    assert json.loads(prof.description)["shot_indices"] == [0, 1, 2]      # so `t2 eval` can leave them out
