{{/*
Chart name.
*/}}
{{- define "onebase.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Full name prefix of every resource (63 characters at most).
*/}}
{{- define "onebase.fullname" -}}
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

{{/*
A component's name: the full name cut so that "<prefix>-<suffix>" fits `max` characters.
Usage: include "onebase.componentName" (list $ "mlflow" 63)
KubeRay limits: RayCluster 53, RayService and RayJob 47 (it appends its own suffixes).
*/}}
{{- define "onebase.componentName" -}}
{{- $root := index . 0 }}
{{- $suffix := index . 1 }}
{{- $max := index . 2 }}
{{- $room := sub $max (add1 (len $suffix)) | int }}
{{- printf "%s-%s" (include "onebase.fullname" $root | trunc $room | trimSuffix "-") $suffix }}
{{- end }}

{{- define "onebase.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels.
*/}}
{{- define "onebase.labels" -}}
helm.sh/chart: {{ include "onebase.chart" . }}
{{ include "onebase.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: onebase
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Selector labels.
*/}}
{{- define "onebase.selectorLabels" -}}
app.kubernetes.io/name: {{ include "onebase.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* ---- names ---- */}}
{{- define "onebase.rayClusterName" -}}{{ include "onebase.componentName" (list . "ray" 53) }}{{- end }}
{{- define "onebase.rayServiceName" -}}{{ include "onebase.componentName" (list . "serve" 47) }}{{- end }}
{{- define "onebase.specsConfigMapName" -}}{{ include "onebase.componentName" (list . "specs" 63) }}{{- end }}
{{- define "onebase.sharedClaimName" -}}
{{- .Values.sharedStorage.existingClaim | default (include "onebase.componentName" (list . "shared" 63)) }}
{{- end }}
{{- define "onebase.mlflowName" -}}{{ include "onebase.componentName" (list . "mlflow" 63) }}{{- end }}
{{- define "onebase.postgresqlName" -}}{{ include "onebase.componentName" (list . "postgresql" 63) }}{{- end }}
{{- define "onebase.minioName" -}}{{ include "onebase.componentName" (list . "minio" 63) }}{{- end }}

{{- define "onebase.authSecretName" -}}
{{- .Values.serve.auth.existingSecret | default (include "onebase.componentName" (list . "serve-auth" 63)) }}
{{- end }}
{{- define "onebase.postgresqlSecretName" -}}
{{- if eq .Values.mlflow.backendStore.mode "external" }}
{{- .Values.mlflow.backendStore.external.existingSecret }}
{{- else }}
{{- .Values.postgresql.existingSecret | default (include "onebase.postgresqlName" .) }}
{{- end }}
{{- end }}
{{- define "onebase.postgresqlPasswordKey" -}}
{{- if eq .Values.mlflow.backendStore.mode "external" }}
{{- .Values.mlflow.backendStore.external.passwordKey }}
{{- else }}
{{- .Values.postgresql.passwordKey }}
{{- end }}
{{- end }}
{{- define "onebase.minioSecretName" -}}
{{- .Values.minio.existingSecret | default (include "onebase.minioName" .) }}
{{- end }}

{{/*
The MLflow tracking URI every Ray container, submitter and the Serve app gets.
*/}}
{{- define "onebase.trackingUri" -}}
{{- if .Values.mlflow.enabled }}
{{- printf "http://%s.%s.svc.%s:%d" (include "onebase.mlflowName" .) .Release.Namespace .Values.clusterDomain (int .Values.mlflow.port) }}
{{- else }}
{{- required "mlflow.trackingUri is required when mlflow.enabled is false" .Values.mlflow.trackingUri }}
{{- end }}
{{- end }}

{{/*
A value kept across upgrades: the key of an existing Secret if there is one, else `value`, else a
random string. Usage: include "onebase.secretValue" (dict "root" $ "secret" NAME "key" KEY "value" V)
*/}}
{{- define "onebase.secretValue" -}}
{{- $existing := lookup "v1" "Secret" .root.Release.Namespace .secret }}
{{- if .value }}
{{- .value }}
{{- else if and $existing (hasKey (default dict $existing.data) .key) }}
{{- index $existing.data .key | b64dec }}
{{- else }}
{{- randAlphaNum 32 }}
{{- end }}
{{- end }}

{{/*
Environment of every Ray container. Args: dict "root" $ "auth" bool
*/}}
{{- define "onebase.rayEnv" -}}
{{- $root := .root -}}
- name: MLFLOW_TRACKING_URI
  value: {{ include "onebase.trackingUri" $root | quote }}
- name: ONEBASE_CACHE
  value: {{ $root.Values.cacheDir | quote }}
{{- range $name, $value := $root.Values.env }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- if .auth }}
- name: ONEBASE_API_KEYS
  valueFrom:
    secretKeyRef:
      name: {{ include "onebase.authSecretName" $root }}
      key: {{ $root.Values.serve.auth.apiKeysKey }}
- name: ONEBASE_ADMIN_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "onebase.authSecretName" $root }}
      key: {{ $root.Values.serve.auth.adminTokenKey }}
{{- end }}
{{- end }}

{{/*
Resources with `gpus` nvidia.com/gpu added to requests and limits (0: unchanged).
Args: dict "resources" MAP "gpus" INT
*/}}
{{- define "onebase.resources" -}}
{{- $res := deepCopy (default dict .resources) }}
{{- if gt (int .gpus) 0 }}
{{- $limits := default dict $res.limits }}
{{- $_ := set $limits "nvidia.com/gpu" (int .gpus) }}
{{- $_ := set $res "limits" $limits }}
{{- $requests := default dict $res.requests }}
{{- $_ := set $requests "nvidia.com/gpu" (int .gpus) }}
{{- $_ := set $res "requests" $requests }}
{{- end }}
{{- toYaml $res }}
{{- end }}

{{/*
The pod template of a Ray head or worker group.
Args: dict "root" $ "head" bool "component" STR "image" STR "group" MAP (resources, nodeSelector,
tolerations, affinity) "gpus" INT "auth" bool "serve" bool "specs" bool
*/}}
{{- define "onebase.rayPodTemplate" -}}
{{- $root := .root -}}
metadata:
  labels:
    {{- include "onebase.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .component }}
spec:
  {{- with $root.Values.imagePullSecrets }}
  imagePullSecrets:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  containers:
    - name: {{ ternary "ray-head" "ray-worker" .head }}
      image: {{ .image }}
      imagePullPolicy: {{ $root.Values.image.pullPolicy }}
      {{- if .head }}
      ports:
        - name: gcs-server
          containerPort: 6379
        - name: dashboard
          containerPort: 8265
        - name: client
          containerPort: 10001
        {{- if .serve }}
        - name: serve
          containerPort: 8000
        {{- end }}
      {{- end }}
      {{- if not .head }}
      lifecycle:
        preStop:
          exec:
            command: ["/bin/sh", "-c", "ray stop"]
      {{- end }}
      env:
        {{- include "onebase.rayEnv" (dict "root" $root "auth" .auth) | nindent 8 }}
      resources:
        {{- include "onebase.resources" (dict "resources" .group.resources "gpus" .gpus) | nindent 8 }}
      volumeMounts:
        - name: dshm
          mountPath: /dev/shm
        {{- if .specs }}
        - name: specs
          mountPath: /specs
          readOnly: true
        {{- end }}
        {{- if and .specs $root.Values.sharedStorage.enabled }}
        - name: shared
          mountPath: {{ $root.Values.sharedStorage.mountPath }}
        {{- end }}
  volumes:
    # Ray's object store lives in /dev/shm; the container default (64 MiB) is far too small.
    - name: dshm
      emptyDir:
        medium: Memory
    {{- if .specs }}
    - name: specs
      configMap:
        name: {{ include "onebase.specsConfigMapName" $root }}
    {{- end }}
    {{- if and .specs $root.Values.sharedStorage.enabled }}
    - name: shared
      persistentVolumeClaim:
        claimName: {{ include "onebase.sharedClaimName" $root }}
    {{- end }}
  {{- with .group.nodeSelector }}
  nodeSelector:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.tolerations }}
  tolerations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
  {{- with .group.affinity }}
  affinity:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}

{{/*
Autoscaler options. Args: the autoscaling values.
*/}}
{{- define "onebase.autoscalerOptions" -}}
idleTimeoutSeconds: {{ .idleTimeoutSeconds }}
upscalingMode: {{ .upscalingMode }}
{{- with .resources }}
resources:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/*
A worker group spec. Args: dict "root" $ "group" MAP "image" STR "gpus" INT "auth" bool "specs" bool
"component" STR
*/}}
{{- define "onebase.workerGroup" -}}
{{- $g := .group }}
{{- if gt (int $g.minReplicas) (int $g.maxReplicas) }}
{{- fail (printf "worker group %s: minReplicas (%d) is greater than maxReplicas (%d)" $g.groupName (int $g.minReplicas) (int $g.maxReplicas)) }}
{{- end }}
{{- if or (lt (int $g.replicas) (int $g.minReplicas)) (gt (int $g.replicas) (int $g.maxReplicas)) }}
{{- fail (printf "worker group %s: replicas (%d) must lie within [minReplicas, maxReplicas] = [%d, %d]" $g.groupName (int $g.replicas) (int $g.minReplicas) (int $g.maxReplicas)) }}
{{- end -}}
- groupName: {{ $g.groupName }}
  replicas: {{ $g.replicas }}
  minReplicas: {{ $g.minReplicas }}
  maxReplicas: {{ $g.maxReplicas }}
  rayStartParams: {{- toYaml (default dict $g.rayStartParams) | nindent 4 }}
  template:
    {{- include "onebase.rayPodTemplate" (dict "root" .root "head" false "component" .component "image" .image "group" $g "gpus" .gpus "auth" .auth "specs" .specs) | nindent 4 }}
{{- end }}
