#!/usr/bin/env python3
"""Validates autoscaling manifests offline, strictly (an unknown or misspelt
field fails), for tests/e2e/tests/autoscaling.rs:

- Kubernetes kinds (HorizontalPodAutoscaler v2, ConfigMap, ...): the schemas
  shipped in the `kubernetes-validate` package, in its strict mode;
- KEDA's ScaledObject: the JSON schema of the `cloudcoil-models-keda` models
  (generated from KEDA's CRDs), with `additionalProperties: false` added to
  every object that lists its properties;
- prometheus-adapter's rules (the `config.yaml` of its ConfigMap): a schema
  written here from the adapter's configuration docs (it publishes none).

Usage: autoscaling.py FILE.yaml...  Prints one line per problem; exit 1 if any.

The same approach and packages as the deploy branch's
scripts/validate_manifests.py (Istio manifests): once both are in main, the
ScaledObject lookup and the adapter schema belong in that one script.
"""
import sys

import jsonschema
import kubernetes_validate
import yaml
from cloudcoil.models.keda.v1alpha1 import ScaledObject

# As scripts/validate_manifests.py (deploy): the Kubernetes the Istio files target.
K8S_VERSION = "1.30.0"

# docs/config-walkthrough.md and docs/config.md of kubernetes-sigs/prometheus-adapter.
ADAPTER_RULE = {
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
                        "properties": {"group": {"type": "string"}, "resource": {"type": "string"}},
                        "required": ["resource"],
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
    "properties": {
        key: {"type": "array", "items": ADAPTER_RULE}
        for key in ("rules", "externalRules")
    },
}


def strict(schema):
    """Every object schema that lists its properties allows no others."""
    if isinstance(schema, dict):
        if "properties" in schema and "additionalProperties" not in schema:
            schema["additionalProperties"] = False
        for value in schema.values():
            strict(value)
    elif isinstance(schema, list):
        for value in schema:
            strict(value)
    return schema


SCALED_OBJECT = strict(ScaledObject.model_json_schema(by_alias=True))


def errors(schema, doc):
    validator = jsonschema.Draft202012Validator(schema)
    for e in sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path)):
        where = ".".join(str(p) for p in e.absolute_path) or "(top)"
        yield f"{where}: {e.message}"


def check(doc):
    kind = doc.get("kind")
    if doc.get("apiVersion", "").startswith("keda.sh/") and kind == "ScaledObject":
        yield from errors(SCALED_OBJECT, doc)
        return
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = ".".join(str(p) for p in e.path) or "(top)"
        yield f"{where}: {e.message}"
    except (kubernetes_validate.SchemaNotFoundError, kubernetes_validate.InvalidSchemaError) as e:
        yield f"no Kubernetes schema: {e}"
    if kind == "ConfigMap" and "config.yaml" in (doc.get("data") or {}):
        config = yaml.safe_load(doc["data"]["config.yaml"])
        for e in errors(ADAPTER_CONFIG, config):
            yield f"data.config.yaml: {e}"


def main(paths):
    problems = 0
    for path in paths:
        with open(path) as f:
            docs = [d for d in yaml.safe_load_all(f) if d is not None]
        if not docs:
            print(f"{path}: no documents")
            problems += 1
        for i, doc in enumerate(docs):
            label = f"{path}#{i} {doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
            found = list(check(doc))
            for p in found:
                print(f"{label}: {p}")
            if not found:
                print(f"{label}: ok", file=sys.stderr)
            problems += len(found)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
