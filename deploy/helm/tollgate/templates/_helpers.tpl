{{/* The agent's image, as both the DaemonSet and the status writer run it. */}}
{{- define "tollgate.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag }}
{{- end }}
