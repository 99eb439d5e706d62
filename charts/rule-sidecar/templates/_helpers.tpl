{{/*
Named templates.

Every template here takes this chart's context: `.` in this chart's own templates or, from
a parent chart that lists rule-sidecar as a dependency, `index .Subcharts "rule-sidecar"`
(Helm 3.7 and later), which carries this chart's values (its defaults merged with the
parent's `rule-sidecar:` section), release and files. A parent adds the sidecar to its
own pod template with

  {{- $rs := index .Subcharts "rule-sidecar" }}
  spec:
    serviceAccountName: {{ include "rule-sidecar.serviceAccountName" $rs }}   # with rbac.create
    containers:
      - name: my-app
        ...
      {{- include "rule-sidecar.container" $rs | nindent 6 }}
    volumes:
      {{- include "rule-sidecar.volumes" $rs | nindent 6 }}

and sets `rule-sidecar: {deployment: {enabled: false}}`, so that this chart renders only
what those refer to: the rules ConfigMap, the token Secret, the ServiceAccount and RBAC
objects. For a restart on rule changes (see `restartOnRuleChange`) the parent annotates
its pod template with `checksum/rules: {{ include "rule-sidecar.rulesChecksum" $rs }}`.
This chart's NetworkPolicy, Service and ServiceMonitor select its own pods only: the
parent brings its own (the sidecar's API listens on loopback; probes and metrics on
`sidecar.metrics.port`).
*/}}

{{/* The chart name, or nameOverride. */}}
{{- define "rule-sidecar.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The full name: <release>-<name> (63 characters at most), or fullnameOverride. */}}
{{- define "rule-sidecar.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "rule-sidecar.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* helm.sh/chart: name-version. */}}
{{- define "rule-sidecar.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels that select this release's pods. */}}
{{- define "rule-sidecar.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rule-sidecar.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* Labels of every resource. */}}
{{- define "rule-sidecar.labels" -}}
helm.sh/chart: {{ include "rule-sidecar.chart" . }}
{{ include "rule-sidecar.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The ServiceAccount the pods run as. */}}
{{- define "rule-sidecar.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "rule-sidecar.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Names of the objects the sidecar's volumes refer to. */}}
{{- define "rule-sidecar.rulesConfigMapName" -}}
{{- printf "%s-rules" (include "rule-sidecar.fullname" .) -}}
{{- end -}}

{{/* The label of the rules ConfigMap that the Kubernetes API source selects by default. */}}
{{- define "rule-sidecar.rulesLabel" -}}
rule-sidecar/rules: {{ include "rule-sidecar.fullname" . }}
{{- end -}}

{{/* RULE_SIDECAR_KUBERNETES_SELECTOR: the user's, or the chart's rules label. */}}
{{- define "rule-sidecar.kubernetesSelector" -}}
{{- .Values.sidecar.kubernetesSource.selector | default (printf "rule-sidecar/rules=%s" (include "rule-sidecar.fullname" .)) -}}
{{- end -}}

{{- define "rule-sidecar.adminTokenSecretName" -}}
{{- default (printf "%s-admin-token" (include "rule-sidecar.fullname" .)) .Values.adminToken.existingSecret -}}
{{- end -}}

{{/* Where the rules ConfigMap is mounted: RULE_SIDECAR_RULES_DIR. */}}
{{- define "rule-sidecar.rulesDir" -}}
/etc/rule-sidecar/rules
{{- end -}}

{{- define "rule-sidecar.databasePasswordDir" -}}
/etc/rule-sidecar/database
{{- end -}}

{{/*
The sidecar's URL for a container of the same pod: loopback, in the address family the
sidecar listens on (an IPv6 listener such as "::" does not take IPv4 connections).
*/}}
{{- define "rule-sidecar.localUrl" -}}
{{- $host := ternary "[::1]" "127.0.0.1" (contains ":" (toString .Values.sidecar.host)) -}}
{{- printf "http://%s:%d" $host (.Values.sidecar.port | int64) -}}
{{- end -}}

{{/* "true" when Prometheus scrapes the separate listener (asked for, or a ServiceMonitor). */}}
{{- define "rule-sidecar.metricsEnabled" -}}
{{- if or .Values.sidecar.metrics.enabled .Values.serviceMonitor.enabled -}}true{{- end -}}
{{- end -}}

{{/* "true" when the separate listener runs: for the probes, or for Prometheus. */}}
{{- define "rule-sidecar.listenerEnabled" -}}
{{- if or .Values.sidecar.probes.enabled (include "rule-sidecar.metricsEnabled" .) -}}true{{- end -}}
{{- end -}}

{{/*
The rules ConfigMap's data as YAML: one key per file, from `rulesFiles` globs inside the
chart and from inline `rules` (text as given; a mapping or a list of documents as YAML
documents, or as JSON under a .json key). Fails on a key that is not a rule file name or
that appears twice, and on more than the 1 MiB a ConfigMap can hold.
*/}}
{{- define "rule-sidecar.rulesData" -}}
{{- $data := dict -}}
{{- $origin := dict -}}
{{- range $pattern := .Values.rulesFiles -}}
{{- range $path, $content := $.Files.Glob $pattern -}}
{{- $key := base $path -}}
{{- include "rule-sidecar.checkRulesKey" (dict "key" $key "origin" (printf "file %s" $path) "seen" $origin) -}}
{{- $_ := set $data $key (toString $content) -}}
{{- end -}}
{{- end -}}
{{- range $key, $value := .Values.rules -}}
{{- include "rule-sidecar.checkRulesKey" (dict "key" $key "origin" (printf "rules.%s" $key) "seen" $origin) -}}
{{- if kindIs "string" $value -}}
{{- $_ := set $data $key $value -}}
{{- else if hasSuffix ".json" $key -}}
{{- /* A JSON file holds one document or a list of documents. */ -}}
{{- $_ := set $data $key (printf "%s\n" (toPrettyJson $value)) -}}
{{- else if kindIs "slice" $value -}}
{{- $docs := list -}}
{{- range $value -}}
{{- $docs = append $docs (toYaml .) -}}
{{- end -}}
{{- $_ := set $data $key (printf "%s\n" (join "\n---\n" $docs)) -}}
{{- else -}}
{{- $_ := set $data $key (printf "%s\n" (toYaml $value)) -}}
{{- end -}}
{{- end -}}
{{- $text := toYaml $data -}}
{{- if gt (len $text) 1048576 -}}
{{- fail (printf "the rules ConfigMap would hold %d bytes, more than a ConfigMap's 1 MiB: split the rules or use the database source" (len $text)) -}}
{{- end -}}
{{- $text -}}
{{- end -}}

{{- define "rule-sidecar.checkRulesKey" -}}
{{- if not (regexMatch "^[-._a-zA-Z0-9]+\\.(yaml|yml|json)$" .key) -}}
{{- fail (printf "%s: %q is not a rule file name for the rules ConfigMap (letters, digits, '-', '_', '.'; ending in .yaml, .yml or .json)" .origin .key) -}}
{{- end -}}
{{- if hasKey .seen .key -}}
{{- fail (printf "%s: the rules ConfigMap already has a file %q (from %s)" .origin .key (get .seen .key)) -}}
{{- end -}}
{{- $_ := set .seen .key .origin -}}
{{- end -}}

{{/* sha256 of the rules ConfigMap's data: the restart trigger of `restartOnRuleChange`. */}}
{{- define "rule-sidecar.rulesChecksum" -}}
{{- include "rule-sidecar.rulesData" . | sha256sum -}}
{{- end -}}

{{/* Refuse settings that cannot work, with the reason. */}}
{{- define "rule-sidecar.checkSettings" -}}
{{- $sidecar := .Values.sidecar -}}
{{- if and $sidecar.probes.enabled (has (toString $sidecar.metrics.host) (list "127.0.0.1" "localhost" "::1")) -}}
{{- fail (printf "sidecar.metrics.host=%s: the kubelet's probes come from the node to the pod IP and cannot reach a loopback listener; keep 0.0.0.0 or set sidecar.probes.enabled=false" (toString $sidecar.metrics.host)) -}}
{{- end -}}
{{- if regexMatch "://[^/@:]+:[^@/]*@" (toString $sidecar.database.url) -}}
{{- fail "sidecar.database.url contains a password: keep it in a Secret and name it in sidecar.database.passwordSecret" -}}
{{- end -}}
{{- $api := .Values.sidecar.kubernetesSource -}}
{{- if and $api.enabled (not (or .Values.rbac.create .Values.serviceAccount.automountToken)) -}}
{{- fail "sidecar.kubernetesSource needs the pod's API token: set rbac.create (or serviceAccount.automountToken with an account that may get, list and watch ConfigMaps)" -}}
{{- end -}}
{{- if and $api.enabled $api.events .Values.rbac.create (not .Values.rbac.events) -}}
{{- fail "sidecar.kubernetesSource.events needs rbac.events (permission to create Events)" -}}
{{- end -}}
{{- if and .Values.adminToken.enabled .Values.adminToken.existingSecret .Values.adminToken.value -}}
{{- fail "adminToken: give either existingSecret or value, not both" -}}
{{- end -}}
{{- end -}}

{{/*
The sidecar container (one list item of a pod's `containers`). Settings are environment
variables, the names sidecar/config.py reads; the image's entrypoint is `rule-sidecar serve`.
*/}}
{{- define "rule-sidecar.container" -}}
{{- include "rule-sidecar.checkSettings" . -}}
{{- $sidecar := .Values.sidecar -}}
{{- $metrics := include "rule-sidecar.listenerEnabled" . -}}
- name: {{ $sidecar.name }}
  image: "{{ $sidecar.image.repository }}:{{ $sidecar.image.tag | default .Chart.AppVersion }}"
  imagePullPolicy: {{ $sidecar.image.pullPolicy }}
  {{- with $sidecar.extraArgs }}
  args:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  env:
    {{- if $sidecar.kubernetesSource.enabled }}
    # The rules ConfigMaps, watched through the API (the chart's own is not mounted).
    - name: RULE_SIDECAR_KUBERNETES_SELECTOR
      value: {{ include "rule-sidecar.kubernetesSelector" . | quote }}
    - name: RULE_SIDECAR_KUBERNETES_NAMESPACE
      valueFrom:
        fieldRef:
          fieldPath: metadata.namespace
    - name: RULE_SIDECAR_KUBERNETES_EVENTS
      value: {{ $sidecar.kubernetesSource.events | toString | quote }}
    {{- with $sidecar.kubernetesSource.watchTimeoutSeconds }}
    - name: RULE_SIDECAR_KUBERNETES_WATCH_TIMEOUT_SECONDS
      value: {{ . | int64 | quote }}
    {{- end }}
    {{- else }}
    # A directory mount of the rules ConfigMap: the kubelet's atomic ..data swap reaches it.
    - name: RULE_SIDECAR_RULES_DIR
      value: {{ include "rule-sidecar.rulesDir" . | quote }}
    {{- end }}
    - name: RULE_SIDECAR_HOST
      value: {{ $sidecar.host | toString | quote }}
    - name: RULE_SIDECAR_PORT
      value: {{ $sidecar.port | int64 | quote }}
    - name: RULE_SIDECAR_LOG_LEVEL
      value: {{ $sidecar.logLevel | upper | quote }}
    - name: HOT_RELOAD_ENABLED
      value: {{ $sidecar.hotReload.enabled | toString | quote }}
    - name: HOT_RELOAD_INTERVAL_SECONDS
      value: {{ $sidecar.hotReload.intervalSeconds | toString | quote }}
    - name: HOT_RELOAD_VALIDATION_ENABLED
      value: {{ $sidecar.hotReload.validationEnabled | toString | quote }}
    - name: HOT_RELOAD_MAX_AGE_SECONDS
      value: {{ $sidecar.hotReload.maxAgeSeconds | toString | quote }}
    {{- $tuning := dict
          "RULE_SIDECAR_DEBOUNCE_MS" $sidecar.debounceMs
          "RULE_SIDECAR_MAX_BODY_BYTES" $sidecar.maxBodyBytes
          "RULE_SIDECAR_RELOAD_RATE_PER_MINUTE" $sidecar.reloadRatePerMinute
          "RULE_SIDECAR_HISTORY_LIMIT" $sidecar.historyLimit }}
    {{- range $name, $value := $tuning }}
    {{- if not (kindIs "invalid" $value) }}
    - name: {{ $name }}
      value: {{ $value | int64 | quote }}
    {{- end }}
    {{- end }}
    {{- if not (kindIs "invalid" $sidecar.reloadWorker) }}
    - name: RULE_SIDECAR_RELOAD_WORKER
      value: {{ $sidecar.reloadWorker | toString | quote }}
    {{- end }}
    {{- if .Values.stateDir.enabled }}
    - name: RULE_SIDECAR_STATE_DIR
      value: {{ .Values.stateDir.mountPath | quote }}
    {{- end }}
    {{- if .Values.adminToken.enabled }}
    - name: RULE_SIDECAR_ADMIN_TOKEN_FILE
      value: {{ printf "%s/%s" .Values.adminToken.mountPath .Values.adminToken.key | quote }}
    {{- end }}
    {{- with $sidecar.database.url }}
    - name: RULE_SIDECAR_DATABASE_URL
      value: {{ . | quote }}
    {{- end }}
    {{- if $sidecar.database.passwordSecret.name }}
    - name: RULE_SIDECAR_DATABASE_PASSWORD_FILE
      value: {{ printf "%s/%s" (include "rule-sidecar.databasePasswordDir" .) $sidecar.database.passwordSecret.key | quote }}
    {{- end }}
    {{- if $metrics }}
    - name: RULE_SIDECAR_METRICS_HOST
      value: {{ $sidecar.metrics.host | toString | quote }}
    - name: RULE_SIDECAR_METRICS_PORT
      value: {{ $sidecar.metrics.port | int64 | quote }}
    {{- end }}
    {{- with $sidecar.extraEnv }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  ports:
    - name: sidecar-http
      containerPort: {{ $sidecar.port | int64 }}
      protocol: TCP
    {{- if $metrics }}
    - name: sidecar-metrics
      containerPort: {{ $sidecar.metrics.port | int64 }}
      protocol: TCP
    {{- end }}
  {{- if $sidecar.probes.enabled }}
  {{- $probes := $sidecar.probes }}
  # On the separate listener: the API stays on loopback. 503 until a first valid
  # snapshot serves.
  startupProbe:
    httpGet:
      path: /health/hot-reload
      port: sidecar-metrics
    periodSeconds: {{ $probes.startup.periodSeconds }}
    timeoutSeconds: {{ $probes.startup.timeoutSeconds }}
    failureThreshold: {{ $probes.startup.failureThreshold }}
  # 200 while rules serve, healthy or degraded: a bad rule change never takes the pod out.
  readinessProbe:
    httpGet:
      path: /health/hot-reload
      port: sidecar-metrics
    periodSeconds: {{ $probes.readiness.periodSeconds }}
    timeoutSeconds: {{ $probes.readiness.timeoutSeconds }}
    failureThreshold: {{ $probes.readiness.failureThreshold }}
  # The process answers; never depends on rules, so no restart over a bad rule change.
  livenessProbe:
    httpGet:
      path: /livez
      port: sidecar-metrics
    periodSeconds: {{ $probes.liveness.periodSeconds }}
    timeoutSeconds: {{ $probes.liveness.timeoutSeconds }}
    failureThreshold: {{ $probes.liveness.failureThreshold }}
  {{- end }}
  {{- with $sidecar.resources }}
  resources:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  securityContext:
    {{- toYaml $sidecar.securityContext | nindent 4 }}
  volumeMounts:
    {{- if not $sidecar.kubernetesSource.enabled }}
    # The whole directory, never subPath: a subPath mount never sees ConfigMap updates.
    - name: rule-sidecar-rules
      mountPath: {{ include "rule-sidecar.rulesDir" . }}
      readOnly: true
    {{- end }}
    - name: rule-sidecar-tmp
      mountPath: /tmp
    {{- if .Values.stateDir.enabled }}
    - name: rule-sidecar-state
      mountPath: {{ .Values.stateDir.mountPath }}
    {{- end }}
    {{- if .Values.adminToken.enabled }}
    - name: rule-sidecar-admin-token
      mountPath: {{ .Values.adminToken.mountPath }}
      readOnly: true
    {{- end }}
    {{- if $sidecar.database.passwordSecret.name }}
    - name: rule-sidecar-database-password
      mountPath: {{ include "rule-sidecar.databasePasswordDir" . }}
      readOnly: true
    {{- end }}
{{- end -}}

{{/*
The sidecar's volumes (items of a pod's `volumes`). Secret files are 0444 so that they
are readable by the sidecar's user whatever fsGroup the pod sets (or not); only the
containers that mount a volume see it.
*/}}
{{- define "rule-sidecar.volumes" -}}
{{- if not .Values.sidecar.kubernetesSource.enabled }}
- name: rule-sidecar-rules
  configMap:
    name: {{ include "rule-sidecar.rulesConfigMapName" . }}
{{- end }}
- name: rule-sidecar-tmp
  emptyDir:
    {{- with .Values.sidecar.tmp.sizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
{{- if .Values.stateDir.enabled }}
- name: rule-sidecar-state
  emptyDir:
    {{- with .Values.stateDir.medium }}
    medium: {{ . }}
    {{- end }}
    {{- with .Values.stateDir.sizeLimit }}
    sizeLimit: {{ . }}
    {{- end }}
{{- end }}
{{- if .Values.adminToken.enabled }}
- name: rule-sidecar-admin-token
  secret:
    secretName: {{ include "rule-sidecar.adminTokenSecretName" . }}
    defaultMode: 0444
    items:
      - key: {{ .Values.adminToken.key }}
        path: {{ .Values.adminToken.key }}
{{- end }}
{{- with .Values.sidecar.database.passwordSecret }}
{{- if .name }}
- name: rule-sidecar-database-password
  secret:
    secretName: {{ .name }}
    defaultMode: 0444
    items:
      - key: {{ .key }}
        path: {{ .key }}
{{- end }}
{{- end }}
{{- end -}}
