{{/*
Names, labels and the settings every component shares. Names are truncated to 63 characters
(the DNS label limit of Service names) the way `helm create` does it.
*/}}

{{- define "statefn.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "statefn.fullname" -}}
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

{{- define "statefn.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Labels of every object. Call with (dict "ctx" $ "component" "operator").
*/}}
{{- define "statefn.labels" -}}
helm.sh/chart: {{ include "statefn.chart" .ctx }}
{{ include "statefn.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: statefn
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- end }}

{{/*
Selector labels: immutable on Deployments and StatefulSets, so never the version.
*/}}
{{- define "statefn.selectorLabels" -}}
app.kubernetes.io/name: {{ include "statefn.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "statefn.operatorName" -}}
{{- printf "%s-operator" (include "statefn.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "statefn.gatewayName" -}}
{{- printf "%s-gateway" (include "statefn.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "statefn.natsName" -}}
{{- printf "%s-nats" (include "statefn.fullname" .) | trunc 52 | trimSuffix "-" }}
{{- end }}

{{- define "statefn.etcdName" -}}
{{- printf "%s-etcd" (include "statefn.fullname" .) | trunc 52 | trimSuffix "-" }}
{{- end }}

{{/* The kopf peering name: one per release, so two releases never elect a shared leader. */}}
{{- define "statefn.peeringName" -}}
{{- include "statefn.fullname" . }}
{{- end }}

{{- define "statefn.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}

{{/* Fully qualified: sidecars in other namespaces get the same address. */}}
{{- define "statefn.natsURL" -}}
{{- if .Values.nats.enabled }}
{{- printf "nats://%s.%s.svc.%s:4222" (include "statefn.natsName" .) .Release.Namespace .Values.clusterDomain }}
{{- else }}
{{- required "nats.external.url is required when nats.enabled is false" .Values.nats.external.url }}
{{- end }}
{{- end }}

{{/* One host:port: the statefn clients dial a single endpoint (a Service in front of all members). */}}
{{- define "statefn.etcdEndpoint" -}}
{{- if .Values.etcd.enabled }}
{{- printf "%s.%s.svc.%s:2379" (include "statefn.etcdName" .) .Release.Namespace .Values.clusterDomain }}
{{- else }}
{{- first (required "etcd.external.endpoints is required when etcd.enabled is false" .Values.etcd.external.endpoints) }}
{{- end }}
{{- end }}

{{/* Where the data plane is, and the pod's own address (it binds there: the pod contract). */}}
{{- define "statefn.env" -}}
- name: STATEFN_NATS
  value: {{ include "statefn.natsURL" . | quote }}
- name: STATEFN_ETCD
  value: {{ include "statefn.etcdEndpoint" . | quote }}
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
{{- with .Values.tracing }}
{{- if .otlpEndpoint }}
{{- /* The gateway traces with these; the operator forwards them to every function's sidecar. */}}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .otlpEndpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ .protocol | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ .sampler | quote }}
{{- if .samplerArg }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ .samplerArg | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/* Pod Security "restricted", for every pod of the chart. */}}
{{- define "statefn.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "statefn.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{- define "statefn.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
Scheduling fields of a component. Call with the component's values.
*/}}
{{- define "statefn.scheduling" -}}
{{- with .nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Spread the members of a quorum system over nodes: correlated failures are what lose data. */}}
{{- define "statefn.spreadAffinity" -}}
affinity:
  podAntiAffinity:
    preferredDuringSchedulingIgnoredDuringExecution:
      - weight: 100
        podAffinityTerm:
          topologyKey: kubernetes.io/hostname
          labelSelector:
            matchLabels:
              {{- include "statefn.selectorLabels" . | nindent 14 }}
{{- end }}
