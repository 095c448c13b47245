"""vLLM's engine arguments from `t2 serve` (issue 11, part 1): every ServerConfig flag for vLLM reaches
AsyncEngineArgs (built without starting vLLM), and the pass-through is checked against AsyncEngineArgs' own
fields and types: a bad one is a one-line startup error of the real CLI, before any port is bound."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("vllm", reason="vllm is not installed (README, section 'vLLM engine')")

from server.config import ServerConfig  # noqa: E402
from server.engines.factory import EngineConfig, make_engine  # noqa: E402
from server.engines.vllm import InvalidEngineArgs  # noqa: E402
from tests.test_startup import one_line_error, serve  # noqa: E402


def engine_args(model_dir, tmp_path, **fields):
    cfg = ServerConfig(model=model_dir, engine="vllm", cache_dir=tmp_path, **fields)
    return make_engine(EngineConfig.from_server_config(cfg))._engine_args()


def test_every_vllm_flag_reaches_async_engine_args(tiny_model_dir, tmp_path):
    extra = {"max_num_batched_tokens": 512, "block_size": 32, "kv_cache_dtype": "auto"}
    a = engine_args(tiny_model_dir, tmp_path, tensor_parallel_size=2, pipeline_parallel_size=3,
                    distributed_executor_backend="ray", max_model_len=96, gpu_memory_utilization=0.42,
                    enforce_eager=False, vllm_engine_args=json.dumps(extra))
    assert (a.tensor_parallel_size, a.pipeline_parallel_size, a.distributed_executor_backend) == (2, 3, "ray")
    assert (a.max_model_len, a.gpu_memory_utilization, a.enforce_eager) == (96, 0.42, False)
    assert (a.max_num_batched_tokens, a.block_size, a.kv_cache_dtype) == (512, 32, "auto")
    # ours are untouched by the flags
    assert a.model == str(tiny_model_dir) and a.worker_extension_cls.endswith("T2Worker")


def test_the_defaults(tiny_model_dir, tmp_path):
    a = engine_args(tiny_model_dir, tmp_path)
    # one rank runs in the engine-core process; eager on a CPU (this machine: no GPU)
    assert (a.tensor_parallel_size, a.pipeline_parallel_size, a.distributed_executor_backend) == (1, 1, "uni")
    assert a.gpu_memory_utilization == 0.85 and a.max_model_len is None
    import torch
    assert a.enforce_eager == (not torch.cuda.is_available())
    b = engine_args(tiny_model_dir, tmp_path, tensor_parallel_size=2)
    assert b.distributed_executor_backend is None       # vLLM's own choice (mp on one node) for several ranks


def test_env_vars_set_them_too(tiny_model_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from server.cli import app
    seen = {}

    def fake_startup(cfg):               # stop `serve` right after the config: nothing to start here
        seen["cfg"] = cfg
        raise InvalidEngineArgs("stop")
    monkeypatch.setattr("server.engines.factory.check_startup", fake_startup)
    env = {"T2_ENGINE": "vllm", "T2_TENSOR_PARALLEL_SIZE": "2", "T2_PIPELINE_PARALLEL_SIZE": "2",
           "T2_DISTRIBUTED_EXECUTOR_BACKEND": "mp", "T2_MAX_MODEL_LEN": "64", "T2_GPU_MEMORY_UTILIZATION": "0.5",
           "T2_ENFORCE_EAGER": "true", "T2_VLLM_ENGINE_ARGS": '{"block_size": 16}'}
    r = CliRunner().invoke(app, ["serve", "--model", str(tiny_model_dir), "--cache-dir", str(tmp_path)], env=env)
    assert r.exit_code == 1 and "stop" in r.output
    o = seen["cfg"].vllm
    assert (o.tensor_parallel_size, o.pipeline_parallel_size, o.distributed_executor_backend) == (2, 2, "mp")
    assert (o.max_model_len, o.gpu_memory_utilization, o.enforce_eager) == (64, 0.5, True)
    assert dict(o.engine_args) == {"block_size": 16}


@pytest.mark.parametrize("extra, says", [
    ({"no_such_argument": 1}, "has no argument 'no_such_argument'"),
    ({"max_num_batched_tokens": "many"}, "max_num_batched_tokens"),
    ({"block_size": 1.5}, "block_size"),
    ({"enable_chunked_prefill": "yes"}, "enable_chunked_prefill"),
    ({"tensor_parallel_size": 2}, "use --tensor-parallel-size"),
    ({"worker_extension_cls": "x.Y"}, "set by t2 itself"),
])
def test_a_bad_pass_through_argument_is_refused(extra, says, tiny_model_dir, tmp_path):
    with pytest.raises(InvalidEngineArgs, match=says.replace("(", r"\(")):
        engine_args(tiny_model_dir, tmp_path, vllm_engine_args=json.dumps(extra))


def test_a_bad_pass_through_is_a_one_line_cli_error(tiny_model_dir, tmp_path):
    line = one_line_error(serve("--model", tiny_model_dir, "--engine", "vllm", "--cache-dir", tmp_path,
                                "--vllm-engine-args", '{"max_num_seqs_typo": 4}'), allow_logs=True)
    assert "max_num_seqs_typo" in line and "AsyncEngineArgs" in line
    line = one_line_error(serve("--model", tiny_model_dir, "--engine", "vllm", "--cache-dir", tmp_path,
                                "--vllm-engine-args", "[1, 2]"), allow_logs=True)
    assert "--vllm-engine-args" in line and "JSON object" in line
