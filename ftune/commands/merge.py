"""`ftune merge`: fold an adapter (or a combination of adapters) into a model that loads without ftune.

Examples: `ftune merge adapter=runs/tiny_lora/X/final out=merged`, or to combine two adapters into one,
`ftune merge adapters=[a/final,b/final] weights=[0.7,0.3] combination=ties out=combined merge=false`.
"""

from ftune.commands import command_config


def run(args) -> int:
    """Parse `key=value` options, merge, and report the logit check."""
    from ftune.config.commands import MergeCfg, merge_problems
    from ftune.model.merge import merge
    from ftune.report.console import print_table

    cfg = command_config(MergeCfg, args, merge_problems)
    if cfg is None:
        return 0
    result = merge(cfg)
    rows = {"base": result.base, "written": f"{result.kind} -> {result.out}",
            "adapter effect (max |logit change|)": result.adapter_effect}
    if result.max_abs_diff is not None:
        rows["max |merged - (base+adapter)| logit"] = f"{result.max_abs_diff:.3g} (tolerance {result.tolerance:.3g})"
    print_table("ftune merge", rows)
    return 0
