"""`loraplex keys add|list|rm`: edit the API keys file offline. A new key is printed once and only its SHA-256 hash
is stored. A running server picks the changes up on SIGHUP or POST /admin/keys/reload."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from server.errors import KeyFileError
from server.settings import Settings
from server.tenants.keyfile import LIMIT_FIELDS, KeyFile, read_key_file, validate_key_file, write_key_file
from server.tenants.keys import hash_key, key_id, new_key

ROW = "{:20} {:5} {:>6} {:>8} {:>4}  {:30} {}"  # the columns of `list`


def add_keys_parser(commands: Any) -> None:
    """Register the `keys` command and its subcommands on the top-level subparsers."""
    parser = commands.add_parser("keys", help="add, list or remove tenants' API keys", description=__doc__)
    parser.add_argument(
        "--file", type=Path, default=None, help="the API keys file, *.toml or *.json (default: --api-keys's)"
    )
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser(
        "add",
        help="issue a new key, creating the tenant if needed",
        description="Issue a new key for TENANT and print it once. A new tenant gets the settings given; an "
        "existing one keeps its keys and changes only the settings given.",
    )
    add.add_argument("tenant")
    add.add_argument("--adapter", action="append", metavar="PATTERN", help="adapter name or glob; repeatable")
    add.add_argument("--base-model", action=argparse.BooleanOptionalAction, help="may use the base model")
    for field in LIMIT_FIELDS:
        add.add_argument(f"--{field.replace('_', '-')}", type=int, metavar="N", help="limit; 0 removes it")
    add.set_defaults(run=_command(_add))
    actions.add_parser("list", help="the tenants, their key ids, scopes and limits").set_defaults(run=_command(_list))
    rm = actions.add_parser("rm", help="remove a tenant, or one of its keys")
    rm.add_argument("tenant")
    rm.add_argument("--key", metavar="ID", help="remove only this key (its id or a prefix of it, from `list`)")
    rm.set_defaults(run=_command(_rm))


def _path(args: argparse.Namespace) -> Path:
    path = args.file or Settings().api_keys_file
    if path is None:
        raise KeyFileError("no API keys file: give --file or set LORAPLEX_API_KEYS_FILE")
    return path


def _add(args: argparse.Namespace) -> None:
    path = _path(args)
    keys = read_key_file(path) if path.exists() else KeyFile()
    key = new_key()
    tenants = [tenant.model_dump() for tenant in keys.tenants]
    entry = next((tenant for tenant in tenants if tenant["name"] == args.tenant), None)
    if entry is None:
        entry = {"name": args.tenant, "keys": []}
        tenants.append(entry)
    entry["keys"].append(hash_key(key))
    if args.adapter is not None:
        entry["adapters"] = args.adapter
    if args.base_model is not None:
        entry["base_model"] = args.base_model
    for field in LIMIT_FIELDS:
        if getattr(args, field) is not None:
            entry[field] = getattr(args, field) or None
    write_key_file(path, validate_key_file({"tenants": tenants}, path))
    print(key)
    print(
        f"added key {key_id(hash_key(key))} for tenant {args.tenant!r} to {path}; it is shown only now, store it "
        "safely; reload the server's keys (SIGHUP or POST /admin/keys/reload) to use it",
        file=sys.stderr,
    )


def _list(args: argparse.Namespace) -> None:
    print(ROW.format("TENANT", "BASE", "RPM", "TPM", "CONC", "ADAPTERS", "KEYS"))
    for t in read_key_file(_path(args)).tenants:
        limits = (str(getattr(t, field) or "-") for field in LIMIT_FIELDS)
        print(ROW.format(t.name, str(t.base_model).lower(), *limits, ",".join(t.adapters) or "-",
                         ",".join(map(key_id, t.keys)) or "-"))  # fmt: skip


def _rm(args: argparse.Namespace) -> None:
    path = _path(args)
    keys = read_key_file(path)
    tenant = keys.find(args.tenant)
    if tenant is None:
        raise KeyFileError(f"API keys file {path}: no tenant {args.tenant!r}")
    if args.key is None:
        keys.tenants.remove(tenant)
        removed = f"tenant {args.tenant!r}"
    else:
        matches = [stored for stored in tenant.keys if key_id(stored).startswith(args.key.lower())] if args.key else []
        if len(matches) != 1:
            found = "no key" if not matches else f"{len(matches)} keys"
            raise KeyFileError(f"{found} of tenant {args.tenant!r} has an id starting with {args.key!r}")
        tenant.keys.remove(matches[0])
        removed = f"key {key_id(matches[0])} of tenant {args.tenant!r}"
    write_key_file(path, keys)
    print(f"removed {removed} from {path}", file=sys.stderr)


def _command(action: Callable[[argparse.Namespace], None]) -> Callable[[argparse.Namespace], int]:
    """`action` as a command: exit status 1 with a one-line reason on stderr if the file or the request is invalid."""

    def run(args: argparse.Namespace) -> int:
        try:
            action(args)
        except KeyFileError as exc:
            print(f"loraplex: {exc.message}", file=sys.stderr)
            return 1
        except OSError as exc:
            print(f"loraplex: {exc}", file=sys.stderr)
            return 1
        return 0

    return run
