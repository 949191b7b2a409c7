{{/* The release's full name: the release name, with the chart's appended unless it already contains it. */}}
{{- define "borg-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "borg-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "borg-operator.labels" -}}
{{ include "borg-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: borg-dqn
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "borg-operator.serviceAccountName" -}}
{{- default (include "borg-operator.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "borg-operator.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The namespaces the operator serves: none when cluster-wide, else the list (default: the release's). */}}
{{- define "borg-operator.watched" -}}
{{- if not .Values.watch.clusterWide -}}
{{- toJson (default (list .Release.Namespace) .Values.watch.namespaces) -}}
{{- else -}}
[]
{{- end -}}
{{- end -}}
