{{/* The pod spec of a vLLM worker. role: single (Deployment), leader or worker (LeaderWorkerSet). */}}
{{- define "tokenport.workerPodSpec" -}}
{{- $root := .root -}}
{{- $w := .w -}}
{{- $m := .m -}}
{{- $serves := ne .role "worker" -}}
automountServiceAccountToken: false
terminationGracePeriodSeconds: {{ $w.terminationGracePeriodSeconds }}
{{- with $root.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
containers:
  - name: vllm
    {{- $image := $m.image | default $w.image }}
    image: {{ printf "%s:%s" $image.repository $image.tag }}
    imagePullPolicy: {{ $image.pullPolicy | default "IfNotPresent" }}
    {{- if eq .role "single" }}
    command:
      {{- toYaml $w.command | nindent 6 }}
    args:
      {{- toYaml .args | nindent 6 }}
    {{- else if eq .role "leader" }}
    # Start the Ray head for the group, then the engine across LWS_GROUP_SIZE pods.
    command: ["/bin/sh", "-c"]
    args:
      - >-
        {{ $m.multiNode.rayScript | default "/vllm-workspace/examples/online_serving/multi-node-serving.sh" }} leader --ray_cluster_size=$(LWS_GROUP_SIZE);
        exec {{ range $w.command }}{{ squote . }} {{ end }}{{ range .args }}{{ squote . }} {{ end }}
    {{- else }}
    command: ["/bin/sh", "-c"]
    args:
      - >-
        exec {{ $m.multiNode.rayScript | default "/vllm-workspace/examples/online_serving/multi-node-serving.sh" }} worker --ray_address=$(LWS_LEADER_ADDRESS)
    {{- end }}
    {{- if $serves }}
    ports:
      - name: http
        containerPort: {{ $w.port }}
        protocol: TCP
    {{- end }}
    env:
      - name: HF_HOME
        value: /cache/huggingface
      {{- if $w.hfTokenSecret.name }}
      - name: HF_TOKEN
        valueFrom:
          secretKeyRef:
            name: {{ $w.hfTokenSecret.name }}
            key: {{ $w.hfTokenSecret.key }}
      {{- end }}
      {{- with $w.env }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
      {{- with $m.env }}
      {{- toYaml . | nindent 6 }}
      {{- end }}
    {{- if $serves }}
    startupProbe:
      httpGet: {path: /health, port: http}
      periodSeconds: 10
      failureThreshold: {{ div (int $w.startupSeconds) 10 }}
    livenessProbe:
      httpGet: {path: /health, port: http}
      periodSeconds: 15
      timeoutSeconds: 5
      failureThreshold: 4
    readinessProbe:
      httpGet: {path: /health, port: http}
      periodSeconds: 5
      timeoutSeconds: 4
      failureThreshold: 2
    lifecycle:
      preStop:
        # Out of the headless Service first, then SIGTERM: vLLM finishes running requests.
        exec:
          command: ["sleep", "10"]
    {{- end }}
    resources:
      {{- $res := deepCopy ($m.resources | default dict) }}
      {{- $limits := deepCopy ($res.limits | default dict) }}
      {{- if gt (int ($m.gpus | default 0)) 0 }}
      {{- $_ := set $limits "nvidia.com/gpu" (int $m.gpus) }}
      {{- end }}
      {{- $_ := set $res "limits" $limits }}
      {{- toYaml $res | nindent 6 }}
    volumeMounts:
      - name: cache
        mountPath: /cache
      - name: shm
        mountPath: /dev/shm
volumes:
  - name: cache
    {{- if $w.cache.existingClaim }}
    persistentVolumeClaim:
      claimName: {{ $w.cache.existingClaim }}
    {{- else }}
    emptyDir:
      sizeLimit: {{ $w.cache.sizeLimit }}
    {{- end }}
  - name: shm
    emptyDir:
      medium: Memory
      sizeLimit: {{ $w.shmSize }}
{{- /* A model's own nodeSelector / tolerations replace the shared ones, even when empty. */}}
{{- with (ternary $m.nodeSelector $w.nodeSelector (hasKey $m "nodeSelector")) }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with (ternary $m.tolerations $w.tolerations (hasKey $m "tolerations")) }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $m.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}
