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

or, on Kubernetes 1.29 and later, as a native sidecar that starts before the application
and stops after it: `initContainers:` with `include "rule-sidecar.initContainer" $rs`
instead of the item in `containers`. With the API source the volumes carry the sidecar's
own API token: leave the pod's automountServiceAccountToken false.

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

{{/* Where in-cluster Kubernetes clients read the API token, CA and namespace. */}}
{{- define "rule-sidecar.serviceAccountDir" -}}
/var/run/secrets/kubernetes.io/serviceaccount
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
{{- if and $api.enabled (not .Values.rbac.create) .Values.serviceAccount.create -}}
{{- fail "sidecar.kubernetesSource needs the pod's API token to be allowed to get, list and watch ConfigMaps: set rbac.create, or run the pods as an existing account that may (serviceAccount.create=false and serviceAccount.name)" -}}
{{- end -}}
{{- if and $api.enabled $api.events .Values.rbac.create (not .Values.rbac.events) -}}
{{- fail "sidecar.kubernetesSource.events needs rbac.events (permission to create Events)" -}}
{{- end -}}
{{- if and .Values.adminToken.enabled .Values.adminToken.existingSecret .Values.adminToken.value -}}
{{- fail "adminToken: give either existingSecret or value, not both" -}}
{{- end -}}
{{- include "rule-sidecar.checkPorts" . -}}
{{- end -}}

{{/*
Refuse two listeners on one port, and a Service that would list a port or a name twice.
The containers of a pod share its network: of two listeners on one port the second cannot
bind it. `helm lint` and schema validation pass such a Service; the API server or the
application fails later, so the render fails now.
*/}}
{{- define "rule-sidecar.checkPorts" -}}
{{- $ports := list (dict "origin" "sidecar.port" "port" .Values.sidecar.port "protocol" "TCP") -}}
{{- if include "rule-sidecar.listenerEnabled" . -}}
{{- $ports = append $ports (dict "origin" "sidecar.metrics.port" "port" .Values.sidecar.metrics.port "protocol" "TCP") -}}
{{- end -}}
{{- $names := dict -}}
{{- if include "rule-sidecar.metricsEnabled" . -}}
{{- $_ := set $names "metrics" "the metrics port" -}}
{{- end -}}
{{- $app := list -}}
{{- if and .Values.deployment.enabled .Values.app.enabled -}}
{{- range $i, $port := .Values.app.ports -}}
{{- $app = append $app (dict "origin" (printf "app.ports[%d]" $i) "port" $port.containerPort "protocol" (default "TCP" $port.protocol) "name" (default (printf "app-%d" ($port.containerPort | int64)) $port.name)) -}}
{{- end -}}
{{- end -}}
{{- $seen := dict -}}
{{- range concat $ports $app -}}
{{- $key := printf "%d/%s" (.port | int64) .protocol -}}
{{- if hasKey $seen $key -}}
{{- fail (printf "%s and %s are both port %s: the containers of a pod share one network, so the second listener could not bind it (and the Service would list the port twice); give each its own port" (get $seen $key) .origin $key) -}}
{{- end -}}
{{- $_ := set $seen $key .origin -}}
{{- end -}}
{{- range $app -}}
{{- if hasKey $names .name -}}
{{- fail (printf "%s: the Service would have two ports named %q (%s and %s): give each port its own name" .origin .name (get $names .name) .origin) -}}
{{- end -}}
{{- $_ := set $names .name .origin -}}
{{- end -}}
{{- end -}}

{{/*
"true" when this chart's Deployment runs the sidecar as a native sidecar (an init
container with restartPolicy Always). `sidecar.native`: "auto" where the Kubernetes version
(`.Capabilities.KubeVersion`: the cluster's under helm install/upgrade, `--kube-version` or
Helm's default under helm template) is 1.29 or later and the pod has an application
container; true or false to force it. Forcing it fails the render on a version that would
silently run it as a plain init container (older than 1.28) and in a pod without an
application (a pod needs one regular container).
*/}}
{{- define "rule-sidecar.native" -}}
{{- $mode := .Values.sidecar.native -}}
{{- $version := .Capabilities.KubeVersion.Version -}}
{{- if eq (toString $mode) "auto" -}}
{{- if and .Values.app.enabled (semverCompare ">=1.29.0-0" $version) }}true{{ end -}}
{{- else if $mode -}}
{{- if not .Values.app.enabled -}}
{{- fail "sidecar.native=true needs app.enabled: a pod needs a regular container besides its native sidecar (set sidecar.native to auto or false)" -}}
{{- end -}}
{{- if not (semverCompare ">=1.28.0-0" $version) -}}
{{- fail (printf "sidecar.native=true needs Kubernetes 1.29 or later (1.28 with the SidecarContainers feature gate); this render is for %s, which would run the sidecar as an init container that never ends and never start the application (set sidecar.native to auto or false, or render with --kube-version)" $version) -}}
{{- end -}}
true
{{- end -}}
{{- end -}}

{{/*
"true" when the chart's rules ConfigMap is the sidecar's only source (no database, no
selector of other ConfigMaps, no extra directory) and holds no rule document: every file
is blank, comments, document markers or an empty list/mapping. Such a sidecar serves
nothing and answers 404 to every evaluation, which is seldom meant (a values mistake such
as `rules: {}` with `rulesFiles: []`).
*/}}
{{- define "rule-sidecar.rulesEmpty" -}}
{{- $sidecar := .Values.sidecar -}}
{{- $others := list "RULE_SIDECAR_DATABASE_URL" "RULE_SIDECAR_KUBERNETES_SELECTOR" "RULE_SIDECAR_RULES_DIR" -}}
{{- $other := or $sidecar.database.url (and $sidecar.kubernetesSource.enabled $sidecar.kubernetesSource.selector) -}}
{{- range $sidecar.extraEnv -}}
{{- if has .name $others }}{{ $other = true }}{{ end -}}
{{- end -}}
{{- $found := false -}}
{{- range $key, $text := include "rule-sidecar.rulesData" . | fromYaml -}}
{{- $body := regexReplaceAll `(?m)^([ \t]*(#.*)?|(---|\.\.\.)[ \t]*(#.*)?)$` (toString $text) "" | trim -}}
{{- if not (has $body (list "" "[]" "{}" "null" "~")) }}{{ $found = true }}{{ end -}}
{{- end -}}
{{- if not (or $other $found) }}true{{ end -}}
{{- end -}}

{{/*
The sidecar as a classic container: one list item of a pod's `containers`. It starts
beside the application, not before it, and gets SIGTERM at the same time.
*/}}
{{- define "rule-sidecar.container" -}}
- name: {{ .Values.sidecar.name }}
{{ include "rule-sidecar.containerFields" . }}
{{- end -}}

{{/*
The sidecar as a Kubernetes native sidecar (1.29 and later; 1.28 with the
SidecarContainers feature gate): one list item of a pod's `initContainers`, with
`restartPolicy: Always`. The kubelet starts it before the application containers and
starts those only once its startup probe passes (a first valid set of rules serves); it
stops it after them, so the application can still ask it while draining. A cluster older
than that drops the field and waits forever for the "init container" to finish: choose
with `rule-sidecar.native` (or the version you know).
*/}}
{{- define "rule-sidecar.initContainer" -}}
- name: {{ .Values.sidecar.name }}
  restartPolicy: Always
{{ include "rule-sidecar.containerFields" . }}
{{- end -}}

{{/*
The sidecar container's fields but its name, indented as items of a list. Settings are
environment variables, the names sidecar/config.py reads; the image's entrypoint is
`rule-sidecar serve`.
*/}}
{{- define "rule-sidecar.containerFields" -}}
{{- include "rule-sidecar.checkSettings" . -}}
{{- $sidecar := .Values.sidecar -}}
{{- $metrics := include "rule-sidecar.listenerEnabled" . -}}
{{- "  " -}}image: "{{ $sidecar.image.repository }}:{{ $sidecar.image.tag | default .Chart.AppVersion }}"
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
    {{- if not (kindIs "invalid" $sidecar.allowEmpty) }}
    - name: RULE_SIDECAR_ALLOW_EMPTY
      value: {{ $sidecar.allowEmpty | toString | quote }}
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
  # snapshot serves; as a native sidecar, the application starts only after it passed.
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
    {{- if $sidecar.kubernetesSource.enabled }}
    # The API token, CA and namespace where the Kubernetes client looks for them, in this
    # container only: the pod does not automount the token into the application.
    - name: rule-sidecar-kube-api-access
      mountPath: {{ include "rule-sidecar.serviceAccountDir" . }}
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
{{- if .Values.sidecar.kubernetesSource.enabled }}
{{- /* What the kubelet would automount for every container, for the sidecar alone: a
bound token it rotates (the client re-reads it), the cluster's CA and the namespace. */}}
- name: rule-sidecar-kube-api-access
  projected:
    defaultMode: 0444
    sources:
      - serviceAccountToken:
          path: token
          expirationSeconds: 3600
      - configMap:
          name: kube-root-ca.crt
          items:
            - key: ca.crt
              path: ca.crt
      - downwardAPI:
          items:
            - path: namespace
              fieldRef:
                apiVersion: v1
                fieldPath: metadata.namespace
{{- end }}
{{- end -}}
