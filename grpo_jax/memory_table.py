"""The text table of a `grpo_jax.memory.MemoryPlan` (`MemoryPlan.table()`)."""

from __future__ import annotations

GIB = 2 ** 30


def gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def format_table(plan, categories) -> str:
    """One row per category (per device, unsharded, dtype, assumption); a category made of
    several parts (LoRA's params: the frozen base and the adapters) gets a row for each part
    under it. Then the total, the peak and, with the device's memory, whether the peak fits."""
    mesh = " ".join(f"{k}={v}" for k, v in plan.mesh_shape.items())
    trained = (f", {plan.num_trainable:,} trained (LoRA rank {plan.lora_rank})"
               if plan.lora_rank else "")
    lines = [f"memory plan: {plan.label} ({plan.num_params:,} params{trained}) on mesh {mesh} "
             f"({plan.num_devices} device{'s' if plan.num_devices > 1 else ''})",
             f"{'category':<16} {'per device':>12} {'unsharded':>12}  {'dtype':<9} assumption"]
    for c in categories:
        dev = plan.category_bytes(c)
        if dev is None:
            lines.append(f"{c:<16} {'-':>12} {'-':>12}  {'':<9} {plan.notes.get(c, '')}")
            continue
        glob = plan.category_bytes(c, per_device=False)
        glob_text = "-" if glob is None else gib(glob)
        lines.append(f"{c:<16} {gib(dev):>12} {glob_text:>12}  {plan.dtypes.get(c, ''):<9} "
                     f"{plan.notes.get(c, '')}")
        parts = plan.parts(c)
        if len(parts) > 1:
            for part, dtype in parts.items():
                lines.append(f"{'  ' + part:<16} {gib(plan.category_bytes(c, part=part)):>12} "
                             f"{gib(plan.category_bytes(c, per_device=False, part=part)):>12}  "
                             f"{dtype}")
    lines.append(f"{'total':<16} {gib(plan.total):>12}   (every category at once)")
    lines.append(f"{'peak':<16} {gib(plan.peak):>12}   (params + optimizer + reference + "
                 "max(kv_cache + sampling_weights, gradients + activations))")
    if plan.device_memory is not None:
        share = plan.peak / plan.device_memory
        verdict = "fits" if plan.fits else "DOES NOT FIT"
        lines.append(f"{'device':<16} {gib(plan.device_memory):>12}   {verdict} "
                     f"(peak is {share:.0%} of one device)")
        if not plan.fits:
            lines.append(f"WARNING: peak {gib(plan.peak)} exceeds the {gib(plan.device_memory)} "
                         "of one device: shard more (fsdp/tp), shrink kv_batch/kv_length or "
                         "the micro-batch, use remat=\"full\", or gather_weights=False")
        elif plan.total > plan.device_memory:
            lines.append(f"WARNING: total {gib(plan.total)} exceeds one device; this relies on "
                         "the rollout's buffers being freed before the train step")
    lines.extend(f"note: {w}" for w in plan.warnings)
    return "\n".join(lines)
