"""Debian's Alertmanager notifies the retraining loop's webhook, and only the alerts it listens for start a turn."""

from __future__ import annotations

import shutil
import signal
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from kubeforge.errors import KubeForgeError
from kubeforge.monitor.loop import Trigger
from kubeforge.monitor.webhook import AlertWebhook
from tests.helpers import free_port, stop_process_group, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def alert(name: str, status_labels: dict[str, str], summary: str) -> dict:
    return {"labels": {"alertname": name, "severity": "warning", **status_labels}, "annotations": {"summary": summary}}


def test_alertmanager_posts_a_listed_firing_alert_of_this_deployment_and_nothing_else(tmp_path: Path) -> None:
    binary = shutil.which("prometheus-alertmanager")
    if binary is None:
        pytest.fail("prometheus-alertmanager missing: `make test` installs Debian's package")
    triggers: list[Trigger] = []
    with AlertWebhook("loop", "looped", ["KubeForgeTrafficDrift", "KubeForgeServingErrorRateHigh"], triggers.append,
                      "127.0.0.1", free_port()) as webhook:
        config = tmp_path / "alertmanager.yml"
        config.write_text(yaml.safe_dump({
            "route": {"receiver": "loop", "group_by": ["alertname", "deployment", "model"], "group_wait": "1s",
                      "group_interval": "1s", "repeat_interval": "1h"},
            "receivers": [{"name": "loop", "webhook_configs": [{"url": webhook.url, "send_resolved": False}]}],
        }))
        port = free_port()
        manager = subprocess.Popen(
            [binary, f"--config.file={config}", f"--storage.path={tmp_path / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--cluster.listen-address="],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        api = f"http://127.0.0.1:{port}"
        try:
            def ready() -> bool:
                assert manager.poll() is None, "alertmanager exited at start"
                try:
                    return httpx.get(f"{api}/-/ready", timeout=2).status_code == 200
                except httpx.TransportError:
                    return False

            wait_for(ready, "alertmanager ready", timeout_s=60, poll_s=0.5)
            posted = httpx.post(f"{api}/api/v2/alerts", timeout=10, json=[
                alert("KubeForgeTrafficDrift", {"deployment": "loop", "signal": "token_js"}, "token_js is 0.41"),
                alert("KubeForgeTrafficDrift", {"deployment": "other", "signal": "token_js"}, "not ours"),
                alert("KubeForgeStageFailed", {"pipeline": "looped", "stage": "data"}, "not listened for"),
                alert("KubeForgeServingErrorRateHigh", {"model": "looped", "variant": "stable"}, "5xx at 9%"),
            ])
            assert posted.status_code == 200, posted.text
            wait_for(lambda: len(triggers) >= 2, "two notifications at the webhook", timeout_s=60)
            time.sleep(3)  # the other groups would have been sent by now (group_wait 1 s)
        finally:
            stop_process_group(manager, signal.SIGTERM, grace_s=10)
    assert sorted(t.detail for t in triggers) == [
        "Alertmanager: KubeForgeServingErrorRateHigh: 5xx at 9%",
        "Alertmanager: KubeForgeTrafficDrift: token_js is 0.41",
    ]
    assert {t.kind for t in triggers} == {"alert"}


def test_the_webhook_answers_what_is_not_a_notification_with_one_line(tmp_path: Path) -> None:
    with AlertWebhook("loop", "looped", ["KubeForgeTrafficDrift"], lambda trigger: None, "127.0.0.1",
                      free_port()) as webhook:
        bad = httpx.post(webhook.url, content=b"{not json", timeout=10)
        assert bad.status_code == 400 and bad.json()["message"].startswith("body: not JSON")
        shaped = httpx.post(webhook.url, json={"alerts": [{"status": "firing"}]}, timeout=10)
        assert shaped.status_code == 400 and shaped.json()["message"] == "alerts[0]: expected an object with 'labels'"
        assert httpx.post(webhook.url.replace("/alertmanager", "/other"), json={}, timeout=10).status_code == 404
        busy = webhook.server.server_address[1]
        with pytest.raises(KubeForgeError, match=r"alertmanager\.port: cannot listen on 127\.0\.0\.1:\d+"):
            AlertWebhook("loop", "looped", ["X"], lambda trigger: None, "127.0.0.1", busy)
