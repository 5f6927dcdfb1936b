"""The Grafana dashboard: provisionable as it is, and every panel's expression returns data from
a real Prometheus scraping a running stack (ops/check.py, also `make ops-check`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "ops" / "grafana" / "dashboards" / "taskcache.json"
PROVISIONING = ROOT / "ops" / "grafana" / "provisioning"


def test_the_dashboard_is_provisionable():
    dashboard = json.loads(DASHBOARD.read_text())
    datasource = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())
    uid = datasource["datasources"][0]["uid"]
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert dashboard["uid"] and len({p["id"] for p in dashboard["panels"]}) == len(
        dashboard["panels"])
    for panel in panels:
        assert panel["datasource"]["uid"] == uid and panel["targets"], panel["title"]
        assert all(t["expr"] and "$" not in t["expr"] for t in panel["targets"]), panel["title"]
    titles = " ".join(p["title"].lower() for p in panels)
    for subject in ("hit rate per layer and family", "latency", "redis memory", "evictions",
                    "queue backlog", "outbox", "task rate", "task failures", "freshness",
                    "stale ratio", "per organization", "ahead of expiry"):
        assert subject in titles, subject
    provider = yaml.safe_load((PROVISIONING / "dashboards" / "taskcache.yml").read_text())
    assert provider["providers"][0]["type"] == "file"


def test_every_panel_returns_data_from_a_real_prometheus(tmp_path):
    done = subprocess.run([sys.executable, "-m", "ops.check", "--seconds", "15"], cwd=ROOT,
                          capture_output=True, text=True, timeout=900,
                          stdin=subprocess.DEVNULL)
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-3000:]
    assert "panel expressions return data" in done.stdout
