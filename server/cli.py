"""`loraplex` command line: every Settings field is a flag, so flags, env vars and defaults never drift apart."""

from __future__ import annotations

import argparse
import logging
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

import pydantic
from pydantic import SecretStr
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings

from server.adapters.cli import add_adapters_parser
from server.settings import ClusterSettings, Settings
from server.tenants.cli import add_keys_parser

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
log = logging.getLogger(__name__)


# Shorter spellings of some flags, besides the one named after the field.
FLAG_ALIASES: dict[str, tuple[str, ...]] = {"api_keys_file": ("--api-keys",)}


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def env_name(field: str) -> str:
    return f"{Settings.model_config.get('env_prefix', '')}{field}".upper()


def add_settings_arguments(parser: argparse.ArgumentParser, settings: type[BaseSettings] = Settings) -> None:
    """One flag per field of `settings`; only flags given on the command line reach it, which reads the rest."""
    for name, field in settings.model_fields.items():
        parser.add_argument(
            flag_name(name), *FLAG_ALIASES.get(name, ()), dest=name, default=argparse.SUPPRESS,
            help=_help(name, field), **_kind(field),
        )  # fmt: skip


def _help(name: str, field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True)
    default = "" if value is None else f"; default: {value}"
    as_json = " as a JSON list" if typing.get_origin(field.annotation) is list else ""
    return f"{field.description} (env: {env_name(name)}{as_json}{default})"


def _kind(field: FieldInfo) -> dict[str, Any]:
    """How argparse reads the flag: literals as choices, lists as repeated flags, the rest as text for pydantic."""
    annotation = field.annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        annotation = next(arg for arg in typing.get_args(annotation) if arg is not type(None))
    if typing.get_origin(annotation) is typing.Literal:
        return {"choices": [str(choice) for choice in typing.get_args(annotation)]}
    if typing.get_origin(annotation) is list:  # a repeatable flag: `--merged a --merged b` gives ["a", "b"]
        return {"action": "append", "metavar": "TEXT"}
    if annotation is bool:  # a switch pair: `--enable-prefix-caching` / `--no-enable-prefix-caching`
        return {"action": argparse.BooleanOptionalAction}
    return {"metavar": "TEXT" if annotation in (str, SecretStr) else getattr(annotation, "__name__", "value").upper()}


def settings_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Settings:
    """Settings with precedence flag > LORAPLEX_* env var > default; invalid values end in a usage error."""
    overrides = {name: value for name, value in vars(args).items() if name in Settings.model_fields}
    try:
        return Settings(**overrides)
    except pydantic.ValidationError as exc:
        problems = "; ".join(_describe(error) for error in exc.errors())
        parser.error(f"invalid settings: {problems}")


def cluster_settings_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> ClusterSettings:
    """The serve-ray options, with the same precedence and errors as `settings_from_args`."""
    overrides = {name: value for name, value in vars(args).items() if name in ClusterSettings.model_fields}
    try:
        return ClusterSettings(**overrides)
    except pydantic.ValidationError as exc:
        parser.error(f"invalid settings: {'; '.join(_describe(error) for error in exc.errors())}")


def _describe(error: Any) -> str:
    name = str(error["loc"][0]) if error["loc"] else ""
    known = name in Settings.model_fields or name in ClusterSettings.model_fields
    where = f"{flag_name(name)} / {env_name(name)}" if known else name
    return f"{where}: {error['msg']}"


def serve(settings: Settings) -> int:
    """Run the API server until interrupted; the engine builds in the background while /health answers 503.

    A checkpoint the forward cannot serve stops it first: exit status 1 and the reason, not a server answering 503.
    """
    import uvicorn

    from server.api import create_app
    from server.engine.factory import build_engine
    from server.errors import ConfigurationError
    from server.model.default_model import default_model_dir
    from server.model.loader import check_checkpoint

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    try:
        check_checkpoint(settings.model or default_model_dir())
    except ConfigurationError as e:
        log.error("loraplex serve: %s", e)
        return 1
    app = create_app(settings, build_engine)
    uvicorn.run(app, host=settings.host, port=settings.port, log_config=None, timeout_graceful_shutdown=30)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description="Serve many LoRA/DoRA adapters on one base model.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve_parser = commands.add_parser(
        "serve",
        help="run the OpenAI-compatible server",
        description="Run the OpenAI-compatible server. Every flag can also be set by its LORAPLEX_* variable.",
    )
    add_settings_arguments(serve_parser)
    serve_parser.set_defaults(run=lambda args: serve(settings_from_args(args, serve_parser)))
    add_serve_ray_parser(commands)
    prepare_parser = commands.add_parser(
        "prepare-model",
        help="convert the bundled SmolLM2 GGUF into the cached safetensors checkpoint; build the fused kernels",
        description="Prepare the default model once (make serve and make test run this), and build the fused bf16 "
        "kernels where this CPU serves bf16; later starts take seconds.",
    )
    prepare_parser.set_defaults(run=lambda args: prepare_model())
    add_adapters_parser(commands)
    add_keys_parser(commands)
    return parser


def add_serve_ray_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "serve-ray",
        help="run the server as a Ray Serve application of several engine replicas",
        description="Serve the same API from --replicas engines on Ray Serve: on a local Ray head, or on the "
        "cluster RAY_ADDRESS names. Every serve flag applies to each replica. Needs `pip install 'loraplex[ray]'`.",
    )
    add_settings_arguments(parser)
    add_settings_arguments(parser, ClusterSettings)
    parser.set_defaults(run=lambda args: serve_ray(args, parser))


def serve_ray(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Deploy the Ray Serve application and serve until interrupted; Ray is imported only here."""
    settings = settings_from_args(args, parser)
    cluster = cluster_settings_from_args(args, parser)
    try:
        from server.cluster.launch import run_cluster
    except ImportError as exc:
        parser.error(f"serve-ray needs Ray Serve ({exc}); install it with: pip install 'loraplex[ray]'")
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    run_cluster(settings, cluster)


def prepare_model() -> None:
    """Convert the default model if its cached checkpoint is missing, then print where it is; build the fused
    kernels if `--dtype auto` serves bf16 on this CPU (a later start then only loads them)."""
    import torch

    from server.model.default_model import default_model_dir
    from server.model.kernels import use_fused_kernels
    from server.model.precision import choose_dtype

    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    cpu = torch.device("cpu")
    use_fused_kernels(choose_dtype("auto", cpu).dtype, cpu)
    print(default_model_dir())


def main(argv: Sequence[str] | None = None) -> int:
    """Run a command; its exit status (0 unless it says otherwise)."""
    args = build_parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int | None] = args.run
    return run(args) or 0
