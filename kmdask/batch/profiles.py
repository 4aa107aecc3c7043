"""Cluster profiles (``cluster.yaml``): where a job computes. A profile body holds dask's own
settings under ``config:``; :mod:`kmdask.batch.cluster` turns it into a connection."""

from __future__ import annotations

import copy
import os
from pathlib import Path

from kmdask.batch.checks import Checker, load_yaml
from kmdask.errors import ConfigError

PROFILE_KINDS = ("local", "address", "slurm", "pbs")
_PROFILE_KEYS = {"kind", "description", "n_workers", "threads_per_worker", "memory_limit",
                 "host", "dashboard_address", "address", "scheduler_file", "timeout", "scale",
                 "adapt", "config", "security", "submit", "storage_options"}


def deep_merge(base: dict, extra: dict) -> dict:
    """Merge ``extra`` into a copy of ``base``, recursing into nested mappings."""
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def default_cluster_file() -> Path:
    """``$KMDASK_CLUSTER_FILE``, else ``./cluster.yaml``."""
    return Path(os.environ.get("KMDASK_CLUSTER_FILE", "cluster.yaml"))


def load_profile(name: str | None = None, cluster_file: str | Path | None = None,
                 address: str | None = None) -> dict:
    """The named profile (``--profile``, else ``$KMDASK_PROFILE``, else the file's ``default``),
    with ``base`` settings deep-merged under it. Returns a plain dict with ``name`` added.

    With ``address`` (``--address``) and no profile or cluster file asked for anywhere, a
    missing ``./cluster.yaml`` is no error: the profile is that scheduler's, with the address
    kind's defaults (a user with only a running scheduler needs no profile file)."""
    path = Path(cluster_file) if cluster_file else default_cluster_file()
    implicit = not (cluster_file or os.environ.get("KMDASK_CLUSTER_FILE"))  # ./cluster.yaml
    if implicit and not path.exists():
        if address and not (name or os.environ.get("KMDASK_PROFILE")):
            return {"name": "address", "kind": "address", "address": address}
        raise ConfigError(f"{path}: no such file (run from a directory that has one, give "
                          "--cluster-file FILE, or --address tcp://HOST:PORT for a running "
                          "scheduler)")
    doc = load_yaml(path)
    c = Checker(path)
    c.mapping(doc, "", {"default", "base", "profiles"})
    profiles = c.mapping(doc.get("profiles"), "profiles", set(doc.get("profiles") or {}))
    name = name or os.environ.get("KMDASK_PROFILE") or doc.get("default") or "local"
    if name not in profiles:
        raise ConfigError(f"{path}: profiles.{name}: no such profile (have: "
                          f"{', '.join(sorted(profiles))})")
    body = c.mapping(profiles[name], f"profiles.{name}", _PROFILE_KEYS)
    base = doc.get("base") or {}
    merged = deep_merge(c.mapping(base, "base", _PROFILE_KEYS), body)
    c.string(merged.get("kind"), f"profiles.{name}.kind", PROFILE_KINDS)
    if "storage_options" in merged:  # fsspec's options for s3:// and gs:// data (credentials)
        c.mapping(merged["storage_options"], f"profiles.{name}.storage_options",
                  set(merged["storage_options"] or {}))
    merged["name"] = name
    merged["source"] = str(path)
    return merged
