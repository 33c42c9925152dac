{{/* Chart name, truncated to a DNS label. */}}
{{- define "clipstream.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Release-qualified name. */}}
{{- define "clipstream.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "clipstream.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "clipstream.selectorLabels" -}}
app.kubernetes.io/name: {{ include "clipstream.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: worker
{{- end }}

{{- define "clipstream.labels" -}}
helm.sh/chart: {{ include "clipstream.chart" . }}
{{ include "clipstream.selectorLabels" . }}
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | quote }}
app.kubernetes.io/part-of: clipstream
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "clipstream.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "clipstream.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "clipstream.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/*
terminationGracePeriodSeconds: explicit, or the drain deadline rounded up
plus the margin. Fails when it would not exceed the drain deadline: the
kubelet would SIGKILL the worker before it commits what it drained.
*/}}
{{- define "clipstream.terminationGracePeriodSeconds" -}}
{{- $drain := float64 .Values.pipeline.shutdown.drain_deadline_secs }}
{{- $grace := 0 }}
{{- if kindIs "invalid" .Values.terminationGracePeriodSeconds }}
{{- $grace = add (int (ceil $drain)) (int .Values.terminationGraceMarginSeconds) }}
{{- else }}
{{- $grace = int .Values.terminationGracePeriodSeconds }}
{{- end }}
{{- if le (float64 $grace) $drain }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be greater than pipeline.shutdown.drain_deadline_secs (%v): on SIGTERM the worker drains for up to that long and then commits; raise terminationGracePeriodSeconds (or leave it null to use the deadline + terminationGraceMarginSeconds) or lower the deadline" (int $grace) .Values.pipeline.shutdown.drain_deadline_secs) }}
{{- end }}
{{- $grace }}
{{- end }}

{{/* Cross-field checks that values.schema.json cannot express. */}}
{{- define "clipstream.validate" -}}
{{- $p := .Values.pipeline }}
{{- if ge (int64 $p.source.drain_deadline_ms) (int64 $p.source.session_timeout_ms) }}
{{- fail (printf "pipeline.source.drain_deadline_ms (%d) must be below pipeline.source.session_timeout_ms (%d): a rebalance drain that outlasts the session gets the consumer thrown out of the group" (int64 $p.source.drain_deadline_ms) (int64 $p.source.session_timeout_ms)) }}
{{- end }}
{{- if and $p.sink.parquet.url $p.sink.parquet.dir }}
{{- fail "pipeline.sink.parquet: set url (s3://bucket/prefix/) or dir (a mounted path), not both" }}
{{- end }}
{{- if not (or $p.sink.parquet.url $p.sink.parquet.dir) }}
{{- fail "pipeline.sink.parquet: set url (s3://bucket/prefix/) or dir (a mounted path)" }}
{{- end }}
{{- if and (has "s3" $p.fetch.allowed_schemes) (not $p.fetch.allowed_buckets) }}
{{- fail "pipeline.fetch.allowed_buckets: list the buckets events may reference (an allow-list), e.g. [my-images]" }}
{{- end }}
{{- if .Values.kafka.sasl.enabled }}
{{- $_ := required "kafka.sasl.existingSecret: name the Secret that holds the Kafka SASL username and password (keys kafka.sasl.usernameKey / kafka.sasl.passwordKey)" .Values.kafka.sasl.existingSecret }}
{{- end }}
{{- if and (eq .Values.model.source "pvc") (not .Values.model.pvc.claimName) }}
{{- fail "model.pvc.claimName: model.source is pvc, so name the PersistentVolumeClaim that holds the model directory" }}
{{- end }}
{{- if and (eq .Values.model.source "volume") (not .Values.model.volume) }}
{{- fail "model.volume: model.source is volume, so give a volume source (e.g. {nfs: {server: ..., path: ...}})" }}
{{- end }}
{{- if and .Values.model.labels $p.model.labels }}
{{- fail "model.labels (inline label set) and pipeline.model.labels (a path) are both set: keep one" }}
{{- end }}
{{- if .Values.autoscaling.enabled }}
{{- if gt (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas) }}
{{- fail (printf "autoscaling.minReplicas (%d) is above autoscaling.maxReplicas (%d)" (int .Values.autoscaling.minReplicas) (int .Values.autoscaling.maxReplicas)) }}
{{- end }}
{{- if and (eq .Values.autoscaling.kind "hpa") (lt (int .Values.autoscaling.minReplicas) 1) }}
{{- fail "autoscaling.minReplicas must be at least 1 with kind hpa (scaling to zero needs kind keda with keda.idleReplicaCount: 0)" }}
{{- end }}
{{- $idle := .Values.autoscaling.keda.idleReplicaCount }}
{{- if and (eq .Values.autoscaling.kind "keda") (not (kindIs "invalid" $idle)) }}
{{- if ge (int $idle) (int .Values.autoscaling.minReplicas) }}
{{- fail (printf "autoscaling.keda.idleReplicaCount (%d) must be below autoscaling.minReplicas (%d) (KEDA rejects it otherwise)" (int $idle) (int .Values.autoscaling.minReplicas)) }}
{{- end }}
{{- end }}
{{- end }}
{{- $reviewing := or (not (kindIs "invalid" $p.model.review_min_score)) (not (kindIs "invalid" $p.model.review_min_margin)) }}
{{- if and $reviewing (not (or .Values.model.labels $p.model.labels)) }}
{{- fail "pipeline.model.review_min_score / review_min_margin route labels to review: give a label set (model.labels or pipeline.model.labels)" }}
{{- end }}
{{- if and $reviewing (not $p.sink.kafka.review_topic) }}
{{- fail "pipeline.model.review_min_score / review_min_margin: set pipeline.sink.kafka.review_topic (a fleet routes to a topic)" }}
{{- end }}
{{- if and $p.sink.kafka.review_topic (not $reviewing) }}
{{- fail "pipeline.sink.kafka.review_topic: nothing is routed to it without pipeline.model.review_min_score or review_min_margin" }}
{{- end }}
{{- if and .Values.metrics.serviceMonitor.enabled (not .Values.metrics.service.enabled) }}
{{- fail "metrics.serviceMonitor.enabled needs metrics.service.enabled (the ServiceMonitor selects the metrics Service)" }}
{{- end }}
{{- end }}

{{/* The path of the label set inside the pod, or "". */}}
{{- define "clipstream.labelsPath" -}}
{{- if .Values.model.labels }}/config/labels.toml{{ else }}{{ .Values.pipeline.model.labels }}{{ end }}
{{- end }}

{{/* librdkafka options: SASL (when enabled) then the given ones. */}}
{{- define "clipstream.kafkaOptions" -}}
{{- $opts := dict }}
{{- if .root.Values.kafka.sasl.enabled }}
{{- $_ := set $opts "security.protocol" .root.Values.kafka.sasl.securityProtocol }}
{{- $_ := set $opts "sasl.mechanism" .root.Values.kafka.sasl.mechanism }}
{{- $_ := set $opts "sasl.username" "${KAFKA_USERNAME}" }}
{{- $_ := set $opts "sasl.password" "${KAFKA_PASSWORD}" }}
{{- end }}
{{- range $k, $v := .options }}
{{- $s := toString $v }}
{{- if and (kindIs "float64" $v) (eq (float64 (int64 $v)) $v) }}
{{- $s = toString (int64 $v) }}
{{- end }}
{{- $_ := set $opts $k $s }}
{{- end }}
{{- range $k, $v := $opts }}
{{ toJson $k }} = {{ toJson $v }}
{{- end }}
{{- end }}

{{/*
One execution provider as an inline table: "cuda" -> { kind = "cuda" }
(the worker's [runtime] providers are tables tagged by `kind`).
*/}}
{{- define "clipstream.provider" -}}
{{- $p := . }}
{{- if kindIs "string" . }}{{ $p = dict "kind" . }}{{ end }}
{{- $parts := list (printf "kind = %s" (toJson $p.kind)) }}
{{- if hasKey $p "device_id" }}{{ $parts = append $parts (printf "device_id = %d" (int $p.device_id)) }}{{ end }}
{{- if hasKey $p "memory_limit_bytes" }}{{ $parts = append $parts (printf "memory_limit_bytes = %d" (int64 $p.memory_limit_bytes)) }}{{ end }}
{{- if hasKey $p "fp16" }}{{ $parts = append $parts (printf "fp16 = %t" $p.fp16) }}{{ end }}
{{- if hasKey $p "engine_cache_dir" }}{{ $parts = append $parts (printf "engine_cache_dir = %s" (toJson $p.engine_cache_dir)) }}{{ end }}
{{- printf "{ %s }" (join ", " $parts) }}
{{- end }}

{{/*
`key = <int>` for an optional integer key of .map, when it is set (Helm
drops keys whose value is null).
*/}}
{{- define "clipstream.optInt" -}}
{{- if and (hasKey .map .key) (not (kindIs "invalid" (get .map .key))) }}
{{ .key }} = {{ get .map .key | int64 }}
{{- end }}
{{- end }}

{{/*
The pipeline TOML. Strings go through toJson (a JSON string is a valid TOML
basic string), integers through int64 (values arrive as float64).
*/}}
{{- define "clipstream.pipelineToml" -}}
{{- $p := .Values.pipeline -}}
# Rendered by the clipstream Helm chart ({{ include "clipstream.chart" . }}) from values.pipeline.
# Variable references (dollar, braces) are replaced by the worker from its environment.

[model]
dir = {{ $p.model.dir | toJson }}
variant = {{ $p.model.variant | toJson }}
{{- $labels := include "clipstream.labelsPath" . }}
{{- if $labels }}
labels = {{ $labels | toJson }}
{{- end }}
top_k = {{ $p.model.top_k | int64 }}
{{- if not (kindIs "invalid" $p.model.review_min_score) }}
review_min_score = {{ printf "%.9f" (float64 $p.model.review_min_score) }}
{{- end }}
{{- if not (kindIs "invalid" $p.model.review_min_margin) }}
review_min_margin = {{ printf "%.9f" (float64 $p.model.review_min_margin) }}
{{- end }}

[runtime]
providers = [{{ range $i, $e := $p.runtime.providers }}{{ if $i }}, {{ end }}{{ include "clipstream.provider" $e }}{{ end }}]
{{- with $p.runtime.library }}
library = {{ . | toJson }}
{{- end }}
{{- if not (kindIs "invalid" $p.runtime.allow_cpu_fallback) }}
allow_cpu_fallback = {{ $p.runtime.allow_cpu_fallback }}
{{- end }}
{{- if not (kindIs "invalid" $p.runtime.intra_threads) }}
intra_threads = {{ $p.runtime.intra_threads | int64 }}
{{- end }}
{{- if not (kindIs "invalid" $p.runtime.spinning) }}
spinning = {{ $p.runtime.spinning }}
{{- end }}

[source]
kind = {{ $p.source.kind | toJson }}
brokers = {{ $p.source.brokers | toJson }}
topics = {{ $p.source.topics | toJson }}
group_id = {{ $p.source.group_id | toJson }}
commit_interval_ms = {{ $p.source.commit_interval_ms | int64 }}
session_timeout_ms = {{ $p.source.session_timeout_ms | int64 }}
drain_deadline_ms = {{ $p.source.drain_deadline_ms | int64 }}
auto_offset_reset = {{ $p.source.auto_offset_reset | toJson }}
max_event_bytes = {{ $p.source.max_event_bytes | int64 }}
{{- $srcOpts := include "clipstream.kafkaOptions" (dict "root" . "options" $p.source.options) }}
{{- if $srcOpts }}

[source.options]
{{- $srcOpts }}
{{- end }}

[s3]
{{- with $p.s3.endpoint }}
endpoint = {{ . | toJson }}
{{- end }}
region = {{ $p.s3.region | toJson }}
force_path_style = {{ $p.s3.force_path_style }}
request_timeout_ms = {{ $p.s3.request_timeout_ms | int64 }}
max_attempts = {{ $p.s3.max_attempts | int64 }}
{{- include "clipstream.optInt" (dict "map" $p.s3 "key" "backoff_ms") }}

[fetch]
allowed_schemes = {{ $p.fetch.allowed_schemes | toJson }}
{{- with $p.fetch.allowed_buckets }}
allowed_buckets = {{ . | toJson }}
{{- end }}
concurrency = {{ $p.fetch.concurrency | int64 }}
max_object_bytes = {{ $p.fetch.max_object_bytes | int64 }}

[engine]
max_in_flight = {{ $p.engine.max_in_flight | int64 }}
vision_batch = { max_size = {{ $p.engine.vision_batch.max_size | int64 }}, max_wait_ms = {{ $p.engine.vision_batch.max_wait_ms | int64 }} }
text_batch = { max_size = {{ $p.engine.text_batch.max_size | int64 }}, max_wait_ms = {{ $p.engine.text_batch.max_wait_ms | int64 }} }

[sink.parquet]
{{- with $p.sink.parquet.url }}
url = {{ . | toJson }}
{{- end }}
{{- with $p.sink.parquet.dir }}
dir = {{ . | toJson }}
{{- end }}
max_rows_per_file = {{ $p.sink.parquet.max_rows_per_file | int64 }}
partition_by_date = {{ $p.sink.parquet.partition_by_date }}
{{- range $k := list "max_bytes_per_file" "row_group_rows" "zstd_level" "part_bytes" "max_file_span_secs" }}
{{- include "clipstream.optInt" (dict "map" $p.sink.parquet "key" $k) }}
{{- end }}
{{- with $p.sink.parquet.spool_dir }}
spool_dir = {{ . | toJson }}
{{- end }}
{{- if or $p.sink.kafka.embeddings_topic $p.sink.kafka.labels_topic $p.sink.kafka.review_topic }}

[sink.kafka]
{{- with $p.sink.kafka.brokers }}
brokers = {{ . | toJson }}
{{- end }}
{{- with $p.sink.kafka.embeddings_topic }}
embeddings_topic = {{ . | toJson }}
{{- with $p.sink.kafka.embeddings_format }}
{{- if ne . "json" }}
embeddings_format = {{ . | toJson }}
{{- end }}
{{- end }}
{{- end }}
{{- with $p.sink.kafka.labels_topic }}
labels_topic = {{ . | toJson }}
{{- end }}
{{- with $p.sink.kafka.review_topic }}
review_topic = {{ . | toJson }}
{{- end }}
{{- $sinkOpts := include "clipstream.kafkaOptions" (dict "root" . "options" $p.sink.kafka.options) }}
{{- if $sinkOpts }}

[sink.kafka.options]
{{- $sinkOpts }}
{{- end }}
{{- end }}

[dead_letter]
topic = {{ $p.dead_letter.topic | toJson }}

[shutdown]
drain_deadline_secs = {{ $p.shutdown.drain_deadline_secs }}

[metrics]
listen = {{ printf "0.0.0.0:%d" (int .Values.metrics.port) | toJson }}
{{ end }}

{{/* Env of the Kafka SASL and S3 credentials (worker and nightly job). */}}
{{- define "clipstream.credentialsEnv" -}}
{{- if .Values.kafka.sasl.enabled }}
- name: KAFKA_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ .Values.kafka.sasl.existingSecret }}
      key: {{ .Values.kafka.sasl.usernameKey }}
- name: KAFKA_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.kafka.sasl.existingSecret }}
      key: {{ .Values.kafka.sasl.passwordKey }}
{{- end }}
{{- with .Values.s3.credentials }}
{{- if .existingSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .secretAccessKeyKey }}
{{- end }}
{{- end }}
{{- end }}

{{/* The model directory's mount, unless it is baked into the image. */}}
{{- define "clipstream.modelMount" -}}
{{- if ne .Values.model.source "image" }}
- name: model
  mountPath: {{ .Values.pipeline.model.dir }}
  readOnly: true
  {{- if and (eq .Values.model.source "pvc") .Values.model.pvc.subPath }}
  subPath: {{ .Values.model.pvc.subPath }}
  {{- end }}
{{- end }}
{{- end }}

{{/* The model directory's volume, unless it is baked into the image. */}}
{{- define "clipstream.modelVolume" -}}
{{- if eq .Values.model.source "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ .Values.model.pvc.claimName }}
    readOnly: true
{{- else if eq .Values.model.source "volume" }}
- name: model
  {{- toYaml .Values.model.volume | nindent 2 }}
{{- end }}
{{- end }}

{{/* Labels of the nightly job: not the worker's selector (component). */}}
{{- define "clipstream.nightlyLabels" -}}
helm.sh/chart: {{ include "clipstream.chart" . }}
app.kubernetes.io/name: {{ include "clipstream.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: nightly
app.kubernetes.io/version: {{ .Values.image.tag | default .Chart.AppVersion | trunc 63 | quote }}
app.kubernetes.io/part-of: clipstream
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}
