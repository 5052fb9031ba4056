"""``hsmctl``: look at a running gateway's clusters and keys.

Examples:
  hsmctl clusters
  hsmctl keys list --prefix payments/
  hsmctl keys show payments/signing-2026 --output json
  hsmctl --ca-file tls/ca.pem --cert-file tls/client-ops.pem --key-file tls/client-ops-key.pem clusters
  hsmctl --as payments-admin keys list      # development server only (plaintext on loopback)
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import grpc
from google.protobuf import json_format

from gateway.cli._common import fail
from hsmgw.v1 import admin_pb2, admin_pb2_grpc, crypto_pb2, crypto_pb2_grpc


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def _emit(args: argparse.Namespace, data: Any, human: str) -> None:
    if args.output == "json":
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(human)


def _clusters(args: argparse.Namespace, channel: grpc.Channel) -> None:
    resp = admin_pb2_grpc.AdminServiceStub(channel).ListClusters(admin_pb2.ListClustersRequest(), timeout=args.timeout)
    rows = [
        [c.name, c.region, c.health, f"{c.keys}/{c.max_keys}", f"{c.sessions_in_use}/{c.sessions_open}/{c.pool_size}"]
        for c in resp.clusters
    ]
    data = json_format.MessageToDict(resp, preserving_proto_field_name=True, always_print_fields_with_no_presence=True)
    _emit(args, data, _table(rows, ["CLUSTER", "REGION", "HEALTH", "KEYS", "SESSIONS(use/open/size)"]))


def _short(enum_name: str, prefix: str) -> str:
    return enum_name.removeprefix(prefix)


def _key_row(k: crypto_pb2.Key) -> list[str]:
    return [
        k.key_id,
        _short(crypto_pb2.KeyAlgorithm.Name(k.algorithm), "KEY_ALGORITHM_"),
        _short(crypto_pb2.KeyState.Name(k.state), "KEY_STATE_"),
        k.primary_cluster,
        ",".join(k.replicas) or "-",
    ]


def _keys_list(args: argparse.Namespace, channel: grpc.Channel) -> None:
    stub = crypto_pb2_grpc.CryptoServiceStub(channel)
    keys: list[crypto_pb2.Key] = []
    token = ""
    while True:
        resp = stub.ListKeys(crypto_pb2.ListKeysRequest(prefix=args.prefix, page_token=token, page_size=1000),
                             timeout=args.timeout)
        keys.extend(k for k in resp.keys if not args.cluster or args.cluster in (k.primary_cluster, *k.replicas))
        token = resp.next_page_token
        if not token:
            break
    data = [json_format.MessageToDict(k, preserving_proto_field_name=True) for k in keys]
    _emit(args, data, _table([_key_row(k) for k in keys], ["KEY", "ALGORITHM", "STATE", "PRIMARY", "REPLICAS"]))


def _keys_show(args: argparse.Namespace, channel: grpc.Channel) -> None:
    key = crypto_pb2_grpc.CryptoServiceStub(channel).GetKey(crypto_pb2.GetKeyRequest(key_id=args.key), timeout=args.timeout)
    data = json_format.MessageToDict(key, preserving_proto_field_name=True)
    _emit(args, data, _table([_key_row(key)], ["KEY", "ALGORITHM", "STATE", "PRIMARY", "REPLICAS"]))


class _Identity(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):  # type: ignore[misc]
    """Sends ``x-hsmgw-identity`` (honoured only by a development server)."""

    def __init__(self, identity: str) -> None:
        self._metadata = (("x-hsmgw-identity", identity),)

    def _details(self, details: Any) -> Any:
        return details._replace(metadata=tuple(details.metadata or ()) + self._metadata)

    def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return continuation(self._details(details), request)


def _read(path: str | None, flag: str) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        fail(f"{flag}: cannot read {path}: {exc.strerror}")


def _channel(args: argparse.Namespace) -> grpc.Channel:
    tls = (args.ca_file, args.cert_file, args.key_file)
    if any(tls):
        if (args.cert_file is None) != (args.key_file is None):
            fail("--cert-file and --key-file go together")
        credentials = grpc.ssl_channel_credentials(
            _read(args.ca_file, "--ca-file"), _read(args.key_file, "--key-file"), _read(args.cert_file, "--cert-file")
        )
        channel = grpc.secure_channel(args.target, credentials)
    else:
        channel = grpc.insecure_channel(args.target)
    if args.identity:
        channel = grpc.intercept_channel(channel, _Identity(args.identity))
    return channel


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="hsmctl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="127.0.0.1:50051", help="gateway address (default: %(default)s)")
    parser.add_argument("--output", choices=("table", "json"), default="table")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds per call")
    parser.add_argument("--ca-file", help="PEM CA that signed the gateway's certificate (turns on TLS)")
    parser.add_argument("--cert-file", help="PEM client certificate (mTLS)")
    parser.add_argument("--key-file", help="PEM key of the client certificate")
    parser.add_argument(
        "--as", dest="identity", metavar="NAME", help="identity to act as (development server only; ignored with TLS)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("clusters", help="clusters, health, keys and sessions").set_defaults(func=_clusters)
    keys = sub.add_parser("keys", help="key placement")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    lst = keys_sub.add_parser("list", help="list keys")
    lst.add_argument("--prefix", default="")
    lst.add_argument("--cluster", default="", help="only keys held by this cluster")
    lst.set_defaults(func=_keys_list)
    show = keys_sub.add_parser("show", help="one key's placement")
    show.add_argument("key")
    show.set_defaults(func=_keys_show)
    args = parser.parse_args(argv)
    with _channel(args) as channel:
        try:
            args.func(args, channel)
        except grpc.RpcError as exc:
            fail(f"{exc.code().name}: {exc.details()}", code=2 if exc.code() is grpc.StatusCode.UNAVAILABLE else 1)


if __name__ == "__main__":
    main(sys.argv[1:])
