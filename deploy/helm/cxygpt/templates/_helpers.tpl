{{/* Names, labels and images shared by every template. */}}

{{- define "cxygpt.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "cxygpt.fullname" -}}
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

{{/* "<fullname>-<component>", for objects of one component. Call with (list $ "gateway"). */}}
{{- define "cxygpt.componentName" -}}
{{- $root := index . 0 }}
{{- printf "%s-%s" (include "cxygpt.fullname" $root | trunc 50 | trimSuffix "-") (index . 1) }}
{{- end }}

{{/*
Selector labels: the immutable subset (a Deployment's selector cannot change on upgrade). Never add
the chart version, app version or user labels here. Call with (list $ "gateway").
*/}}
{{- define "cxygpt.selectorLabels" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "cxygpt.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end }}

{{/* The full label set: selector labels plus version, chart and user labels. Call with (list $ "gateway"). */}}
{{- define "cxygpt.labels" -}}
{{- $root := index . 0 -}}
{{ include "cxygpt.selectorLabels" . }}
app.kubernetes.io/part-of: cxygpt
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" $root.Chart.Name $root.Chart.Version | replace "+" "_" }}
{{- with $root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* An image reference from {repository, tag, digest}; the tag defaults to the chart's appVersion. Call with (list $ .Values.x.image). */}}
{{- define "cxygpt.image" -}}
{{- $root := index . 0 }}
{{- $image := index . 1 }}
{{- $ref := printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) }}
{{- if $image.digest }}{{ $ref = printf "%s@%s" $ref $image.digest }}{{ end }}
{{- $ref }}
{{- end }}

{{- define "cxygpt.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "cxygpt.componentName" (list . "operator")) .Values.operator.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "cxygpt.gateway.serviceAccountName" -}}
{{- if .Values.gateway.serviceAccount.create }}
{{- default (include "cxygpt.componentName" (list . "gateway")) .Values.gateway.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.gateway.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* kopf peering (one active replica) is used exactly when the operator has more than one replica. */}}
{{- define "cxygpt.operator.peering" -}}
{{- if gt (int .Values.operator.replicaCount) 1 }}{{ include "cxygpt.componentName" (list . "operator") }}{{ end }}
{{- end }}

{{/* The gateway's in-cluster URL, as clients (and Open WebUI) use it. */}}
{{- define "cxygpt.gateway.url" -}}
{{- printf "http://%s.%s.svc:%v" (include "cxygpt.componentName" (list . "gateway")) .Release.Namespace .Values.gateway.service.port }}
{{- end }}

{{/* Where the profile table ConfigMap is mounted in the operator and gateway containers. */}}
{{- define "cxygpt.profilesDir" -}}/etc/cxygpt/profiles{{- end }}
{{- define "cxygpt.engineDefaultsDir" -}}/etc/cxygpt/engines{{- end }}

{{- define "cxygpt.podSecurityContext" -}}
{{- toYaml .Values.podSecurityContext }}
{{- end }}

{{- define "cxygpt.containerSecurityContext" -}}
{{- toYaml .Values.containerSecurityContext }}
{{- end }}

{{/* "true" when ServiceMonitors are rendered: asked for, and the cluster serves the kind. */}}
{{- define "cxygpt.serviceMonitor" -}}
{{- if and .Values.metrics.serviceMonitor.enabled (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1/ServiceMonitor") }}true{{ end }}
{{- end }}

{{/* "true" when the PrometheusRule is rendered: asked for, and the cluster serves the kind. */}}
{{- define "cxygpt.prometheusRule" -}}
{{- if and .Values.metrics.prometheusRule.enabled (.Capabilities.APIVersions.Has "monitoring.coreos.com/v1/PrometheusRule") }}true{{ end }}
{{- end }}

{{- define "cxygpt.console.serviceAccountName" -}}
{{- if .Values.console.serviceAccount.create }}
{{- default (include "cxygpt.componentName" (list . "console")) .Values.console.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.console.serviceAccount.name }}
{{- end }}
{{- end }}
