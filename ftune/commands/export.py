"""`ftune export`: write a trained model in a serving format, checked against the trained model, with a model card.

Examples: `ftune export run=runs/tiny_lora/X format=gguf quant=q8_0 out=exports/tiny-gguf`,
`ftune export adapter=runs/a/final format=hf out=exports/merged push=true repo_id=me/tiny`.
"""

from ftune.commands import command_config


def run(args) -> int:
    """Parse `key=value` options, export, and print the parity checks, the servers' warnings and the push."""
    from ftune.config.commands import ExportCfg, export_problems
    from ftune.export.exporter import export
    from ftune.report.card import parity_rows
    from ftune.report.console import console, print_table

    cfg = command_config(ExportCfg, args, export_problems)
    if cfg is None:
        return 0
    result = export(cfg)
    rows = {"written": f"format={cfg.format} -> {result.out}", "files": ", ".join(result.files)}
    print_table("ftune export", rows | parity_rows(result.parity))
    for warning in result.warnings:
        console.print(f"warning: {warning}", soft_wrap=True)
    if result.push is not None:
        console.print(result.push, soft_wrap=True)
    return 0
