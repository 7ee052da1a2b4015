"""One check of a deployment's monitor: the signals of `spec.monitor.thresholds`, computed now.

Traffic signals compare the reference and current windows (`kubeforge.monitor.window`) under the served
version's own tokenizer and model; the error-rate and latency signals ask Prometheus about the stable
variant. A signal that cannot be computed (too few prompts, Prometheus without data or unreachable) is
absent from the reading with the reason, and never counts as crossed: no trigger on missing data. When
Prometheus cannot be asked at all the reading is `blind`, which the metrics say.

The reference's statistics are computed once per version (the reference is frozen once full).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubeforge.errors import KubeForgeError
from kubeforge.monitor import drift
from kubeforge.monitor.window import TrafficWindows, training_sample
from kubeforge.rollout.prometheus import PrometheusError, query_value
from kubeforge.rollout.queries import STABLE, builtin_queries
from kubeforge.spec.deployment import Analysis
from kubeforge.spec.monitor import SLO_SIGNALS, MonitorSpec

logger = logging.getLogger("kubeforge.monitor")

SCORE_BATCH = 8
MAX_SCORED_TOKENS = 512
"""Prompts longer than this are scored on their first tokens only: the shift proxy needs no more."""


@dataclass(frozen=True)
class Reading:
    """The outcome of one check."""

    time: float
    version: str
    signals: tuple[drift.Signal, ...]
    missing: dict[str, str]
    """Signals that were not computed, with why."""
    blind: bool = False
    """Prometheus could not be asked."""
    reference_size: int = 0
    current_size: int = 0

    @property
    def crossed(self) -> list[drift.Signal]:
        return [s for s in self.signals if s.crossed]

    def to_dict(self) -> dict[str, Any]:
        return {
            "time": self.time, "version": self.version, "blind": self.blind,
            "reference_size": self.reference_size, "current_size": self.current_size,
            "signals": {s.name: {"value": s.value, "threshold": s.threshold, "crossed": s.crossed}
                        for s in self.signals},
            "missing": self.missing,
        }


class Scorer:
    """The served version's tokenizer, and its model for per-token negative log-likelihoods (loaded on first
    use, on CPU: the monitor must not take the replicas' GPU)."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoTokenizer

        self.model_dir = model_dir
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self._model: Any = None

    def tokens(self, prompts: Sequence[str]) -> list[list[int]]:
        return [list(ids) for ids in self.tokenizer(list(prompts), add_special_tokens=False)["input_ids"]]

    def nll(self, rows: Sequence[Sequence[int]]) -> list[float]:
        """Mean negative log-likelihood per predicted token of each row (rows under two tokens are left out)."""
        import torch

        if self._model is None:
            from transformers import AutoModelForCausalLM

            self._model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=torch.float32).eval()
        scored = [list(row[:MAX_SCORED_TOKENS]) for row in rows if len(row) >= 2]
        values: list[float] = []
        for start in range(0, len(scored), SCORE_BATCH):
            batch = scored[start:start + SCORE_BATCH]
            width = max(len(row) for row in batch)
            ids = torch.zeros((len(batch), width), dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for i, row in enumerate(batch):
                ids[i, :len(row)] = torch.tensor(row)
                mask[i, :len(row)] = 1
            with torch.no_grad():
                logits = self._model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            kept = mask[:, 1:].float()
            values.extend(((losses * kept).sum(1) / kept.sum(1)).tolist())
        return values


@dataclass
class _Reference:
    lengths: list[int]
    counts: dict[int, int]
    nll: list[float] = field(default_factory=list)
    training: dict[int, int] | None = None
    """Token counts of the training sample, under this version's tokenizer (`token_js_training`)."""


class Monitor:
    """Computes the readings of one deployment's monitor."""

    def __init__(self, spec: MonitorSpec, model: str, capture_dir: str | None, prometheus: str | None,
                 scorer: Callable[[Path], Scorer] = Scorer, base_dir: Path = Path(".")) -> None:
        """`capture_dir` may be None when only SLO signals have thresholds (the spec requires a capture for
        the others)."""
        self.spec = spec
        self.model = model
        self.prometheus = prometheus
        self.capture_dir = capture_dir
        self.windows = None if capture_dir is None else TrafficWindows(capture_dir, spec.window_requests, base_dir)
        self.make_scorer = scorer
        self.base_dir = base_dir
        self._scorer: tuple[Path, Scorer] | None = None
        self._reference: tuple[str, _Reference] | None = None

    def check(self, version: str, model_dir: Path, now: float | None = None) -> Reading:
        """The reading of the traffic served by `version` (whose files are in `model_dir`) now."""
        thresholds = dict(self.spec.thresholds.items())
        signals: list[drift.Signal] = []
        missing: dict[str, str] = {}
        traffic = {k: v for k, v in thresholds.items() if k not in SLO_SIGNALS}
        sizes = (0, 0)
        if traffic:
            if self.windows is None:
                raise ValueError("the monitor has traffic thresholds but no capture to read")
            windows, problems = self.windows.update(version)
            for problem in problems:
                logger.warning("monitor: skipped %s", problem)
            sizes = (len(windows.reference), len(windows.current))
            if min(sizes) < self.spec.min_requests:
                why = (f"{sizes[0]} reference and {sizes[1]} current prompts of version {version}; each window "
                       f"needs {self.spec.min_requests}")
                missing.update(dict.fromkeys(traffic, why))
            else:
                signals.extend(self._traffic_signals(traffic, version, model_dir, windows.reference,
                                                     list(windows.current), missing))
        blind = False
        slo = {k: v for k, v in thresholds.items() if k in SLO_SIGNALS}
        if slo:
            if self.prometheus is None:
                raise ValueError("the monitor has SLO thresholds but no Prometheus address")
            analysis = Analysis(prometheus=self.prometheus, window=self.spec.slo_window,
                                max_error_rate=slo.get("error_rate"), max_p95_latency_s=slo.get("p95_latency_s"))
            queries = builtin_queries(analysis, self.model, version, STABLE)
            for name, threshold in slo.items():
                try:
                    value = query_value(self.prometheus, queries[name])
                except PrometheusError as exc:
                    blind = True
                    missing[name] = str(exc)
                    continue
                if value is None:
                    missing[name] = f"Prometheus has no data for version {version} over {self.spec.slo_window}"
                else:
                    signals.append(drift.Signal(name, value, threshold, 0, 0))
        return Reading(time.time() if now is None else now, version, tuple(signals), missing, blind, *sizes)

    def _scorer_for(self, model_dir: Path) -> Scorer:
        if self._scorer is None or self._scorer[0] != model_dir:
            self._scorer = (model_dir, self.make_scorer(model_dir))
        return self._scorer[1]

    def _traffic_signals(self, thresholds: dict[str, float], version: str, model_dir: Path,
                         reference_prompts: list[str], current_prompts: list[str],
                         missing: dict[str, str]) -> list[drift.Signal]:
        scorer = self._scorer_for(model_dir)
        wants_nll = "loglik_shift" in thresholds
        if self._reference is None or self._reference[0] != version:
            self._reference = None
        reference = self._reference[1] if self._reference is not None else None
        if reference is None:
            rows = scorer.tokens(reference_prompts)
            reference = _Reference([len(r) for r in rows], dict(drift.token_counts(rows)),
                                   scorer.nll(rows) if wants_nll else [])
            self._reference = (version, reference)
        rows = scorer.tokens(current_prompts)
        lengths = [len(r) for r in rows]
        n_ref, n_cur = len(reference_prompts), len(current_prompts)
        values: dict[str, float] = {}
        if "prompt_length_psi" in thresholds:
            values["prompt_length_psi"] = drift.psi(reference.lengths, lengths)
        if "prompt_length_ks" in thresholds:
            values["prompt_length_ks"] = drift.ks(reference.lengths, lengths)[0]
        if "token_js" in thresholds:
            values["token_js"] = drift.token_js(reference.counts, drift.token_counts(rows))
        if "token_js_training" in thresholds:
            try:
                if reference.training is None:
                    sample = training_sample(self.spec.training_data, self.spec.window_requests, self.base_dir)
                    reference.training = dict(drift.token_counts(scorer.tokens(sample)))
            except KubeForgeError as exc:  # read again at the next check; the other signals go on
                missing["token_js_training"] = str(exc)
            else:
                if reference.training:
                    values["token_js_training"] = drift.token_js(reference.training, drift.token_counts(rows))
                else:
                    missing["token_js_training"] = "spec.monitor.training_data: no document with a token"
        if wants_nll:
            current_nll = scorer.nll(rows)
            if reference.nll and current_nll:
                values["loglik_shift"] = drift.loglik_shift(reference.nll, current_nll)
            else:
                missing["loglik_shift"] = "no prompt of one window has two tokens to score"
        return [drift.Signal(name, value, thresholds[name], n_ref, n_cur)
                for name, value in values.items() if math.isfinite(value)]
