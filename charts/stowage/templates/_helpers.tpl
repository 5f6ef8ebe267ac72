{{/* The chart's name. */}}
{{- define "stowage.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name: the prefix of every object. */}}
{{- define "stowage.fullname" -}}
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

{{- define "stowage.selectorLabels" -}}
app.kubernetes.io/name: {{ include "stowage.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "stowage.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "stowage.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "stowage.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "stowage.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "stowage.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* http or https: how the pod serves. */}}
{{- define "stowage.scheme" -}}
{{- if .Values.tls.enabled }}https{{ else }}http{{ end }}
{{- end }}

{{/* Where the pod mounts things. */}}
{{- define "stowage.dataDir" -}}/var/lib/stowage{{- end }}
{{- define "stowage.bootstrapAdminFile" -}}/etc/stowage/bootstrap-admin/password{{- end }}
{{- define "stowage.bootstrapTokenFile" -}}/etc/stowage/bootstrap-token/token{{- end }}

{{/*
stowage.toml: .Values.config with the settings the chart owns laid over it, one line per
top-level key with inline tables. Not `toToml`: Helm reads every number in values as a float,
which toToml writes as `86400.0`, and Stowage's integer settings refuse floats. The emitter
below writes whole numbers as integers.
*/}}
{{- define "stowage.config" -}}
{{- $v := .Values }}
{{- $managed := dict "listen" (printf "0.0.0.0:%d" (int $v.service.port)) "data_dir" (include "stowage.dataDir" .) }}
{{- $storage := dict "backend" $v.storage.backend }}
{{- if eq $v.storage.backend "s3" }}
{{- $s3 := dict "bucket" $v.storage.s3.bucket "prefix" $v.storage.s3.prefix "region" $v.storage.s3.region "path_style" $v.storage.s3.pathStyle "redirect" $v.storage.s3.redirect }}
{{- if $v.storage.s3.endpoint }}{{- $_ := set $s3 "endpoint" $v.storage.s3.endpoint }}{{- end }}
{{- if $v.storage.s3.publicEndpoint }}{{- $_ := set $s3 "public_endpoint" $v.storage.s3.publicEndpoint }}{{- end }}
{{- $_ := set $storage "s3" $s3 }}
{{- end }}
{{- $_ := set $managed "storage" $storage }}
{{- $_ := set $managed "server" (dict "shutdown_delay_secs" (int $v.shutdownDelaySeconds)) }}
{{- if $v.tls.enabled }}
{{- $_ := set $managed "tls" (dict "cert" "/etc/stowage/tls/tls.crt" "key" "/etc/stowage/tls/tls.key") }}
{{- end }}
{{- $auth := dict "enabled" $v.auth.enabled }}
{{- with $v.auth.bootstrapAdmin }}
{{- if .enabled }}
{{- $_ := set $auth "bootstrap_admin" (dict "user" .user "password_file" (include "stowage.bootstrapAdminFile" $)) }}
{{- end }}
{{- end }}
{{- with $v.auth.bootstrapToken }}
{{- if .enabled }}
{{- $t := dict "name" .name "scopes" .scopes "secret_file" (include "stowage.bootstrapTokenFile" $) }}
{{- if .user }}{{- $_ := set $t "user" .user }}{{- end }}
{{- if .expiresInDays }}{{- $_ := set $t "expires_in_days" (int .expiresInDays) }}{{- end }}
{{- $_ := set $auth "bootstrap_token" $t }}
{{- end }}
{{- end }}
{{- $_ := set $managed "auth" $auth }}
{{- $cfg := mustMergeOverwrite (deepCopy $v.config) $managed }}
{{- range $key, $val := $cfg }}
{{- if not (kindIs "invalid" $val) }}
{{ toJson $key }} = {{ include "stowage.tomlValue" $val }}
{{- end }}
{{- end }}
{{- end }}

{{/* One TOML value: inline tables, arrays, integers, floats, booleans, strings. */}}
{{- define "stowage.tomlValue" -}}
{{- $k := kindOf . -}}
{{- if eq $k "map" -}}
{{- $first := true -}}
{ {{- range $key, $val := . }}{{ if not (kindIs "invalid" $val) }}{{ if not $first }}, {{ end }}{{ $first = false }}{{ toJson $key }} = {{ include "stowage.tomlValue" $val }}{{ end }}{{ end -}} }
{{- else if eq $k "slice" -}}
[{{ range $i, $val := . }}{{ if $i }}, {{ end }}{{ include "stowage.tomlValue" $val }}{{ end }}]
{{- else if or (eq $k "float64") (eq $k "float32") -}}
{{- if eq (float64 (int64 .)) (float64 .) }}{{ int64 . }}{{ else }}{{ . }}{{ end -}}
{{- else if or (eq $k "bool") (hasPrefix "int" $k) (hasPrefix "uint" $k) -}}
{{- . -}}
{{- else -}}
{{- toJson (toString .) -}}
{{- end -}}
{{- end }}
