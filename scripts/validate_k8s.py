#!/usr/bin/env python3
"""Validates a multi-document YAML stream of Kubernetes objects, strictly.

    python scripts/validate_k8s.py [--crd FILE]... [--kubernetes-version 1.34] FILE|- ...

* Built-in kinds: against the Kubernetes OpenAPI schemas of one fixed version that
  kubernetes-validate (PyPI) ships, in its strict flavour: an unknown field is an error.
* Kinds of a CRD given with --crd: the apiVersion must be the CRD's group and one of its served
  versions, the scope must fit (a namespaced kind may carry metadata.namespace, a cluster one
  not), metadata is checked as ObjectMeta, and the object against that version's
  openAPIV3Schema with jsonschema. Unknown fields are errors there too (as kubectl's default
  strict field validation makes them), except under x-kubernetes-preserve-unknown-fields.
* ServiceMonitor (monitoring.coreos.com/v1, the Prometheus Operator's): no schema is at hand;
  a small structural check runs (selector, endpoints with a port, known endpoint fields) and
  the output says so ("checked structurally (no schema)").
* PrometheusRule (monitoring.coreos.com/v1): structurally too (groups with a name and rules,
  each rule an alert or a record with an expr, known fields only, durations well formed).
* Any other kind is an error ("no schema"): nothing is skipped silently.

Every object gets one line: "ok", "checked structurally" or "ERROR ...". The exit status is 0
when every object passed, 1 otherwise (2 for unusable input: unreadable files, bad YAML, a
bad --crd file).
"""

import argparse
import copy
import re
import sys

import jsonschema
import kubernetes_validate
import yaml

DEFAULT_VERSION = "1.34"

DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
RFC3339 = re.compile(r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$")

# The formats the API server checks in CRD schemas that this project's CRDs may use.
FORMATS = jsonschema.FormatChecker(formats=())


@FORMATS.checks("date-time")
def _date_time(value):
    return not isinstance(value, str) or bool(RFC3339.match(value))


class Loader(yaml.SafeLoader):
    """YAML as Kubernetes reads it: a timestamp stays a string (JSON has no timestamps)."""


Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def load_stream(path):
    """The non-empty documents of a file (or stdin for "-")."""
    try:
        text = sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()
    except OSError as e:
        raise SystemExit(f"FATAL {path}: cannot read: {e}")
    try:
        return [d for d in yaml.load_all(text, Loader=Loader) if d is not None]
    except yaml.YAMLError as e:
        raise SystemExit(f"FATAL {path}: not YAML: {e}")


def to_jsonschema(node):
    """An OpenAPI v3 structural schema (a CRD's) as JSON Schema: `nullable` allows null, objects
    with properties and no x-kubernetes-preserve-unknown-fields reject unknown fields, and
    x-kubernetes-int-or-string allows both."""
    if isinstance(node, list):
        return [to_jsonschema(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties", "definitions"):
            out[key] = {k: to_jsonschema(v) for k, v in value.items()}
        elif key in ("items", "additionalProperties", "not"):
            out[key] = to_jsonschema(value) if isinstance(value, (dict, list)) else value
        elif key in ("allOf", "anyOf", "oneOf"):
            out[key] = [to_jsonschema(v) for v in value]
        elif key == "nullable":
            continue
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = out.get("anyOf", []) + [{"type": "integer"}, {"type": "string"}]
    if (
        "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if node.get("nullable"):
        t = out.get("type")
        if isinstance(t, str):
            out["type"] = [t, "null"]
        elif isinstance(t, list) and "null" not in t:
            out["type"] = t + ["null"]
    return out


class Crd:
    def __init__(self, path, doc):
        if not isinstance(doc, dict) or doc.get("kind") != "CustomResourceDefinition":
            raise SystemExit(f"FATAL {path}: not a CustomResourceDefinition")
        self.path = path
        spec = doc.get("spec") or {}
        self.group = spec.get("group")
        self.kind = (spec.get("names") or {}).get("kind")
        self.scope = spec.get("scope")
        if not self.group or not self.kind or self.scope not in ("Namespaced", "Cluster"):
            raise SystemExit(f"FATAL {path}: CRD without group, names.kind or a valid scope")
        self.versions = {}
        for v in spec.get("versions") or []:
            if not v.get("served"):
                continue
            raw = ((v.get("schema") or {}).get("openAPIV3Schema"))
            if not isinstance(raw, dict):
                raise SystemExit(f"FATAL {path}: version {v.get('name')} has no openAPIV3Schema")
            schema = to_jsonschema(raw)
            # apiVersion, kind and metadata are checked here, not by the CRD's own schema.
            props = schema.setdefault("properties", {})
            for k in ("apiVersion", "kind", "metadata"):
                props.setdefault(k, {})
            props["metadata"] = {"type": "object"}
            try:
                jsonschema.Draft7Validator.check_schema(schema)
            except jsonschema.SchemaError as e:
                raise SystemExit(f"FATAL {path}: openAPIV3Schema of {v.get('name')} is not a valid schema: {e.message}")
            self.versions[v["name"]] = schema
        if not self.versions:
            raise SystemExit(f"FATAL {path}: no served version")


OBJECT_META = {
    "name", "generateName", "namespace", "labels", "annotations", "uid", "resourceVersion",
    "generation", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds",
    "finalizers", "ownerReferences", "managedFields", "selfLink",
}


def check_metadata(obj, namespaced):
    """ObjectMeta of a custom resource: known fields, a DNS subdomain name, string maps."""
    errors = []
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        return ["metadata: required object"]
    for key in meta:
        if key not in OBJECT_META:
            errors.append(f"metadata.{key}: unknown field")
    name = meta.get("name")
    if not isinstance(name, str) or not DNS_SUBDOMAIN.match(name) or len(name) > 253:
        errors.append(f"metadata.name: {name!r} is not a DNS subdomain name")
    if "namespace" in meta:
        if not namespaced:
            errors.append("metadata.namespace: the kind is cluster-scoped")
        elif not isinstance(meta["namespace"], str) or not DNS_LABEL.match(meta["namespace"]):
            errors.append(f"metadata.namespace: {meta['namespace']!r} is not a DNS label")
    for field in ("labels", "annotations"):
        m = meta.get(field, {})
        if not isinstance(m, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in m.items()):
            errors.append(f"metadata.{field}: must map strings to strings")
    return errors


def check_custom(obj, crd):
    group, _, version = obj["apiVersion"].rpartition("/")
    if group != crd.group:
        return [f"apiVersion {obj['apiVersion']!r}: the CRD's group is {crd.group!r}"]
    if version not in crd.versions:
        return [f"apiVersion {obj['apiVersion']!r}: served versions are {sorted(crd.versions)}"]
    errors = check_metadata(obj, crd.scope == "Namespaced")
    validator = jsonschema.Draft7Validator(crd.versions[version], format_checker=FORMATS)
    for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
        path = ".".join(str(p) for p in e.absolute_path) or "(root)"
        errors.append(f"{path}: {e.message}")
    return errors


SERVICE_MONITOR_ENDPOINT = {
    "port", "targetPort", "path", "scheme", "params", "interval", "scrapeTimeout", "tlsConfig",
    "bearerTokenFile", "bearerTokenSecret", "authorization", "honorLabels", "honorTimestamps",
    "trackTimestampsStaleness", "basicAuth", "oauth2", "metricRelabelings", "relabelings",
    "proxyUrl", "followRedirects", "enableHttp2", "filterRunning", "noProxy",
    "proxyFromEnvironment", "proxyConnectHeader",
}
SERVICE_MONITOR_SPEC = {
    "jobLabel", "targetLabels", "podTargetLabels", "endpoints", "selector", "namespaceSelector",
    "sampleLimit", "scrapeProtocols", "targetLimit", "labelLimit", "labelNameLengthLimit",
    "labelValueLengthLimit", "keepDroppedTargets", "attachMetadata", "scrapeClass",
    "bodySizeLimit", "fallbackScrapeProtocol", "scrapeClassicHistograms",
    "nativeHistogramBucketLimit", "nativeHistogramMinBucketFactor", "convertClassicHistogramsToNHCB",
    "selectorMechanism",
}
DURATION = re.compile(r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$")


def check_service_monitor(obj):
    """The fields this project's chart uses, structurally (no schema is at hand)."""
    errors = check_metadata(obj, True)
    for key in obj:
        if key not in ("apiVersion", "kind", "metadata", "spec"):
            errors.append(f"{key}: unknown field")
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return errors + ["spec: required object"]
    for key in spec:
        if key not in SERVICE_MONITOR_SPEC:
            errors.append(f"spec.{key}: unknown field")
    sel = spec.get("selector")
    if not isinstance(sel, dict) or not (sel.get("matchLabels") or sel.get("matchExpressions")):
        errors.append("spec.selector: needs matchLabels or matchExpressions")
    ns = spec.get("namespaceSelector", {})
    if not isinstance(ns, dict) or set(ns) - {"any", "matchNames"}:
        errors.append("spec.namespaceSelector: only `any` and `matchNames`")
    endpoints = spec.get("endpoints")
    if not isinstance(endpoints, list) or not endpoints:
        errors.append("spec.endpoints: required non-empty list")
        endpoints = []
    for i, ep in enumerate(endpoints):
        where = f"spec.endpoints.{i}"
        if not isinstance(ep, dict):
            errors.append(f"{where}: must be an object")
            continue
        for key in ep:
            if key not in SERVICE_MONITOR_ENDPOINT:
                errors.append(f"{where}.{key}: unknown field")
        if not (isinstance(ep.get("port"), str) or "targetPort" in ep):
            errors.append(f"{where}: needs a named `port` (or targetPort)")
        for key in ("interval", "scrapeTimeout"):
            if key in ep and not (isinstance(ep[key], str) and DURATION.match(ep[key])):
                errors.append(f"{where}.{key}: {ep[key]!r} is not a Prometheus duration")
        if "scheme" in ep and ep["scheme"] not in ("http", "https", "HTTP", "HTTPS"):
            errors.append(f"{where}.scheme: {ep['scheme']!r} is not http or https")
        if "path" in ep and not (isinstance(ep["path"], str) and ep["path"].startswith("/")):
            errors.append(f"{where}.path: must start with /")
    return errors


PROMETHEUS_RULE_GROUP = {"name", "interval", "rules", "limit", "partial_response_strategy", "query_offset", "labels"}
PROMETHEUS_RULE = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}


def check_prometheus_rule(obj):
    """A PrometheusRule's groups and rules, structurally (no schema is at hand)."""
    errors = check_metadata(obj, True)
    for key in obj:
        if key not in ("apiVersion", "kind", "metadata", "spec"):
            errors.append(f"{key}: unknown field")
    spec = obj.get("spec")
    if not isinstance(spec, dict) or set(spec) - {"groups"}:
        return errors + ["spec: required object with only `groups`"]
    groups = spec.get("groups")
    if not isinstance(groups, list) or not groups:
        return errors + ["spec.groups: required non-empty list"]
    for i, g in enumerate(groups):
        where = f"spec.groups.{i}"
        if not isinstance(g, dict):
            errors.append(f"{where}: must be an object")
            continue
        for key in set(g) - PROMETHEUS_RULE_GROUP:
            errors.append(f"{where}.{key}: unknown field")
        if not isinstance(g.get("name"), str) or not g["name"]:
            errors.append(f"{where}.name: required string")
        rules = g.get("rules")
        if not isinstance(rules, list) or not rules:
            errors.append(f"{where}.rules: required non-empty list")
            continue
        for j, r in enumerate(rules):
            rw = f"{where}.rules.{j}"
            if not isinstance(r, dict):
                errors.append(f"{rw}: must be an object")
                continue
            for key in set(r) - PROMETHEUS_RULE:
                errors.append(f"{rw}.{key}: unknown field")
            if ("alert" in r) == ("record" in r):
                errors.append(f"{rw}: needs exactly one of alert and record")
            if not isinstance(r.get("expr"), (str, int)) or r.get("expr") == "":
                errors.append(f"{rw}.expr: required")
            for key in ("for", "keep_firing_for"):
                if key in r and not (isinstance(r[key], str) and DURATION.match(r[key])):
                    errors.append(f"{rw}.{key}: {r[key]!r} is not a Prometheus duration")
            for key in ("labels", "annotations"):
                if key in r and not (isinstance(r[key], dict) and all(isinstance(v, str) for v in r[key].values())):
                    errors.append(f"{rw}.{key}: must map names to strings")
    return errors


def validate(obj, crds, version):
    """(status, messages) for one object: status is "ok", "structural" or "error"."""
    if not isinstance(obj, dict):
        return "error", [f"not a mapping but {type(obj).__name__}"]
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    if not isinstance(api_version, str) or not isinstance(kind, str):
        return "error", ["apiVersion and kind are required strings"]
    crd = crds.get(kind)
    if crd is not None:
        errors = check_custom(obj, crd)
        return ("error", errors) if errors else ("ok", [f"against {crd.path}"])
    if kind == "ServiceMonitor" and api_version == "monitoring.coreos.com/v1":
        errors = check_service_monitor(obj)
        return ("error", errors) if errors else ("structural", [])
    if kind == "PrometheusRule" and api_version == "monitoring.coreos.com/v1":
        errors = check_prometheus_rule(obj)
        return ("error", errors) if errors else ("structural", [])
    try:
        got = kubernetes_validate.validate(obj, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        path = ".".join(str(p) for p in e.path) or "(root)"
        return "error", [f"{path}: {e.message} (Kubernetes {e.version})"]
    except kubernetes_validate.SchemaNotFoundError:
        return "error", [f"no schema for {api_version} {kind} in Kubernetes {version} and no --crd for it"]
    return "ok", [f"Kubernetes {got}"]


def describe(obj):
    if not isinstance(obj, dict):
        return "(not an object)"
    meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    ns = f"{meta['namespace']}/" if meta.get("namespace") else ""
    return f"{obj.get('kind', '?')} {ns}{meta.get('name', '?')}"


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="YAML files of Kubernetes objects; - for stdin")
    parser.add_argument("--crd", action="append", default=[], help="a CustomResourceDefinition file (repeatable)")
    parser.add_argument("--kubernetes-version", default=DEFAULT_VERSION)
    args = parser.parse_args(argv)

    crds = {}
    for path in args.crd:
        for doc in load_stream(path):
            crd = Crd(path, doc)
            crds[crd.kind] = crd

    failed = total = 0
    for path in args.files:
        docs = load_stream(path)
        if not docs:
            print(f"ERROR {path}: no objects")
            failed += 1
        for i, obj in enumerate(docs):
            total += 1
            status, messages = validate(copy.deepcopy(obj), crds, args.kubernetes_version)
            where = f"{path}#{i} {describe(obj)}"
            if status == "ok":
                print(f"ok    {where} ({'; '.join(messages)})")
            elif status == "structural":
                print(f"ok    {where}: checked structurally (no schema for {obj.get('kind')})")
            else:
                failed += 1
                for m in messages:
                    print(f"ERROR {where}: {m}")
    print(f"{total - failed} valid, {failed} invalid")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
