"""`loraplex adapters list|add|rm|verify`: the adapter store, offline, with the same checks and atomic writes as the
admin API. Stop the server or use the admin API to change a store a server is using: a running server only sees
folders added or removed by hand when it next looks (and keeps serving what it holds)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.adapters.store import MODES, AdapterMeta, AdapterStore, now
from server.errors import LoraplexError
from server.settings import Settings

if TYPE_CHECKING:
    from server.adapters.weights import ModelInfo

ROW = "{:24} {:>4} {:>6} {:5} {:6} {:>10} {:8} {}"  # the columns of `list`


def add_adapters_parser(commands: Any) -> None:
    """Register the `adapters` command and its subcommands on the top-level subparsers."""
    parser = commands.add_parser(
        "adapters", help="list, add, remove or verify the adapters of a store", description=__doc__
    )
    parser.add_argument("--store", type=Path, default=None, help="store directory (default: --adapters-store's)")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("list", help="the adapters in the store").set_defaults(run=_list)
    add = actions.add_parser("add", help="check an adapter folder and copy it into the store atomically")
    add.add_argument("name")
    add.add_argument("source", type=Path, help="a PEFT adapter folder")
    add.add_argument("--replace", action="store_true", help="overwrite an adapter of that name")
    add.add_argument("--mode", choices=MODES, default="unmerged", help="merge mode (default: unmerged)")
    add.add_argument("--pinned", action="store_true", help="keep it resident on the device")
    _add_model_arguments(add)
    add.set_defaults(run=_add)
    rm = actions.add_parser("rm", help="remove an adapter from the store")
    rm.add_argument("name")
    rm.set_defaults(run=_rm)
    verify = actions.add_parser("verify", help="check adapters against the base model, as an upload is checked")
    verify.add_argument("targets", nargs="*", help="adapter names in the store or adapter folders (default: all)")
    _add_model_arguments(verify)
    verify.set_defaults(run=_verify)


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None, help="base model checkpoint (default: the default model)")
    parser.add_argument("--max-lora-rank", type=int, default=None, help="largest rank accepted (default: serve's)")


def _store(args: argparse.Namespace) -> AdapterStore:
    return AdapterStore(args.store or Settings().adapters_store)


def _model_info(args: argparse.Namespace) -> tuple[ModelInfo, int]:
    """What the checks need of the base model, read from the checkpoint on the CPU, and the rank limit."""
    import torch

    from server.adapters.weights import ModelInfo
    from server.model.default_model import default_model_dir
    from server.model.loader import load_model

    settings = Settings()
    loaded = load_model(args.model or settings.model or default_model_dir(), torch.device("cpu"), torch.float32)
    return ModelInfo.from_model(loaded.model), args.max_lora_rank or settings.max_lora_rank


def _list(args: argparse.Namespace) -> int:
    from server.adapters.records import describe_adapter_dir  # torch, loaded only when a command needs it

    store = _store(args)
    print(ROW.format("NAME", "RANK", "ALPHA", "DORA", "DTYPE", "BYTES", "MODE", "PINNED"))
    failed = 0
    for name in store.names():
        meta = store.read_meta(name)
        try:
            r = describe_adapter_dir(store.path(name))
        except LoraplexError as exc:
            failed += _problem(name, exc)
            continue
        print(ROW.format(name, r.rank, f"{r.alpha:g}", str(r.dora), r.dtype, r.size_bytes, meta.mode, meta.pinned))
    return 1 if failed else 0


def _add(args: argparse.Namespace) -> int:
    from server.adapters.validation import stage_adapter
    from server.adapters.weights import WEIGHTS_FILE

    store = _store(args)
    info, max_rank = _model_info(args)
    try:
        if store.exists(args.name) and not args.replace:
            raise LoraplexError(f"adapter {args.name!r} already exists; add --replace to overwrite it")
        with (args.source / "adapter_config.json").open("rb") as config, (args.source / WEIGHTS_FILE).open("rb") as w:
            staged = stage_adapter(store, config, w, Settings().max_adapter_bytes, info, max_rank)
        try:
            store.write_meta(staged.path, AdapterMeta(args.mode, args.pinned, now()))
            store.purge(store.commit(staged.path, args.name, args.replace))
        finally:
            store.purge(staged.path)
    except (LoraplexError, OSError) as exc:
        return _problem(args.name, exc)
    print(f"added {args.name} (sha256 {staged.record.sha256})")
    return 0


def _rm(args: argparse.Namespace) -> int:
    store = _store(args)
    try:
        store.purge(store.detach(args.name))
    except LoraplexError as exc:
        return _problem(args.name, exc)
    print(f"removed {args.name}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from server.adapters.validation import check_adapter

    store = _store(args)
    targets = args.targets or store.names()
    info, max_rank = _model_info(args)
    failed = 0
    for target in targets:
        try:
            path = Path(target) if Path(target).is_dir() else store.path(target)
            _, record = check_adapter(path, info, max_rank)
        except LoraplexError as exc:
            failed += _problem(target, exc)
            continue
        print(f"ok {target} (rank {record.rank}, sha256 {record.sha256})")
    return 1 if failed else 0


def _problem(target: str, exc: Exception) -> int:
    """Print one line saying what is wrong with `target`; returns 1, the exit status of a failure."""
    message = exc.message if isinstance(exc, LoraplexError) else str(exc)
    print(f"loraplex: {target}: {message}", file=sys.stderr)
    return 1
