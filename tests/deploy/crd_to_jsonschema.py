"""Turn a CustomResourceDefinition's openAPIV3Schema into a strict JSON Schema file for tests/deploy.

Used once to make ``schemas/crd/scaledobject-keda-v1alpha1.json`` from KEDA's CRD
(``config/crd/bases/keda.sh_scaledobjects.yaml`` of kedacore/keda, tag v2.20.2). Run it again when KEDA is bumped:

    python tests/deploy/crd_to_jsonschema.py keda.sh_scaledobjects.yaml v1alpha1 \
        tests/deploy/schemas/crd/scaledobject-keda-v1alpha1.json --source "kedacore/keda v2.20.2"

The API server prunes unknown fields of a structural schema and ``kubectl apply --validate=strict`` rejects them, so
the JSON Schema is made strict the same way the copied Kubernetes schemas are (``additionalProperties: false`` on every
object that lists its properties and does not say ``x-kubernetes-preserve-unknown-fields``).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import yaml


def convert(node: Any) -> Any:
    if isinstance(node, list):
        return [convert(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: convert(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node:
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if "format" in out and out.get("type") in ("integer", "number"):
        out.pop("format")  # int32/int64/double: jsonschema would ignore them anyway
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("crd_yaml")
    ap.add_argument("version")
    ap.add_argument("out")
    ap.add_argument("--source", required=True, help="where the CRD came from, recorded in the schema")
    args = ap.parse_args()
    with open(args.crd_yaml, encoding="utf-8") as f:
        crd = yaml.safe_load(f)
    group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
    (ver,) = [v for v in crd["spec"]["versions"] if v["name"] == args.version]
    schema = convert(ver["schema"]["openAPIV3Schema"])
    schema["properties"]["apiVersion"]["enum"] = [f"{group}/{args.version}"]
    schema["properties"]["kind"]["enum"] = [kind]
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind", "metadata", "spec"})
    schema = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "$comment": f"Converted by tests/deploy/crd_to_jsonschema.py from the CRD {crd['metadata']['name']} "
        f"({args.source}, Apache-2.0), version {args.version}.",
        **schema,
    }
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(schema, f, indent=1, sort_keys=False)
        f.write("\n")


if __name__ == "__main__":
    main()
