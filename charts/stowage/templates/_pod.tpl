{{/*
The pod template of the StatefulSet and of the Deployment (include "stowage.replicated" tells
which), at the indentation of a workload's spec.template.
*/}}
{{- define "stowage.podTemplate" }}
{{- $fullname := include "stowage.fullname" . }}
{{- $scheme := include "stowage.scheme" . | upper }}
    metadata:
      labels:
        {{- include "stowage.selectorLabels" . | nindent 8 }}
        {{- with .Values.podLabels }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      annotations:
        # A changed configuration restarts the pod.
        checksum/config: {{ include "stowage.config" . | sha256sum }}
        {{- with .Values.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      serviceAccountName: {{ include "stowage.serviceAccountName" . }}
      automountServiceAccountToken: false
      enableServiceLinks: false
      terminationGracePeriodSeconds: {{ .Values.terminationGracePeriodSeconds }}
      {{- with .Values.priorityClassName }}
      priorityClassName: {{ . }}
      {{- end }}
      {{- with .Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml .Values.podSecurityContext | nindent 8 }}
      initContainers:
        # Refuses a bad configuration before the server starts, with the reason in this
        # container's log.
        - name: check-config
          image: {{ include "stowage.image" . }}
          imagePullPolicy: {{ .Values.image.pullPolicy }}
          args: ["check-config"]
          env:
            - name: STOWAGE_CONFIG
              value: /etc/stowage/stowage.toml
            {{- with include "stowage.catalogUrlEnv" . }}{{ . | trim | nindent 12 }}{{ end }}
          securityContext:
            {{- toYaml .Values.securityContext | nindent 12 }}
          resources:
            {{- toYaml .Values.resources | nindent 12 }}
          volumeMounts:
            - name: config
              mountPath: /etc/stowage/stowage.toml
              subPath: stowage.toml
              readOnly: true
      containers:
        - name: stowage
          image: {{ include "stowage.image" . }}
          imagePullPolicy: {{ .Values.image.pullPolicy }}
          args: ["serve"]
          ports:
            - name: registry
              containerPort: {{ .Values.service.port }}
              protocol: TCP
          env:
            - name: STOWAGE_CONFIG
              value: /etc/stowage/stowage.toml
            {{- with include "stowage.catalogUrlEnv" . }}{{ . | trim | nindent 12 }}{{ end }}
            {{- if and (eq .Values.storage.backend "s3") .Values.storage.s3.existingSecret }}
            - name: AWS_ACCESS_KEY_ID
              valueFrom:
                secretKeyRef:
                  name: {{ .Values.storage.s3.existingSecret }}
                  key: {{ .Values.storage.s3.accessKeyIdKey }}
            - name: AWS_SECRET_ACCESS_KEY
              valueFrom:
                secretKeyRef:
                  name: {{ .Values.storage.s3.existingSecret }}
                  key: {{ .Values.storage.s3.secretAccessKeyKey }}
            {{- end }}
            {{- with .Values.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          startupProbe:
            httpGet:
              path: /livez
              port: registry
              scheme: {{ $scheme }}
            {{- toYaml .Values.probes.startup | nindent 12 }}
          livenessProbe:
            httpGet:
              path: /livez
              port: registry
              scheme: {{ $scheme }}
            {{- toYaml .Values.probes.liveness | nindent 12 }}
          readinessProbe:
            httpGet:
              path: /readyz
              port: registry
              scheme: {{ $scheme }}
            {{- toYaml .Values.probes.readiness | nindent 12 }}
          securityContext:
            {{- toYaml .Values.securityContext | nindent 12 }}
          resources:
            {{- toYaml .Values.resources | nindent 12 }}
          volumeMounts:
            - name: data
              mountPath: {{ include "stowage.dataDir" . }}
            - name: tmp
              mountPath: /tmp
            - name: config
              mountPath: /etc/stowage/stowage.toml
              subPath: stowage.toml
              readOnly: true
            {{- if .Values.tls.enabled }}
            - name: tls
              mountPath: /etc/stowage/tls
              readOnly: true
            {{- end }}
            {{- if .Values.auth.bootstrapAdmin.enabled }}
            - name: bootstrap-admin
              mountPath: /etc/stowage/bootstrap-admin
              readOnly: true
            {{- end }}
            {{- if .Values.auth.bootstrapToken.enabled }}
            - name: bootstrap-token
              mountPath: /etc/stowage/bootstrap-token
              readOnly: true
            {{- end }}
            {{- if .Values.catalog.postgres.enabled }}
            - name: catalog
              mountPath: {{ include "stowage.catalogDir" . }}
              readOnly: true
            {{- end }}
            {{- if include "stowage.authKeys" . }}
            - name: auth-keys
              mountPath: {{ include "stowage.authKeysDir" . }}
              readOnly: true
            {{- end }}
      volumes:
        - name: config
          configMap:
            name: {{ $fullname }}
        - name: tmp
          emptyDir: {}
        {{- if include "stowage.replicated" . }}
        # The data directory of a replica: its lock file and proxy spool, nothing to keep.
        - name: data
          {{- with .Values.deployment.dataSizeLimit }}
          emptyDir:
            sizeLimit: {{ . }}
          {{- else }}
          emptyDir: {}
          {{- end }}
        {{- else if not .Values.persistence.enabled }}
        - name: data
          emptyDir: {}
        {{- end }}
        {{- if .Values.tls.enabled }}
        - name: tls
          secret:
            secretName: {{ .Values.tls.existingSecret }}
            defaultMode: 0440
        {{- end }}
        {{- with .Values.auth.bootstrapAdmin }}
        {{- if .enabled }}
        - name: bootstrap-admin
          secret:
            secretName: {{ .existingSecret }}
            defaultMode: 0440
            items:
              - key: {{ .passwordKey }}
                path: password
        {{- end }}
        {{- end }}
        {{- with .Values.auth.bootstrapToken }}
        {{- if .enabled }}
        - name: bootstrap-token
          secret:
            secretName: {{ .existingSecret }}
            defaultMode: 0440
            items:
              - key: {{ .secretKey }}
                path: token
        {{- end }}
        {{- end }}
        {{- with .Values.catalog.postgres }}
        {{- if .enabled }}
        # The database password (catalog.password_file); 0400, plus the group read the kubelet
        # adds for the pod's fsGroup.
        - name: catalog
          secret:
            secretName: {{ .existingSecret }}
            defaultMode: 0400
            items:
              - key: {{ .passwordKey }}
                path: password
              {{- if .caKey }}
              - key: {{ .caKey }}
                path: ca.crt
              {{- end }}
        {{- end }}
        {{- end }}
        {{- if include "stowage.authKeys" . }}
        # Token keys: auth.signing_key and auth.verify_keys.
        - name: auth-keys
          projected:
            defaultMode: 0400
            sources:
              {{- with .Values.auth.signingKey }}
              {{- if .existingSecret }}
              - secret:
                  name: {{ .existingSecret }}
                  items:
                    - key: {{ .key }}
                      path: signing-key.pem
              {{- end }}
              {{- end }}
              {{- range $i, $k := .Values.auth.verifyKeys }}
              - secret:
                  name: {{ $k.existingSecret }}
                  items:
                    - key: {{ $k.key }}
                      path: verify-key-{{ $i }}.pem
              {{- end }}
        {{- end }}
      {{- with .Values.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- if include "stowage.replicated" . }}
      {{- $spread := list }}
      {{- if .Values.deployment.spreadOverNodes }}
      {{- $spread = append $spread (dict "maxSkew" 1 "topologyKey" "kubernetes.io/hostname" "whenUnsatisfiable" "ScheduleAnyway") }}
      {{- end }}
      {{- $constraints := list }}
      {{- range (concat $spread .Values.deployment.topologySpreadConstraints) }}
      {{- $c := deepCopy . }}
      {{- /* Left without a selector: this release's pods, of the same revision. */}}
      {{- if not (hasKey $c "labelSelector") }}
      {{- $_ := set $c "labelSelector" (dict "matchLabels" (include "stowage.selectorLabels" $ | fromYaml)) }}
      {{- if not (hasKey $c "matchLabelKeys") }}
      {{- $_ := set $c "matchLabelKeys" (list "pod-template-hash") }}
      {{- end }}
      {{- end }}
      {{- $constraints = append $constraints $c }}
      {{- end }}
      {{- with $constraints }}
      topologySpreadConstraints:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- end }}
      {{- with .Values.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}

{{/* STOWAGE_CATALOG__URL from catalog.postgres.existingSecret, when the URL is kept there. */}}
{{- define "stowage.catalogUrlEnv" -}}
{{- with .Values.catalog.postgres }}
{{- if and .enabled .urlKey }}
- name: STOWAGE_CATALOG__URL
  valueFrom:
    secretKeyRef:
      name: {{ .existingSecret }}
      key: {{ .urlKey }}
{{- end }}
{{- end }}
{{- end }}
