{{- define "flexfed.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "flexfed.fullname" -}}
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

{{- define "flexfed.superlinkName" -}}
{{- printf "%s-superlink" (include "flexfed.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "flexfed.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "flexfed.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "flexfed.selector" -}}
app.kubernetes.io/name: {{ include "flexfed.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "flexfed.image" -}}
{{ printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The operator certificate and the consortium CA, mounted from existing Secrets. */}}
{{- define "flexfed.secretVolumes" -}}
- name: operator-tls
  secret:
    secretName: {{ .Values.tls.secretName }}
    defaultMode: 0440
    items:
      - key: {{ .Values.tls.certKey }}
        path: cert.pem
      - key: {{ .Values.tls.keyKey }}
        path: key.pem
- name: consortium-ca
  secret:
    secretName: {{ .Values.trust.secretName }}
    defaultMode: 0444
    items:
      - key: {{ .Values.trust.caKey }}
        path: ca.pem
      - key: {{ .Values.trust.crlKey }}
        path: crl.pem
- name: tmp
  emptyDir: {}
- name: home
  emptyDir: {}
{{- end }}

{{- define "flexfed.secretMounts" -}}
- name: operator-tls
  mountPath: /etc/flexfed/operator
  readOnly: true
- name: consortium-ca
  mountPath: /etc/flexfed/public
  readOnly: true
- name: tmp
  mountPath: /tmp
- name: home
  mountPath: /home/flexfed
{{- end }}

{{/* The mutual-TLS gRPC health check (Kubernetes' grpc probe cannot speak TLS). */}}
{{- define "flexfed.grpcHealth" -}}
exec:
  command:
    - python
    - /opt/flexfed/healthcheck.py
    - grpc
    - 127.0.0.1:{{ .Values.coordinator.port }}
    - --ca=/etc/flexfed/public/ca.pem
    - --cert=/etc/flexfed/operator/cert.pem
    - --key=/etc/flexfed/operator/key.pem
{{- end }}
