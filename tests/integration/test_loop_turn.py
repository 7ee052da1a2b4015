"""The closed loop on one machine, as a user runs it: `kubeforge serve` with spec.monitor.retrain.

Code-like prompts, then prose: the monitor sees the token distribution move, a turn retrains the pipeline on
the captured traffic (`kubeforge run`, its own Ray runtime), the new challenger passes its gate and the
canary, judged by Debian's Prometheus, promotes it while requests keep being answered. A second turn,
requested by hand after the gate was made impossible, ends at the gate and the champion stays.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil
import pytest
from click.testing import CliRunner

from kubeforge.cli import main
from kubeforge.monitor.loop import TurnRecord, loop_store
from kubeforge.registry.audit import CHALLENGER, CHAMPION
from kubeforge.registry.client import Registry
from kubeforge.runtime import SERVE_INGRESS_ENV
from kubeforge.serve.router import VERSION_HEADER
from tests.dashboards import MONITOR_ROW, dashboard_files, load, panel_queries, panels, wait_for_panel_data
from tests.helpers import TINY_PRETRAIN, alive, free_port, running_prometheus, small_manifest, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(1500)]

MODEL = "looped"
DEPLOYMENT = "loop"
CODE = ["def main(", "import os", "return self.", "for i in range(", "class Base(object):", "if x is None:"]
PROSE = ["the weather in the valley was mild", "she walked slowly along the quiet river", "once upon a time",
         "my grandmother baked bread every morning", "birds sang loudly over green meadows"]


def pipeline(gate_max: float) -> dict:
    manifest = small_manifest(MODEL, pretrain=TINY_PRETRAIN)
    manifest["spec"]["data"]["sources"][0]["max_files"] = 20
    manifest["spec"]["promotion"] = {"alias": "challenger",
                                     "gates": [{"metric": "pretrain.val_perplexity", "max": gate_max}]}
    return manifest


def run_pipeline(manifest: Path, work: Path, uri: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run([sys.executable, "-m", "kubeforge.cli", "run", str(manifest), "--workdir", str(work),
                           "--tracking-uri", uri, "--no-metrics"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


class Sender:
    """Completions in a loop: the first `code` prompts code-like, then prose; every status is kept."""

    def __init__(self, url: str, code: int) -> None:
        self.url, self.code = url, code
        self.statuses: list[int] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as http:
            sent = 0
            while not self.stop.is_set():
                pool = CODE if sent < self.code else PROSE
                prompt = pool[sent % len(pool)] if pool is CODE else " ".join(PROSE[(sent + i) % 5] for i in range(3))
                response = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 2})
                self.statuses.append(response.status_code)
                sent += 1


def test_drift_retrains_gates_and_promotes_by_canary_and_a_failed_gate_keeps_the_champion(tmp_path: Path) -> None:
    work = tmp_path / "work"
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    manifest = tmp_path / "pipeline.yaml"
    manifest.write_text(json.dumps(pipeline(gate_max=1e9)))
    run_pipeline(manifest, work, uri)  # version 1, the first champion
    registry = Registry(uri)
    registry.promote(MODEL, "1", alias=CHAMPION, reason="first release", user="test")

    port, metrics_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    store = loop_store(work, DEPLOYMENT)
    (tmp_path / "prometheus").mkdir()
    since = time.time()
    with running_prometheus(tmp_path / "prometheus", port, metrics_port) as prometheus:
        deployment = tmp_path / "deployment.yaml"
        deployment.write_text(json.dumps({
            "apiVersion": "kubeforge.io/v1alpha1", "kind": "ModelDeployment", "metadata": {"name": DEPLOYMENT},
            "spec": {
                "model": f"models:/{MODEL}@champion", "port": port,
                "engine": {"name": "transformers", "max_model_len": 128}, "resources": {"cpus_per_replica": 0.25},
                "capture": {"sample_rate": 1.0, "max_file_age_s": 1},
                "rollout": {"strategy": "canary", "candidate": f"models:/{MODEL}@challenger",
                            "steps": [{"weight": 50, "pause_s": 4}],
                            "analysis": {"prometheus": prometheus, "interval_s": 2, "window": "10s",
                                         "max_error_rate": 0.1, "inconclusive_limit": 30}},
                "monitor": {"interval_s": 2, "window_requests": 30, "min_requests": 20,
                            "thresholds": {"token_js": 0.3},
                            "retrain": {"pipeline": "pipeline.yaml", "cooldown_s": 0, "max_turns_per_day": 3}},
            },
        }))
        log = tmp_path / "serve.log"
        # Serve's settings in the environment, as a user who exported them has (and as this test session's runtime
        # leaves them): Serve then reads them when `kubeforge serve` imports it, not only in its replicas.
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | SERVE_INGRESS_ENV | {"PYTHONUNBUFFERED": "1"}
        with open(log, "wb") as out:
            server = subprocess.Popen(
                [sys.executable, "-m", "kubeforge.cli", "serve", str(deployment), "--workdir", str(work),
                 "--tracking-uri", uri, "--num-cpus", "1", "--metrics-port", str(metrics_port)],
                stdout=out, stderr=out, env=env, start_new_session=True)
        tree: list[psutil.Process] = []
        sender = Sender(url, code=30)
        try:
            def serving() -> bool:
                assert server.poll() is None, log.read_text()[-3000:]
                return "monitoring: every 2 s" in log.read_text()

            wait_for(serving, "kubeforge serve serving and monitoring", timeout_s=300, poll_s=1)
            sender.thread.start()

            def turn(number: int) -> TurnRecord | None:
                assert server.poll() is None, log.read_text()[-3000:]
                turns = store.turns()
                return turns[number - 1] if len(turns) >= number else None

            first: TurnRecord = wait_for(lambda: turn(1), "the first turn to end", timeout_s=900, poll_s=2)
            assert first.trigger.kind == "drift" and first.trigger.signals["token_js"] > 0.3, first
            assert first.outcome == "promoted", (first, log.read_text()[-3000:])
            assert (first.champion_before, first.candidate_version, first.champion_after) == ("1", "2", "2")
            assert registry.alias(MODEL, CHAMPION).version == "2"
            answer = httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": "once", "max_tokens": 1},
                                timeout=60)
            assert answer.status_code == 200 and answer.headers[VERSION_HEADER] == "2"
            exported = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
            assert f'kubeforge_loop_turns_total{{deployment="{DEPLOYMENT}",outcome="promoted"}} 1.0' in exported
            assert f'kubeforge_monitor_threshold{{deployment="{DEPLOYMENT}",signal="token_js"}} 0.3' in exported

            # The next turn's gate cannot pass; a person asks for a turn.
            manifest.write_text(json.dumps(pipeline(gate_max=1.0)))
            asked = CliRunner().invoke(main, ["loop", "trigger", DEPLOYMENT, "--reason", "check the gate",
                                              "--workdir", str(work)])
            assert asked.exit_code == 0, asked.output
            second: TurnRecord = wait_for(lambda: turn(2), "the second turn to end", timeout_s=900, poll_s=2)
            assert second.trigger.kind == "manual" and second.outcome == "gates_failed", second
            assert second.candidate_version == "3" and registry.alias(MODEL, CHAMPION).version == "2"
            assert registry.alias(MODEL, CHALLENGER).version == "2"
            # The kill switch: a request while paused is refused, and no third turn starts.
            for command in (["pause", DEPLOYMENT, "--reason", "incident 7", "--user", "ada"],
                            ["trigger", DEPLOYMENT, "--reason", "one more"]):
                done = CliRunner().invoke(main, ["loop", *command, "--workdir", str(work)])
                assert done.exit_code == 0, done.output
            wait_for(lambda: "loop: manual trigger refused: paused by ada: incident 7" in log.read_text(),
                     "the paused loop to refuse the request", timeout_s=60)
            status = CliRunner().invoke(main, ["loop", "status", DEPLOYMENT, "--workdir", str(work)],
                                        terminal_width=250)
            assert "PAUSED by ada" in status.output and "gates_failed" in status.output, status.output
            assert len(store.turns()) == 2 and store.running() is None
            # Every panel of the dashboard's monitor row shows this deployment's data.
            rollout_dashboard = next(path for path in dashboard_files() if path.stem == "kubeforge-rollout")
            rows = {row for row, panel in panels(load(rollout_dashboard)) if panel.get("type") == "row"}
            queries = [(f"{rollout_dashboard.stem}: {title}", expr)
                       for title, expr in panel_queries(rollout_dashboard, {"deployment": DEPLOYMENT},
                                                         exclude_rows=rows - {MONITOR_ROW})
                       if "kubeforge_monitor_" in expr or "kubeforge_loop_" in expr]
            assert len(queries) >= 6
            empty = wait_for_panel_data(prometheus, queries, since)
            assert not empty, "panels without data:\n" + "\n".join(empty)

            sender.stop.set()
            sender.thread.join(timeout=120)
            # Nothing the loop did interrupted serving: every request was answered.
            assert len(sender.statuses) > 60 and set(sender.statuses) == {200}, sorted(set(sender.statuses))
            tree = [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
            server.send_signal(signal.SIGTERM)
            server.wait(120)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and [p for p in tree if alive(p)]:
                time.sleep(1)
            assert not [(p.pid, p.name()) for p in tree if alive(p)]
        finally:
            sender.stop.set()
            if server.poll() is None:
                tree += [psutil.Process(server.pid), *psutil.Process(server.pid).children(recursive=True)]
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(server.pid, signal.SIGKILL)
            for process in tree:
                with contextlib.suppress(psutil.Error):
                    process.kill()
