"""The application object every hsmctl command receives: channel, stubs, output."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import Message

from gateway._channels import close_watched
from gateway.cli._common import fail, shown
from hsmgw.v1 import admin_pb2 as apb
from hsmgw.v1 import admin_pb2_grpc, crypto_pb2_grpc

WAITING = 3
"""Exit status: the change is waiting for approvals."""
DEGRADED = 4
"""Exit status of ``hsmctl status``: warnings (a drained cluster, a failed-over region, keys short
of copies, changes waiting…), but every cluster serving."""
DOWN = 5
"""Exit status of ``hsmctl status``: a cluster is not serving (its circuit is open or on trial)."""

_APPROVAL = ("the approval may have been taken, and the change may be running or applied: see "
             "hsmctl changes list --all before approving again",
             "the approval was not sent: nothing was approved")
_REQUEST = ("the change may have been recorded (with a quorum of 1, run): see hsmctl changes list --all "
            "before asking again",
            "the request was not sent: no change was made")
_UNSURE = {  # requests that change something: what a caller who got no answer should check, and
    # what to say instead when the call never left (no connection to the gateway was made)
    "ApproveChangeRequest": _APPROVAL,
    "RejectChangeRequest": ("the rejection may have been taken: see hsmctl changes list --all",
                            "the rejection was not sent: nothing was rejected"),
    **dict.fromkeys(("PlaceKeyRequest", "MoveKeyRequest", "ReleaseKeyRequest", "ApplyRebalanceRequest",
                     "DrainClusterRequest", "FailoverRegionRequest", "DestroyKeyChangeRequest"), _REQUEST),
}


def _check_pair(cert_pem: bytes, key_pem: bytes) -> None:
    """The client certificate and key must belong together (gRPC would only say that it
    failed to create a security handshaker)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError:
        fail("--cert is not a PEM certificate", code=1)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError):
        fail("--key is not a PEM private key without a passphrase", code=1)
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        fail("--key does not match --cert: they are not one certificate and its private key", code=1)


def _read(option: str, path: str | None) -> bytes | None:
    if not path:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        fail(f"{option} {path}: {exc.strerror or exc}", code=1)


class App:
    def __init__(self, channel: grpc.Channel, *, output: str, timeout: float, identity: str | None) -> None:
        self.channel = channel
        self.output = output
        self.timeout = timeout
        self.metadata = (("x-hsmgw-identity", identity),) if identity else ()
        self.admin = admin_pb2_grpc.AdminServiceStub(channel)
        self.crypto = crypto_pb2_grpc.CryptoServiceStub(channel)
        self.connected = False
        """Whether the channel ever reached the gateway (a gRPC connection, past any TLS handshake)."""
        self.unsure = ""
        """Set while a call that changes something is in flight: what to check if it gets no answer."""
        self.unsent = ""
        """Set with ``unsure``: what to say if the call never reached the gateway (so was not taken)."""
        channel.subscribe(self._watch, try_to_connect=False)

    def _watch(self, state: grpc.ChannelConnectivity) -> None:
        if state is grpc.ChannelConnectivity.READY:
            self.connected = True

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> App:
        if args.tls_ca or args.tls_cert or args.tls_key:
            if bool(args.tls_cert) != bool(args.tls_key):
                fail("--cert and --key go together: the client certificate and its private key", code=1)
            if args.identity is not None:
                # The gateway takes the caller's identity from the certificate over TLS: a change
                # approved "as bob" would be approved as the certificate's identity.
                fail("--as names the caller of a plaintext development gateway only; over TLS the client "
                     "certificate does (--cert), so leave --as out", code=1)
            key, cert = _read("--key", args.tls_key), _read("--cert", args.tls_cert)
            if key and cert:
                _check_pair(cert, key)
            credentials = grpc.ssl_channel_credentials(
                root_certificates=_read("--ca", args.tls_ca),  # None: the system's roots verify the gateway
                private_key=key,
                certificate_chain=cert,
            )
            channel = grpc.secure_channel(args.target, credentials)
        else:
            channel = grpc.insecure_channel(args.target)
        return cls(channel, output=args.output, timeout=args.timeout, identity=args.identity)

    def __enter__(self) -> App:
        return self

    def __exit__(self, *exc: object) -> None:
        close_watched(self.channel, self._watch)

    def call(self, method: Any, request: Message) -> Any:
        name = type(request).__name__
        self.unsure, self.unsent = _UNSURE.get(name, _REQUEST if name == "ReconcileRequest" and getattr(
            request, "fix", False) else ("", ""))
        answer = method(request, timeout=self.timeout, metadata=self.metadata)
        self.unsure = self.unsent = ""
        return answer

    # -- output -------------------------------------------------------------------------

    @staticmethod
    def as_dict(message: Message) -> dict[str, Any]:
        # Counts are int64, which protobuf's JSON mapping quotes ("9"); scripts want numbers.
        return json_format.MessageToDict(
            message, preserving_proto_field_name=True, always_print_fields_with_no_presence=True,
            unquote_int64_if_possible=True,
        )

    def emit(self, data: Any, human: str) -> None:
        write_out(json.dumps(data, indent=2, sort_keys=True) if self.output == "json" else human)

    @staticmethod
    def table(rows: list[list[Any]], header: list[str]) -> str:
        # A cell is one line: a line break in a caller's string (a certificate's name) would forge a row.
        cells = [[shown(str(c)) for c in row] for row in rows]
        widths = [max(len(r[i]) for r in [header, *cells]) for i in range(len(header))]
        lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)).rstrip()]
        lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
        return "\n".join(lines)

    @staticmethod
    def params(change: apb.Change) -> str:
        """A change's parameters for people: a reconcile fix lists the findings it repairs."""
        if "findings" in change.params:
            try:
                findings = json.loads(change.params["findings"])
                return "fixes " + (", ".join(f"{kind} {'/'.join(p for p in (cluster, key) if p)}"
                                             for kind, cluster, key in findings) or "nothing")
            except (ValueError, TypeError):
                pass
        shown = dict(change.params)
        if "moves" in shown:  # a rebalance's plan: up to 2,000 moves, each with its record version
            try:
                shown["moves"] = str(len(json.loads(shown["moves"])))
            except (ValueError, TypeError):
                pass
        return " ".join(f"{k}={v}" for k, v in sorted(shown.items()))

    @staticmethod
    def change_line(change: apb.Change) -> str:
        """One line saying where a change is (with what a reconcile fix repairs)."""
        approvals = f"{len(change.approved_by)}/{change.approvals_needed}"
        if change.state == "pending":
            line = (f"change {change.id} ({change.action}) is pending: {approvals} approvals; "
                    f"another admin runs: hsmctl changes approve {change.id}")
        else:
            line = f"change {change.id} ({change.action}) {change.state}: {shown(change.result)}"
        return line + (f"\n  {shown(App.params(change))}" if "findings" in change.params else "")

    @staticmethod
    def who(change: apb.Change, identity: str) -> str:
        """An admin of a change, and how it called if not with a certificate: ``alice (header,
        ipv4:127.0.0.1:5555)`` names one a plaintext development gateway took on its word."""
        origin = change.origins.get(identity)
        if origin is None or origin.authenticated_by in ("", "certificate"):
            return identity
        return f"{identity} ({origin.authenticated_by}, {origin.peer})"

    @staticmethod
    def change_code(change: apb.Change) -> int:
        """Whether a change ran (0), waits (3) or failed (1)."""
        if change.state == "pending":
            return WAITING
        return 0 if change.state == "applied" else 1

    def change(self, change: apb.Change) -> int:
        """Print a change; the exit code says whether it ran (0), waits (3) or failed (1)."""
        self.emit(self.as_dict(change), self.change_line(change))
        return self.change_code(change)


def progress(done: int, total: int, label: str = "") -> None:
    """A one-line progress bar on a terminal (nothing when output is redirected)."""
    if not sys.stderr.isatty() or not total:
        return
    width = 30
    filled = width * done // total
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {label}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


class _Stdout:
    closed_by_reader = False
    """Whether the reader of stdout closed it early (`hsmctl keys list | head -1`)."""


def write_out(text: str) -> None:
    """``text`` and a newline on stdout, what cannot be shown escaped (``shown``; JSON has none).
    A reader that closed the pipe early has what it wanted: the rest goes to devnull (the Python
    docs' recipe, signal module), and the command goes on to its end, so that its exit status
    still says what it did (``stdout_closed``)."""
    try:
        print(shown(text, lines=True))
    except BrokenPipeError:
        stdout_closed()


def stdout_closed() -> None:
    """Note that stdout's reader went away, and point stdout at devnull: no later write or
    flush (the interpreter's own, at exit) fails again."""
    import os

    _Stdout.closed_by_reader = True
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def reader_went_away() -> bool:
    return _Stdout.closed_by_reader
