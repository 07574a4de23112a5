{{/* Names */}}
{{- define "tokenport.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tokenport.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "tokenport.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "tokenport.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* Selector labels of one component: include "tokenport.selector" (list $ "gateway") */}}
{{- define "tokenport.selector" -}}
{{- $root := index . 0 -}}
app.kubernetes.io/name: {{ include "tokenport.name" $root }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "tokenport.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* A model's DNS-label id: its `id`, else its served name lowercased with other characters as "-". */}}
{{- define "tokenport.modelId" -}}
{{- $id := .id | default (regexReplaceAll "[^a-z0-9-]+" (lower .name) "-") -}}
{{- $id | trunc 40 | trimAll "-" -}}
{{- end -}}

{{/* Name of a model's worker objects: include "tokenport.workerName" (list $ $model) */}}
{{- define "tokenport.workerName" -}}
{{- $root := index . 0 -}}
{{- printf "%s-worker-%s" (include "tokenport.fullname" $root | trunc 20 | trimSuffix "-") (include "tokenport.modelId" (index . 1)) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The Secret and key holding the database URL (the dev one when dev.postgresql is on). */}}
{{- define "tokenport.devSecretName" -}}
{{- printf "%s-dev" (include "tokenport.fullname" .) -}}
{{- end -}}

{{- define "tokenport.databaseUrlRef" -}}
{{- if .Values.dev.postgresql.enabled -}}
name: {{ include "tokenport.devSecretName" . }}
key: database_url
{{- else -}}
name: {{ .Values.database.urlSecret.name | default .Values.secrets.name }}
key: {{ .Values.database.urlSecret.key }}
{{- end -}}
{{- end -}}

{{- define "tokenport.redisUrlRef" -}}
{{- if .Values.dev.redis.enabled -}}
name: {{ include "tokenport.devSecretName" . }}
key: redis_url
{{- else -}}
name: {{ .Values.redis.urlSecret.name | default .Values.secrets.name }}
key: {{ .Values.redis.urlSecret.key }}
{{- end -}}
{{- end -}}

{{/* Settings as TOKENPORT_* variables: include "tokenport.settingsEnv" (dict "prefix" "TOKENPORT_" "value" $map) */}}
{{- define "tokenport.settingsEnv" -}}
{{- $prefix := .prefix -}}
{{- range $key, $value := .value }}
{{- $name := printf "%s%s" $prefix (upper $key) }}
{{- if kindIs "map" $value }}
{{- include "tokenport.settingsEnv" (dict "prefix" (printf "%s__" $name) "value" $value) }}
{{- else if kindIs "string" $value }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- else }}
- name: {{ $name }}
  value: {{ toJson $value | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The environment every Tokenport container gets (gateway, migrations, month close). */}}
{{- define "tokenport.env" -}}
{{ include "tokenport.settingsEnv" (dict "prefix" "TOKENPORT_" "value" .Values.settings) | trim }}
- name: TOKENPORT_DATA_DIR
  value: /app/data
- name: TOKENPORT_MODELS_FILE
  value: /etc/tokenport/models.yaml
- name: TOKENPORT_SECRET_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .Values.secrets.name }}
      key: {{ .Values.secrets.secretKeyKey }}
- name: TOKENPORT_ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ .Values.secrets.name }}
      key: {{ .Values.secrets.adminTokenKey }}
- name: TOKENPORT_DATABASE_URL
  valueFrom:
    secretKeyRef:
      {{- include "tokenport.databaseUrlRef" . | nindent 6 }}
{{- if eq (toString (dig "limits" "backend" "memory" .Values.settings)) "redis" }}
- name: TOKENPORT_LIMITS__REDIS_URL
  valueFrom:
    secretKeyRef:
      {{- include "tokenport.redisUrlRef" . | nindent 6 }}
{{- end }}
- name: XDG_CACHE_HOME
  value: /tmp/cache
{{- end -}}

{{/* Volumes of every Tokenport pod: a writable data dir and /tmp (the root fs is read-only).
     The gateway and the month close also mount the model catalogue (not the hook Job: it runs
     before the release's ConfigMaps exist; without the file the catalogue is empty). */}}
{{- define "tokenport.volumes" -}}
- name: data
  emptyDir: {}
- name: tmp
  emptyDir: {}
{{- end -}}

{{- define "tokenport.volumeMounts" -}}
- name: data
  mountPath: /app/data
- name: tmp
  mountPath: /tmp
{{- end -}}

{{/* The gateway's ServiceAccount: the chart's own (<fullname>-gateway) or serviceAccount.name. */}}
{{- define "tokenport.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (printf "%s-gateway" (include "tokenport.fullname" .)) -}}
{{- else -}}
{{- .Values.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{/* Whether the gateway discovers each worker pod through a workers file (gateway.workerDiscovery
     endpointslices or dns) rather than reaching a model's headless Service as one worker (service). */}}
{{- define "tokenport.discovers" -}}
{{- if ne .Values.gateway.workerDiscovery "service" }}true{{ end -}}
{{- end -}}

{{/* Where the gateway reads the workers file: the workers ConfigMap mounted as a directory (a
     subPath mount would never see an update), beside the catalogue's, not inside it. */}}
{{- define "tokenport.workersDir" -}}/etc/tokenport-workers{{- end -}}

{{/* One worker entry of a model for the gateway, as JSON: include "tokenport.gatewayWorker" (list $ $model).
     service: a catalogue worker (models.yaml) whose base_url is the model's headless Service name.
     endpointslices / dns: a workers-file entry (serving/proxy/discovery.py) that stands for each
     ready pod of the model's headless Service; a model with a baseUrl stays one static worker. */}}
{{- define "tokenport.gatewayWorker" -}}
{{- $root := index . 0 -}}
{{- $m := index . 1 -}}
{{- $mode := $root.Values.gateway.workerDiscovery -}}
{{- $w := dict "region" ($m.region | default $root.Values.gateway.region) -}}
{{- if eq $mode "service" -}}
{{- $_ := set $w "id" (printf "%s-svc" (include "tokenport.modelId" $m)) -}}
{{- $_ := set $w "base_url" (include "tokenport.workerUrl" (list $root $m)) -}}
{{- else -}}
{{- $_ := set $w "model" $m.name -}}
{{- $_ := set $w "id" (include "tokenport.modelId" $m) -}}
{{- if $m.baseUrl -}}
{{- $_ := set $w "base_url" $m.baseUrl -}}
{{- $_ := set $w "discover" "static" -}}
{{- else -}}
{{- $_ := set $w "base_url" (printf "http://%s.%s:%d" (include "tokenport.workerName" (list $root $m)) $root.Release.Namespace (int $root.Values.workers.port)) -}}
{{- $_ := set $w "discover" $mode -}}
{{- end -}}
{{- end -}}
{{- if $m.router }}{{ $_ := set $w "router" true }}{{ end -}}
{{- with $m.healthPath }}{{ $_ := set $w "health_path" . }}{{ end -}}
{{- toJson $w -}}
{{- end -}}

{{/* A model's base URL: its own baseUrl (workers run elsewhere), else its headless Service. */}}
{{- define "tokenport.workerUrl" -}}
{{- $root := index . 0 -}}
{{- $model := index . 1 -}}
{{- if $model.baseUrl -}}
{{- $model.baseUrl -}}
{{- else -}}
{{- printf "http://%s.%s.svc:%d" (include "tokenport.workerName" .) $root.Release.Namespace (int $root.Values.workers.port) -}}
{{- end -}}
{{- end -}}
