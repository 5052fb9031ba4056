"""The policy file: deny by default, prefixes, roles, and errors that name the key path."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.auth import (
    CRYPTO_OPERATIONS,
    Authenticator,
    Limits,
    PermissionDenied,
    Policy,
    PolicyError,
    PolicyStore,
    Unauthenticated,
    identity_from_auth_context,
    load_policy,
    namespace,
    parse_policy,
)
from tests.security.helpers import POLICY, sid

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "security.md"


def policy() -> Policy:
    return parse_policy(tomllib.loads(POLICY))


def test_deny_by_default() -> None:
    p = policy()
    stranger = p.principal("spiffe://hsmgw/stranger")
    for op in CRYPTO_OPERATIONS:
        assert not stranger.may(op, "payments/k")
        assert not stranger.may_some(op)
    assert not stranger.may_admin("ListClusters")
    with pytest.raises(PermissionDenied, match=r"^identity 'spiffe://hsmgw/stranger' may not Sign keys under 'a/b/'$"):
        p.check_key(stranger, "Sign", "a/b/k")


def test_a_role_grants_its_operations_on_its_prefixes_only() -> None:
    p = policy()
    app = p.principal(sid("payments-app"))
    assert app.may("Sign", "payments/k") and app.may("Sign", "payments/deep/er/k")
    assert not app.may("Sign", "paymentsX/k") and not app.may("Sign", "hr/k") and not app.may("Sign", "payments")
    assert not app.may("GenerateKey", "payments/k")  # using keys is not creating them
    admin = p.principal(sid("payments-admin"))
    assert admin.may("GenerateKey", "hr/k") and not admin.may("Sign", "payments/k")


def test_wildcards() -> None:
    p = policy()
    root = p.principal(sid("root"))
    assert root.may("Decrypt", "anything/at/all") and root.may_admin("ListClusters") and root.may_list("ListKeys", "")
    operator = p.principal(sid("operator"))
    assert operator.may_admin("ListClusters") and not operator.may_some("GetKey")


def test_list_needs_the_requested_prefix_inside_a_grant() -> None:
    p = policy()
    admin = p.principal(sid("payments-admin"))
    p.check_list(admin, "ListKeys", "payments/")
    p.check_list(admin, "ListKeys", "payments/sub/x")
    for prefix in ("", "pay", "payments", "secret/"):
        with pytest.raises(PermissionDenied, match="ask for a prefix inside 'payments/', 'hr/'"):
            p.check_list(admin, "ListKeys", prefix)


def test_limits_default_and_per_identity() -> None:
    p = parse_policy(
        {"limits": {"rate": 100, "concurrency": 8},
         "roles": {"r": {"operations": ["Sign"], "prefixes": ["a/"]}},
         "identities": {"x": {"roles": ["r"], "rate": 5}, "y": {"roles": ["r"]}}}
    )
    assert p.principal("x").limits == Limits(rate=5, burst=0, concurrency=8)
    assert p.principal("x").limits.bucket == 5
    assert p.principal("y").limits == Limits(rate=100, concurrency=8)
    assert p.principal("unknown").limits == Limits(rate=100, concurrency=8)


def test_the_permissive_development_policy_allows_everything() -> None:
    dev = Policy.permissive().principal("dev")
    assert dev.may("DestroyKey", "any/key") and dev.may_admin("Anything") and dev.limits == Limits()


def test_each_identity_the_policy_does_not_name_gets_the_default_rights_under_its_own_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import gateway.auth

    monkeypatch.setattr(gateway.auth, "_OTHERS_KEPT", 3)  # more strangers than are kept made
    for p, allowed in ((policy(), False), (Policy.permissive(), True)):
        names = [f"spiffe://hsmgw/stranger-{i}" for i in range(8)]
        for _ in range(2):
            made = [p.principal(name) for name in names]
            assert [m.identity for m in made] == names
            assert all(m.may("Sign", "payments/k") is allowed for m in made)
        assert p.principal(names[-1]) is made[-1]  # kept, not made again per call


def test_an_approver_may_be_granted_some_kinds_of_change_only() -> None:
    """``ApproveChange:<method>`` lets the interceptor through to ApproveChange; which change is
    approved is then checked against the method that asked for it."""
    p = parse_policy({"roles": {"drains": {"admin": ["ApproveChange:DrainCluster", "ListChanges"]},
                                "all": {"admin": ["ApproveChange"]}, "root": {"admin": ["*"]}},
                      "identities": {"ops": {"roles": ["drains"]}, "officer": {"roles": ["all"]},
                                     "root": {"roles": ["root"]}}})
    ops, officer, root = p.principal("ops"), p.principal("officer"), p.principal("root")
    assert ops.may_admin("ApproveChange") and ops.may_admin("ListChanges") and not ops.may_admin("RejectChange")
    assert not ops.may_admin("DrainCluster"), "approving drains is not asking for them"
    assert ops.may_approve("DrainCluster") and not ops.may_approve("DestroyKey") and not ops.may_approve("")
    assert all(who.may_approve(m) for who in (officer, root) for m in ("", "DestroyKey", "DrainCluster"))
    p.check_approve(ops, "DrainCluster", "c1")
    with pytest.raises(PermissionDenied) as refused:
        p.check_approve(ops, "DestroyKey", "c2")
    assert refused.value.message == (
        "identity 'ops' may not approve change 'c2', which DestroyKey asked for (its roles grant "
        "ApproveChange:DrainCluster; approving it needs ApproveChange or ApproveChange:DestroyKey)")
    assert (refused.value.operation, refused.value.resource) == ("admin:ApproveChange:DestroyKey", "c2")
    assert not p.principal("stranger").may_admin("ApproveChange")


def test_every_kind_of_change_names_the_method_that_asks_for_it(tmp_path: Path) -> None:
    """A kind of change no ``ApproveChange:<method>`` covers could be approved by plain grants only."""
    from types import SimpleNamespace

    from gateway.admin import ASKED_BY, AdminServicer
    from gateway.auth import ADMIN_OPERATIONS, CHANGE_METHODS

    assert set(ASKED_BY.values()) == CHANGE_METHODS and CHANGE_METHODS <= ADMIN_OPERATIONS
    admin = AdminServicer(SimpleNamespace(store=None), audit_path=tmp_path / "audit.log")  # type: ignore[arg-type]
    assert set(admin.changes._actions) == set(ASKED_BY)


@pytest.mark.parametrize("key_id, expected", [("hr/payroll/k1", "hr/payroll/"), ("k1", "k1"), ("a/", "a/"), ("", "")])
def test_namespace(key_id: str, expected: str) -> None:
    assert namespace(key_id) == expected


BAD_POLICIES: list[tuple[dict[str, Any], str]] = [
    ({"role": {}}, "role: unknown key"),
    ({"roles": []}, "roles: expected tables"),
    ({"roles": {"r": 1}}, "roles.r: expected a table"),
    ({"roles": {"r": {"operations": ["Sgn"], "prefixes": ["a/"]}}}, "roles.r.operations[0]: unknown operation 'Sgn'"),
    ({"roles": {"r": {"operations": ["BatchSign"], "prefixes": ["a/"]}}},
     "roles.r.operations[0]: BatchSign is authorized as Sign on each item; grant Sign"),
    ({"roles": {"r": {"operations": "Sign", "prefixes": ["a/"]}}}, "roles.r.operations: expected a list of strings"),
    ({"roles": {"r": {"operations": ["Sign", 3], "prefixes": ["a/"]}}}, "roles.r.operations[1]: expected str"),
    ({"roles": {"r": {"operations": ["Sign"], "prefixes": ["payments"]}}},
     "roles.r.prefixes[0]: a prefix must end with '/' (or be '*' for every key), got 'payments'"),
    ({"roles": {"r": {"operations": ["Sign"], "prefixes": ["/"]}}}, "roles.r.prefixes[0]: a prefix must end"),
    ({"roles": {"r": {"operations": ["Sign"]}}}, "roles.r.prefixes: missing"),
    ({"roles": {"r": {"prefixes": ["a/"]}}}, "roles.r.operations: missing"),
    ({"roles": {"r": {"admin": ["Drain"]}}}, "roles.r.admin[0]: unknown AdminService method 'Drain'"),
    ({"roles": {"r": {"admin": ["ApproveChange:ListClusters"]}}},
     "roles.r.admin[0]: ApproveChange: approves changes that one of ApplyRebalance, DestroyKey, DrainCluster, "
     "FailoverRegion, MoveKey, PlaceKey, Reconcile, ReleaseKey asks for, not 'ListClusters'"),
    ({"roles": {"r": {"admin": ["ApproveChange:"]}}}, "roles.r.admin[0]: ApproveChange: approves changes that"),
    ({"roles": {"r": {"admin": ["*"], "extra": 1}}}, "roles.r.extra: unknown key"),
    ({"identities": {"spiffe://x/y": {"roles": ["nope"]}}}, 'identities."spiffe://x/y".roles[0]: no role \'nope\''),
    ({"identities": {"a": {"role": []}}}, "identities.a.role: unknown key"),
    ({"identities": {"a": {"rate": "fast"}}}, "identities.a.rate: expected a number"),
    ({"identities": {"a": {"concurrency": 1.5}}}, "identities.a.concurrency: expected an integer"),
    ({"identities": {"a": {"burst": -1}}}, "identities.a.burst: must be a finite number, 0 (unlimited) or more"),
    ({"identities": {"a": {"burst": float("inf")}}}, "identities.a.burst: must be a finite number"),
    ({"limits": {"rate": float("nan")}}, "limits.rate: must be a finite number"),
    ({"limits": {"rate": float("inf")}}, "limits.rate: must be a finite number"),
    ({"limits": {"rate": True}}, "limits.rate: expected a number"),
    ({"limits": {"qps": 1}}, "limits.qps: unknown key"),
    ({}, "identities: none defined: every call but health checks would be refused, admin calls included"),
    ({"roles": {"r": {"admin": ["*"]}}}, "identities: none defined"),
]


@pytest.mark.parametrize("data, message", BAD_POLICIES, ids=[m.split(":")[0] for _, m in BAD_POLICIES])
def test_each_mistake_names_its_key_path(data: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyError) as info:
        parse_policy(data, "policy.toml")
    assert str(info.value).startswith("auth.policy_file (policy.toml): ")
    assert message in str(info.value)


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match=r"^auth.policy_file: .*missing.toml does not exist$"):
        load_policy(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("[roles\n")
    with pytest.raises(PolicyError, match=r"bad.toml\): not valid TOML"):
        load_policy(tmp_path / "bad.toml")


def test_a_failed_reload_keeps_the_policy_in_force(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(POLICY)
    store = PolicyStore(path)
    before = store.current
    path.write_text("roles = 1\n")
    assert store.reload() is False
    assert store.current is before
    path.write_text("")  # a write that is not atomic, read half way: it would lock every caller out
    assert store.reload() is False
    assert store.current is before
    path.write_text(POLICY + f'\n[identities."{sid("nobody")}"]\nroles = ["root"]\n')
    assert store.reload() is True
    assert store.current.principal(sid("nobody")).may("Sign", "x/y")


def test_the_example_policy_in_the_docs_is_valid() -> None:
    text = EXAMPLE.read_text()
    block = "# policy.toml" + text.split("```toml\n# policy.toml", 1)[1].split("```", 1)[0]
    example = parse_policy(tomllib.loads(block), "docs/security.md")
    app = example.principal("spiffe://hsmgw/payments-app")
    assert app.may("Sign", "payments/signing-2026") and not app.may("GenerateKey", "payments/x")


# -- identity ------------------------------------------------------------------------------------


def test_identity_prefers_the_uri_san_then_the_common_name() -> None:
    uri = {"peer_uri": [b"spiffe://hsmgw/a"], "x509_common_name": [b"cn-a"]}
    assert identity_from_auth_context(uri) == "spiffe://hsmgw/a"
    # A DNS or email SAN written as a URI is not a URI SAN: it is not read at all.
    dns_only = {"x509_subject_alternative_name": [b"example.com", b"spiffe://hsmgw/b"], "peer_dns": [b"example.com"],
                "x509_common_name": [b"c"]}
    assert identity_from_auth_context(dns_only) == "c"
    assert identity_from_auth_context({"x509_common_name": [b"cn-only"]}) == "cn-only"
    two = {"peer_uri": [b"spiffe://hsmgw/a", b"https://x"], "peer_spiffe_id": [b"spiffe://hsmgw/a"]}
    for several in (two, {"peer_uri": [b"https://a", b"https://b"]}):
        with pytest.raises(Unauthenticated, match="several URI SANs"):
            identity_from_auth_context(several)
    for uri_like in (b"spiffe://hsmgw/root", b"urn:root"):  # could pass for a URI identity
        with pytest.raises(Unauthenticated, match="common name looks like a URI"):
            identity_from_auth_context({"x509_common_name": [uri_like]})
    with pytest.raises(Unauthenticated):
        identity_from_auth_context({"x509_common_name": []})


def test_an_identity_that_cannot_be_shown_is_refused() -> None:
    """A CN or URI SAN with a control character (an escape sequence, a line break), a bidi
    override or bytes that are not UTF-8 has no identity: it would reach logs and terminals."""
    for raw in (b"ops\x1b[31m\nFAKE", "ops\u202eevil".encode(), b"ops\tx", b"a\xff"):
        for auth in ({"peer_uri": [b"spiffe://hsmgw/" + raw]}, {"x509_common_name": [raw]}):
            with pytest.raises(Unauthenticated, match="cannot be shown|not valid UTF-8"):
                identity_from_auth_context(auth)
    assert identity_from_auth_context({"x509_common_name": ["Zoë Ops".encode()]}) == "Zoë Ops"
    for spaced in ("Zoë\u00a0Ops", "運用\u3000チーム", "a\u2009b"):  # space separators forge nothing
        assert identity_from_auth_context({"x509_common_name": [spaced.encode()]}) == spaced
    for separator in ("\u2028", "\u2029", "\u0085"):  # a line break by another name
        with pytest.raises(Unauthenticated, match="cannot be shown"):
            identity_from_auth_context({"x509_common_name": [f"ops{separator}FAKE".encode()]})
    with pytest.raises(Unauthenticated, match="cannot be shown"):
        Authenticator(tls=False, dev_header=True).identity(_Context((("x-hsmgw-identity", "a\x7fb"),)))


def test_an_identity_longer_than_the_audit_log_records_whole_is_refused(tmp_path) -> None:
    """Two callers whose names differ only past the 200th character would be one in the audit log."""
    longest, longer = "spiffe://hsmgw/" + "a" * 185, "spiffe://hsmgw/" + "a" * 186
    assert identity_from_auth_context({"peer_uri": [longest.encode()]}) == longest
    for auth in ({"peer_uri": [longer.encode()]}, {"x509_common_name": [b"b" * 201]}):
        with pytest.raises(Unauthenticated, match=r"is 201 characters long: an identity has at most 200$"):
            identity_from_auth_context(auth)
    with pytest.raises(Unauthenticated, match="x-hsmgw-identity header is 201 characters long"):
        Authenticator(tls=False, dev_header=True).identity(_Context((("x-hsmgw-identity", "c" * 201),)))
    # Spaces but U+0020 are written escaped (four characters): two names that differ only in which
    # space ends them would be one clipped name in the audit log.
    for space, written in (("\u00a0", 203), ("\u3000", 205)):  # \xa0, \u3000
        with pytest.raises(Unauthenticated, match=rf"is {written} characters long as the audit log writes it"):
            identity_from_auth_context({"x509_common_name": [("a" * 199 + space).encode()]})
    assert identity_from_auth_context({"x509_common_name": [("a" * 196 + "\u00a0").encode()]}) == "a" * 196 + "\u00a0"

    path = tmp_path / "policy.toml"
    path.write_text(f'[roles.r]\noperations = ["Sign"]\nprefixes = ["app/"]\n[identities."{longer}"]\nroles = ["r"]\n')
    with pytest.raises(PolicyError, match="an identity has at most 200 characters \\(201 here\\)"):
        load_policy(path)
    path.write_text(path.read_text().replace(longer, longest))
    assert longest in load_policy(path).identities


class _Context:
    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def auth_context(self) -> dict[str, list[bytes]]:
        return {"x509_common_name": [b"from-cert"]}


def test_the_identity_header_counts_only_on_a_loopback_development_server() -> None:
    header = (("x-hsmgw-identity", "payments-admin"),)
    assert Authenticator(tls=False, dev_header=True).identity(_Context(header)) == "payments-admin"
    assert Authenticator(tls=False, dev_header=True).identity(_Context(())) == "dev"
    assert Authenticator(tls=False, dev_header=False).identity(_Context(header)) == "dev"
    assert Authenticator(tls=True, dev_header=True).identity(_Context(header)) == "from-cert"
    assert Authenticator(tls=False, dev_header=True).authenticate(_Context(header)) == ("payments-admin", "header")
    assert Authenticator(tls=False, dev_header=True).authenticate(_Context(())) == ("dev", "default")
    assert Authenticator(tls=True, dev_header=True).authenticate(_Context(header)) == ("from-cert", "certificate")


@given(key_id=st.text(max_size=40), prefix=st.sampled_from(["payments/", "hr/", "a/b/"]))
def test_a_grant_covers_exactly_the_ids_that_start_with_its_prefix(key_id: str, prefix: str) -> None:
    p = parse_policy({"roles": {"r": {"operations": ["Sign"], "prefixes": [prefix]}},
                      "identities": {"x": {"roles": ["r"]}}})
    assert p.principal("x").may("Sign", key_id) == key_id.startswith(prefix)
    assert p.principal("x").may("Sign", prefix + key_id)
