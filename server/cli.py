"""The `t2` command line: serve, decompose, import-expert, experts (list / inspect / create), chat, bench.

Contract: `t2 serve`'s flags are generated from the fields of ServerConfig (server/config.py), each with its
environment variable T2_<FIELD>; before it binds the port it checks the model folder, every expert file and
the engine's settings (server/engines/factory.py check_startup). decompose / import-expert / experts work on
files only (no server needed); chat and bench talk to a running server (clients/). All print errors as one
line, with exit code 1.
"""

from __future__ import annotations

import enum
import inspect
import logging
import sys
import typing
from pathlib import Path
from typing import Optional

import typer

from experts.errors import ExpertError
from server.cli_train import register as register_training
from server.config import ENV_PREFIX, ServerConfig

app = typer.Typer(help="Transformer² server: self-adaptive LLMs behind an OpenAI-compatible API.",
                  no_args_is_help=True, pretty_exceptions_enable=False)
experts_app = typer.Typer(help="List, inspect and create expert files.", no_args_is_help=True)
app.add_typer(experts_app, name="experts")
register_training(app)   # t2 train, t2 train-classifier (server/cli_train.py)


def _cli_type(annotation: object) -> object:
    """Map a config field's type to one typer understands (Literal/Enum → str, Optional[X] → X)."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return Optional[_cli_type(args[0])]
    if origin is typing.Literal or (inspect.isclass(annotation) and issubclass(annotation, enum.Enum)):
        return str
    if origin is dict:       # a JSON object on the command line (ServerConfig parses it)
        return Optional[str]
    return annotation


def _config_command(fn):
    """Give `fn(**fields)` one typer option per ServerConfig field, with its env var and help."""
    params = []
    for name, field in ServerConfig.model_fields.items():
        default = field.get_default(call_default_factory=True)
        default = default.value if isinstance(default, enum.Enum) else (None if default == {} else default)
        choices = typing.get_args(field.annotation) if typing.get_origin(field.annotation) is typing.Literal else ()
        if inspect.isclass(field.annotation) and issubclass(field.annotation, enum.Enum):
            choices = tuple(m.value for m in field.annotation)
        help_ = (field.description or "") + (f" [{'|'.join(map(str, choices))}]" if choices else "")
        flag = "--" + name.replace("_", "-")
        if field.annotation in (bool, Optional[bool]):
            flag = f"{flag}/--no-{name.replace('_', '-')}"
        opt = typer.Option(default, flag, envvar=ENV_PREFIX + name.upper(), help=help_, show_envvar=True)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=opt,
                                        annotation=_cli_type(field.annotation)))
    fn.__signature__ = inspect.Signature(params)
    return fn


def _fail(e: Exception) -> typing.NoReturn:
    typer.secho(f"error: {_one_line(e)}", fg=typer.colors.RED, err=True)
    raise typer.Exit(1)


def _one_line(e: Exception) -> str:
    """An error as one line (a pydantic ValidationError lists every bad field, each as `field: message`)."""
    from pydantic import ValidationError
    if isinstance(e, ValidationError):
        return "; ".join(("--" + "-".join(map(str, err["loc"])).replace("_", "-") + ": " if err["loc"] else "")
                         + err["msg"].removeprefix("Value error, ") for err in e.errors())
    return " ".join(str(e).split())


@app.command()
@_config_command
def serve(**fields) -> None:
    """Start the OpenAI-compatible server (default: the embedded SmolLM2-135M-Instruct on this machine)."""
    import uvicorn
    from pydantic import ValidationError

    from server.engines.factory import EngineConfig, StartupError, check_startup, in_own_thread, make_engine
    # 1. the config (every value checked once)
    try:
        config = ServerConfig(**fields)
    except ValidationError as e:
        _fail(e)
    from server import logs
    logs.configure(config.log_level, config.log_format)
    # 2. before any port is bound: the model folder, the experts (each file against the base), the engine's
    #    settings (vLLM's engine arguments included); each failure is one line naming the file, exit 1
    try:
        def prepare() -> EngineConfig:        # in a thread that ends: no OpenMP pool left behind (in_own_thread)
            cfg = EngineConfig.from_server_config(config)
            check_startup(cfg)
            return cfg
        engine_config = in_own_thread(prepare)
        if config.ray:        # each replica makes its own engine (server/ray_serve.py, the one module importing ray)
            try:
                from server.ray_serve import run as run_on_ray
            except ImportError as e:
                raise StartupError(f"--ray needs Ray Serve: pip install 't2-server[ray]' ({e})") from None
            try:
                return run_on_ray(config)
            except Exception as e:  # noqa: BLE001 - Ray's own failures (a node that did not start, ...) as one line
                raise StartupError(f"Ray Serve: {e}") from None
        engine = make_engine(engine_config)
    except (StartupError, ExpertError, ImportError, OSError) as e:
        _fail(e)
    from server.api.app import create_app
    application = create_app(config, engine)
    # 3. serve. SIGTERM / Ctrl-C: stop accepting, let in-flight requests finish (up to graceful_timeout_s),
    #    then end the rest in the OpenAI shape (streams: an error event and [DONE]) and exit (SIGTERM: exit 0,
    #    as orchestrators expect; uvicorn alone re-raises it). uvicorn's own deadline, which cancels tasks
    #    mid-response, is a margin later and only a backstop.
    server = _DrainingServer(uvicorn.Config(application, host=config.host, port=config.port,
                                            log_level=config.log_level, access_log=False,
                                            log_config=logs.uvicorn_log_config(config.log_level, config.log_format),
                                            timeout_graceful_shutdown=config.graceful_timeout_s + _CUT_MARGIN_S))
    server.grace_s, server.stop_requests = config.graceful_timeout_s, application.state.shutdown.stop
    server.run()


_CUT_MARGIN_S = 10.0     # between ending the open requests and uvicorn cancelling what is left


def _draining_server_class():
    import signal as _signal

    import uvicorn

    class DrainingServer(uvicorn.Server):
        grace_s: float = 0.0
        stop_requests = staticmethod(lambda: None)

        async def shutdown(self, sockets=None) -> None:
            import asyncio
            timer = asyncio.get_running_loop().call_later(self.grace_s, self.stop_requests)
            try:
                await super().shutdown(sockets)
            finally:
                timer.cancel()

        def handle_exit(self, sig, frame) -> None:
            super().handle_exit(sig, frame)
            if sig == _signal.SIGTERM:
                self._captured_signals.remove(sig)    # a drained SIGTERM is a clean exit (code 0)

    return DrainingServer


def _DrainingServer(config):  # noqa: N802 - a lazy class (uvicorn imported only to serve)
    return _draining_server_class()(config)


def _model_dir(model: Optional[Path], cache_dir: Optional[Path]) -> Path:
    if model is not None:
        return model
    from server.default_model import default_cache_dir, ensure_default_model
    return ensure_default_model(cache_dir or default_cache_dir())


def _targets(attention: bool) -> tuple[str, ...]:
    from experts.svd import ATTENTION_TARGETS, MLP_TARGETS
    return MLP_TARGETS + (ATTENTION_TARGETS if attention else ())


@app.command()
def decompose(model: Optional[Path] = typer.Option(None, help="HF model folder (default: the embedded model)."),
              attention: bool = typer.Option(False, help="Also the attention projections."),
              cache_dir: Optional[Path] = typer.Option(None, envvar="T2_CACHE_DIR"),
              device: str = typer.Option("cpu", help="Where to run the SVD (cpu, cuda).")) -> None:
    """Compute (or verify) the cached SVD factors of a model, as `serve` would at start."""
    from server.default_model import default_cache_dir
    from experts.svd import load_factors
    logging.basicConfig(level="INFO", format="%(message)s")
    cache = cache_dir or default_cache_dir()
    model_dir = _model_dir(model, cache)
    try:
        factors, fp = load_factors(model_dir, cache / "factors" / model_dir.name, _targets(attention), device=device)
    except ExpertError as e:
        _fail(e)
    typer.echo(f"{len(factors)} matrices, fingerprint {fp}, cache {cache / 'factors' / model_dir.name}")


def _save_checked(expert, model_dir: Path, out: Path, attention: bool) -> None:
    from experts.svd import model_fingerprint, model_ranks
    fp = model_fingerprint(model_dir)
    expert.base_model, expert.base_fingerprint = expert.base_model or model_dir.name, fp
    expert.check_against(model_ranks(model_dir, _targets(attention)), fp, model_dir.name)
    path = expert.save(out / f"{expert.name}.safetensors")
    typer.echo(f"wrote {path} ({len(expert.z)} matrices, {expert.num_params} values)")


@app.command("import-expert")
def import_expert(path: Path = typer.Argument(..., help="policy_params.pt or learnable_params.pt"),
                  name: str = typer.Option(..., help="Expert name (the file's stem)."),
                  label: str = typer.Option("", help="math | code | reasoning | classifier | ..."),
                  description: str = typer.Option(""),
                  model: Optional[Path] = typer.Option(None, help="Base model folder (default: embedded)."),
                  out: Path = typer.Option(Path("."), help="Folder to write <name>.safetensors into."),
                  attention: bool = typer.Option(False)) -> None:
    """Convert an expert of the reference implementation (SakanaAI/self-adaptive-llms) to our format."""
    from experts.expert import import_reference
    from experts.svd import checkpoint_names
    try:
        model_dir = _model_dir(model, None)
        e = import_reference(path, checkpoint_names(model_dir), name, label=label, description=description)
        _save_checked(e, model_dir, out, attention)
    except ExpertError as e:
        _fail(e)


@experts_app.command("create")
def create(name: str = typer.Argument(..., help="Expert name (the file's stem)."),
           label: str = typer.Option("", help="math | code | reasoning | classifier | ..."),
           description: str = typer.Option(""),
           z: Optional[Path] = typer.Option(None, help="safetensors file of HF name → z vectors."),
           uniform: Optional[float] = typer.Option(None, help="Same z everywhere (the identity)."),
           random: Optional[float] = typer.Option(None, help="z = 1 + RANDOM·N(0,1), for plumbing tests."),
           seed: int = typer.Option(0),
           model: Optional[Path] = typer.Option(None, help="Base model folder (default: embedded)."),
           out: Path = typer.Option(Path("."), help="Folder to write <name>.safetensors into."),
           attention: bool = typer.Option(False)) -> None:
    """Make an expert file from given z-vectors (or a uniform / random one) for a base model."""
    from safetensors.torch import load_file
    from experts.expert import Expert, random_expert, uniform_expert
    from experts.svd import model_ranks
    if sum(x is not None for x in (z, uniform, random)) != 1:
        _fail(ValueError("give exactly one of --z, --uniform, --random"))
    try:
        model_dir = _model_dir(model, None)
        ranks = model_ranks(model_dir, _targets(attention))
        meta = dict(label=label, description=description)
        if z is not None:
            e = Expert(name=name, z={k: v.float() for k, v in load_file(str(z)).items()}, **meta)
        elif uniform is not None:
            e = uniform_expert(name, ranks, uniform, **meta)
        else:
            e = random_expert(name, ranks, random, seed, **meta)
        _save_checked(e, model_dir, out, attention)
    except ExpertError as e:
        _fail(e)


@experts_app.command("list")
def list_experts(folder: Optional[Path] = typer.Argument(None, help="Default: the embedded model's experts.")) -> None:
    """One line per expert file: name, label, matrices, values, base model, description."""
    from experts.expert import Expert
    from server.default_model import default_experts_dir
    folder = folder or default_experts_dir()
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        typer.echo(f"no experts in {folder}")
    for f in files:
        try:
            e = Expert.load(f)
            typer.echo(f"{e.name:20s} {e.label:11s} {len(e.z):4d} matrices {e.num_params:9d} values  "
                       f"{e.base_model}  {e.description}")
        except ExpertError as err:
            typer.echo(f"{f.stem:20s} INVALID: {err}")


@experts_app.command("inspect")
def inspect_expert(path: Path) -> None:
    """Metadata and per-matrix statistics of one expert file."""
    from experts.expert import Expert
    try:
        e = Expert.load(path)
    except ExpertError as err:
        _fail(err)
    typer.echo(f"name: {e.name}\nlabel: {e.label}\ndescription: {e.description}\nbase_model: {e.base_model}\n"
               f"base_fingerprint: {e.base_fingerprint}\nmatrices: {len(e.z)}\nvalues: {e.num_params}")
    for n, t in e.z.items():
        typer.echo(f"  {n:45s} len {t.numel():5d}  mean {t.mean():.4f}  std {t.std():.4f}  "
                   f"min {t.min():.4f}  max {t.max():.4f}")


# ---- clients (need a running server; see clients/) ----
@app.command()
def chat(base_url: str = typer.Option("http://127.0.0.1:8000/v1", envvar="T2_BASE_URL", help="The server's /v1 URL."),
         api_key: Optional[str] = typer.Option(None, envvar="T2_API_KEY", help="Bearer key, if the server wants one."),
         model: str = typer.Option("auto", help="Model id: auto, the base, or <base>:<expert>."),
         expert: Optional[str] = typer.Option(None, help="Answer with this expert."),
         mix: Optional[str] = typer.Option(None, help="Answer with a blend, e.g. math=0.7,code=0.3."),
         dispatch: Optional[str] = typer.Option(None, help="prompt | classifier | none for this session."),
         system: Optional[str] = typer.Option(None, help="A system prompt."),
         max_tokens: int = typer.Option(256), temperature: float = typer.Option(0.7),
         report: bool = typer.Option(True, help="Print the t2 report after each answer.")) -> None:
    """Chat with a running server (streaming); /expert, /mix, /dispatch, /auto change the adaptation."""
    from clients.chat import run_chat
    from clients.t2client import T2Client, parse_mix
    try:
        client = T2Client(base_url, api_key, max_retries=0)
        code = run_chat(client, model=model, system=system, max_tokens=max_tokens, temperature=temperature,
                        expert=expert, experts=parse_mix(mix) if mix else None, dispatch=dispatch,
                        show_report=report)
    except ValueError as e:
        _fail(e)
    raise typer.Exit(code)


@app.command()
def bench(base_url: str = typer.Option("http://127.0.0.1:8000/v1", envvar="T2_BASE_URL", help="The server's /v1 URL."),
          api_key: Optional[str] = typer.Option(None, envvar="T2_API_KEY"),
          endpoint: str = typer.Option("chat", help="chat | completions"),
          num_prompts: int = typer.Option(100, min=1),
          request_rate: float = typer.Option(float("inf"), help="Requests per second (Poisson); inf = all at once."),
          max_concurrency: Optional[int] = typer.Option(None, min=1, help="Most requests in flight."),
          dataset: str = typer.Option("random", help="random | file"),
          dataset_path: Optional[Path] = typer.Option(None, help="JSONL ('prompt' or 'text') or text lines."),
          input_len: int = typer.Option(64, min=1, help="Random prompts: words per prompt."),
          output_len: int = typer.Option(64, min=1, help="max_tokens per request."),
          range_ratio: float = typer.Option(0.0, min=0.0, max=1.0, help="Lengths vary by ±this ratio."),
          experts: str = typer.Option("auto", help="Workload mix: target=weight,... (expert name, auto, base, "
                                      "prompt, classifier, a+b)."),
          ignore_eos: bool = typer.Option(False, help="Generate exactly output_len tokens."),
          temperature: float = typer.Option(0.0),
          percentiles: str = typer.Option("50,90,99", help="Percentiles to report."),
          seed: int = typer.Option(0),
          result_file: Optional[Path] = typer.Option(None, help="Write the summary (and every request) as JSON.")) -> None:
    """Load-test a running server like `vllm bench serve`: TTFT / TPOT / ITL / E2E percentiles, throughput."""
    import asyncio
    import json as _json
    from clients.bench import format_summary, make_requests, parse_targets, run_bench
    try:
        reqs = make_requests(num_prompts, dataset=dataset, path=dataset_path, input_len=input_len,
                             output_len=output_len, range_ratio=range_ratio, targets=parse_targets(experts), seed=seed)
        summary = asyncio.run(run_bench(base_url, reqs, api_key=api_key, endpoint=endpoint,
                                        request_rate=request_rate, max_concurrency=max_concurrency,
                                        ignore_eos=ignore_eos, temperature=temperature,
                                        percentiles=[float(p) for p in percentiles.split(",")], seed=seed))
    except (ValueError, OSError) as e:
        _fail(e)
    typer.echo(format_summary(summary))
    if result_file is not None:
        result_file.write_text(_json.dumps(summary, indent=2))
        typer.echo(f"wrote {result_file}")
    raise typer.Exit(1 if summary["completed"] == 0 else 0)


def main() -> None:  # pragma: no cover
    app(prog_name="t2")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
