"""The CloudFormation alarm templates (deploy/cloudwatch/) make exactly the alarms that
``hsmgw alarms install`` makes: the templates are expanded here (Fn::ForEach, Fn::Sub,
Fn::If…) and compared with ``gateway.cloudwatch.alarm_specs``, field by field."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.cloudwatch import CloudHsmTarget, alarm_specs

ROOT = Path(__file__).resolve().parents[2]
ALARMS = ROOT / "deploy" / "cloudwatch" / "alarms.yaml"
CLOUDHSM_ALARMS = ROOT / "deploy" / "cloudwatch" / "cloudhsm-alarms.yaml"
NO_VALUE = object()


class Template:
    """Just enough of CloudFormation to expand these templates for given parameters."""

    def __init__(self, path: Path, params: dict[str, str], region: str) -> None:
        self.doc = yaml.safe_load(path.read_text())
        declared = self.doc["Parameters"]
        unknown = set(params) - set(declared)
        assert not unknown, f"{path.name}: no parameters {unknown}"
        self.params: dict[str, Any] = {}
        for name, spec in declared.items():
            value = params.get(name, spec.get("Default"))
            assert value is not None, f"{path.name}: parameter {name} needs a value"
            if spec["Type"] == "CommaDelimitedList":
                value = [v.strip() for v in str(value).split(",")]
            if "AllowedPattern" in spec:
                assert re.fullmatch(spec["AllowedPattern"], str(value)), f"{name}={value!r}"
            self.params[name] = value
        self.pseudo = {"AWS::Region": region, "AWS::NoValue": NO_VALUE}
        self.conditions = {name: self.eval(c) for name, c in self.doc.get("Conditions", {}).items()}

    def resources(self) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for key, value in self.doc["Resources"].items():
            if key.startswith("Fn::ForEach::"):
                ident, collection, body = value
                for item in self.eval(collection):
                    for name, resource in _replace(body, ident, item).items():
                        assert name not in out, f"duplicate logical id {name}"
                        out[name] = resource
            else:
                out[key] = value
        return {name: {**r, "Properties": self.eval(r["Properties"])} for name, r in out.items()}

    def ref(self, name: str) -> Any:
        if name in self.pseudo:
            return self.pseudo[name]
        return self.params[name]

    def eval(self, node: Any) -> Any:
        if isinstance(node, list):
            return [v for v in (self.eval(n) for n in node) if v is not NO_VALUE]
        if not isinstance(node, dict):
            return node
        if len(node) == 1:
            (fn, arg), = node.items()
            if fn == "Ref":
                return self.ref(arg)
            if fn == "Fn::If":
                name, yes, no = arg
                return self.eval(yes if self.conditions[name] else no)
            if fn == "Fn::Equals":
                a, b = (self.eval(x) for x in arg)
                return a == b
            if fn == "Fn::Not":
                return not self.eval(arg[0])
            if fn == "Fn::Split":
                sep, text = arg
                return str(self.eval(text)).split(sep)
            if fn == "Fn::Select":
                index, items = arg
                return self.eval(items)[int(index)]
            if fn == "Fn::Sub":
                text, variables = (arg, {}) if isinstance(arg, str) else arg
                local = {k: self.eval(v) for k, v in variables.items()}
                return re.sub(r"\$\{([^}]+)\}", lambda m: str(local[m[1]] if m[1] in local else self.ref(m[1])), text)
            assert not fn.startswith("Fn::"), f"{fn} is not supported by this test's expander"
        return {k: v for k, v in ((k, self.eval(v)) for k, v in node.items()) if v is not NO_VALUE}


def _replace(node: Any, ident: str, value: str) -> Any:
    """Fn::ForEach's substitution: ${ident} → value, &{ident} → value without non-alphanumerics."""
    if isinstance(node, dict):
        return {_replace(k, ident, value): _replace(v, ident, value) for k, v in node.items()}
    if isinstance(node, list):
        return [_replace(v, ident, value) for v in node]
    if isinstance(node, str):
        return node.replace("${" + ident + "}", value).replace("&{" + ident + "}", re.sub(r"[^A-Za-z0-9]", "", value))
    return node


def normalise(spec: dict[str, Any]) -> dict[str, Any]:
    """The template's strings (Ref of a Number parameter) and the code's floats, compared alike."""
    out = copy.deepcopy(spec)
    out["Threshold"] = float(out["Threshold"])
    return out


def by_name(specs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    named = {s["AlarmName"]: normalise(s) for s in specs}
    assert len(named) == len(specs), "alarm names are not unique"
    return named


CLUSTERS = [("use1-a", "us-east-1"), ("use1-b", "us-east-1"), ("usw2-a", "us-west-2"), ("usw2-b", "us-west-2")]


@pytest.mark.parametrize("topic", ["", "arn:aws:sns:us-east-1:111122223333:hsm-oncall"])
@pytest.mark.parametrize("threshold", ["80", "72.5"])
def test_gateway_alarm_template_matches_alarm_specs(topic: str, threshold: str) -> None:
    region = "us-west-2"
    template = Template(ALARMS, {
        "Clusters": ",".join(f"{n}:{r}" for n, r in CLUSTERS),
        "AlarmTopicArn": topic, "ThresholdPercent": threshold, "Namespace": "HSMGW-prod", "Prefix": "gw",
    }, region)
    resources = template.resources()
    assert {r["Type"] for r in resources.values()} == {"AWS::CloudWatch::Alarm"}
    made = by_name([r["Properties"] for r in resources.values()])
    expected = by_name(alarm_specs(CLUSTERS, [region], namespace="HSMGW-prod", prefix="gw",
                                   actions=[topic] if topic else [], threshold_percent=float(threshold)))
    assert sorted(made) == sorted(expected)
    for name in expected:
        assert made[name] == expected[name], name


def test_gateway_alarm_template_defaults_list_the_documented_fleet() -> None:
    clusters = yaml.safe_load(ALARMS.read_text())["Parameters"]["Clusters"]["Default"]
    overlay = (ROOT / "deploy/k8s/overlays/us-east-1/hsmgw.toml").read_text()
    import tomllib

    config = tomllib.loads(overlay)
    assert clusters == ",".join(f"{c['name']}:{c['region']}" for c in config["clusters"])


@pytest.mark.parametrize("hsms", [("hsm-aaaa1111", "hsm-bbbb2222"), ("hsm-aaaa1111", "hsm-bbbb2222", "hsm-cccc3333")])
def test_cloudhsm_alarm_template_matches_alarm_specs(hsms: tuple[str, ...]) -> None:
    topic = "arn:aws:sns:us-east-1:111122223333:hsm-oncall"
    params = {"ClusterName": "use1-a", "ClusterId": "cluster-1234abcd", "AlarmTopicArn": topic,
              **{f"HsmId{i}": hsm for i, hsm in enumerate(hsms)}}
    made = by_name([r["Properties"] for r in Template(CLOUDHSM_ALARMS, params, "us-east-1").resources().values()])
    target = CloudHsmTarget("use1-a", "cluster-1234abcd", hsms)
    expected = by_name(alarm_specs([], [], actions=[topic], cloudhsm=[target]))
    assert sorted(made) == sorted(expected)
    for name in expected:
        assert made[name] == expected[name], name


@pytest.mark.parametrize("template", [ALARMS, CLOUDHSM_ALARMS], ids=lambda p: p.name)
def test_templates_pass_cfn_lint(template: Path, tmp_path: Path) -> None:
    """cfn-lint (AWS's CloudFormation linter, installed with moto[server]) checks them
    against the resource schemas, the LanguageExtensions transform included."""
    api = pytest.importorskip("cfnlint.api")
    matches = api.lint_file(template)
    assert not matches, "\n".join(str(m) for m in matches)
    # ...and it would notice a mistake: the same template with a misspelled property fails.
    broken = tmp_path / template.name
    broken.write_text(template.read_text().replace("ComparisonOperator:", "ComparisonOperater:", 1))
    assert any("ComparisonOperater" in str(m) for m in api.lint_file(broken))
