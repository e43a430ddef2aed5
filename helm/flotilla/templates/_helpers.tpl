{{/* The release's base name, at most 40 characters (pod names add suffixes). */}}
{{- define "flotilla.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "flotilla.hub" -}}{{ include "flotilla.fullname" . }}-hub{{- end -}}
{{- define "flotilla.hubs" -}}{{ include "flotilla.fullname" . }}-hubs{{- end -}}
{{- define "flotilla.node" -}}{{ include "flotilla.fullname" . }}-node{{- end -}}

{{- define "flotilla.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "flotilla.hubSelector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: hub
{{- end -}}

{{- define "flotilla.nodeSelector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: node
{{- end -}}

{{/* Where hub N (from 0) is reached inside the cluster. */}}
{{- define "flotilla.hubHost" -}}
{{- $root := index . 0 -}}{{- $i := index . 1 -}}
{{ include "flotilla.hub" $root }}-{{ $i }}.{{ include "flotilla.hubs" $root }}.{{ $root.Release.Namespace }}.svc.{{ $root.Values.clusterDomain }}
{{- end -}}

{{/* The client Service's in-cluster name. */}}
{{- define "flotilla.clientHost" -}}
{{ include "flotilla.fullname" . }}.{{ .Release.Namespace }}.svc.{{ .Values.clusterDomain }}
{{- end -}}

{{/* Pod and container security: non-root, read-only root, nothing to escalate to. */}}
{{- define "flotilla.podSecurity" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "flotilla.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
privileged: false
capabilities:
  drop: [ALL]
{{- end -}}
