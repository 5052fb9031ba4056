"""``hsmctl``: operate hsmgw — clusters, key placement, switches, approvals, audit.

The admin commands talk to a gateway's AdminService (never to the store or the HSMs),
so authentication, quorum and audit apply to them. Mutating commands create a change
that other admins approve (`hsmctl changes approve ID`). `hsmctl loadtest` is the
exception: it calls the CryptoService like any application (its --create and --cleanup
make and destroy keys under the caller's own grants, without a quorum), and with
--direct it opens the PKCS #11 module and the placement store itself.

Examples:
  hsmctl status
  hsmctl clusters
  hsmctl keys list --prefix payments/
  hsmctl keys move payments/signing-2026 --to use1-b
  hsmctl rebalance --plan
  hsmctl clusters drain use1-a
  hsmctl --as bob changes approve 3f2a9c1e
  hsmctl audit verify

hsmctl's own options (--target, --output, --timeout, --as, --ca, --cert, --key) may
come before or after the command: `hsmctl status --output json`.

Exit codes: 0 ok; 1 the request was refused or failed, or the command line is
wrong, or the connection failed by how it was asked for (a TLS certificate the
gateway or hsmctl refuses: not signed by --ca, expired or not valid yet, not naming
the --target host; TLS to a plaintext gateway, a port that does not speak gRPC);
2 the gateway could not be reached or cannot act now (UNAVAILABLE,
DEADLINE_EXCEEDED: try again later; but a request or approval that got no answer
may have been taken, and its change may be running or applied: the error says so,
check `hsmctl changes list --all` first; one that never connected says it was not
sent); 3 the change is waiting for approvals
(scripts can poll); 4 and 5 from `hsmctl status` only: 4 degraded (warnings, every
cluster serving), 5 down (a cluster is not serving); 141 the program reading the
output stopped early (`hsmctl keys list | head -1`), as for any program a closed
pipe ends.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn

os.environ.setdefault("GRPC_VERBOSITY", "NONE")  # hsmctl says what went wrong itself, in one line
import grpc  # noqa: E402

from gateway.cli._common import fail, positive_seconds
from gateway.cli.hsmctl import audit, changes, clusters, keys, loadtest, rebalance, regions
from gateway.cli.hsmctl._app import App, reader_went_away, stdout_closed

GROUPS = (clusters, keys, rebalance, regions, changes, audit, loadtest)
EXIT_BROKEN_PIPE = 128 + 13  # what a shell reports for a program SIGPIPE ended: the reader closed the pipe


class _Parser(argparse.ArgumentParser):
    """A usage error exits 1: exit code 2 tells scripts that the gateway could not be reached."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        fail(f"{self.prog}: {message}", code=1)


def _own_options(parser: argparse.ArgumentParser) -> frozenset[str]:
    """hsmctl's own options that take a value (--target, --output, TLS…), from its parser."""
    return frozenset(name for action in parser._actions if action.nargs is None and action.option_strings
                     for name in action.option_strings if name.startswith("--"))


def _hoisted(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """``argv`` with hsmctl's own options moved before the command, wherever they were written."""
    own = _own_options(parser)
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        if word == "--":
            rest += argv[i:]
            break
        name = word.split("=", 1)[0]
        if name in own:
            taken = 1 if "=" in word else 2
            front += argv[i : i + taken]
            i += taken
            continue
        rest.append(word)
        i += 1
    return front + rest


def _identity(text: str) -> str:
    """An argparse type: an admin identity, never empty (`--as "$ADMIN"` with ADMIN unset
    would otherwise call as the gateway's default identity)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty identity; leave --as out to call without one")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="hsmctl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--target", default="127.0.0.1:50051", help="gateway address (default: %(default)s)")
    parser.add_argument(
        "--output", choices=("table", "json"), default="table", help="table for people, json for scripts"
    )
    parser.add_argument("--timeout", type=positive_seconds, default=30.0,
                        help="seconds per call, above 0 (default: %(default)s)")
    parser.add_argument(
        "--as",
        dest="identity",
        type=_identity,
        help="admin identity in development (plaintext on loopback only; TLS uses the certificate); "
             "never empty: leave it out for the gateway's default, dev",
    )
    parser.add_argument("--ca", dest="tls_ca", help="CA certificate (PEM) to verify the gateway; enables TLS")
    parser.add_argument("--cert", dest="tls_cert",
                        help="client certificate (PEM) for mTLS, with --key; enables TLS (without --ca the "
                             "system's CA certificates verify the gateway)")
    parser.add_argument("--key", dest="tls_key", help="the client certificate's private key (PEM), with --cert")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for group in GROUPS:
        group.register(sub)
    return parser


_HINTS = (  # what gRPC says when a connection fails, and what an operator would check; the most specific first
    ("Connection refused", "nothing listens there: is the gateway running, and is --target its address?"),
    ("Expected SETTINGS frame", "that address does not speak gRPC (a metrics port?): check --target"),
    ("WRONG_VERSION_NUMBER", "the TLS handshake failed: that gateway serves plaintext; drop --ca, --cert and --key"),
    ("certificate has expired", "the gateway's certificate (or a CA certificate of its chain, --ca) has expired "
                                "by this host's clock: the gateway needs a new one (then SIGHUP); if it is new, "
                                "is this host's clock ahead?"),
    ("certificate is not yet valid", "the gateway's certificate (or a CA certificate of its chain, --ca) is not "
                                     "valid yet by this host's clock: is this host's clock behind (clock skew)?"),
    ("Hostname Verification Check failed", "the gateway's certificate does not name {host} among its subject "
                                           "alternative names (SANs): use --target with a name the certificate "
                                           "holds, or give the gateway a certificate for {host}"),
    ("CERTIFICATE_VERIFY_FAILED", "the gateway's certificate is not signed by the CA given (--ca)"),
    ("security handshaker", "the client certificate cannot be used: does --key match --cert?"),
)
_HANDSHAKE_REFUSED = ("the gateway closed the connection: it may require TLS with a client certificate "
                      "(--ca, --cert, --key)")
_CERTIFICATE_REFUSED = ("the gateway closed the connection during the TLS handshake: does it accept this client "
                        "certificate (--cert, --key), signed by its client CA?")
_MISCONFIGURED = {words for words, _ in _HINTS if words != "Connection refused"}
"""What gRPC says of a connection that failed by how hsmctl was told to connect, or by the gateway's
certificate, not for a while: exit 1, as a usage error; trying again soon changes nothing."""


def _target_host(target: str) -> str:
    """The host of ``--target`` (``host:port``, ``[v6]:port``, ``dns:///host:port``)."""
    address = target.rpartition("/")[2]
    host = address.rpartition(":")[0] if address.count(":") == 1 or address.startswith("[") else address
    return host.strip("[]") or address


def _hint(details: str, tls: bool, connected: bool, target: str = "") -> tuple[str, bool]:
    """What to check when no answer came, and whether it is a mistake in how to connect (exit 1):
    ``connected``, whether the channel reached the gateway; ``target``, the address asked for."""
    for words, hint in _HINTS:
        if words in details:
            return hint.format(host=_target_host(target)), words in _MISCONFIGURED
    if "Socket closed" in details or "Connection reset" in details:
        # gRPC says "failed to connect to all addresses" when no connection came up (a refused
        # handshake); the channel's READY notice may come after the error, so either tells.
        if connected or not details.startswith("failed to connect"):  # the gateway went away during the call
            return ("the gateway closed the connection during the call: it may have stopped or restarted "
                    "(see its log)"), False
        return (_CERTIFICATE_REFUSED if tls else _HANDSHAKE_REFUSED), True
    return "", False


def _never_sent(exc: grpc.RpcError, connected: bool) -> bool:
    """The call failed before any connection to the gateway came up (refused, no route, a failed
    handshake), so the gateway never saw it. A deadline or a connection lost during the call
    leaves that open."""
    return (not connected and exc.code() is grpc.StatusCode.UNAVAILABLE
            and (exc.details() or "").startswith("failed to connect"))


def _no_answer(exc: grpc.RpcError) -> bool:
    """The call ended without the gateway's answer: a lost connection or a passed deadline (the
    gateway's own refusals carry its status details)."""
    if exc.code() is grpc.StatusCode.DEADLINE_EXCEEDED:
        return True
    return exc.code() is grpc.StatusCode.UNAVAILABLE and not any(
        key == "grpc-status-details-bin" for key, _ in exc.trailing_metadata() or ())


def main(argv: list[str] | None = None) -> None:
    code = _run(sys.argv[1:] if argv is None else argv)
    try:
        sys.stdout.flush()  # a reader that stopped early shows here, not in Python's flush at exit
    except BrokenPipeError:
        stdout_closed()
    # A reader that closed the pipe early (`hsmctl keys list | head -1`) ends a command that did
    # what it was asked as SIGPIPE would, without a traceback; a status that says more (3: a
    # change waits for approvals; 2: it may have been recorded) is kept: a script must not ask
    # again for a change that exists.
    raise SystemExit(EXIT_BROKEN_PIPE if code == 0 and reader_went_away() else code)


def _run(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(_hoisted(argv, parser))
    with App.from_args(args) as app:
        try:
            code = args.func(app, args)
        except grpc.RpcError as exc:
            unreachable = exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
            hints = []
            misconfigured = False
            if unreachable and _no_answer(exc):
                first, misconfigured = _hint(exc.details() or "", bool(args.tls_ca or args.tls_cert), app.connected,
                                             args.target)
                hints = [first, app.unsent if _never_sent(exc, app.connected) else app.unsure]
            hint = "; ".join(h for h in hints if h)
            fail(f"{exc.code().name}: {exc.details()}" + (f"; {hint}" if hint else ""),
                 code=2 if unreachable and not misconfigured else 1)
    return code or 0
