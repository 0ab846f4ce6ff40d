{{/* Names, labels, and the pieces several templates share. */}}

{{- define "inferwatch.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "inferwatch.fullname" -}}
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

{{- define "inferwatch.selectorLabels" -}}
app.kubernetes.io/name: {{ include "inferwatch.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "inferwatch.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "inferwatch.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: inferwatch
{{- end }}

{{- define "inferwatch.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "inferwatch.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "inferwatch.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* Whether the respond stage runs: playbooks are mounted. */}}
{{- define "inferwatch.respondEnabled" -}}
{{- if .Values.playbooks.enabled }}true{{ end }}
{{- end }}

{{/* The stages as Deployments: "all", or "detect" and (with playbooks) "respond"; JSON list. */}}
{{- define "inferwatch.stages" -}}
{{- if .Values.stages.split }}
{{- if include "inferwatch.respondEnabled" . }}["detect","respond"]{{ else }}["detect"]{{ end }}
{{- else }}["all"]{{ end }}
{{- end }}

{{/* A stage's resource name: the full name for "all", the full name and the stage otherwise.
     Called with (list $ stage). */}}
{{- define "inferwatch.stageName" -}}
{{- $root := index . 0 }}{{ $stage := index . 1 }}
{{- if eq $stage "all" }}{{ include "inferwatch.fullname" $root }}
{{- else }}{{ printf "%s-%s" (include "inferwatch.fullname" $root | trunc 55 | trimSuffix "-") $stage }}{{ end }}
{{- end }}

{{/* The Kubernetes actions' verbs per API group and resource, from the enabled actions (the least
     RBAC listed in monitor/respond/actions/kubernetes.py and block.py); JSON list of rules. */}}
{{- define "inferwatch.actionRules" -}}
{{- $deployments := list }}{{ $replicasets := list }}{{ $policies := list }}
{{- $isolate := .Values.actions.isolate }}
{{- if $isolate.enabled }}
{{- if has "networkpolicy" $isolate.modes }}
{{- $deployments = concat $deployments (list "get") }}
{{- $policies = concat $policies (list "get" "create" "delete") }}
{{- end }}
{{- if has "scale" $isolate.modes }}
{{- $deployments = concat $deployments (list "get" "patch") }}
{{- end }}
{{- end }}
{{- if .Values.actions.rollback.enabled }}
{{- $deployments = concat $deployments (list "get" "patch") }}
{{- $replicasets = list "list" }}
{{- end }}
{{- $rules := list }}
{{- if $deployments }}
{{- $rules = append $rules (dict "apiGroups" (list "apps") "resources" (list "deployments") "verbs" ($deployments | uniq)) }}
{{- end }}
{{- if $replicasets }}
{{- $rules = append $rules (dict "apiGroups" (list "apps") "resources" (list "replicasets") "verbs" $replicasets) }}
{{- end }}
{{- if $policies }}
{{- $rules = append $rules (dict "apiGroups" (list "networking.k8s.io") "resources" (list "networkpolicies") "verbs" $policies) }}
{{- end }}
{{- toJson $rules }}
{{- end }}

{{/* Whether the respond stage talks to the Kubernetes API at all (a service account token is mounted). */}}
{{- define "inferwatch.needsApi" -}}
{{- if and (include "inferwatch.respondEnabled" .) (or (ne (include "inferwatch.actionRules" .) "[]") .Values.actions.blockClient.configMaps) }}true{{ end }}
{{- end }}

{{- define "inferwatch.adminTokenEnv" -}}
{{- $respond := default dict .Values.config.respond }}
{{- default "INFERWATCH_ADMIN_TOKEN" $respond.admin_token_env }}
{{- end }}

{{/* kafka.security from the kafka values: ${VAR} for the password, files of the mounted TLS Secret. */}}
{{- define "inferwatch.kafkaSecurity" -}}
{{- $security := dict }}
{{- $sasl := .Values.kafka.sasl }}{{ $tls := .Values.kafka.tls }}
{{- if $sasl.enabled }}
{{- $_ := set $security "security_protocol" (ternary "SASL_SSL" "SASL_PLAINTEXT" $tls.enabled) }}
{{- $_ := set $security "sasl_mechanism" $sasl.mechanism }}
{{- $_ := set $security "sasl_plain_username" $sasl.username }}
{{- $_ := set $security "sasl_plain_password" "${KAFKA_SASL_PASSWORD}" }}
{{- else if $tls.enabled }}
{{- $_ := set $security "security_protocol" "SSL" }}
{{- end }}
{{- if $tls.enabled }}
{{- $_ := set $security "ssl_cafile" (printf "/etc/inferwatch/kafka-tls/%s" $tls.caKey) }}
{{- if $tls.certKey }}{{ $_ := set $security "ssl_certfile" (printf "/etc/inferwatch/kafka-tls/%s" $tls.certKey) }}{{ end }}
{{- if $tls.keyKey }}{{ $_ := set $security "ssl_keyfile" (printf "/etc/inferwatch/kafka-tls/%s" $tls.keyKey) }}{{ end }}
{{- end }}
{{- toJson $security }}
{{- end }}

{{/* The daemon's config: .Values.config with the keys the chart owns set. */}}
{{- define "inferwatch.config" -}}
{{- $config := deepCopy .Values.config }}
{{- $_ := set $config "http" (mustMergeOverwrite (default dict $config.http) (dict "host" "0.0.0.0" "port" .Values.service.port)) }}
{{- $_ := set $config "state" (mustMergeOverwrite (default dict $config.state) (dict "dir" .Values.state.mountPath)) }}
{{- $respond := default dict $config.respond }}
{{- if include "inferwatch.respondEnabled" . }}
{{- $_ := set $respond "playbooks" "/etc/inferwatch/playbooks" }}
{{- else }}
{{- $_ := unset $respond "playbooks" }}
{{- end }}
{{- $_ := set $respond "kubernetes" (dict "mode" "in_cluster") }}
{{- $_ := set $config "respond" $respond }}
{{- $security := include "inferwatch.kafkaSecurity" . | fromJson }}
{{- if $security }}
{{- $kafka := default dict $config.kafka }}
{{- $_ := set $kafka "security" (mustMergeOverwrite (default dict $kafka.security) $security) }}
{{- $_ := set $config "kafka" $kafka }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/* The Prometheus selector of this release's scrape targets (job = the Service's name). */}}
{{- define "inferwatch.promSelector" -}}
{{- $full := include "inferwatch.fullname" . -}}
namespace="{{ .Release.Namespace }}", job=~"{{ $full }}|{{ $full }}-detect|{{ $full }}-respond"
{{- end }}
