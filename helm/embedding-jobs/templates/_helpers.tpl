{{/* Object names: release-chart, cut to the 63 characters a label value allows. */}}
{{- define "embedding-jobs.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "embedding-jobs.fullname" -}}
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

{{- define "embedding-jobs.selectorLabels" -}}
app.kubernetes.io/name: {{ include "embedding-jobs.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "embedding-jobs.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "embedding-jobs.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: embedding-jobs
{{- end }}

{{- define "embedding-jobs.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "embedding-jobs.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "embedding-jobs.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* The application's defaults where config leaves a setting out; they decide which volumes and checks apply. */}}
{{- define "embedding-jobs.store" -}}
{{- (.Values.config | default dict).store | default "sqlite" }}
{{- end }}

{{- define "embedding-jobs.queue" -}}
{{- (.Values.config | default dict).queue | default "local" }}
{{- end }}

{{/* The data volume's mount path and EMBEDDING_JOBS_DATA_DIR. */}}
{{- define "embedding-jobs.dataDir" -}}
/var/lib/embedding-jobs
{{- end }}

{{/* True (non-empty) when a listen address is a loopback one, which only the pod's own containers reach. */}}
{{- define "embedding-jobs.isLoopback" -}}
{{- if or (hasPrefix "127." .) (eq (lower .) "localhost") (eq . "::1") }}true{{ end }}
{{- end }}

{{/* True (non-empty) when the pod keeps its SQLite store or queue on a pod volume. */}}
{{- define "embedding-jobs.usesLocalStore" -}}
{{- if or (eq (include "embedding-jobs.store" .) "sqlite") (eq (include "embedding-jobs.queue" .) "local") }}true{{ end }}
{{- end }}

{{/*
The pod keeps running the worker while it drains; the grace period covers the drain plus the margin
for final status writes, the span flush and the exporter's own stop.
*/}}
{{- define "embedding-jobs.terminationGracePeriodSeconds" -}}
{{- add .Values.worker.drainTimeoutSeconds .Values.worker.terminationMarginSeconds }}
{{- end }}

{{/*
A setting as an environment variable string. Values arrive from YAML as float64, which Go would print
as 1e+06; whole numbers are printed as integers so the application's int() accepts them.
*/}}
{{- define "embedding-jobs.envValue" -}}
{{- if kindIs "float64" . }}
{{- if eq (floor .) . }}{{ printf "%d" (int64 .) }}{{ else }}{{ . }}{{ end }}
{{- else if kindIs "bool" . }}
{{- ternary "true" "false" . }}
{{- else }}
{{- toString . }}
{{- end }}
{{- end }}

{{/*
Secret-backed variables for the secrets named in the list, skipping those without a Secret name.
Call as (list $ "cosmosKey" ...); each container gets only the secrets it uses.
*/}}
{{- define "embedding-jobs.secretEnv" -}}
{{- $root := first . }}
{{- $vars := dict
  "cosmosKey" "EMBEDDING_JOBS_COSMOS_KEY"
  "servicebusConnectionString" "EMBEDDING_JOBS_SERVICEBUS_CONNECTION_STRING"
  "openaiApiKey" "EMBEDDING_JOBS_OPENAI_API_KEY"
  "apiTokens" "EMBEDDING_JOBS_API_TOKENS"
  "metricsToken" "EMBEDDING_JOBS_METRICS_TOKEN"
  "otlpToken" "EMBEDDING_JOBS_OTLP_TOKEN" }}
{{- range rest . }}
{{- $ref := get $root.Values.secrets . }}
{{- if $ref.name }}
- name: {{ get $vars . }}
  valueFrom:
    secretKeyRef:
      name: {{ $ref.name }}
      key: {{ $ref.key }}
{{- end }}
{{- end }}
{{- end }}

{{/* Lock-down every container gets; the ids come from podSecurityContext. */}}
{{- define "embedding-jobs.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: {{ .Values.podSecurityContext.runAsUser }}
runAsGroup: {{ .Values.podSecurityContext.runAsGroup }}
readOnlyRootFilesystem: true
allowPrivilegeEscalation: false
privileged: false
capabilities:
  drop:
    - ALL
seccompProfile:
  type: RuntimeDefault
{{- end }}

{{/*
Combinations the schema cannot express; failing here beats a pod that crash-loops after install.
*/}}
{{- define "embedding-jobs.validate" -}}
{{- $v := .Values }}
{{- $config := $v.config | default dict }}
{{- if and (not (include "embedding-jobs.isLoopback" $v.exporter.listenHost)) (not $v.secrets.apiTokens.name) (not $v.api.allowAnonymous) }}
{{- fail (printf "the REST API would answer anyone who reaches the pod (exporter.listenHost=%s and no secrets.apiTokens): create a Secret holding 'TOKEN=tenant-a,tenant-b;OPS=*' and set secrets.apiTokens.name, or set api.allowAnonymous=true if an open API is meant" $v.exporter.listenHost) }}
{{- end }}
{{- if and $v.exporter.otlp.expose (not $v.secrets.otlpToken.name) }}
{{- fail "exporter.otlp.expose opens the OTLP receiver to other pods, so it needs secrets.otlpToken (the exporter refuses to listen off loopback without a token)" }}
{{- end }}
{{- if eq (int $v.exporter.otlp.port) (int $v.exporter.port) }}
{{- fail (printf "exporter.otlp.port and exporter.port are both %d: the OTLP receiver needs a port of its own" (int $v.exporter.port)) }}
{{- end }}
{{- if and $v.exporter.nativeSidecar (not (semverCompare ">=1.29.0-0" .Capabilities.KubeVersion.Version)) }}
{{- fail (printf "exporter.nativeSidecar needs Kubernetes 1.29 or later (this cluster: %s); set exporter.nativeSidecar=false" .Capabilities.KubeVersion.Version) }}
{{- end }}
{{- if and (include "embedding-jobs.usesLocalStore" .) (or $v.keda.enabled (gt (int $v.replicaCount) 1)) }}
{{- fail "the SQLite store and local queue live inside one pod: use config.store=cosmos and config.queue=servicebus to run more than one replica or enable keda" }}
{{- end }}
{{- if and (eq (include "embedding-jobs.store" .) "cosmos") (not $config.cosmosEndpoint) }}
{{- fail "config.store=cosmos needs config.cosmosEndpoint" }}
{{- end }}
{{- if and (eq (include "embedding-jobs.queue" .) "servicebus") (not (or $config.servicebusNamespace $v.secrets.servicebusConnectionString.name)) }}
{{- fail "config.queue=servicebus needs config.servicebusNamespace (Entra ID) or secrets.servicebusConnectionString" }}
{{- end }}
{{- if and (eq ($config.embedder | default "") "openai") (not $config.openaiEndpoint) }}
{{- fail "config.embedder=openai needs config.openaiEndpoint" }}
{{- end }}
{{- if and $v.azure.workloadIdentity.enabled (not $v.azure.workloadIdentity.clientId) }}
{{- fail "azure.workloadIdentity.enabled needs azure.workloadIdentity.clientId" }}
{{- end }}
{{- if and $v.serviceMonitor.enabled $v.podMonitor.enabled }}
{{- fail "serviceMonitor.enabled and podMonitor.enabled would scrape every pod twice and double every sum in the rules and dashboards: enable one of them" }}
{{- end }}
{{- if and $v.azureManagedPrometheus.enabled (not (or $v.serviceMonitor.enabled $v.podMonitor.enabled)) }}
{{- fail "azureManagedPrometheus.enabled sets the API group of the ServiceMonitor or PodMonitor: enable serviceMonitor or podMonitor too" }}
{{- end }}
{{- if $v.keda.enabled }}
{{- if ne (include "embedding-jobs.queue" .) "servicebus" }}
{{- fail "keda scales on a Service Bus queue: set config.queue=servicebus" }}
{{- end }}
{{- if gt (int $v.keda.minReplicaCount) (int $v.keda.maxReplicaCount) }}
{{- fail "keda.minReplicaCount must not exceed keda.maxReplicaCount" }}
{{- end }}
{{- if eq $v.keda.authentication "workloadIdentity" }}
{{- if not $config.servicebusNamespace }}
{{- fail "keda.authentication=workloadIdentity needs config.servicebusNamespace" }}
{{- end }}
{{- if not (or $v.keda.identityId $v.azure.workloadIdentity.clientId) }}
{{- fail "keda.authentication=workloadIdentity needs keda.identityId or azure.workloadIdentity.clientId" }}
{{- end }}
{{- else if not $v.secrets.servicebusConnectionString.name }}
{{- fail "keda.authentication=connectionString needs secrets.servicebusConnectionString" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Mounts of a container; call as (list $ WITH_DATA). The worker always has the data volume (its spool of
buffered job-store writes lives there); the exporter only when it reads the SQLite store.
*/}}
{{- define "embedding-jobs.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if index . 1 }}
- name: data
  mountPath: {{ include "embedding-jobs.dataDir" (index . 0) }}
{{- end }}
{{- end }}

{{/* The exporter container, shared by the native-sidecar and plain-container layouts. */}}
{{- define "embedding-jobs.exporterContainer" -}}
- name: exporter
  image: {{ include "embedding-jobs.image" . }}
  imagePullPolicy: {{ .Values.image.pullPolicy }}
  args: ["exporter"]
  envFrom:
    - configMapRef:
        name: {{ include "embedding-jobs.fullname" . }}
  env:
    - name: EMBEDDING_JOBS_EXPORTER_HOST
      value: {{ .Values.exporter.listenHost | quote }}
    {{- /* Loopback unless exposed: then only the worker beside it can send spans. */}}
    - name: EMBEDDING_JOBS_OTLP_HOST
      value: {{ ternary .Values.exporter.listenHost "127.0.0.1" .Values.exporter.otlp.expose | quote }}
    {{- with include "embedding-jobs.secretEnv" (list $ "cosmosKey" "servicebusConnectionString" "apiTokens" "metricsToken" "otlpToken") }}
    {{- trim . | nindent 4 }}
    {{- end }}
  ports:
    - name: http
      containerPort: {{ .Values.exporter.port | int }}
      protocol: TCP
    {{- if .Values.exporter.otlp.expose }}
    - name: otlp
      containerPort: {{ .Values.exporter.otlp.port | int }}
      protocol: TCP
    {{- end }}
  startupProbe:
    httpGet:
      path: /healthz
      port: http
    {{- toYaml .Values.exporter.startupProbe | nindent 4 }}
  livenessProbe:
    httpGet:
      path: /healthz
      port: http
    {{- toYaml .Values.exporter.livenessProbe | nindent 4 }}
  readinessProbe:
    httpGet:
      path: /readyz
      port: http
    {{- toYaml .Values.exporter.readinessProbe | nindent 4 }}
  securityContext:
    {{- include "embedding-jobs.containerSecurityContext" . | nindent 4 }}
  resources:
    {{- toYaml .Values.exporter.resources | nindent 4 }}
  volumeMounts:
    {{- include "embedding-jobs.volumeMounts" (list . (include "embedding-jobs.usesLocalStore" .)) | nindent 4 }}
{{- end }}

{{/* The heartbeat file the worker's consume loop touches and its probes check (EMBEDDING_JOBS_HEARTBEAT_FILE). */}}
{{- define "embedding-jobs.heartbeatFile" -}}
/tmp/worker-heartbeat
{{- end }}

{{/* API group of the ServiceMonitor and PodMonitor: the Prometheus Operator's, or Azure Monitor managed Prometheus'. */}}
{{- define "embedding-jobs.monitorApiVersion" -}}
{{- ternary "azmonitoring.coreos.com/v1" "monitoring.coreos.com/v1" .Values.azureManagedPrometheus.enabled }}
{{- end }}

{{/* Spec fields every monitor gets: the label limits the Azure add-on asks for (it drops monitors without them). */}}
{{- define "embedding-jobs.monitorLimits" -}}
{{- if .Values.azureManagedPrometheus.enabled }}
labelLimit: 63
labelNameLengthLimit: 511
labelValueLengthLimit: 1023
{{- end }}
{{- end }}

{{/* The scrape endpoint of the ServiceMonitor and the PodMonitor: the exporter's port named http. */}}
{{- define "embedding-jobs.scrapeEndpoint" -}}
- port: http
  path: /metrics
  interval: {{ .Values.serviceMonitor.interval }}
  scrapeTimeout: {{ .Values.serviceMonitor.scrapeTimeout }}
  {{- /* The alert rules select their targets by this job label, whatever the release is called. */}}
  relabelings:
    - action: replace
      targetLabel: job
      replacement: {{ .Values.serviceMonitor.job | quote }}
  {{- with .Values.secrets.metricsToken }}
  {{- if .name }}
  authorization:
    type: Bearer
    credentials:
      name: {{ .name }}
      key: {{ .key }}
  {{- end }}
  {{- end }}
{{- end }}

{{/*
The TCP port an endpoint URL is reached on: its explicit port, else its scheme's (http 80, https 443).
NetworkPolicies know ports, not host names, so each configured endpoint contributes its port.
*/}}
{{- define "embedding-jobs.urlPort" -}}
{{- $url := index . 1 }}
{{- $parsed := urlParse $url }}
{{- $port := regexFind ":[0-9]+$" $parsed.host | trimPrefix ":" }}
{{- if $port }}{{ $port }}
{{- else if eq $parsed.scheme "https" }}443
{{- else if eq $parsed.scheme "http" }}80
{{- else }}{{ fail (printf "networkPolicy.restrictEgress cannot tell the port of config.%s=%q: give it an http:// or https:// scheme" (index . 0) $url) }}
{{- end }}
{{- end }}

{{/*
The TCP ports the pod's egress needs besides DNS, as a JSON list of numbers, from what the configuration
enables: 443 for Cosmos DB, Service Bus, OpenAI and Entra ID tokens; 5671 (AMQP over TLS) for Service Bus;
the ports of the configured Cosmos DB, OpenAI and span-forwarding endpoints.
*/}}
{{- define "embedding-jobs.egressPorts" -}}
{{- $v := .Values }}
{{- $config := $v.config | default dict }}
{{- $ports := list }}
{{- $store := include "embedding-jobs.store" . }}
{{- $queue := include "embedding-jobs.queue" . }}
{{- $embedder := $config.embedder | default "hashing" }}
{{- if or (eq $store "cosmos") (eq $queue "servicebus") (ne $embedder "hashing") $v.azure.workloadIdentity.enabled }}
{{- $ports = append $ports 443 }}
{{- end }}
{{- if eq $queue "servicebus" }}
{{- $ports = append $ports 5671 }}
{{- end }}
{{- if and (eq $store "cosmos") $config.cosmosEndpoint }}
{{- $ports = append $ports (include "embedding-jobs.urlPort" (list "cosmosEndpoint" $config.cosmosEndpoint) | int) }}
{{- end }}
{{- if and (eq $embedder "openai") $config.openaiEndpoint }}
{{- $ports = append $ports (include "embedding-jobs.urlPort" (list "openaiEndpoint" $config.openaiEndpoint) | int) }}
{{- end }}
{{- with $config.forwardOtlpEndpoint }}
{{- $ports = append $ports (include "embedding-jobs.urlPort" (list "forwardOtlpEndpoint" .) | int) }}
{{- end }}
{{- /* Zero-padded for a numeric order from sortAlpha. */}}
{{- $padded := list }}
{{- range $ports | uniq }}
{{- $padded = append $padded (printf "%05d" .) }}
{{- end }}
{{- $sorted := list }}
{{- range $padded | sortAlpha }}
{{- $sorted = append $sorted (. | atoi) }}
{{- end }}
{{- $sorted | toJson }}
{{- end }}

{{/* Labels of the `helm test` pod: the release's, without the selector labels that would put it behind the Service. */}}
{{- define "embedding-jobs.testSelectorLabels" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: helm-test
{{- end }}
