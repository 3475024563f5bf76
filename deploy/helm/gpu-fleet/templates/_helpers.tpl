{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "gpu-fleet.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-<chart>, or the release name when it already contains the chart name. */}}
{{- define "gpu-fleet.fullname" -}}
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

{{- define "gpu-fleet.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "gpu-fleet.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gpu-fleet.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "gpu-fleet.labels" -}}
helm.sh/chart: {{ include "gpu-fleet.chart" . }}
{{ include "gpu-fleet.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: gpu-fleet
{{- end }}

{{- define "gpu-fleet.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "gpu-fleet.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "gpu-fleet.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "gpu-fleet.natsName" -}}
{{- printf "%s-nats" (include "gpu-fleet.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The NATS URL the services use: the embedded server's Service when nats.enabled, else nats.url.
Fails loudly on an ambiguous or missing setting instead of guessing.
*/}}
{{- define "gpu-fleet.natsUrl" -}}
{{- if .Values.nats.enabled }}
{{- if or .Values.nats.url .Values.nats.urlSecret.name }}
{{- fail "nats.url / nats.urlSecret are for an external NATS: set nats.enabled=false to use them" }}
{{- end }}
{{- $name := include "gpu-fleet.natsName" . }}
{{- if gt (int .Values.nats.replicas) 1 }}
{{- $urls := list }}
{{- range $i := until (int .Values.nats.replicas) }}
{{- $urls = append $urls (printf "nats://%s-%d.%s-headless.%s.svc:4222" $name $i $name $.Release.Namespace) }}
{{- end }}
{{- join "," $urls }}
{{- else }}
{{- printf "nats://%s.%s.svc:4222" $name .Release.Namespace }}
{{- end }}
{{- else if not .Values.nats.urlSecret.name }}
{{- required "nats.url is required when nats.enabled=false (or set nats.urlSecret.name)" .Values.nats.url }}
{{- end }}
{{- end }}

{{/* Copies of each stream: nats.streamReplicas, else the embedded servers, else 1. */}}
{{- define "gpu-fleet.streamReplicas" -}}
{{- if gt (int .Values.nats.streamReplicas) 0 }}
{{- .Values.nats.streamReplicas }}
{{- else if .Values.nats.enabled }}
{{- .Values.nats.replicas | default 1 }}
{{- else }}
{{- 1 }}
{{- end }}
{{- end }}

{{/* GPU_FLEET_NATS_URL as a literal value or from the Secret named by nats.urlSecret. */}}
{{- define "gpu-fleet.natsUrlEnv" -}}
- name: GPU_FLEET_NATS_URL
{{- if and (not .Values.nats.enabled) .Values.nats.urlSecret.name }}
  valueFrom:
    secretKeyRef:
      name: {{ .Values.nats.urlSecret.name }}
      key: {{ .Values.nats.urlSecret.key | default "url" }}
{{- else }}
  value: {{ include "gpu-fleet.natsUrl" . | quote }}
{{- end }}
{{- end }}

{{/*
One Deployment for one service. Call with
  (dict "root" $ "component" "manager" "env" (list ...) "volumes" ... "volumeMounts" ...
        "annotations" (dict ...))
The container command is gpu-fleet-<component>; all four share the image.
*/}}
{{- define "gpu-fleet.deployment" -}}
{{- $root := .root }}
{{- $component := .component }}
{{- $svc := index $root.Values $component }}
{{- $fullname := include "gpu-fleet.fullname" $root }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ printf "%s-%s" $fullname $component | trunc 63 | trimSuffix "-" }}
  namespace: {{ $root.Release.Namespace }}
  labels:
    {{- include "gpu-fleet.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ $component }}
spec:
  replicas: {{ $svc.replicas }}
  revisionHistoryLimit: 5
  selector:
    matchLabels:
      {{- include "gpu-fleet.selectorLabels" $root | nindent 6 }}
      app.kubernetes.io/component: {{ $component }}
  template:
    metadata:
      labels:
        {{- include "gpu-fleet.selectorLabels" $root | nindent 8 }}
        app.kubernetes.io/component: {{ $component }}
        {{- with $root.Values.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- $annotations := merge (dict) (.annotations | default dict) ($svc.podAnnotations | default dict) ($root.Values.podAnnotations | default dict) }}
      {{- with $annotations }}
      annotations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
    spec:
      serviceAccountName: {{ include "gpu-fleet.serviceAccountName" $root }}
      automountServiceAccountToken: {{ $root.Values.serviceAccount.automount }}
      terminationGracePeriodSeconds: {{ $root.Values.terminationGracePeriodSeconds }}
      {{- with $root.Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $root.Values.podSecurityContext }}
      securityContext:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ $component }}
          image: {{ include "gpu-fleet.image" $root | quote }}
          imagePullPolicy: {{ $root.Values.image.pullPolicy }}
          command: [{{ printf "gpu-fleet-%s" $component | quote }}]
          env:
            {{- include "gpu-fleet.natsUrlEnv" $root | nindent 12 }}
            - name: GPU_FLEET_STREAM_REPLICAS
              value: {{ include "gpu-fleet.streamReplicas" $root | quote }}
            - name: GPU_FLEET_LOG_LEVEL
              value: {{ default $root.Values.logLevel $svc.logLevel | quote }}
            - name: GPU_FLEET_METRICS_PORT
              value: {{ $root.Values.metrics.port | toString | quote }}
            - name: GPU_FLEET_READY_MAX_LAG
              value: {{ $root.Values.probes.readyMaxLag | toString | quote }}
            {{- with .env }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
            {{- with include "gpu-fleet.serviceSecurityEnv" (dict "root" $root "component" $component) | trim }}
{{- . | nindent 12 }}
{{- end }}
            {{- with $svc.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- with $root.Values.securityContext }}
          securityContext:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- with $svc.resources }}
          resources:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- $port := int $root.Values.metrics.port }}
          {{- if $port }}
          ports:
            - name: metrics
              containerPort: {{ $port }}
              protocol: TCP
          {{- end }}
          {{- $probes := and $port $root.Values.probes.enabled }}
          {{- if $svc.livenessProbe }}
          livenessProbe:
            {{- toYaml $svc.livenessProbe | nindent 12 }}
          {{- else if $probes }}
          livenessProbe:
            httpGet: {path: /healthz, port: metrics}
            {{- toYaml $root.Values.probes.liveness | nindent 12 }}
          {{- end }}
          {{- if $svc.readinessProbe }}
          readinessProbe:
            {{- toYaml $svc.readinessProbe | nindent 12 }}
          {{- else if $probes }}
          readinessProbe:
            httpGet: {path: /readyz, port: metrics}
            {{- toYaml $root.Values.probes.readiness | nindent 12 }}
          {{- end }}
          volumeMounts:
            # readOnlyRootFilesystem: give libraries a writable /tmp.
            - name: tmp
              mountPath: /tmp
            {{- with .volumeMounts }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
            {{- with include "gpu-fleet.serviceSecurityMounts" (dict "root" $root "component" $component) | trim }}
{{- . | nindent 12 }}
{{- end }}
      volumes:
        - name: tmp
          emptyDir:
            sizeLimit: 256Mi
        {{- with .volumes }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
        {{- with include "gpu-fleet.serviceSecurityVolumes" (dict "root" $root "component" $component) | trim }}
{{- . | nindent 8 }}
{{- end }}
      {{- with (default $root.Values.nodeSelector $svc.nodeSelector) }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with (default $root.Values.tolerations $svc.tolerations) }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with (default $root.Values.affinity $svc.affinity) }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}

{{/*
Environment of the Kubernetes bridge (manager and binder): in-cluster config and the node label
mapping as JSON (gpu_fleet.kube.settings reads GPU_FLEET_KUBE_MAPPING).
*/}}
{{- define "gpu-fleet.kubeEnv" -}}
{{- $k := .Values.kubernetes -}}
{{- $mapping := dict "clusterName" $k.clusterName "sources" $k.labelSources "flavorAliases" $k.flavorAliases -}}
- name: GPU_FLEET_KUBE_IN_CLUSTER
  value: "true"
- name: GPU_FLEET_KUBE_MAPPING
  value: {{ $mapping | toJson | quote }}
{{- with $k.leaderElection }}
{{- if .enabled }}
- name: GPU_FLEET_KUBE_LEADER_ELECT
  value: "true"
- name: GPU_FLEET_KUBE_LEADER_NAMESPACE
  value: {{ $.Release.Namespace | quote }}
- name: GPU_FLEET_KUBE_LEADER_NAME
  value: {{ include "gpu-fleet.fullname" $ | quote }}
- name: GPU_FLEET_KUBE_LEADER_LEASE_SECONDS
  value: {{ .leaseDurationSeconds | quote }}
- name: GPU_FLEET_KUBE_LEADER_RENEW_SECONDS
  value: {{ .renewDeadlineSeconds | quote }}
- name: GPU_FLEET_KUBE_LEADER_RETRY_SECONDS
  value: {{ .retryPeriodSeconds | quote }}
{{- end }}
{{- end }}
{{- end }}

{{/* ---- Security (docs/security.md): NATS users, signed ledger, TLS ---- */}}

{{- define "gpu-fleet.authSecret" -}}
{{- default (printf "%s-nats-auth" (include "gpu-fleet.fullname" .)) .Values.auth.existingSecret }}
{{- end }}

{{/* The auth Secret's keys: one password per role and per team. */}}
{{- define "gpu-fleet.authKeys" -}}
{{- range $role := list "admin" "binder" "forecaster" "manager" "notifier" }}
- {{ printf "%s-password" $role }}
{{- end }}
{{- range .Values.auth.teams }}
- {{ printf "team-%s-password" . }}
{{- end }}
{{- end }}

{{/* The environment variable holding a team's password in the NATS container. */}}
{{- define "gpu-fleet.teamVar" -}}
{{- printf "TEAM_%s_PASSWORD" (. | upper | replace "-" "_") }}
{{- end }}

{{/* The NATS container: passwords from the Secret, for the config's $VARIABLES. */}}
{{- define "gpu-fleet.natsSecurityEnv" -}}
{{- if .Values.auth.enabled }}
{{- $secret := include "gpu-fleet.authSecret" . }}
{{- range $role := list "admin" "binder" "forecaster" "manager" "notifier" }}
- name: {{ printf "%s_PASSWORD" (upper $role) }}
  valueFrom:
    secretKeyRef: {name: {{ $secret }}, key: {{ printf "%s-password" $role }}}
{{- end }}
{{- range .Values.auth.teams }}
- name: {{ include "gpu-fleet.teamVar" . }}
  valueFrom:
    secretKeyRef: {name: {{ $secret }}, key: {{ printf "team-%s-password" . }}}
{{- end }}
{{- end }}
{{- end }}

{{/* A service's NATS identity: its user and password, the CA, the ledger key it may hold. */}}
{{- define "gpu-fleet.serviceSecurityEnv" -}}
{{- $root := .root }}
{{- if $root.Values.auth.enabled }}
- name: GPU_FLEET_NATS_USER
  value: {{ .component | quote }}
- name: GPU_FLEET_NATS_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ include "gpu-fleet.authSecret" $root }}, key: {{ printf "%s-password" .component }}}
{{- end }}
{{- if $root.Values.auth.ledgerKeysSecret }}
{{- if eq .component "manager" }}
- name: GPU_FLEET_LEDGER_KEY
  value: /etc/gpu-fleet/ledger/ledger.key
{{- else }}
- name: GPU_FLEET_LEDGER_PUBLIC_KEY
  value: /etc/gpu-fleet/ledger/ledger.pub
{{- end }}
{{- end }}
{{- if $root.Values.tls.enabled }}
- name: GPU_FLEET_NATS_TLS_CA
  value: /etc/gpu-fleet/tls/ca.crt
{{- if $root.Values.tls.verifyClients }}
- name: GPU_FLEET_NATS_TLS_CERT
  value: /etc/gpu-fleet/tls/tls.crt
- name: GPU_FLEET_NATS_TLS_KEY
  value: /etc/gpu-fleet/tls/tls.key
{{- end }}
{{- end }}
{{- end }}

{{/* Mounts for the above: the ledger key (private only in the manager) and the TLS files. */}}
{{- define "gpu-fleet.serviceSecurityMounts" -}}
{{- $root := .root }}
{{- if $root.Values.auth.ledgerKeysSecret }}
- name: ledger-keys
  mountPath: /etc/gpu-fleet/ledger
  readOnly: true
{{- end }}
{{- if $root.Values.tls.enabled }}
- name: nats-tls
  mountPath: /etc/gpu-fleet/tls
  readOnly: true
{{- end }}
{{- end }}

{{- define "gpu-fleet.serviceSecurityVolumes" -}}
{{- $root := .root }}
{{- if $root.Values.auth.ledgerKeysSecret }}
- name: ledger-keys
  secret:
    secretName: {{ $root.Values.auth.ledgerKeysSecret }}
    items:
      {{- if eq .component "manager" }}
      - {key: ledger.key, path: ledger.key}
      {{- end }}
      - {key: ledger.pub, path: ledger.pub}
{{- end }}
{{- if $root.Values.tls.enabled }}
- name: nats-tls
  secret:
    secretName: {{ required "tls.secretName is required when tls.enabled" $root.Values.tls.secretName }}
{{- end }}
{{- end }}

{{/* One permissions block of files/permissions.json in nats-server syntax (toJson would
escape ">" as \u003e, which nats-server does not read). */}}
{{- define "gpu-fleet.natsPerms" -}}
{publish: {allow: [{{ include "gpu-fleet.quoted" .publish.allow }}]
{{- with .publish.deny }}, deny: [{{ include "gpu-fleet.quoted" . }}]{{ end -}}
}, subscribe: {allow: [{{ include "gpu-fleet.quoted" .subscribe.allow }}]}
{{- if .allow_responses }}, allow_responses: true{{ end -}}
}
{{- end }}

{{- define "gpu-fleet.quoted" -}}
{{- range $i, $s := . }}{{ if $i }}, {{ end }}{{ $s | quote }}{{ end }}
{{- end }}

{{/* The cluster routes of the embedded NATS pods (nats.replicas > 1), over the headless Service. */}}
{{- define "gpu-fleet.natsRoutes" -}}
{{- $name := include "gpu-fleet.natsName" . }}
{{- $routes := list }}
{{- range $i := until (int .Values.nats.replicas) }}
{{- $routes = append $routes (printf "nats://%s-%d.%s-headless.%s.svc:6222" $name $i $name $.Release.Namespace) }}
{{- end }}
{{- join "," $routes }}
{{- end }}
