#!/usr/bin/env python3
"""Render a Kustomize directory, for CI machines without kubectl or kustomize.

It implements the subset of Kustomize that deploy/k8s uses, and refuses
anything else rather than render it wrongly:

  resources   files and directories (which must hold a kustomization.yaml)
  namespace   set on every resource
  images      name -> newName / newTag / digest, on (init)containers of pod templates
  patches     JSON 6902 patches (a YAML list of add / replace / remove / test
              operations) from `path` or inline `patch`, with a kind/name target

deploy/check.sh compares its output with `kubectl kustomize` where kubectl
exists, so the subset is held to the real thing.

usage: kustomize_lite.py DIR   (prints the resources as a YAML stream)
"""
import copy
import os
import sys

import yaml

SUPPORTED = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}


class KustomizeError(Exception):
    pass


def load_yaml_docs(path):
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def kustomization_file(directory):
    for name in ("kustomization.yaml", "kustomization.yml", "Kustomization"):
        p = os.path.join(directory, name)
        if os.path.isfile(p):
            return p
    raise KustomizeError(f"no kustomization.yaml in {directory}")


def pointer_tokens(path):
    if path == "":
        return []
    if not path.startswith("/"):
        raise KustomizeError(f"JSON pointer must start with '/': {path!r}")
    return [t.replace("~1", "/").replace("~0", "~") for t in path[1:].split("/")]


def resolve_parent(doc, tokens, path):
    node = doc
    for t in tokens[:-1]:
        if isinstance(node, list):
            try:
                node = node[int(t)]
            except (ValueError, IndexError):
                raise KustomizeError(f"patch path {path!r}: no element {t!r}")
        elif isinstance(node, dict):
            if t not in node:
                raise KustomizeError(f"patch path {path!r}: no member {t!r}")
            node = node[t]
        else:
            raise KustomizeError(f"patch path {path!r}: {t!r} is inside a scalar")
    return node


def apply_op(doc, op):
    kind = op.get("op")
    path = op.get("path")
    if kind not in ("add", "replace", "remove", "test") or path is None:
        raise KustomizeError(f"unsupported patch operation {op!r}")
    tokens = pointer_tokens(path)
    if not tokens:
        raise KustomizeError("patching the whole document is not supported")
    parent = resolve_parent(doc, tokens, path)
    last = tokens[-1]
    if isinstance(parent, list):
        if last == "-" and kind == "add":
            parent.append(copy.deepcopy(op["value"]))
            return
        try:
            i = int(last)
        except ValueError:
            raise KustomizeError(f"patch path {path!r}: {last!r} is no index")
        if kind == "add":
            if not 0 <= i <= len(parent):
                raise KustomizeError(f"patch path {path!r}: index out of range")
            parent.insert(i, copy.deepcopy(op["value"]))
            return
        if not 0 <= i < len(parent):
            raise KustomizeError(f"patch path {path!r}: index out of range")
        if kind == "replace":
            parent[i] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del parent[i]
        elif parent[i] != op["value"]:
            raise KustomizeError(f"test failed at {path!r}")
        return
    if not isinstance(parent, dict):
        raise KustomizeError(f"patch path {path!r}: parent is a scalar")
    if kind == "add":
        parent[last] = copy.deepcopy(op["value"])
    elif last not in parent:
        raise KustomizeError(f"patch path {path!r}: no member {last!r} to {kind}")
    elif kind == "replace":
        parent[last] = copy.deepcopy(op["value"])
    elif kind == "remove":
        del parent[last]
    elif parent[last] != op["value"]:
        raise KustomizeError(f"test failed at {path!r}")


def matches(target, res):
    for key in ("kind", "name", "namespace", "group", "version"):
        if key not in target:
            continue
        want = target[key]
        if key == "name":
            have = res.get("metadata", {}).get("name")
        elif key == "namespace":
            have = res.get("metadata", {}).get("namespace")
        elif key == "kind":
            have = res.get("kind")
        else:
            api = res.get("apiVersion", "")
            group, _, version = api.rpartition("/")
            have = group if key == "group" else version
        if have != want:
            return False
    unsupported = set(target) - {"kind", "name", "namespace", "group", "version"}
    if unsupported:
        raise KustomizeError(f"unsupported patch target fields {sorted(unsupported)}")
    return True


def split_image(image):
    """name, tag, digest of an image reference."""
    digest = None
    if "@" in image:
        image, digest = image.split("@", 1)
    tag = None
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        image, tag = image[:colon], image[colon + 1:]
    return image, tag, digest


def set_images(res, images):
    spec = res.get("spec", {})
    pod = spec.get("template", {}).get("spec") if "template" in spec else None
    if res.get("kind") == "Pod":
        pod = spec
    if not pod:
        return
    for key in ("initContainers", "containers"):
        for c in pod.get(key, []) or []:
            name, tag, digest = split_image(c.get("image", ""))
            for img in images:
                if img.get("name") != name:
                    continue
                new_name = img.get("newName", name)
                if "digest" in img:
                    c["image"] = f"{new_name}@{img['digest']}"
                elif "newTag" in img:
                    c["image"] = f"{new_name}:{img['newTag']}"
                else:
                    ref = new_name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
                    c["image"] = ref
                break


CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PersistentVolume", "StorageClass", "PriorityClass", "APIService"}


def build(directory):
    kpath = kustomization_file(directory)
    (k,) = load_yaml_docs(kpath)
    unknown = set(k) - SUPPORTED
    if unknown:
        raise KustomizeError(f"{kpath}: unsupported fields {sorted(unknown)}")
    resources = []
    for entry in k.get("resources", []) or []:
        p = os.path.normpath(os.path.join(directory, entry))
        if os.path.isdir(p):
            resources.extend(build(p))
        elif os.path.isfile(p):
            resources.extend(load_yaml_docs(p))
        else:
            raise KustomizeError(f"{kpath}: resource {entry!r} not found")
    for patch in k.get("patches", []) or []:
        if "path" in patch:
            ops = load_yaml_docs(os.path.join(directory, patch["path"]))
            ops = ops[0] if len(ops) == 1 else ops
        elif "patch" in patch:
            ops = yaml.safe_load(patch["patch"])
        else:
            raise KustomizeError(f"{kpath}: a patch needs path or patch")
        if not isinstance(ops, list):
            raise KustomizeError(f"{kpath}: only JSON 6902 patches (a list of operations) are supported")
        target = patch.get("target")
        if not target:
            raise KustomizeError(f"{kpath}: a JSON 6902 patch needs a target")
        hits = [r for r in resources if matches(target, r)]
        if not hits:
            raise KustomizeError(f"{kpath}: patch target {target} matches no resource")
        for r in hits:
            for op in ops:
                apply_op(r, op)
    if k.get("images"):
        for r in resources:
            set_images(r, k["images"])
    if k.get("namespace"):
        for r in resources:
            if r.get("kind") not in CLUSTER_SCOPED:
                r.setdefault("metadata", {})["namespace"] = k["namespace"]
    return resources


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    try:
        docs = build(sys.argv[1])
    except KustomizeError as e:
        sys.exit(f"kustomize_lite: {e}")
    yaml.safe_dump_all(docs, sys.stdout, sort_keys=True)


if __name__ == "__main__":
    main()
