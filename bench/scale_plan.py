"""Goal 4: the export plan at 1000-rank scale, computed by the code every rank runs at attach.

For each layout, every rank's description is built from shape-only stand-ins (`scale_shapes`:
what `plan.local_shards` returns on a live model), passed through the real `plan.describe`,
grouped the way `gather.gather_classes` moves them (each distinct description once), and
planned with the real `plan.plan_units` (expert units grouped by `plan.expert_group`, as the
exporter does). Reported per layout and inference TP:

* planning time and peak Python memory of `plan_units` (what each rank runs once, at attach);
* gathered description bytes per rank, now and with the former all-gather of every rank's
  description (what every rank received before);
* bytes each rank sends, receives and writes (max / mean over all ranks; writes = HF +
  TensorRT-LLM bytes in bfloat16), point-to-point messages, and the writer imbalance
  (max / mean written) beside its floor: the largest unit group's bytes / mean, which no choice
  of whole-unit writers can beat;
* the projected export time at a stated per-rank disk and network bandwidth;
* planning time and gathered bytes as DP grows (same units, more ranks): O(units), not O(ranks).

Each layout is planned under three split policies (`plan.SplitPolicy`, default threshold: 1.5x
the mean bytes per rank): ``none`` (every unit written whole by one rank), ``vocab`` (the vocabulary
tables written by row ranges) and ``rows`` (every matrix `row_split` admits for these families:
vocabulary tables, QKV, gated fc1, row-parallel linears, MLA projections; stacked experts stay
whole, their group shares one writer). A split unit's ranges count its written bytes by their
share of rows.

    python -m bench.scale_plan [--disk-gbps 2] [--net-gbps 25] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import pickle
import statistics
import time
import tracemalloc

from bench.goals import goal_line
from bench.scale_shapes import Layout, by_position, deepseek_v3_671b, llama3_405b, rank_locals, written_bytes
from megatron_trt_ext.plan import SplitPolicy, describe, expert_group, group_ranks, main_mask, plan_units

GB = 1e9


def descriptions_for(tensors: list, info: dict, layout: Layout) -> list:
    index = by_position(tensors, info, layout)
    return [describe(rank_locals(index, layout, rank)) for rank in range(layout.world)]


def gathered_bytes(descriptions: list, classes: list) -> tuple:
    """(bytes each rank receives now, bytes it received with the former all-gather of every
    rank's full description)."""
    table = sum(len(pickle.dumps((None, b"0" * 16, main_mask(main)))) for _, main in descriptions)
    now = table + sum(len(pickle.dumps(c.pieces)) for c in classes)
    before = sum(len(pickle.dumps({name: [(rank, off, shp, gshape, dtype, flag)]
                                   for (name, off, shp, gshape, dtype), flag in zip(pieces, main)}))
                 for rank, (pieces, main) in enumerate(descriptions))
    return now, before


def split_policy(name: str, by_name: dict):
    """The `plan.SplitPolicy` of a policy name (see the module docstring); None for ``none``."""
    if name == "none":
        return None
    if name == "vocab":
        return SplitPolicy(lambda n: by_name[n].kind == "vocab")
    if name == "rows":
        return SplitPolicy(lambda n: len(by_name[n].shape) == 2)  # experts: grouped, never cut
    raise ValueError(f"unknown split policy {name!r}")


def plan(classes: list, group_key=expert_group, split=None) -> tuple:
    """(units, seconds, peak bytes) of one rank's planning: the median of three timed runs, then
    once more under tracemalloc (which slows allocation) for the memory."""
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        units = plan_units(classes, group_key=group_key, split=split)
        times.append(time.perf_counter() - t0)
    seconds = statistics.median(times)
    tracemalloc.start()
    plan_units(classes, group_key=group_key, split=split)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return units, seconds, peak


def group_key_for(info: dict, inference_tp: int):
    """As the exporter groups units for a TensorRT-LLM export: experts stacked by one inference
    rank share a writer. MoE inference here is expert-parallel over the TP ranks (moe_ep = TP)."""
    if "experts" not in info:
        return expert_group
    per_group = info["experts"] // inference_tp
    return lambda name: expert_group(name, per_group)


def traffic(units: list, by_name: dict, info: dict, world: int, inference_tp: int, group_key) -> dict:
    send, recv, write = [0] * world, [0] * world, [0] * world
    messages = 0
    groups: dict = {}
    for unit in units:
        size = 2  # bfloat16
        for piece in unit.pieces:
            if not unit.local_to_writer(piece):
                nbytes = size
                for s in piece.shape:
                    nbytes *= s
                send[piece.rank] += nbytes
                recv[unit.writer] += nbytes
                messages += 1
        tensor = by_name[unit.name]
        written = written_bytes(tensor, info, inference_tp)
        key = group_key(unit.name)
        if unit.rows is not None:  # a range of a split unit: its share of the rows, a group of its own
            written = written * (unit.rows[1] - unit.rows[0]) // tensor.shape[0]
            key = (unit.name, unit.rows)
        write[unit.writer] += written
        groups[key] = groups.get(key, 0) + written
    mean = statistics.mean(write)
    return {"send": send, "recv": recv, "write": write, "messages": messages,
            "imbalance": max(write) / mean, "floor": max(groups.values()) / mean,
            "writers": sum(1 for w in write if w)}


def scenario(label: str, model, layout: Layout, inference_tps: list, disk: float, net: float,
             policies: tuple = ("none", "vocab", "rows")) -> list:
    tensors, info = model()
    by_name = {t.name: t for t in tensors}
    t0 = time.perf_counter()
    descriptions = descriptions_for(tensors, info, layout)
    describe_s = time.perf_counter() - t0
    classes = group_ranks(descriptions)
    now, before = gathered_bytes(descriptions, classes)
    rows = []
    for tp, policy in ((tp, policy) for tp in inference_tps for policy in policies):
        group_key = group_key_for(info, tp)
        units, plan_s, plan_peak = plan(classes, group_key, split_policy(policy, by_name))
        t = traffic(units, by_name, info, layout.world, tp, group_key)
        projected = max(w / (disk * GB) + r / (net * GB) for w, r in zip(t["write"], t["recv"]))
        rows.append({"model": label, "layout": layout.describe(), "inference_tp": tp, "split": policy,
                     "units": len(units),
                     "classes": len(classes), "plan_s": plan_s, "plan_peak_mib": plan_peak / 2**20,
                     "describe_all_ranks_s": describe_s,
                     "gathered_mib": now / 2**20, "gathered_before_mib": before / 2**20,
                     **{f"{k}_max_gb": max(t[k]) / GB for k in ("send", "recv", "write")},
                     **{f"{k}_mean_gb": statistics.mean(t[k]) / GB for k in ("send", "recv", "write")},
                     "messages": t["messages"], "writers": t["writers"], "imbalance": t["imbalance"],
                     "imbalance_floor": t["floor"], "projected_s": projected})
    return rows


def dp_scaling(model, tp: int, pp: int, dps: list) -> list:
    tensors, info = model()
    out = []
    for dp in dps:
        layout = Layout(tp=tp, pp=pp, dp=dp)
        descriptions = descriptions_for(tensors, info, layout)
        classes = group_ranks(descriptions)
        _, seconds, peak = plan(classes)
        now, before = gathered_bytes(descriptions, classes)
        out.append({"dp": dp, "ranks": layout.world, "plan_s": seconds, "plan_peak_mib": peak / 2**20,
                    "gathered_mib": now / 2**20, "gathered_before_mib": before / 2**20})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--disk-gbps", type=float, default=2.0, help="per-rank disk write bandwidth, GB/s")
    p.add_argument("--net-gbps", type=float, default=25.0, help="per-rank network receive bandwidth, GB/s")
    p.add_argument("--json", help="also write the figures to this file")
    args = p.parse_args(argv)

    rows = []
    rows += scenario("Llama-3-405B", llama3_405b, Layout(tp=8, pp=16, dp=8), [8, 16], args.disk_gbps, args.net_gbps)
    rows += scenario("DeepSeek-V3 671B", deepseek_v3_671b, Layout(tp=2, pp=8, dp=64, ep=64, etp=1), [8, 16],
                     args.disk_gbps, args.net_gbps)
    rows += scenario("DeepSeek-V3 671B", deepseek_v3_671b, Layout(tp=1, pp=8, dp=32, ep=32, etp=1), [8, 16],
                     args.disk_gbps, args.net_gbps)
    print(f"Plan at scale (real plan.plan_units on shape-only descriptions); writes = HF + TensorRT-LLM, bf16; "
          f"projection at {args.disk_gbps:g} GB/s disk and {args.net_gbps:g} GB/s network per rank\n")
    head = (f"{'model':<17} {'layout':<46} {'iTP':>3} {'split':>5} {'units':>6} {'plan s':>7} {'plan MiB':>8} "
            f"{'gathered MiB (before)':>21} {'send max/mean GB':>16} {'recv max/mean GB':>16} "
            f"{'write max/mean GB':>17} {'p2p msgs':>8} {'imbal.':>6} {'floor':>5} {'proj. s':>7}")
    print(head)
    for r in rows:
        print(f"{r['model']:<17} {r['layout']:<46} {r['inference_tp']:>3} {r['split']:>5} {r['units']:>6} "
              f"{r['plan_s']:>7.2f} "
              f"{r['plan_peak_mib']:>8.1f} {r['gathered_mib']:>9.2f} ({r['gathered_before_mib']:>8.1f}) "
              f"{r['send_max_gb']:>7.2f}/{r['send_mean_gb']:<8.2f} {r['recv_max_gb']:>7.2f}/{r['recv_mean_gb']:<8.2f} "
              f"{r['write_max_gb']:>8.2f}/{r['write_mean_gb']:<8.2f} {r['messages']:>8} {r['imbalance']:>6.2f} "
              f"{r['imbalance_floor']:>5.2f} {r['projected_s']:>7.1f}")
    scaling = dp_scaling(llama3_405b, tp=8, pp=16, dps=[1, 2, 4, 8, 16])
    print("\nLlama-3-405B at TP8 x PP16, growing DP (same units, more ranks):")
    print(f"{'DP':>3} {'ranks':>6} {'plan s':>7} {'plan MiB':>8} {'gathered MiB':>12} {'before MiB':>10}")
    for s in scaling:
        print(f"{s['dp']:>3} {s['ranks']:>6} {s['plan_s']:>7.3f} {s['plan_peak_mib']:>8.1f} {s['gathered_mib']:>12.2f} "
              f"{s['gathered_before_mib']:>10.1f}")
    print("\nGoal 4:")
    goals = [goal_line(f"writer imbalance {r['model']} {r['layout'].split(';')[0]} iTP{r['inference_tp']} "
                       f"split {r['split']}", r["imbalance"], 1.5) for r in rows]
    first, last = scaling[0], scaling[-1]
    goals.append(goal_line(f"plan time at {last['ranks']} / {first['ranks']} ranks (same units)",
                           last["plan_s"] / first["plan_s"], 2.0))
    goals.append(goal_line(f"plan memory at {last['ranks']} / {first['ranks']} ranks (same units)",
                           last["plan_peak_mib"] / first["plan_peak_mib"], 2.0))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows, "dp_scaling": scaling, "goals": goals}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
