{{/*
The pod template of the workload, at the indentation of its spec.template.
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
      volumes:
        - name: config
          configMap:
            name: {{ $fullname }}
        - name: tmp
          emptyDir: {}
        {{- if not .Values.persistence.enabled }}
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
      {{- with .Values.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with .Values.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}
