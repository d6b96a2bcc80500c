"""python -m stack up|down|status|dvc-remote|dvc-push|dvc-pull: the team stack (see stack/__init__.py).

Errors are one `distilflow: error: ...` line and exit 1, with no traceback and
no password in them.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from distilflow.errors import one_line_errors
from stack import StackError

EPILOG = (
    "A client then runs against the stack through its environment only: "
    "`source .stack/env && python -m distilflow run`. Docs: README.md, 'Running as a team'."
)


def _parser() -> argparse.ArgumentParser:
    from stack.components import COMPONENTS, DEFAULT_PORTS

    parser = argparse.ArgumentParser(prog="python -m stack", description=__doc__.split("\n")[0], epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, summary: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=summary, description=summary)
        p.add_argument("--dir", type=Path, default=Path(".stack"), help="the stack folder (default: .stack)")
        return p

    up = command(
        "up",
        "start PostgreSQL, an MLflow server and a Prefect server on it, a Dask scheduler and workers; "
        "wait until each answers; write the client's environment to DIR/env",
    )
    up.add_argument(
        "--host", default="127.0.0.1", help="the one address every server binds to (default: loopback only)"
    )
    up.add_argument("--workers", type=int, default=2, help="Dask workers to start (default: 2)")
    up.add_argument("--threads-per-worker", type=int, default=1, help="threads of each Dask worker (default: 1)")
    up.add_argument(
        "--only",
        default=",".join(COMPONENTS),
        help=f"comma-separated components to start here (default: all of {','.join(COMPONENTS)})",
    )
    up.add_argument(
        "--join",
        type=Path,
        metavar="DIR",
        help="use the PostgreSQL (and Dask scheduler, servers) of the stack in DIR: spread one stack over hosts",
    )
    for name, port in DEFAULT_PORTS.items():
        if name != "ssh":
            flag = name.removesuffix("-scheduler")
            up.add_argument(
                f"--{flag}-port", type=int, dest=f"port_{name}", metavar="PORT", help=f"{name} port (default: {port})"
            )
    up.add_argument("--auto-ports", action="store_true", help="free ports for those not given, instead of defaults")

    down = command("down", "stop everything the stack started, by PID (PostgreSQL by pg_ctl stop)")
    down.add_argument("--purge", action="store_true", help="also delete the stack folder (databases, artifacts)")
    down.add_argument(
        "--only", help="comma-separated components to stop (e.g. mlflow, to restart it with `up --only mlflow`)"
    )
    command("status", "what runs, where, and whether it answers (exit 1 if anything is down)")

    remote = command(
        "dvc-remote",
        "serve DIR/dvc-remote over SSH (an sshd of its own: own host key, one authorized key, key logins only) "
        "and print the `dvc remote add` commands",
    )
    remote.add_argument("--host", default="127.0.0.1", help="the address sshd binds to (default: loopback only)")
    remote.add_argument("--ssh-port", type=int, default=DEFAULT_PORTS["ssh"], help="default: 2222")
    remote.add_argument("--path", type=Path, help="the remote's folder (default: DIR/dvc-remote)")
    remote.add_argument("--read-only", action="store_true", help="refuse every upload (a mirror to pull from)")

    push = command(
        "dvc-push",
        "configure the stack's SSH remote in a DVC project (.dvc/config.local) and `dvc push` to it; "
        "a refused upload is one line",
    )
    pull = command("dvc-pull", "the same remote, `dvc pull` from it")
    for p in (push, pull):
        p.add_argument("--project", type=Path, default=Path("."), help="the DVC project (default: .)")
        p.add_argument("--remote", default="stack", help="the remote's name in the project (default: stack)")
        p.add_argument("--keyfile", type=Path, help="log in with this private key (default: the stack's own)")
    return parser


def _run(args) -> int:
    from stack import components as c

    stack = c.Stack(args.dir)
    if args.command == "up":
        ports = c.pick_ports(
            args.host,
            {k: getattr(args, f"port_{k}") for k in c.DEFAULT_PORTS if k != "ssh"},
            args.auto_ports,
            stack.state,
        )
        if args.workers < 0:
            raise StackError("--workers must be 0 or more")
        with c.locked(stack.paths):
            stack.up(
                args.host,
                args.workers,
                [x.strip() for x in args.only.split(",") if x.strip()],
                ports,
                join=args.join,
                worker_threads=args.threads_per_worker,
            )
        print(stack.summary())
        return 0
    if args.command == "down":
        if not stack.paths.root.is_dir():
            print(f"nothing to stop: no stack folder {stack.paths.root}")
            return 0
        with c.locked(stack.paths):
            only = [x.strip() for x in (args.only or "").split(",") if x.strip()]
            stopped = stack.down(purge=args.purge, only=only or None)
        print(("stopped: " + ", ".join(stopped)) if stopped else f"nothing was running in {stack.paths.root}")
        if args.purge:
            print(f"deleted {stack.paths.root}")
        return 0
    if args.command == "status":
        rows = stack.status()
        if not rows:
            print(f"no stack running in {stack.paths.root}")
            return 1
        for name, where, ok in rows:
            print(f"{'up  ' if ok else 'DOWN'}  {name:<16} {where}")
        return 0 if all(ok for _, _, ok in rows) else 1
    from stack import sshremote

    if args.command == "dvc-remote":
        with c.locked(stack.paths):
            print(sshremote.serve(stack, args.host, args.ssh_port, args.path, args.read_only))
        return 0
    if args.command in ("dvc-push", "dvc-pull"):
        print(sshremote.transfer(stack, args.project, args.remote, args.command.removeprefix("dvc-"), args.keyfile))
        return 0
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    """Parse, run, and turn errors into one line and exit 1."""
    args = _parser().parse_args(argv)
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    return one_line_errors(lambda: _run(args), StackError, "interrupted (what `up` started so far is stopped again)")


if __name__ == "__main__":
    sys.exit(main())
