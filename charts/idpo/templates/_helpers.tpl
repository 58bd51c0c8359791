{{- define "idpo.name" -}}{{ .Release.Name | trunc 50 | trimSuffix "-" }}-operator{{- end -}}
{{- define "idpo.labels" -}}
app.kubernetes.io/name: idpo
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}
{{- define "idpo.selector" -}}
app.kubernetes.io/name: idpo
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}
{{/* The API calls the operator makes, and only those (tests/test_chart.py checks both ways). */}}
{{- define "idpo.rules" -}}
{{/* patch: only to remove the finalizer that operators before 0.2 set (docs/upgrade.md). */}}
- apiGroups: ["idpo.dev"]
  resources: ["iterativedporuns"]
  verbs: ["list", "watch", "patch"]
- apiGroups: ["idpo.dev"]
  resources: ["iterativedporuns/status"]
  verbs: ["patch"]
{{/* Never called: OwnerReferencesPermissionEnforcement requires it for blockOwnerDeletion on children. */}}
- apiGroups: ["idpo.dev"]
  resources: ["iterativedporuns/finalizers"]
  verbs: ["update"]
{{/* get: only when a create meets a Job of the name, to check whose it is. */}}
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["list", "watch", "get", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
{{/* get: only when a create meets an object of the name, to check whose it is. */}}
- apiGroups: [""]
  resources: ["persistentvolumeclaims", "services"]
  verbs: ["create", "get"]
{{/* list, watch: the Job controller's FailedCreate Events only (a field selector): a Job's refused pods. */}}
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "list", "watch"]
{{- if .Values.kueue.enabled }}
{{/* Why a stage is queued or preempted (docs/kueue.md): read only. */}}
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads", "localqueues"]
  verbs: ["list", "watch"]
{{- end }}
{{- end -}}
