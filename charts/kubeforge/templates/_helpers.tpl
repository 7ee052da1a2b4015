{{/* Chart name, truncated to the 63 characters of a DNS-1123 label. */}}
{{- define "kubeforge.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Prefix of every object name: "<release>-<chart>", or the release name if it holds the chart name. */}}
{{- define "kubeforge.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "kubeforge.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object. */}}
{{- define "kubeforge.labels" -}}
helm.sh/chart: {{ include "kubeforge.chart" . }}
app.kubernetes.io/name: {{ include "kubeforge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubeforge
{{- end -}}

{{/* Selector of the operator's pods (never changes across upgrades: Deployment selectors are immutable). */}}
{{- define "kubeforge.operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubeforge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kubeforge.mlflow.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubeforge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: mlflow
{{- end -}}

{{- define "kubeforge.mlflow.fullname" -}}
{{- printf "%s-mlflow" (include "kubeforge.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kubeforge.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kubeforge.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name must name an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The namespaces the operator watches, as a list (JSON, for fromJsonArray); empty when cluster-wide. */}}
{{- define "kubeforge.watchNamespaces" -}}
{{- if .Values.operator.clusterWide -}}
{{- if .Values.operator.watchNamespaces -}}
{{- fail "operator.watchNamespaces must be empty when operator.clusterWide is true (a cluster-wide operator watches every namespace)" -}}
{{- end -}}
[]
{{- else if .Values.operator.watchNamespaces -}}
{{- .Values.operator.watchNamespaces | uniq | toJson -}}
{{- else -}}
{{- list .Release.Namespace | toJson -}}
{{- end -}}
{{- end -}}

{{- define "kubeforge.image" -}}
{{- printf "%s:%s" .image.repository (default .appVersion .image.tag) -}}
{{- end -}}

{{/* The hardened pod-level securityContext every pod of the chart uses. */}}
{{- define "kubeforge.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
fsGroup: {{ .Values.podSecurity.fsGroup }}
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* The hardened container-level securityContext every container of the chart uses. */}}
{{- define "kubeforge.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurity.runAsUser }}
runAsGroup: {{ .Values.podSecurity.runAsGroup }}
privileged: false
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Rejects combinations values.schema.json cannot express readably. */}}
{{- define "kubeforge.validate" -}}
{{- if and .Values.monitoring.serviceMonitor.enabled .Values.monitoring.podMonitor.enabled -}}
{{- fail "enable monitoring.serviceMonitor or monitoring.podMonitor, not both: Prometheus would scrape the operator twice" -}}
{{- end -}}
{{- $_ := include "kubeforge.watchNamespaces" . -}}
{{- if .Values.mlflow.enabled -}}
{{- $_ := required "mlflow.postgresql.host is required when mlflow.enabled is true" .Values.mlflow.postgresql.host -}}
{{- $_ := required "mlflow.postgresql.existingSecret (a Secret with the database user and password) is required when mlflow.enabled is true" .Values.mlflow.postgresql.existingSecret -}}
{{- $local := hasPrefix "/" .Values.mlflow.artifacts.destination -}}
{{- if and $local (not .Values.mlflow.artifacts.existingClaim) -}}
{{- fail "mlflow.artifacts.existingClaim is required when mlflow.artifacts.destination is a local path" -}}
{{- end -}}
{{- if and (not $local) .Values.mlflow.artifacts.existingClaim -}}
{{- fail "mlflow.artifacts.existingClaim is only used with a local mlflow.artifacts.destination (an absolute path); it is an object store URI here" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* In-cluster URL of the chart's MLflow server. */}}
{{- define "kubeforge.mlflow.url" -}}
{{- printf "http://%s.%s.svc:%d" (include "kubeforge.mlflow.fullname" .) .Release.Namespace (int .Values.mlflow.port) -}}
{{- end -}}

{{/* The MLflow server's database settings; the credentials come from the existing Secret only. */}}
{{- define "kubeforge.mlflow.dbEnv" -}}
{{- $pg := .Values.mlflow.postgresql -}}
- name: HOME
  value: /tmp
- name: MLFLOW_DB_USER
  valueFrom:
    secretKeyRef:
      name: {{ $pg.existingSecret }}
      key: {{ $pg.userKey }}
- name: MLFLOW_DB_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $pg.existingSecret }}
      key: {{ $pg.passwordKey }}
# Kubernetes expands $(VAR) from the variables above, so the URI never holds the secret in the spec.
- name: MLFLOW_BACKEND_STORE_URI
  value: {{ printf "postgresql+%s://$(MLFLOW_DB_USER):$(MLFLOW_DB_PASSWORD)@%s:%d/%s?sslmode=%s" $pg.driver $pg.host (int $pg.port) $pg.database $pg.sslMode | quote }}
{{- end -}}

{{/* Selector of the `helm test` pod (its labels are kubeforge.labels plus this component). */}}
{{- define "kubeforge.test.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubeforge.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: test
{{- end -}}

{{/* The egress rule every NetworkPolicy of the chart has: the cluster DNS, over UDP and TCP. */}}
{{- define "kubeforge.networkPolicy.dnsEgress" -}}
{{- $dns := .Values.networkPolicy.dns -}}
- ports:
    {{- range $dns.ports }}
    - port: {{ . }}
      protocol: UDP
    - port: {{ . }}
      protocol: TCP
    {{- end }}
  {{- with $dns.to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end -}}

{{/* Port of operator.mlflowTrackingUri: its own, or its scheme's; empty for a URI without either. */}}
{{- define "kubeforge.mlflowTrackingUriPort" -}}
{{- $url := urlParse .Values.operator.mlflowTrackingUri -}}
{{- $port := regexFind ":[0-9]+$" $url.host | trimPrefix ":" -}}
{{- if $port -}}
{{- $port -}}
{{- else if eq $url.scheme "https" -}}
443
{{- else if eq $url.scheme "http" -}}
80
{{- end -}}
{{- end -}}
