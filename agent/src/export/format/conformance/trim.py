"""Trims the upstream definitions to what the format conformance tests read.

    python3 trim.py ocsf COMPILED.json > ocsf-1.3.0.json
    python3 trim.py ecs ecs_flat.yml > ecs-8.11.0.json

COMPILED.json is OCSF 1.3.0 compiled by ocsf-lib (README.md says how); the
ECS file is generated/ecs/ecs_flat.yml of elastic/ecs at tag v8.11.0.
Descriptions are dropped; names, types, requirements, profiles and enum
captions are kept as they are upstream.
"""

import json
import sys

OCSF_CLASSES = ["network_activity", "dns_activity", "event_log"]


def ocsf_attributes(attributes):
    kept = {}
    for name, attr in sorted(attributes.items()):
        entry = {"type": attr["type"], "requirement": attr.get("requirement", "optional")}
        if attr.get("is_array"):
            entry["is_array"] = True
        if attr.get("profile"):
            entry["profile"] = attr["profile"]
        if attr.get("sibling"):
            entry["sibling"] = attr["sibling"]
        if attr.get("enum"):
            entry["enum"] = {k: v["caption"] for k, v in attr["enum"].items()}
        kept[name] = entry
    return kept


def ocsf(path):
    schema = json.load(open(path))
    objects = schema["objects"]
    wanted, todo = {}, []

    def reach(attributes):
        for attr in attributes.values():
            if attr["type"] in objects and attr["type"] not in wanted:
                wanted[attr["type"]] = None
                todo.append(attr["type"])

    classes = {}
    for name in OCSF_CLASSES:
        cls = schema["classes"][name]
        classes[name] = {
            "uid": cls["uid"],
            "caption": cls["caption"],
            "category_uid": schema["categories"][cls["category"]]["uid"],
            "attributes": ocsf_attributes(cls["attributes"]),
        }
        reach(cls["attributes"])
    while todo:
        reach(objects[todo.pop()]["attributes"])
    types = {}
    for name, t in schema["types"].items():
        types[name] = {k: t[k] for k in ("type", "regex", "max_len", "range") if t.get(k) is not None}
    return {
        "version": schema["version"],
        "classes": classes,
        "objects": {name: {"attributes": ocsf_attributes(objects[name]["attributes"])} for name in sorted(wanted)},
        "types": types,
    }


def ecs(path):
    import yaml

    flat = yaml.safe_load(open(path))
    fields = {}
    for name, field in sorted(flat.items()):
        entry = {"type": field["type"]}
        if "array" in field.get("normalize", []):
            entry["array"] = True
        if field.get("allowed_values"):
            entry["allowed_values"] = [v["name"] for v in field["allowed_values"]]
            expected = {v["name"]: v["expected_event_types"] for v in field["allowed_values"] if v.get("expected_event_types")}
            if expected:
                entry["expected_event_types"] = expected
        if field.get("expected_values"):
            entry["expected_values"] = field["expected_values"]
        fields[name] = entry
    return fields


if __name__ == "__main__":
    kind, path = sys.argv[1], sys.argv[2]
    data = ocsf(path) if kind == "ocsf" else ecs(path)
    json.dump(data, sys.stdout, indent=0, sort_keys=True)
    sys.stdout.write("\n")
