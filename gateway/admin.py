"""``hsmgw.v1.AdminService``: what operators see and change, behind quorum and audit.

Read-only calls answer at once. Mutating calls (move, rebalance, drain,
failover, destroy, reconcile --fix, place) become pending changes in the
``ChangeBook``; they run when enough distinct admins approved them. Every
request, approval, rejection, result and refusal goes to the audit log.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import grpc
from google.protobuf import timestamp_pb2

from gateway import audit as audit_mod
from gateway import status
from gateway.auth import APPROVE, PermissionDenied, PolicyStore, audit
from gateway.interceptors import current_caller, current_identity, deny
from gateway.quorum import (
    LEASE,
    PENDING,
    RUN_LIMIT,
    RUNNING,
    Change,
    ChangeBook,
    EventUnsynced,
    NotAnotherAdmin,
    running_change,
)
from hsmgw.v1 import admin_pb2 as pb
from hsmgw.v1 import admin_pb2_grpc
from router.errors import (
    AuditUnavailable,
    FailedPrecondition,
    ForeignObjects,
    InvalidArgument,
    KeyChanged,
    RouterError,
    Unavailable,
)
from router.health import CircuitState
from router.model import KeyState, Placement
from router.placement.store import StoreError
from router.reconcile import Finding, reconcile
from router.router import MAX_PINS, Router

log = logging.getLogger(__name__)

R = TypeVar("R")

KEY_LIMIT_WARNING = 0.8
"""Share of a cluster's max_keys from which `hsmctl status` warns."""
RECONCILE_FIX = "reconcile_fix_shown"
"""The action of a reconcile fix, which repairs only the findings its request showed. (Earlier
versions' "reconcile_fix" fixed whatever it found when approved; they refuse this name.)"""
REBALANCE_RUN_LIMIT = 3600.0
"""Seconds a rebalance's lease is renewed for (other actions: quorum.RUN_LIMIT): it moves key after key."""
MISSING_HELD = "another named cluster holds the key: --fix drops this name and the repairer copies the key again"
"""A `missing` finding's detail when reconcile --fix will drop the name (router.reconcile)."""
MISSING_UNHELD = "no other named cluster was seen to hold the key: --fix leaves the name (docs/operations.md)"
"""A `missing` finding's detail when reconcile --fix will leave the name."""
LEFT_SHOWN = 5
"""Keys a rebalance's result names of those it left because they changed since the plan."""
UNKNOWN_OBJECT = ("no record in the placement store names this key: never destroyed by the gateway; another "
                  "application's key, or [store] url names the wrong store (docs/operations.md)")
"""An `unknown` finding's detail."""
OTHER_FLEET = ("this cluster's keys were made with another placement store (its token's fleet marker does not "
               "list this store's): [store] url may name the wrong store; nothing is destroyed on it "
               "(docs/operations.md)")
"""An `other_fleet` finding's detail."""
FLEET_UNREAD = ("this cluster's fleet could not be checked (its fleet marker, or the store's fleet id, "
                "could not be read): nothing is destroyed on it until it is")
"""A `fleet_unread` finding's detail."""

def _forced(blocked: str | None) -> str:
    return f"; forced, so {blocked}" if blocked else ""


def findings_params(findings: list[Finding]) -> dict[str, str]:
    """A reconcile fix's change parameters: the findings it was asked for (and may act on)."""
    return {"findings": json.dumps([list(f) for f in findings])}


def findings_of(params: dict[str, str]) -> list[Finding]:
    try:
        return [(str(kind), str(cluster), str(key_id)) for kind, cluster, key_id in json.loads(params["findings"])]
    except (KeyError, ValueError, TypeError) as exc:
        raise FailedPrecondition(f"this fix's findings cannot be read ({exc!r}): request it again") from None


MAX_PLANNED_MOVES = 2000
"""Moves in one rebalance plan: its change records each (key, from, to, record version), and a
change is one placement-store item (DynamoDB: 400 KB; 2,000 moves of 128-character key ids take
about 320 KB). A larger rebalance takes several plans, each applied before the next is made."""
MAX_PLANNED_BYTES = 250_000
"""And at most this much of that item for the moves, whatever the key ids' and cluster names'
lengths: the rest of the change (its approvals, its result) needs room too."""
PINS_WARN = 0.8
"""``hsmctl status`` warns once this share of ``MAX_PINS`` keys are placed and not yet created."""
MAX_FIX_FINDINGS = 2000
"""Findings one reconcile fix lists (at most ``MAX_PLANNED_BYTES`` of them, too): its change is
one placement-store item like a rebalance's. Once it is applied, a new request lists the rest."""


def fix_findings(fixable: list[Finding]) -> list[Finding]:
    """The first of ``fixable`` that one fix's change can hold (``MAX_FIX_FINDINGS``)."""
    taken: list[Finding] = []
    size = 0
    for finding in fixable:
        size += len(json.dumps(list(finding))) + 2  # as findings_params writes it
        if len(taken) == MAX_FIX_FINDINGS or size > MAX_PLANNED_BYTES:
            break
        taken.append(finding)
    return taken


def rebalance_params(plan_id: str, layout: tuple[str, ...], moves: list[tuple[Placement, str]]) -> dict[str, str]:
    """A rebalance's change parameters: the plan its approvers were shown, with the layout it was
    made for and the version of each key's record it read (the moves run only on those)."""
    return {"plan_id": plan_id, "layout": ",".join(layout),
            "moves": json.dumps([[p.key_id, p.primary, target, p.version] for p, target in moves])}


def rebalance_of(params: dict[str, str]) -> tuple[tuple[str, ...], list[tuple[str, str, str, int]]]:
    if "moves" not in params:  # an earlier version's request, made by plan id alone
        raise FailedPrecondition("this rebalance was requested without the moves of its plan, so it cannot tell "
                                 "which keys changed since: plan again (hsmctl rebalance --apply)")
    try:
        layout = tuple(name for name in params["layout"].split(",") if name)
        moves = [(str(k), str(f), str(t), int(v)) for k, f, t, v in json.loads(params["moves"])]
    except (KeyError, ValueError, TypeError) as exc:
        raise FailedPrecondition(f"this rebalance's plan cannot be read ({exc!r}): plan again") from None
    return layout, moves


AUDIT_PARAM_CHARS = 1024
"""Characters of one change param that each audit event of the change repeats. A longer one (a
rebalance's moves: up to 2,000, ~250 KB; a large fix's findings) stays in the change record, and
the events give its size and a digest of all the params instead (``audited_params``)."""


def audited_params(params: dict[str, str]) -> dict[str, object]:
    """A change's params as every audit event of it records them: ``params`` as they are, but
    for those longer than ``AUDIT_PARAM_CHARS``; if any is, ``params_left_out`` gives each one's
    length (and items, a JSON list's: moves, findings) and ``params_sha256`` the digest of the
    whole params, which ties the event to the change record's (docs/security.md)."""
    kept = {name: value for name, value in params.items() if len(value) <= AUDIT_PARAM_CHARS}
    if len(kept) == len(params):
        return {"params": dict(params)}
    left_out: dict[str, dict[str, int]] = {}
    for name, value in params.items():
        if name not in kept:
            left_out[name] = {"chars": len(value)}
            try:
                items = json.loads(value)
            except ValueError:
                continue
            if isinstance(items, list):
                left_out[name]["items"] = len(items)
    return {"params": kept, "params_left_out": left_out, "params_sha256": audit_mod.digest(params)}


def caller() -> str:
    """The caller's identity, as the authentication interceptor established it
    (client certificate; in development, the ``x-hsmgw-identity`` header)."""
    return current_identity() or "anonymous"


def origin() -> dict[str, str]:
    """Where the caller called from, as a change records it: peer address and how its identity
    was established (certificate, or a development gateway's header or default)."""
    caller = current_caller()
    return {"peer": caller.peer, "authenticated_by": caller.authenticated_by} if caller is not None else {}


def _ts(seconds: float) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def _change_pb(change: Change) -> pb.Change:
    return pb.Change(
        id=change.id,
        action=change.action,
        params=change.params,
        requested_by=change.requested_by,
        approved_by=change.approved_by,
        state=change.state,
        approvals_needed=change.needed,
        create_time=_ts(change.created),
        expire_time=_ts(change.expires),
        result=change.result,
        origins={who: pb.CallerOrigin(peer=where.get("peer", ""), authenticated_by=where.get("authenticated_by", ""))
                 for who, where in change.origins.items()},
    )


def _subject(action: str, params: dict[str, str]) -> tuple[str, str] | None:
    """What a change acts on, of those that one change at a time may act on: a key (place,
    move, release, destroy), a cluster (drain) or a region (failover); else None."""
    for kind, param in (("key", "key_id"), ("cluster", "cluster"), ("region", "region")):
        if params.get(param):
            return kind, params[param]
    return None


FORCE = "force"
"""A drain or failover change's param: run it even if GenerateKey then cannot place keys."""
CONSEQUENCE = "consequence"
"""A forced drain or failover change's param: what becomes of new keys, as it was asked for."""


ASKED_BY = {
    "place_key": "PlaceKey",
    "move_key": "MoveKey",
    "release_key": "ReleaseKey",
    "apply_rebalance": "ApplyRebalance",
    "drain": "DrainCluster",
    "undrain": "DrainCluster",
    "failover": "FailoverRegion",
    "failback": "FailoverRegion",
    "destroy_key": "DestroyKey",
    RECONCILE_FIX: "Reconcile",
    "reconcile_fix": "Reconcile",
}
"""The AdminService method that asks for each kind of change: a role's ``ApproveChange:<method>``
lets it approve those changes alone (gateway.auth)."""


class AdminServicer(admin_pb2_grpc.AdminServiceServicer):
    def __init__(
        self,
        router: Router,
        *,
        audit_path: Path,
        quorum: int = 2,
        change_ttl: float = 3600.0,
        clock: Callable[[], float] = time.time,
        on_audit_failure: Callable[[str], None] = lambda action: None,
        on_audit_unsynced: Callable[[str], None] = lambda action: None,
        policies: PolicyStore | None = None,
    ) -> None:
        """``on_audit_failure(action)``: called for each record the audit log could not take;
        ``on_audit_unsynced(action)``: for each it wrote but could not sync. ``policies``: the
        gateway's policy, for the kinds of change an identity may approve (None: every kind)."""
        self.router = router
        self.policies = policies
        self.audit_path = audit_path
        self.audit = audit_mod.AuditLog(audit_path, on_failure=on_audit_failure, on_unsynced=on_audit_unsynced)
        self.changes = ChangeBook(
            router.store,
            {
                "move_key": self._do_move,
                "apply_rebalance": self._do_rebalance,
                "drain": lambda p: self._do_drain(p, True),
                "undrain": lambda p: self._do_drain(p, False),
                "failover": lambda p: self._do_failover(p, True),
                "failback": lambda p: self._do_failover(p, False),
                "destroy_key": self._do_destroy,
                RECONCILE_FIX: self._do_reconcile_fix,
                "reconcile_fix": self._refuse_unlisted_fix,
                "place_key": self._do_place,
                "release_key": self._do_release,
            },
            quorum=quorum,
            ttl=change_ttl,
            run_limits={"apply_rebalance": REBALANCE_RUN_LIMIT},
            clock=clock,
            on_event=self._audit_change,
        )

    # -- plumbing ------------------------------------------------------------------

    def _audit_change(self, actor: str, event: str, change: Change) -> None:
        """Audit ``event`` of ``change``, caused by ``actor`` (``-``: the gateway itself, for an
        expiry or an interruption it found), with where that admin called from."""
        where = origin() if actor != "-" else {}
        try:
            self.audit.append(actor, event, change.id, outcome=change.state, change_action=change.action,
                              **audited_params(change.params), requested_by=change.requested_by,
                              approved_by=change.approved_by, result=change.result, **where)
        except audit_mod.AuditSyncError:  # a record a crash may lose: the change waits too
            raise EventUnsynced("the gateway's audit log took the change's record but could not sync it to "
                                "disk (its log says why); admin changes wait until it can") from None
        except (audit_mod.AuditLogError, OSError):  # the log names the event (AuditLog)
            raise AuditUnavailable("the gateway's audit log cannot be written (its log says why); "
                                   "admin changes wait until it can") from None

    def _audit_done(self, action: str, target: str, **details: object) -> None:
        """Audit what a running change did, naming the change (``change_id``: its own records name
        who asked and approved): it is done, so a record the log cannot take does not undo or fail
        it (the log names the event and counts it; the next record notes it)."""
        try:
            self.audit.append("-", action, target, "ok", change_id=running_change(), **details)
        except (audit_mod.AuditLogError, OSError):
            pass

    def _call(self, context: grpc.ServicerContext, fn: Callable[[str], R]) -> R:
        identity = caller()
        try:
            return fn(identity)
        except PermissionDenied as exc:
            deny(context, exc)
        except StoreError as exc:  # a read that is not wrapped where it is made (status, reconcile…)
            log.warning("admin call: the placement store is unreachable: %s", exc)
            status.abort(context, Unavailable("placement store is unreachable; try again once it answers"))
        except Exception as exc:  # noqa: BLE001 - every failure gets a status
            status.abort(context, exc)

    def _request(self, identity: str, action: str, params: dict[str, str]) -> pb.Change:
        subject = _subject(action, params)
        for pending in self.changes.list():
            if pending.state == PENDING and (pending.action, pending.params) == (action, params):
                raise FailedPrecondition(f"change {pending.id} already asks for this; approve that one "
                                         f"(hsmctl changes approve {pending.id})")
            # Two pending changes to one key would both run once approved, the last one winning.
            if subject is not None and _subject(pending.action, pending.params) == subject:
                kind, name = subject
                if pending.state == PENDING:
                    raise FailedPrecondition(
                        f"change {pending.id} ({pending.action}) is pending for {kind} {name!r}; approve or reject "
                        f"that one first (hsmctl changes reject {pending.id})")
                raise FailedPrecondition(
                    f"change {pending.id} ({pending.action}) is running for {kind} {name!r}: wait for its result "
                    f"(hsmctl changes list --all); one stuck shows interrupted within "
                    f"{RUN_LIMIT + LEASE:.0f} s of its start, and then no longer holds the {kind}")
        return _change_pb(self.changes.request(identity, action, params, origin()))

    def _switched(self, kind: str) -> set[str]:
        return self._stored_switches().get(kind, set())

    def _stored_switches(self) -> dict[str, set[str]]:
        try:
            return self.changes.switches()
        except StoreError as exc:
            raise Unavailable(f"placement store is unreachable; admin changes cannot be checked now ({exc})") from exc

    def _with_stored_switches(self) -> None:
        """Apply the store's switches here before a check that reads them: a drain approved
        through another process may not have reached this one's periodic sync yet."""
        switches = self._stored_switches()
        self.router.apply_switches(switches.get("drained", set()), switches.get("failed_over", set()))

    # -- actions (run once a change has its approvals) ----------------------------------

    def _deadline(self, seconds: float = 120.0) -> float:
        return time.monotonic() + seconds

    def _do_move(self, params: dict[str, str]) -> str:
        self._with_stored_switches()  # the target may have been drained since the request
        moved = self.router.move_key(params["key_id"], params["to"], self._deadline(), source=params.get("from", ""),
                                     hold=True)
        self._audit_done("key_moved", moved.key_id, clusters=list(moved.clusters), held=True)
        return f"{moved.key_id} now on {', '.join(moved.clusters)} (held there: rebalance leaves it)"

    def _do_release(self, params: dict[str, str]) -> str:
        key_id = params["key_id"]
        if self.router.check_release(key_id) is None:  # only a placement (hsmctl keys place) to take back
            cluster = self.router.unpin(key_id)
            self._audit_done("key_unplaced", key_id, cluster=cluster)
            return self._unplaced(key_id, cluster)
        released = self.router.release_key(key_id)
        self._audit_done("key_released", released.key_id, clusters=list(released.clusters))
        try:  # a placement its creation could not clear goes too
            cluster = self.router.unpin(key_id)
        except FailedPrecondition:
            return f"{released.key_id} released: rebalance may move it"
        except Unavailable as exc:
            return f"{released.key_id} released: rebalance may move it (its placement left: {exc.message})"
        self._audit_done("key_unplaced", key_id, cluster=cluster)
        return (f"{released.key_id} released: rebalance may move it; its placement on {cluster}, which its "
                "creation left, is taken back")

    def _unplaced(self, key_id: str, cluster: str) -> str:
        """A release's result once it took the key's placement on ``cluster`` back: what became of the key."""
        try:
            now = self.router.store.get(key_id)
        except StoreError:  # the placement is taken back all the same
            return f"{key_id} is no longer placed on {cluster}"
        if now is None:
            return f"{key_id} is no longer placed on {cluster}: created from now on, it goes where any new key goes"
        if now.state is KeyState.DESTROYED:
            return f"{key_id} is destroyed; its placement on {cluster}, which its creation left, is taken back"
        if now.state is KeyState.CREATING:  # its creation read the placement before this: it is made there
            return (f"{key_id} is no longer placed on {cluster}, but it was being created there meanwhile: it stays "
                    f"on {now.primary} (hsmctl keys show says whether it is held; if so, release it again once it "
                    "is made)")
        return f"{key_id} is on {now.primary}; its placement on {cluster}, which its creation left, is taken back"

    @staticmethod
    def _plan_id(layout: tuple[str, ...], moves: list[tuple[str, str, str]]) -> str:
        return hashlib.sha256(json.dumps([list(layout), moves]).encode()).hexdigest()[:16]

    def _plan(self) -> tuple[tuple[str, ...], list[tuple[Placement, str]]]:
        """The home-region clusters that take keys now, and the first ``MAX_PLANNED_MOVES`` moves
        a rebalance onto them makes (once applied, the next plan has the rest)."""
        self._with_stored_switches()  # a drain approved through another gateway changes the layout
        layout = self.router.rebalance_layout()
        planned: list[tuple[Placement, str]] = []
        size = 0
        for placement, target in self.router.rebalance_moves(layout):
            # As rebalance_params writes it; cluster names have no length limit.
            size += len(json.dumps([placement.key_id, placement.primary, target, placement.version])) + 2
            if len(planned) == MAX_PLANNED_MOVES or size > MAX_PLANNED_BYTES:
                break
            planned.append((placement, target))
        return layout, planned

    def _do_rebalance(self, params: dict[str, str]) -> str:
        layout, moves = rebalance_of(params)
        self._with_stored_switches()  # a drain approved through another gateway changes the layout
        now = self.router.rebalance_layout()
        if now != layout:
            # Onto other clusters the ring sends keys elsewhere: the plan approved is not the one that would run.
            raise FailedPrecondition(f"the home region's clusters that take keys changed since the plan was made "
                                     f"({', '.join(layout) or 'none'} then, {', '.join(now) or 'none'} now); "
                                     "nothing was moved: plan again")
        done, failed, left = 0, [], []
        kept: list[tuple[str, str]] = []  # (key id, target) of moves refused for what the target holds
        for key_id, source, target, version in moves:
            try:
                # Only the record the plan read moves: a change since (a move, held, or still running
                # having named its target; a destroy; a repair) bumped its version, and wins.
                self.router.move_key(key_id, target, self._deadline(), source=source, version=version)
            except KeyChanged:
                log.info("rebalance: %s changed since the plan; left where it is", key_id)
                left.append(key_id)
                continue
            except ForeignObjects as exc:
                # Not a failure a new plan would mend (the ring sends the key there again): it stays where
                # it is, and the repairer does not copy it there for a while either.
                log.warning("rebalance: %s kept on %s: %s", key_id, source, exc.message)
                self.router.foreign_found(key_id, target)
                kept.append((key_id, target))
                continue
            except (RouterError, StoreError) as exc:
                log.warning("rebalance: %s not moved from %s to %s: %s", key_id, source, target, exc)
                failed.append(f"{key_id}: {getattr(exc, 'message', exc)}")
                continue
            self._audit_done("key_moved", key_id, from_cluster=source, to_cluster=target, reason="rebalance")
            done += 1
        result = f"moved {done} key" + ("" if done == 1 else "s")
        if left:
            shown = ", ".join(left[:LEFT_SHOWN]) + (f" and {len(left) - LEFT_SHOWN} more" if len(left) > LEFT_SHOWN
                                                     else "")
            result += f", left {len(left)} that changed since the plan ({shown})"
        if kept:
            first, onto = kept[0]
            result += (f", kept {len(kept)} where {'it is' if len(kept) == 1 else 'they are'}: the target holds "
                       f"objects under the key's id that are not the key's (the first: {first}, target {onto}; "
                       "docs/operations.md, objects that are not the key's)")
        if failed:
            raise Unavailable(f"{result}; {len(failed)} could not move (the first: {failed[0]}); "
                              "plan again to finish")
        return result

    def _do_drain(self, params: dict[str, str], drain: bool) -> str:
        cluster = params["cluster"]
        blocked = self._checked_switch("drained", cluster, drain, params.get(FORCE) == "true")
        return f"cluster {cluster} {'drained' if drain else 'back in service'}" + _forced(blocked)

    def _do_failover(self, params: dict[str, str], failover: bool) -> str:
        region = params["region"]
        blocked = self._checked_switch("failed_over", region, failover, params.get(FORCE) == "true")
        return f"region {region} {'failed over' if failover else 'failed back'}" + _forced(blocked)

    def _checked_switch(self, kind: str, name: str, on: bool, force: bool) -> str | None:
        """Turn the switch, checked against the switches as the write finds them: two drains
        approved at once through two gateways cannot both pass a check made before either wrote."""
        blocked: list[str | None] = [None]

        def check(switches: dict[str, set[str]]) -> None:
            blocked[0] = self._creation_check(kind, name, force, switches)

        self._switch(kind, name, on, check if on else None)
        return blocked[0]

    def _creation_check(self, kind: str, name: str, force: bool,
                        switches: dict[str, set[str]] | None = None) -> str | None:
        """What turning the switch ``kind`` on for ``name`` (with ``switches``, else the switches
        recorded now) does to new keys, if GenerateKey could then not place one under the
        replication policy; that refused unless ``force``. Asked when a drain or failover is
        requested and again as it is written."""
        switches = self._stored_switches() if switches is None else switches
        drained, failed_over = set(switches.get("drained", set())), set(switches.get("failed_over", set()))
        (drained if kind == "drained" else failed_over).add(name)
        blocked = self.router.creation_blocked(drained, failed_over)
        if blocked is not None and not force:
            what, ask = ((f"draining cluster {name}", f"hsmctl clusters drain {name} --force") if kind == "drained"
                         else (f"failing region {name} over", f"hsmctl regions failover {name} --force"))
            raise FailedPrecondition(f"{what} would leave no placement for new keys under the replication policy: "
                                     f"{blocked}. Only if that is meant (an evacuation), ask with force ({ask})")
        return blocked

    def _switch(self, kind: str, name: str, on: bool,
                check: Callable[[dict[str, set[str]]], None] | None = None) -> None:
        """Record a switch in the store (nothing is switched if it does not answer, or if ``check``
        refuses), then apply the store's switches here, as every other process does at its next sync."""
        self.changes.set_switch(kind, name, on, check)
        try:
            self.sync_switches()
        except StoreError as exc:  # recorded: the repair loop's sync applies it here too
            log.warning("switch %s %s recorded; applying it waits for the placement store (%s)", kind, name, exc)

    def _do_destroy(self, params: dict[str, str]) -> str:
        key = self.router.destroy_key(params["key_id"], self._deadline())
        return f"{key.key_id} destroyed"

    @staticmethod
    def _refuse_unlisted_fix(params: dict[str, str]) -> str:
        # Requested by an earlier version, whose fix never said what it would destroy (and which an
        # earlier version would run unrestricted: fixes are now RECONCILE_FIX, which it does not know).
        raise FailedPrecondition("this fix was requested without the findings it repairs, so it cannot say "
                                 "what it would destroy: request it again (hsmctl reconcile --fix)")

    def _do_reconcile_fix(self, params: dict[str, str]) -> str:
        if "findings" not in params:
            self._refuse_unlisted_fix(params)
        approved = frozenset(findings_of(params))
        return reconcile(self.router, fix=True, only=approved).summary()

    def _do_place(self, params: dict[str, str]) -> str:
        self._with_stored_switches()  # the cluster may have been drained since the request
        self.router.pin(params["key_id"], params["cluster"])
        return f"{params['key_id']} will be created on {params['cluster']}"

    def sync_switches(self) -> None:
        """Apply the recorded switches (at start, and periodically for other processes' changes),
        and record the results of changes that ran while the store did not answer."""
        self.changes.record_results()  # (StoreError, not Unavailable: the callers retry at their next pass)
        switches = self.changes.switches()
        self.router.apply_switches(switches.get("drained", set()), switches.get("failed_over", set()))

    # -- read-only -------------------------------------------------------------------

    def _clusters(self) -> list[pb.ClusterStatus]:
        counts = self.router.key_counts()
        dispatcher = self.router.dispatcher
        clusters = []
        for name, backend in sorted(self.router.backends.items()):
            stats = backend.stats()
            circuit = self.router.breakers[name].state
            clusters.append(
                pb.ClusterStatus(
                    name=name,
                    region=backend.spec.region,
                    # As grpc.health.v1 reports the cluster: a half-open circuit lets one trial through.
                    health="SERVING" if circuit is CircuitState.CLOSED else "NOT_SERVING",
                    keys=counts.get(name, 0),
                    max_keys=backend.spec.max_keys,
                    sessions_open=stats.open,
                    sessions_in_use=stats.in_use,
                    calls_hung=stats.hung,
                    pool_size=stats.size,
                    draining=name in dispatcher.drained,
                    circuit=circuit.value,
                    region_failed_over=backend.spec.region in dispatcher.failed_over,
                    ops_per_second=self.router.breakers[name].ops_per_second(),
                    error_rate=self.router.breakers[name].error_rate(),
                )
            )
        return clusters

    def ListClusters(self, request: pb.ListClustersRequest, context: grpc.ServicerContext) -> pb.ListClustersResponse:
        topology = self.router.topology
        return self._call(context, lambda _: pb.ListClustersResponse(
            clusters=self._clusters(), home_region=topology.home_region, dr_regions=list(topology.dr_regions)))

    def GetStatus(self, request: pb.GetStatusRequest, context: grpc.ServicerContext) -> pb.StatusResponse:
        def run(_: str) -> pb.StatusResponse:
            clusters = self._clusters()
            warnings = []
            # A store outage is one warning among the clusters' state, which is what an operator
            # needs most then: the counts come from this process's cache, and changes are not listed.
            store_down: StoreError | None = None
            try:
                placements = [p for p in self.router.store.scan() if p.state is not KeyState.DESTROYED]
                keys = len(placements)
                under = sum(1 for p in placements if p.state is KeyState.UNDER_REPLICATED)
            except StoreError as exc:
                store_down = exc
                keys = self.router.cached_keys() - self.router.cached_keys(KeyState.DESTROYED)
                under = self.router.cached_keys(KeyState.UNDER_REPLICATED)
                warnings.append("the placement store is unreachable: key counts are this gateway process's cache, "
                                "pending changes are not shown, and keys cannot be created or destroyed until it "
                                "answers")
            for c in clusters:
                if c.health != "SERVING":
                    warnings.append(f"cluster {c.name} ({c.region}) is not serving: circuit {c.circuit}")
                if c.max_keys and c.keys >= KEY_LIMIT_WARNING * c.max_keys:
                    warnings.append(f"cluster {c.name} holds {c.keys} of {c.max_keys} keys "
                                    f"({100 * c.keys // c.max_keys} %): add a cluster or rebalance")
                if c.draining:
                    warnings.append(f"cluster {c.name} is drained")
            failed_over = self.router.dispatcher.failed_over
            for region in sorted(failed_over):
                warnings.append(f"region {region} is failed over: calls go to other regions first, and it takes "
                                f"no new keys or copies (hsmctl regions failback {region})")
            for region in self.router.topology.dr_regions:
                here = [c for c in clusters if c.region == region]
                if any(c.health == "SERVING" and not c.draining and not c.region_failed_over for c in here):
                    continue
                # An operator's switch, not the clusters' health, is then the cause to name.
                if region in failed_over:
                    switched = ["it is failed over"]
                elif any(c.draining for c in here):
                    switched = [f"cluster {c.name} is drained" if c.draining else f"cluster {c.name} is not serving"
                                for c in here]
                else:
                    switched = []
                if switched:
                    warnings.append(f"DR region {region} has no cluster that takes new keys ({', '.join(switched)}): "
                                    "new keys cannot be made durable")
                else:
                    warnings.append(f"DR region {region} has no healthy cluster: new keys cannot be made durable")
            # Only a record written tells that the log takes records again: the file opening and
            # its last line reading (AuditLog.check) say nothing of a full disk.
            failing = self.audit.failing()
            if failing is not None:
                what = (f"record was written at {failing.at} but could not be synced" if failing.written
                        else f"write failed at {failing.at}")
                warnings.append(f"the last audit {what} ({failing.error}): GenerateKey, DestroyKey and admin "
                                "changes are refused until a record is written")
            lost = self.audit.unwritten()
            if lost is not None:
                warnings.append(f"the audit log could not be written since {lost.since} ({lost.error}): "
                                f"{lost.events} event(s) are not in it (this gateway process's log names them); "
                                "the next record written notes them")
            if under:
                warnings.append(f"{under} key is under-replicated; the repairer is working on it" if under == 1 else
                                f"{under} keys are under-replicated; the repairer is working on them")
            if store_down is None:
                try:
                    placed = len(self.router.pins())
                except Unavailable:  # the placement store: said above, or by the changes below
                    placed = 0
                if placed >= PINS_WARN * MAX_PINS:
                    warnings.append(f"{placed} of at most {MAX_PINS} keys are placed and not yet created; past that "
                                    "keys place is refused (hsmctl keys placed lists them, keys release takes one "
                                    "back)")
            open_changes = []
            if store_down is None:
                try:
                    open_changes = self.changes.list()
                except (StoreError, Unavailable):  # the change records alone may fail to read
                    warnings.append("the placement store is unreachable: pending changes are not shown")
            pending = sum(1 for change in open_changes if change.state == PENDING)
            if pending:
                warnings.append(f"{pending} changes are waiting for approval")
            warnings += [f"change {change.id} ({change.action}) is {change.result}"
                         for change in open_changes if change.state == RUNNING]
            dispatcher = self.router.dispatcher
            return pb.StatusResponse(clusters=clusters, keys=keys, under_replicated_keys=under,
                                     pending_changes=pending, warnings=warnings, failovers=dispatcher.failovers,
                                     retries=dispatcher.budget.retries, retries_refused=dispatcher.budget.refused)

        return self._call(context, run)

    def PlanRebalance(self, request: pb.PlanRebalanceRequest, context: grpc.ServicerContext) -> pb.RebalancePlan:
        def run(_: str) -> pb.RebalancePlan:
            layout, planned = self._plan()
            moves = self.router.plan_of(planned)
            considered = sum(1 for p in self.router.store.scan() if p.usable and not p.external)
            return pb.RebalancePlan(
                moves=[pb.KeyMove(key_id=k, **{"from": f}, to=t) for k, f, t in moves],
                keys_considered=considered, plan_id=self._plan_id(layout, moves))

        return self._call(context, run)

    def Reconcile(self, request: pb.ReconcileRequest, context: grpc.ServicerContext) -> pb.ReconcileResponse:
        def run(identity: str) -> pb.ReconcileResponse:
            report = reconcile(self.router, fix=False)
            findings = [pb.ReconcileFinding(kind="stale_intent", key_id=k) for k in report.stale_intents]
            findings += [pb.ReconcileFinding(kind="orphan", cluster=c, key_id=k) for c, k in report.orphans]
            findings += [pb.ReconcileFinding(kind="foreign", cluster=c, key_id=k, detail=why)
                         for c, k, why in report.foreign]
            findings += [pb.ReconcileFinding(kind="unknown", cluster=c, key_id=k, detail=UNKNOWN_OBJECT)
                         for c, k in report.unknown]
            droppable = set(report.droppable)
            findings += [pb.ReconcileFinding(kind="missing", cluster=c, key_id=k,
                                             detail=MISSING_HELD if (c, k) in droppable else MISSING_UNHELD)
                         for c, k in report.missing]
            findings += [pb.ReconcileFinding(kind="duplicate", cluster=c, key_id=k, detail=f"{n} {kind} objects")
                         for c, k, kind, n in report.duplicates]
            findings += [pb.ReconcileFinding(kind="unreachable", cluster=c) for c in report.unreachable]
            findings += [pb.ReconcileFinding(kind="other_fleet", cluster=c, detail=OTHER_FLEET)
                         for c in report.other_fleet]
            findings += [pb.ReconcileFinding(kind="fleet_unread", cluster=c, detail=FLEET_UNREAD)
                         for c in report.fleet_unread]
            response = pb.ReconcileResponse(findings=findings)
            if request.fix and findings:
                fixable = fix_findings(sorted(report.fixable))
                waiting = [c for c in self.changes.list() if c.state == PENDING and c.action == RECONCILE_FIX]
                if not fixable:
                    response.note = ("nothing here is for a fix: duplicates, objects no record names, objects "
                                     "that are not their key's, unreachable clusters, another fleet's clusters and "
                                     "keys that no named cluster holds are for an operator (docs/operations.md)")
                elif waiting:
                    pending = waiting[0]
                    response.change.CopyFrom(_change_pb(pending))
                    same = frozenset(findings_of(pending.params)) == frozenset(fixable)
                    response.note = (f"change {pending.id} already asks for "
                                     + ("this fix" if same else "a fix, of the findings shown when it was asked")
                                     + f": approve it (hsmctl changes approve {pending.id}) or reject it"
                                     + ("" if same else "; findings it does not list need a request after it"))
                else:
                    response.change.CopyFrom(self._request(identity, RECONCILE_FIX, findings_params(fixable)))
                    response.findings_left = len(report.fixable) - len(fixable)
            return response

        return self._call(context, run)

    # -- mutating (quorum) ----------------------------------------------------------------

    def PlaceKey(self, request: pb.PlaceKeyRequest, context: grpc.ServicerContext) -> pb.Change:
        def run(who: str) -> pb.Change:
            self._with_stored_switches()
            self.router.check_pin(request.key_id, request.cluster)
            return self._request(who, "place_key", {"key_id": request.key_id, "cluster": request.cluster})

        return self._call(context, run)

    def MoveKey(self, request: pb.MoveKeyRequest, context: grpc.ServicerContext) -> pb.Change:
        def run(who: str) -> pb.Change:
            self._with_stored_switches()
            _, source = self.router.check_move(request.key_id, request.to, getattr(request, "from"))
            self.router.check_move_objects(request.key_id, request.to, time.monotonic() + 10.0)
            return self._request(who, "move_key", {"key_id": request.key_id, "to": request.to, "from": source})

        return self._call(context, run)

    def ReleaseKey(self, request: pb.ReleaseKeyRequest, context: grpc.ServicerContext) -> pb.Change:
        def run(who: str) -> pb.Change:
            self.router.check_release(request.key_id)
            return self._request(who, "release_key", {"key_id": request.key_id})

        return self._call(context, run)

    def ApplyRebalance(self, request: pb.ApplyRebalanceRequest, context: grpc.ServicerContext) -> pb.Change:
        def run(who: str) -> pb.Change:
            if not request.plan_id:
                raise InvalidArgument("plan_id is required: run PlanRebalance first")
            layout, planned = self._plan()
            if request.plan_id != self._plan_id(layout, self.router.plan_of(planned)):
                raise FailedPrecondition("no such plan now: the placement changed since it was made, or it is "
                                         "not one; plan again (hsmctl rebalance --plan)")
            if not planned:
                raise FailedPrecondition("the plan moves no key: there is nothing to apply")
            return self._request(who, "apply_rebalance", rebalance_params(request.plan_id, layout, planned))

        return self._call(context, run)

    def DrainCluster(self, request: pb.DrainClusterRequest, context: grpc.ServicerContext) -> pb.Change:
        def run(who: str) -> pb.Change:
            if request.cluster not in self.router.backends:
                raise InvalidArgument(f"no cluster named {request.cluster!r}")
            if (request.cluster in self._switched("drained")) == request.drain:
                raise FailedPrecondition(f"cluster {request.cluster} is {'already' if request.drain else 'not'} "
                                         "drained")
            params = {"cluster": request.cluster}
            if request.drain:
                params |= self._forcing("drained", request.cluster, request.force)
            return self._request(who, "drain" if request.drain else "undrain", params)

        return self._call(context, run)

    def FailoverRegion(self, request: pb.FailoverRegionRequest, context: grpc.ServicerContext) -> pb.Change:
        def run(who: str) -> pb.Change:
            if request.region not in self.router.topology.regions:
                raise InvalidArgument(f"no region named {request.region!r}")
            if (request.region in self._switched("failed_over")) == request.failover:
                raise FailedPrecondition(f"region {request.region} is {'already' if request.failover else 'not'} "
                                         "failed over")
            params = {"region": request.region}
            if request.failover:
                params |= self._forcing("failed_over", request.region, request.force)
            return self._request(who, "failover" if request.failover else "failback", params)

        return self._call(context, run)

    def _forcing(self, kind: str, name: str, force: bool) -> dict[str, str]:
        """The params a drain or failover adds: force, if asked (checked again when it runs), and
        the consequence for new keys that approvers see."""
        blocked = self._creation_check(kind, name, force)
        return ({FORCE: "true"} if force else {}) | ({CONSEQUENCE: blocked} if blocked else {})

    def DestroyKey(self, request: pb.DestroyKeyChangeRequest, context: grpc.ServicerContext) -> pb.Change:
        def run(who: str) -> pb.Change:
            self.router.get_key(request.key_id)
            return self._request(who, "destroy_key", {"key_id": request.key_id})

        return self._call(context, run)

    def ListPlacements(self, request: pb.ListPlacementsRequest,
                       context: grpc.ServicerContext) -> pb.ListPlacementsResponse:
        return self._call(context, lambda _: pb.ListPlacementsResponse(
            placements=[pb.KeyPlacement(key_id=k, cluster=c) for k, c in self.router.pins().items()],
            limit=MAX_PINS))

    def ListChanges(self, request: pb.ListChangesRequest, context: grpc.ServicerContext) -> pb.ListChangesResponse:
        return self._call(context, lambda _: pb.ListChangesResponse(
            changes=[_change_pb(c) for c in self.changes.list(include_done=request.all)]))

    def _check_approver(self, who: str, change_id: str) -> None:
        """PermissionDenied, audited as ``authz.denied``, unless ``who``'s roles let it approve the
        kind of change ``change_id`` is (``ApproveChange:<method>``)."""
        if self.policies is None:
            return
        policy = self.policies.current
        principal = policy.principal(who)
        if principal.may_approve(""):  # ApproveChange itself, or every admin method
            return
        change = self.changes.get(change_id)
        try:
            policy.check_approve(principal, ASKED_BY.get(change.action, change.action), change.id)
        except PermissionDenied as exc:
            fields: dict[str, Any] = {"method": f"/{pb.DESCRIPTOR.package}.AdminService/{APPROVE}",
                                      "operation": exc.operation, "resource": change.id, **origin()}
            audit("authz.denied", identity=who, message=exc.message, **fields)
            raise

    def ApproveChange(self, request: pb.ApproveChangeRequest, context: grpc.ServicerContext) -> pb.Change:
        def run(who: str) -> pb.Change:
            self._check_approver(who, request.id)
            try:
                return _change_pb(self.changes.approve(who, request.id, origin()))
            except NotAnotherAdmin as exc:  # an attempt around the quorum is for the auditors too
                try:
                    self.audit.append(who, "change_approval_refused", request.id, outcome="refused",
                                      reason=exc.message, **origin())
                except (audit_mod.AuditLogError, OSError):  # logged, counted, noted in the next record
                    pass
                raise

        return self._call(context, run)

    def RejectChange(self, request: pb.RejectChangeRequest, context: grpc.ServicerContext) -> pb.Change:
        return self._call(context, lambda who: _change_pb(self.changes.reject(who, request.id)))

    # -- audit ------------------------------------------------------------------------------

    def TailAudit(self, request: pb.TailAuditRequest, context: grpc.ServicerContext) -> pb.TailAuditResponse:
        def run(_: str) -> pb.TailAuditResponse:
            if request.lines < 0:
                raise InvalidArgument(f"lines must be 0 (the default, 20) or more, not {request.lines}")
            records = audit_mod.tail(self.audit_path, request.lines or 20) if self.audit_path.exists() else []
            return pb.TailAuditResponse(records=[pb.AuditRecord(json=json.dumps(r, sort_keys=True)) for r in records])

        return self._call(context, run)

    def VerifyAudit(self, request: pb.VerifyAuditRequest, context: grpc.ServicerContext) -> pb.VerifyAuditResponse:
        def run(_: str) -> pb.VerifyAuditResponse:
            result = audit_mod.verify(self.audit_path)
            return pb.VerifyAuditResponse(ok=result.ok, records=result.records, problem=result.problem or "",
                                          line=result.line or 0, unwritten=result.unwritten,
                                          unwritten_noted_at=result.unwritten_noted_at)

        return self._call(context, run)
