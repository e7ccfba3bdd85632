{{/*
Names. One release runs one region, so the region is part of every name.
*/}}
{{- define "crisp.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "crisp.region" -}}
{{- required "set `region` to this node's region code from the configuration, e.g. --set region=eu-central-1" .Values.region -}}
{{- end -}}

{{- define "crisp.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- $region := include "crisp.region" . -}}
{{- if contains $region .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $region | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "crisp.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "crisp.selectorLabels" -}}
app.kubernetes.io/name: {{ include "crisp.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
crisp/region: {{ include "crisp.region" . }}
{{- end -}}

{{- define "crisp.labels" -}}
helm.sh/chart: {{ include "crisp.chart" . }}
{{ include "crisp.selectorLabels" . }}
app.kubernetes.io/component: node
app.kubernetes.io/part-of: crisp
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{- define "crisp.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "crisp.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "crisp.certsSecret" -}}
{{- default (printf "%s-certs" (include "crisp.fullname" .)) .Values.certificates.secretName -}}
{{- end -}}

{{/*
The files the configuration's [access] section names (principals, keys, policies,
guardrails), as [{"key", "path"}]: the Secret key (the file name) and the path relative to
the configuration. Empty without an [access] section.
*/}}
{{- define "crisp.accessFiles" -}}
{{- $catalog := fromJson (include "crisp.catalog" .) -}}
{{- $files := list -}}
{{- with $catalog.access -}}
{{- $paths := list .principals .keys -}}
{{- range $p := (default (list) .policies) -}}{{- $paths = append $paths $p -}}{{- end -}}
{{- range $p := (default (list) .guardrails) -}}{{- $paths = append $paths $p -}}{{- end -}}
{{- $keys := list -}}
{{- range $p := $paths -}}
{{- if or (hasPrefix "/" $p) (has ".." (splitList "/" $p)) -}}
{{- fail (printf "[access] names %q; on Kubernetes the access files are projected next to the configuration from a Secret, so name them relative to it (e.g. \"keys.toml\")" $p) -}}
{{- end -}}
{{- $key := base $p -}}
{{- if has $key $keys -}}
{{- fail (printf "[access] names two files called %s; the access Secret's keys are file names, so give them different names" $key) -}}
{{- end -}}
{{- $keys = append $keys $key -}}
{{- $files = append $files (dict "key" $key "path" $p) -}}
{{- end -}}
{{- end -}}
{{- toJson $files -}}
{{- end -}}

{{- define "crisp.accessSecret" -}}
{{- default (printf "%s-access" (include "crisp.fullname" .)) .Values.access.secretName -}}
{{- end -}}

{{- define "crisp.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/*
The configuration, parsed. Rendering fails with a message saying what to fix.
*/}}
{{- define "crisp.catalog" -}}
{{- $text := required "set `config` to the deployment's configuration file: --set-file config=crisp.toml" .Values.config -}}
{{- $catalog := fromToml $text -}}
{{- if hasKey $catalog "Error" -}}
{{- fail (printf "`config` is not valid TOML (%s); check it with `crisp check --config crisp.toml`" $catalog.Error) -}}
{{- end -}}
{{- toJson $catalog -}}
{{- end -}}

{{/*
This region's listeners, from its [[region]] entry: for each of client, peer and admin,
{"address", "host", "port"}. The node listens on these ports on `.Values.listen`; the
addresses are what clients and the other regions dial.
*/}}
{{- define "crisp.listeners" -}}
{{- $catalog := fromJson (include "crisp.catalog" .) -}}
{{- $region := include "crisp.region" . -}}
{{- $entry := dict -}}
{{- $codes := list -}}
{{- range $catalog.region -}}
{{- $codes = append $codes .code -}}
{{- if eq .code $region -}}{{- $entry = . -}}{{- end -}}
{{- end -}}
{{- if not $entry -}}
{{- fail (printf "region %q is not in the configuration; its regions are: %s" $region (join ", " $codes)) -}}
{{- end -}}
{{- if not (hasKey $entry "admin") -}}
{{- fail (printf "region %s has no admin address in the configuration; add admin = \"<host>:<port>\" to its [[region]]: the probes and metrics scraping use it" $region) -}}
{{- end -}}
{{- $out := dict -}}
{{- range $what := list "client" "peer" "admin" -}}
{{- $address := get $entry $what -}}
{{- if not (regexMatch "^.+:[0-9]+$" $address) -}}
{{- fail (printf "region %s: %s address %q must be host:port" $region $what $address) -}}
{{- end -}}
{{- $port := regexReplaceAll "^.*:" $address "" | atoi -}}
{{- $host := regexReplaceAll ":[0-9]+$" $address "" | trimPrefix "[" | trimSuffix "]" -}}
{{- if or (eq $host "localhost") (regexMatch "^127\\." $host) (eq $host "::1") -}}
{{- fail (printf "region %s: %s address %q is a loopback address; nothing outside the pod could reach it. Use a DNS name (see docs/operations.md, \"Addresses\")" $region $what $address) -}}
{{- end -}}
{{- if and (eq $what "peer") (or (eq $host "0.0.0.0") (eq $host "::")) -}}
{{- fail (printf "region %s: the peer address %q is dialled by the other regions' nodes, so it must be a name or address they can reach, not a wildcard" $region $address) -}}
{{- end -}}
{{- $_ := set $out $what (dict "address" $address "host" $host "port" $port) -}}
{{- end -}}
{{- toJson $out -}}
{{- end -}}

