"""`qemu-bmc compose init`: the ``.env`` that compose.yaml needs (docs/deploy.md, "Compose")."""

from __future__ import annotations

import argparse
import os
import secrets
from pathlib import Path

ENV_FILE = ".env"

#: What compose.yaml reads besides the token, each with its default (loopback for what listens).
VARIABLES = """\
# Where the host reaches NATS (the machine, IPMI over LAN, VM-wire and Redfish services use the
# host's network and connect there). 0.0.0.0 or a host address lets other hosts' services join.
# NATS_HOST=127.0.0.1
# NATS_PORT=4222
# The image every service runs (built once by `docker compose build`).
# QEMU_BMC_TAG=latest
# The folder mounted at /images in the machine container (disk images, ISOs).
# QEMU_BMC_IMAGES=./images
# The first administrator, on the first start only (then kept in the state service's bucket).
# IPMI_USER=admin
# IPMI_PASS=password
"""


def add_parser(commands: argparse._SubParsersAction) -> None:
    compose = commands.add_parser("compose", help="files for docker compose (compose.yaml)")
    actions = compose.add_subparsers(dest="compose_command", required=True)
    init = actions.add_parser("init", help="write .env with a random NATS token (never overwrites one)")
    init.add_argument("--directory", "-d", type=Path,
                      help="where to write .env (default: the current directory)")


def env_text(token: str) -> str:
    return ("# Made by `qemu-bmc compose init`: read by docker compose beside compose.yaml. Keep it secret.\n"
            "# Every service connects to NATS with this token; NATS refuses any client without it.\n"
            f"NATS_TOKEN={token}\n\n" + VARIABLES)


def init(directory: Path) -> int:
    """Write ``directory/.env`` (mode 0600) with a new token, unless one is there already."""
    path = directory / ENV_FILE
    if path.exists():
        has_token = any(line.strip().startswith("NATS_TOKEN=") for line in path.read_text().splitlines())
        print(f"{path} exists: left as it is" + ("" if has_token else
              " (it has no NATS_TOKEN: add a line NATS_TOKEN=<a long random string>, or move it and run this again)"))
        return 0 if has_token else 1
    token = secrets.token_urlsafe(32)  # letters, digits, - and _: safe in a nats:// URL
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(env_text(token))
    print(f"wrote {path} (mode 0600): NATS_TOKEN (a new random token) and the other variables, commented, "
          "with their defaults")
    return 0


def compose_command(args: argparse.Namespace) -> int:
    if args.compose_command == "init":
        return init(args.directory or Path.cwd())
    raise AssertionError(args.compose_command)
