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
  "metricsToken" "EMBEDDING_JOBS_METRICS_TOKEN" }}
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

{{- define "embedding-jobs.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
{{- if include "embedding-jobs.usesLocalStore" . }}
- name: data
  mountPath: /var/lib/embedding-jobs
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
    {{- with include "embedding-jobs.secretEnv" (list $ "cosmosKey" "servicebusConnectionString" "apiTokens" "metricsToken") }}
    {{- trim . | nindent 4 }}
    {{- end }}
  ports:
    - name: http
      containerPort: {{ .Values.exporter.port | int }}
      protocol: TCP
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
    {{- include "embedding-jobs.volumeMounts" . | nindent 4 }}
{{- end }}
