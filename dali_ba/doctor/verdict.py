"""Rank 0's verdict: every rank's problems, and those only the whole job shows, merged so that the
same problem on many ranks is one line."""

from __future__ import annotations

from dali_ba.doctor.findings import Problem, ranges, unique


def judge(ranks: list[dict | None], recipe, hosts: list[str]) -> list[Problem]:
    """Every rank's own problems, and those only the whole job shows: lost ranks, versions that differ,
    a GPU on some ranks only, two ranks on one GPU, too few cores per rank, data or an output folder
    that differs between nodes. Identical problems of many ranks become one."""
    from dali_ba.distributed.placement import GpuPlacement, gpu_sharing_error

    present = [r for r in ranks if r is not None]
    problems: list[Problem] = [
        Problem(**{**p, "ranks": [r["rank"]], "nodes": [r["host"]]}) for r in present for p in r["problems"]
    ]

    def add(level: str, check: str, text: str, where: list[dict]) -> None:
        problems.append(Problem(level, check, text, [r["rank"] for r in where], unique(r["host"] for r in where)))

    missing = [rank for rank, r in enumerate(ranks) if r is None]
    if missing:
        problems.append(
            Problem(
                "fail",
                "ranks",
                f"rank{'s' if len(missing) > 1 else ''} {ranges(missing)} did not report "
                "within --timeout (crashed, or a check hung there: a data path on a stalled file "
                "system?) — see its own output; raise --timeout if its checks are merely slow",
                missing,
                unique(hosts[rank] for rank in missing),
            )
        )
    horovod_engine = any((r.get("engine") or {}).get("engine") == "horovod" for r in present)
    for name, level in (
        ("torch", "fail"),
        ("torchvision", "fail"),
        ("dali-ba", "fail"),
        ("python", "warn"),
        ("dali", "warn"),
        ("horovod", "fail" if horovod_engine else "warn"),
    ):
        values: dict[str, list[dict]] = {}
        for r in present:
            values.setdefault(str(_version_of(r, name)), []).append(r)
        if len(values) > 1:
            spread = ", ".join(
                f"{value} on {', '.join(unique(r['host'] for r in where))}" for value, where in values.items()
            )
            others = [r for where in list(values.values())[1:] for r in where]  # those unlike the first rank
            add(
                level,
                "versions",
                f"{name} differs between ranks ({spread}) — install one environment for every node "
                "(a virtualenv on the shared file system)",
                others,
            )
    gpus = [r for r in present if str(r.get("device", "")).startswith("cuda")]
    if gpus and len(gpus) < len(present):
        add(
            "fail",
            "gpu",
            "some ranks see no GPU while others train on one — request GPUs on every node "
            "(--gpus-per-node), or run CPU-only everywhere (CUDA_VISIBLE_DEVICES=)",
            [r for r in present if r not in gpus],
        )
    places = [GpuPlacement(r["host"], r.get("gpu_index"), r.get("gpu_uuid"), r.get("visible_gpus")) for r in present]
    sharing = gpu_sharing_error(places, recipe.run.share_gpu) if len(present) == len(ranks) else None
    if sharing:
        gpu_of = [(r["host"], r.get("gpu_uuid")) for r in present]
        add("fail", "gpu", sharing, [r for r, gpu in zip(present, gpu_of) if gpu[1] and gpu_of.count(gpu) > 1])
    threads = recipe.data.dali_threads
    shares = cores_per_rank(present)
    for cores in sorted({share for host in shares.values() for share in host.values() if share < threads}):
        add(
            "warn",
            "cores",
            f"{cores} core{'s' if cores != 1 else ''} per rank for --dali-threads {threads} (DALI's "
            "threads, and as many view threads on the CPU path) — give each rank more cores (srun "
            "--cpus-per-task; mpirun binds a rank to one core unless told --bind-to none), or lower "
            f"--dali-threads to {max(1, cores)}",
            [r for r in present if shares.get(r["host"], {}).get(r["rank"]) == cores],
        )
    nodes = [r for r in present if r.get("first_on_node")]
    for split in ("train", "val"):
        counts = {
            r["host"]: r["data"][split]["samples"]
            for r in nodes
            if (r.get("data") or {}).get(split, {}).get("readable")
        }
        if len(set(counts.values())) > 1:
            spread = ", ".join(f"{count} samples on {host}" for host, count in counts.items())
            add("fail", "data", f"--{split} differs between nodes ({spread}) — give every node the same data", nodes)
    blind = [r for r in nodes if (r.get("output") or {}).get("shared") is False]
    if blind:
        add(
            "fail",
            "output",
            f"--output {blind[0]['output']['path']} here is not the folder rank 0 writes (its files "
            "are not visible: a node-local disk?) — put --output on a file system every node shares",
            blind,
        )
    return merge(problems)


def cores_per_rank(present: list[dict]) -> dict[str, dict[int, int]]:
    """host -> {rank: cores it can count on}: its own CPU set, or its share of the CPUs the node's
    ranks can use together, whichever is smaller."""
    out: dict[str, dict[int, int]] = {}
    for r in present:
        if "cpus" in r:
            node = {cpu for x in present if x["host"] == r["host"] for cpu in x.get("cpus", [])}
            out.setdefault(r["host"], {})[r["rank"]] = min(len(r["cpus"]), len(node) // max(1, r["local_size"]))
    return out


def merge(problems: list[Problem]) -> list[Problem]:
    """One problem per (level, check, text), with all its ranks and nodes; failures first."""
    merged: dict[tuple[str, str, str], Problem] = {}
    for p in problems:
        key = (p.level, p.check, p.text)
        if key in merged:
            merged[key].ranks = sorted(set(merged[key].ranks) | set(p.ranks))
            merged[key].nodes = unique([*merged[key].nodes, *p.nodes])
        else:
            merged[key] = Problem(p.level, p.check, p.text, sorted(p.ranks), list(p.nodes))
    return sorted(merged.values(), key=lambda p: p.level != "fail")


def _version_of(r: dict, name: str) -> str | None:
    if name == "dali":
        dali = r.get("dali") or {}
        return f"{dali.get('package')} {dali.get('version')}" if dali.get("version") else None
    if name == "horovod":
        return (r.get("horovod") or {}).get("version")
    if name == "dali-ba":
        return r.get("dali_ba")
    return r.get(name)
