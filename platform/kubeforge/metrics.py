"""Prometheus metrics of the runner and its stages, served while `kubeforge run` works.

One registry of our own (not the client's global one) so that the metrics a process exports are
exactly these, whatever else the libraries we import register.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, start_http_server

REGISTRY = CollectorRegistry(auto_describe=True)

STAGE_STATES = ["pending", "running", "succeeded", "skipped", "failed"]

STAGE_STATE = Enum(
    "kubeforge_stage_state",
    "State of a pipeline stage in this run.",
    ["pipeline", "stage"],
    states=STAGE_STATES,
    registry=REGISTRY,
)
STAGE_DURATION = Gauge(
    "kubeforge_stage_duration_seconds",
    "Wall-clock seconds the stage took (set when it ends).",
    ["pipeline", "stage"],
    registry=REGISTRY,
)
DATA_DOCUMENTS = Gauge(
    "kubeforge_data_documents",
    "Documents entering (in) and leaving (out) each data step.",
    ["pipeline", "step", "direction"],
    registry=REGISTRY,
)
DATA_CHARACTERS = Gauge(
    "kubeforge_data_characters",
    "Characters entering (in) and leaving (out) each data step.",
    ["pipeline", "step", "direction"],
    registry=REGISTRY,
)
TRAIN_STEP = Gauge(
    "kubeforge_train_step",
    "Last optimizer step reported by the training workers.",
    ["pipeline", "stage"],
    registry=REGISTRY,
)
TRAIN_LOSS = Gauge(
    "kubeforge_train_loss",
    "Loss on the training micro-batches or the validation split.",
    ["pipeline", "stage", "split"],
    registry=REGISTRY,
)
TRAIN_PERPLEXITY = Gauge(
    "kubeforge_train_perplexity",
    "exp(loss) on the validation split.",
    ["pipeline", "stage", "split"],
    registry=REGISTRY,
)
TRAIN_TOKENS_PER_SECOND = Gauge(
    "kubeforge_train_tokens_per_second",
    "Training throughput of each worker.",
    ["pipeline", "stage", "worker"],
    registry=REGISTRY,
)
TRAIN_TOKENS = Gauge(
    "kubeforge_train_tokens",
    "Tokens processed so far, all workers together.",
    ["pipeline", "stage"],
    registry=REGISTRY,
)
TRAIN_LEARNING_RATE = Gauge(
    "kubeforge_train_learning_rate",
    "Current learning rate.",
    ["pipeline", "stage"],
    registry=REGISTRY,
)
TRAIN_MFU = Gauge(
    "kubeforge_train_mfu",
    "Model FLOPs utilisation estimate (GPU only).",
    ["pipeline", "stage", "worker"],
    registry=REGISTRY,
)
TRAIN_EVAL_METRIC = Gauge(
    "kubeforge_train_eval_metric",
    "Other metrics of the evaluations during training than loss and perplexity: finetune's DPO reward_accuracy "
    "and reward_margin, the reward stage's accuracy and margin.",
    ["pipeline", "stage", "metric"],
    registry=REGISTRY,
)

TRAIN_STEP_METRIC = Gauge(
    "kubeforge_train_step_metric",
    "A training loop's own figures per optimizer step, averaged over the workers: the rl stage's "
    "rollout_reward, kl, entropy and rollout_response_length.",
    ["pipeline", "stage", "metric"],
    registry=REGISTRY,
)


TUNE_TRIALS = Gauge(
    "kubeforge_tune_trials",
    "Trials of the hyper-parameter search by state (running, completed, early_stopped, failed).",
    ["pipeline", "state"],
    registry=REGISTRY,
)
TUNE_BEST_METRIC = Gauge(
    "kubeforge_tune_best_metric",
    "Best value of the searched metric among the trials that ran their full length so far.",
    ["pipeline", "metric"],
    registry=REGISTRY,
)
EVAL_METRIC = Gauge(
    "kubeforge_eval_metric",
    "Evaluation metric of a scored model (candidate, base or champion): perplexity, exact_match, bleu, "
    "rouge_l, parse_rate, doctest_pass_rate.",
    ["pipeline", "model", "metric"],
    registry=REGISTRY,
)
QUANTIZE_METRIC = Gauge(
    "kubeforge_quantize_metric",
    "The quantize stage's measurements: perplexity_before, perplexity_after, perplexity_increase, size_ratio, "
    "check_tokens_per_second.",
    ["pipeline", "scheme", "metric"],
    registry=REGISTRY,
)
PROMOTION_GATE = Gauge(
    "kubeforge_promotion_gate_passed",
    "1 when the candidate passed the promotion gate on this metric, 0 when it failed.",
    ["pipeline", "metric"],
    registry=REGISTRY,
)
PROMOTION_AWAITING_APPROVAL = Gauge(
    "kubeforge_promotion_awaiting_approval",
    "1 while the pipeline waits for `kubeforge models approve` on this registered model version.",
    ["pipeline", "version"],
    registry=REGISTRY,
)

# Rollouts (`kubeforge serve` with spec.rollout; the operator exports the same names). The Grafana
# rollout dashboard and the alert rules in infra/ read exactly these.
ROLLOUT_WEIGHT = Gauge(
    "kubeforge_rollout_candidate_weight",
    "Percent of new requests the rollout sends to the candidate.",
    ["deployment"],
    registry=REGISTRY,
)
ROLLOUT_STEP = Gauge(
    "kubeforge_rollout_step",
    "Canary step in progress (1-based; the last step once the rollout ended).",
    ["deployment"],
    registry=REGISTRY,
)
ROLLOUT_PHASE = Enum(
    "kubeforge_rollout_phase",
    "Phase of the rollout.",
    ["deployment"],
    states=["progressing", "promoted", "rolled_back", "concluded"],
    registry=REGISTRY,
)
ROLLOUT_ANALYSES = Counter(
    "kubeforge_rollout_analyses",
    "Canary analyses by overall verdict.",
    ["deployment", "verdict"],
    registry=REGISTRY,
)
ROLLOUT_ROLLBACKS = Counter(
    "kubeforge_rollout_rollbacks",
    "Rollouts that ended by sending the candidate no traffic (failed analyses, a lost A/B test, an abort).",
    ["deployment"],
    registry=REGISTRY,
)
ROLLOUT_PROMOTIONS = Counter(
    "kubeforge_rollout_promotions",
    "Rollouts that ended by promoting the candidate to champion.",
    ["deployment"],
    registry=REGISTRY,
)
ROLLOUT_CHECK_VALUE = Gauge(
    "kubeforge_rollout_check_value",
    "Value of each analysis check at the last analysis that had data.",
    ["deployment", "check"],
    registry=REGISTRY,
)

ROLLOUT_METRICS = (ROLLOUT_WEIGHT, ROLLOUT_STEP, ROLLOUT_PHASE, ROLLOUT_ANALYSES, ROLLOUT_ROLLBACKS, ROLLOUT_PROMOTIONS,
                   ROLLOUT_CHECK_VALUE)
"""What the rollout controller sets, in `kubeforge serve` and in the operator (which serves these too)."""

# The monitor and the retraining loop of a deployment (`kubeforge serve` with spec.monitor). A signal that could not be
# computed at the last check has no series (no alert on stale or missing data); `blind` says why Prometheus's
# signals are missing.
MONITOR_SIGNAL = Gauge(
    "kubeforge_monitor_signal",
    "Value of each drift or SLO signal at the monitor's last check that could compute it.",
    ["deployment", "signal"],
    registry=REGISTRY,
)
MONITOR_THRESHOLD = Gauge(
    "kubeforge_monitor_threshold",
    "Threshold of each signal (spec.monitor.thresholds): above it the signal has crossed.",
    ["deployment", "signal"],
    registry=REGISTRY,
)
MONITOR_WINDOW = Gauge(
    "kubeforge_monitor_window_prompts",
    "Answered prompts of the served version in the reference and current windows.",
    ["deployment", "window"],
    registry=REGISTRY,
)
MONITOR_BLIND = Gauge(
    "kubeforge_monitor_blind",
    "1 when the last check could not ask Prometheus (its error-rate and latency signals are missing).",
    ["deployment"],
    registry=REGISTRY,
)
MONITOR_LAST_CHECK = Gauge(
    "kubeforge_monitor_last_check_timestamp_seconds",
    "When the monitor last completed a check (UNIX seconds).",
    ["deployment"],
    registry=REGISTRY,
)
MONITOR_METRICS = (MONITOR_SIGNAL, MONITOR_THRESHOLD, MONITOR_WINDOW, MONITOR_BLIND, MONITOR_LAST_CHECK)
"""What the monitor sets: on a cluster its replica's router serves exactly these (`kubeforge.serve.monitor_server`)."""

LOOP_TURNS = Counter(
    "kubeforge_loop_turns",
    "Turns of the retraining loop by outcome (promoted, rolled_back, gates_failed, retrain_failed, rollout_failed, "
    "interrupted).",
    ["deployment", "outcome"],
    registry=REGISTRY,
)
LOOP_TURN_RUNNING = Gauge(
    "kubeforge_loop_turn_running",
    "1 while a turn of the retraining loop runs.",
    ["deployment"],
    registry=REGISTRY,
)
LOOP_REFUSED = Counter(
    "kubeforge_loop_refused_triggers",
    "Triggers the guard rails refused (disabled, paused, cooldown, turns per day), by trigger kind.",
    ["deployment", "trigger"],
    registry=REGISTRY,
)

LOOP_METRICS = (LOOP_TURNS, LOOP_TURN_RUNNING, LOOP_REFUSED)
"""What the retraining loop sets, in `kubeforge serve` and in the operator (which serves these too)."""


def serve(port: int, addr: str = "127.0.0.1") -> None:
    """Expose REGISTRY on http://addr:port/metrics from a daemon thread."""
    start_http_server(port, addr=addr, registry=REGISTRY)
