"""Alertmanager's webhook receiver for the retraining loop (`spec.monitor.retrain.alertmanager`).

Alertmanager posts a notification (its webhook payload, version 4) for each group of alerts it routes to
`http://<host>:<port>/alertmanager`. A firing alert whose name is listed, and whose `deployment` label is
this deployment or whose `model` label is the model it serves, becomes a trigger of kind `alert`, which meets
the guard rails like any other. A resolved alert starts nothing. The server answers 200 to every well-formed
notification (Alertmanager retries on errors) and 400 with one line to anything else.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Collection
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from kubeforge.errors import KubeForgeError
from kubeforge.monitor.loop import Trigger

logger = logging.getLogger("kubeforge.monitor")

PATH = "/alertmanager"
MAX_BODY = 1 << 20


def triggers_from(payload: Any, deployment: str, model: str, alerts: Collection[str]) -> list[Trigger]:
    """The triggers of one Alertmanager notification; `ValueError` naming the part that is not one."""
    if not isinstance(payload, dict) or not isinstance(payload.get("alerts"), list):
        raise ValueError("body: expected Alertmanager's webhook payload, a JSON object with a list 'alerts'")
    triggers = []
    for index, alert in enumerate(payload["alerts"]):
        if not isinstance(alert, dict) or not isinstance(alert.get("labels"), dict):
            raise ValueError(f"alerts[{index}]: expected an object with 'labels'")
        labels = alert["labels"]
        if alert.get("status") != "firing" or labels.get("alertname") not in alerts:
            continue
        if labels.get("deployment") != deployment and labels.get("model") != model:
            continue
        summary = (alert.get("annotations") or {}).get("summary") or labels["alertname"]
        triggers.append(Trigger("alert", f"Alertmanager: {labels['alertname']}: {summary}"))
    return triggers


class AlertWebhook:
    """The receiver, in a thread of its own; `on_trigger` gets each trigger."""

    def __init__(self, deployment: str, model: str, alerts: Collection[str], on_trigger: Callable[[Trigger], None],
                 host: str, port: int) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                if self.path.rstrip("/") != PATH:
                    return self._answer(404, f"POST Alertmanager's notifications to {PATH}")
                length = int(self.headers.get("content-length") or 0)
                if length > MAX_BODY:
                    return self._answer(413, f"body: more than {MAX_BODY} bytes")
                try:
                    payload = json.loads(self.rfile.read(length) or b"null")
                except ValueError as exc:
                    return self._answer(400, f"body: not JSON ({exc})")
                try:
                    triggers = triggers_from(payload, deployment, model, alerts)
                except ValueError as exc:
                    return self._answer(400, str(exc))
                for trigger in triggers:
                    owner.on_trigger(trigger)
                return self._answer(200, f"{len(triggers)} trigger(s)")

            def _answer(self, status: int, message: str) -> None:
                body = (json.dumps({"message": message}) + "\n").encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                logger.debug("alertmanager webhook: " + format, *args)

        self.on_trigger = on_trigger
        try:
            self.server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise KubeForgeError(f"spec.monitor.retrain.alertmanager.port: cannot listen on {host}:{port} "
                                 f"({exc.strerror or exc}); choose another port") from None
        self.thread = threading.Thread(target=self.server.serve_forever, name="kubeforge-alert-webhook",
                                       daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host!s}:{port}{PATH}"

    def __enter__(self) -> AlertWebhook:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()
