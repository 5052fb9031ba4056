"""``alarm_drift``: an installed alarm against the spec ``hsmgw alarms install`` would send now."""

from __future__ import annotations

import copy
from typing import Any

from gateway.cloudwatch import CloudHsmTarget, alarm_drift, alarm_specs

TOPIC = "arn:aws:sns:us-east-1:111122223333:hsm-oncall"
OTHER = "arn:aws:sns:us-east-1:111122223333:hsm-audit"


def _specs() -> dict[str, dict[str, Any]]:
    target = CloudHsmTarget("use1-a", "cluster-1234abcd", ("hsm-aaaa1111", "hsm-bbbb2222"))
    specs = alarm_specs([("use1-a", "us-east-1")], ["us-east-1"], actions=[TOPIC, OTHER], cloudhsm=[target])
    return {spec["AlarmName"]: spec for spec in specs}


def _as_described(spec: dict[str, Any]) -> dict[str, Any]:
    """What DescribeAlarms returns for an alarm installed from ``spec``: the same, plus CloudWatch's own fields."""
    alarm = copy.deepcopy(spec)
    alarm.update(AlarmArn=f"arn:aws:cloudwatch:us-east-1:111122223333:alarm:{spec['AlarmName']}", StateValue="OK",
                 StateReason="Threshold Crossed", AlarmConfigurationUpdatedTimestamp="2026-11-30T04:00:00Z")
    return alarm


def test_an_alarm_as_installed_matches_whatever_cloudwatch_adds_or_reorders() -> None:
    for spec in _specs().values():
        alarm = _as_described(spec)
        alarm["AlarmActions"] = list(reversed(alarm["AlarmActions"]))
        if "Threshold" in alarm:
            alarm["Threshold"] = int(alarm["Threshold"]) if alarm["Threshold"].is_integer() else alarm["Threshold"]
        for query in alarm.get("Metrics", []):
            if query.get("ReturnData") is True:
                del query["ReturnData"]  # absent means true
            if "MetricStat" in query:
                query["MetricStat"]["Metric"]["Dimensions"].reverse()
                query["MetricStat"]["Metric"]["AccountId"] = "111122223333"
        assert alarm_drift(spec, alarm) == [], spec["AlarmName"]


def test_a_replaced_hsm_a_changed_threshold_and_a_lost_action_are_named() -> None:
    specs = _specs()
    sync = specs["hsmgw-use1-a-hsm-key-sync"]
    replaced = _as_described(sync)
    for query in replaced["Metrics"]:
        for dimension in query.get("MetricStat", {}).get("Metric", {}).get("Dimensions", []):
            if dimension["Value"] == "hsm-aaaa1111":
                dimension["Value"] = "hsm-cccc3333"
    assert alarm_drift(sync, replaced) == ["Metrics"]

    one_query_less = _as_described(sync)
    one_query_less["Metrics"].pop(0)
    assert alarm_drift(sync, one_query_less) == ["Metrics"]

    hidden = _as_described(sync)
    next(q for q in hidden["Metrics"] if q["ReturnData"] is False)["ReturnData"] = True
    assert alarm_drift(sync, hidden) == ["Metrics"]

    limit = specs["hsmgw-use1-a-keys-near-limit"]
    changed = _as_described(limit)
    changed["Threshold"] = 95.0
    changed["OKActions"] = [TOPIC]
    del changed["TreatMissingData"]
    assert sorted(alarm_drift(limit, changed)) == ["OKActions", "Threshold", "TreatMissingData"]
