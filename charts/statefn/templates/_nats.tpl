{{/*
The nats-server configuration (rendered into the ConfigMap, and hashed into the pod
template so a change rolls the servers). Call with the root context.
*/}}
{{- define "statefn.natsConfig" -}}
{{- $name := include "statefn.natsName" . }}
{{- $domain := printf "%s-headless.%s.svc.%s" $name .Release.Namespace .Values.clusterDomain }}
{{- $replicas := int .Values.nats.replicas }}
# Written by the statefn chart. server_name comes from the pod name (env SERVER_NAME):
# JetStream in a cluster needs a stable, unique name per server.
server_name: $SERVER_NAME
# For the preStop hook's lame duck signal.
pid_file: /tmp/nats.pid
port: 4222
http_port: 8222
# On SIGTERM, stop taking clients and move them away before shutting down.
lame_duck_grace_period: 10s
lame_duck_duration: 30s
jetstream {
  store_dir: /data
  # "always": fsync before every acknowledgement (NATS' own default is 2m: acknowledged
  # messages can be lost when several servers crash or lose power together).
  sync_interval: {{ .Values.nats.syncInterval }}
}
{{- if gt $replicas 1 }}
cluster {
  name: {{ $name }}
  port: 6222
  routes: [
    {{- range $i := until $replicas }}
    nats://{{ $name }}-{{ $i }}.{{ $domain }}:6222
    {{- end }}
  ]
  # Clients learn other servers from the Service, not from gossip of pod addresses.
  no_advertise: true
  connect_retries: 120
}
{{- end }}
{{- end }}
