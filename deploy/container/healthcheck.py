"""grpc.health.v1 check of the local gateway, for container and Kubernetes probes.

    python healthcheck.py --config /etc/hsmgw/hsmgw.toml [--service hsmgw.v1.CryptoService]

Why not the kubelet's built-in gRPC probe: it speaks plaintext only, and a
production gateway serves mutual TLS on every address but loopback. This script
reads the port and TLS settings from the gateway's own config, connects to
127.0.0.1 with a probe client certificate (an identity the policy need not name:
health checks need authentication, not a grant) and exits 0 only if the service
answers SERVING. Exit 1: NOT_SERVING or unknown service; 2: no answer.

Which service (docs/api.md): ``hsmgw.v1.CryptoService`` for readiness, NOT_SERVING
while none of the gateway's clusters can serve or throttles (the default ``""`` says the same);
``hsmgw.v1.AdminService`` for liveness and start-up, SERVING as long as the process
serves, since restarting a gateway whose HSMs are down brings none of them back.

TLS options default to HSMGW_PROBE_CA (the CA that issued the server
certificate), HSMGW_PROBE_CERT and HSMGW_PROBE_KEY; the server name checked is
the first DNS name of the server certificate unless --server-name says otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import tomllib
from pathlib import Path


def _server_name(cert_file: Path) -> str | None:
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    try:
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    dns = names.get_values_for_type(x509.DNSName)
    return dns[0] if dns else None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, type=Path, help="the gateway's TOML file")
    parser.add_argument("--service", default="", help='health service name (default "": the whole gateway)')
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    parser.add_argument("--ca", default=os.environ.get("HSMGW_PROBE_CA"), help="CA of the server certificate")
    parser.add_argument("--cert", default=os.environ.get("HSMGW_PROBE_CERT"), help="probe client certificate")
    parser.add_argument("--key", default=os.environ.get("HSMGW_PROBE_KEY"), help="its private key")
    parser.add_argument("--server-name", help="name to check in the server certificate")
    args = parser.parse_args(argv)

    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        config = tomllib.loads(args.config.read_text())
        server = config.get("server", {})
        port = int(str(server.get("listen", "127.0.0.1:50051")).rsplit(":", 1)[1])
    except (OSError, tomllib.TOMLDecodeError, ValueError, IndexError) as exc:
        print(f"healthcheck: {args.config}: {exc}", file=sys.stderr)
        return 2
    target = f"127.0.0.1:{port}"
    tls = server.get("tls")
    if tls is None:
        channel = grpc.insecure_channel(target)
    else:
        if not (args.ca and args.cert and args.key):
            print("healthcheck: the gateway serves TLS: give --ca, --cert and --key "
                  "(or HSMGW_PROBE_CA, HSMGW_PROBE_CERT, HSMGW_PROBE_KEY)", file=sys.stderr)
            return 2
        try:
            credentials = grpc.ssl_channel_credentials(
                Path(args.ca).read_bytes(), Path(args.key).read_bytes(), Path(args.cert).read_bytes()
            )
            cert_file = args.config.parent / tls["cert_file"]
            name = args.server_name or _server_name(cert_file)
        except (OSError, KeyError, ValueError) as exc:
            print(f"healthcheck: {exc}", file=sys.stderr)
            return 2
        options = [("grpc.ssl_target_name_override", name)] if name else []
        channel = grpc.secure_channel(target, credentials, options=options)
    with channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=args.service), timeout=args.timeout
            )
        except grpc.RpcError as exc:
            code = exc.code()  # type: ignore[attr-defined]
            print(f"healthcheck: {target}: {code.name}: {exc.details()}",  # type: ignore[attr-defined]
                  file=sys.stderr)
            return 1 if code is grpc.StatusCode.NOT_FOUND else 2
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        print(f"healthcheck: {args.service or 'gateway'}: {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
