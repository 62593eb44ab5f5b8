{{/* The chart name, or nameOverride. */}}
{{- define "ratethrottle.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The full name of the release's objects: fullnameOverride, else the release name when it
contains the chart name, else "<release>-<chart>". At most 63 characters (DNS label).
*/}}
{{- define "ratethrottle.fullname" -}}
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

{{/* "name-version" for the helm.sh/chart label. */}}
{{- define "ratethrottle.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "ratethrottle.labels" -}}
helm.sh/chart: {{ include "ratethrottle.chart" . }}
{{ include "ratethrottle.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ratethrottle
{{- end }}

{{/* Labels selecting the release's pods. */}}
{{- define "ratethrottle.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ratethrottle.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* The ServiceAccount the pods run as. */}}
{{- define "ratethrottle.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ratethrottle.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The ConfigMap mounted at /etc/ratethrottle. */}}
{{- define "ratethrottle.configMapName" -}}
{{- default (include "ratethrottle.fullname" .) .Values.config.existingConfigMap }}
{{- end }}

{{/* The namespace watched for custom resources when not watching all of them. */}}
{{- define "ratethrottle.watchNamespace" -}}
{{- default .Release.Namespace .Values.kubernetes.namespace }}
{{- end }}

{{/* True when the chart creates a Secret (an inline Redis password or admin token). */}}
{{- define "ratethrottle.createSecret" -}}
{{- if or (and .Values.storage.redisPassword.value (not .Values.storage.redisPassword.existingSecret)) (and .Values.adminToken.value (not .Values.adminToken.existingSecret)) -}}
true
{{- else -}}
{{- range .Values.alertSecrets }}{{ if and .value (not .existingSecret) }}true{{ end }}{{ end -}}
{{- end }}
{{- end }}

{{/* The settings file ratethrottle.yaml: the settings block and the optional authz and alerts blocks. */}}
{{- define "ratethrottle.settingsFile" -}}
{{- $file := dict "settings" (.Values.config.settings | default dict) }}
{{- if .Values.config.authz }}
{{- $_ := set $file "authz" .Values.config.authz }}
{{- end }}
{{- if .Values.config.alerts }}
{{- $_ := set $file "alerts" .Values.config.alerts }}
{{- end }}
{{- toYaml $file }}
{{- end }}

{{/* The storage URL's scheme, for NOTES. */}}
{{- define "ratethrottle.storageKind" -}}
{{- $url := .Values.storage.url | default "memory" }}
{{- if eq $url "memory" }}memory{{ else }}{{ regexReplaceAll "://.*$" $url "" }}{{ end }}
{{- end }}
