"""The `tessera` command: serve | gateway | worker | prepare-model.

Every `ServerSettings` field is a flag, generated from the model so `--help` can never drift
from what the settings accept; flags override `TESSERA_*` env, which overrides tessera.yaml.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic.fields import FieldInfo

from prompt_pipeline.securitylingua.cli import add_securitylingua_parser
from server.config import CONFIG_ENV, ServerSettings
from server.ray_cluster import add_cluster_parser


def _is_list(field: FieldInfo) -> bool:
    annotation = field.annotation
    if get_origin(annotation) is list:
        return True
    return any(get_origin(arg) is list for arg in get_args(annotation))


def _help_text(field: FieldInfo) -> str:
    """A setting's description and default, escaped for argparse (which %-formats help)."""
    default = field.default_factory() if field.default_factory else field.default
    return f"{field.description} (default: {default})".replace("%", "%%")


def _add_settings_flags(parser: argparse.ArgumentParser, only: set[str] | None = None) -> None:
    group = parser.add_argument_group(
        "settings (also TESSERA_<NAME> env or tessera.yaml section 'server')")
    for name, field in ServerSettings.model_fields.items():
        if only is not None and name not in only:
            continue
        flag = "--" + name.replace("_", "-")
        help_text = _help_text(field)
        if field.annotation is bool:
            group.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                               default=None, help=help_text)
        elif _is_list(field):
            # `--worker-url A --worker-url B` reads better than the plural for one value.
            aliases = [flag, flag[:-1]] if flag.endswith("s") else [flag]
            group.add_argument(*aliases, dest=name, action="append", default=None,
                               metavar="VALUE", help=help_text + "; repeat for several")
        else:
            group.add_argument(flag, dest=name, default=None, metavar="VALUE", help=help_text)


def _add_attention_flags(parser: argparse.ArgumentParser) -> None:
    from attention_backends.config import AttentionSettings

    group = parser.add_argument_group(
        "worker attention (also TESSERA_ATTENTION_<NAME> env or tessera.yaml section 'attention')")
    for name, field in AttentionSettings.model_fields.items():
        group.add_argument("--attention-" + name.replace("_", "-"), dest=f"attention_{name}",
                           default=None, metavar="VALUE", help=_help_text(field))


def _export_attention_flags(args: argparse.Namespace) -> None:
    # Workers are separate processes whose plugin reads only env and YAML: hand flags over.
    for key, value in vars(args).items():
        if key.startswith("attention_") and value is not None:
            os.environ[f"TESSERA_{key.upper()}"] = str(value)


def _settings_from(args: argparse.Namespace) -> ServerSettings:
    explicit: dict[str, Any] = {
        name: getattr(args, name)
        for name in ServerSettings.model_fields
        if getattr(args, name, None) is not None
    }
    return ServerSettings(**explicit)


def _apply_config_flag(args: argparse.Namespace) -> None:
    if args.config:
        # Through the environment, so worker processes (and their plugin) read the same file.
        os.environ[CONFIG_ENV] = str(Path(args.config).resolve())


def _cmd_serve(args: argparse.Namespace) -> int:
    from server.launcher import serve

    return serve(_settings_from(args))


def _cmd_gateway(args: argparse.Namespace) -> int:
    from server.launcher import serve

    settings = _settings_from(args).model_copy(update={"workers": 0})
    if not settings.worker_urls:
        print("tessera gateway: give --worker-url URL (or TESSERA_WORKER_URLS)", file=sys.stderr)
        return 2
    return serve(settings)


def _cmd_worker(args: argparse.Namespace) -> int:
    from server.launcher import resolve_model_path, worker_command, worker_env

    settings = _settings_from(args)
    model_path = resolve_model_path(settings)
    command = worker_command(settings, model_path, settings.worker_host, settings.worker_base_port)
    # Replace this process: signals from a container runtime reach vLLM directly.
    os.execve(command[0], command, worker_env(settings, 0))
    return 0  # not reached


def _cmd_prepare_model(args: argparse.Namespace) -> int:
    from server.model_prep import prepare_model

    print(prepare_model(_settings_from(args).data_dir))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tessera", description="tessera-serve: OpenAI-compatible LLM serving on vLLM."
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", help=f"YAML config file (default: ${CONFIG_ENV} or "
                        "./tessera.yaml)")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", parents=[common],
                                help="launch vLLM workers and the gateway")
    _add_settings_flags(serve)
    _add_attention_flags(serve)
    serve.set_defaults(func=_cmd_serve)

    gateway = commands.add_parser("gateway", parents=[common],
                                  help="run only the gateway, over running workers")
    _add_settings_flags(gateway)
    gateway.set_defaults(func=_cmd_gateway)

    worker_fields = {"data_dir", "model_path", "served_model_name", "dtype", "max_model_len",
                     "enforce_eager", "kv_cache_space_gib", "worker_extra_args"}
    worker = commands.add_parser("worker", parents=[common],
                                 help="run one vLLM worker with tessera's plugin")
    worker.add_argument("--host", dest="worker_host", default=None, help="bind address")
    worker.add_argument("--port", dest="worker_base_port", default=None, help="port")
    _add_settings_flags(worker, worker_fields)
    _add_attention_flags(worker)
    worker.set_defaults(func=_cmd_worker)

    prepare = commands.add_parser("prepare-model", parents=[common],
                                  help="convert the embedded model once")
    _add_settings_flags(prepare, {"data_dir"})
    prepare.set_defaults(func=_cmd_prepare_model)
    add_cluster_parser(commands)
    add_securitylingua_parser(commands)
    _add_model_tool_parsers(commands)
    from mobile.cli import add_mobile_parser  # argparse only; mobile/ imports nothing of ours

    add_mobile_parser(commands)
    return parser


# Offline model tools whose packages import torch at import time. The gateway image has no
# torch (it only proxies), and its `tessera` must still start: there these commands are absent.
_MODEL_TOOL_PARSERS = (
    ("attention_backends.patterns.minference.cli", "add_patterns_parser"),
    ("kv_manager.leank.cli", "add_leank_parser"),
)


def _add_model_tool_parsers(commands: argparse._SubParsersAction) -> None:
    for module_name, function in _MODEL_TOOL_PARSERS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name != "torch":  # only a torch-less install may lack them
                raise
            continue
        getattr(module, function)(commands)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _apply_config_flag(args)
    _export_attention_flags(args)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
