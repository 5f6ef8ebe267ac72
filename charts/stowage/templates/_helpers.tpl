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
{{- define "stowage.catalogDir" -}}/etc/stowage/catalog{{- end }}
{{- define "stowage.authKeysDir" -}}/etc/stowage/auth-keys{{- end }}

{{/*
"true" when the chart makes the Deployment: the catalog on PostgreSQL and the blobs on S3, the
only combination several processes can share. Empty otherwise (the one-pod StatefulSet).
*/}}
{{- define "stowage.replicated" -}}
{{- if and .Values.catalog.postgres.enabled (eq .Values.storage.backend "s3") }}true{{ end }}
{{- end }}

{{/* Whether the pod mounts token keys from Secrets ("true" or empty). */}}
{{- define "stowage.authKeys" -}}
{{- if or .Values.auth.signingKey.existingSecret .Values.auth.verifyKeys }}true{{ end }}
{{- end }}

{{/*
Refuses, with the reason, values the schema cannot judge alone: several replicas without a
catalog and a blob store they can share, and a Deployment without one token signing key.
Renders nothing.
*/}}
{{- define "stowage.validate" -}}
{{- $v := .Values }}
{{- $pg := $v.catalog.postgres }}
{{- if gt (int $v.replicaCount) 1 }}
{{- if not $pg.enabled }}
{{- fail (printf "replicaCount=%d needs the catalog on PostgreSQL (catalog.postgres.enabled=true with url or urlKey, and existingSecret): the default SQLite catalog is a file on one pod's volume with one writer, which replicas cannot share (README: Several replicas)" (int $v.replicaCount)) }}
{{- end }}
{{- if ne $v.storage.backend "s3" }}
{{- fail (printf "replicaCount=%d needs storage.backend=s3: the fs backend keeps blobs and upload sessions on one pod's disk, which replicas cannot share (README: Several replicas)" (int $v.replicaCount)) }}
{{- end }}
{{- end }}
{{- if $pg.enabled }}
{{- if and $pg.url $pg.urlKey }}
{{- fail "catalog.postgres: set one of url and urlKey (the URL from existingSecret), not both" }}
{{- end }}
{{- if not (or $pg.url $pg.urlKey) }}
{{- fail "catalog.postgres.enabled needs the database's URL: catalog.postgres.url (postgres://user@host:5432/db), or catalog.postgres.urlKey, the key of existingSecret holding it" }}
{{- end }}
{{- if and $pg.caKey $pg.url (not (regexMatch `sslmode=require` $pg.url)) }}
{{- fail "catalog.postgres.caKey names the CA for TLS, but catalog.postgres.url does not say sslmode=require (Stowage connects without TLS otherwise, and refuses a CA file then)" }}
{{- end }}
{{- if regexMatch `://[^/@]*:[^/@]*@|(^|\s)password\s*=` $pg.url }}
{{- fail "catalog.postgres.url must not hold the password (Stowage refuses it, and values are not secret): put it in key passwordKey of catalog.postgres.existingSecret" }}
{{- end }}
{{- end }}
{{- if and (include "stowage.replicated" .) $v.auth.enabled (not $v.auth.signingKey.existingSecret) }}
{{- fail "with the catalog on PostgreSQL and blobs on S3 (the Deployment), auth.enabled needs auth.signingKey.existingSecret: a Secret holding one Ed25519 PEM key (openssl genpkey -algorithm ed25519) that every replica signs tokens with; a key each pod generated would make tokens from one replica invalid on the others and after every restart" }}
{{- end }}
{{- end }}

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
{{- with $v.catalog.postgres }}
{{- if .enabled }}
{{- $catalog := dict "password_file" (printf "%s/password" (include "stowage.catalogDir" $)) }}
{{- if .url }}{{- $_ := set $catalog "url" .url }}{{- end }}
{{- if .caKey }}{{- $_ := set $catalog "tls_ca_file" (printf "%s/ca.crt" (include "stowage.catalogDir" $)) }}{{- end }}
{{- $_ := set $managed "catalog" $catalog }}
{{- end }}
{{- end }}
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
{{- if $v.auth.signingKey.existingSecret }}
{{- $_ := set $auth "signing_key" (printf "%s/signing-key.pem" (include "stowage.authKeysDir" .)) }}
{{- end }}
{{- if $v.auth.verifyKeys }}
{{- $verify := list }}
{{- range $i, $_ := $v.auth.verifyKeys }}
{{- $verify = append $verify (printf "%s/verify-key-%d.pem" (include "stowage.authKeysDir" $) $i) }}
{{- end }}
{{- $_ := set $auth "verify_keys" $verify }}
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
