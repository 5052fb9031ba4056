"""hsmctl keys list | show | place | move | release | destroy"""

from __future__ import annotations

import argparse

from gateway.cli._common import fail
from gateway.cli.hsmctl._app import App
from hsmgw.v1 import admin_pb2 as apb
from hsmgw.v1 import crypto_pb2 as pb

HEADER = ["KEY", "ALGORITHM", "STATE", "PRIMARY", "REPLICAS", "STORAGE", "HELD"]


def _row(k: pb.Key) -> list[str]:
    return [
        k.key_id,
        pb.KeyAlgorithm.Name(k.algorithm).removeprefix("KEY_ALGORITHM_"),
        pb.KeyState.Name(k.state).removeprefix("KEY_STATE_"),
        k.primary_cluster or "-",
        ",".join(k.replicas) or "-",
        pb.KeyStorage.Name(k.storage).removeprefix("KEY_STORAGE_") if k.storage else "TOKEN",
        "yes" if k.held else "-",
    ]


def _held_by(key: pb.Key, cluster: str) -> bool:
    """Whether ``cluster`` holds a copy of ``key``: a destroyed key's record still names the
    clusters it was on, but none holds it."""
    return key.state != pb.KEY_STATE_DESTROYED and cluster in (key.primary_cluster, *key.replicas)


def _list(app: App, args: argparse.Namespace) -> int:
    if args.cluster:
        known = [c.name for c in app.call(app.admin.ListClusters, apb.ListClustersRequest()).clusters]
        if args.cluster not in known:
            fail(f"no cluster named {args.cluster!r} (clusters: {', '.join(known)})", code=1)
    keys: list[pb.Key] = []
    token = ""
    while True:
        resp = app.call(app.crypto.ListKeys, pb.ListKeysRequest(prefix=args.prefix, page_token=token, page_size=1000))
        keys += [k for k in resp.keys if not args.cluster or _held_by(k, args.cluster)]
        token = resp.next_page_token
        if not token:
            break
    app.emit([app.as_dict(k) for k in keys], app.table([_row(k) for k in keys], HEADER))
    return 0


def _show(app: App, args: argparse.Namespace) -> int:
    key = app.call(app.crypto.GetKey, pb.GetKeyRequest(key_id=args.key))
    app.emit(app.as_dict(key), app.table([_row(key)], HEADER))
    return 0


def _placed(app: App, args: argparse.Namespace) -> int:
    resp = app.call(app.admin.ListPlacements, apb.ListPlacementsRequest())
    rows = [[p.key_id, p.cluster] for p in resp.placements]
    human = (App.table(rows, ["KEY", "CLUSTER"]) if rows else "no key is placed and not yet created") + (
        f"\n{len(rows)} of at most {resp.limit}")
    app.emit({"placements": [app.as_dict(p) for p in resp.placements], "limit": resp.limit}, human)
    return 0


def _place(app: App, args: argparse.Namespace) -> int:
    return app.change(app.call(app.admin.PlaceKey, apb.PlaceKeyRequest(key_id=args.key, cluster=args.to)))


def _move(app: App, args: argparse.Namespace) -> int:
    request = apb.MoveKeyRequest(key_id=args.key, to=args.to)
    if args.source:
        setattr(request, "from", args.source)
    return app.change(app.call(app.admin.MoveKey, request))


def _release(app: App, args: argparse.Namespace) -> int:
    return app.change(app.call(app.admin.ReleaseKey, apb.ReleaseKeyRequest(key_id=args.key)))


def _destroy(app: App, args: argparse.Namespace) -> int:
    return app.change(app.call(app.admin.DestroyKey, apb.DestroyKeyChangeRequest(key_id=args.key)))


def _target(command: argparse.ArgumentParser, about: str) -> None:
    """``--to CLUSTER``, the cluster a key goes to, for every command that sends one somewhere.
    ``--cluster`` is taken too, unlisted: it was ``keys place``'s spelling."""
    target = command.add_mutually_exclusive_group(required=True)
    target.add_argument("--to", metavar="CLUSTER", help=about)
    target.add_argument("--cluster", dest="to", help=argparse.SUPPRESS)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = sub.add_parser("keys", help="where keys live, and moving them")
    ksub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    lst = ksub.add_parser(
        "list", help="list keys", description="Example: hsmctl keys list --prefix payments/ --cluster use1-a"
    )
    lst.add_argument("--prefix", default="")
    lst.add_argument("--cluster", default="", help="only keys held by this cluster (never destroyed keys)")
    lst.set_defaults(func=_list)
    show = ksub.add_parser("show", help="one key's placement", description="Example: hsmctl keys show payments/k1")
    show.add_argument("key")
    show.set_defaults(func=_show)
    placed = ksub.add_parser(
        "placed",
        help="keys placed and not yet created, and where each goes",
        description="Lists what `keys place` asked for and no creation has used yet; `keys release` "
        "takes one back.\n\nExample: hsmctl keys placed",
    )
    placed.set_defaults(func=_placed)
    place = ksub.add_parser(
        "place",
        help="pin the cluster a key not yet created will go to (quorum); rebalance leaves it there",
        description="Example: hsmctl keys place payments/k9 --to use1-b",
    )
    place.add_argument("key")
    _target(place, "the cluster the key will be created on")
    place.set_defaults(func=_place)
    move = ksub.add_parser(
        "move",
        help="copy by trusted wrap, verify, switch, remove the old copy (quorum); rebalance leaves it there",
        description="Example: hsmctl keys move payments/k1 --to use1-b",
    )
    move.add_argument("key")
    _target(move, "destination cluster")
    move.add_argument("--from", dest="source", default="", help="the copy to replace (default: the primary)")
    move.set_defaults(func=_move)
    release = ksub.add_parser(
        "release",
        help="let rebalance move a key an operator placed or moved (quorum)",
        description="Lets rebalance move a key an operator placed or moved; of a key placed and not yet "
        "created, takes the placement back.\n\nExample: hsmctl keys release payments/k1",
    )
    release.add_argument("key")
    release.set_defaults(func=_release)
    destroy = ksub.add_parser(
        "destroy",
        help="destroy a key on every cluster (quorum)",
        description="Example: hsmctl keys destroy payments/old",
    )
    destroy.add_argument("key")
    destroy.set_defaults(func=_destroy)
