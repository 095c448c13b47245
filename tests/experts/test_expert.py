"""experts/expert.py: expert files (save/load, self-checks), checks against the base, reference import."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from experts.errors import ExpertError, ExpertFormatError, IncompatibleExpert
from experts.expert import FORMAT, FORMAT_VERSION, Expert, import_reference, random_expert, uniform_expert
from experts.svd import checkpoint_names, model_fingerprint, model_ranks

GATE0 = "model.layers.0.mlp.gate_proj.weight"
META = {"format": FORMAT, "format_version": FORMAT_VERSION, "label": "math", "description": "d",
        "base_model": "tiny", "base_fingerprint": "f" * 32}


def _write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict | None = META) -> Path:
    save_file(tensors, str(path), metadata=metadata)
    return path


def _ok_z(n: int = 8) -> torch.Tensor:
    return torch.linspace(0.5, 1.5, n)


# -- save / load round trip --------------------------------------------------------------------------------

def test_save_load_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    z = {GATE0: torch.rand(64, generator=g, dtype=torch.float64) + 0.1,          # float64 in memory
         "model.layers.1.mlp.down_proj.weight": (torch.rand(64, generator=g) + 0.1).to(torch.bfloat16)}
    e = Expert(name="ignored", z=z, label="code", description="a code expert", base_model="tiny-llama",
               base_fingerprint="0123abcd" * 4)
    path = e.save(tmp_path / "sub" / "my-expert_1.0.safetensors")        # parent created
    assert path == tmp_path / "sub" / "my-expert_1.0.safetensors" and path.is_file()
    assert e.path == path
    back = Expert.load(path)
    assert back.name == "my-expert_1.0"
    assert back.path == path
    assert (back.label, back.description, back.base_model, back.base_fingerprint) == \
        ("code", "a code expert", "tiny-llama", "0123abcd" * 4)
    assert set(back.z) == set(z)
    for n, t in z.items():
        assert back.z[n].dtype == torch.float32
        assert torch.equal(back.z[n], t.to(torch.float32))
    assert back.num_params == 128


def test_save_adds_the_suffix(tmp_path):
    e = Expert(name="m", z={GATE0: _ok_z()})
    assert e.save(tmp_path / "math") == tmp_path / "math.safetensors"
    assert Expert.load(tmp_path / "math.safetensors").name == "math"


def test_saved_experts_are_readable_by_other_users(tmp_path):
    # a server in a container often runs as another user than the one who trained the expert
    path = Expert(name="m", z={GATE0: _ok_z()}).save(tmp_path / "m")
    assert path.stat().st_mode & 0o777 == 0o644


def test_save_keeps_dotted_names(tmp_path):
    e = Expert(name="math-v1.5", z={GATE0: _ok_z()})
    path = e.save(tmp_path / "math-v1.5")
    assert path == tmp_path / "math-v1.5.safetensors"
    assert Expert.load(path).name == "math-v1.5"


def test_random_and_uniform_experts_are_valid(tiny_model_dir, tmp_path):
    ranks, fp = model_ranks(tiny_model_dir), model_fingerprint(tiny_model_dir)
    for e in (random_expert("r", ranks, 0.5, seed=3, base_fingerprint=fp),
              uniform_expert("u", ranks, 0.3, base_fingerprint=fp)):
        back = Expert.load(e.save(tmp_path / f"{e.name}.safetensors"))
        back.check_against(ranks, fp)
        assert all(torch.equal(back.z[n], e.z[n]) for n in ranks)
        assert all((t > 0).all() for t in back.z.values())
    a, b = random_expert("a", ranks, seed=1), random_expert("b", ranks, seed=1)
    assert all(torch.equal(a.z[n], b.z[n]) for n in ranks)                   # reproducible
    assert not torch.equal(random_expert("c", ranks, seed=2).z[GATE0], a.z[GATE0])


# -- Expert.load errors ----------------------------------------------------------------------------------------

def _load_error(path: Path) -> ExpertFormatError:
    with pytest.raises(ExpertFormatError) as info:
        Expert.load(path)
    err = info.value
    assert str(path) in str(err), str(err)
    assert isinstance(err, ExpertError)
    return err


def test_load_rejects_non_safetensors(tmp_path):
    p = tmp_path / "math.pt"
    torch.save({GATE0: _ok_z()}, p)
    err = _load_error(p)
    assert ".safetensors" in str(err)


@pytest.mark.parametrize("stem", ["bad name", "-leading", ".hidden", "x" * 65, "semi;colon", "ümlaut"])
def test_load_rejects_bad_names(tmp_path, stem):
    p = _write(tmp_path / f"{stem}.safetensors", {GATE0: _ok_z()})
    err = _load_error(p)
    assert "name" in str(err)


def test_load_accepts_good_names(tmp_path):
    for stem in ("a", "Math-v2.1_final", "x" * 64):
        assert Expert.load(_write(tmp_path / f"{stem}.safetensors", {GATE0: _ok_z()})).name == stem


@pytest.mark.parametrize("meta, what", [
    ({"format": "pt"}, "'format'"),
    (None, "'format'"),
    ({**META, "format": "t2-factors/1"}, "'format'"),
    ({**META, "format_version": "2"}, "format_version"),
    ({k: v for k, v in META.items() if k != "format_version"}, "format_version"),
])
def test_load_rejects_wrong_metadata(tmp_path, meta, what):
    err = _load_error(_write(tmp_path / "e.safetensors", {GATE0: _ok_z()}, meta))
    assert what in str(err)


def test_load_rejects_unreadable_and_empty_files(tmp_path):
    p = tmp_path / "garbage.safetensors"
    p.write_bytes(b"\x00\x01not a safetensors file at all")
    assert "readable" in str(_load_error(p))
    assert "readable" in str(_load_error(tmp_path / "absent.safetensors"))
    # a valid safetensors file with no tensors
    empty = _write(tmp_path / "empty.safetensors", {})
    assert "no z-vectors" in str(_load_error(empty))


def _bad(kind: str) -> tuple[torch.Tensor, str]:
    z = _ok_z()
    if kind == "nan":
        z[3] = float("nan")
        return z, "NaN"
    if kind == "inf":
        z[0] = float("inf")
        return z, "Inf"
    if kind == "neg_inf":
        z[7] = -float("inf")
        return z, "Inf"
    if kind == "negative":
        z[5] = -1e-3
        return z, "non-negative"
    if kind == "2d":
        return z.reshape(2, 4), "1-D"
    if kind == "0d":
        return torch.tensor(1.0), "1-D"
    if kind == "zeros":
        return torch.zeros(8), "not all zero"
    if kind == "empty":
        return torch.zeros(0), "not all zero"
    if kind == "int":
        return torch.ones(8, dtype=torch.int32), "floating point"
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["nan", "inf", "neg_inf", "negative", "2d", "0d", "zeros", "empty", "int"])
def test_load_rejects_bad_tensor(tmp_path, kind):
    bad_name = "model.layers.1.mlp.up_proj.weight"
    t, words = _bad(kind)
    p = _write(tmp_path / "e.safetensors", {GATE0: _ok_z(), bad_name: t})
    err = _load_error(p)
    assert err.tensor == bad_name and err.path == str(p)
    assert repr(bad_name) in str(err) or bad_name in str(err)
    assert words in str(err)


def test_load_accepts_float16_and_zeros_in_part(tmp_path):
    z = _ok_z()
    z[:4] = 0.0                                          # some zeros are fine: only all-zero is refused
    p = _write(tmp_path / "e.safetensors", {GATE0: z.to(torch.float16)})
    back = Expert.load(p)
    assert back.z[GATE0].dtype == torch.float32
    assert torch.equal(back.z[GATE0], z.to(torch.float16).to(torch.float32))


# -- check_against -----------------------------------------------------------------------------------------------

@pytest.fixture()
def saved(tiny_model_dir, tmp_path):
    ranks, fp = model_ranks(tiny_model_dir), model_fingerprint(tiny_model_dir)
    return ranks, fp, tmp_path


def test_check_against_accepts_matching_and_partial_experts(saved):
    ranks, fp, tmp = saved
    e = Expert.load(random_expert("full", ranks, base_fingerprint=fp).save(tmp / "full.safetensors"))
    e.check_against(ranks, fp, "tiny")
    part = Expert.load(Expert("part", {GATE0: torch.ones(64)}, base_fingerprint=fp).save(tmp / "part"))
    part.check_against(ranks, fp)


def test_check_against_unknown_tensor(saved):
    ranks, fp, tmp = saved
    name = "model.layers.0.self_attn.q_proj.weight"       # exists in the model, but not decomposed
    e = Expert.load(Expert("e", {GATE0: torch.ones(64), name: torch.ones(64)}, base_fingerprint=fp)
                    .save(tmp / "e.safetensors"))
    with pytest.raises(ExpertFormatError) as info:
        e.check_against(ranks, fp)
    msg = str(info.value)
    assert str(tmp / "e.safetensors") in msg and name in msg and info.value.tensor == name
    e2 = Expert.load(Expert("e2", {"model.layers.9.mlp.up_proj.weight": torch.ones(64)}).save(tmp / "e2"))
    with pytest.raises(ExpertFormatError, match="layers.9.mlp.up_proj"):
        e2.check_against(ranks, fp)


@pytest.mark.parametrize("length", [63, 65, 1, 128])
def test_check_against_wrong_length(saved, length):
    ranks, fp, tmp = saved
    name = "model.layers.1.mlp.down_proj.weight"
    e = Expert.load(Expert("e", {name: torch.ones(length)}, base_fingerprint=fp).save(tmp / "e.safetensors"))
    with pytest.raises(ExpertFormatError) as info:
        e.check_against(ranks, fp)
    msg = str(info.value)
    assert str(tmp / "e.safetensors") in msg and name in msg
    assert str(length) in msg and "64" in msg


def test_check_against_other_base(saved):
    ranks, fp, tmp = saved
    other = "0" * 32
    e = Expert.load(random_expert("e", ranks, base_fingerprint=other, base_model="other-llama")
                    .save(tmp / "e.safetensors"))
    with pytest.raises(IncompatibleExpert) as info:
        e.check_against(ranks, fp, "tiny-llama")
    msg = str(info.value)
    assert isinstance(info.value, ExpertError)
    assert str(tmp / "e.safetensors") in msg
    assert other in msg and fp in msg and "other-llama" in msg and "tiny-llama" in msg


def test_check_against_in_memory_expert_names_the_expert(saved):
    ranks, fp, _ = saved
    e = Expert("mem", {GATE0: torch.ones(3)})
    with pytest.raises(ExpertFormatError, match="mem") as info:
        e.check_against(ranks, fp)
    assert GATE0 in str(info.value)


# -- import_reference ---------------------------------------------------------------------------------------------

def _raw_p(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.1 + 0.01 * torch.randn(n, generator=g) + torch.linspace(-2, 2, n)


def test_import_policy_params(tiny_model_dir, tmp_path):
    names = checkpoint_names(tiny_model_dir)
    ranks = model_ranks(tiny_model_dir)
    mlp = [f"model.layers.{i // 3}.mlp.{['gate', 'up', 'down'][i % 3]}_proj.weight" for i in range(6)]
    raw = OrderedDict((f"learnable_params_module_list.{i}", _raw_p(64, i)) for i in range(6))
    path = tmp_path / "policy_params.pt"
    torch.save(raw, path)
    # the checkpoint's names in any order resolve the indices the same way
    for order in (names, list(reversed(names)), sorted(names)):
        e = import_reference(path, order, "imported", label="math", base_fingerprint="ab" * 16)
        assert e.name == "imported" and e.label == "math" and e.base_fingerprint == "ab" * 16
        assert list(e.z) == mlp
        for i, n in enumerate(mlp):
            assert e.z[n].dtype == torch.float32
            torch.testing.assert_close(e.z[n], torch.sigmoid(raw[f"learnable_params_module_list.{i}"]),
                                       rtol=0, atol=0)
    e.check_against(ranks, "ab" * 16)
    # a saved import loads back as a valid expert
    back = Expert.load(e.save(tmp_path / "imported.safetensors"))
    assert all(torch.equal(back.z[n], e.z[n]) for n in mlp)


def test_import_learnable_params(tiny_model_dir, tmp_path):
    names = checkpoint_names(tiny_model_dir)
    raw = {"model.layers.0.mlp.gate_proj.weight": _raw_p(64, 1),
           "model.layers.1.mlp.down_proj.weight": _raw_p(64, 2).to(torch.bfloat16),
           "model.layers.1.mlp.up_proj": _raw_p(64, 3).reshape(64, 1)}       # without '.weight', 2-D
    path = tmp_path / "learnable_params.pt"
    torch.save(raw, path)
    e = import_reference(path, names, "lp")
    assert set(e.z) == {"model.layers.0.mlp.gate_proj.weight", "model.layers.1.mlp.down_proj.weight",
                        "model.layers.1.mlp.up_proj.weight"}
    torch.testing.assert_close(e.z["model.layers.0.mlp.gate_proj.weight"], torch.sigmoid(raw[GATE0]), rtol=0, atol=0)
    torch.testing.assert_close(e.z["model.layers.1.mlp.down_proj.weight"],
                               torch.sigmoid(raw["model.layers.1.mlp.down_proj.weight"].float()), rtol=0, atol=0)
    torch.testing.assert_close(e.z["model.layers.1.mlp.up_proj.weight"],
                               torch.sigmoid(raw["model.layers.1.mlp.up_proj"].flatten()), rtol=0, atol=0)
    assert all(t.dtype == torch.float32 and t.dim() == 1 for t in e.z.values())
    e.check_against(model_ranks(tiny_model_dir), "")


def test_import_index_beyond_mlp_matrices(tiny_model_dir, tmp_path):
    names = checkpoint_names(tiny_model_dir)
    path = tmp_path / "policy_params.pt"
    torch.save({"learnable_params_module_list.0": _raw_p(64, 0),
                "learnable_params_module_list.6": _raw_p(64, 6)}, path)
    with pytest.raises(ExpertFormatError) as info:
        import_reference(path, names, "x")
    msg = str(info.value)
    assert str(path) in msg and "learnable_params_module_list.6" in msg and "6" in msg
    assert info.value.tensor == "learnable_params_module_list.6"


def test_import_errors(tiny_model_dir, tmp_path):
    names = checkpoint_names(tiny_model_dir)
    unknown = tmp_path / "learnable_params.pt"
    torch.save({"model.layers.0.mlp.nope.weight": _raw_p(64, 0)}, unknown)
    with pytest.raises(ExpertFormatError, match="names no parameter") as info:
        import_reference(unknown, names, "x")
    assert str(unknown) in str(info.value) and "model.layers.0.mlp.nope.weight" in str(info.value)

    not_dict = tmp_path / "list.pt"
    torch.save([_raw_p(64, 0)], not_dict)
    with pytest.raises(ExpertFormatError, match="dict of tensors"):
        import_reference(not_dict, names, "x")

    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a pickle")
    with pytest.raises(ExpertFormatError, match="weights_only") as info:
        import_reference(garbage, names, "x")
    assert str(garbage) in str(info.value)


class Evil:  # any non-tensor object needs full unpickling, which weights_only=True refuses
    pass


def test_import_refuses_arbitrary_pickles(tiny_model_dir, tmp_path):
    path = tmp_path / "policy_params.pt"
    torch.save({"learnable_params_module_list.0": Evil()}, path)
    with pytest.raises(ExpertFormatError):
        import_reference(path, checkpoint_names(tiny_model_dir), "x")
