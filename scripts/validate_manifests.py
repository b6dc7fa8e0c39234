#!/usr/bin/env python3
"""Offline checks of Sluice's deployment files, strict: a misspelled field fails.

    validate_manifests.py k8s FILE...         Kubernetes and Istio manifests
    validate_manifests.py compose FILE        a compose file (prints its bind mounts as JSON)
    validate_manifests.py envoy-bootstraps FILE...
                                              the Envoy part of WasmPlugins and EnvoyFilters as
                                              bootstraps for `envoy --mode validate` (JSON list)
    validate_manifests.py oci-image DIR       what an OCI image layout holds (JSON): each
                                              blob checked against its digest, the manifest's
                                              layers and the files in each, with their sha256

Schemas come from packages (scripts/deps.sh installs them):
- Kubernetes kinds: `kubernetes-validate`, its "strict" schemas (every object
  closed with additionalProperties: false), for Kubernetes K8S_VERSION.
- Istio kinds: `cloudcoil-models-istio`, models generated from Istio's CRDs
  (Istio ISTIO_VERSION); their JSON schema is closed here the same way,
  except where the CRD itself leaves an object open (pluginConfig, the
  EnvoyFilter patch value, labels...).
- KEDA kinds (ScaledObject, ...): `cloudcoil-models-keda`, generated from
  KEDA's CRDs, closed the same way.
- Prometheus Operator kinds (PrometheusRule, ...):
  `cloudcoil-models-prometheus-operator`, generated from its CRDs, closed
  the same way.
- prometheus-adapter's rules (`config.yaml` of a ConfigMap with `rules` or
  `externalRules`): ADAPTER_CONFIG below, written from the adapter's
  configuration docs (it publishes no schema).
- compose: the compose-spec schema `check-jsonschema` ships (with its licence).

Exit status 1 and one line per problem (file, document, path) when invalid.
"""

import copy
import importlib
import json
import sys
from pathlib import Path

import jsonschema
import yaml

K8S_VERSION = "1.30.0"
ISTIO_VERSION = "1.24"  # cloudcoil-models-istio 1.24.2.x
KEDA_VERSION = "2.16"  # cloudcoil-models-keda 2.16.1.0
PROMETHEUS_OPERATOR_VERSION = "0.80"  # cloudcoil-models-prometheus-operator 0.80.1.0

# prometheus-adapter's configuration (docs/config.md of
# kubernetes-sigs/prometheus-adapter), closed like the rest.
_ADAPTER_RULE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["seriesQuery", "metricsQuery"],
    "properties": {
        "seriesQuery": {"type": "string"},
        "seriesFilters": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "properties": {"is": {"type": "string"}, "isNot": {"type": "string"}},
            },
        },
        "resources": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "template": {"type": "string"},
                "namespaced": {"type": "boolean"},
                "overrides": {
                    "type": "object",
                    "additionalProperties": {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["resource"],
                        "properties": {"group": {"type": "string"}, "resource": {"type": "string"}},
                    },
                },
            },
        },
        "name": {
            "type": "object",
            "additionalProperties": False,
            "properties": {"matches": {"type": "string"}, "as": {"type": "string"}},
        },
        "metricsQuery": {"type": "string"},
    },
}
ADAPTER_CONFIG = {
    "type": "object",
    "additionalProperties": False,
    "properties": {key: {"type": "array", "items": _ADAPTER_RULE} for key in ("rules", "externalRules")},
}


def documents(path):
    """(index, document) for each non-empty YAML document in the file."""
    with open(path) as f:
        for i, doc in enumerate(yaml.safe_load_all(f)):
            if doc is not None:
                yield i, doc


def describe(path, i, doc):
    meta = doc.get("metadata") or {}
    name = meta.get("name", "?")
    if meta.get("namespace"):
        name = f"{meta['namespace']}/{name}"
    return f"{path}#{i} {doc.get('kind', '?')} {name}"


def close_objects(schema):
    """additionalProperties: false on every object schema that lists its
    properties and says nothing about others. Objects without a property
    list (free-form maps such as pluginConfig or labels) stay open."""
    if isinstance(schema, dict):
        if schema.get("properties") and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        for value in schema.values():
            close_objects(value)
    elif isinstance(schema, list):
        for value in schema:
            close_objects(value)
    return schema


_istio_schemas = {}


def istio_schema(api_version, kind):
    """The strict JSON schema of an Istio or KEDA kind, or None if neither."""
    group, _, version = api_version.partition("/")
    if not version:
        return None
    if group.endswith(".istio.io"):
        module_name, source = f"cloudcoil.models.istio.{group.split('.')[0]}.{version}", f"Istio {ISTIO_VERSION}"
    elif group == "keda.sh":
        module_name, source = f"cloudcoil.models.keda.{version}", f"KEDA {KEDA_VERSION}"
    elif group == "monitoring.coreos.com":
        module_name = f"cloudcoil.models.prometheus_operator.{version}"
        source = f"Prometheus Operator {PROMETHEUS_OPERATOR_VERSION}"
    else:
        return None
    key = (api_version, kind)
    if key not in _istio_schemas:
        try:
            module = importlib.import_module(module_name)
            model = getattr(module, kind)
        except (ImportError, AttributeError):
            raise LookupError(f"no schema for {kind} {api_version} in {source}")
        schema = model.model_json_schema(by_alias=True, mode="validation")
        _istio_schemas[key] = close_objects(copy.deepcopy(schema))
    return _istio_schemas[key]


def schema_source(api_version):
    if api_version.startswith("keda.sh/"):
        return f"KEDA {KEDA_VERSION}"
    if api_version.startswith("monitoring.coreos.com/"):
        return f"Prometheus Operator {PROMETHEUS_OPERATOR_VERSION}"
    return f"Istio {ISTIO_VERSION}"


def json_path(error):
    return "$" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in error.absolute_path)


def problem(where, error):
    """One line for an error. Optional fields are `anyOf: [schema, null]`, so
    the useful error is the deepest one inside (`best_match` finds it)."""
    error = jsonschema.exceptions.best_match([error])
    message = error.message if len(error.message) <= 300 else error.message[:300] + "..."
    return f"{where}: {json_path(error)}: {message}"


def validate_k8s(paths):
    problems = []
    for path in paths:
        for i, doc in documents(path):
            where = describe(path, i, doc)
            api_version, kind = doc.get("apiVersion", ""), doc.get("kind", "")
            try:
                schema = istio_schema(api_version, kind)
            except LookupError as e:
                problems.append(f"{where}: {e}")
                continue
            if schema is not None:
                validator = jsonschema.Draft202012Validator(schema)
                errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
                problems.extend(problem(where, e) for e in errors)
                if not errors:
                    source = schema_source(api_version)
                    print(f"ok {where} ({source})")
                continue
            try:
                validator = k8s_validator(api_version, kind)
            except FileNotFoundError:
                problems.append(f"{where}: no schema for {kind} {api_version} in Kubernetes {K8S_VERSION}")
                continue
            errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
            problems.extend(problem(where, e) for e in errors)
            if not errors:
                print(f"ok {where} (Kubernetes {K8S_VERSION}, strict)")
            adapter = adapter_config(doc)
            if adapter is not None:
                validator = jsonschema.Draft202012Validator(ADAPTER_CONFIG)
                errors = sorted(validator.iter_errors(adapter), key=lambda e: list(e.absolute_path))
                problems.extend(problem(f"{where} data.config.yaml", e) for e in errors)
                if not errors:
                    print(f"ok {where} data.config.yaml (prometheus-adapter rules)")
    return problems


def adapter_config(doc):
    """The prometheus-adapter configuration a ConfigMap holds, or None."""
    if doc.get("kind") != "ConfigMap":
        return None
    text = (doc.get("data") or {}).get("config.yaml")
    config = yaml.safe_load(text) if text else None
    if isinstance(config, dict) and ({"rules", "externalRules"} & config.keys()):
        return config
    return None


def k8s_validator(api_version, kind):
    """A validator for every error (kubernetes_validate.validate stops at the
    first) on kubernetes-validate's strict schema of the kind."""
    import re

    from kubernetes_validate.utils import schema_contents
    from referencing import Registry, Resource

    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    schema_dir = f"kubernetes-json-schema/v{K8S_VERSION}-local-strict"
    schema = schema_contents(f"{schema_dir}/{kind.lower()}-{group_version}.json", K8S_VERSION)
    definitions = schema_contents(f"{schema_dir}/_definitions.json", K8S_VERSION)
    registry = Resource.from_contents(definitions) @ (Resource.from_contents(schema) @ Registry())
    return jsonschema.Draft202012Validator(schema, registry=registry)


def compose_schema():
    from importlib.resources import files

    vendor = files("check_jsonschema.builtin_schemas.vendor")
    return json.loads((vendor / "compose-spec.json").read_text())


def validate_compose(path):
    with open(path) as f:
        doc = yaml.safe_load(f)
    schema = compose_schema()
    cls = jsonschema.validators.validator_for(schema)
    problems = [
        problem(path, e)
        for e in sorted(cls(schema).iter_errors(doc), key=lambda e: list(e.absolute_path))
    ]
    mounts = []
    for name, service in (doc.get("services") or {}).items():
        for volume in service.get("volumes") or []:
            source = volume.get("source") if isinstance(volume, dict) else volume.split(":")[0]
            if source and source.startswith((".", "/")):
                mounts.append({"service": name, "source": source})
    print(json.dumps({"services": sorted(doc.get("services") or {}), "bind_mounts": mounts}))
    return problems


# --- The Envoy part of Istio resources, as bootstraps -----------------------

WASM = "@WASM@"  # replaced by the caller with the built module


def _listener(name, port, http_filters, hcm_extra=None):
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": name,
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "app",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "app"}}],
                }
            ]
        },
        "http_filters": http_filters
        + [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    hcm.update(hcm_extra or {})
    return {
        "name": name,
        "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
        "filter_chains": [
            {"filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": hcm}]}
        ],
    }


def _cluster(name, http2=False):
    cluster = {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [
                {"lb_endpoints": [{"endpoint": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 1}}}}]}
            ],
        },
    }
    if http2:
        cluster["typed_extension_protocol_options"] = {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        }
    return cluster


def _bootstrap(listeners, sync_cluster=None, ads=False):
    clusters = [_cluster("app")]
    if sync_cluster:
        # What Istio creates from the sluice-sync Service (port named grpc).
        clusters.append(_cluster(sync_cluster, http2=True))
    bootstrap = {
        "node": {"id": "sidecar~10.0.0.1~demo.demo~demo.svc.cluster.local", "cluster": "demo.demo"},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}}},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }
    if ads:
        clusters.append(_cluster("xds-grpc", http2=True))
        bootstrap["dynamic_resources"] = {
            "ads_config": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": "xds-grpc"}}],
            }
        }
    return bootstrap


def _with_local_code(wasm_config):
    """The Wasm filter config with its module read from WASM, as istio-agent
    does after pulling the oci:// or https:// module."""
    wasm_config = copy.deepcopy(wasm_config)
    wasm_config["config"]["vm_config"]["code"] = {"local": {"filename": WASM}}
    return wasm_config


def _sync_cluster(configuration_json):
    return (json.loads(configuration_json).get("sync") or {}).get("cluster")


def envoy_bootstraps(paths):
    out = []
    for path in paths:
        for i, doc in documents(path):
            where = describe(path, i, doc)
            kind, spec = doc.get("kind"), doc.get("spec") or {}
            if kind == "WasmPlugin":
                configuration = json.dumps(spec.get("pluginConfig") or {})
                wasm = {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.wasm.v3.Wasm",
                    "config": {
                        "name": doc["metadata"]["name"],
                        "root_id": spec.get("pluginName", ""),
                        "vm_config": {"runtime": "envoy.wasm.runtime.v8", "code": {}},
                        "configuration": {
                            "@type": "type.googleapis.com/google.protobuf.StringValue",
                            "value": configuration,
                        },
                    },
                }
                listener = _listener("inbound", 15006, [{"name": "sluice", "typed_config": _with_local_code(wasm)}])
                out.append({"name": where, "bootstrap": _bootstrap([listener], _sync_cluster(configuration))})
            elif kind == "EnvoyFilter":
                patches = spec.get("configPatches") or []
                extensions = [p["patch"]["value"] for p in patches if p.get("applyTo") == "EXTENSION_CONFIG"]
                http_filters = [p["patch"]["value"] for p in patches if p.get("applyTo") == "HTTP_FILTER"]
                hcm_merges = [
                    p["patch"]["value"]
                    for p in patches
                    if p.get("applyTo") == "NETWORK_FILTER" and p["patch"].get("operation") == "MERGE"
                ]
                listener_merges = [
                    p["patch"]["value"]
                    for p in patches
                    if p.get("applyTo") == "LISTENER" and p["patch"].get("operation") == "MERGE"
                ]
                listeners, sync = [], None
                for n, extension in enumerate(extensions):
                    typed = _with_local_code(extension["typed_config"])
                    sync = sync or _sync_cluster(typed["config"]["configuration"]["value"])
                    # The extension config inline, as the filter ECDS delivers.
                    listeners.append(_listener(f"extension_{n}", 16000 + n, [{"name": extension["name"], "typed_config": typed}]))
                if http_filters:
                    # The HTTP_FILTER patches as they are (config_discovery over ADS).
                    listeners.append(_listener("http_filters", 17000, http_filters))
                for n, value in enumerate(hcm_merges):
                    extra = {k: v for k, v in value["typed_config"].items() if k != "@type"}
                    listener = _listener(f"merged_hcm_{n}", 18000 + n, [], extra)
                    for merge in listener_merges:
                        listener.update(merge)
                    listeners.append(listener)
                if not listeners:
                    continue
                out.append({"name": where, "bootstrap": _bootstrap(listeners, sync, ads=bool(http_filters))})
    print(json.dumps(out))
    return []


def oci_image(layout):
    import gzip
    import hashlib
    import io
    import tarfile

    layout = Path(layout)
    problems = []

    def blob(digest):
        algorithm, _, hex_digest = digest.partition(":")
        data = (layout / "blobs" / algorithm / hex_digest).read_bytes()
        if hashlib.sha256(data).hexdigest() != hex_digest:
            problems.append(f"{layout}: blob {digest} does not match its digest")
        return data

    index = json.loads((layout / "index.json").read_text())
    images = []
    for descriptor in index["manifests"]:
        manifest = json.loads(blob(descriptor["digest"]))
        layers = []
        for layer in manifest["layers"]:
            data = blob(layer["digest"])
            files = []
            if layer["mediaType"].endswith("tar+gzip"):
                with tarfile.open(fileobj=io.BytesIO(gzip.decompress(data))) as tar:
                    for member in tar.getmembers():
                        entry = {"name": member.name, "type": "file" if member.isfile() else "other"}
                        if member.isfile():
                            content = tar.extractfile(member).read()
                            entry["sha256"] = hashlib.sha256(content).hexdigest()
                            entry["size"] = len(content)
                        files.append(entry)
            layers.append({"media_type": layer["mediaType"], "digest": layer["digest"], "files": files})
        images.append(
            {
                "digest": descriptor["digest"],
                "ref_name": (descriptor.get("annotations") or {}).get("org.opencontainers.image.ref.name"),
                "manifest_media_type": descriptor.get("mediaType"),
                "config_media_type": manifest["config"]["mediaType"],
                "layers": layers,
            }
        )
    print(json.dumps({"oci_layout": json.loads((layout / "oci-layout").read_text()), "images": images}))
    return problems


def main(argv):
    if len(argv) == 2 and argv[0] == "oci-image":
        problems = oci_image(argv[1])
        for problem in problems:
            print(problem, file=sys.stderr)
        return 1 if problems else 0
    if len(argv) < 2 or argv[0] not in ("k8s", "compose", "envoy-bootstraps"):
        print(__doc__, file=sys.stderr)
        return 2
    command, paths = argv[0], argv[1:]
    for path in paths:
        if not Path(path).is_file():
            print(f"{path}: no such file", file=sys.stderr)
            return 2
    if command == "k8s":
        problems = validate_k8s(paths)
    elif command == "compose":
        problems = validate_compose(paths[0])
    else:
        problems = envoy_bootstraps(paths)
    for problem in problems:
        print(problem, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
